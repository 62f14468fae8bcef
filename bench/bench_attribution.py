"""Benchmark: the attribution outside the exact regime, checked by retraining, and what TracIn costs.

1. The real workflow on the default synthetic data at K = 4 in four regimes, each with
   ``theory.attribution_check: true`` (every training concept left out in turn and the run retrained):
   exact (last_layer, full-batch sgd: the recursion), last_layer Adam (the actual updates split through
   Adam's preconditioner), full fine-tuning with AdamW (TracIn on the LM head, 512-dim Kronecker projection)
   and LoRA (TracIn on the adapters, 512-dim projection). Prints, per regime, the Pearson correlation of the
   estimated against the retrained change of each held-out concept's mean margin, and the mean error
   relative to the mean change.
2. The time TracIn adds at the margin checkpoints of the default full run and of the LoRA run, against the
   margin checkpoints themselves (the issue's budget: at most 2x).

    python bench/bench_attribution.py [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
from bench.bench_workflow import copy_workflow  # noqa: E402
from tests.workflow_util import snakemake  # noqa: E402

EXACT = {"regime": "last_layer", "optimizer": "sgd", "batch_size": "full", "lr": 0.5, "weight_decay": 0.0,
         "max_grad_norm": None, "schedule": "constant"}
REGIMES = {
    "exact (last_layer, full-batch sgd)": EXACT,
    "last_layer adam, minibatch": {"regime": "last_layer", "optimizer": "adam", "lr": 1e-2},
    "full adamw (TracIn, head 512)": {},
    "lora adamw (TracIn, adapters 512)": {"regime": "lora", "lr": 5e-3},
}


def run_regime(repo: Path, work: Path, index: int, dpo: dict) -> tuple[pd.Series, float, Path]:
    cfg = {"experiment": f"att-{index}", "sweep": {"param": "data.k", "values": [4], "prefix": "k"},
           "dpo": dpo, "theory": {"attribution_check": True}}
    path = work / f"{cfg['experiment']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    snakemake(repo, work, "--configfile", str(path), timeout=3600)
    check = pd.read_csv(work / "results" / cfg["experiment"] / "attribution_check.csv").iloc[0]
    return check, time.perf_counter() - t, work / "results" / cfg["experiment"] / "k4"


def tracin_cost(run_dir: Path, dpo_overrides: dict) -> tuple[float, float, int]:
    """(seconds in margin checkpoints, seconds in TracIn, checkpoints) of one dpo run in this process."""
    from dpogen.engine import loop, tracin
    from dpogen.settings import DPO

    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["dpo"]
    cfg = DPO.model_validate({**base, **dpo_overrides, "save_every": 0})
    spent = {"margins": 0.0, "tracin": 0.0, "n": 0}
    real_call, real_tracin = loop.MarginWriter.__call__, tracin.TracIn.checkpoint

    def timed_tracin(self, step, lp):
        t = time.perf_counter()
        real_tracin(self, step, lp)
        spent["tracin"] += time.perf_counter() - t

    def timed_call(self, step):
        t = time.perf_counter()
        out = real_call(self, step)
        spent["margins"] += time.perf_counter() - t
        spent["n"] += 1
        return out

    loop.MarginWriter.__call__, tracin.TracIn.checkpoint = timed_call, timed_tracin
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            loop.train_dpo(run_dir / "sft", pd.read_parquet(run_dir / "data" / "train.parquet"),
                           pd.read_parquet(run_dir / "data" / "test.parquet"), run_dir / "dpo" / "ref_logps.parquet",
                           cfg, 1234, tmp / "m", tmp / "x.parquet", tmp / "w",
                           ref_features_path=run_dir / "dpo" / "ref_features.npy", out_attribution=tmp / "a.parquet")
    finally:
        loop.MarginWriter.__call__, tracin.TracIn.checkpoint = real_call, real_tracin
    return spent["margins"] - spent["tracin"], spent["tracin"], spent["n"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    base = a.work or Path(tempfile.mkdtemp(prefix="bench-att-"))
    repo = copy_workflow(base / "repo")
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    print("attribution against leave-one-concept-out retraining, default synthetic data, K = 4 (16 cells)")
    print(f"{'regime':38s} {'cells':>5s} {'pearson r':>10s} {'mean err / mean change':>23s} {'wall s':>7s}")
    dirs = {}
    for i, (name, dpo) in enumerate(REGIMES.items()):
        check, secs, run_dir = run_regime(repo, work, i, dpo)
        dirs[name] = run_dir
        print(f"{name:38s} {int(check['cells']):5d} {check['pearson_r']:10.3f} {check['mean_abs_error_rel']:23.3f} "
              f"{secs:7.0f}")
    print("\nTracIn at the margin checkpoints (same run, in this process)")
    for name, over in (("full adamw, head 512", {}), ("lora adamw, adapters 512", {"regime": "lora", "lr": 5e-3})):
        key = "full adamw (TracIn, head 512)" if not over else "lora adamw (TracIn, adapters 512)"
        m, t, n = tracin_cost(dirs[key], over)
        print(f"{name:28s} {n} checkpoints: margins {m:.2f} s, TracIn {t:.2f} s, ratio {t / m:.2f}x")


if __name__ == "__main__":
    main()
