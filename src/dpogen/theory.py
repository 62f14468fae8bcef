"""The theory stage: the paper's bounds and their conditions, geometry of g(x), and held-out certificates.

Formulas are THEORY.md's (Im & Li, arXiv 2408.03459): v3 = ICLR 2025 submission, v5 = NeurIPS 2025.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .tables import margin_errors
from .timescale import concept_scale, tau1_steps

# ---------------------------------------------------------------------------------------------- bounds


def bound_v3(K: int, Q: int) -> float:
    """v3 Theorem 4.2: R(P) ≤ 2 K Q² exp(−Q^{1/4}/6)."""
    return 2.0 * K * Q**2 * math.exp(-(Q**0.25) / 6.0)


def bound_v5(K: int, Q: int) -> float:
    """v5 Theorem 4.3: R(P) ≤ 2 K Q² exp(−Q/45)."""
    return 2.0 * K * Q**2 * math.exp(-Q / 45.0)


BOUNDS = {"v3": bound_v3, "v5": bound_v5}


def failure_probability(K: int, Q: int, c: float) -> float:
    """8 K Q^{9/4} exp(−min(c√Q/5, Q^{3/4}/256)), capped at 1; c is the paper's unspecified constant."""
    return min(1.0, 8.0 * K * Q**2.25 * math.exp(-min(c * math.sqrt(Q) / 5.0, Q**0.75 / 256.0)))


def smallest_q(version: str, K: int, target: float, q_max: int = 10**7) -> int | None:
    """The smallest Q ≥ 40 at which the bound falls below ``target`` (None if not by ``q_max``)."""
    f = BOUNDS[version]
    lo = 40
    if f(K, lo) < target:
        return lo
    # the bound rises then falls in Q; find a Q past the peak where it is below target, then bisect
    hi = lo
    while f(K, hi) >= target:
        hi *= 2
        if hi > q_max:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(K, mid) < target and mid > _peak(version):
            hi = mid
        else:
            lo = mid
    return hi


def _peak(version: str) -> float:
    # d/dQ log(Q² exp(−g(Q))) = 0: v5 at Q = 90, v3 at Q^{1/4} = 48 → Q = 48⁴
    return 90.0 if version == "v5" else 48.0**4


def conditions(version: str, *, K: int, Q: int, Z: int, d: int, l_b: float, v: float) -> list[dict]:
    """Each condition of the training guarantee and generalization bound with its two sides."""
    out = [
        ("Z <= 1/(4 l_b^2)", Z, 1 / (4 * l_b**2) if l_b > 0 else math.inf, "Z: data; l_b: measured"),
        ("d <= 5Q", d, 5 * Q, "d: model; Q: data"),
        ("40 <= Q", 40, Q, "Q: data"),
    ]
    if version == "v3":
        out += [("Z <= Q^(1/4) - 2", Z, Q**0.25 - 2, "Z, Q: data"),
                ("v <= 1/(4 sqrt(Q))", v, 1 / (4 * math.sqrt(Q)), "v: measured")]
    else:
        out += [("v <= 1/(32 sqrt(Q))", v, 1 / (32 * math.sqrt(Q)), "v: measured"),
                ("1/4 <= l_b", 0.25, l_b, "l_b: measured"),
                ("l_b <= 1/2", l_b, 0.5, "l_b: measured")]
    return [{"version": version, "condition": c, "lhs": float(a), "rhs": float(b), "holds": bool(a <= b),
             "source": s} for c, a, b, s in out]


def data_dependent_bound(K: int, Q: int, Z: int, d: int, l_b: float, v: float) -> tuple[float, float]:
    """The appendix's form behind both bounds, R(P) ≤ 2KQ² exp(−ε²/(2(1 + l_b² + d v² + 2εv))) for
    ε ≤ 1/(16 v (Z+2)) (a reading of a garbled source). The exponent grows with ε, so ε takes the top of its
    range. Returns (bound, ε)."""
    if v <= 0:
        return 0.0, math.inf
    eps = 1.0 / (16.0 * v * (Z + 2))
    return min(1e300, 2.0 * K * Q**2 * math.exp(-(eps**2) / (2 * (1 + l_b**2 + d * v**2 + 2 * eps * v)))), eps


def bounds_table(K: int, Q: int, N: int, conds: pd.DataFrame, c: float, geometry_summary: dict | None = None,
                 Z: int = 0) -> pd.DataFrame:
    rows = []
    for version, f in BOUNDS.items():
        value = f(K, Q)
        holds = bool(conds.loc[conds["version"] == version, "holds"].all())
        rows.append({"version": version, "bound": f"R(P) <= {'2KQ^2 exp(-Q^(1/4)/6)' if version == 'v3' else '2KQ^2 exp(-Q/45)'}",
                     "K": K, "Q": Q, "N": N, "value": value, "vacuous": value >= 1.0, "conditions_hold": holds,
                     "failure_probability": failure_probability(K, Q, c),
                     "note": f"at tau_1; failure probability uses c={c:g} (unspecified constant, illustrative)"})
    if geometry_summary is not None:
        g = geometry_summary
        value, eps = data_dependent_bound(K, Q, Z, g["d"], g["l_b"], g["v"])
        rows.append({"version": "appendix", "bound": "R(P) <= 2KQ^2 exp(-eps^2/(2(1+l_b^2+d v^2+2 eps v)))",
                     "K": K, "Q": Q, "N": N, "value": value, "vacuous": value >= 1.0,
                     "conditions_hold": bool(conds.loc[conds["version"] == "v5", "holds"].all()),
                     "failure_probability": failure_probability(K, Q, c),
                     "note": f"data-dependent form, a reading of the appendix's garbled source; eps={eps:.4g} "
                             f"= 1/(16 v (Z+2)), the top of its range; l_b, v, d measured"})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------- certificates


def clopper_pearson_upper(errors: int, n: int, confidence: float) -> float:
    """One-sided exact binomial upper bound on the error rate at ``confidence``."""
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
    K = test["concept"].nunique()
    for step in sorted(set(margins["step"]) - set(test["step"])):  # marked, not skipped
        rows.append({"step": int(step), "split": "test", "concept": "all", "n": 0, "errors": 0, "error": math.nan,
                     "confidence": confidence, "upper": math.nan,
                     "method": "no held-out pairs at this checkpoint: no certificate"})
    for step, g in test.groupby("step", sort=True):
        parts = [("all", g, confidence, "clopper-pearson")]
        parts += [(c, gc, 1 - (1 - confidence) / max(K, 1), f"clopper-pearson, bonferroni over {K}")
                  for c, gc in g.groupby("concept", sort=True)]
        for concept, gg, conf, method in parts:
            n, e = len(gg), int(margin_errors(gg["margin"]).sum())
            rows.append({"step": int(step), "split": "test", "concept": concept, "n": n, "errors": e,
                         "error": e / n if n else math.nan, "confidence": conf,
                         "upper": clopper_pearson_upper(e, n, conf), "method": method})
    return pd.DataFrame(rows, columns=["step", "split", "concept", "n", "errors", "error", "confidence", "upper",
                                       "method"]).sort_values("step", kind="stable", ignore_index=True)


# ------------------------------------------------------------------------------------------ geometry


def geometry(features: np.ndarray, concept: np.ndarray, cluster: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """THEORY.md section 3 estimates from g(x), rescaled so concept-vector norms average 1 (fp64)."""
    X = np.asarray(features, dtype=np.float64)
    check_finite(X)
    n, d = X.shape
    names = sorted(set(concept))
    mu = {}
    for c in names:  # cluster 0: the data define no clusters for the concept (data.sources.derived_clusters)
        for s in sorted({1, -1} | set(np.unique(cluster[concept == c]).tolist()), reverse=True):
            m = (concept == c) & (cluster == s)
            mu[(c, s)] = X[m].mean(0) if m.any() else np.full(d, np.nan)
    cvec = {c: (mu[(c, 1)] - mu[(c, -1)]) / 2 for c in names}
    unclustered = {c for c in names if ((concept == c) & (cluster == 0)).any()}
    scale = concept_scale(X, concept, cluster)
    X = X / scale
    cvec = {c: v / scale for c, v in cvec.items()}
    mu = {k: v / scale for k, v in mu.items()}
    b = X.mean(0)
    resid = np.concatenate([X[(concept == c) & (cluster == s)] - mu[(c, s)] for (c, s) in mu
                            if ((concept == c) & (cluster == s)).any()])
    v2 = float((resid**2).sum() / max(len(resid) - len(mu), 1) / d)
    Xc = X - b
    ev = np.linalg.eigvalsh(Xc @ Xc.T if n < d else Xc.T @ Xc)  # the smaller Gram side: same spectrum
    ev = np.clip(ev, 0, None)
    p = ev / ev.sum()
    eff_rank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    summary = {"d": d, "n": n, "scale": scale, "l_b": float(np.linalg.norm(b)), "v": math.sqrt(v2), "v2": v2,
               "effective_rank": eff_rank}
    rows = [{"quantity": k, "concept": "", "concept_b": "", "value": float(v)} for k, v in summary.items()]
    rows += [{"quantity": "b_hat", "concept": "", "concept_b": str(i), "value": float(x)} for i, x in enumerate(b)]
    for c in names:
        if np.isnan(cvec[c]).any():
            why = ("undefined: the data define no clusters for this concept (cluster 0: its answers are not two "
                   "swapped pairs; data.columns.cluster gives them)" if c in unclustered else
                   "undefined: the concept has no pair in one of its clusters")
            rows.append({"quantity": "concept_norm", "concept": c, "concept_b": "", "value": math.nan, "note": why})

    def cos(a, b_):
        na, nb = np.linalg.norm(a), np.linalg.norm(b_)
        return float(a @ b_ / (na * nb)) if na > 0 and nb > 0 else math.nan

    for c in (c for c in names if not np.isnan(cvec[c]).any()):
        rows.append({"quantity": "concept_norm", "concept": c, "concept_b": "", "value": float(np.linalg.norm(cvec[c]))})
        rows.append({"quantity": "cos_concept_b", "concept": c, "concept_b": "", "value": cos(cvec[c], b)})
    if len(names) < 2:  # marked, not left out: a reader sees why there is no concept-to-concept cosine
        rows.append({"quantity": "cos_concepts", "concept": names[0] if names else "", "concept_b": "",
                     "value": math.nan, "note": "undefined: one concept, no pair of concept vectors"})
    for i, c in enumerate(names):
        for c2 in names[i + 1:]:
            rows.append({"quantity": "cos_concepts", "concept": c, "concept_b": c2, "value": cos(cvec[c], cvec[c2])})
    # average cosine similarity between clusters, raw and with the global mean removed (the paper's figure 1):
    # the mean of u_i·u_j over i in A, j in B is (mean of u over A)·(mean of u over B), exactly, so no
    # n×n matrix is formed
    keys = [k for k in mu if not np.isnan(mu[k]).any()]
    masks = {k: (concept == k[0]) & (cluster == k[1]) for k in keys}
    for label, Y in (("cluster_cos_raw", X), ("cluster_cos_centered", X - b)):
        U = Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)
        means = np.stack([U[masks[k]].mean(0) for k in keys])
        cosm = means @ means.T
        for a, k1 in enumerate(keys):
            for c, k2 in enumerate(keys):
                rows.append({"quantity": label, "concept": f"{k1[0]}:{k1[1]:+d}", "concept_b": f"{k2[0]}:{k2[1]:+d}",
                             "value": float(cosm[a, c])})
    # Gram-matrix blocks g_i·g_j (i != j): exact means from cluster means; spreads from a seeded sample
    rng = np.random.default_rng(0)
    blocks = {"diagonal": [], "same cluster": [], "opposite cluster": [], "different concepts": []}
    for k1 in keys:
        for k2 in keys:
            kind = ("same cluster" if k1 == k2 else "opposite cluster" if k1[0] == k2[0] else "different concepts")
            ia, ib = np.flatnonzero(masks[k1]), np.flatnonzero(masks[k2])
            i, j = rng.choice(ia, 64), rng.choice(ib, 64)
            keep = i != j
            if k1 == k2:  # mean over i != j: remove the diagonal from |A|² μ·μ
                na = len(ia)
                mean = (na**2 * float(mu[k1] @ mu[k1]) - float((X[ia] ** 2).sum())) / max(na * (na - 1), 1)
            else:
                mean = float(mu[k1] @ mu[k2])
            blocks[kind].append((mean, np.einsum("nd,nd->n", X[i[keep]], X[j[keep]])))
    diag = np.einsum("nd,nd->n", X, X)
    rows.append({"quantity": "gram_mean", "concept": "diagonal", "concept_b": "", "value": float(diag.mean())})
    rows.append({"quantity": "gram_std", "concept": "diagonal", "concept_b": "", "value": float(diag.std())})
    for kind, vals in blocks.items():
        if kind == "diagonal" or not vals:
            continue
        rows.append({"quantity": "gram_mean", "concept": kind, "concept_b": "",
                     "value": float(np.mean([m for m, _ in vals]))})
        rows.append({"quantity": "gram_std", "concept": kind, "concept_b": "sampled",
                     "value": float(np.concatenate([v for _, v in vals]).std())})
    geo = pd.DataFrame(rows)
    geo["note"] = geo["note"].fillna("") if "note" in geo.columns else ""
    return summary, geo


def check_finite(X: np.ndarray, what: str = "features", ids=None) -> None:
    """Raise naming the first row of ``X`` with a NaN or Inf (and its sample id when given)."""
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        who = f" (sample_id {ids[i]})" if ids is not None else ""
        raise ValueError(f"theory: {what}: row {i}{who} contains NaN or Inf ({int(bad.sum())} such rows)")


# ---------------------------------------------------------------------------------------------- claims


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
           dpo_cfg: dict) -> pd.DataFrame:
    """The theorems' statements checked on this run, each with its measured value and status:

    the training envelope r_L ≤ r_i(t) ≤ r_U for every training pair and checkpoint up to τ_1, zero training
    error and margins in [log3/40, log3] at τ_1 (v3 Theorem 4.1, v5 Theorem 4.2), the test error at τ_1
    against each bound (v3 Theorem 4.2, v5 Theorem 4.3, the appendix's form), and measured margins equal to
    the recursion of THEORY.md section 2. A statement holds or fails only where its premises hold: the
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
    if dpo_cfg["loss"] != "sigmoid" or dpo_cfg.get("label_smoothing"):
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
        rows.append(_claim("zero training error at tau_1", "v3 Thm 4.1 / v5 Thm 4.2", k1, float(margin_errors(m).mean()), 0.0,
                           bool((m > 0).all()), regime + train_conds + at))
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
    tol = RECURSION_TOL.get(dpo_cfg.get("dtype"), 1e-2)
    rows.append(_claim("measured margins equal the recursion (train and test, every checkpoint)", "THEORY.md section 2",
                       last, rel, tol, bool(rel <= tol), [] if exact else regime[:1],
                       "max of abs(measured - predicted) / max(1, abs(measured)); tolerance for "
                       f"{dpo_cfg.get('dtype')}"))
    return pd.DataFrame(rows)


def run_theory(train: pd.DataFrame, card: dict, features: np.ndarray, ref: pd.DataFrame,
               margins: pd.DataFrame, cfg: dict, dpo_cfg: dict,
               policy_features: dict[int, np.ndarray] | None = None) -> dict[str, pd.DataFrame]:
    """Everything the theory stage writes for one run. ``policy_features``: step → g(x) of the training pairs
    under the policy at that checkpoint (when the backbone trains), whose geometry is added at that step;
    the bounds and dynamics use the reference's g(x), as the theorems' frozen g does."""
    check_finite(np.asarray(features, np.float64), "reference features", ref["sample_id"].to_numpy())
    tr = ref["split"].to_numpy() == "train"
    summary, geo = geometry(features[tr], train["concept"].to_numpy(), train["cluster"].to_numpy())
    K, Q, N, Z = card["K"], card["Q_min"], card["N"], card["Z"]
    data_rows = pd.DataFrame([{"quantity": q, "concept": "", "concept_b": "", "value": float(v), "note": "data card"}
                              for q, v in (("K", K), ("Q", Q), ("N", N), ("Z", Z))])
    geo = pd.concat([geo, data_rows], ignore_index=True)
    geo.insert(0, "step", 0)  # g(x) of the reference model, the policy at step 0
    parts = [geo]
    for step, X in sorted((policy_features or {}).items()):  # the backbone trained: g(x) moved
        check_finite(np.asarray(X, np.float64), f"policy features at step {step}", train["sample_id"].to_numpy()
                     if "sample_id" in train else None)
        if len(X) != int(tr.sum()):
            raise ValueError(f"theory: policy features at step {step} have {len(X)} rows, the run has {int(tr.sum())} "
                             f"training pairs")
        parts.append(geometry(X, train["concept"].to_numpy(), train["cluster"].to_numpy())[1].assign(step=step))
    geo = pd.concat(parts, ignore_index=True)
    conds = pd.DataFrame([c for ver in BOUNDS for c in conditions(ver, K=K, Q=Q, Z=Z, d=summary["d"],
                                                                   l_b=summary["l_b"], v=summary["v"])])
    bounds = bounds_table(K, Q, N, conds, cfg["failure_constant_c"], summary, Z)
    from .attribution import exact_split, interference, not_computed

    reason = attribution_reason(ref, dpo_cfg, margins)
    split = None if reason else exact_split(features, ref, margins, dpo_cfg)  # the recursion, run once
    per_pair, dyn = dynamics(features, ref, margins, dpo_cfg, K, summary["scale"], pred=split[0] if split else None)
    att, inter = (split[1], interference(split[1])) if split else not_computed(reason)
    applies = per_pair is not None
    if not applies:  # the theory does not apply: empty tables, the reason in the dynamics method column
        per_pair = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                                 [("step", "int64"), ("split", str), ("sample_id", str), ("predicted", float), ("measured", float)]})
        dyn = pd.DataFrame([{"step": -1, "split": "", "measured_margin": np.nan, "predicted_margin": np.nan,
                             "measured_error": np.nan, "predicted_error": np.nan, "r_L": np.nan, "r_U": np.nan,
                             "tau1_steps": np.nan, "eta": np.nan, "method": dyn, "prediction_rel_error": np.nan}])
    return {
        "attribution": att,
        "interference": inter,
        "claims": claims(per_pair if applies else None, dyn, bounds, conds, dpo_cfg),
        "geometry": geo,
        "conditions": conds,
        "bounds": bounds,
        "certificates": certificates(margins, cfg["confidence"]),
        "predicted": per_pair,
        "dynamics": dyn,
    }


ATTRIBUTION_CELLS = 50_000_000  # pairs × training groups × checkpoints the exact split is computed for


def attribution_reason(ref: pd.DataFrame, dpo_cfg: dict, margins: pd.DataFrame) -> str | None:
    """Why the exact attribution is not computed for this run (None: it is)."""
    if (ref["token_chosen"] < 0).any():
        return "not computed: no prediction: some responses are not single tokens after the same prompt"
    method = prediction_method(dpo_cfg)
    if not method.startswith("exact"):
        return (f"not computed: outside the theorems' regime (last_layer, full-batch sgd); this run: "
                f"{method}; estimates for other regimes are not built")
    first = margins[margins["step"] == margins["step"].min()]
    cells = len(first) * first[first["split"] == "train"].groupby(["concept", "cluster"]).ngroups * \
        margins["step"].nunique()
    if cells > ATTRIBUTION_CELLS:
        return f"not computed: {cells} cells (pairs x training groups x checkpoints), over {ATTRIBUTION_CELLS}"
    return None


# ------------------------------------------------------------------------------- predicted dynamics


def loss_weight(r: np.ndarray, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0) -> np.ndarray:
    """−f′(r) for a per-pair loss f(r) (THEORY.md section 2: σ(−r) for DPO's sigmoid loss)."""
    from scipy.special import expit

    if loss == "sigmoid":
        return (1 - label_smoothing) * expit(-r) - label_smoothing * expit(r)
    if loss == "ipo":  # f = (r/β − 1/(2β))²
        return -2.0 * (r / beta - 1.0 / (2 * beta)) / beta
    if loss == "hinge":  # f = max(0, 1 − r)
        return (r < 1).astype(float)
    if loss == "robust":  # f = (−(1−ε) log σ(r) + ε log σ(−r)) / (1 − 2ε)
        return ((1 - label_smoothing) * expit(-r) + label_smoothing * expit(r)) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown loss {loss!r}")


def predicted_margins(g_train, w_train, l_train, g_all, w_all, l_all, *, beta: float, lr: float, steps: int,
                      checkpoints, loss: str = "sigmoid", label_smoothing: float = 0.0, groups=None):
    """Margins of every pair (train or unseen) under full-batch gradient descent on the LM head alone,
    from the recursion of THEORY.md section 2, in fp64:

        r_j(k+1) = r_j(k) + η (β²/N) Σ_i −f′(r_i(k)) C_ij,   C_ij = (y_w,j − y_l,j)ᵀ(y_w,i − y_l,i) · g_iᵀ g_j.

    C is never formed: Σ_i v_i C_ij = (y_w,j − y_l,j)ᵀ M g_j with M = Σ_i v_i (y_w,i − y_l,i) g_iᵀ, kept
    only on the rows of tokens that occur, so a step costs O((N + n) d) memory and time.
    ``w_*``/``l_*`` are the chosen/rejected token ids; the training pairs must be the first N of ``*_all``.
    Returns {checkpoint: margins}. With ``groups`` (a group index per training pair, 0..G−1) the sum over i
    is split by group, and it returns ({checkpoint: margins}, {checkpoint: (n, G) contributions}): each
    pair's margin is the sum of its G contributions, the exact attribution of the theorems' regime.
    """
    g_train, g_all = np.asarray(g_train, np.float64), np.asarray(g_all, np.float64)
    toks, inv = np.unique(np.concatenate([w_train, l_train, w_all, l_all]), return_inverse=True)
    n_tr, n_all = len(w_train), len(w_all)
    wt, lt = inv[:n_tr], inv[n_tr: 2 * n_tr]
    wa, la = inv[2 * n_tr: 2 * n_tr + n_all], inv[2 * n_tr + n_all:]
    scale = lr * beta**2 / n_tr
    D = np.zeros((n_tr, len(toks)))  # y_w,i − y_l,i on the tokens that occur
    D[np.arange(n_tr), wt] += 1.0
    D[np.arange(n_tr), lt] -= 1.0
    rows = np.arange(n_all)

    def moved(weights, idx=slice(None)):
        """scale · Σ_i weights_i C_ij over the training pairs ``idx``, for every pair j."""
        Mt = (D[idx] * weights[idx, None]).T @ g_train[idx]  # Σ_i w_i (y_w,i − y_l,i) g_iᵀ, a row per token
        P = g_all @ Mt.T  # (n, tokens): every pair's g against every token's row
        return scale * (P[rows, wa] - P[rows, la])

    # r is linear in the summed weights, so a group's part of r_j(t) is moved(Σ_{k<t} v(k)) over its pairs:
    # the split costs one product per group and checkpoint, not per step
    split = groups is not None
    members = [np.flatnonzero(np.asarray(groups) == g) for g in range(int(np.max(groups)) + 1)] if split else []
    out, parts = {}, {}
    r_all, r_tr, total = np.zeros(n_all), np.zeros(n_tr), np.zeros(n_tr)
    for k in range(0, steps + 1):
        if k:
            v = loss_weight(r_tr, beta, loss, label_smoothing)
            total += v
            r_all = r_all + moved(v)
            r_tr = r_all[:n_tr]
        if k in checkpoints:
            out[k] = r_all.copy()
            if split:
                parts[k] = np.stack([moved(total, idx) for idx in members], axis=1)
    return (out, parts) if split else out


def envelope(beta: float, K: int, eta: float, scale: float = 1.0) -> dict[str, float]:
    """v3 Theorem 4.1's envelope in steps: r_L = β² t/(8Kτ), r_U = 5β² t/(Kτ) up to τ_1 = Kτ log3/(5β²);
    with full-batch GD of step η on g(x) rescaled by 1/scale, t/τ = η scale² k, so the slopes per step are
    β²η scale²/(8K) and 5β²η scale²/K."""
    unit = eta * scale**2
    return {"r_L_per_step": beta**2 * unit / (8 * K), "r_U_per_step": 5 * beta**2 * unit / K,
            "tau1_steps": tau1_steps(beta, K, eta, scale)}


def step_at_tau1(checkpoints, tau1: float) -> int | None:
    """The last checkpoint at or before τ_1 (the dpo stage adds it with ``dpo.eval_at_tau1``)."""
    before = [int(s) for s in checkpoints if 0 < s <= tau1 + 1e-9]
    return max(before) if before else None


def prediction_method(dpo_cfg: dict) -> str:
    """How the recursion relates to this run's training (named in every output row)."""
    exact = (dpo_cfg["regime"] == "last_layer" and dpo_cfg["optimizer"] == "sgd" and dpo_cfg["batch_size"] == "full"
             and not dpo_cfg["weight_decay"] and not dpo_cfg["max_grad_norm"] and dpo_cfg["schedule"] == "constant"
             and not dpo_cfg["warmup_steps"])
    if exact:
        return "exact recursion (last_layer, full-batch sgd)"
    if dpo_cfg["optimizer"] == "sgd":
        return "recursion with t/tau = lr*k (approximate: backbone, minibatch, decay or clipping)"
    return "recursion with a fitted time scale (adam/adamw: t/tau = c*k, c from the first checkpoint)"


def dynamics(features: np.ndarray, ref: pd.DataFrame, margins: pd.DataFrame, dpo_cfg: dict, K: int,
             scale: float = 1.0, pred: dict | None = None):
    """Predicted margins of every pair from the recursion of THEORY.md section 2 with the kernel measured
    from g(x), next to the measured ones, and the envelope of v3 Theorem 4.1 in steps. ``pred``: the
    recursion's margins already computed with this run's step (attribution.exact_split), not run again.

    Returns (per-pair table, per-checkpoint table), or (None, reason) when the theory does not apply.
    """
    if (ref["token_chosen"] < 0).any():
        return None, "no prediction: some responses are not single tokens after the same prompt"
    beta, steps = dpo_cfg["beta"], int(margins["step"].max())
    checkpoints = sorted(int(s) for s in margins["step"].unique())
    tr = (ref["split"] == "train").to_numpy()
    if not tr[: tr.sum()].all():
        raise ValueError("reference table: training pairs must come first")
    g = np.asarray(features, np.float64)
    w, lo = ref["token_chosen"].to_numpy(), ref["token_rejected"].to_numpy()
    n = int(tr.sum())
    kw = dict(loss=dpo_cfg["loss"] if dpo_cfg["loss"] != "ipo_norm" else "ipo", label_smoothing=dpo_cfg["label_smoothing"])
    method = prediction_method(dpo_cfg)
    if dpo_cfg["optimizer"] == "sgd":
        eta = float(dpo_cfg["lr"])
    else:  # effective step from the early slope: measured mean train margin at the first checkpoint
        first = next((s for s in checkpoints if s > 0), None)
        slope = predicted_margins(g[:n], w[:n], lo[:n], g, w, lo, beta=beta, lr=1.0, steps=1, checkpoints=[1], **kw)[1][:n].mean()
        m1 = margins[(margins["step"] == first) & (margins["split"] == "train")]["margin"].mean() if first else np.nan
        eta = float(m1 / (first * slope)) if first and slope > 0 and m1 > 0 else float("nan")
    if not np.isfinite(eta):
        return None, "no prediction: the time scale could not be fitted (no margin growth at the first checkpoint)"
    if pred is None:
        pred = predicted_margins(g[:n], w[:n], lo[:n], g, w, lo, beta=beta, lr=eta, steps=steps,
                                 checkpoints=checkpoints, **kw)
    ids, split = ref["sample_id"].to_numpy(), ref["split"].to_numpy()
    measured = margins.set_index(["step", "sample_id"])["margin"]
    per_pair = pd.concat([pd.DataFrame({"step": s, "split": split, "sample_id": ids, "predicted": r,
                                        "measured": measured.loc[s].reindex(ids).to_numpy()})
                          for s, r in pred.items()], ignore_index=True)
    # the theorem's units: g rescaled by 1/scale (mean concept norm 1), so its time runs scale² faster
    env = envelope(beta, K, eta, scale)
    rows = []
    for (s, sp), grp in per_pair.groupby(["step", "split"], sort=True):
        t = s if s <= env["tau1_steps"] else np.nan
        rows.append({"step": int(s), "split": sp, "measured_margin": grp["measured"].mean(),
                     "predicted_margin": grp["predicted"].mean(), "measured_error": float(margin_errors(grp["measured"]).mean()),
                     "predicted_error": float(margin_errors(grp["predicted"]).mean()),
                     "r_L": env["r_L_per_step"] * t, "r_U": env["r_U_per_step"] * t, "tau1_steps": env["tau1_steps"],
                     "eta": eta, "method": method})
    return per_pair, with_prediction_error(pd.DataFrame(rows))


def with_prediction_error(dyn: pd.DataFrame) -> pd.DataFrame:
    """The prediction's error at every checkpoint: |predicted − measured| mean margin relative to the measured
    one, floored at 1% of the split's largest measured mean margin (at step 0 both are about 0)."""
    floor = dyn.groupby("split")["measured_margin"].transform(lambda m: 0.01 * m.abs().max())
    denom = np.maximum(dyn["measured_margin"].abs(), floor).replace(0, np.nan)
    return dyn.assign(prediction_rel_error=(dyn["predicted_margin"] - dyn["measured_margin"]).abs() / denom)
