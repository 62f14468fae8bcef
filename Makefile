# The two commands of the README. Both set up the environment first (scripts/setup.sh).
PY ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin,.venv/bin)
CORES ?= 2

.PHONY: setup run test report lint
setup:
	./scripts/setup.sh

run: setup
	$(PY)/snakemake --cores $(CORES)

report: setup
	$(PY)/snakemake --report results/report.html

test: setup
	$(PY)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY)/ruff check src tests bench workflow_scripts
	$(PY)/snakemake --lint
	$(PY)/snakefmt --check .
