"""Snakemake adapter: rule dpo → dpogen.dpo.train_dpo (in dpo.processes processes through accelerate)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

import pandas as pd  # noqa: E402

from dpogen.dpo import train_dpo  # noqa: E402
from dpogen.launch import launch_dpo  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake) as log:
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    if p.dpo["processes"] > 1:
        log.info("launching %d processes with accelerate", p.dpo["processes"])
        launch_dpo({"ref_path": i.ref, "train": i.train, "test": i.test, "ref_logps_path": i.ref_logps, "cfg": p.dpo,
                    "seed": p.seed, "out_margins": o.margins, "out_metrics": o.metrics, "work_dir": p.work,
                    "out_info": o.info, "ref_features_path": i.ref_features, "out_features": o.features,
                    "threads": max(1, snakemake.threads // p.dpo["processes"])},
                   p.dpo["processes"], log_path=snakemake.log[0])
    else:
        train_dpo(i.ref, pd.read_parquet(i.train), pd.read_parquet(i.test), i.ref_logps, p.dpo, p.seed,
                  o.margins, o.metrics, p.work, out_info=o.info, ref_features_path=i.ref_features,
                  out_features=o.features)
