"""The sft stage: a reference model for DPO.

``target: both`` trains on each train prompt followed by either answer, so the model learns the format and
the text, not the preference; ``chosen`` trains on prompt + chosen (standard DPO practice); ``none`` keeps
the base model as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import model as M
from .settings import DPO, SFT
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


def sft_rows(items, pad_id: int):
    """The sequences as token rows for the one log-prob function: row ids[:-1], a target at every
    position whose label is not masked (label −100), all in the chosen slot."""
    from .logprobs import CHOSEN, EncodedPairs

    rows, targets = [], []
    for ids, labels in items:
        rows.append(list(ids[:-1]))
        targets.append(np.array([(q - 1, ids[q], CHOSEN) for q in range(1, len(ids)) if labels[q] != -100],
                                dtype=np.int64).reshape(-1, 3))
    n = len(items)
    counts = np.array([[len(t), 0] for t in targets], dtype=np.int64).reshape(-1, 2)
    return EncodedPairs(rows, np.arange(n), targets, [[i] for i in range(n)], np.zeros((n, 2), dtype=np.int64),
                        counts, int(pad_id), np.zeros(n, bool))


def train_sft(base_path, train: pd.DataFrame, cfg: SFT, out_dir, seed: int, engine: DPO | None = None,
              dtype: str = "float32", load: dict | None = None) -> dict:
    """Next-token cross-entropy over the targets of each batch (its mean over target tokens), in ``dtype``
    (model.dtype) on the same engine as DPO: the ``engine`` settings processes, parallel, device, autocast,
    gradient_checkpointing, logit_chunk (default: one process on the CPU); ``load``: Model.load_options()."""
    if cfg.target == "none":  # the base model is the reference: point at it, do not copy it
        target, options = M.resolve(base_path)
        M.save_pointer(Path(target).resolve() if Path(target).exists() else target, out_dir, options)
        return {"steps": 0}
    from .parallel import Dist, grad_norm, load_for, precision, wrap
    from .logprobs import pair_logps

    engine = engine or DPO()
    dist = Dist(engine.device)
    model, tok = load_for(base_path, engine, dist, dtype, load)
    M.seed_everything(seed)
    items = encode_sft(tok, *sft_sequences(train, cfg.target), cfg.loss_on)
    enc = sft_rows(items, tok.pad_token_id)
    model = wrap(model, engine, dist, checkpointing=bool(engine.gradient_checkpointing))
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.schedule, cfg.warmup_steps, cfg.steps)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    pos = 0
    prog = Progress(cfg.steps, "sft", every=cfg.log_every)
    model.train()
    loss_val = float("nan")
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(items)), 0
        batch = order[pos: pos + cfg.batch_size]
        pos += cfg.batch_size
        n_targets = int(enc.n_tokens[batch, 0].sum())
        mine = batch[dist.rank::dist.world]
        with precision(model, engine):
            lp = pair_logps(model, enc, mine if len(mine) else batch[:1], logit_chunk=engine.logit_chunk)
        loss = -lp[:, 0].sum() / n_targets * (dist.world if len(mine) else 0.0)  # engines average over processes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        loss_val = float(dist.sum(np.array([loss.item()]))[0]) / dist.world
        prog.update(step, len(batch), loss=loss_val, lr=sched.get_last_lr()[0])
    model.eval()
    save_trained(model, tok, base_path, dtype, out_dir, dist, load)
    log.info("sft done: %d steps, final loss %.4f, %.1fs", cfg.steps, loss_val, prog.elapsed())
    dist.close()
    return {"steps": cfg.steps, "final_loss": loss_val}


def save_trained(model, tok, base_path, dtype: str, out_dir, dist, load: dict | None = None) -> None:
    """save_pretrained the trained weights; when launched, gathered on the first process's host and saved
    from a model built empty around them (one full copy there, none elsewhere)."""
    if not dist.enabled:
        M.save(model, tok, out_dir)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .shards import build_empty

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.main:
        plain, _ = build_empty(base_path, None, dtype, load)
        plain.load_state_dict(full, assign=True, strict=False)
        plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"sft: the gathered weights lack {missing[:4]}")
        M.save(plain, tok, out_dir)
    dist.barrier()


def train_sft_files(base, train, cfg: SFT, out, seed: int, engine: DPO | None = None, dtype: str = "float32",
                    load: dict | None = None) -> dict:
    """train_sft with the training pairs given as a Parquet path (what a launched process receives)."""
    return train_sft(base, pd.read_parquet(train), cfg, out, seed, engine, dtype, load)
