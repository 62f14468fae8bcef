"""Start DPO training in several processes with ``accelerate launch`` (data parallel, see distributed.py).

    python -m dpogen.launch JOB.json    # what each launched process runs

The job file holds train_dpo's arguments (paths and the dpo config); the workflow script writes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

SRC = Path(__file__).resolve().parents[1]


def launch_dpo(job: dict, processes: int, log_path: str | None = None) -> None:
    """Run ``train_dpo(**job)`` in ``processes`` processes through ``accelerate launch``; raise if any fails."""
    from .model import LOAD_OPTIONS

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**job, "load_options": dict(LOAD_OPTIONS)}, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dpogen.launch", f.name]
    try:
        if log_path:
            with open(log_path, "a") as out:
                subprocess.run(cmd, check=True, env=env, stdout=out, stderr=subprocess.STDOUT)
        else:
            subprocess.run(cmd, check=True, env=env)
    finally:
        os.unlink(f.name)


def main(job_file: str) -> None:
    from .dpo import train_dpo
    from .training import setup_logging

    from . import model

    job = json.loads(Path(job_file).read_text())
    model.LOAD_OPTIONS.update(job.pop("load_options", {}))  # as in the parent job: same revision, attention
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(None)
    if rank != 0:
        import logging

        logging.getLogger("dpogen").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, job.pop("threads", 1)))
    train_dpo(job["ref_path"], pd.read_parquet(job["train"]), pd.read_parquet(job["test"]), job["ref_logps_path"],
              job["cfg"], job["seed"], job["out_margins"], job["out_metrics"], job["work_dir"],
              out_info=job.get("out_info"), ref_features_path=job.get("ref_features_path"),
              out_features=job.get("out_features"))


if __name__ == "__main__":
    main(sys.argv[1])
