"""Which pairs a margin checkpoint scores, and at which steps: ``dpo.track`` and ``dpo.eval_schedule``.

A checkpoint pass is a forward of every tracked pair; a training step is a forward and backward of one
batch. Tracking every pair at every checkpoint therefore costs about

    checkpoints x tracked pair tokens / (TRAIN_FORWARDS x steps x batch pair tokens)

of the training it measures, which is small at the paper's scale and many times the training on real
preference data. ``track: all`` scores every pair; a count or fraction per split draws a subset once per
run, stratified by (concept, cluster), fixed for every checkpoint, each tracked pair carrying its sampling
weight (its stratum's pairs over its stratum's tracked pairs). ``auto`` tracks everything when that costs at
most ``GOAL`` of the training (or is small in absolute terms, ``FLOOR_FLOPS``), and otherwise chooses a
log-spaced schedule and subset sizes that bring it there, every held-out pair first up to half a pass.
Everything here depends on the data, the config and the seed only, so a resumed run tracks what an
uninterrupted one tracks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import schedule as S

if TYPE_CHECKING:  # the workflow's config check reads size_of while Snakemake parses: no pandas import there
    import pandas as pd

GOAL = 0.25  # auto: tracking at most this share of the training compute
FLOOR_FLOPS = 1e12  # auto: tracking that costs less than this in all is kept whole (seconds on one CPU core)
LOG_POINTS = 15  # auto: checkpoints of the log schedule it falls back to
MIN_TRACKED = 20  # auto: at least this many pairs of a split (or all), and 2 per (concept, cluster) stratum
SPLITS = ("train", "test")


def train_forwards(checkpointing: bool) -> float:
    """A training step in forwards of the same tokens: forward + backward ≈ 3 (6N against 2N FLOPs per token),
    4 when activation checkpointing runs each forward twice."""
    return 4.0 if checkpointing else 3.0


@dataclass(frozen=True)
class Tracked:
    """The tracked pairs of a run: indices into the run's pairs (train first, sorted), their sampling weights,
    and per split (tracked, total)."""

    index: np.ndarray
    weight: np.ndarray
    counts: dict

    @property
    def everything(self) -> bool:
        return all(n == total for n, total in self.counts.values())

    def describe(self) -> str:
        return ", ".join(f"{split} {n} of {total}" for split, (n, total) in self.counts.items())


def size_of(value, total: int, key: str) -> int:
    """``all``, a count (an int) or a fraction in (0, 1] (a float) of ``total`` pairs."""
    if value in (None, "all"):
        return total
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: {value!r}; use all, a count (an integer) or a fraction in (0, 1]")
    if isinstance(value, float):
        if not 0 < value <= 1 or not math.isfinite(value):
            raise ValueError(f"{key}: fraction {value} outside (0, 1]")
        return max(1, math.ceil(value * total))
    if value < 1:
        raise ValueError(f"{key}: count {value}; at least 1")
    if value > total:
        raise ValueError(f"{key}: {value} pairs asked for, the run has {total}")
    return int(value)


def allocate(sizes: np.ndarray, n: int, key: str) -> np.ndarray:
    """``n`` draws over strata of ``sizes``: proportional, at least two per stratum (one where a stratum has
    one pair: a stratum's spread needs two), the rest to the largest remainders, never more than a stratum
    holds."""
    floor = np.minimum(sizes, 2)
    if n < floor.sum():
        raise ValueError(f"{key}: {n} pairs for {len(sizes)} (concept, cluster) strata would leave a stratum "
                         f"without the two pairs its spread needs; track at least {int(floor.sum())}")
    share = n * sizes / sizes.sum()
    take = np.clip(np.floor(share).astype(np.int64), floor, sizes)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    while take.sum() < n:  # hand out what is left, largest remainder first, where a stratum has room
        for h in order:
            if take.sum() == n:
                break
            if take[h] < sizes[h]:
                take[h] += 1
    while take.sum() > n:  # the floor overshot: take back from the strata furthest above their share
        room = np.flatnonzero(take > floor)
        h = room[np.argmax((take - share)[room])]
        take[h] -= 1
    return take


def draw(pairs: pd.DataFrame, sizes: dict[str, int], seed: int) -> Tracked:
    """Per split, ``sizes[split]`` pairs drawn without replacement, stratified by (concept, cluster); the draw
    within a stratum orders its pairs by sample id first, so it does not depend on the table's order."""
    index, weight, counts = [], [], {}
    for code, split in enumerate(SPLITS):
        rows = pairs.index[pairs["split"].to_numpy() == split].to_numpy()
        n = sizes.get(split, len(rows))
        counts[split] = (int(n), len(rows))
        if n == len(rows):
            index.append(rows)
            weight.append(np.ones(len(rows)))
            continue
        sub = pairs.loc[rows]
        strata = list(sub.groupby(["concept", "cluster"], sort=True).groups.items())
        take = allocate(np.array([len(g) for _, g in strata]), n, f"dpo.track.{split}")
        for h, ((concept, cluster), members) in enumerate(strata):
            members = np.asarray(sorted(members, key=lambda i: pairs.at[i, "sample_id"]))
            rng = np.random.default_rng([seed, code, h])
            chosen = np.sort(rng.choice(members, size=int(take[h]), replace=False))
            index.append(chosen)
            weight.append(np.full(len(chosen), len(members) / take[h]))
    index, weight = np.concatenate(index), np.concatenate(weight)
    order = np.argsort(index, kind="stable")
    return Tracked(index[order], weight[order], counts)


def requested(pairs: pd.DataFrame, track, seed: int) -> Tracked:
    """The subset ``dpo.track`` names (``all`` or a mapping of sizes per split)."""
    whole = isinstance(track, str)  # "all"; otherwise settings.Track
    sizes = {split: size_of("all" if whole else getattr(track, split), int((pairs["split"] == split).sum()),
                            f"dpo.track.{split}") for split in SPLITS}
    return draw(pairs, sizes, seed if whole or track.seed is None else track.seed)


@dataclass(frozen=True)
class Cost:
    """Forward tokens of training and of tracking, and the FLOPs of tracking (2 x forward parameters per token)."""

    training: float
    tracking: float
    tracking_flops: float

    @property
    def ratio(self) -> float:
        return self.tracking / self.training if self.training else math.inf

    def describe(self) -> str:
        return f"{self.ratio:.3g}x the training ({self.tracking:.3g} against {self.training:.3g} forward tokens)"


def cost(train_tokens: np.ndarray, pass_tokens: np.ndarray, n_train: int, steps: int, bsz: int, checkpoints: int,
         tracked: np.ndarray, forward_params: int, checkpointing: bool) -> Cost:
    """``train_tokens``: per training pair, the tokens of its rows in a training step; ``pass_tokens``: per
    pair, the tokens of a checkpoint pass (one prompt pass for multi-token answers). Every checkpoint but step
    0 is a pass (the policy at step 0 is the reference, whose log-probs the reference pass gave)."""
    training = train_forwards(checkpointing) * steps * bsz * float(np.mean(train_tokens[:n_train]))
    tracking = max(checkpoints - 1, 0) * float(pass_tokens[tracked].sum())  # step 0 is the reference pass's
    return Cost(training, tracking, 2.0 * forward_params * tracking)


def choose(pairs: pd.DataFrame, n_train: int, train_tokens: np.ndarray, pass_tokens: np.ndarray, steps: int,
           bsz: int, schedule: list[int], keep: set[int], track, seed: int, forward_params: int,
           checkpointing: bool) -> tuple[Tracked, list[int], str]:
    """(tracked pairs, checkpoint steps, what was chosen and why). ``keep``: steps the schedule must hold
    whatever it becomes (τ_1, the geometry steps)."""
    def priced(tr: Tracked, sched: list[int]) -> Cost:
        return cost(train_tokens, pass_tokens, n_train, steps, bsz, len(sched), tr.index, forward_params,
                    checkpointing)

    if track != "auto":
        tr = requested(pairs, track, seed)
        c = priced(tr, schedule)
        what = "every pair" if tr.everything else f"a stratified subset ({tr.describe()})"
        return tr, schedule, f"dpo.track: {what} at {len(schedule)} checkpoints: tracking costs {c.describe()}"
    full = requested(pairs, "all", seed)
    c = priced(full, schedule)
    if c.ratio <= GOAL or c.tracking_flops <= FLOOR_FLOPS:
        why = (f"at most {GOAL}" if c.ratio <= GOAL else
               f"above {GOAL}, but {c.tracking_flops:.2g} FLOPs in all, under the {FLOOR_FLOPS:.0e} floor")
        return full, schedule, (f"dpo.track auto: every pair at {len(schedule)} checkpoints, tracking costs "
                                f"{c.describe()}: {why}")
    sched = schedule
    if len(schedule) > LOG_POINTS:
        sched = sorted(set(S.log_schedule(steps, LOG_POINTS)) | keep)
    per_pass = GOAL * c.training / max(len(sched) - 1, 1)
    test = pairs["split"].to_numpy() == "test"
    t_tok, r_tok = pass_tokens[test], pass_tokens[~test]
    sizes = {}
    if t_tok.sum() <= per_pass / 2:
        sizes["test"] = int(test.sum())
    else:
        sizes["test"] = _at_least(int(per_pass / 2 / t_tok.mean()), pairs[test])
    left = per_pass - sizes["test"] * (t_tok.mean() if len(t_tok) else 0.0)
    sizes["train"] = _at_least(int(max(left, 0) / r_tok.mean()), pairs[~test])
    tr = draw(pairs, sizes, int(seed))
    chosen = priced(tr, sched)
    when = (f"{len(sched)} log-spaced checkpoints" if sched != schedule else f"the {len(sched)} checkpoints")
    return tr, sched, (f"dpo.track auto: every pair at {len(schedule)} checkpoints would cost {c.describe()}, over "
                       f"{GOAL}; chose {when} and {tr.describe()} pairs (stratified by concept and cluster): "
                       f"{chosen.ratio:.3g}x")


def _at_least(n: int, part: pd.DataFrame) -> int:
    """A subset size no smaller than MIN_TRACKED and two per stratum, and no larger than the split."""
    floor = int(np.minimum(part.groupby(["concept", "cluster"]).size().to_numpy(), 2).sum())
    return int(min(len(part), max(n, MIN_TRACKED, floor)))
