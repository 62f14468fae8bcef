"""Snakemake adapter: rule scaling → the smallest Q per K at the target test error, beside the v5 bound."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen.report import figures  # noqa: E402
from dpogen.report import summary as report  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake) as log:
    s = pd.read_parquet(snakemake.input.summary)
    table = report.scaling_table(s, snakemake.params.target)
    report.write_summary_csv(table, snakemake.output.csv)
    figures.plot_scaling(s, table, snakemake.output.figure)
    log.info("scaling: %s", table["fit_Q_star_vs_logK"].iloc[0])
