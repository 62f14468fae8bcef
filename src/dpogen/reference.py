"""The reference pass: log-probs of every pair under the reference model, computed once, and g(x).

Its own module so that the reference job's code hash follows only what it runs: editing the training loop
(dpo.py) does not recompute reference log-probs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import model as M
from . import tables
from .io import atomic_path
from .logprobs import encode_pairs, pair_logps


def pairs_frame(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)


def encode(tokenizer, pairs: pd.DataFrame, cfg: dict):
    return encode_pairs(tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"],
                        append_eos=cfg["append_eos"], source="pairs")


def autocast(model, cfg: dict):
    """bf16/fp16 autocast of the model's matrix products when ``dpo.autocast`` is set; log-probs stay fp32."""
    import contextlib

    if not cfg.get("autocast"):
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=M.DTYPES[cfg["autocast"]])


@torch.no_grad()
def eval_logps(model, enc, cfg: dict, features: bool = False, pairs=None):
    """All pairs (or ``pairs``), in eval mode (dropout off), no gradients."""
    was = model.training
    model.eval()
    try:
        with autocast(model, cfg):
            return pair_logps(model, enc, pairs, batch_rows=cfg["eval_batch_size"], features=features)
    finally:
        model.train(was)


@torch.no_grad()
def given_features_logps(model, enc, pairs: pd.DataFrame, cfg: dict):
    """The gaussian source: g(x) is the pairs' ``embedding`` column, so only the head runs (no backbone)."""
    from .gaussian import embeddings
    from .logprobs import TargetCache, cached_logps, compute_dtype

    if not enc.fused.all():
        i = int(np.flatnonzero(~enc.fused)[0])
        raise ValueError(f"pairs: row {i}: with given embeddings every answer must be one token after the prompt")
    dev = next(model.parameters()).device
    feats = torch.as_tensor(embeddings(pairs, "pairs"), dtype=compute_dtype(model), device=dev)
    if feats.shape[1] != model.get_output_embeddings().weight.shape[1]:
        raise ValueError(f"pairs: embeddings have d={feats.shape[1]}, the model's head expects "
                         f"{model.get_output_embeddings().weight.shape[1]}")
    cache = TargetCache.from_features(enc, feats)
    return cached_logps(model, cache, batch_targets=cfg["eval_batch_size"]), feats


def compute_reference(ref_path, train: pd.DataFrame, test: pd.DataFrame, cfg: dict, out_logps, out_features) -> None:
    """One pass of the reference model over all pairs → ref_logps.parquet, and g(x) per pair (.npy)."""
    model, tok = M.load(ref_path, cfg["dtype"], cfg["device"])
    pairs = pairs_frame(train, test)
    enc = encode(tok, pairs, cfg)
    if "embedding" in pairs.columns:
        lp, feats = given_features_logps(model, enc, pairs, cfg)
    else:
        lp, feats = eval_logps(model, enc, cfg, features=True)
    lp = lp.cpu().numpy().astype(np.float64)
    tokens = np.full((len(pairs), 2), -1, dtype=np.int64)
    for i in np.flatnonzero(enc.fused):
        tokens[i] = enc.row_targets[enc.pair_rows[i][0]][:, 1]
    df = pd.DataFrame({"sample_id": pairs["sample_id"], "split": pairs["split"],
                       "ref_logp_chosen": lp[:, 0], "ref_logp_rejected": lp[:, 1],
                       "n_tokens_chosen": enc.n_tokens[:, 0], "n_tokens_rejected": enc.n_tokens[:, 1],
                       "token_chosen": tokens[:, 0], "token_rejected": tokens[:, 1]})
    tables.write_ref_logps(df, out_logps)
    with atomic_path(out_features) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats.cpu().numpy())  # fp32, or fp64 when the model runs in fp64
