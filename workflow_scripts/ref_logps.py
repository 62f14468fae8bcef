"""Snakemake adapter: rule ref_logps → dpogen.reference.compute_reference (sharded like training)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen.reference import compute_reference_files  # noqa: E402
from dpogen.workflow import job, run_model_stage, settings_of  # noqa: E402

with job(snakemake):
    i, o, s = snakemake.input, snakemake.output, settings_of(snakemake)
    run_model_stage(snakemake, compute_reference_files, {"ref_path": i.ref, "train": i.train, "test": i.test,
                                                         "cfg": s.dpo, "out_logps": o.logps,
                                                         "out_features": o.features, "load": s.model.load_options()},
                    s.dpo.processes)
