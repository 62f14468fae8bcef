"""Means and error rates of a split's pairs at a checkpoint, from every pair or from a tracked subset.

A subset (``dpo.track``) is a stratified sample: each tracked pair carries a sampling weight, its (concept,
cluster) stratum's pairs over the stratum's tracked pairs, so a stratum of N_h pairs with n_h tracked has
weight N_h / n_h. The estimates are the stratified ones:

    mean = Σ_h (N_h / N) ȳ_h,   Var = Σ_h (N_h / N)² (1 − n_h / N_h) s_h² / n_h

with a t interval on n − H degrees of freedom for mean margins, and a two-sided Clopper-Pearson interval
for the error rate on Kish's effective sample size (Σw)²/Σw² (conservative: it ignores the finite
population). When every pair is tracked the values are exact and the interval is the value itself.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .tables import margin_errors


def clopper_pearson(errors: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial interval of an error rate (``errors`` may be a weighted, fractional count)."""
    if n <= 0:
        return math.nan, math.nan
    a = (1 - confidence) / 2
    lo = 0.0 if errors <= 0 else float(stats.beta.ppf(a, errors, n - errors + 1))
    hi = 1.0 if errors >= n else float(stats.beta.ppf(1 - a, errors + 1, n - errors))
    return lo, hi


def kish(weight: np.ndarray) -> float:
    """Kish's effective sample size (Σw)²/Σw²: the tracked count when the weights are equal, less otherwise."""
    w = np.asarray(weight, np.float64)
    return float(w.sum() ** 2 / (w * w).sum()) if len(w) else 0.0


def _stratified(y: np.ndarray, g: pd.DataFrame) -> tuple[float, float, int]:
    """(stratified mean, its variance, degrees of freedom) of ``y`` over the rows of ``g``."""
    w = g["weight"].to_numpy(np.float64) if "weight" in g else np.ones(len(g))
    keys = g["concept"].astype(str) + "\0" + g["cluster"].astype(str)
    df = pd.DataFrame({"y": y, "w": w, "h": keys.to_numpy()})
    per = df.groupby("h", sort=True).agg(n=("y", "size"), N=("w", "sum"), mean=("y", "mean"), var=("y", "var"))
    N = per["N"].sum()
    # a stratum with one tracked pair has no spread of its own: the others' average stands in (NaN when no
    # stratum has two, so no interval reads as exact); a stratum tracked in full adds nothing (fpc 0)
    pooled = float(np.nanmean(per["var"])) if per["var"].notna().any() else math.nan
    var_h = per["var"].where(per["n"] > 1, pooled).where(per["n"] < per["N"], 0.0)
    fpc = (1 - per["n"] / per["N"]).clip(lower=0)
    mean = float((per["N"] / N * per["mean"]).sum())
    var = float(((per["N"] / N) ** 2 * fpc * var_h / per["n"]).sum(skipna=False))
    return mean, var, max(1, int(per["n"].sum() - len(per)))


def split_estimates(g: pd.DataFrame, confidence: float = 0.95) -> dict:
    """Mean margin and error rate of one split at one checkpoint, with their intervals, the tracked count n
    and the split's size N. ``exact`` when every pair was tracked."""
    n = len(g)
    w = g["weight"].to_numpy(np.float64) if "weight" in g else np.ones(n)
    N = int(round(w.sum()))
    exact = n == N
    margin = g["margin"].to_numpy(np.float64)
    err = margin_errors(margin).astype(np.float64)
    m, var_m, dof = _stratified(margin, g)
    e, _, _ = _stratified(err, g)
    if exact:
        m_lo = m_hi = m
        e_lo = e_hi = e
    else:
        half = float(stats.t.ppf(1 - (1 - confidence) / 2, dof) * math.sqrt(var_m))
        m_lo, m_hi = m - half, m + half
        n_eff = kish(w)
        e_lo, e_hi = clopper_pearson(e * n_eff, n_eff, confidence)
    return {"n": n, "N": N, "exact": exact, "margin_mean": m, "margin_mean_lo": m_lo, "margin_mean_hi": m_hi,
            "error": e, "error_lo": e_lo, "error_hi": e_hi}


def tracked_note(margins: pd.DataFrame) -> str:
    """"" when every pair was tracked, else "estimates from a tracked subset: train n of N, test n of N"."""
    if "weight" not in margins or (margins["weight"] == 1).all():
        return ""
    first = margins[margins["step"] == margins["step"].min()]
    parts = [f"{split} {len(g)} of {int(round(g['weight'].sum()))}" for split in ("train", "test")
             for g in [first[first["split"] == split]] if len(g)]
    return "estimates from a tracked subset: " + ", ".join(parts)
