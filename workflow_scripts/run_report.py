"""Snakemake adapter: rule run_report → per-run summary table and figure."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import json  # noqa: E402

import pandas as pd  # noqa: E402

from dpogen import figures, report, tables  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake):
    i = snakemake.input
    dyn = pd.read_parquet(i.dynamics)
    s = report.run_summary(snakemake.wildcards.run, snakemake.params.sweep_value, tables.read_margins(i.margins),
                           pd.read_parquet(i.certificates), pd.read_parquet(i.bounds),
                           json.loads(open(i.card).read()), dyn, group=snakemake.params.group,
                           replicate=snakemake.params.replicate, interference=pd.read_parquet(i.interference))
    report.write_summary_csv(s, snakemake.output.summary)
    figures.plot_run(s, f"run {snakemake.wildcards.run}", snakemake.output.figure)
    figures.plot_geometry(pd.read_parquet(i.geometry), f"run {snakemake.wildcards.run}: geometry of g(x)",
                         snakemake.output.geometry)
    figures.plot_dynamics(dyn, f"run {snakemake.wildcards.run}: margins, measured and predicted",
                         snakemake.output.dynamics)
    figures.plot_interference(pd.read_parquet(i.interference), f"run {snakemake.wildcards.run}: how concepts "
                              "move each other's margins", snakemake.output.interference)
