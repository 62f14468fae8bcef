"""Snakemake adapter: rule sft → dpogen.sft.train_sft."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen.sft import train_sft  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake):
    train_sft(snakemake.params.base, pd.read_parquet(snakemake.input.train), snakemake.params.sft,
              snakemake.output[0], snakemake.params.seed)
