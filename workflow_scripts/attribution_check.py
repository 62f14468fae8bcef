"""Snakemake adapter: rule attribution_check → dpogen.theory.attribution_check.leave_one_out (one process)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen import tables  # noqa: E402
from dpogen.theory.attribution_check import correlation, leave_one_out  # noqa: E402
from dpogen.workflow import job, settings_of  # noqa: E402

with job(snakemake) as log:
    i, s = snakemake.input, settings_of(snakemake)
    cfg = s.dpo.model_copy(update={"processes": 1})
    check = leave_one_out(i.ref, pd.read_parquet(i.train), pd.read_parquet(i.test), i.ref_logps, i.ref_features,
                          tables.read_margins(i.margins), pd.read_parquet(i.interference), cfg, s.seed,
                          s.model.load_options())
    tables.write_attribution_check(check, snakemake.output[0])
    c = correlation(check)
    log.info("attribution check: %d cells, Pearson r %.3f, mean error %.3g of the mean change (%s)", c["cells"],
             c["pearson_r"], c["mean_abs_error_rel"], check["method"].iloc[0])
