"""The memory plan (dpogen.plan) against the models themselves: parameter shapes against transformers' models
built on the meta device, and per-rank parameter, gradient and AdamW bytes against FSDP2's sharded tensors in
4 CPU processes (gloo). Run as a script, this file is the torchrun worker of that check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpogen import config as C
from dpogen.plan import memory, shapes
from dpogen.config import ConfigError
from dpogen.settings import Scratch, build
from dpogen.settings.sections import Lora

REPO = Path(__file__).resolve().parents[1]
BIG = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama3.1-8b": "meta-llama/Llama-3.1-8B",
       "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3", "qwen3-8b": "Qwen/Qwen3-8B-Base"}
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# odd sizes: dim 0 of 6, 3, 10, 301 rows over 4 ranks leaves ranks with short or empty chunks
ODD_LLAMA = {"model_type": "llama", "hidden_size": 6, "intermediate_size": 10, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 301, "max_position_embeddings": 64,
             "tie_word_embeddings": False}
ODD_GPT2 = {"model_type": "gpt2", "n_embd": 6, "n_layer": 2, "n_head": 2, "n_inner": 10, "n_positions": 33,
            "vocab_size": 301, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}
WORLD = 4


def base_config(**over) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return C.normalize(C.merge(cfg, over))


def pretrained(path: str, **dpo) -> dict:
    return _no_sweep(base_config( model={"source": "pretrained", "pretrained": {"path": path}},
                       sft={"target": "none"}, data={"source": "persona"},
                       dpo={"processes": WORLD, "dtype": "float32", "autocast": "bfloat16", "device": "cuda",
                            "optimizer": "adamw", "batch_size": 128, "max_tokens_per_batch": 4096,
                            "eval_max_tokens_per_batch": 4096, **dpo}))


def typed(cfg: dict):
    """The experiment's settings and each run's, as the Snakefile builds them."""
    s = build(cfg)
    return s, {run: C.run_settings(cfg, run) for run in C.runs(s)}


def _no_sweep(cfg: dict) -> dict:
    cfg["sweep"] = None  # one run, named by the experiment
    return cfg


# ---------------------------------------------------------------------------------------------------------
# the torchrun worker: FSDP2 exactly as the engine wraps, on the meta device

def _cases() -> list[dict]:
    """name, the model's config.json dict, regime, lora settings."""
    out = [{"name": k, "mc": shapes._read_json(shapes.bundled(v)), "regime": "full"} for k, v in BIG.items()]
    out += [{"name": "smollm2-last-layer", "mc": shapes._read_json(shapes.bundled(SMOL)), "regime": "last_layer"},
            {"name": "odd-llama", "mc": ODD_LLAMA, "regime": "full"},
            {"name": "odd-gpt2-lora", "mc": ODD_GPT2, "regime": "lora",
             "lora": {"r": 3, "alpha": 6, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}}]
    return out


def _build(case: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(case["mc"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mc), dtype=torch.float32)
        if case["regime"] == "last_layer":  # dpo.untie_head, then only the head trains
            head, emb = model.get_output_embeddings(), model.get_input_embeddings()
            if head.weight is emb.weight:
                model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=False))
                model.config.tie_word_embeddings = False
            for p in model.parameters():
                p.requires_grad_(False)
            model.get_output_embeddings().weight.requires_grad_(True)
        elif case["regime"] == "lora":
            from peft import LoraConfig, get_peft_model

            lc = case["lora"]
            model = get_peft_model(model, LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                                                     target_modules=lc["target_modules"], bias="none"))
    return model


def _layers(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


def _plan_case(case: dict) -> dict:
    cfg = pretrained("unused", regime=case["regime"], **({"lora": case["lora"]} if "lora" in case else {}))
    return memory.stage_plan(C.run_settings(cfg, cfg["experiment"]), "dpo", case["mc"])


def worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results = {}
    for case in _cases():
        model = _build(case)
        for layer in _layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # what the reduce-scatter leaves: a gradient sharded like its parameter
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(trainable, lr=1e-5)
        opt.step()  # AdamW creates exp_avg and exp_avg_sq like each (meta, sharded) parameter

        def size(t):
            return t.to_local().numel() * t.to_local().element_size()

        measured = {
            "params": sum(size(p) for p in model.parameters()),
            "grads": sum(size(p.grad) for p in trainable),
            "optimizer": sum(size(s[k]) for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")),
            "local": {n: p.to_local().numel() for n, p in model.named_parameters()},
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }
        planned = _plan_case(case)["ranks"][rank]
        results[case["name"]] = {"measured": measured,
                                 "plan": {k: planned[k] for k in ("params", "grads", "optimizer")}}
        if case["regime"] != "lora":  # peft renames the base weights; the totals are compared for it
            tensors = shapes.regime_tensors(case["mc"], case["regime"])
            results[case["name"]]["plan_local"] = {n: shapes.local_numel(s, world, rank) for n, s, _, _ in tensors}
        del model, opt
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    path = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, "--fsdp-worker", str(out)]  # torchrun: one launch for every model
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", [c["name"] for c in _cases()])
def test_fsdp2_sharded_bytes_equal_the_plan(fsdp_results, case):
    """On every rank: the plan's parameter, gradient and optimizer bytes are the sums of the local sizes of
    FSDP2's sharded tensors (fp32 master weights; bf16 only in the all-gather)."""
    for rank, res in enumerate(fsdp_results):
        r = res[case]
        m = r["measured"]
        assert m["dtypes"] == ["torch.float32"], (case, rank)
        for term in ("params", "grads", "optimizer"):
            assert r["plan"][term] == m[term], (case, rank, term, r["plan"][term], m[term])
        if "plan_local" in r:
            assert r["plan_local"] == m["local"], (case, rank)
    # the odd model leaves the last ranks short or empty, as torch.chunk does
    odd = [res["odd-llama"]["measured"]["local"]["model.layers.0.self_attn.k_proj.weight"] for res in fsdp_results]
    assert odd == [6, 6, 6, 0]  # k_proj: 1 kv head x head_dim 3 = 3 rows of 6: chunks of 1 row, rank 3 none
    # rank 0 holds the largest share
    for case_ in fsdp_results[0]:
        assert fsdp_results[0][case_]["measured"]["params"] == max(r[case_]["measured"]["params"] for r in fsdp_results)


# ---------------------------------------------------------------------------------------------------------
# one process: every shape against the model transformers builds


class _Tok:
    def __init__(self, n):
        self.n, self.eos_token_id, self.pad_token_id = n, 0, 1

    def __len__(self):
        return self.n


def _meta_params(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_param_shapes_match_meta_models():
    """The five bundled configs and the scratch llama and gpt2 (built by model.build_scratch): the plan's
    names and shapes are transformers' own, and under ddp (or one process) every rank holds them all."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpogen import model as M

    for hub in [*BIG.values(), SMOL]:
        mc = shapes._read_json(shapes.bundled(hub))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mc))
        want = _meta_params(model)
        assert {n: s for n, s, _ in shapes.param_shapes(mc)} == want, hub
        cfg = pretrained(hub, parallel="ddp")
        p = memory.stage_plan(C.run_settings(cfg, cfg["experiment"]), "dpo", mc)
        n = sum(v.numel() for v in model.parameters())
        assert p["model"]["parameters"] == n
        assert [r["params"] for r in p["ranks"]] == [4 * n] and p["per_gpu"]["optimizer"] == 8 * n
    for arch, tied in (("llama", False), ("gpt2", True)):
        cfg = base_config(model={"scratch": {"arch": arch, "tie_word_embeddings": tied, "vocab_size": 512}})
        mc = shapes.model_config(build(cfg))
        with torch.device("meta"):
            model = M.build_scratch(Scratch.model_validate(cfg["model"]["scratch"]), _Tok(512), seed=0)
        assert {n: s for n, s, _ in shapes.param_shapes(mc)} == _meta_params(model), arch
        p = memory.stage_plan(C.run_settings(cfg, "k1"), "dpo", mc)
        assert p["model"]["parameters"] == sum(v.numel() for v in model.parameters())
        assert p["resources"]["gpus"] == 0  # device cpu


def test_lora_adapters_match_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = shapes._read_json(shapes.bundled(SMOL))
    lora = Lora(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(**mc)),
                               LoraConfig(r=8, lora_alpha=16, target_modules=lora.target_modules))
    trainable = {n.removeprefix("base_model.model."): tuple(p.shape) for n, p in model.named_parameters()
                 if p.requires_grad}
    assert {n: s for n, s, _ in shapes.lora_shapes(shapes.param_shapes(mc), lora)} == trainable
    tensors = shapes.regime_tensors(mc, "lora", lora)
    assert sum(shapes.numel(t[1]) for t in tensors) == sum(p.numel() for p in model.parameters())
    lora = Lora(r=3, target_modules=["c_attn", "c_fc"])  # gpt2's Conv1D, weight (in, out)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(**ODD_GPT2)),
                               LoraConfig(r=3, target_modules=lora.target_modules))
    trainable = {n.removeprefix("base_model.model."): tuple(p.shape) for n, p in model.named_parameters()
                 if p.requires_grad}
    assert {n: s for n, s, _ in shapes.lora_shapes(shapes.param_shapes(ODD_GPT2), lora)} == trainable


@pytest.mark.parametrize("mc", [
    {"model_type": "llama", "hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256},
    {"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300,
     "max_position_embeddings": 256},
    {"model_type": "gpt2", "n_embd": 128, "n_layer": 3, "n_head": 4, "vocab_size": 300, "n_positions": 256,
     "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0},
], ids=lambda mc: mc["model_type"])
def test_activation_estimate_against_saved_tensors(mc):
    """The activation formula against the bytes autograd saves for the backward pass (sdpa attention), in
    fp32 and bf16: within 15% without checkpointing; with it, the kept layer inputs are not underestimated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    B, S = 2, 64
    d = shapes.dims(mc)
    for dtype in (torch.float32, torch.bfloat16):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mc), dtype=dtype,
                                                     attn_implementation="sdpa")
            model.train()
            if ckpt:
                if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved: dict = {}

            def pack(t):
                key = t.untyped_storage().data_ptr()
                if key not in weights:
                    saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
                return t

            ids = torch.randint(0, mc["vocab_size"], (B, S))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model.base_model(input_ids=ids, use_cache=False)
            b = dtype.itemsize
            N = memory._norm_bytes(d, b)
            if ckpt:  # what stays between the forward and the backward pass: each layer's input
                assert B * S * (d["L"] * b * d["H"] + N) >= sum(saved.values())
            else:
                est = B * S * (d["L"] * memory._layer_bytes(d, b, S, False) + N)
                assert 0.85 < est / sum(saved.values()) < 1.15, (dtype, est, sum(saved.values()))


# ---------------------------------------------------------------------------------------------------------
# units


@pytest.mark.parametrize("shape,want", [
    ((5, 4), [8, 8, 4, 0]),  # chunks of 2 rows: the last rank has none
    ((3,), [1, 1, 1, 0]),
    ((2, 7), [7, 7, 0, 0]),
    ((6,), [2, 2, 2, 0]),  # 6 rows over 4: chunks of 2, three chunks only
    ((8, 3), [6, 6, 6, 6]),
    ((0, 5), [0, 0, 0, 0]),
    ((), [1, 0, 0, 0]),
])
def test_local_numel_is_torch_chunk(shape, want):
    import torch

    assert [shapes.local_numel(shape, 4, r) for r in range(4)] == want
    if shape and shape[0]:
        chunks = [c.numel() for c in torch.chunk(torch.empty(shape), 4, dim=0)]
        assert chunks + [0] * (4 - len(chunks)) == want


def test_check_refuses_a_run_over_the_gpu_memory():
    cfg = pretrained(BIG["llama3.1-8b"])
    cfg["resources"] = {"gpu_mem_gb": 30, "gpus": 8}
    with pytest.raises(ConfigError) as e:
        memory.check(*typed(cfg))
    msg = str(e.value)
    assert "run synthetic-persona" in msg and "stage dpo" in msg and "optimizer (16.1 GB)" in msg and "30 GB" in msg
    assert "38.7 GB" in msg
    cfg["resources"]["gpu_mem_gb"] = 60
    memory.check(*typed(cfg))  # 38.7 GB fits


def test_check_refuses_more_processes_than_gpus():
    cfg = pretrained(BIG["mistral-7b-v0.3"])
    cfg["resources"] = {"gpu_mem_gb": None, "gpus": 2}
    with pytest.raises(ConfigError,
                       match=r"dpo.processes: run synthetic-persona, stage ref_logps asks for 4 GPUs.*gpus=2"):
        memory.check(*typed(cfg))
    cfg["dpo"]["device"] = "cpu"  # CPU processes ask for no GPU
    memory.check(*typed(cfg))


def test_check_refuses_unbounded_activations():
    cfg = pretrained(BIG["llama3.1-8b"], batch_size="full", max_tokens_per_batch=None)
    cfg["resources"] = {"gpu_mem_gb": 80, "gpus": None}
    with pytest.raises(ConfigError, match="stage dpo: the activations cannot be bounded.*max_tokens_per_batch"):
        memory.check(*typed(cfg))


def test_model_config_sources(tmp_path):
    cfg = base_config(model={"source": "pretrained", "pretrained": {"path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="model.pretrained.path.*config.json"):
        shapes.model_config(build(cfg))
    cfg["model"]["pretrained"]["gguf_file"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert shapes.model_config(build(cfg))["hidden_size"] == 576
    (tmp_path / "config.json").write_text(json.dumps(ODD_LLAMA))
    assert shapes.model_config(build(cfg)) == ODD_LLAMA
    cfg["model"]["pretrained"] = {"path": "someone/unknown-model"}
    with pytest.raises(ConfigError, match="model.pretrained.path.*someone--unknown-model.json"):
        shapes.model_config(build(cfg))
    with pytest.raises(ConfigError, match="'mamba'"):
        shapes.param_shapes({"model_type": "mamba"})
    g = base_config(data={"source": "gaussian"}, model={"source": "scratch"})
    assert shapes.dims(shapes.model_config(build(g)))["L"] == 0


def ddp_keys(tmp_path):
    """DDP: every process loads the whole checkpoint on the host before moving it to its GPU."""
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"parallel": "ddp"}, "resources": {"gpu_mem_gb": 1000}}))
    return path


def test_hsdp_shards_within_a_node_and_nodes_divide_the_processes():
    """HSDP over 2 nodes x 4 processes holds what FSDP over 4 holds (sharded inside a node), FSDP over 8
    about half of it; a node's share of processes is asked for per node."""
    cfg = pretrained("unused", regime="full")
    cfg["dpo"].update(processes=8, parallel="hsdp")
    cfg["resources"] = {"nodes": 2}
    mc = shapes._read_json(shapes.bundled("meta-llama/Llama-3.1-8B"))
    hsdp = memory.stage_plan(C.run_settings(cfg, cfg["experiment"]), "dpo", mc)
    cfg["dpo"]["parallel"] = "fsdp"
    fsdp8 = memory.stage_plan(C.run_settings(cfg, cfg["experiment"]), "dpo", mc)
    cfg["dpo"]["processes"], cfg["resources"] = 4, {"nodes": 1}
    fsdp4 = memory.stage_plan(C.run_settings(cfg, cfg["experiment"]), "dpo", mc)
    assert hsdp["settings"]["shard_world"] == 4 and fsdp8["settings"]["shard_world"] == 8
    assert hsdp["per_gpu"]["params"] == fsdp4["per_gpu"]["params"]
    assert fsdp8["per_gpu"]["params"] < 0.6 * fsdp4["per_gpu"]["params"]
    assert hsdp["resources"]["nodes"] == 2 and hsdp["resources"]["gpus_per_node"] == 4


def test_cli_prints_the_plan(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"dpo": {"parallel": "fsdp", "gradient_checkpointing": True,
                                            "max_tokens_per_batch": 4096, "eval_max_tokens_per_batch": 4096,
                                            "logit_chunk": 1024}, "resources": {"gpu_mem_gb": 80, "gpus": 4}}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "dpogen.plan", "--configfile",
            str(REPO / "config" / "experiments" / "v5-full-llama3.1-8b.yaml"), "--configfile", str(keys)]
    p = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "total" in p.stdout and "38.70" in p.stdout and "k8" in p.stdout
    j = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    plans = json.loads(j.stdout)["runs"]
    res = plans["k1"]["dpo"]["resources"]
    # each process reads only its shards, straight to its GPU: the host holds no copy of the weights
    assert res["gpus"] == 4 and res["cpus"] == 8 and res["mem_mb"] < 32_000  # less than one fp32 copy of 8B
    assert plans["k1"]["sft"]["resources"]["gpus"] == 0
    ddp = subprocess.run(args + ["--configfile", str(ddp_keys(tmp_path)), "--json"], env=env, capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert json.loads(ddp.stdout)["runs"]["k1"]["dpo"]["resources"]["mem_mb"] > 4 * 32_000  # 4 fp32 copies
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, dpogen.plan; print(sorted(sys.modules))"],
                                         env=env, capture_output=True, text=True).stdout.split("'")


if __name__ == "__main__" and "--fsdp-worker" in sys.argv:
    worker(sys.argv[sys.argv.index("--fsdp-worker") + 1])
