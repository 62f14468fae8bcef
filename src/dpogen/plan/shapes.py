"""The model's shapes for the memory plan: its config.json dict (built from model.scratch, read from a
local folder, or bundled for a hub id or a GGUF file), the tensors it holds per regime, and their shards."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..config import ConfigError
from ..settings import Settings
from ..settings.sections import Lora


REPO = Path(__file__).resolve().parents[3]


MODELS = REPO / "config" / "models"  # bundled config.json of hub models: <owner>--<name>.json


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


CONV1D = ("c_attn", "c_proj", "c_fc")  # gpt2's Conv1D: weight is (in, out)


EMBEDDINGS = ("embed_tokens", "wte", "wpe")


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


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
