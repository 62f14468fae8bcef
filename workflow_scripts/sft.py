"""Snakemake adapter: rule sft → dpogen.sft.train_sft (in dpo.processes processes when it trains)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen.sft import train_sft_files  # noqa: E402
from dpogen.workflow import job, run_model_stage, settings_of  # noqa: E402

with job(snakemake):
    s = settings_of(snakemake)
    run_model_stage(snakemake, train_sft_files, {"base": snakemake.params.base, "train": snakemake.input.train,
                                                 "cfg": s.sft, "out": snakemake.output[0], "seed": s.seed,
                                                 "engine": s.dpo, "dtype": s.model.dtype,
                                                 "load": s.model.load_options()},
                    s.dpo.processes if s.sft.target != "none" else 1)
