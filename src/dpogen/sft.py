"""The sft stage: a reference model for DPO.

``target: both`` trains on each train prompt followed by either answer, so the model learns the format and
the text, not the preference; ``chosen`` trains on prompt + chosen (standard DPO practice); ``none`` keeps
the base model as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import model as M
from .training import Progress, log, make_optimizer, make_scheduler


def sft_sequences(train: pd.DataFrame, target: str) -> tuple[list[str], list[str]]:
    if target == "both":
        prompts = list(train["prompt"]) * 2
        responses = list(train["chosen"]) + list(train["rejected"])
    elif target == "chosen":
        prompts, responses = list(train["prompt"]), list(train["chosen"])
    else:
        raise ValueError(f"sft.target: {target!r} has no sequences")
    return prompts, responses


def encode_sft(tokenizer, prompts, responses, loss_on: str):
    """Token ids and labels (-100 where no loss) for prompt+response sequences, EOS appended."""
    full = tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"]
    plen = [len(x) for x in tokenizer(prompts)["input_ids"]]
    out = []
    for ids, n in zip(full, plen):
        ids = list(ids) + [tokenizer.eos_token_id]
        labels = list(ids) if loss_on == "all" else [-100] * n + ids[n:]
        out.append((ids, labels))
    return out


def _collate(items, pad_id):
    L = max(len(i) for i, _ in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for b, (i, lab) in enumerate(items):
        ids[b, : len(i)] = torch.as_tensor(i)
        labels[b, : len(lab)] = torch.as_tensor(lab)
        mask[b, : len(i)] = 1
    return ids, mask, labels


def train_sft(base_path, train: pd.DataFrame, cfg: dict, out_dir, seed: int) -> dict:
    if cfg["target"] == "none":  # the base model is the reference: point at it, do not copy it
        target, options = M.resolve(base_path)
        M.save_pointer(Path(target).resolve() if Path(target).exists() else target, out_dir, options)
        return {"steps": 0}
    model, tok = M.load(base_path, cfg.get("dtype", "float32"))
    M.seed_everything(seed)
    items = encode_sft(tok, *sft_sequences(train, cfg["target"]), cfg["loss_on"])
    opt = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["weight_decay"])
    sched = make_scheduler(opt, cfg["schedule"], cfg["warmup_steps"], cfg["steps"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    pos = 0
    prog = Progress(cfg["steps"], "sft", every=cfg["log_every"])
    model.train()
    loss_val = float("nan")
    for step in range(1, cfg["steps"] + 1):
        if pos + cfg["batch_size"] > len(order):
            order, pos = rng.permutation(len(items)), 0
        batch = [items[i] for i in order[pos: pos + cfg["batch_size"]]]
        pos += cfg["batch_size"]
        ids, mask, labels = _collate(batch, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        opt.step()
        sched.step()
        loss_val = loss.item()
        prog.update(step, len(batch), loss=loss_val, lr=sched.get_last_lr()[0])
    model.eval()
    M.save(model, tok, out_dir)
    log.info("sft done: %d steps, final loss %.4f, %.1fs", cfg["steps"], loss_val, prog.elapsed())
    return {"steps": cfg["steps"], "final_loss": loss_val}
