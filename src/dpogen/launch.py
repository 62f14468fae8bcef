"""Start a model stage (dpo training, SFT, the reference pass) in several processes with ``accelerate launch``.

    python -m dpogen.launch JOB.json    # what each launched process runs

The job file names the stage and holds its function's arguments (paths and settings); the workflow
script writes it. The processes find each other through the environment accelerate sets (engine.parallel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]


def launch(stage: str, job: dict, processes: int, log_path: str | None = None, threads: int = 1) -> None:
    """Run ``stage`` with ``job`` as its arguments in ``processes`` processes; raise if any fails."""
    from .model import LOAD_OPTIONS

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"stage": stage, "args": job, "load_options": dict(LOAD_OPTIONS), "threads": threads}, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
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


def launch_dpo(job: dict, processes: int, log_path: str | None = None) -> None:
    launch("dpo", {k: v for k, v in job.items() if k != "threads"}, processes, log_path, job.get("threads", 1))


def run_stage(stage: str, a: dict) -> None:
    """The stage's function on its arguments, in this process."""
    import pandas as pd

    if stage == "dpo":
        from .engine.loop import train_dpo

        train_dpo(a["ref_path"], pd.read_parquet(a["train"]), pd.read_parquet(a["test"]), a["ref_logps_path"],
                  a["cfg"], a["seed"], a["out_margins"], a["out_metrics"], a["work_dir"], out_info=a.get("out_info"),
                  ref_features_path=a.get("ref_features_path"), out_features=a.get("out_features"))
    elif stage == "sft":
        from .sft import train_sft

        train_sft(a["base"], pd.read_parquet(a["train"]), a["cfg"], a["out"], a["seed"])
    elif stage == "ref":
        from .reference import compute_reference

        compute_reference(a["ref_path"], pd.read_parquet(a["train"]), pd.read_parquet(a["test"]), a["cfg"],
                          a["out_logps"], a["out_features"])
    else:
        raise ValueError(f"unknown stage {stage!r} (dpo, sft, ref)")


def main(job_file: str) -> None:
    import logging

    import torch

    from . import model
    from .training import setup_logging

    job = json.loads(Path(job_file).read_text())
    model.LOAD_OPTIONS.update(job.get("load_options", {}))  # as in the parent job: same revision, attention
    setup_logging(None)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("dpogen").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, job.get("threads", 1)))
    run_stage(job["stage"], job["args"])


if __name__ == "__main__":
    main(sys.argv[1])
