"""The theorems' time scale, shared by the dpo stage (which checkpoints at τ_1) and the theory stage.

docs/theory.md states the theorems for concept vectors of unit norm; a model's g(x) is rescaled so the concept
vectors' norms average 1 (section 3), which makes its time run scale² faster: with full-batch gradient
descent of step η, t/τ = η·scale²·k after k steps.
"""

from __future__ import annotations

import math

import numpy as np


def concept_scale(features: np.ndarray, concept: np.ndarray, cluster: np.ndarray) -> float:
    """Mean norm of the concept vectors c_i estimated by ĉ_i = (μ_i,+ − μ_i,−)/2 (fp64); 1.0 when none can be
    formed. The cluster means carry sampling noise, E‖ĉ_i‖² = ‖c_i‖² + (tr Σ_+/n_+ + tr Σ_−/n_−)/4, which
    at small Q and large d would inflate the scale (and shorten τ_1) by a factor that depends on Q; each
    squared norm is corrected by that term (kept when the correction would leave nothing)."""
    X = np.asarray(features, dtype=np.float64)
    norms = []
    for c in sorted(set(concept)):
        pos, neg = (concept == c) & (cluster == 1), (concept == c) & (cluster == -1)
        if pos.any() and neg.any():
            raw = float(np.sum(((X[pos].mean(0) - X[neg].mean(0)) / 2) ** 2))
            noise = sum(X[m].var(axis=0, ddof=1).sum() / m.sum() for m in (pos, neg) if m.sum() > 1) / 4
            norms.append(math.sqrt(raw - noise if raw - noise > 0 else raw))
    scale = float(np.mean(norms)) if norms else math.nan
    return scale if scale > 0 else 1.0


def tau1_steps(beta: float, K: int, eta: float, scale: float = 1.0) -> float:
    """τ_1 = Kτ log3/(5β²) (v3 Theorem 4.1) in steps of full-batch gradient descent with step η."""
    return K * math.log(3) / (5 * beta**2 * eta * scale**2)
