"""TracIn when the backbone trains (full, lora): which training concepts moved each margin, estimated from
gradients at the margin checkpoints, without a second training run.

At a checkpoint θ_k a step moves margin r_j by about −η ∇r_j·∇L, with ∇L = (1/N) Σ_i ∇ℓ_i the expected
(mini-batch) gradient, so training group c's part over the steps until the next checkpoint is
−(Σ η_t) ∇r_j·(1/N) Σ_{i∈c} ∇ℓ_i (Pruthi et al. 2020, TracIn-CP), summed over the checkpoints before the one
reported. The gradients are restricted to
- ``head``: the LM head's weight, every token's (e_y − p) hᵀ projected by a Kronecker product of two seeded
  Gaussian maps (vocabulary side and hidden side, dim = k_v·k_h), so no |V|×d gradient is ever formed;
- ``trainable``: every trained parameter (LoRA's adapters, or the whole model in full), one backward pass per
  pair and answer, projected by a seeded Gaussian map of ``dim`` rows;
``dim: null`` keeps the gradients unprojected (exact inner products; small models). It is an estimate:
first order in η, Adam's preconditioner left out (its scale is not the run's; the correlation with
retraining, theory.attribution_check, is what tells).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..logprobs import backbone_and_head, head_gradients, pair_logps, unwrap
from .loss import dpo_loss

METHOD = "estimate: TracIn over the margin checkpoints ({what}), first order, the optimizer's preconditioner left out"


def mode(policy, cfg: dict) -> str | None:
    """``dpo.tracin.params`` resolved: head (full), trainable (lora) for auto; None when off."""
    setting = (cfg.get("tracin") or {}).get("params", "auto")
    if setting in (None, "none"):
        return None
    if setting == "auto":
        return "trainable" if policy.regime == "lora" else "head"
    return setting


def not_applicable(policy, cfg: dict) -> str | None:
    """Why TracIn is not computed for this run (None: it is)."""
    if policy.cache is not None:
        return "TracIn is for a training backbone (full, lora); last_layer splits its actual updates"
    m = mode(policy, cfg)
    if m is None:
        return "dpo.tracin.params: none"
    if policy.dist.enabled and policy.dist.world > 1:
        return "TracIn runs in one process (dpo.processes: 1)"
    inner = unwrap(policy.model)
    scale = getattr(inner, "logit_scale", None)
    if m == "head" and (getattr(inner.config, "final_logit_softcapping", None) or (
            isinstance(scale, (int, float)) and scale != 1)):
        return "TracIn on the head needs a plain linear LM head (no logit scale or soft-capping)"
    return None


class KroneckerProjection:
    """(v_t h_tᵀ) ↦ (R_v v_t) ⊗ (R_h h_t): inner products of the projections estimate those of the outer
    products without bias (E⟨R a, R b⟩ = ⟨a, b⟩ for each factor); None: the outer product itself."""

    def __init__(self, vocab: int, d: int, dim: int | None, seed: int, device):
        self.R_v = self.R_h = None
        if dim is not None:
            k_h = min(d, 2 ** int(math.log2(max(1, math.isqrt(dim)))))
            k_v = max(1, dim // k_h)
            gen = torch.Generator().manual_seed(seed)
            self.R_v = (torch.randn(k_v, vocab, generator=gen, dtype=torch.float64) / math.sqrt(k_v)).to(device)
            self.R_h = (torch.randn(k_h, d, generator=gen, dtype=torch.float64) / math.sqrt(k_h)).to(device)

    def __call__(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.R_v is not None:
            v, h = v @ self.R_v.T, h @ self.R_h.T
        return (v[:, :, None] * h[:, None, :]).reshape(len(v), -1)


class TracIn:
    def __init__(self, policy, run, cfg: dict, seed: int):
        self.policy, self.run, self.cfg, self.beta = policy, run, cfg, cfg["beta"]
        self.mode = mode(policy, cfg)
        self.dim = (cfg.get("tracin") or {}).get("dim", 512)
        train = run.pairs.iloc[: run.n_train]
        key = list(zip(train["concept"].astype(str), train["cluster"].astype(int)))
        self.keys = sorted(set(key))
        index = {k: i for i, k in enumerate(self.keys)}
        self.group = np.array([index[k] for k in key])
        self.scores: dict[int, np.ndarray] = {}  # checkpoint → (n, groups): margin change per unit of Σ η
        device = next(policy.model.parameters()).device
        if self.mode == "head":
            head = backbone_and_head(policy.model)[1]
            self.project = KroneckerProjection(head.weight.shape[0], head.weight.shape[1], self.dim, seed, device)
        else:
            params = list(policy.trainable().values())
            self.params = params
            n = sum(p.numel() for p in params)
            if self.dim is not None and self.dim * n > 2e8:
                raise ValueError(f"dpo.tracin: a {self.dim} x {n} projection of every trained parameter is too large; "
                                 "set dpo.tracin.params: head or a smaller dpo.tracin.dim")
            gen = torch.Generator().manual_seed(seed)
            self.R = None if self.dim is None else \
                (torch.randn(self.dim, n, generator=gen, dtype=torch.float64) / math.sqrt(self.dim)).to(device)

    def _features(self) -> torch.Tensor:
        """(n, 2, D): every pair's projected gradient of log π(y_w|x) and log π(y_l|x), eval mode."""
        model, enc = self.policy.model, self.run.enc
        was = model.training
        model.eval()
        try:
            if self.mode == "head":
                return head_gradients(model, enc, self.project, batch_rows=self.cfg["eval_batch_size"])
            rows = []
            for j in range(enc.n_pairs):
                with torch.enable_grad():
                    lp = pair_logps(model, enc, [j])[0]
                    per_slot = []
                    for slot in (0, 1):
                        grads = torch.autograd.grad(lp[slot], self.params, retain_graph=slot == 0, allow_unused=True)
                        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                          for g, p in zip(grads, self.params)]).double()
                        per_slot.append(flat if self.R is None else self.R @ flat)
                rows.append(torch.stack(per_slot))
            return torch.stack(rows)
        finally:
            model.train(was)

    def checkpoint(self, step: int, lp: np.ndarray) -> None:
        """Scores at this checkpoint from its log-probs ``lp`` (n, 2) and the gradients under its weights."""
        run = self.run
        n = run.n_train
        phi = self._features()
        lp_t = torch.tensor(lp[:n], dtype=torch.float64, requires_grad=True)
        ref = torch.tensor(run.ref[:n], dtype=torch.float64)
        nt = torch.tensor(run.enc.n_tokens[:n], dtype=torch.float64)
        loss = dpo_loss(lp_t[:, 0] - ref[:, 0], lp_t[:, 1] - ref[:, 1], self.beta, self.cfg["loss"],
                        self.cfg["label_smoothing"], nt).sum() / n
        (a,) = torch.autograd.grad(loss, lp_t)  # (n, 2): ∂L/∂log π of each answer
        a = a.to(phi.device)
        per_pair = a[:, 0, None] * phi[:n, 0] + a[:, 1, None] * phi[:n, 1]  # ∇ℓ_i / N, projected
        G = torch.zeros((len(self.keys), phi.shape[2]), dtype=torch.float64, device=phi.device)
        G.index_add_(0, torch.as_tensor(self.group, device=phi.device), per_pair)
        dr = self.beta * (phi[:, 0] - phi[:, 1])  # ∇r_j, projected
        self.scores[step] = (-(dr @ G.T)).cpu().numpy()

    def table(self, pairs: pd.DataFrame, metrics: list[dict]) -> pd.DataFrame:
        """The attribution table: at checkpoint s_m, Σ_{k<m} (Σ of the lr over steps s_k+1..s_k+1) × scores(s_k)."""
        # the rate of every step taken (a step skipped for a non-finite loss moved nothing)
        lr = {int(r["step"]): float(r["lr"]) for r in metrics if r["step"] > 0 and math.isfinite(r["loss"])}
        steps = sorted(self.scores)
        base = {"split": pairs["split"].to_numpy(), "sample_id": pairs["sample_id"].to_numpy(),
                "concept": pairs["concept"].astype(str).to_numpy()}
        total = np.zeros_like(self.scores[steps[0]])
        frames = []
        for m, step in enumerate(steps):
            if m:
                prev = steps[m - 1]
                total = total + sum(lr.get(t, 0.0) for t in range(prev + 1, step + 1)) * self.scores[prev]
            frames += [pd.DataFrame({"step": step, **base, "train_concept": c, "train_cluster": s,
                                     "contribution": total[:, gi]}) for gi, (c, s) in enumerate(self.keys)]
        what = (f"the LM head's gradient, {'unprojected' if self.dim is None else f'a {self.dim}-dim Kronecker projection'}"
                if self.mode == "head" else
                f"every trained parameter's gradient, {'unprojected' if self.dim is None else f'a {self.dim}-dim projection'}")
        return pd.concat(frames, ignore_index=True).assign(method=METHOD.format(what=what))

    def state_dict(self) -> dict:
        return {"scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.scores = dict(state["scores"])
