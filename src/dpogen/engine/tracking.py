"""Training curves where practitioners look for them (``dpo.report_to``): TensorBoard event files and, when
installed, Weights & Biases in offline mode, under TRL's metric names (``train/loss``,
``train/rewards/margins``, ``eval/rewards/margins``, ...). An execution setting: the numbers written to the
margin tables never depend on it. Only the main process writes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .. import tables

log = logging.getLogger("dpogen")
BACKENDS = ("tensorboard", "wandb")


class Tracker:
    """Scalars of every step (the batch's loss, rewards, log-probs, lr, gradient norm) and of every margin
    checkpoint (every pair's mean reward margin, accuracy and rewards, per split) to the asked backends.
    After a resume the backends continue at the step the save was made at (TensorBoard purges what an
    interrupted attempt, or an earlier run in the same folder, wrote from that step on)."""

    def __init__(self, report_to, folder, name: str, config: dict, start_step: int, main: bool):
        self.writers = []
        if not main:
            return
        for backend in report_to or ():
            if backend == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise RuntimeError("dpo.report_to: tensorboard is not installed (pip install tensorboard, or "
                                       "pip install -e '.[tensorboard]'), or leave it out of dpo.report_to") from None

                self.writers.append(("tensorboard", SummaryWriter(str(Path(folder) / "tensorboard"),
                                                                  purge_step=start_step)))
            elif backend == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise RuntimeError("dpo.report_to: wandb is not installed (pip install wandb), or leave it "
                                       "out of dpo.report_to") from None
                run = wandb.init(mode="offline", dir=str(folder), name=name, config=config, resume="allow",
                                 id=name.replace("/", "-"))
                self.writers.append(("wandb", run))
            else:
                raise ValueError(f"dpo.report_to: unknown backend {backend!r} ({', '.join(BACKENDS)})")
        if self.writers:
            log.info("dpo: training curves to %s under %s", ", ".join(b for b, _ in self.writers), folder)

    def _scalars(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        for backend, w in self.writers:
            if backend == "tensorboard":
                for k, v in values.items():
                    w.add_scalar(k, v, step)
            else:
                w.log(values, step=step)

    def step(self, row: dict, stat_names) -> None:
        """One optimiser step's row of the metrics table."""
        if self.writers:
            self._scalars({f"train/{k}": row[k] for k in (*stat_names, "lr", "grad_norm")}, row["step"])

    def checkpoint(self, step: int, margins: pd.DataFrame) -> None:
        """Every pair's margins at a checkpoint: train/full/... for the training pairs, eval/... held out."""
        if not self.writers:
            return
        values = {}
        for split, g in margins.groupby("split"):
            prefix = "eval" if split == "test" else "train/full"
            w = g["weight"].to_numpy() if "weight" in g else np.ones(len(g))  # a tracked subset's weights
            values |= {f"{prefix}/rewards/margins": np.average(g["margin"], weights=w),
                       f"{prefix}/rewards/accuracies": 1.0 - np.average(tables.margin_errors(g["margin"]), weights=w),
                       f"{prefix}/rewards/chosen": np.average(g["reward_chosen"], weights=w),
                       f"{prefix}/rewards/rejected": np.average(g["reward_rejected"], weights=w)}
        self._scalars(values, step)
        for backend, w in self.writers:  # a run that stops later (diverged, killed) keeps its curves so far
            if backend == "tensorboard":
                w.flush()

    def close(self) -> None:
        for backend, w in self.writers:
            if backend == "tensorboard":
                w.close()
            else:
                w.finish()
        self.writers = []
