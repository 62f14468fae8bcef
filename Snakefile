# dpogen: DPO training with per-sample margins, next to the theory of Im & Li (arXiv 2408.03459).
# The map of the workflow: configuration and its checks, the stage files, the default target.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO / "src"))
from dpogen.codehash import code_param  # noqa: E402
from dpogen.config import (  # noqa: E402
    axes,
    check,
    group_label,
    normalize,
    replicate,
    run_config,
    runs,
    sweep_label,
    sweep_title,
    with_replicate,
)
from dpogen.inputs import data_files  # noqa: E402
from dpogen.plan import check as check_plan  # noqa: E402
from dpogen.settings import THEORY_FROM_DPO, value_settings  # noqa: E402


configfile: str(REPO / "config" / "config.yaml")


normalize(
    config
)  # a grid sweep replaces the default's single axis (config files merge key by key)

# Types, ranges and unknown keys first, then what the schema cannot say (eval steps, K); both stop the
# run before any job with a message naming the key. Snakemake's own schema error prints the whole schema:
# the check's one line (key, value, what is allowed) replaces it.
try:
    validate(config, str(REPO / "config" / "schema.yaml"))
except WorkflowError:
    check(config)
    raise
check(config)
# the memory plan (python -m dpogen.plan): a run that needs more than resources.gpu_mem_gb per GPU, or
# more GPUs than resources.gpus, stops here, naming the run and the largest term
check_plan(config)

EXP = config["experiment"]
RUNS = runs(config)
SCALING = {"data.k", "data.gaussian.q"} <= {a["param"] for a in axes(config)}
OUT = f"results/{EXP}"
RUN = f"{OUT}/{{run}}"
LOGS = f"{OUT}/logs"


# cheap aggregation runs in the main process, not as cluster jobs
localrules:
    all,
    run_report,
    summary,
    scaling,


wildcard_constraints:
    run="|".join(RUNS),


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/dpo.smk"
include: "rules/theory.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        f"{OUT}/summary.csv",
        f"{OUT}/summary.parquet",
        f"{OUT}/fit.csv",
        f"{OUT}/summary.md",
        f"{OUT}/margins_by_run.png",
        f"{OUT}/error_vs_k.png",
        # a K x Q grid: the scaling study (smallest Q per K at the target test error, beside the v5 bound)
        [f"{OUT}/scaling.csv", f"{OUT}/scaling.png"] if SCALING else [],
        # theory.attribution_check: leave-one-concept-out retraining against the attribution
        [f"{OUT}/attribution_check.csv"] if CHECK_ATTRIBUTION else [],
