"""Snakemake adapter: rule sft → dpogen.sft.train_sft (in dpo.processes processes when it trains)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen.settings import execution_settings  # noqa: E402
from dpogen.sft import train_sft_files  # noqa: E402
from dpogen.workflow import job, run_model_stage  # noqa: E402

with job(snakemake):
    p = snakemake.params
    cfg = {**p.sft, **execution_settings(snakemake.config, "sft")}
    run_model_stage(snakemake, train_sft_files, {"base": p.base, "train": snakemake.input.train, "cfg": cfg,
                                                 "out": snakemake.output[0], "seed": p.seed},
                    p.sft["processes"] if p.sft["target"] != "none" else 1)
