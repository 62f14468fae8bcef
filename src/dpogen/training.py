"""Pieces shared by the SFT and DPO loops: optimizers, learning-rate schedules, progress logging."""

from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger("dpogen")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    params = [p for p in params if p.requires_grad]
    if name == "sgd":  # plain gradient descent: no momentum, the gradient-flow regime of the theory
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r} (sgd, adam, adamw)")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    rest = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / rest)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"schedule: unknown {schedule!r} (constant, linear, cosine)")


def make_scheduler(optimizer, schedule: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, s, warmup, total))


class Progress:
    """Logs step, loss, throughput and time left every ``every`` steps, as training tools do."""

    def __init__(self, total: int, what: str, every: int = 10, start_step: int = 0):
        self.total, self.what, self.every = total, what, max(1, every)
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.items = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        return self.items / max(self.elapsed(), 1e-9)

    def update(self, step: int, items: int, **values) -> None:
        """Record ``items`` pairs processed at ``step`` (1-based count of steps done)."""
        self.items += items
        if step % self.every and step != self.total:
            return
        done = step - self.start_step
        left = (self.total - step) * self.elapsed() / max(done, 1)
        vals = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.info("%s step %d/%d %s pairs/s=%.1f elapsed=%.0fs left=%.0fs", self.what, step, self.total, vals,
                 self.rate(), self.elapsed(), left)


def attempts_path(log_path: str) -> str:
    """The attempts log beside a job's log (``logs/dpo/k2.log`` → ``logs/dpo/k2.attempts.log``)."""
    return f"{log_path[:-4] if log_path.endswith('.log') else log_path}.attempts.log"


def setup_logging(path: str | None = None, history: str | None = None) -> None:
    """Log to stderr and ``path``; with ``history``, also append to that file, which Snakemake does not
    own: the log of a failed or killed attempt stays there beside the new attempt's."""
    console = logging.StreamHandler()
    console.addFilter(_quiet_libraries)
    handlers = [console]
    if path:
        handlers.append(logging.FileHandler(path, mode="a"))
    if history:
        handlers.append(logging.FileHandler(history, mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers,
                        force=True)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """The console shows dpogen's own messages and every library's warnings; libraries' INFO lines (fontTools
    says "subsetting not needed" for every table of every PDF figure) go to the job's log only."""
    return record.name.startswith("dpogen") or record.name == "root" or record.levelno >= logging.WARNING
