"""The theorems' statements checked on a run: each holds, fails, or is not applicable, with the premise
the run does not meet named."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..settings import DPO
from ..tables import margin_errors
from .dynamics import prediction_method, step_at_tau1


def _claim(claim, source, step, value, threshold, ok, missing=(), note="") -> dict:
    """A claim's row. ``ok``: what was measured (None: nothing to measure); ``missing``: the premises this
    run does not meet, which make the claim "not applicable" whatever was measured (the note says both)."""
    notes = [note] if note else []
    if missing:
        notes.append("premises not met: " + "; ".join(missing))
        if ok is not None:
            notes.append(f"measured: it would {'hold' if ok else 'fail'}")
        ok = None
    status = "not applicable" if ok is None else ("holds" if ok else "fails")
    return {"claim": claim, "source": source, "step": -1 if step is None else int(step), "value": float(value),
            "threshold": float(threshold), "status": status, "note": "; ".join(notes)}


RECURSION_TOL = {"float64": 1e-9, "float32": 1e-4}  # relative; other dtypes: 1e-2


def claims(per_pair: pd.DataFrame | None, dyn: pd.DataFrame, bounds: pd.DataFrame, conds: pd.DataFrame,
           dpo_cfg: DPO) -> pd.DataFrame:
    """The theorems' statements checked on this run, each with its measured value and status:

    the training envelope r_L ≤ r_i(t) ≤ r_U for every training pair and checkpoint up to τ_1, zero training
    error and margins in [log3/40, log3] at τ_1 (v3 Theorem 4.1, v5 Theorem 4.2), the test error at τ_1
    against each bound (v3 Theorem 4.2, v5 Theorem 4.3, the appendix's form), and measured margins equal to
    the recursion of docs/theory.md section 2. A statement holds or fails only where its premises hold: the
    theorems' regime (DPO's sigmoid loss on the LM head alone, full-batch sgd), the version's conditions,
    and a checkpoint at τ_1 (the last step at or before it; ``dpo.eval_at_tau1`` adds it). Elsewhere it is
    "not applicable", with what was measured and which premise is missing in the note.
    """
    nan = math.nan
    if per_pair is None or dyn["step"].min() < 0:
        why = dyn["method"].iloc[0] if len(dyn) else "no dynamics"
        return pd.DataFrame([_claim("every claim", "", None, nan, nan, None, note=why)])
    exact = prediction_method(dpo_cfg).startswith("exact")
    regime = [] if exact else [f"the theorems' regime (last_layer, full-batch sgd); this run: {dyn['method'].iloc[0]}"]
    if dpo_cfg.loss != "sigmoid" or dpo_cfg.label_smoothing:
        regime.append("the theorems' loss is DPO's sigmoid loss without label smoothing")
    held = {v: bool(g.loc[g["condition"] != "40 <= Q", "holds"].all()) for v, g in conds.groupby("version")}
    train_conds = [] if any(held.values()) else ["the training guarantee's conditions (neither v3's nor v5's hold)"]
    tau1 = float(dyn["tau1_steps"].iloc[0])
    steps = sorted(per_pair["step"].unique())
    k1 = step_at_tau1(steps, tau1)
    last = int(max(steps))
    at = []
    if k1 is None:
        at = [f"a checkpoint in (0, tau_1 = {tau1:.4g} steps]"]
    elif k1 < math.floor(tau1 + 1e-9):
        at = [f"a checkpoint at tau_1 = {tau1:.4g} steps (the last one before it is step {k1}; "
              + ("training stopped before tau_1)" if last < tau1 else
                 "set dpo.eval_at_tau1)" if exact else "no checkpoint there)")]
    rows = []
    train = per_pair[per_pair["split"] == "train"]
    env = dyn[(dyn["split"] == "train") & (dyn["step"] > 0) & dyn["r_L"].notna()][["step", "r_L", "r_U"]]
    inside = train.merge(env, on="step")
    claim = "training margins within [r_L(t), r_U(t)] for t <= tau_1"
    if len(inside):
        slack = 1e-9 * np.maximum(1.0, inside["r_U"].abs())
        ok = (inside["measured"] >= inside["r_L"] - slack) & (inside["measured"] <= inside["r_U"] + slack)
        worst = float(np.minimum(inside["measured"] / inside["r_L"], inside["r_U"] / inside["measured"].where(
            inside["measured"] > 0, np.inf)).min())
        rows.append(_claim(claim, "v3 Thm 4.1 / v5 Thm 4.2", env["step"].max(), ok.mean(), 1.0, bool(ok.all()),
                           regime + train_conds,
                           f"fraction of (train pair, checkpoint) inside over {env['step'].nunique()} checkpoint(s); "
                           f"tightest ratio to the envelope {worst:.3g}"))
    else:
        rows.append(_claim(claim, "v3 Thm 4.1 / v5 Thm 4.2", None, nan, 1.0, None, regime + train_conds + at))
    if k1 is not None:
        m = train[train["step"] == k1]["measured"]
        rows.append(_claim("zero training error at tau_1", "v3 Thm 4.1 / v5 Thm 4.2", k1,
                           float(margin_errors(m).mean()), 0.0, bool((m > 0).all()), regime + train_conds + at))
        lo, hi = math.log(3) / 40, math.log(3)
        frac = float(((m >= lo) & (m <= hi)).mean())
        rows.append(_claim("training margins in [log3/40, log3] at tau_1", "v3 Thm 4.1 / v5 Thm 4.2", k1, frac, 1.0,
                           frac == 1.0, regime + train_conds + at, f"min {m.min():.4g}, max {m.max():.4g}"))
        te = per_pair[(per_pair["split"] == "test") & (per_pair["step"] == k1)]["measured"]
        err = float(margin_errors(te).mean()) if len(te) else nan
        for _, b in bounds.iterrows():
            missing = regime + ([] if b["conditions_hold"] else [f"the {b['version']} bound's conditions"]) + at
            missing += [] if len(te) else ["held-out pairs"]
            rows.append(_claim(f"test error at tau_1 <= {b['version']} bound", b["bound"], k1, err, b["value"],
                               bool(err <= b["value"]) if len(te) else None, missing,
                               "vacuous (>= 1)" if b["vacuous"] else ""))
    else:
        rows.append(_claim("zero training error at tau_1", "v3 Thm 4.1 / v5 Thm 4.2", None, nan, 0.0, None, at))
    diff = (per_pair["measured"] - per_pair["predicted"]).abs()
    rel = float((diff / np.maximum(1.0, per_pair["measured"].abs())).max())
    tol = RECURSION_TOL.get(dpo_cfg.dtype, 1e-2)
    rows.append(_claim("measured margins equal the recursion (train and test, every checkpoint)",
                       "docs/theory.md section 2", last, rel, tol, bool(rel <= tol), [] if exact else regime[:1],
                       "max of abs(measured - predicted) / max(1, abs(measured)); tolerance for "
                       f"{dpo_cfg.dtype}"))
    return pd.DataFrame(rows)
