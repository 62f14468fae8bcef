"""The preference losses and their names in run.json and the summary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "ipo_norm", "hinge", "robust")


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


def loss_name(cfg: dict) -> str:
    if cfg["loss"] == "sigmoid" and cfg["label_smoothing"] > 0:
        return f"cdpo(eps={cfg['label_smoothing']})"
    if cfg["loss"] == "robust":
        return f"robust-dpo(eps={cfg['label_smoothing']})"
    return {"sigmoid": "dpo-sigmoid", "ipo": "ipo-summed", "ipo_norm": "ipo-token-mean", "hinge": "hinge"}[cfg["loss"]]
