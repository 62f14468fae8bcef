"""Snakemake adapter: rule check_data → dpogen.data.stage.check_source (every row of the source, before the scratch
tokenizer reads them)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen.config import run_settings, runs  # noqa: E402
from dpogen.data.stage import check_source, hf_pin_path, pin_hf_revision  # noqa: E402
from dpogen.io import write_json  # noqa: E402
from dpogen.workflow import job, settings_of  # noqa: E402

with job(snakemake) as log:
    # every run's K from the workflow's config, checked here but not written: adding a run must not change
    # the output (the base model waits for it)
    s = settings_of(snakemake)
    ks = {run: run_settings(snakemake.config, run).data.k for run in runs(s)}
    d = pin_hf_revision(s.data, hf_pin_path(s.experiment))
    checked = check_source(d, ks)
    write_json(checked, snakemake.output[0])
    log.info("data check: %s, %d concepts, %d pairs, every row valid; K of %d run(s) fits", checked["source"],
             checked["n_concepts"], checked["n_pairs"], len(ks))
