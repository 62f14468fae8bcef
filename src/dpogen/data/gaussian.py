"""The theorems' own world (docs/theory.md sections 2 and 3), as a data source: ``gaussian``.

Embeddings are drawn exactly from the paper's data model: concept i has an aligned cluster with
g(x) ~ N(c_i + b, v² I_d) and a misaligned one with g(x) ~ N(−c_i + b, v² I_d); c_1, c_2, ... and b/‖b‖ are
orthonormal, ‖b‖ = l_b. Responses are single tokens of a small vocabulary: concept i answers with a token
pair (a, a'), its aligned cluster preferring a over a' and its misaligned cluster the reverse. With
``token_sharing`` = s, s consecutive concepts use one token pair, so a token appears in 2s cluster-level
preferences: Z = 2s (s = K is the persona setting, " Yes"/" No" for every concept).

The model is a linear softmax head over that vocabulary (a transformers model with no layers, built by
``model.build_linear_head``): g(x) is given, so the reference pass and last-layer DPO read it from the
``embedding`` column of the pair tables instead of running a backbone.

Every draw depends on (seed, concept, cluster, split) alone and the basis on (seed, d), so the first K
concepts are the same for every K, and, for a fixed v, the first Q samples of a cluster the same for every
Q: a sweep over K or Q adds data without changing what was there. (The default v, 1/(64 √Q), depends on Q.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

PROMPT_TOKEN = "<|g|>"  # every prompt encodes to this one token: its g(x) is the row's embedding


@dataclass(frozen=True)
class GaussianSpec:
    q: int = 64
    test_per_cluster: int = 100
    d: int = 32
    v: float | None = None  # None: half the v5 limit, 1/(64 √Q)
    l_b: float = 0.3
    token_sharing: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, g) -> "GaussianSpec":
        """From the ``data.gaussian`` settings (settings.Gaussian)."""
        return cls(g.q, g.test_per_cluster, g.d, g.v, float(g.l_b), g.token_sharing, g.seed)

    @property
    def sigma(self) -> float:
        """v, the per-coordinate standard deviation (its default meets v5's v ≤ 1/(32 √Q) with room)."""
        return float(self.v) if self.v is not None else 1.0 / (64.0 * math.sqrt(self.q))

    def z(self, k: int) -> int:
        """Z of K concepts: each token is in both clusters of each concept sharing its pair."""
        return 2 * min(self.token_sharing, k)


def concept_name(i: int) -> str:
    return f"concept{i:03d}"


def answer_tokens(i: int, sharing: int) -> tuple[str, str]:
    """The (aligned-preferred, misaligned-preferred) tokens of concept i."""
    p = i // sharing
    return f"a{2 * p}", f"a{2 * p + 1}"


def vocabulary(n_concepts: int, sharing: int) -> list[str]:
    """Answer tokens for up to ``n_concepts`` concepts (the head's vocabulary, besides special tokens)."""
    pairs = math.ceil(n_concepts / sharing)
    return [f"a{j}" for j in range(2 * pairs)]


def basis(d: int, seed: int) -> np.ndarray:
    """A seeded orthonormal basis of R^d (columns): column 0 is b's direction, column i + 1 is c_i."""
    a = np.random.default_rng([seed, 7, d]).standard_normal((d, d))
    qm, r = np.linalg.qr(a)
    return qm * np.sign(np.diag(r))  # a unique QR: the basis does not depend on LAPACK's sign choices


def check(spec: GaussianSpec, k: int) -> None:
    """Settings the data model cannot meet, named by their keys."""
    if k is None or k < 1:
        raise ValueError("data.k: the gaussian source needs a number of concepts K >= 1")
    if spec.d < k + 1:
        raise ValueError(f"data.gaussian.d: d={spec.d} is too small for K={k} orthogonal concept vectors and b "
                         f"(needs d >= K + 1 = {k + 1})")
    if spec.q < 1 or spec.test_per_cluster < 1:
        raise ValueError("data.gaussian.q / test_per_cluster: need at least one sample per cluster")
    if spec.token_sharing < 1:
        raise ValueError("data.gaussian.token_sharing: must be >= 1")
    if spec.sigma < 0 or spec.l_b < 0:
        raise ValueError("data.gaussian.v / l_b: must be >= 0")


def _cluster(spec: GaussianSpec, B: np.ndarray, i: int, sign: int, split: str, n: int) -> pd.DataFrame:
    mean = sign * B[:, i + 1] + spec.l_b * B[:, 0]
    rng = np.random.default_rng([spec.seed, i, 1 if sign > 0 else 2, 0 if split == "train" else 1])
    emb = mean + spec.sigma * rng.standard_normal((n, spec.d))
    yes, no = answer_tokens(i, spec.token_sharing)
    chosen, rejected = (yes, no) if sign > 0 else (no, yes)
    name = concept_name(i)
    return pd.DataFrame({
        "concept": name, "cluster": np.int8(sign),
        "prompt": [f"{name}:{sign:+d}:{split}:{j}" for j in range(n)],
        "chosen": " " + chosen, "rejected": " " + rejected,
        "embedding": list(emb),
    })


def generate(k: int, spec: GaussianSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """K concepts, Q training and ``test_per_cluster`` held-out samples per cluster (fp64 embeddings)."""
    check(spec, k)
    B = basis(spec.d, spec.seed)
    out = []
    for split, n in (("train", spec.q), ("test", spec.test_per_cluster)):
        out.append(pd.concat([_cluster(spec, B, i, s, split, n) for i in range(k) for s in (1, -1)],
                             ignore_index=True))
    return out[0], out[1]


def card_extra(k: int, spec: GaussianSpec) -> dict:
    """The generator's true parameters, for the data card (the theory stage measures them again)."""
    return {"gaussian": {"d": spec.d, "v": spec.sigma, "l_b": spec.l_b, "Q": spec.q, "Z": spec.z(k),
                         "token_sharing": spec.token_sharing, "test_per_cluster": spec.test_per_cluster,
                         "seed": spec.seed}}


def embeddings(df: pd.DataFrame, source: str = "pairs") -> np.ndarray:
    """The ``embedding`` column as an (n, d) fp64 array; every row must have the same finite length d."""
    vals = df["embedding"].tolist()
    lens = {len(v) for v in vals}
    if len(lens) > 1:
        i = next(j for j, v in enumerate(vals) if len(v) != len(vals[0]))
        raise ValueError(f"{source}: row {i}, field 'embedding': length {len(vals[i])}, expected {len(vals[0])}")
    X = np.asarray(np.stack(vals), dtype=np.float64) if vals else np.zeros((0, 0))
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"{source}: row {int(np.flatnonzero(bad)[0])}, field 'embedding': NaN or Inf")
    return X
