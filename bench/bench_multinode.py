"""Benchmark: the dpo stage on 2 "nodes" x 2 processes against the same 4 processes on one launcher (CPU, gloo).

The 2-node run is what srun starts on a cluster: two ``python -m dpogen.launch --node JOB`` launchers, each
given the environment SLURM sets for its task (SLURM_NODEID, SLURM_NNODES, ...), each starting its torchrun,
both joining one c10d rendezvous on 127.0.0.1; the 1-launcher run is ``dpogen.launch.launch`` (accelerate,
4 processes). Same job, same scratch Llama (bench_fsdp_memory's 66M model), FSDP2; wall time from start to
the tables written, and the largest margin difference between the two runs.

    python bench/bench_multinode.py [--steps 6] [--batch 8]

Last line: ``2 nodes x 2 processes <s> s, 4 processes on one launcher <s> s, ratio <r>x``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from bench_fsdp_memory import build, dpo_cfg  # noqa: E402


def job(folder: Path, name: str, steps: int, batch: int) -> dict:
    out = folder / name
    return {"ref_path": str(folder / "model"), "train": str(folder / "train.parquet"),
            "test": str(folder / "test.parquet"), "ref_logps_path": str(folder / "ref.parquet"),
            "cfg": dpo_cfg(steps, batch).replace(processes=4, eval_every=steps), "seed": 0,
            "out_margins": str(out / "margins"), "out_metrics": str(out / "metrics.parquet"),
            "work_dir": str(out / "work"), "out_info": str(out / "run.json")}


def two_nodes(folder: Path, j: dict) -> float:
    from dpogen.launch import job_record, rendezvous

    rec = job_record("dpo", j, 1)
    rec["rendezvous"] = rendezvous("127.0.0.1", 2, 4, 120)
    path = folder / "two-nodes.json"
    path.write_text(json.dumps(rec))
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", SLURM_JOB_ID="1", SLURM_NNODES="2")
    t0 = time.perf_counter()
    with open(folder / "two-nodes.log", "w") as log:
        procs = [subprocess.Popen([sys.executable, "-m", "dpogen.launch", "--node", str(path)],
                                  env={**base, "SLURM_NODEID": str(n)}, stdout=log, stderr=subprocess.STDOUT)
                 for n in range(2)]
        codes = [p.wait() for p in procs]
    if codes != [0, 0]:
        raise SystemExit((folder / "two-nodes.log").read_text()[-4000:])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    import numpy as np

    from dpogen import tables
    from dpogen.launch import launch

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        n_params = build(folder, 4 * a.batch, a.batch)
        print(f"scratch Llama, {n_params / 1e6:.1f}M parameters; FSDP2 over 4 CPU processes (gloo), {a.steps} steps "
              f"of batch {a.batch}; 2 cores on this machine")
        one = job(folder, "one-launcher", a.steps, a.batch)
        t0 = time.perf_counter()
        launch("dpo", one, 4, log_path=str(folder / "one.log"), threads=1)
        t_one = time.perf_counter() - t0
        two = job(folder, "two-nodes", a.steps, a.batch)
        t_two = two_nodes(folder, two)
        m1, m2 = tables.read_margins(one["out_margins"]), tables.read_margins(two["out_margins"])
        diff = float(np.abs(m1["margin"].to_numpy() - m2["margin"].to_numpy()).max())
    print(f"   4 processes, one launcher (accelerate launch):          {t_one:6.1f} s")
    print(f"   2 nodes x 2 processes (two launchers, c10d rendezvous): {t_two:6.1f} s")
    print(f"   largest margin difference between the two: {diff:.2e}")
    print(f"2 nodes x 2 processes {t_two:.1f} s, 4 processes on one launcher {t_one:.1f} s, ratio {t_two / t_one:.2f}x")


if __name__ == "__main__":
    main()
