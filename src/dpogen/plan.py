"""The memory plan: what each run's training stages hold per GPU, and the SLURM resources they ask for.

Pure arithmetic on the model's ``config.json`` dict (no torch, no transformers, no weights), so that it runs
while Snakemake parses the workflow. It models the engine's wrapping exactly for parameters, gradients and
optimizer state, and estimates the rest:

- ``dpo.parallel: fsdp`` (the default) with ``dpo.processes`` > 1: ``fully_shard`` on each decoder layer
  (``model.model.layers[i]``, ``model.transformer.h[i]`` for gpt2), then on the root, which holds the
  embeddings, the final norm and the LM head (a tied head is one tensor). Every parameter is sharded on dim 0
  as ``torch.chunk(t, world, dim=0)``, padded with empty chunks: rank r holds chunk r's rows or none
  (``local_numel``). Parameters are kept in ``dpo.dtype`` (fp32 master weights); gradients are sharded
  like their parameter, in the same dtype; AdamW's exp_avg and exp_avg_sq likewise (sgd has no state).
  Frozen parameters (``last_layer``, ``lora``) are held but have no gradient or optimizer state.
- ``dpo.parallel: ddp``, or a single process (nothing to shard): every rank holds the full parameters,
  gradients and optimizer state.

Terms per rank, in bytes (``GB`` = 1e9 bytes in what is printed):

- params, grads, optimizer: exact, as above (``.to_local()`` sizes; optimizer excludes AdamW's 0-dim step
  counters). FSDP2 pads each rank's storage to chunk 0's size, so rank 0, the largest, is also what every
  rank allocates for its parameters.
- working: FSDP: the largest decoder layer unsharded twice (the one computing and the one prefetched) plus
  the root's parameters, in the compute dtype (``MixedPrecisionPolicy(param_dtype=dpo.autocast)``, else
  ``dpo.dtype``). Without FSDP, under autocast to a narrower dtype: autocast's cached casts of every matrix
  (2-D parameter), held while the autocast region is open; otherwise nothing.
- activations (an estimate, checked against the tensors autograd saves in tests/test_plan.py), for T padded
  tokens per micro-batch per process and b bytes per element of the compute dtype. Per token, a norm keeps
  ``N = 4H + 2bH`` bytes (RMSNorm: its input upcast to fp32, the normalized and the scaled outputs; gpt2's
  LayerNorm ``2bH``) and one decoder layer
  ``A = 2N + b (2q + 2kv + m) + 4 heads`` bytes (H hidden size; q = heads x head_dim, kv = kv_heads x head_dim:
  queries, keys, values and the attention output; m = 4 x intermediate for gated MLPs (gate, up, act(gate),
  their product), 5 x intermediate for gpt2's gelu; 4 bytes per head for the attention's log-sum-exp; qwen3
  adds its q/k norms, ``4 (q + kv) + 2b (q + kv)``; eager attention adds its scores and probabilities,
  ``2b x heads x sequence length``). Training keeps ``T (L A + N)`` without gradient checkpointing (every
  layer's activations and the final norm's) and ``T (L b H + A + N)`` with it (each layer's input hidden
  state, plus one layer's full activations while it is recomputed). A forward pass without gradients keeps
  ``T (A + N)``. The last_layer regime trains on cached features: ``T x H x 4`` bytes.
- logits: at most ``dpo.logit_chunk`` positions (and no more than T) hold full-vocabulary fp32 logits at once:
  ``min(logit_chunk, T) x vocab x 4`` bytes, times 3 in training (logits, log-softmax, its gradient) and 2
  in a forward pass without gradients.
- total: params + grads + optimizer + working + the largest of (activations + logits) over the stage's
  passes (training micro-batches; the checkpoint passes over all pairs of the dpo stage).

Not modelled: the CUDA context and NCCL buffers (about 1 GB), the allocator's fragmentation, FSDP's
reduce-scatter buffers (one layer's gradient, unsharded, in the compute dtype and fp32).

The token budget T: ``dpo.max_tokens_per_batch`` (``dpo.eval_max_tokens_per_batch`` for checkpoint and
reference passes) when set, else rows per micro-batch per process x a sequence length: 2 rows per pair in
training (chosen and rejected; a pair of single-token answers shares one row, so 2 is an upper bound),
``dpo.eval_batch_size`` rows in a pass without gradients, one row per sequence in sft; the sequence length is
``data.max_prompt_tokens + data.max_response_tokens`` (+1 for EOS) when both are set, else the model's
``max_position_embeddings``, an upper bound.

Stages: ``sft`` (when ``sft.target`` is not none: trains every weight like dpo's full regime, with sft's
batch and optimizer, weights in ``model.dtype``, micro-batches bounded by ``dpo.max_tokens_per_batch``),
``ref_logps`` (forward only, weights in ``dpo.dtype``) and ``dpo``. Each asks for ``dpo.processes`` GPUs
when ``dpo.device`` is cuda (0 otherwise, and 0 for a stage that does not run the engine), ``threads.train``
CPUs, and host memory (mem_mb) for each rank's full copy of the checkpoint (every rank loads it on the host
before sharding; on cpu, the larger of that and the rank's total) plus 4 GiB per rank and 2 GiB.

    python -m dpogen.plan --configfile config/experiments/v5-full-llama3.1-8b.yaml [--configfile more.yaml] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

from .config import ConfigError, normalize, pair_counts, run_settings, runs
from .settings import Settings, build
from .settings.sections import Lora

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "config" / "models"  # bundled config.json of hub models: <owner>--<name>.json

GB = 1e9
MB = 2**20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
OPTIMIZER_STATES = {"sgd": 0, "adam": 2, "adamw": 2}  # exp_avg, exp_avg_sq: same shape and dtype as the param
LOGIT_FACTOR = {"train": 3, "eval": 2}
HOST_SLACK_MB = 4096  # per rank: the interpreter, torch and CUDA on the host, the data
HOST_BASE_MB = 2048
TERMS = ("params", "grads", "optimizer", "working", "activations", "logits")

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
CONV1D = ("c_attn", "c_proj", "c_fc")  # gpt2's Conv1D: weight is (in, out)
EMBEDDINGS = ("embed_tokens", "wte", "wpe")


# ---------------------------------------------------------------------------------------------------------
# the model's config.json


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def bundled(name: str) -> Path:
    """The bundled config of hub id ``owner/name``."""
    return MODELS / (name.replace("/", "--") + ".json")


def _gguf_match(gguf_file: str) -> Path | None:
    """The bundled config whose model name begins the GGUF file's name (the longest such name)."""
    stem = Path(gguf_file).name.lower()
    best = None
    for f in sorted(MODELS.glob("*.json")):
        name = f.stem.split("--", 1)[-1].lower()
        if stem.startswith(name) and (best is None or len(name) > len(best[0])):
            best = (name, f)
    return best[1] if best else None


def model_config(cfg: Settings) -> dict:
    """The HF ``config.json`` dict of the run's model: built from ``model.scratch`` (the gaussian source's
    linear head from ``data.gaussian.d``), read from a local folder's config.json, or the bundled copy for a
    hub id (``config/models/<owner>--<name>.json``) or a GGUF file."""
    m = cfg.model
    if m.source == "scratch":
        if cfg.data.source == "gaussian":  # model.build_linear_head: no layers, a d-dim head
            d = cfg.data.gaussian.d
            return {"model_type": "llama", "hidden_size": d, "intermediate_size": 1, "num_hidden_layers": 0,
                    "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 3 + 2 * (d - 1),
                    "max_position_embeddings": 2, "tie_word_embeddings": False}
        s = m.scratch
        if s.arch == "llama":
            return {"model_type": "llama", "hidden_size": s.hidden_size,
                    "intermediate_size": s.intermediate_size, "num_hidden_layers": s.num_layers,
                    "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_heads,
                    "vocab_size": s.vocab_size, "max_position_embeddings": s.max_position_embeddings,
                    "tie_word_embeddings": s.tie_word_embeddings, "attention_bias": False, "mlp_bias": False}
        if s.arch == "gpt2":
            return {"model_type": "gpt2", "n_embd": s.hidden_size, "n_layer": s.num_layers,
                    "n_head": s.num_heads, "n_inner": s.intermediate_size,
                    "n_positions": s.max_position_embeddings, "vocab_size": s.vocab_size,
                    "tie_word_embeddings": s.tie_word_embeddings}
        raise ConfigError(f"model.scratch.arch: unknown architecture {s.arch!r} (llama, gpt2)")
    p = m.pretrained
    path, gguf = p.path, p.gguf_file
    folder = Path(path) if path else None
    if folder is not None and folder.is_dir() and (folder / "config.json").is_file():
        return _read_json(folder / "config.json")
    if gguf:
        found = _gguf_match(gguf)
        if found:
            return _read_json(found)
        raise ConfigError(f"model.pretrained.path: {path!r} has no config.json beside {gguf}, and no bundled config "
                          f"in {MODELS} matches the GGUF file's name; put the model's config.json in that folder")
    if folder is not None and folder.is_dir():
        raise ConfigError(f"model.pretrained.path: {path!r} has no config.json; the memory plan needs the model's "
                          f"config.json in that folder")
    if path and bundled(path).is_file():
        return _read_json(bundled(path))
    raise ConfigError(f"model.pretrained.path: {path!r} is neither a local folder with a config.json nor a hub id "
                      f"with a bundled config; give a local folder holding the model's config.json, or add the "
                      f"hub's config.json as {bundled(path or 'owner/name')}")


# ---------------------------------------------------------------------------------------------------------
# parameter shapes, computed from the config


def dims(mc: dict) -> dict:
    """The architecture's sizes: H, L, I, V, heads, kv_heads, head_dim, positions, tied, gated."""
    t = mc.get("model_type")
    if t == "gpt2":
        H = mc.get("n_embd", 768)
        nh = mc.get("n_head", 12)
        return {"type": t, "H": H, "L": mc.get("n_layer", 12), "I": mc.get("n_inner") or 4 * H,
                "V": mc.get("vocab_size", 50257), "heads": nh, "kv_heads": nh, "head_dim": H // nh,
                "positions": mc.get("n_positions", 1024), "tied": mc.get("tie_word_embeddings", True),
                "gated": False}
    if t in LLAMA_LIKE:
        H, nh = mc["hidden_size"], mc["num_attention_heads"]
        hd = mc.get("head_dim") or (128 if t == "qwen3" and "head_dim" not in mc else H // nh)
        return {"type": t, "H": H, "L": mc["num_hidden_layers"], "I": mc["intermediate_size"],
                "V": mc["vocab_size"], "heads": nh, "kv_heads": mc.get("num_key_value_heads") or nh, "head_dim": hd,
                "positions": mc.get("max_position_embeddings", 2048), "tied": mc.get("tie_word_embeddings", False),
                "gated": True}
    raise ConfigError(f"model_type {t!r}: the memory plan knows {', '.join(LLAMA_LIKE + ('gpt2',))}")


def param_shapes(mc: dict) -> list[tuple[str, tuple[int, ...], int | str]]:
    """(name, shape, group) of every parameter, named as transformers names them in the CausalLM model (a
    tied head is the embedding's tensor, listed once); group is the decoder layer's index or "root"."""
    d = dims(mc)
    H, L, I, V = d["H"], d["L"], d["I"], d["V"]  # noqa: E741 (I: the MLP's intermediate size)
    out: list = []
    if d["type"] == "gpt2":
        out += [("transformer.wte.weight", (V, H), "root"), ("transformer.wpe.weight", (d["positions"], H), "root")]
        for i in range(L):
            p = f"transformer.h.{i}."
            out += [(p + "ln_1.weight", (H,), i), (p + "ln_1.bias", (H,), i),
                    (p + "attn.c_attn.weight", (H, 3 * H), i), (p + "attn.c_attn.bias", (3 * H,), i),
                    (p + "attn.c_proj.weight", (H, H), i), (p + "attn.c_proj.bias", (H,), i),
                    (p + "ln_2.weight", (H,), i), (p + "ln_2.bias", (H,), i),
                    (p + "mlp.c_fc.weight", (H, I), i), (p + "mlp.c_fc.bias", (I,), i),
                    (p + "mlp.c_proj.weight", (I, H), i), (p + "mlp.c_proj.bias", (H,), i)]
        out += [("transformer.ln_f.weight", (H,), "root"), ("transformer.ln_f.bias", (H,), "root")]
        if not d["tied"]:
            out.append(("lm_head.weight", (V, H), "root"))
        return out
    t, hd = d["type"], d["head_dim"]
    q, kv = d["heads"] * hd, d["kv_heads"] * hd
    if t == "mistral":
        qkv_bias = o_bias = mlp_bias = False
    elif t == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif t == "qwen3":
        qkv_bias = o_bias = bool(mc.get("attention_bias", False))
        mlp_bias = False
    else:  # llama
        qkv_bias = o_bias = bool(mc.get("attention_bias", False))
        mlp_bias = bool(mc.get("mlp_bias", False))
    out.append(("model.embed_tokens.weight", (V, H), "root"))
    for i in range(L):
        a = f"model.layers.{i}.self_attn."
        for name, rows, cols, bias in (("q_proj", q, H, qkv_bias), ("k_proj", kv, H, qkv_bias),
                                       ("v_proj", kv, H, qkv_bias), ("o_proj", H, q, o_bias)):
            out.append((a + name + ".weight", (rows, cols), i))
            if bias:
                out.append((a + name + ".bias", (rows,), i))
        if t == "qwen3":
            out += [(a + "q_norm.weight", (hd,), i), (a + "k_norm.weight", (hd,), i)]
        mp = f"model.layers.{i}.mlp."
        for name, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            out.append((mp + name + ".weight", (rows, cols), i))
            if mlp_bias:
                out.append((mp + name + ".bias", (rows,), i))
        out += [(f"model.layers.{i}.input_layernorm.weight", (H,), i),
                (f"model.layers.{i}.post_attention_layernorm.weight", (H,), i)]
    out.append(("model.norm.weight", (H,), "root"))
    if not d["tied"]:
        out.append(("lm_head.weight", (V, H), "root"))
    return out


def numel(shape) -> int:
    return math.prod(shape)


def _lora_targets(shapes, target_modules) -> list[tuple[str, tuple, object, str]]:
    """Modules peft puts adapters on: (module name, weight shape, group, kind) for the 2-D weights whose module
    name ends with one of ``target_modules`` (a list), or matches it (a regex string; "all-linear": every
    linear layer but the LM head)."""
    out = []
    for name, shape, group in shapes:
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        mod = name[: -len(".weight")]
        last = mod.rsplit(".", 1)[-1]
        kind = "embedding" if last in EMBEDDINGS else "conv1d" if last in CONV1D else "linear"
        if isinstance(target_modules, str):
            if target_modules == "all-linear":
                hit = kind != "embedding" and mod != "lm_head"
            else:
                hit = re.fullmatch(target_modules, mod) is not None
        else:
            hit = any(mod == t or mod.endswith("." + t) for t in target_modules)
        if hit:
            out.append((mod, shape, group, kind))
    return out


def lora_shapes(shapes, lora: Lora) -> list[tuple[str, tuple, object]]:
    """The adapters peft adds (rank ``lora.r``): lora_A (r, in), lora_B (out, r) per targeted linear layer;
    lora_embedding_A (r, vocab), lora_embedding_B (hidden, r) per targeted embedding."""
    r = lora.r
    out = []
    for mod, shape, group, kind in _lora_targets(shapes, lora.target_modules):
        if kind == "embedding":
            out += [(f"{mod}.lora_embedding_A.default", (r, shape[0]), group),
                    (f"{mod}.lora_embedding_B.default", (shape[1], r), group)]
            continue
        fan_in, fan_out = (shape[0], shape[1]) if kind == "conv1d" else (shape[1], shape[0])
        out += [(f"{mod}.lora_A.default.weight", (r, fan_in), group),
                (f"{mod}.lora_B.default.weight", (fan_out, r), group)]
    return out


def regime_tensors(mc: dict, regime: str, lora: Lora | None = None) -> list[tuple[str, tuple, object, bool]]:
    """(name, shape, group, trainable) of every tensor the model holds in a regime. full: all train.
    last_layer: only the LM head trains, untied from the embeddings first (then its own V x H tensor).
    lora: the adapters train, the base is frozen."""
    shapes = param_shapes(mc)
    if regime == "full":
        return [(n, s, g, True) for n, s, g in shapes]
    if regime == "last_layer":
        out = [(n, s, g, n == "lm_head.weight") for n, s, g in shapes]
        if not any(n == "lm_head.weight" for n, _, _ in shapes):
            d = dims(mc)
            out.append(("lm_head.weight", (d["V"], d["H"]), "root", True))
        return out
    if regime == "lora":
        if not lora:
            raise ConfigError("dpo.lora: the lora regime needs r and target_modules")
        adapters = lora_shapes(shapes, lora)
        if not adapters:
            raise ConfigError(f"dpo.lora.target_modules: {lora.target_modules!r} matches no layer of "
                              f"{mc.get('model_type')}")
        return [(n, s, g, False) for n, s, g in shapes] + [(n, s, g, True) for n, s, g in adapters]
    raise ConfigError(f"dpo.regime: unknown {regime!r} (full, last_layer, lora)")


# ---------------------------------------------------------------------------------------------------------
# sharding


def local_numel(shape, world: int, rank: int) -> int:
    """Elements rank ``rank`` holds of a tensor sharded on dim 0 as ``torch.chunk(t, world, dim=0)``, the
    missing chunks empty: chunks of ceil(rows / world) rows, the last one shorter, the ranks after it none."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    shape = tuple(shape) or (1,)  # a 0-dim tensor is one row
    rows, rest = shape[0], numel(shape[1:])
    if rows == 0:
        return 0
    size = _ceil(rows, world)
    return max(0, min(size, rows - rank * size)) * rest


# ---------------------------------------------------------------------------------------------------------
# per stage


def _norm_bytes(d: dict, b: int) -> int:
    """Bytes per token a norm keeps for its backward pass."""
    return 2 * b * d["H"] + 8 if d["type"] == "gpt2" else 4 * d["H"] + 2 * b * d["H"]


def _layer_bytes(d: dict, b: int, seq: int | None, eager: bool) -> int:
    """Bytes per token one decoder layer keeps for its backward pass (see the module docstring)."""
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    m = (4 if d["gated"] else 5) * d["I"]
    a = 2 * _norm_bytes(d, b) + b * (2 * q + 2 * kv + m) + 4 * d["heads"]
    if d["type"] == "qwen3":
        a += (4 + 2 * b) * (q + kv)
    if eager and seq:
        a += 2 * b * d["heads"] * seq
    return a


def seq_len(rc: Settings, mc: dict, stage: str) -> tuple[int, str, bool]:
    """(tokens per row, where it comes from, whether it is only an upper bound)."""
    data = rc.data
    if data.source == "gaussian":
        return 1, "one prompt token (gaussian source)", False
    mp, mr = data.max_prompt_tokens, data.max_response_tokens
    if mp and mr:
        eos = 1 if stage == "sft" or rc.dpo.append_eos else 0
        return mp + mr + eos, "data.max_prompt_tokens + data.max_response_tokens" + (" + EOS" if eos else ""), False
    return dims(mc)["positions"], "the model's max_position_embeddings, an upper bound", True


def n_train_pairs(rc: Settings) -> int | None:
    """Training pairs of the run when the config fixes them (synthetic, gaussian: 2 K Q), else None."""
    counts = pair_counts(rc)
    return counts["train"][0] if counts else None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def token_budget(rc: Settings, mc: dict, stage: str, phase: str) -> dict:
    """T for the stage's training micro-batches (phase "train") or its passes without gradients ("eval"):
    tokens (None when the config cannot bound it), rows, seq and a note of the basis."""
    dpo, world = rc.dpo, rc.dpo.processes
    seq, seq_note, upper = seq_len(rc, mc, stage)
    if phase == "eval":
        rows = rc.dpo.eval_batch_size
        cap, cap_key = rc.dpo.eval_max_tokens_per_batch, "dpo.eval_max_tokens_per_batch"
        row_note = f"{rows} rows (dpo.eval_batch_size)"
    elif stage == "sft":
        rows = _ceil(rc.sft.batch_size, world)
        cap, cap_key = rc.dpo.max_tokens_per_batch, "dpo.max_tokens_per_batch"
        row_note = f"{rows} sequences per process (sft.batch_size / dpo.processes)"
    else:
        bsz = dpo.batch_size
        n = n_train_pairs(rc) if dpo.full_batch else bsz
        cap, cap_key = rc.dpo.max_tokens_per_batch, "dpo.max_tokens_per_batch"
        if n is None:
            rows, row_note = None, "dpo.batch_size full: the number of training pairs is known after the data stage"
        else:
            pairs = _ceil(_ceil(n, world), rc.dpo.grad_accum)
            rows = 2 * pairs
            row_note = f"{rows} rows per process (2 per pair, {pairs} pairs per micro-batch)"
    whole = rows * seq if rows is not None else None
    if cap:
        tokens = cap if whole is None else min(cap, whole)
        if not upper:
            tokens = max(tokens, seq)  # a row longer than the budget runs alone
        return {"tokens": tokens, "rows": rows, "seq": seq, "upper_bound": False,
                "basis": f"{cap_key}={cap}" + ("" if tokens == cap else f" (capped at {row_note} x {seq})")}
    return {"tokens": whole, "rows": rows, "seq": seq, "upper_bound": upper,
            "basis": f"{row_note} x {seq} tokens ({seq_note})" if rows is not None else
            f"{row_note}; set {cap_key} to bound it"}


def _pass_terms(rc: Settings, mc: dict, stage: str, phase: str, regime: str, checkpointing: bool, c_bytes: int) -> dict:
    d = dims(mc)
    budget = token_budget(rc, mc, stage, phase)
    T = budget["tokens"]
    chunk = rc.dpo.logit_chunk
    if T is None and phase == "train" and regime == "last_layer":
        # training on cached features: n pairs x H x 4 bytes, known after the data stage (small beside the
        # backbone: 16 KB per pair at H = 4096); at most logit_chunk positions of logits
        budget = {**budget, "basis": budget["basis"].split(";")[0] + f"; cached features, {d['H'] * 4:,} bytes per "
                                                                       f"row, not counted"}
        return {"phase": phase, "activations": 0, "logits": chunk * d["V"] * 4 * LOGIT_FACTOR[phase], "tokens": budget}
    if T is None:
        return {"phase": phase, "activations": None, "logits": None, "tokens": budget}
    eager = rc.model.attn_implementation == "eager"
    A, N = _layer_bytes(d, c_bytes, budget["seq"], eager), _norm_bytes(d, c_bytes)
    if phase == "eval":
        act = T * (A + N)
    elif regime == "last_layer":
        act = T * d["H"] * 4  # features cached by the frozen backbone, fp32
    elif checkpointing:
        act = T * (d["L"] * c_bytes * d["H"] + A + N)
    else:
        act = T * (d["L"] * A + N)
    logits = min(chunk, T) * d["V"] * 4 * LOGIT_FACTOR[phase]
    return {"phase": phase, "activations": act, "logits": logits, "tokens": budget}


def stage_settings(rc: Settings, stage: str) -> dict:
    """What the engine does in a stage: dtype, compute dtype, sharding, regime, optimizer, checkpointing."""
    dpo = rc.dpo
    world = rc.dpo.processes
    parallel = rc.dpo.parallel
    dtype = rc.model.dtype if stage == "sft" else dpo.dtype
    autocast = rc.dpo.autocast
    gc = rc.dpo.gradient_checkpointing
    if gc is None:
        gc = rc.model.source == "pretrained"
    return {
        "dtype": dtype, "compute_dtype": autocast or dtype, "parallel": parallel, "world": world,
        "sharded": parallel == "fsdp" and world > 1,
        "regime": "full" if stage == "sft" else dpo.regime if stage == "dpo" else "frozen",
        "optimizer": rc.sft.optimizer if stage == "sft" else dpo.optimizer,
        "gradient_checkpointing": bool(gc), "device": str(rc.dpo.device),
    }


def uses_engine(rc: Settings, stage: str) -> bool:
    return not (stage == "sft" and rc.sft.target == "none")


def _rank_bytes(tensors, world: int, rank: int, sharded: bool, w_bytes: int, states: int) -> dict:
    size = (lambda s: local_numel(s, world, rank)) if sharded else numel
    params = sum(size(s) for _, s, _, _ in tensors) * w_bytes
    grads = sum(size(s) for _, s, _, t in tensors if t) * w_bytes
    return {"params": params, "grads": grads, "optimizer": states * grads}


def _working(tensors, sharded: bool, same_dtype: bool, c_bytes: int) -> int:
    if sharded:
        per_layer: dict = {}
        root = 0
        for _, s, g, _ in tensors:
            if g == "root":
                root += numel(s)
            else:
                per_layer[g] = per_layer.get(g, 0) + numel(s)
        return (2 * max(per_layer.values(), default=0) + root) * c_bytes
    if same_dtype:
        return 0
    return sum(numel(s) for _, s, _, _ in tensors if len(s) == 2) * c_bytes


def stage_plan(rc: Settings, stage: str, mc: dict | None = None) -> dict:
    """The plan of one stage of one run's config ``rc`` (``run_config``): settings, per-rank bytes, the
    token budgets, the largest rank's terms and total, and the resources."""
    mc = model_config(rc) if mc is None else mc
    d = dims(mc)
    threads = rc.threads.train
    st = stage_settings(rc, stage)
    cuda = st["device"].startswith("cuda")
    if not uses_engine(rc, stage):
        return {"stage": stage, "uses_engine": False, "note": "sft.target none: the base model is the reference",
                "settings": st, "ranks": [], "per_gpu": None, "largest": None, "tokens": {},
                "resources": {"gpus": 0, "mem_mb": HOST_BASE_MB, "cpus": threads}}
    regime = st["regime"]
    lora = rc.dpo.lora if regime == "lora" else None
    if regime == "frozen":
        tensors = [(n, s, g, False) for n, s, g in param_shapes(mc)]
    else:
        tensors = regime_tensors(mc, regime, lora)
    w_bytes, c_bytes = BYTES[st["dtype"]], BYTES[st["compute_dtype"]]
    states = 0 if regime == "frozen" else OPTIMIZER_STATES[st["optimizer"]]
    world, sharded = st["world"], st["sharded"]
    working = _working(tensors, sharded, st["dtype"] == st["compute_dtype"], c_bytes)
    phases = ["eval"] if regime == "frozen" else ["train"] if stage == "sft" else ["train", "eval"]
    passes = [_pass_terms(rc, mc, stage, ph, regime, st["gradient_checkpointing"], c_bytes) for ph in phases]
    unknown = [p for p in passes if p["activations"] is None]
    known = [p for p in passes if p["activations"] is not None]
    peak = max(known, key=lambda p: p["activations"] + p["logits"]) if known else None
    ranks = []
    for r in range(world if sharded else 1):
        b = _rank_bytes(tensors, world, r, sharded, w_bytes, states)
        b.update(working=working, activations=peak["activations"] if peak else 0, logits=peak["logits"] if peak else 0)
        b["total"] = sum(b[k] for k in TERMS)
        ranks.append({"rank": r, **b})
    top = max(ranks, key=lambda x: x["total"])
    largest = max(TERMS, key=lambda k: top[k])
    full = sum(numel(s) for _, s, _, _ in tensors)
    checkpoint = full * w_bytes
    if cuda:
        mem = world * checkpoint / MB + world * HOST_SLACK_MB + HOST_BASE_MB
    else:
        mem = world * max(checkpoint, top["total"]) / MB + world * HOST_SLACK_MB + HOST_BASE_MB
    return {
        "stage": stage, "uses_engine": True, "settings": st,
        "model": {"model_type": d["type"], "parameters": full,
                  "trainable": sum(numel(s) for _, s, _, t in tensors if t)},
        "tokens": {p["phase"]: p["tokens"] for p in passes}, "peak_phase": peak["phase"] if peak else None,
        "unbounded": [p["phase"] for p in unknown],
        "ranks": ranks, "per_gpu": top, "largest": [largest, top[largest]],
        "resources": {"gpus": world if cuda else 0, "mem_mb": int(math.ceil(mem)), "cpus": threads},
    }


STAGES = ("sft", "ref_logps", "dpo")


def plan(rss: dict[str, Settings]) -> dict:
    """Run → stage → ``stage_plan``, for every run's settings (``config.run_settings``)."""
    out = {}
    for run, rc in rss.items():
        mc = model_config(rc)
        out[run] = {stage: stage_plan(rc, stage, mc) for stage in STAGES}
    return out


def tracking_cost(rc: Settings, mc: dict) -> dict:
    """The dpo stage's compute, estimated from the config: training (steps x batch pairs x their tokens x
    3 forwards, 4 with gradient checkpointing) against tracking (the checkpoints after step 0, whose log-probs
    are the reference pass's, x tracked pairs x the tokens of a
    checkpoint pass, one prompt pass per multi-token pair), in forward tokens and FLOPs (2 x the forward's
    parameters per token), and what ``dpo.track: auto`` makes of it. The dpo job decides from the real token
    counts (engine/tracked.py); this says in advance what to expect."""
    from .engine.schedule import eval_schedule
    from .engine.tracked import FLOOR_FLOPS, GOAL, size_of, train_forwards

    dpo, data = rc.dpo, rc.data
    counts = pair_counts(rc)
    n_train, n_test = (counts["train"][0], counts["test"][0]) if counts else (None, None)
    bsz = n_train if dpo.full_batch else dpo.batch_size
    if n_train is None or bsz is None:
        return {"known": False, "note": "pair counts are known after the data stage (the dpo job logs its choice)"}
    steps = math.ceil(dpo.epochs * n_train / bsz) if dpo.epochs else dpo.steps
    checkpoints = len(eval_schedule(dpo.replace(steps=steps)))
    seq, note, upper = seq_len(rc, mc, "dpo")
    single = data.source in ("synthetic", "persona", "gaussian") and not dpo.append_eos
    mp, mr = data.max_prompt_tokens, data.max_response_tokens
    if single:
        train_tok = pass_tok = seq
    elif mp and mr:
        eos = 1 if dpo.append_eos else 0
        train_tok, pass_tok = 2 * (mp + mr + eos), mp + 2 * (mr + eos)
    else:
        train_tok = pass_tok = 2 * seq
    track = dpo.track
    tracked = sum(size_of("all" if isinstance(track, str) else getattr(track, k), n, f"dpo.track.{k}")
                  for k, n in (("train", n_train), ("test", n_test)))
    d = dims(mc)
    params = d["V"] * d["H"] if dpo.regime == "last_layer" else sum(numel(s) for _, s, _ in param_shapes(mc))
    gc = stage_settings(rc, "dpo")["gradient_checkpointing"]
    training = train_forwards(gc) * steps * bsz * train_tok
    tracking = (checkpoints - 1) * tracked * pass_tok  # step 0 takes the reference pass's log-probs
    ratio = tracking / training
    flops = 2 * params * tracking
    if track == "auto":
        auto = ("every pair" if ratio <= GOAL or flops <= FLOOR_FLOPS else
                f"a stratified subset and a log schedule bringing it to {GOAL}")
    else:
        auto = "as configured"
    return {"known": True, "steps": steps, "batch": bsz, "checkpoints": checkpoints, "pairs": n_train + n_test,
            "tracked": tracked, "training_tokens": training, "tracking_tokens": tracking, "ratio": ratio,
            "training_flops": 2 * params * training, "tracking_flops": flops, "auto": auto,
            "tokens_basis": f"{seq} tokens per row ({note})"}


def tracking_lines(rss: dict[str, Settings]) -> list[str]:
    lines = ["tracking cost (dpo.track; forward tokens, 3 forwards per training token, 4 with gradient checkpointing):"]
    basis = set()
    for run, rc in rss.items():
        t = tracking_cost(rc, model_config(rc))
        basis.add(t.get("tokens_basis"))
        if not t["known"]:
            lines.append(f"  {run}: {t['note']}")
            continue
        lines.append(f"  {run}: training {t['steps']} steps x {t['batch']} pairs = {t['training_tokens']:.3g} tokens "
                     f"({t['training_flops']:.2g} FLOPs); tracking {t['checkpoints'] - 1} checkpoints after step 0 x "
                     f"{t['tracked']} of "
                     f"{t['pairs']} pairs = {t['tracking_tokens']:.3g} tokens ({t['tracking_flops']:.2g} FLOPs); "
                     f"ratio {t['ratio']:.3g}; dpo.track {_track(rc.dpo.track)}: {t['auto']}")
    lines += [f"  {b}" for b in sorted(x for x in basis if x)]
    return lines


def _track(track) -> str:
    return track if isinstance(track, str) else str(track.model_dump())


def rule_resources(rc: Settings, stage: str) -> dict:
    """The resources one rule's job asks for: gpus, mem_mb, cpus (for ``resources:`` in the rules)."""
    return stage_plan(rc, stage)["resources"]


def _hint(term: str) -> str:
    return {
        "activations": "lower dpo.max_tokens_per_batch, set data.max_prompt_tokens and data.max_response_tokens, "
                       "or turn on dpo.gradient_checkpointing",
        "logits": "lower dpo.logit_chunk",
        "optimizer": "use more dpo.processes with dpo.parallel fsdp, or dpo.regime lora",
        "params": "use more dpo.processes with dpo.parallel fsdp",
        "grads": "use more dpo.processes with dpo.parallel fsdp, or dpo.regime lora",
        "working": "use dpo.autocast to gather layers in 16 bits",
    }[term]


def check(s: Settings, rss: dict[str, Settings], plans: dict | None = None) -> None:
    """Refuse, before any job, a run whose per-GPU total exceeds ``resources.gpu_mem_gb`` or whose jobs ask
    for more GPUs than ``resources.gpus``."""
    limit, max_gpus = s.resources.gpu_mem_gb, s.resources.gpus
    if limit is None and max_gpus is None:
        return
    plans = plan(rss) if plans is None else plans
    for run, stages in plans.items():
        for stage, p in stages.items():
            gpus = p["resources"]["gpus"]
            if max_gpus is not None and gpus > max_gpus:
                raise ConfigError(f"dpo.processes: run {run}, stage {stage} asks for {gpus} GPUs, more than "
                                  f"resources.gpus={max_gpus}")
            if limit is None or not gpus:
                continue
            if p["unbounded"]:
                basis = p["tokens"][p["unbounded"][0]]["basis"]
                raise ConfigError(f"resources.gpu_mem_gb: run {run}, stage {stage}: the activations cannot be "
                                  f"bounded ({basis})")
            total = p["per_gpu"]["total"]
            if total > limit * GB:
                term, size = p["largest"]
                raise ConfigError(f"resources.gpu_mem_gb: run {run}, stage {stage} needs {total / GB:.1f} GB per GPU, "
                                  f"more than the limit of {limit:g} GB; the largest term is {term} "
                                  f"({size / GB:.1f} GB): {_hint(term)}")


# ---------------------------------------------------------------------------------------------------------
# command line


def merge(base: dict, over: dict) -> dict:
    """Snakemake's merge of config files: dicts are updated key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(files: list[str], default: str | Path = REPO / "config" / "config.yaml") -> dict:
    import yaml

    cfg = yaml.safe_load(Path(default).read_text())
    for f in files:
        cfg = merge(cfg, yaml.safe_load(Path(f).read_text()) or {})
    return normalize(cfg)


def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def table(cfg: Settings, plans: dict) -> str:
    """A plain table: per run and stage, the largest rank's terms in GB, and the resources."""
    first = next(iter(plans.values()))
    eng = next((p for p in first.values() if p["uses_engine"]), None)
    m = cfg.model
    name = m.pretrained.path if m.source == "pretrained" else f"scratch {m.scratch.arch}"
    lines = [f"experiment {cfg.experiment}: {name}"]
    if eng:
        s = eng["settings"]
        sharded = "sharded" if s["sharded"] else "not sharded"
        gc = "on" if s["gradient_checkpointing"] else "off"
        lines.append(f"  {eng['model']['model_type']}, {eng['model']['parameters']:,} parameters; "
                     f"dpo.parallel {s['parallel']} over {s['world']} process(es) on {s['device']} ({sharded}); "
                     f"dpo.regime {cfg.dpo.regime}; weights {s['dtype']}, "
                     f"compute {s['compute_dtype']}; gradient checkpointing {gc}")
    where = "per GPU" if eng is None or eng["settings"]["device"].startswith("cuda") else "per process (host memory)"
    lines.append(f"  {where}: rank 0, the largest rank; GB = 1e9 bytes")
    head = ["run", "stage", "gpus", "params", "grads", "optim", "working", "activ", "logits", "total", "mem_mb",
            "cpus", "largest"]
    rows = [head]
    notes: dict[str, None] = {}
    for run, stages in plans.items():
        for stage, p in stages.items():
            r = p["resources"]
            if not p["uses_engine"]:
                rows.append([run, stage, str(r["gpus"]), "-", "-", "-", "-", "-", "-", "-", str(r["mem_mb"]),
                             str(r["cpus"]), "(no training: sft.target none)"])
                continue
            g = p["per_gpu"]
            total = _gb(g["total"]) + ("+" if p["unbounded"] else "")
            rows.append([run, stage, str(r["gpus"]), _gb(g["params"]), _gb(g["grads"]), _gb(g["optimizer"]),
                         _gb(g["working"]), _gb(g["activations"]), _gb(g["logits"]), total, str(r["mem_mb"]),
                         str(r["cpus"]), p["largest"][0]])
            for phase, t in p["tokens"].items():
                bound = " UPPER BOUND" if t["upper_bound"] else ""
                tok = "unknown" if t["tokens"] is None else f"{t['tokens']:,}"
                notes[f"  {stage} {phase}: T = {tok} tokens{bound}: {t['basis']}"] = None
            if p["unbounded"]:
                phases = ", ".join(p["unbounded"])
                notes[f"  {stage}: '+' = activations of the {phases} pass not bounded, not in the total"] = None
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i in (0, 1, 12) else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("token budgets (padded tokens per micro-batch per process):")
    lines += list(notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpogen.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", action="append", default=[], help="merged over config/config.yaml, in order")
    ap.add_argument("--json", action="store_true", help="the plan as JSON (bytes)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.configfile)
        s = build(cfg)
        rss = {run: run_settings(cfg, run) for run in runs(s)}
        plans = plan(rss)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        tracking = {run: tracking_cost(rc, model_config(rc)) for run, rc in rss.items()}
        print(json.dumps({"experiment": s.experiment, "gb": GB, "runs": plans, "tracking": tracking}, indent=1))
    else:
        print(table(s, plans))
        print("\n".join(tracking_lines(rss)))
    try:
        check(s, rss, plans)
    except ConfigError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
