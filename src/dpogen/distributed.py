"""Data-parallel training across processes (one per GPU, or CPU processes with gloo).

Processes are started by ``accelerate launch`` (or torchrun), which sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address. Every process holds the whole model and draws the same global batch; each computes the
gradient of its share, the gradients are summed across processes (what DDP does), and every process then
takes the same optimizer step. Margin checkpoints are split across processes and gathered on rank 0, which
alone writes files.
"""

from __future__ import annotations

import os

import numpy as np
import torch


class Dist:
    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
                backend = "cpu:gloo,cuda:nccl"  # gradients on the GPUs, small CPU reductions through gloo
            else:
                backend = "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """One GPU per process: cuda → cuda:<local rank>."""
        return f"cuda:{self.local_rank}" if self.enabled and device == "cuda" else device

    def shard(self, idx: np.ndarray) -> np.ndarray:
        return idx[self.rank:: self.world] if self.enabled else idx

    def sum_grads(self, params) -> None:
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)

    def sum(self, values: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return values
        t = torch.as_tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.numpy()

    def gather_rows(self, n: int, local_idx: np.ndarray, local: np.ndarray) -> np.ndarray | None:
        """Rows computed by each process for ``local_idx`` → the full (n, ...) array on rank 0."""
        if not self.enabled:
            return local
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, (local_idx, local))
        if not self.main:
            return None
        out = np.zeros((n,) + local.shape[1:], dtype=local.dtype)
        for idx, rows in parts:
            out[idx] = rows
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
