"""Clopper-Pearson upper bounds on the population error of a checkpoint, from its held-out pairs, per
concept and overall."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from ..estimates import kish
from ..tables import margin_errors


def clopper_pearson_upper(errors: float, n: float, confidence: float) -> float:
    """One-sided exact binomial upper bound on the error rate at ``confidence`` (fractional counts: a
    weighted subset's error on its effective sample size)."""
    if n == 0:
        return math.nan
    if errors >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, errors + 1, n - errors))


def certificates(margins: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per checkpoint: held-out test error and its Clopper-Pearson upper bound on R(P), overall and per
    concept (per-concept bounds at a Bonferroni-corrected level so they hold jointly)."""
    test = margins[margins["split"] == "test"]
    rows = []
    # a tracked subset of the held-out pairs is a smaller sample of the same distribution: the bound holds on
    # the weighted error and Kish's effective sample size of the n tracked pairs, and the method says so
    sub = "weight" in test and (test["weight"] != 1).any()
    of = f" on {test.loc[test['step'] == test['step'].min()].shape[0]} tracked of " \
         f"{int(round(test.loc[test['step'] == test['step'].min(), 'weight'].sum()))} held-out pairs" if sub else ""
    K = test["concept"].nunique()
    for step in sorted(set(margins["step"]) - set(test["step"])):  # marked, not skipped
        rows.append({"step": int(step), "split": "test", "concept": "all", "n": 0, "errors": 0, "error": math.nan,
                     "confidence": confidence, "upper": math.nan,
                     "method": "no held-out pairs at this checkpoint: no certificate"})
    for step, g in test.groupby("step", sort=True):
        parts = [("all", g, confidence, f"clopper-pearson{of}")]
        parts += [(c, gc, 1 - (1 - confidence) / max(K, 1), f"clopper-pearson, bonferroni over {K}{of}")
                  for c, gc in g.groupby("concept", sort=True)]
        for concept, gg, conf, method in parts:
            n, e = len(gg), int(margin_errors(gg["margin"]).sum())
            error, upper = (e / n if n else math.nan), clopper_pearson_upper(e, n, conf)
            if sub and n:  # unequal weights: the weighted error on Kish's effective sample size
                w = gg["weight"].to_numpy(float)
                error = float((margin_errors(gg["margin"]) * w).sum() / w.sum())
                n_eff = kish(w)
                upper = clopper_pearson_upper(error * n_eff, n_eff, conf)
            rows.append({"step": int(step), "split": "test", "concept": concept, "n": n, "errors": e,
                         "error": error, "confidence": conf, "upper": upper, "method": method})
    return pd.DataFrame(rows, columns=["step", "split", "concept", "n", "errors", "error", "confidence", "upper",
                                       "method"]).sort_values("step", kind="stable", ignore_index=True)
