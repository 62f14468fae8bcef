"""The preference losses and their names in run.json and the summary.

``preference_loss`` is the one place β·(log π − log π_ref) is computed: it returns the per-pair losses, the
rewards of chosen and rejected and the margins, as the original DPO code's function of that name does, and
training, the margin tables, the in-batch margins, TracIn and the update split all call it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from ..settings import DPO

LOSSES = ("sigmoid", "ipo", "ipo_norm", "hinge", "robust")


class Preference(NamedTuple):
    losses: torch.Tensor | None  # per pair; None when no loss was asked for (loss_type None)
    reward_chosen: torch.Tensor  # β (log π(y_w|x) − log π_ref(y_w|x))
    reward_rejected: torch.Tensor
    margin: torch.Tensor  # reward_chosen − reward_rejected


def preference_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float,
                    loss_type: str | None = "sigmoid", label_smoothing: float = 0.0,
                    n_tokens: torch.Tensor | None = None) -> Preference:
    """Losses, rewards and margins of pairs from policy and reference log-probs (tensors, or numpy arrays,
    read as float64 tensors without copying). Where training reads only log π(y_w) − log π(y_l) (single-token
    answers in last_layer), pass that difference as ``logp_chosen``, 0 as ``logp_rejected`` and the
    reference's difference as ``ref_chosen``: the loss and the margin are the same."""
    args = [torch.from_numpy(np.asarray(x, np.float64)) if not torch.is_tensor(x) and not np.isscalar(x) else x
            for x in (logp_chosen, logp_rejected, ref_chosen, ref_rejected)]
    ratio_c, ratio_r = args[0] - args[2], args[1] - args[3]
    rc, rr = beta * ratio_c, beta * ratio_r
    losses = None if loss_type is None else dpo_loss(ratio_c, ratio_r, beta, loss_type, label_smoothing, n_tokens)
    return Preference(losses, rc, rr, rc - rr)


def dpo_loss(ratio_chosen: torch.Tensor, ratio_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from the log-ratios log π(y|x) − log π_ref(y|x) of chosen and rejected.

    With h = ratio_chosen − ratio_rejected (so the margin is r = βh):
    sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh) (ε = label_smoothing: conservative DPO; ε = 0: DPO);
    ipo: (h − 1/(2β))² on summed log-probs, as in the original DPO code;
    ipo_norm: the same with each log-ratio divided by its response's token count (TRL's IPO);
    hinge: max(0, 1 − βh); robust: (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε) (TRL's "robust").
    """
    h = ratio_chosen - ratio_rejected
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "ipo_norm":
        if n_tokens is None:
            raise ValueError("dpo.loss ipo_norm needs the response token counts")
        hn = ratio_chosen / n_tokens[:, 0] - ratio_rejected / n_tokens[:, 1]
        return (hn - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
            / (1 - 2 * label_smoothing)
    raise ValueError(f"dpo.loss: unknown {loss_type!r} ({', '.join(LOSSES)})")


def loss_name(cfg: DPO) -> str:
    if cfg.loss == "sigmoid" and cfg.label_smoothing > 0:
        return f"cdpo(eps={cfg.label_smoothing})"
    if cfg.loss == "robust":
        return f"robust-dpo(eps={cfg.label_smoothing})"
    return {"sigmoid": "dpo-sigmoid", "ipo": "ipo-summed", "ipo_norm": "ipo-token-mean", "hinge": "hinge"}[cfg.loss]
