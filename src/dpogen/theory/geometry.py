"""The geometry of g(x) the theorems are stated in: concept norms, angles, cluster separations, the
quantities l_b and v of the conditions (docs/theory.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..timescale import concept_scale


def geometry(features: np.ndarray, concept: np.ndarray, cluster: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """docs/theory.md section 3 estimates from g(x), rescaled so concept-vector norms average 1 (fp64)."""
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
        rows.append({"quantity": "concept_norm", "concept": c, "concept_b": "",
                     "value": float(np.linalg.norm(cvec[c]))})
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
