"""A map of the pairs from their trajectories over the margin checkpoints (after dataset cartography,
Swayamdipta et al. 2020): per pair, the mean and the spread of σ(r), the model's confidence in the chosen
answer, and the fraction of checkpoints at which it ranks the pair right. Mislabelled or ambiguous training
pairs stand out with low mean confidence."""

from __future__ import annotations

import pandas as pd
from scipy.special import expit
from scipy.stats import rankdata

from .. import tables

INSPECT = 10  # pairs per split listed for a user to inspect (lowest mean confidence)


def pair_map(margins: pd.DataFrame, flipped: pd.Series | None = None) -> pd.DataFrame:
    """One row per pair: split, concept, cluster, mean and standard deviation over the checkpoints after step
    0 of σ(r), the fraction ranked right (a non-finite margin counts as wrong), ``inspect_rank`` (1 = lowest
    mean confidence in its split) and ``flipped`` (the data stage's synthetic mislabels; False without)."""
    m = margins[margins["step"] > 0].assign(conf=lambda d: expit(d["margin"]),
                                             right=lambda d: ~tables.margin_errors(d["margin"]))
    g = m.groupby("sample_id", sort=False)
    out = pd.DataFrame({"split": g["split"].first(), "concept": g["concept"].first(), "cluster": g["cluster"].first(),
                        "confidence_mean": g["conf"].mean(), "confidence_std": g["conf"].std(ddof=0),
                        "correct_fraction": g["right"].mean(), "checkpoints": g.size()}).reset_index()
    # a pair whose margin went non-finite is the first to inspect
    out["inspect_rank"] = out.groupby("split")["confidence_mean"].rank(method="first", na_option="top").astype(int)
    out["flipped"] = out["sample_id"].map(flipped).fillna(False).astype(bool) if flipped is not None else False
    return out


def flip_auroc(pm: pd.DataFrame) -> float:
    """How well low mean confidence finds the flipped training pairs: the AUROC of −confidence_mean for the
    flipped label (Mann-Whitney, ties averaged); NaN without flipped pairs."""
    t = pm[pm["split"] == "train"]
    pos = t["flipped"].to_numpy(bool)
    if not pos.any() or pos.all():
        return float("nan")
    ranks = rankdata(-t["confidence_mean"].to_numpy())
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def to_inspect(pm: pd.DataFrame, split: str, n: int = INSPECT) -> pd.DataFrame:
    return pm[(pm["split"] == split) & (pm["inspect_rank"] <= n)].sort_values("inspect_rank")
