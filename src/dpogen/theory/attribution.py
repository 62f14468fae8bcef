"""Why more concepts hurt: each margin split over the training concepts (and clusters) that moved it.

In the theorems' regime (the LM head alone, full-batch sgd, single-token answers) the recursion of docs/theory.md
section 2 is exact and linear in the per-step sum over training pairs, so every pair's margin at a
checkpoint splits exactly into the parts each training (concept, cluster) contributed:
Δr_j = η (β²/N) Σ_k Σ_{i in group} w_i(k) C_ij, w_i(k) = −f′(r_i(k)). Outside it the dpo stage's estimate is
used (engine/update_split.py for last_layer with Adam or mini-batches, engine/tracin.py for full and lora),
labelled as such; the interference matrix is built the same way from either.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..settings import DPO

METHOD_EXACT = "exact: the recursion split over training (concept, cluster), theorems' regime"


def attribution(features: np.ndarray, ref: pd.DataFrame, margins: pd.DataFrame, dpo_cfg: DPO,
                reason: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-pair attribution, K×K interference) for one run. ``reason``: why the exact split does not apply
    (then both tables hold one row saying so). Per pair j, checkpoint and training (concept, cluster): the
    contribution to r_j; the contributions of a pair sum to its predicted margin (= the measured one, to the
    precision of the recursion claim)."""
    if reason:
        return not_computed(reason)
    att = exact_split(features, ref, margins, dpo_cfg)[1]
    return att, interference(att)


def exact_split(features: np.ndarray, ref: pd.DataFrame, margins: pd.DataFrame,
                dpo_cfg: DPO, train: pd.DataFrame | None = None) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """One run of the recursion split over the training (concept, cluster) groups: ({checkpoint: predicted
    margins}, the attribution table). The theory stage's dynamics reuse the margins, so the recursion runs
    once. It runs over every training pair and the held-out pairs the margins hold (dynamics.predicted_pairs);
    the table keeps the tracked ones (``train``: the training pairs' table, whose groups a subset needs)."""
    from .dynamics import predicted_pairs, predicted_margins

    first = margins[margins["step"] == margins["step"].min()].set_index("sample_id")
    keep = predicted_pairs(ref, margins)
    features, ref = np.asarray(features)[keep], ref[keep]
    n = int((ref["split"] == "train").sum())
    ids = ref["sample_id"].to_numpy()
    meta = first[["concept", "cluster"]]
    if train is not None:  # a tracked subset: the groups of every training pair, tracked or not
        meta = pd.concat([train.set_index("sample_id")[["concept", "cluster"]], meta])
        meta = meta[~meta.index.duplicated()]
    concept = meta.loc[ids, "concept"].astype(str).to_numpy()
    cluster = meta.loc[ids, "cluster"].astype(int).to_numpy()
    keys = sorted(set(zip(concept[:n], cluster[:n])))
    group = {k: g for g, k in enumerate(keys)}
    groups = np.array([group[(c, s)] for c, s in zip(concept[:n], cluster[:n])])
    w, lo = ref["token_chosen"].to_numpy(), ref["token_rejected"].to_numpy()
    g = np.asarray(features, np.float64)
    kw = dict(loss=dpo_cfg.loss if dpo_cfg.loss != "ipo_norm" else "ipo",
              label_smoothing=dpo_cfg.label_smoothing)
    checkpoints = sorted(int(s) for s in margins["step"].unique())
    pred, parts = predicted_margins(g[:n], w[:n], lo[:n], g, w, lo, beta=dpo_cfg.beta, lr=float(dpo_cfg.lr),
                                    steps=max(checkpoints), checkpoints=checkpoints, groups=groups, **kw)
    split = ref["split"].to_numpy()
    tracked = np.isin(ids, first.index.to_numpy())
    frames = [pd.DataFrame({"step": step, "split": split, "sample_id": ids, "concept": concept, "train_concept": c,
                            "train_cluster": s, "contribution": P[:, gi]})[tracked]
              for step, P in parts.items() for gi, (c, s) in enumerate(keys)]
    return pred, pd.concat(frames, ignore_index=True).assign(method=METHOD_EXACT)


def interference(att: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint, held-out concept c′ and training concept c: the mean contribution of c's training pairs
    to the margins of c′'s held-out pairs, and its share: the contribution over the sum of the magnitudes of
    every training concept's contribution to c′ (signed, the magnitudes sum to 1; a margin near 0 made of
    large opposite pushes stays bounded)."""
    from ..tables import NOT_A_CONCEPT

    test = att[(att["split"] == "test") & (att["train_concept"] != NOT_A_CONCEPT)]  # weight decay is no concept
    by_concept = test.groupby(["step", "sample_id", "concept", "train_concept"], sort=False)["contribution"].sum()
    mean = by_concept.groupby(["step", "concept", "train_concept"]).mean().rename("mean_contribution").reset_index()
    total = mean.groupby(["step", "concept"])["mean_contribution"].transform(lambda x: x.abs().sum())
    mean["share"] = mean["mean_contribution"] / total.where(total != 0)
    return mean.assign(method=att["method"].iloc[0] if len(att) else "")


def cross_concept_share(inter: pd.DataFrame) -> pd.Series:
    """Per checkpoint: the share of the push on held-out margins that comes from other concepts' training
    pairs (the mean over held-out concepts of Σ_{c ≠ c′} |contribution| / Σ_c |contribution|; 0 at K = 1)."""
    if inter.empty or inter["mean_contribution"].isna().all():
        return pd.Series(dtype=float)
    other = inter["share"].abs().where(inter["concept"] != inter["train_concept"], 0.0)
    per = other.groupby([inter["step"], inter["concept"]]).sum()
    return per.groupby(level="step").mean().fillna(0.0)


def not_computed(reason: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attribution, interference) tables of one row each, saying why nothing was computed."""
    from ..tables import attribution_not_computed, interference_not_computed

    return attribution_not_computed(reason), interference_not_computed(reason)
