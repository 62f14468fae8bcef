"""Benchmark: the theory stage on 10,000 pairs with d = 4,096 cached features (the size of a 7B model's
hidden state), against a baseline in the same process: one pass of numpy over the features (their mean),
the least any geometry estimate must read.

    python bench/bench_theory.py [--pairs 10000] [--d 4096] [--concepts 10] [--checkpoints 11] [--policy-steps 1]
                                 [--attribution-concepts 16] [--attribution-checkpoints 20]

Then the exact attribution (full-batch sgd on the head, 100 steps) at --attribution-concepts and
--attribution-checkpoints, against the recursion alone (the margins without their split) as baseline.

--policy-steps: checkpoints at which the backbone's g(x) is analysed again (dpo.geometry_steps, default the
last step), as when the backbone trains.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dpogen.theory.stage import run_theory  # noqa: E402
from dpogen.settings import DPO, Theory  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--concepts", type=int, default=10)
    ap.add_argument("--checkpoints", type=int, default=11)
    ap.add_argument("--policy-steps", type=int, default=1)
    ap.add_argument("--attribution-concepts", type=int, default=16)
    ap.add_argument("--attribution-checkpoints", type=int, default=20)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, K, d = a.pairs, a.concepts, a.d
    concept = np.array([f"c{i % K}" for i in range(n)])
    cluster = np.where((np.arange(n) // K) % 2 == 0, 1, -1).astype(np.int8)
    basis = rng.normal(size=(K + 1, d)) / np.sqrt(d)
    feats = (basis[0] * 3 + basis[1:][np.arange(n) % K] * cluster[:, None] + 0.05 * rng.normal(size=(n, d)))
    feats = feats.astype(np.float32)
    split = np.where(np.arange(n) < int(0.9 * n), "train", "test")
    ids = [f"s{i}" for i in range(n)]
    ref = pd.DataFrame({"sample_id": ids, "split": split, "token_chosen": np.where(cluster == 1, 5, 7),
                        "token_rejected": np.where(cluster == 1, 7, 5)})
    train = pd.DataFrame({"concept": concept[split == "train"], "cluster": cluster[split == "train"]})
    steps = np.linspace(0, 100, a.checkpoints).astype(int)
    margins = pd.concat([pd.DataFrame({"step": s, "split": split, "sample_id": ids, "concept": concept,
                                       "cluster": cluster, "margin": 0.01 * s * cluster * rng.random(n)})
                         for s in steps], ignore_index=True)
    q = int((split == "train").sum() / (2 * K))
    card = {"K": K, "Q_min": q, "N": int((split == "train").sum()), "Z": 2 * K}
    dpo_cfg = DPO(beta=0.1, lr=1e-3, optimizer="adam", loss="sigmoid", label_smoothing=0.0, regime="last_layer",
                  batch_size="full", weight_decay=0.0, max_grad_norm=None, schedule="constant", warmup_steps=0)
    t = time.perf_counter()
    feats.mean(0)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    ntr = int((split == "train").sum())
    policy = {int(s): feats[:ntr] + np.float32(0.01 * i) for i, s in enumerate(steps[::-1][: a.policy_steps], 1)}
    out = run_theory(train, card, feats, ref, margins, Theory(confidence=0.95, failure_constant_c=1.0), dpo_cfg,
                     policy)
    t_theory = time.perf_counter() - t
    print(f"{n} pairs, d = {d}, K = {K}, {len(steps)} checkpoints ({len(margins)} margin rows)")
    print(f"baseline, one numpy pass over the features   {t_base:8.3f} s")
    print(f"theory stage (geometry at {1 + len(policy)} steps, bounds, certificates, claims, predicted dynamics)  "
          f"{t_theory:8.2f} s  "
          f"({t_theory / t_base:.0f}x the baseline)")
    print("tables:", {k: len(v) for k, v in out.items()})
    attribution_timing(rng, n, d, a.attribution_concepts, a.attribution_checkpoints)


def attribution_timing(rng, n, d, K, checkpoints):
    """The exact split of every margin over 2K training groups at every checkpoint, against the recursion."""
    from dpogen.theory.attribution import attribution
    from dpogen.theory.dynamics import predicted_margins

    concept = np.array([f"c{i % K}" for i in range(n)])
    cluster = np.where((np.arange(n) // K) % 2 == 0, 1, -1).astype(np.int8)
    basis = rng.normal(size=(K + 1, d)) / np.sqrt(d)
    g = (basis[0] + basis[1:][np.arange(n) % K] * cluster[:, None] + 0.05 * rng.normal(size=(n, d)))
    split = np.where(np.arange(n) < int(0.9 * n), "train", "test")
    ids = [f"s{i}" for i in range(n)]
    w, lo = np.where(cluster == 1, 5, 7), np.where(cluster == 1, 7, 5)
    ref = pd.DataFrame({"sample_id": ids, "split": split, "token_chosen": w, "token_rejected": lo})
    steps = np.linspace(0, 100, checkpoints).astype(int)
    margins = pd.concat([pd.DataFrame({"step": s, "split": split, "sample_id": ids, "concept": concept,
                                       "cluster": cluster, "margin": 0.0}) for s in steps], ignore_index=True)
    cfg = DPO(beta=0.1, lr=1.0, loss="sigmoid", label_smoothing=0.0)
    ntr = int((split == "train").sum())
    t = time.perf_counter()
    predicted_margins(g[:ntr], w[:ntr], lo[:ntr], g, w, lo, beta=0.1, lr=1.0, steps=100, checkpoints=list(steps))
    t_rec = time.perf_counter() - t
    t = time.perf_counter()
    att, inter = attribution(g, ref, margins, cfg)
    t_att = time.perf_counter() - t
    print(f"attribution: {n} pairs, d = {d}, K = {K} ({2 * K} training groups), {checkpoints} checkpoints, 100 steps")
    print(f"baseline, the recursion alone                {t_rec:8.2f} s")
    print(f"exact attribution ({len(att)} rows, K x K per checkpoint)  {t_att:8.2f} s  "
          f"({t_att / t_rec:.1f}x the baseline)")


if __name__ == "__main__":
    main()
