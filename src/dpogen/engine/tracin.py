"""TracIn when the backbone trains (full, lora): which training concepts moved each margin, estimated from
gradients at the margin checkpoints, without a second training run.

At a checkpoint θ_k a step moves margin r_j by about −η ∇r_j·∇L, with ∇L = (1/N) Σ_i ∇ℓ_i the expected
(mini-batch) gradient, so training group c's part over the steps until the next checkpoint is
−(Σ η_t) ∇r_j·(1/N) Σ_{i∈c} ∇ℓ_i (Pruthi et al. 2020, TracIn-CP), summed over the checkpoints before the one
reported. The gradients are restricted to
- ``head``: the LM head's weight, every token's (e_y − p) hᵀ projected by a Kronecker product of two seeded
  Gaussian maps (vocabulary side and hidden side, dim = k_v·k_h), so no |V|×d gradient is ever formed;
- ``trainable``: every trained parameter. When they are all Linear weights (LoRA's adapters) the per-pair
  gradients come in batches, one forward and two backward passes per batch, from hooks that keep each
  layer's inputs a and output gradients g (a row's weight gradient is Σ_t g_t a_tᵀ), each layer's projected
  by a Kronecker product of seeded Gaussian maps (its share of ``dim``); otherwise (the whole model in full)
  one backward pass per pair and answer, projected by a seeded Gaussian map of ``dim`` rows;
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
from .loss import preference_loss
from ..settings import DPO

METHOD = "estimate: TracIn over the margin checkpoints ({what}), first order, the optimizer's preconditioner left out"


def mode(policy, cfg: DPO) -> str | None:
    """``dpo.tracin.params`` resolved: head (full), trainable (lora) for auto; None when off."""
    setting = cfg.tracin.params
    if setting == "none":
        return None
    if setting == "auto":
        return "trainable" if policy.regime == "lora" else "head"
    return setting


def not_applicable(policy, cfg: DPO) -> str | None:
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
    def __init__(self, policy, run, cfg: DPO, seed: int):
        self.policy, self.run, self.cfg, self.beta = policy, run, cfg, cfg.beta
        self.mode = mode(policy, cfg)
        self.dim = cfg.tracin.dim
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
            self.linears = trained_linears(policy.model, params)
            if self.linears is not None:  # every trained parameter is a Linear weight: per-pair gradients in batches
                self.kron = [LinearProjection(m, self.dim, len(self.linears), seed + i, device)
                             for i, m in enumerate(self.linears)]
                return
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
                return head_gradients(model, enc, self.project, batch_rows=self.cfg.eval_batch_size)
            if self.linears is not None:
                return linear_gradients(model, enc, self.linears, self.kron, self.cfg.eval_batch_size,
                                        difference=self.cfg.loss != "ipo_norm")
            rows = []  # any other trained parameter: one backward pass per pair and answer
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
        loss = preference_loss(lp_t[:, 0], lp_t[:, 1], ref[:, 0], ref[:, 1], self.beta, self.cfg.loss,
                               self.cfg.label_smoothing, nt).losses.sum() / n
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
        what = ("the LM head's gradient, "
                f"{'unprojected' if self.dim is None else f'a {self.dim}-dim Kronecker projection'}"
                if self.mode == "head" else
                "every trained parameter's gradient, "
                f"{'unprojected' if self.dim is None else f'a {self.dim}-dim projection'}")
        return pd.concat(frames, ignore_index=True).assign(method=METHOD.format(what=what))

    def state_dict(self) -> dict:
        return {"scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.scores = dict(state["scores"])


def trained_linears(model, params) -> list[torch.nn.Linear] | None:
    """The Linear layers whose weights are all that trains (LoRA's adapters; no bias), else None."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    if {id(p) for p in params} != {id(m.weight) for m in linears} or any(
            m.bias is not None and m.bias.requires_grad for m in linears):
        return None
    return linears


class LinearProjection:
    """A Linear layer's per-token weight gradient g_t a_tᵀ (output gradient, input) mapped to
    (R_o g_t) ⊗ (R_i a_t); a side no larger than its share of ``dim`` is kept as it is (None: both)."""

    def __init__(self, layer: torch.nn.Linear, dim: int | None, n_layers: int, seed: int, device):
        gen = torch.Generator().manual_seed(seed)
        side = None if dim is None else max(1, math.isqrt(max(1, dim // n_layers)))

        def proj(size):
            if side is None or side >= size:
                return None
            return (torch.randn(side, size, generator=gen, dtype=torch.float64) / math.sqrt(side)).to(device)

        self.R_o, self.R_i = proj(layer.out_features), proj(layer.in_features)

    def __call__(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """g: (B, L, out), a: (B, L, in) → (B, D): the row's projected weight gradient, summed over positions."""
        g = g if self.R_o is None else g @ self.R_o.T
        a = a if self.R_i is None else a @ self.R_i.T
        return torch.einsum("blo,bli->boi", g, a).reshape(len(g), -1)


def linear_gradients(model, enc, linears, projections, batch_rows: int | None,
                     difference: bool = False) -> torch.Tensor:
    """(n, 2, D): per pair and answer, the projected gradient of log π(y|x) with respect to the weights of
    ``linears``, from one forward and two backward passes per batch of rows: hooks keep each layer's inputs
    and output gradients per row, and a row's weight gradient is Σ_t g_t a_tᵀ (rows do not interact). With
    ``difference``, one backward pass: slot 0 holds the gradient of log π(y_w|x) − log π(y_l|x) and slot 1
    zeros, which is all a loss of the log-ratio needs (every loss but ipo_norm)."""
    from ..logprobs import compute_dtype, forward_rows, row_batches

    inputs, grads = {}, {}

    def keep(i):
        def hook(module, args, out):
            inputs[i] = args[0].detach().double()
            out.register_hook(lambda g: grads.__setitem__(i, g.detach().double()))  # ∂(sum of lp)/∂output
        return hook

    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(linears)]
    all_rows = np.arange(len(enc.rows))
    out = None
    try:
        for rows in (all_rows[b] for b in row_batches(enc.lengths(), batch_rows)):
            pairs = np.unique(enc.row_pair[rows])
            slot_of = {int(p): j for j, p in enumerate(pairs)}
            owner = torch.as_tensor([int(enc.row_pair[r]) for r in rows])
            with torch.enable_grad():
                zero = torch.zeros((len(pairs), 2), dtype=compute_dtype(model), device=next(model.parameters()).device)
                lp = forward_rows(model, enc, rows, slot_of, zero, None)
                for slot in ((0,) if difference else (0, 1)):
                    grads.clear()
                    target = (lp[:, 0] - lp[:, 1]) if difference else lp[:, slot]
                    target.sum().backward(retain_graph=slot == 0 and not difference)
                    phi = torch.cat([proj(grads[i], inputs[i]) for i, proj in enumerate(projections)], dim=1)
                    if out is None:
                        out = torch.zeros((enc.n_pairs, 2, phi.shape[1]), dtype=torch.float64, device=phi.device)
                    out[:, slot].index_add_(0, owner.to(phi.device), phi)
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return out
