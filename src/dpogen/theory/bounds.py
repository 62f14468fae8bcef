"""The paper's bounds on the test error and their conditions (docs/theory.md; Im & Li, arXiv 2408.03459: v3 = the
ICLR 2025 submission, v5 = NeurIPS 2025), the failure probability, and the smallest Q a bound certifies."""

from __future__ import annotations

import math

import pandas as pd


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
        rows.append({"version": version,
                     "bound": f"R(P) <= {'2KQ^2 exp(-Q^(1/4)/6)' if version == 'v3' else '2KQ^2 exp(-Q/45)'}",
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
