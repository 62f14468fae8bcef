"""Snakemake adapter: rule ref_logps → dpogen.reference.compute_reference."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen.reference import compute_reference  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake):
    compute_reference(snakemake.input.ref, pd.read_parquet(snakemake.input.train),
                      pd.read_parquet(snakemake.input.test), snakemake.params.dpo,
                      snakemake.output.logps, snakemake.output.features)
