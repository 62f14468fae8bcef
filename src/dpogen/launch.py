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


# the stages' entry points, named rather than imported: a stage's code hash follows only its own imports
STAGES = {"dpo": "dpogen.engine.loop:train_dpo_files", "sft": "dpogen.sft:train_sft_files",
          "ref": "dpogen.reference:compute_reference_files"}


def launch(stage: str, job: dict, processes: int, log_path: str | None = None, threads: int = 1) -> None:
    """Run ``stage`` (a name of STAGES, or "module:function") on the keyword arguments ``job`` in
    ``processes`` processes; raise if any fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job_record(stage, job, threads), f)
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


def job_record(stage: str, job: dict, threads: int = 1) -> dict:
    """What a launched process reads (JSON): the stage's entry point, its arguments (the model's loading
    options among them) and the threads per process."""
    return {"stage": STAGES.get(stage, stage), "args": {k: _encode(v) for k, v in job.items()}, "threads": threads}


def _encode(value):
    """A typed settings section travels as its class name and fields (the job file is JSON)."""
    from .settings import Section

    return {"section": type(value).__name__, "fields": value.model_dump()} if isinstance(value, Section) else value


def _decode(value):
    from .settings import sections

    if isinstance(value, dict) and set(value) == {"section", "fields"}:
        return getattr(sections, value["section"]).model_validate(value["fields"])
    return value


def run_stage(stage: str, args: dict) -> None:
    """The stage's entry point on its arguments, in this process."""
    import importlib

    module, func = STAGES.get(stage, stage).split(":")
    getattr(importlib.import_module(module), func)(**args)


def main(job_file: str) -> None:
    import logging

    import torch

    from .training import setup_logging

    job = json.loads(Path(job_file).read_text())
    setup_logging(None)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("dpogen").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, job.get("threads", 1)))
    run_stage(job["stage"], {k: _decode(v) for k, v in job["args"].items()})


if __name__ == "__main__":
    main(sys.argv[1])
