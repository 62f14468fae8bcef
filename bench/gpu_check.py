"""The GPU check's parts (bench/gpu_check.sh runs them, each in its own process, and says how).

    python  bench/gpu_check.py build   --work W [--cpu] [--q 32] [--test 24]
    torchrun --standalone --nproc_per_node 1 bench/gpu_check.py ref --work W --precision bf16|fp32 [--cpu]
    torchrun --standalone --nproc_per_node 1 bench/gpu_check.py dpo --work W --precision bf16|fp32 --steps 30 [--cpu]
    python  bench/gpu_check.py trl     --work W --precision bf16 --steps 30 [--cpu]
    python  bench/gpu_check.py summary --work W
    python  bench/gpu_check.py pick-wheels WHEEL_DIR REQUIREMENT...   (what gpu_check.sh installs)

Model: SmolLM2-135M's architecture (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab 49152,
tied embeddings, 8192 positions, rope theta 1e5) with seeded random weights, built from a LlamaConfig and
saved with save_pretrained beside a BPE tokenizer trained here on the synthetic persona text. Data: dpogen's
synthetic persona generator, K = 2. dpogen runs under torchrun with one process, so WORLD_SIZE and
MASTER_ADDR are set and the engine wraps the model with FSDP2's fully_shard (per decoder layer, then the
root); bf16 is dpo.autocast: bfloat16 (FSDP's mixed-precision policy: bf16 compute, fp32 master weights).
TRL's DPOTrainer gets the same model, data, batch, beta, learning rate, clipping and bf16 (its bf16=True:
autocast over fp32 weights), with precompute_ref_log_probs=True as dpogen's reference pass.

Each part writes W/result-<part>-<precision>.json; the summary prints the block gpu_check.sh ends with.
``--cpu`` runs the same code paths on the CPU (gloo instead of NCCL; fp32 unless --cpu-bf16) as a dry run.
dpogen is imported from the installed package (the wheel that gpu_check.sh installs), never from src/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
BETA, LR, BATCH, K = 0.1, 1e-5, 16, 2
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.041666,
           "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}


def peak_rss_mib() -> float:
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(hwm.split()[1]) / 1024


def write_result(work: Path, name: str, out: dict) -> None:
    (work / f"result-{name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out), flush=True)


def device_info(cpu: bool) -> dict:
    import torch

    if cpu:
        return {"device": "cpu", "threads": torch.get_num_threads()}
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


class Timer:
    """Wall time of training steps, synchronised with the GPU: marks at each step's start and the last's end."""

    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.begin, self.end = [], None

    def step_begin(self):
        self.sync()
        self.begin.append(time.perf_counter())

    def last_end(self):
        self.sync()
        self.end = time.perf_counter()

    def rates(self, batch: int) -> dict:
        n = len(self.begin)
        total = self.end - self.begin[0]
        out = {"steps_timed": n, "train_s": total, "pairs_per_s": n * batch / total}
        if n > 1:  # without the first step (CUDA kernels and the allocator warm up in it)
            out["pairs_per_s_after_step1"] = (n - 1) * batch / (self.end - self.begin[1])
        return out


# ------------------------------------------------------------------------------------------------ parts


def build(work: Path, a) -> None:
    """Tokenizer, model and data, on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpogen import model as M
    from dpogen.data.stage import validate_pairs
    from dpogen.data.synthetic import SyntheticSpec, corpus, generate

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(n_concepts=16, topic_words=10, stance_words=6, seed=0, stance_pool=16)  # config.yaml's
    tok = M.train_tokenizer(corpus(spec, 64), SMOLLM2["vocab_size"])  # the corpus saturates below 49152 merges
    cfg = LlamaConfig(**SMOLLM2, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    M.seed_everything(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    M.save(model, tok, work / "model")
    train, test = generate(K, a.q, a.test, spec)
    validate_pairs(train, "train").to_parquet(work / "train.parquet")
    validate_pairs(test, "test").to_parquet(work / "test.parquet")
    write_result(work, "build", {"params": n_params, "tokenizer_entries": len(tok), "n_train": len(train),
                                 "n_test": len(test), "seconds": time.perf_counter() - t0, "torch": torch.__version__})


def dpo_cfg(a):
    import yaml

    from dpogen.settings import DPO

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["dpo"]
    cfg.update(steps=a.steps, batch_size=BATCH, beta=BETA, lr=LR, optimizer="adamw", weight_decay=0.0,
               schedule="constant", warmup_steps=0, max_grad_norm=1.0, eval_every=10, eval_steps=[], save_every=0,
               log_every=10, append_eos=True,  # TRL always appends EOS: both score the same tokens
               device="cpu" if a.cpu else "cuda", dtype="float32", autocast=autocast(a), processes=1,
               parallel="fsdp", gradient_checkpointing=False, max_tokens_per_batch=None, geometry_steps=[])
    return DPO.model_validate(cfg)


def autocast(a):
    return "bfloat16" if a.precision == "bf16" and (not a.cpu or a.cpu_bf16) else None


def check_launched():
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise SystemExit("run this part under torchrun --nproc_per_node 1: the engine wraps with FSDP only when "
                         "launched (WORLD_SIZE and MASTER_ADDR set)")


def ref(work: Path, a) -> None:
    """The reference pass, wrapped as training wraps (FSDP, same precision), so step-0 margins are exactly 0."""
    import pandas as pd
    import torch

    from dpogen.reference import compute_reference

    check_launched()
    t0 = time.perf_counter()
    compute_reference(work / "model", pd.read_parquet(work / "train.parquet"), pd.read_parquet(work / "test.parquet"),
                      dpo_cfg(a), work / f"ref-{a.precision}.parquet", work / f"feat-{a.precision}.npy")
    out = {"seconds": time.perf_counter() - t0, "autocast": autocast(a)}
    if not a.cpu:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    write_result(work, f"ref-{a.precision}", out)


def dpo(work: Path, a) -> None:
    """engine.loop.train_dpo as the dpo rule runs it; its steps are timed from the outside (schedule.batch_indices
    starts a step, the last step's margin checkpoint ends the timing), so no checkpoint is counted."""
    import pandas as pd
    import torch

    import dpogen
    from dpogen.engine import loop, schedule

    check_launched()
    timer = Timer(cuda=not a.cpu)
    draw, ckpt = schedule.batch_indices, loop.MarginWriter.__call__

    def timed_draw(step, *args, **kw):
        timer.step_begin()
        return draw(step, *args, **kw)

    def timed_ckpt(self, step):
        if step == a.steps:
            timer.last_end()
        return ckpt(self, step)

    schedule.batch_indices, loop.MarginWriter.__call__ = timed_draw, timed_ckpt
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    name = f"dpo-{a.precision}"
    train, test = pd.read_parquet(work / "train.parquet"), pd.read_parquet(work / "test.parquet")
    info = loop.train_dpo(work / "model", train, test,
                          work / f"ref-{a.precision}.parquet", dpo_cfg(a), 0, work / f"margins-{a.precision}",
                          work / f"metrics-{a.precision}.parquet", work / f"work-{a.precision}",
                          out_info=work / f"run-{a.precision}.json")
    out = {**timer.rates(BATCH), **device_info(a.cpu), "seconds": time.perf_counter() - t0, "autocast": autocast(a),
           "parallel": info["parallel"], "processes": info["processes"], "dpogen_file": dpogen.__file__,
           "dpogen_hash": package_hash(Path(dpogen.__file__).parent)}
    m = pd.read_parquet(work / f"metrics-{a.precision}.parquet")
    k = max(1, min(10, a.steps))  # as TRL logs it: the mean over the last logging interval
    out["final_loss"] = float(m[m["step"] > a.steps - k]["loss"].mean())
    out["step0_reference_check"] = info.get("step0_reference_check")
    out["peak_gpu_mib"] = None if a.cpu else torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mib"] = peak_rss_mib()
    write_result(work, name, out)


def trl_run(work: Path, a) -> None:
    import datasets
    import pandas as pd
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    timer = Timer(cuda=not a.cpu)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.step_begin()

        def on_step_end(self, args, state, control, **kw):
            timer.last_end()

    bf16 = autocast(a) is not None
    tok = AutoTokenizer.from_pretrained(work / "model")
    args = trl.DPOConfig(output_dir=str(work / "trl"), report_to="none", use_cpu=a.cpu, bf16=bf16, fp16=False,
                         gradient_checkpointing=False, beta=BETA, learning_rate=LR, max_steps=a.steps,
                         per_device_train_batch_size=BATCH, disable_tqdm=True, save_strategy="no",
                         logging_steps=max(1, min(10, a.steps)),
                         precompute_ref_log_probs=True, lr_scheduler_type="constant", warmup_steps=0,
                         max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0, seed=0, max_length=1024)
    train = pd.read_parquet(work / "train.parquet")[["prompt", "chosen", "rejected"]]
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = trl.DPOTrainer(model=policy, ref_model=None, args=args, train_dataset=Dataset.from_pandas(train),
                             processing_class=tok, callbacks=[Steps()])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = {**timer.rates(BATCH), **device_info(a.cpu), "seconds": time.perf_counter() - t0, "bf16": bf16,
           "trl": trl.__version__,
           "datasets": datasets.__version__, "transformers": transformers.__version__,
           "mean_loss": float(result.training_loss), "final_loss": float(logs[-1]["loss"]) if logs else None,
           "peak_gpu_mib": None if a.cpu else torch.cuda.max_memory_allocated() / 2**20, "peak_rss_mib": peak_rss_mib()}
    write_result(work, f"trl-{a.precision}", out)


def pick_wheels(wheel_dir: Path, wants: list[str]) -> list[Path]:
    """The wheels of ``wheel_dir`` to install so that ``wants`` (requirement strings) and their dependencies
    are met, given what this interpreter already has: an installed version that satisfies a requirement is
    kept; otherwise the newest compatible wheel that does (its own requirements met the same way, the next
    older one tried when they cannot be). Extras are not followed. Standard library and ``packaging`` only."""
    from importlib import metadata
    import zipfile

    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    tags = set(sys_tags())
    cands: dict[str, list] = {}
    for p in wheel_dir.glob("*.whl"):
        name, ver, _, wtags = parse_wheel_filename(p.name)
        if wtags & tags:
            cands.setdefault(name, []).append((ver, p))
    for v in cands.values():
        v.sort(reverse=True)

    def requires(path: Path) -> list[Requirement]:
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        reqs = [Requirement(x.split(":", 1)[1].strip()) for x in lines if x.startswith("Requires-Dist:")]
        return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]

    def installed(name: str):
        try:
            return Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            return None

    def meet(req: Requirement, chosen: dict) -> dict | None:
        name = canonicalize_name(req.name)
        if name in chosen:
            return chosen if req.specifier.contains(chosen[name][0], prereleases=True) else None
        have = installed(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            return chosen
        for ver, path in cands.get(name, []):
            if not req.specifier.contains(ver, prereleases=True):
                continue
            trial = {**chosen, name: (ver, path)}
            for sub in requires(path):
                trial = meet(sub, trial)
                if trial is None:
                    break
            if trial is not None:
                return trial
        return None

    chosen: dict = {}
    for w in wants:
        chosen = meet(Requirement(w), chosen)
        if chosen is None:
            raise SystemExit(f"{wheel_dir}: cannot meet {w} with the wheels there and what is installed")
    return [path for _, path in chosen.values()]


def package_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def summary(work: Path, a) -> int:
    """The closing block. Returns 1 when a check that must hold fails (step-0 margins not exactly 0)."""
    import numpy as np
    import pandas as pd

    def res(name):
        p = work / f"result-{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    b, d16, d32, t16 = res("build"), res("dpo-bf16"), res("dpo-fp32"), res("trl-bf16")
    lines, bad = [], []

    def fmt(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    def margins(prec):
        p = work / f"margins-{prec}"
        return pd.read_parquet(p)[["step", "split", "sample_id", "margin"]] if p.exists() else None

    m16, m32 = margins("bf16"), margins("fp32")
    step0 = {}
    for prec, m in (("bf16", m16), ("fp32", m32)):
        if m is not None:
            z = m[m["step"] == 0]["margin"].to_numpy()
            step0[prec] = (float(np.abs(z).max()), int((z != 0).sum()), len(z))
            if step0[prec][0] != 0.0:
                bad.append(f"step-0 margins of the {prec} run are not exactly 0")
    diff = None
    if m16 is not None and m32 is not None:
        j = m16.merge(m32, on=["step", "split", "sample_id"], suffixes=("_bf16", "_fp32"))
        j["d"] = (j["margin_bf16"] - j["margin_fp32"]).abs()
        diff = j.groupby("step")["d"].max()
        scale = j.groupby("step")["margin_fp32"].apply(lambda s: s.abs().max())
    dev = (d16 or d32 or {}).get("device") or device_info(a.cpu)["device"]
    lines.append("=" * 78)
    lines.append("GPU CHECK SUMMARY" + ("  (--cpu dry run: CPU, not a GPU measurement)" if a.cpu else ""))
    x = d16 or d32 or {}
    lines.append(f"device: {dev}" + (f"; torch {x['torch']}, CUDA {x['cuda']}, TF32 matmuls {x['tf32_matmul']}"
                                     if "torch" in x else ""))
    if b:
        lines.append(f"model: SmolLM2-135M architecture, {b['params'] / 1e6:.1f}M parameters (tied), random weights; "
                     f"tokenizer {b['tokenizer_entries']} entries; K = {K}: {b['n_train']} train + {b['n_test']} test "
                     f"pairs; batch {BATCH}, beta {BETA}, AdamW lr {LR}")
    if t16:
        lines.append(f"TRL {t16['trl']}, datasets {t16['datasets']}, transformers {t16['transformers']}")
    mem = "peak_rss_mib" if a.cpu else "peak_gpu_mib"  # the dry run has no GPU: its processes' peak RSS
    head = "peak RSS MiB" if a.cpu else "peak GPU MiB"
    lines.append(f"{'run':34s} {'pairs/s':>9s} {'(after step 1)':>15s} {head:>13s} {'loss*':>8s}")
    for name, r in (("dpogen FSDP(1) bf16 autocast", d16), ("TRL DPOTrainer bf16", t16), ("dpogen FSDP(1) fp32", d32)):
        if r is None:
            lines.append(f"{name:34s} missing (part failed or timed out)")
            continue
        lines.append(f"{name:34s} {r['pairs_per_s']:9.1f} {fmt(r.get('pairs_per_s_after_step1')):>15s} "
                     f"{fmt(r.get(mem), '.0f'):>13s} {fmt(r.get('final_loss'), '.4f'):>8s}")
    lines.append("   * mean training loss over the last 10 steps (TRL's last logged value); pairs/s over the training "
                 "steps only, no reference pass or checkpoint")
    if d16 and t16:
        after = [r.get("pairs_per_s_after_step1") for r in (d16, t16)]
        lines.append(f"throughput dpogen bf16 / TRL bf16: {d16['pairs_per_s'] / t16['pairs_per_s']:.2f}x"
                     + (f" (after step 1: {after[0] / after[1]:.2f}x)" if all(after) else ""))
        if d16.get("peak_gpu_mib") and t16.get("peak_gpu_mib"):
            lines.append(f"peak GPU memory dpogen bf16 / TRL bf16: {d16['peak_gpu_mib'] / t16['peak_gpu_mib']:.2f}")
    for prec in ("bf16", "fp32"):
        if prec in step0:
            mx, nz, n = step0[prec]
            lines.append(f"step-0 margins, {prec} run: max |margin| = {mx!r} over {n} pairs ({nz} nonzero)  "
                         f"{'OK (exactly 0)' if mx == 0.0 else 'FAIL (must be exactly 0)'}")
        r = {"bf16": d16, "fp32": d32}[prec]
        check = None if r is None else r.get("step0_reference_check")
        if check is not None:  # the policy at step 0 over 64 pairs against the reference pass (relative)
            ok = check <= 1e-3
            lines.append(f"policy at step 0 against the reference pass, {prec}: largest relative difference "
                         f"{check:.3e}  {'OK (<= 1e-3)' if ok else 'FAIL (> 1e-3)'}")
            if not ok:
                bad.append(f"the {prec} policy at step 0 does not reproduce the reference pass")
    if diff is not None:
        lines.append("largest |margin(bf16) - margin(fp32)| per checkpoint (beside the largest |margin| of fp32):")
        for s, v in diff.items():
            lines.append(f"   step {int(s):4d}: {v:.3e}   (|margin| up to {scale[s]:.3e})")
        lines.append(f"largest over all checkpoints: {diff.max():.3e}")
    if d16:
        here = ROOT / "src" / "dpogen"
        if here.exists() and package_hash(here) != d16["dpogen_hash"]:
            lines.append(f"WARNING: the installed dpogen ({d16['dpogen_file']}) differs from {here}: rebuild the wheel "
                         f"(see gpu_check.sh)")
    lines.extend(f"FAIL: {x}" for x in bad)
    lines.append("=" * 78)
    text = "\n".join(lines)
    print(text)
    (work / "summary.txt").write_text(text + "\n")
    return 1 if bad else 0


def main():
    if sys.argv[1:2] == ["pick-wheels"]:  # gpu_check.sh's install step: no dpogen, trl or torch needed
        for p in pick_wheels(Path(sys.argv[2]), sys.argv[3:]):
            print(p)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["build", "ref", "dpo", "trl", "summary"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--q", type=int, default=32, help="train pairs per cluster (Q)")
    ap.add_argument("--test", type=int, default=24, help="held-out pairs per cluster")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU, fp32")
    ap.add_argument("--cpu-bf16", action="store_true", help="with --cpu: keep bf16 autocast for the bf16 runs")
    a = ap.parse_args()
    work = Path(a.work)
    if a.part != "summary" and not a.cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --cpu for a dry run")
    if a.cpu:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    fn = {"build": build, "ref": ref, "dpo": dpo, "trl": trl_run, "summary": summary}[a.part]
    sys.exit(fn(work, a) or 0)


if __name__ == "__main__":
    main()
