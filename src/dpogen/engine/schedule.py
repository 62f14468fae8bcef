"""When things happen in training: steps, the pairs of each step and micro-batch, the margin checkpoints.

Everything here depends on the config and the step alone, so a resumed run draws what an uninterrupted one
draws, and the workflow's config check can call it without torch.
"""

from __future__ import annotations

import math

import numpy as np
from ..settings import DPO


def eval_schedule(cfg: DPO) -> list[int]:
    """Checkpoint steps: the configured list, and every ``eval_every`` steps or, with ``eval_schedule: {log:
    n}``, n log-spaced steps instead; step 0 and the last always."""
    steps = set(cfg.eval_steps)
    log_n = cfg.eval_schedule.log if cfg.eval_schedule is not None else None
    every = cfg.eval_every
    if log_n is not None:
        steps |= set(log_schedule(cfg.steps, log_n))
    elif every:
        steps |= set(range(0, cfg.steps + 1, every))
    steps |= {0, cfg.steps}
    bad = [s for s in steps if s < 0 or s > cfg.steps]
    if bad:
        raise ValueError(f"dpo.eval_steps: {sorted(bad)} outside 0..dpo.steps={cfg.steps}")
    return sorted(steps)


def log_schedule(steps: int, n: int) -> list[int]:
    """``n`` checkpoints over 0..``steps``: step 0, the last step, and between them steps spaced evenly in
    log(step) from step 1, since the margins move fastest early. Rounded steps that collide are pushed apart,
    so there are exactly n (every step when the run has no more than n − 1)."""
    if n < 2:
        raise ValueError(f"dpo.eval_schedule.log: {n} checkpoints; at least 2 (step 0 and the last)")
    if steps + 1 <= n:
        return list(range(steps + 1))
    q = np.round(np.geomspace(1, steps, n - 1)).astype(np.int64)
    for i in range(1, len(q)):  # distinct, rising ...
        q[i] = max(q[i], q[i - 1] + 1)
    q[-1] = steps
    for i in range(len(q) - 2, -1, -1):  # ... and ending at the last step
        q[i] = min(q[i], q[i + 1] - 1)
    return [0, *(int(x) for x in q)]


def geometry_steps(cfg: DPO, schedule: list[int]) -> list[int]:
    """Checkpoints at which g(x) is saved when the backbone trains (``dpo.geometry_steps``; "last" is the
    last step). Each must be a checkpoint; step 0 is the reference, whose g(x) the reference pass gives."""
    want = set()
    for s_ in cfg.geometry_steps:
        want.add(cfg.steps if s_ == "last" else int(s_))
    bad = sorted(want - set(schedule))
    if bad:
        raise ValueError(f"dpo.geometry_steps: {bad} are not checkpoints (dpo.eval_every / eval_steps)")
    return sorted(want - {0})


def tau1_checkpoint(cfg: DPO, train, feats: np.ndarray | None) -> set[int]:
    """The last step at or before τ_1 (full-batch sgd; g(x) rescaled as the theory stage does), if training
    gets there; the theory stage reads the theorem's claims "at τ_1" from this checkpoint."""
    import logging

    from ..timescale import concept_scale, tau1_steps

    if feats is None:
        raise ValueError("dpo.eval_at_tau1 needs the reference features (ref_features.npy)")
    n = len(train)
    scale = concept_scale(feats[:n], train["concept"].to_numpy(), train["cluster"].to_numpy())
    k1 = math.floor(tau1_steps(cfg.beta, train["concept"].nunique(), cfg.lr, scale) + 1e-9)
    if not 1 <= k1 <= cfg.steps:
        logging.getLogger("dpogen").warning("dpo.eval_at_tau1: tau_1 is at step %d, outside 1..%d: no extra "
                                            "checkpoint", k1, cfg.steps)
        return set()
    return {k1}


def total_steps(cfg: DPO, n_train: int, bsz: int) -> int:
    """``dpo.steps``, or enough steps for ``dpo.epochs`` passes over the training pairs when that is set."""
    if cfg.epochs:
        return max(1, math.ceil(cfg.epochs * n_train / bsz))
    return cfg.steps


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Train-pair indices of optimizer step ``step`` (0-based): epochs of seeded permutations, concatenated.
    Depends only on the step, so a resumed run draws the same batches."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off: off + batch_size - len(out)].tolist())
    return np.asarray(out)


def micro_batches(idx: np.ndarray, pair_tokens: np.ndarray, rows_per_pair: np.ndarray, world: int,
                  accum: int = 1, max_tokens: int | None = None) -> list[np.ndarray]:
    """The global batch ``idx`` split into micro-batches, each dealt round-robin over ``world`` processes
    (gradients accumulate over them). ``max_tokens``: every process's share of a micro-batch holds at most
    that many padded tokens (its rows x the longest row; pairs grouped by length, longest first); a pair
    longer than the budget is a micro-batch alone. Without it, ``accum`` equal parts in batch order."""
    if max_tokens is None:
        return [c for c in np.array_split(idx, accum) if len(c)]
    order = idx[np.argsort(-pair_tokens[idx], kind="stable")]
    out, start = [], 0
    while start < len(order):
        longest = int(pair_tokens[order[start]]) * int(rows_per_pair[order].max())
        per_rank = max(1, max_tokens // max(1, longest))
        stop = min(len(order), start + per_rank * world)
        out.append(order[start:stop])
        start = stop
    return out
