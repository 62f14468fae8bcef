"""Benchmark: per-process memory of training state under FSDP2 (dpo.parallel: fsdp) against one process and DDP.

A scratch Llama where parameters dominate (hidden 512, 8 layers, untied 32,000-row head; 66M parameters),
short pairs, AdamW. Each run is a fresh process group (gloo on the CPU):

  1 process      the dpo stage's own pieces, not launched (what dpo.processes: 1 runs);
  2 processes    the same under torchrun, dpo.parallel: fsdp (fully_shard per decoder layer, then the root);
  2 processes    the same under torchrun, dpo.parallel: ddp.

A small driver (this file with --worker) runs the pieces engine.loop.train_dpo runs: engine.parallel.load_for,
loop.prepare_run, policy.Policy (which calls parallel.wrap), training.make_optimizer, then a few steps of
schedule.micro_batches / loop.micro_step / parallel.grad_norm / opt.step. Each process then reports its
local bytes (a DTensor counts its local shard: to_local()) of the trained parameters, their gradients and
the optimizer state, and its peak RSS (VmHWM). Then the whole stage end to end, as the workflow runs it:
train_dpo in one process (run_stage), and dpogen.launch.launch("dpo", ..., processes=2) with fsdp, whose peak
RSS is the largest of the launched processes (getrusage of the children), beside the engine's own log line
"... MB on this process".

Then the load alone: the resident memory each process adds while the model loads (1 process: from_pretrained;
2 processes with FSDP2: built on the meta device, sharded, every process reading its slices of the
safetensors file through torch.distributed.checkpoint's Hugging Face reader).

    python bench/bench_fsdp_memory.py [--steps 3] [--batch 8]

Targets printed (no assertion): 2-process / 1-process parameter + gradient + optimizer bytes per process <= 0.6;
2-process / 1-process load peak per process <= 0.6 (a process that is not the reader) and <= 1.1 (the reader).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from bench_long import VOCAB, peak_rss_mib, tokenizer, words  # noqa: E402

HIDDEN, LAYERS = 512, 8
BETA, LR = 0.1, 1e-5


def rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB."""
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    return int(rss.split()[1]) / 1024


def short_pairs(vocab_words, n: int, seed: int):
    """Pairs with prompts and responses of 20-60 words: activations stay small beside the training state."""
    import numpy as np
    import pandas as pd

    from dpogen.data.stage import validate_pairs

    rng = np.random.default_rng(seed)
    vw = np.asarray(vocab_words)

    def text(k):
        return " ".join(vw[rng.integers(0, len(vw), size=k)])

    rows = [{"concept": "c", "cluster": 1, "prompt": text(int(rng.integers(20, 61))),
             "chosen": " " + text(int(rng.integers(20, 61))), "rejected": " " + text(int(rng.integers(20, 61)))}
            for _ in range(n)]
    return validate_pairs(pd.DataFrame(rows), "generated")


def build(folder: Path, n_train: int, n_test: int) -> int:
    from dpogen import model as M
    from dpogen.settings import Scratch
    from dpogen import reference

    vw = words(VOCAB - 3)
    tok = tokenizer(vw)
    arch = {"arch": "llama", "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN, "num_layers": LAYERS,
            "num_heads": HIDDEN // 64, "max_position_embeddings": 256, "tie_word_embeddings": False}
    model = M.build_scratch(Scratch.model_validate(arch), tok, 0)
    M.save(model, tok, folder / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    train, test = short_pairs(vw, n_train, 1), short_pairs(vw, n_test, 2)
    train.to_parquet(folder / "train.parquet")
    test.to_parquet(folder / "test.parquet")
    reference.compute_reference(folder / "model", train, test, dpo_cfg(1, 8), folder / "ref.parquet",
                                folder / "feat.npy")
    return n_params


def dpo_cfg(steps: int, batch: int, parallel: str = "fsdp"):
    import yaml

    from dpogen.settings import DPO

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["dpo"]
    cfg.update(steps=steps, batch_size=batch, beta=BETA, lr=LR, optimizer="adamw", weight_decay=0.0,
               max_grad_norm=1.0, eval_every=None, eval_steps=[], save_every=0, log_every=10**6, append_eos=True,
               eval_batch_size=64, geometry_steps=[], parallel=parallel, gradient_checkpointing=False)
    return DPO.model_validate(cfg)


# ------------------------------------------------------------------------------------------------ driver


def worker(folder: Path, steps: int, batch: int, parallel: str, out_dir: Path) -> None:
    """The training pieces of engine.loop.train_dpo in this process (one of the launched ones, or alone);
    prints this process's local bytes of parameters, gradients and optimizer state, and its peak RSS."""
    import numpy as np
    import pandas as pd
    import torch

    from dpogen import model as M
    from dpogen.engine import loop
    from dpogen.engine import schedule as S
    from dpogen.parallel import Dist, grad_norm, is_fsdp, load_for, local_bytes
    from dpogen.engine.policy import Policy
    from dpogen.training import make_optimizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    phases = {"imports": rss_mib()}
    cfg = dpo_cfg(steps, batch, parallel)
    dist = Dist(cfg.device)
    M.seed_everything(0)
    model, tok = load_for(folder / "model", cfg, dist)
    phases["load (peak)"] = peak_rss_mib()
    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    run, cfg = loop.prepare_run(train, test, tok, model, folder / "ref.parquet", None, cfg)
    policy = Policy(model, run.enc, cfg, dist)
    del model
    params = policy.trainable()
    phases["wrapped (now)"] = rss_mib()
    opt = make_optimizer(cfg.optimizer, params.values(), cfg.lr, cfg.weight_decay)
    device = next(policy.model.parameters()).device
    ref_t = torch.tensor(run.ref, device=device)
    n_tokens = torch.tensor(run.enc.n_tokens, device=device)
    pair_tokens = np.array([max(len(run.enc.rows[r]) for r in rows) for rows in run.enc.pair_rows])
    rows_per_pair = np.array([len(rows) for rows in run.enc.pair_rows])
    policy.model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(run.steps):
        idx = S.batch_indices(step, run.n_train, run.bsz, 0)
        opt.zero_grad(set_to_none=True)
        stats = np.zeros(len(loop.STAT_NAMES))
        for mb in S.micro_batches(idx, pair_tokens, rows_per_pair, dist.world, cfg.grad_accum,
                                  cfg.max_tokens_per_batch):
            stats += loop.micro_step(policy, mb[dist.rank::dist.world], ref_t, n_tokens, cfg, dist.world / len(idx))[0]
        losses.append(float(dist.sum(stats)[0] / len(idx)))
        grad_norm(params.values(), cfg.max_grad_norm)
        opt.step()
        if step == 0:
            phases["step 1 (peak)"] = peak_rss_mib()
    train_s = time.perf_counter() - t0
    # the gradients of the last step are still there (zero_grad comes at the start of a step)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    out = {"rank": dist.rank, "world": dist.world, "parallel": parallel if dist.enabled else "none",
           "fsdp": is_fsdp(policy.model), "params_b": local_bytes(params.values()),
           "grads_b": local_bytes(p.grad for p in params.values() if p.grad is not None),
           "optim_b": local_bytes(state), "peak_rss_mib": peak_rss_mib(), "train_s": train_s, "loss": losses[-1],
           "n_params": int(sum(p.numel() for p in params.values())), "phases": phases}
    dist.barrier()
    dist.close()
    (out_dir / f"rank{dist.rank}.json").write_text(json.dumps(out))  # ranks print at once: one file each


def load_worker(folder: Path, out_dir: Path) -> None:
    """Only the load of the bf16 checkpoint into fp32 weights (a hub checkpoint under dpo.dtype float32): the
    peak resident memory this process adds from load_for to the weights in place (sharded when launched),
    every weight touched (VmHWM, reset through /proc/self/clear_refs once the modules and the tokenizer are
    in: what both paths import is not counted)."""
    import torch

    import transformers.models.llama.modeling_llama  # noqa: F401
    from dpogen import model as M
    from dpogen.parallel import Dist, load_for, local_bytes, wrap

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = dpo_cfg(1, 8, "fsdp")
    dist = Dist(cfg.device)
    ckpt = folder / "model-bf16"
    M.load_tokenizer(ckpt)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from now
    before = rss_mib()
    t0 = time.perf_counter()
    model, _ = load_for(ckpt, cfg, dist)
    model = wrap(model, cfg, dist)
    with torch.no_grad():  # every weight read once (a lazily mapped one is brought in)
        check = sum(float((p.to_local() if hasattr(p, "to_local") else p).double().sum()) for p in model.parameters())
    seconds = time.perf_counter() - t0
    out = {"rank": dist.rank, "world": dist.world, "before_mib": before, "peak_mib": peak_rss_mib(),
           "load_mib": peak_rss_mib() - before, "held_mib": local_bytes(model.parameters()) / 2**20, "s": seconds,
           "dtype": str(next(model.parameters()).dtype), "check": check}
    dist.barrier()
    dist.close()
    (out_dir / f"rank{dist.rank}.json").write_text(json.dumps(out))


def e2e(folder: Path, steps: int, batch: int, processes: int, out_dir: Path) -> None:
    """The dpo stage end to end as the workflow runs it: in this process (1) or launched (> 1)."""
    import logging

    from dpogen.launch import launch, run_stage
    from dpogen.training import setup_logging

    with tempfile.TemporaryDirectory(dir=folder) as d:
        job = {"ref_path": str(folder / "model"), "train": str(folder / "train.parquet"),
               "test": str(folder / "test.parquet"), "ref_logps_path": str(folder / "ref.parquet"),
               "cfg": dpo_cfg(steps, batch).replace(processes=processes), "seed": 0, "out_margins": f"{d}/margins",
               "out_metrics": f"{d}/metrics.parquet", "work_dir": f"{d}/work", "out_info": f"{d}/run.json"}
        log_path = f"{d}/log.txt"
        t0 = time.perf_counter()
        if processes == 1:
            import torch

            torch.set_num_threads(2)
            setup_logging(log_path)
            logging.getLogger("dpogen").setLevel(logging.INFO)
            run_stage("dpo", job)
            peak = peak_rss_mib()
        else:
            launch("dpo", job, processes, log_path=log_path, threads=max(1, 2 // processes))
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest launched process
        wall = time.perf_counter() - t0
        text = Path(log_path).read_text()
        info = json.loads(Path(f"{d}/run.json").read_text())
    m = re.search(r"\(([\d.]+) MB on this process\)", text)
    (out_dir / "rank0.json").write_text(json.dumps({"processes": processes, "peak_rss_mib": peak, "wall_s": wall,
                                                    "logged_mb": float(m.group(1)) if m else None,
                                                    "parallel": info["parallel"]}))


def run(cmd: list[str], threads: int, out_dir: Path) -> list[dict]:
    """``cmd`` with ``--out out_dir``; the results its processes wrote there, one per rank."""
    out_dir.mkdir(parents=True)
    cmd = cmd + ["--out", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}")
    return [json.loads(f.read_text()) for f in sorted(out_dir.glob("rank*.json"))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker", choices=["fsdp", "ddp"])
    ap.add_argument("--e2e", type=int, metavar="PROCESSES")
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--folder")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.folder), a.steps, a.batch, a.worker, Path(a.out))
    if a.load:
        return load_worker(Path(a.folder), Path(a.out))
    if a.e2e:
        return e2e(Path(a.folder), a.steps, a.batch, a.e2e, Path(a.out))
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        n_params = build(folder, 4 * a.batch, a.batch)
        import torch

        from dpogen import model as M

        m, t = M.load(folder / "model", "bfloat16")  # the checkpoint as the hub ships it: bf16
        M.save(m, t, folder / "model-bf16")
        del m

        print(f"Llama hidden {HIDDEN} x {LAYERS} layers, untied {VOCAB}-row head: {n_params / 1e6:.1f}M parameters "
              f"({n_params * 4 / 2**20:.0f} MiB fp32); AdamW; {4 * a.batch} train pairs of 20-60 + 20-60 tokens; "
              f"batch {a.batch}, {a.steps} steps; gloo on the CPU, torch {torch.__version__}\n")
        me = [__file__, "--folder", str(folder), "--steps", str(a.steps), "--batch", str(a.batch)]
        py = [sys.executable]
        tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        res = {"1": run(py + me + ["--worker", "fsdp"], 2, folder / "r1"),  # not launched: no wrapping
               "fsdp2": run(tr + me + ["--worker", "fsdp"], 1, folder / "r-fsdp2"),
               "ddp2": run(tr + me + ["--worker", "ddp"], 1, folder / "r-ddp2")}
        loads = {"1": run(py + me + ["--load"], 2, folder / "l1"), "2": run(tr + me + ["--load"], 1, folder / "l2")}
        ends = {"1": run(py + me + ["--e2e", "1"], 2, folder / "e1")[0],
                "2": run(py + me + ["--e2e", "2"], 1, folder / "e2")[0]}

    def state(r):
        return r["params_b"] + r["grads_b"] + r["optim_b"]

    base = state(res["1"][0])
    print("per process: trained parameters + gradients + optimizer state (local shards, MiB), peak RSS (MiB)")
    print(f"   {'run':22s} {'rank':>4s} {'params':>8s} {'grads':>8s} {'AdamW':>8s} {'total':>8s} {'ratio':>6s} "
          f"{'peak RSS':>9s} {'ratio':>6s}")
    base_rss = res["1"][0]["peak_rss_mib"]
    for key, name in (("1", "1 process"), ("fsdp2", "2 processes, FSDP2"), ("ddp2", "2 processes, DDP")):
        for r in sorted(res[key], key=lambda r: r["rank"]):
            mib = [x / 2**20 for x in (r["params_b"], r["grads_b"], r["optim_b"], state(r))]
            print(f"   {name:22s} {r['rank']:4d} {mib[0]:8.1f} {mib[1]:8.1f} {mib[2]:8.1f} {mib[3]:8.1f} "
                  f"{state(r) / base:6.2f} {r['peak_rss_mib']:9.0f} {r['peak_rss_mib'] / base_rss:6.2f}")
    fsdp = max(state(r) for r in res["fsdp2"]) / base
    ddp = max(state(r) for r in res["ddp2"]) / base
    print("   RSS of rank 0 along the run (MiB): after imports / peak after loading the model / after wrapping / "
          "peak after step 1 / peak")
    for name, r in (("1 process", res["1"][0]), ("FSDP2", res["fsdp2"][0]), ("DDP", res["ddp2"][0])):
        steps = " / ".join(f"{v:6.0f}" for v in r["phases"].values())
        print(f"   {name:22s} {steps} / {r['peak_rss_mib']:6.0f}")
    print(f"\n   FSDP2, 2 processes / 1 process, parameters + optimizer state per process: {fsdp:.2f}   target <= 0.6: "
          f"{'met' if fsdp <= 0.6 else 'MISSED'}")
    print(f"   DDP,   2 processes / 1 process, the same:                                 {ddp:.2f}")
    print("\nend to end (train_dpo; 1 process in-process, 2 processes launched with accelerate, FSDP2)")
    for k in ("1", "2"):
        e = ends[k]
        print(f"   {k} process(es): peak RSS of the largest process {e['peak_rss_mib']:6.0f} MiB; engine log: "
              f"{e['logged_mb']} MB of trainable parameters on a process; {e['wall_s']:.1f} s")
    print(f"   peak RSS ratio 2 / 1: {ends['2']['peak_rss_mib'] / ends['1']['peak_rss_mib']:.2f}")
    print("\nloading a bf16 checkpoint into fp32 weights (1 process: from_pretrained; 2 processes, FSDP2: built on "
          "the meta device, sharded, each process reading its slices of the safetensors file): peak resident memory "
          "the load adds, MiB")
    one = loads["1"][0]["load_mib"]
    for k in ("1", "2"):
        for r in sorted(loads[k], key=lambda r: r["rank"]):
            print(f"   {k} process(es), rank {r['rank']}: peak {r['load_mib']:7.1f} (ratio {r['load_mib'] / one:.2f}); "
                  f"holds {r['held_mib']:6.1f} of weights after; {r['s']:.2f} s")
    worst = max(r["load_mib"] for r in loads["2"]) / one
    sums = {round(r["check"], 3) for r in loads["1"]}
    print(f"   weights equal: 1-process sum {sums.pop():.3f}, 2-process sum of shards "
          f"{sum(r['check'] for r in loads['2']):.3f}")
    print(f"   every process reads its own part (no reader holds a full copy): largest 2-process load peak / "
          f"1-process: {worst:.2f}   goal <= 0.6 (non-reader) and <= 1.1 (reader): "
          f"{'met' if worst <= 0.6 else 'MISSED'}")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
