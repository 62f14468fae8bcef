"""Snakemake adapter: rule dpo → dpogen.dpo.train_dpo."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen.dpo import train_dpo  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake):
    train_dpo(snakemake.input.ref, pd.read_parquet(snakemake.input.train), pd.read_parquet(snakemake.input.test),
              snakemake.input.ref_logps, snakemake.params.dpo, snakemake.params.seed,
              snakemake.output.margins, snakemake.output.metrics, snakemake.params.work,
              out_info=snakemake.output.info)
