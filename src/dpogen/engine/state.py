"""Resume state: what a killed training job needs to go on as if it had never stopped.

Each process saves its own shard of the trained parameters and the optimizer state with
``torch.distributed.checkpoint`` (no process ever holds the full optimizer state; a save resumes on any
number of processes, which DCP reshards), its RNG state, and the
first process the scheduler, the metrics so far and the step (which is the data position: batches depend
on the step alone). The save goes to a temporary folder that replaces the previous one when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("dpogen")


def fingerprint(cfg: dict, *files) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "cuda": cuda}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def _quiet(dist):
    """One process, not launched: torch.distributed.checkpoint warns that it saves without a process group,
    which is what is meant."""
    with warnings.catch_warnings():
        if not dist.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class ResumeState:
    """The work folder of one training job: ``fingerprint-<fp>`` marks the settings it belongs to (a save
    made with other settings is discarded), ``save/`` the last complete save."""

    def __init__(self, work_dir, fp: str, dist):
        self.work, self.fp, self.dist = Path(work_dir), fp, dist
        self.save_dir = self.work / "save"
        self.extra = None
        self.batch = None

    def prepare(self) -> None:
        if self.dist.main:
            if self.work.exists() and not (self.work / f"fingerprint-{self.fp}").exists():
                log.info("work folder %s belongs to other settings: starting over", self.work)
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / f"fingerprint-{self.fp}").touch()
            old = self.work / "save.old"
            if old.exists() and not self.save_dir.exists():  # killed between the two renames of a save
                os.replace(old, self.save_dir)
        self.dist.barrier()

    def exists(self) -> bool:
        """A complete save is there, and whole: one whose files differ from the sizes recorded when it was
        written (a truncated shard, a missing file) is moved aside, kept as ``resume.damaged-<time>`` beside
        the work folder, and training starts over, saying so, instead of failing on it at every retry."""
        if not (self.save_dir / "meta.pt").exists():
            return False
        damaged = self._damaged()
        self.dist.barrier()
        if damaged is None:
            return True
        if self.dist.main:
            aside = self.work.parent / f"{self.work.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(self.save_dir, aside)
            log.warning("resume save %s is damaged (%s): moved aside to %s (kept), training starts from step 0",
                        self.save_dir, damaged, aside)
        self.dist.barrier()
        return False

    def _damaged(self) -> str | None:
        sizes = self.save_dir / "sizes.json"
        if not sizes.exists():
            return "no sizes.json: an incomplete save"
        try:
            want = json.loads(sizes.read_text())
        except (ValueError, OSError) as e:  # written but lost (power loss before the disk had it)
            return f"sizes.json unreadable ({e})"
        for name, size in want.items():
            f = self.save_dir / name
            if not f.exists():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
        return None

    @staticmethod
    def _options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True)  # last_layer and lora: only what trains

    def save(self, step: int, model, opt, sched, metrics: list[dict], extra: dict | None = None,
             batch: dict | None = None) -> None:
        """``extra``: more state of the first process (the update split's sums), saved beside the metrics;
        ``batch``: the in-batch margins recorded so far."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        tmp = self.work / "save.tmp"
        if self.dist.main and tmp.exists():
            shutil.rmtree(tmp)
        self.dist.barrier()
        msd, osd = get_state_dict(model, opt, options=self._options())
        with _quiet(self.dist):
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not self.dist.enabled)
        torch.save(rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.main:
            torch.save({"step": step, "world": self.dist.world, "scheduler": sched.state_dict(), "metrics": metrics,
                        "extra": extra, "batch": batch}, tmp / "meta.pt")
            # every file's size, so a damaged save is told from a whole one before anything is loaded from it
            write_sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / "sizes.json").write_text(json.dumps(write_sizes))
            old = self.work / "save.old"
            if old.exists():  # a kill between the last save's rename and its clean-up left it
                shutil.rmtree(old)
            if self.save_dir.exists():
                os.replace(self.save_dir, old)
            os.replace(tmp, self.save_dir)
            if old.exists():
                shutil.rmtree(old)
            log.info("saved training state at step %d: %.1f MB in %.2fs (%s)", step, _folder_bytes(self.save_dir) / 1e6,
                     time.perf_counter() - t0, self.save_dir)
        self.dist.barrier()

    def load(self, model, opt, sched) -> tuple[int, list[dict]]:
        """Restore the last save into ``model``, ``opt``, ``sched`` and the RNGs; returns (step, metrics), and
        keeps the saved ``extra`` in ``self.extra``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = torch.load(self.save_dir / "meta.pt", weights_only=False)
        saved_world = meta["world"]
        if saved_world != self.dist.world:
            # DCP reads each process's part of the saved shards whatever their layout; the batches depend on the
            # step alone, so every step still trains the same global batch, split over the processes there are
            log.info("resuming a save of %d processes on %d: parameters and optimizer state resharded by "
                     "torch.distributed.checkpoint; each step still trains the whole global batch, now split %d "
                     "ways; RNG state of rank r from saved rank r mod %d", saved_world, self.dist.world,
                     self.dist.world, saved_world)
        msd, osd = get_state_dict(model, opt, options=self._options())
        state = {"model": msd, "optim": osd}
        with _quiet(self.dist):
            dcp.load(state, checkpoint_id=str(self.save_dir), no_dist=not self.dist.enabled)
        # frozen parameters (last_layer, lora) are not in the save: only a missing trained one is an error
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        keys = set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                              options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        lost = [k for k in getattr(keys, "missing_keys", []) if k in trained]
        if lost:
            raise ValueError(f"{self.save_dir}: the save lacks trained parameters {lost[:5]}; delete {self.work} "
                             f"to start over")
        sched.load_state_dict(meta["scheduler"])
        set_rng_state(torch.load(self.save_dir / f"rng-rank{self.dist.rank % saved_world}.pt", weights_only=False))
        self.extra = meta.get("extra")
        self.batch = meta.get("batch")
        log.info("resuming from step %d (%s)", meta["step"], self.save_dir)
        return meta["step"], meta["metrics"]

    def close(self) -> None:
        if self.dist.main:
            shutil.rmtree(self.work)
