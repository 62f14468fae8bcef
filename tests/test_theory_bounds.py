import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dpogen.theory import bounds, certificates, geometry


def test_bounds_at_points_worked_by_hand():
    """Worked from the statements (docs/theory.md), not from the code: v5 at K = 1, Q = 90 is
    2 · 1 · 90² · e^(−90/45) = 16,200 e^(−2) = 2,192.43; v3 at K = 3, Q = 81, where Q^(1/4) = 3, is
    2 · 3 · 81² · e^(−3/6) = 39,366 e^(−1/2) = 23,876.69 (e^(−2) = 0.135335, e^(−1/2) = 0.606531)."""
    assert bounds.bound_v5(1, 90) == pytest.approx(2192.43, abs=0.01)
    assert bounds.bound_v3(3, 81) == pytest.approx(23876.69, abs=0.01)


def test_v5_worked_values():
    # docs/theory.md: at K = 10 the v5 bound drops below 0.05 between Q = 879 and 880
    assert bounds.bound_v5(10, 879) > 0.05 > bounds.bound_v5(10, 880)
    worked = {1: 764, 2: 799, 4: 834, 8: 869, 10: 880, 16: 904}
    for K, q in worked.items():
        assert bounds.smallest_q("v5", K, 0.05) == q


def test_v3_is_vacuous_at_realistic_q():
    for Q in (40, 1000, 10**6):
        assert bounds.bound_v3(1, Q) > 1


def test_failure_probability_uses_c():
    assert bounds.failure_probability(1, 100, 1.0) == 1.0  # vacuous at small Q
    # where c√Q/5 is the smaller term, a larger c gives a smaller failure probability
    lo, hi = bounds.failure_probability(1, 10**6, 0.25), bounds.failure_probability(1, 10**6, 0.2)
    assert 0 < lo < hi < 1
    assert hi == pytest.approx(8 * 10**13.5 * math.exp(-0.2 * 1000 / 5))


def test_clopper_pearson_upper():
    # zero errors: closed form 1 − α^{1/n}
    assert certificates.clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert certificates.clopper_pearson_upper(100, 100, 0.95) == 1.0
    # coverage: P(upper ≥ p) ≥ confidence, exactly computed over the binomial
    n, p, conf = 40, 0.1, 0.9
    ks = np.arange(n + 1)
    covered = np.array([certificates.clopper_pearson_upper(int(k), n, conf) >= p for k in ks])
    assert stats.binom.pmf(ks, n, p)[covered].sum() >= conf


def test_conditions_report_real_violations():
    c = pd.DataFrame(bounds.conditions("v5", K=2, Q=100, Z=4, d=64, l_b=0.3, v=0.001))
    row = lambda name: c[c["condition"] == name].iloc[0]  # noqa: E731
    assert row("d <= 5Q")["holds"] and row("1/4 <= l_b")["holds"]
    assert not row("Z <= 1/(4 l_b^2)")["holds"]  # 4 > 1/(4·0.09) = 2.78
    assert row("Z <= 1/(4 l_b^2)")["lhs"] == 4
    c3 = pd.DataFrame(bounds.conditions("v3", K=2, Q=100, Z=4, d=1000, l_b=0.3, v=0.001))
    assert not c3[c3["condition"] == "d <= 5Q"].iloc[0]["holds"]
    assert not c3[c3["condition"] == "Z <= Q^(1/4) - 2"].iloc[0]["holds"]  # 4 > 100^{1/4} − 2 ≈ 1.16


def test_geometry_recovers_the_data_model():
    rng = np.random.default_rng(0)
    K, Q, d, v, lb = 3, 400, 40, 0.05, 0.4
    basis = np.linalg.qr(rng.normal(size=(d, K + 1)))[0].T
    b, cs = lb * basis[0], basis[1:]
    X, concept, cluster = [], [], []
    for i in range(K):
        for s in (1, -1):
            X.append(s * cs[i] + b + v * rng.normal(size=(Q, d)))
            concept += [f"c{i}"] * Q
            cluster += [s] * Q
    summary, geo = geometry.geometry(np.concatenate(X) * 7.0, np.array(concept), np.array(cluster))  # scale-free
    assert summary["l_b"] == pytest.approx(lb, rel=0.05)
    assert summary["v"] == pytest.approx(v, rel=0.05)
    cosines = geo[geo["quantity"] == "cos_concepts"]["value"]
    assert cosines.abs().max() < 0.05

    def between_concepts(quantity):
        g = geo[geo["quantity"] == quantity]
        return g[g["concept"].str.split(":").str[0] != g["concept_b"].str.split(":").str[0]]["value"]

    # raw: the shared component makes clusters of different concepts alike (l_b²/(1+l_b²) ≈ 0.14);
    # with the global mean removed they are near-orthogonal, as in the paper's first figure
    assert between_concepts("cluster_cos_raw").min() > 0.1
    assert between_concepts("cluster_cos_centered").abs().max() < 0.05


def test_geometry_rejects_nan():
    X = np.ones((4, 3))
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        geometry.geometry(X, np.array(["a"] * 4), np.array([1, 1, -1, -1]))


def test_certificates_bonferroni():
    m = pd.DataFrame({"step": [5] * 6, "split": ["test"] * 6, "concept": list("aaabbb"),
                      "margin": [1, -1, 1, 1, 1, 0.0]})
    c = certificates.certificates(m, 0.9).set_index("concept")
    assert c.loc["all", "errors"] == 2 and c.loc["all", "n"] == 6
    assert c.loc["a", "confidence"] == pytest.approx(0.95)
    assert c.loc["a", "upper"] == pytest.approx(certificates.clopper_pearson_upper(1, 3, 0.95))


def test_data_dependent_bound_takes_the_largest_allowed_eps():
    K, Q, Z, d, lb, v = 2, 100, 4, 8, 0.3, 0.01
    value, eps = bounds.data_dependent_bound(K, Q, Z, d, lb, v)
    assert eps == pytest.approx(1 / (16 * v * (Z + 2)))
    f = lambda e: 2 * K * Q**2 * math.exp(-e**2 / (2 * (1 + lb**2 + d * v**2 + 2 * e * v)))  # noqa: E731
    assert value == pytest.approx(f(eps))
    assert f(eps) < f(0.9 * eps)  # smaller ε gives a looser bound


def test_geometry_cluster_cosines_and_gram_blocks_match_brute_force():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6)) + 0.5
    concept = np.array(["a"] * 20 + ["b"] * 20)
    cluster = np.array(([1] * 10 + [-1] * 10) * 2)
    summary, geo = geometry.geometry(X, concept, cluster)
    Xs = X / summary["scale"]
    U = Xs / np.linalg.norm(Xs, axis=1, keepdims=True)
    mask = (concept == "a") & (cluster == 1), (concept == "b") & (cluster == -1)
    brute = (U[mask[0]] @ U[mask[1]].T).mean()
    got = geo[(geo["quantity"] == "cluster_cos_raw") & (geo["concept"] == "a:+1") & (geo["concept_b"] == "b:-1")]
    assert got["value"].item() == pytest.approx(brute)
    gm = geo[geo["quantity"] == "gram_mean"].set_index("concept")["value"]
    assert gm["diagonal"] == pytest.approx((Xs**2).sum(1).mean())
    assert set(gm.index) == {"diagonal", "same cluster", "opposite cluster", "different concepts"}
