"""Each training step's actual update of the LM head, split over the training (concept, cluster) groups.

With single-token answers and the head alone training, a margin is linear in the head's rows:
r_j = β((W[y_w,j] − W[y_l,j])·g(x_j) − reference), so the change of every margin over a run is a sum over steps
of the head's actual updates, and each update is a sum over the groups whose pairs were in the batch:
- sgd: ΔW = −η c Σ_groups G_group (c the clipping factor, G the group's share of the batch gradient);
- adam / adamw: ΔW = −η/(1−β₁ᵗ) · m_t ⊘ (√(v_t/(1−β₂ᵗ)) + ε), with m_t the exponential average of the clipped
  gradients, a sum of per-group averages; the preconditioner v_t is the optimizer's own state.
The parts of a margin then sum to its measured value; what no group made (weight decay, float rounding) is the
residual. It is an attribution of this trajectory: without a group, later batches, weights and Adam's
preconditioner would differ too (first order), which theory.attribution_check measures by retraining.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..tables import NOT_A_CONCEPT as RESIDUAL  # the part no training group made: weight decay, rounding
from .loss import preference_loss
from ..settings import DPO

METHOD = {
    "sgd": "estimate: the actual minibatch sgd updates split over training (concept, cluster) (first order in the "
           "trajectory)",
    "adam": "estimate: the actual adam updates split over training (concept, cluster) through adam's "
            "preconditioner (first order)",
}


def not_applicable(policy, cfg: DPO) -> str | None:
    """Why the updates cannot be split for this run (None: they can)."""
    if not policy.margin_only:
        return ("the update split needs the LM head alone training on single-token pairs (regime last_layer; "
                "dpo.score: first_difference for multiple-choice answers)")
    head = policy.model.get_output_embeddings()
    inner = policy.model
    scale = getattr(inner, "logit_scale", None)
    if head.bias is not None or getattr(inner.config, "final_logit_softcapping", None) or (
            isinstance(scale, (int, float)) and scale != 1):
        return "the update split needs a plain linear LM head (no bias, logit scale or soft-capping)"
    if cfg.optimizer not in ("sgd", "adam", "adamw"):
        return f"no update split for optimizer {cfg.optimizer}"
    return None


class UpdateSplit:
    """Running per-group sums of the head's updates on the answer tokens' rows, and at each margin checkpoint
    every pair's margin split over the groups."""

    def __init__(self, policy, run, cfg: DPO):
        self.policy, self.cfg, self.beta = policy, cfg, cfg.beta
        self.adam = cfg.optimizer in ("adam", "adamw")
        pairs = run.pairs
        train = pairs.iloc[: run.n_train]
        self.keys = sorted(set(zip(train["concept"].astype(str), train["cluster"].astype(int))))
        index = {k: i for i, k in enumerate(self.keys)}
        self.group = torch.as_tensor([index[k] for k in zip(train["concept"].astype(str),
                                                            train["cluster"].astype(int))],
                                     device=policy.cache.hidden.device)
        cache = policy.cache
        first = torch.as_tensor(cache.offsets[:-1], device=cache.token.device)
        tok_w, tok_l = cache.token[first], cache.token[first + 1]
        self.rows, inverse = torch.unique(torch.cat([tok_w, tok_l]), return_inverse=True)  # U answer tokens
        n = len(pairs)
        self.uw, self.ul = inverse[:n], inverse[n:]
        self.g = cache.hidden[cache.row[first]]  # (n, d): g(x) of every pair
        self.W = policy.model.get_output_embeddings().weight
        shape = (len(self.keys) + 1, len(self.rows), self.W.shape[1])  # the last slot: the residual
        self.total = torch.zeros(shape, dtype=torch.float64, device=self.W.device)
        self.m = torch.zeros((shape[0] - 1,) + shape[1:], dtype=torch.float64,
                             device=self.W.device)  # adam: m per group
        self.parts: dict[int, np.ndarray] = {}
        self._grad = self._before = None

    # --- one step ---------------------------------------------------------------------------------------------

    def before_step(self, idx: np.ndarray, ref_t: torch.Tensor) -> None:
        """After backward and clipping, before the optimizer step: each group's share of the (clipped) batch
        gradient on the answer rows, and those rows as they are."""
        idx_t = torch.as_tensor(idx, device=self.g.device)
        with torch.enable_grad():
            d = self.policy.logratio(idx).detach().requires_grad_(True)
            r = ref_t[idx_t.to(ref_t.device)].to(d.dtype)
            loss = preference_loss(d, torch.zeros_like(d), r[:, 0] - r[:, 1], 0.0, self.beta, self.cfg.loss,
                                   self.cfg.label_smoothing,
                                   torch.ones(len(idx), 2, dtype=d.dtype, device=d.device)).losses.sum() / len(idx)
            (a,) = torch.autograd.grad(loss, d)  # ∂loss/∂(log π(y_w) − log π(y_l)) per pair of the batch
        coef = a.to(torch.float64)[:, None] * self.g[idx_t].to(torch.float64)  # (b, d)
        G = torch.zeros_like(self.total[:-1])
        grp = self.group[idx_t]
        G.index_put_((grp, self.uw[idx_t]), coef, accumulate=True)
        G.index_put_((grp, self.ul[idx_t]), -coef, accumulate=True)
        full = G.sum(0)
        actual = self.W.grad[self.rows].to(torch.float64)  # after clipping: the same direction, scaled
        norm = float((full * full).sum())
        clip = float((actual * full).sum()) / norm if norm > 0 else 1.0
        self._grad = clip * G
        self._before = self.W.detach()[self.rows].to(torch.float64).clone()

    def after_step(self, opt) -> None:
        """After the optimizer step: the update split by group through the optimizer's own arithmetic."""
        group = opt.param_groups[0]
        lr = float(group["lr"])
        if self.adam:
            state = opt.state[self.W]
            t = float(state["step"])
            beta1, beta2 = group["betas"]
            self.m.mul_(beta1).add_(self._grad, alpha=1 - beta1)
            denom = (state["exp_avg_sq"][self.rows].to(torch.float64) / (1 - beta2 ** t)).sqrt() + group["eps"]
            parts = -(lr / (1 - beta1 ** t)) * self.m / denom
        else:
            parts = -lr * self._grad
        delta = self.W.detach()[self.rows].to(torch.float64) - self._before
        self.total[:-1] += parts
        self.total[-1] += delta - parts.sum(0)
        self._grad = self._before = None

    def skipped_step(self, opt) -> None:
        """A step skipped for a non-finite loss: Adam's moments do not move, nor do the weights."""
        self._grad = self._before = None

    # --- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint(self, step: int, lp: np.ndarray | None = None) -> None:
        """Every pair's margin split over the groups (and the residual) as the weights are now."""
        # (groups + 1, n, U): each pair's g(x) against every answer row's running sum, then its two rows
        rows = torch.einsum("gud,nd->gnu", self.total, self.g.to(torch.float64))
        n = torch.arange(len(self.uw), device=rows.device)
        self.parts[step] = (self.beta * (rows[:, n, self.uw] - rows[:, n, self.ul])).T.cpu().numpy()

    def table(self, pairs: pd.DataFrame, metrics: list[dict] | None = None) -> pd.DataFrame:
        """The attribution table (tables.ATTRIBUTION): per checkpoint, pair and training (concept, cluster); the
        residual as training concept "(weight decay)" where any step decayed the weights."""
        keys = self.keys + ([(RESIDUAL, 0)] if self.cfg.weight_decay else [])
        base = {"split": pairs["split"].to_numpy(), "sample_id": pairs["sample_id"].to_numpy(),
                "concept": pairs["concept"].astype(str).to_numpy()}
        frames = [pd.DataFrame({"step": step, **base, "train_concept": c, "train_cluster": s, "contribution": P[:, gi]})
                  for step, P in sorted(self.parts.items()) for gi, (c, s) in enumerate(keys)]
        return pd.concat(frames, ignore_index=True).assign(method=METHOD["adam" if self.adam else "sgd"])

    def residual(self) -> float:
        """The largest margin part no group made, over pairs and checkpoints (weight decay and rounding)."""
        return max((float(np.abs(P[:, -1]).max()) for P in self.parts.values()), default=0.0)

    # --- resume -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"total": self.total.cpu(), "m": self.m.cpu(), "parts": self.parts}

    def load_state_dict(self, state: dict) -> None:
        self.total.copy_(state["total"])
        self.m.copy_(state["m"])
        self.parts = dict(state["parts"])
