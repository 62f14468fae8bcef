"""Runaway training: a run that has plainly diverged while every value stays finite.

Non-finite losses are caught where they happen (loop.nonfinite). A loss that climbs to hundreds of times
its start, or a gradient norm that stays far above its usual size, is as sure a sign, and a run that goes
on reads as a result. The rule, after each step k:

- the median loss of the last WINDOW steps is more than LOSS_FACTOR times the first step's loss (the loss at
  the reference, log 2 for DPO's sigmoid loss), or
- the median gradient norm (before clipping) of the last WINDOW steps is more than GRAD_FACTOR times the
  median of the steps before them (once MIN_HISTORY steps precede them).

Medians, so a run that oscillates wildly is caught and one or two spikes that recover pass; the
repository's experiments and the tests' runs stay far below both thresholds. ``dpo.on_divergence: stop``
(the default) raises, naming the step, the loss against its start, the gradient norm against its median and
the settings most likely at fault, and keeps the last resume save; ``warn`` lets the run finish and marks
it "diverged at step k" in run.json, the summaries and the figures.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
from ..settings import DPO

WINDOW = 5
LOSS_FACTOR = 10.0
GRAD_FACTOR = 100.0
MIN_HISTORY = 10


class DivergedError(FloatingPointError):
    pass


class Watch:
    """The loss and gradient norm of every step so far (a resumed run rebuilds them from its metrics)."""

    def __init__(self, rows: list[dict] | None = None):
        self.loss: list[float] = []
        self.grad: list[float] = []
        self.first_step = None
        self.history: list[float] = []  # gradient norms before the window, sorted (its median in O(log n))
        for r in rows or []:
            if r.get("step", 0) > 0:
                self.add(r["loss"], r["grad_norm"], r["step"])

    def add(self, loss: float, grad_norm: float, step: int | None = None) -> None:
        """One step's loss and gradient norm; a skipped, non-finite step is not one (as in a live run)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return
        if self.first_step is None:
            self.first_step = step if step is not None else 1
        self.loss.append(float(loss))
        self.grad.append(float(grad_norm))
        if len(self.grad) > WINDOW:  # the step leaving the window joins the history
            bisect.insort(self.history, self.grad[-WINDOW - 1])

    def diverged(self) -> str | None:
        """Why the run has diverged by now, or None."""
        if len(self.loss) < WINDOW or self.loss[0] <= 0:
            return None
        start = self.loss[0]
        last = float(np.median(self.loss[-WINDOW:]))
        if last > LOSS_FACTOR * start:
            return (f"the loss over the last {WINDOW} steps was {last:.4g} (median), more than {LOSS_FACTOR:g}x its "
                    f"{start:.4g} at step {self.first_step}")
        h = self.history
        if len(h) >= MIN_HISTORY:
            before = (h[(len(h) - 1) // 2] + h[len(h) // 2]) / 2
            now = float(np.median(self.grad[-WINDOW:]))
            if before > 0 and now > GRAD_FACTOR * before:
                return (f"the gradient norm over the last {WINDOW} steps was {now:.4g} (median), more than "
                        f"{GRAD_FACTOR:g}x its median of {before:.4g} before (loss {start:.4g} at step "
                        f"{self.first_step}, {last:.4g} now)")
        return None


def message(step: int, why: str, cfg: DPO) -> str:
    """The stop's message: the step, what diverged and the settings most likely at fault."""
    return (f"dpo step {step}: training diverged: {why}. Likely causes: dpo.lr={cfg.lr} too large for "
            f"dpo.optimizer={cfg.optimizer}, dpo.beta={cfg.beta}, dpo.warmup_steps={cfg.warmup_steps}, "
            f"dpo.max_grad_norm={cfg.max_grad_norm}. No margin table was written; the last resume save, if "
            f"any, is kept. dpo.on_divergence: warn lets such a run finish, marked as diverged")
