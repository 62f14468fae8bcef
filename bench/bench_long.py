"""Benchmark: long responses (UltraFeedback-like lengths) with a real 32k-row LM head, dpogen against TRL.

Pairs are made here from a seeded generator: prompts of a few dozen words, chosen and rejected responses of
300-1,000 words drawn independently (Zipf-distributed over a 32,000-word vocabulary; a WordLevel tokenizer
makes one word one token, so the lengths are exact). Model: a scratch Llama (hidden 256, 4 layers, untied
32,000-row head). Every measurement runs in its own fresh process (peak RSS = VmHWM of /proc/self/status):

  (a) dpogen: engine.loop.train_dpo, reference log-probs computed beforehand in another process (as the
      workflow's ref_logps rule), gradient checkpointing on, dpo.max_tokens_per_batch, logit_chunk default;
  (b) TRL 1.16 DPOTrainer, precompute_ref_log_probs=True, gradient_checkpointing=True: same model, data,
      batch, beta, steps, learning rate, and max_length (the model's positions, so nothing is truncated);
  (c) dpogen as (a) on pairs whose responses are twice as long, at the same token budget.

Throughput is over the training steps alone (first step's start to last step's end) for both, timed from
the outside: dpogen's from its first batch draw (schedule.batch_indices) to its last margin checkpoint's
start, TRL's from its step callbacks; neither includes a reference pass or a checkpoint. Besides wall
pairs/s the fastest single step and the process CPU time per pair are printed: on a shared 2-core machine
other load moves wall times by several times, and these two move less.

    python bench/bench_long.py [--steps 4] [--long-steps 2] [--batch 8] [--train-pairs 8] [--max-tokens 4096]

(c) runs --long-steps steps (fewer, to keep the whole run near 8 minutes here): the training state is complete
from step 1 on, and the peak after each step of (a) and (c) is printed so the two can be set side by side
at the same step. Every step trains the same 8 pairs (--train-pairs = --batch), so steps cost alike.

Targets printed beside the figures (no assertion): dpogen/TRL peak <= 0.7, dpogen/TRL pairs/s >= 1,
dpogen peak 2x/1x <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BETA = 0.1
LR = 1e-5
VOCAB = 32000
HIDDEN, LAYERS = 256, 4
POSITIONS = 2176  # longest 2x row: 60 prompt + 2,000 response + EOS tokens
ONSETS = list("bdfgklmnprstvz") + ["br", "dr", "gl", "pl", "st", "tr", "sk", "sn", "ch", "sh", "th", "wh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io", "ee"]


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM), MiB: ru_maxrss would count the parent's at fork."""
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(hwm.split()[1]) / 1024


# ------------------------------------------------------------------------------------------------ setup


def words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (2-4 syllables), seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(2, 5))
        w = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] for _ in range(k))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def tokenizer(vocab_words: list[str]):
    """A WordLevel tokenizer over ``vocab_words`` plus EOS, pad and unk: a 32,000-entry vocabulary, one
    token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpogen.model import SPECIAL

    specials = [SPECIAL["eos"], SPECIAL["pad"], "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + vocab_words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                   unk_token="<unk>")


def pairs(vocab_words: list[str], n: int, scale: int, seed: int):
    """``n`` UltraFeedback-like pairs: a prompt of 20-60 words, chosen and rejected of 300-1,000 words each
    (times ``scale``), drawn independently, so they differ in words and length."""
    import numpy as np
    import pandas as pd

    from dpogen.data.stage import validate_pairs

    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(len(vocab_words)) + 2.7)  # Zipf-like word frequencies
    p /= p.sum()
    vw = np.asarray(vocab_words)

    def text(k: int) -> str:
        return " ".join(vw[rng.choice(len(vw), size=k, p=p)])

    rows = []
    for i in range(n):
        prompt = text(int(rng.integers(20, 61)))
        chosen = " " + text(scale * int(rng.integers(300, 1001)))
        rejected = " " + text(scale * int(rng.integers(300, 1001)))
        rows.append({"concept": "ultrafeedback-like", "cluster": 1, "prompt": prompt, "chosen": chosen,
                     "rejected": rejected})
    return validate_pairs(pd.DataFrame(rows), f"generated x{scale}")


def build(folder: Path, n_train: int, n_test: int) -> dict:
    import torch

    from dpogen import model as M
    from dpogen.settings import Scratch

    vw = words(VOCAB - 3)
    tok = tokenizer(vw)
    assert len(tok) == VOCAB, len(tok)
    arch = {"arch": "llama", "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN, "num_layers": LAYERS,
            "num_heads": HIDDEN // 64, "max_position_embeddings": POSITIONS, "tie_word_embeddings": False}
    model = M.build_scratch(Scratch.model_validate(arch), tok, 0)
    M.save(model, tok, folder / "model")
    info = {"params": sum(p.numel() for p in model.parameters()),
            "head_rows": model.get_output_embeddings().weight.shape[0]}
    for scale in (1, 2):
        train = pairs(vw, n_train, scale, seed=10 * scale)
        test = pairs(vw, n_test, scale, seed=10 * scale + 1)
        train.to_parquet(folder / f"train{scale}.parquet")
        test.to_parquet(folder / f"test{scale}.parquet")
        lens = [len(s.split()) for s in list(train["chosen"]) + list(train["rejected"])]
        info[f"x{scale}"] = {"response_words_min": min(lens), "response_words_max": max(lens),
                             "response_words_mean": sum(lens) / len(lens)}
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return info


# ------------------------------------------------------------------------------------------------ children


def dpo_cfg(a):
    import yaml

    from dpogen.settings import DPO

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["dpo"]
    cfg.update(steps=a.steps, batch_size=a.batch, beta=BETA, lr=LR, optimizer="adamw", max_grad_norm=None,
               schedule="constant", eval_every=None, eval_steps=[], save_every=0, log_every=10**6, append_eos=True,
               eval_batch_size=64, gradient_checkpointing=True, max_tokens_per_batch=a.max_tokens,
               eval_max_tokens_per_batch=a.max_tokens, geometry_steps=[])
    return DPO.model_validate(cfg)  # logit_chunk: the default of config.yaml


def child(mode: str, folder: Path, a) -> dict:
    import pandas as pd
    import torch

    torch.set_num_threads(a.threads)
    scale = 2 if mode.endswith("2x") else 1
    train = pd.read_parquet(folder / f"train{scale}.parquet")
    test = pd.read_parquet(folder / f"test{scale}.parquet")
    out: dict = {"mode": mode}
    t0 = time.perf_counter()
    if mode.startswith("ref"):
        from dpogen import reference

        reference.compute_reference(folder / "model", train, test, dpo_cfg(a), folder / f"ref{scale}.parquet",
                                    folder / f"feat{scale}.npy")
    elif mode.startswith("dpogen"):
        steps = a.long_steps if scale == 2 else a.steps
        out.update(dpogen_train(folder, train, test, scale, steps, a))
    elif mode == "trl":
        out.update(trl_train(folder, train, a))
    else:
        raise ValueError(mode)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def dpogen_train(folder: Path, train, test, scale: int, steps: int, a) -> dict:
    """engine.loop.train_dpo as the dpo rule runs it. The training steps are timed from the outside: the
    first step starts at its batch draw (schedule.batch_indices), the last ends where its margin checkpoint
    starts (wall and process CPU time), so neither checkpoint counts, as in TRL's step callbacks."""
    import pandas as pd

    from dpogen.engine import loop, schedule

    marks: dict = {}
    draw, ckpt = schedule.batch_indices, loop.MarginWriter.__call__

    def timed_draw(step, *args, **kw):
        marks.setdefault("begin", (time.perf_counter(), time.process_time()))
        marks.setdefault("starts", []).append(time.perf_counter())
        marks.setdefault("hwm", []).append(peak_rss_mib())  # the peak so far: up to the end of the step before
        return draw(step, *args, **kw)

    def timed_ckpt(self, step):
        if step == steps:
            marks["end"] = (time.perf_counter(), time.process_time())
            marks["hwm"].append(peak_rss_mib())
        return ckpt(self, step)

    schedule.batch_indices, loop.MarginWriter.__call__ = timed_draw, timed_ckpt
    cfg = dpo_cfg(a).replace(steps=steps)
    with tempfile.TemporaryDirectory(dir=folder) as d:
        info = loop.train_dpo(folder / "model", train, test, folder / f"ref{scale}.parquet", cfg, 0, f"{d}/margins",
                              f"{d}/metrics.parquet", f"{d}/work")
        m = pd.read_parquet(f"{d}/metrics.parquet")
    train_s = marks["end"][0] - marks["begin"][0]
    cpu_s = marks["end"][1] - marks["begin"][1]
    edges = marks["starts"] + [marks["end"][0]]
    step_s = [b - a_ for a_, b in zip(edges, edges[1:])]
    return {"steps": steps, "train_s": train_s, "cpu_s": cpu_s, "pairs_per_s": steps * a.batch / train_s,
            "best_step_pairs_per_s": a.batch / min(step_s), "step_s": step_s,
            "peak_after_step_mib": marks["hwm"][1:], "cpu_s_per_pair": cpu_s / (steps * a.batch),
            "loss": float(m[m["step"] == steps]["loss"].iloc[0]),
            "checkpointing": info["gradient_checkpointing"], "logit_chunk": info["logit_chunk"],
            "max_tokens_per_batch": info["max_tokens_per_batch"]}


def trl_train(folder: Path, train, a) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.end.append((time.perf_counter(), time.process_time()))

    tok = AutoTokenizer.from_pretrained(folder / "model")
    args = trl.DPOConfig(output_dir=str(folder / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                         gradient_checkpointing=True, beta=BETA, learning_rate=LR, max_steps=a.steps,
                         per_device_train_batch_size=a.batch, disable_tqdm=True, save_strategy="no",
                         logging_steps=10**6, precompute_ref_log_probs=True, lr_scheduler_type="constant",
                         max_grad_norm=0.0, dataloader_num_workers=0, max_length=POSITIONS, seed=0,
                         weight_decay=0.0, warmup_steps=0)
    cols = ["prompt", "chosen", "rejected"]
    policy = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    timer = StepTimes()
    trainer = trl.DPOTrainer(model=policy, ref_model=None, args=args, train_dataset=Dataset.from_pandas(train[cols]),
                             processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    before = peak_rss_mib()
    result = trainer.train()
    train_s = timer.end[-1][0] - timer.begin[0][0]
    cpu_s = timer.end[-1][1] - timer.begin[0][1]
    step_s = [e[0] - b[0] for b, e in zip(timer.begin, timer.end)]
    return {"steps": len(timer.end), "train_s": train_s, "cpu_s": cpu_s, "pairs_per_s": a.steps * a.batch / train_s,
            "best_step_pairs_per_s": a.batch / min(step_s), "step_s": step_s,
            "cpu_s_per_pair": cpu_s / (a.steps * a.batch), "loss": float(result.training_loss),
            "peak_before_train_mib": before, "trl": trl.__version__}


def run_child(mode: str, folder: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--steps", str(a.steps), "--batch",
           str(a.batch), "--long-steps", str(a.long_steps), "--max-tokens", str(a.max_tokens), "--threads",
           str(a.threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"{mode}: exit {p.returncode}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="training steps of (a) and (b)")
    ap.add_argument("--long-steps", type=int, default=2, help="training steps of (c): its peak is reached by step 2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-pairs", type=int, default=8, help="= batch: every step trains on the same pairs")
    ap.add_argument("--test-pairs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="dpo.max_tokens_per_batch (and eval_max_...)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--child")
    ap.add_argument("--folder")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.folder), a)))
        return
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        info = build(folder, a.train_pairs, a.test_pairs)
        import torch
        import trl

        x1, x2 = info["x1"], info["x2"]
        print(f"Llama hidden {HIDDEN} x {LAYERS} layers, {info['params'] / 1e6:.1f}M parameters, LM head "
              f"{info['head_rows']} x {HIDDEN} (untied); WordLevel vocabulary of {VOCAB} (one word = one token)")
        print(f"{a.train_pairs} train + {a.test_pairs} test pairs; prompts 20-60 tokens; responses "
              f"{x1['response_words_min']}-{x1['response_words_max']} tokens (mean {x1['response_words_mean']:.0f}), "
              f"2x: {x2['response_words_min']}-{x2['response_words_max']} (mean {x2['response_words_mean']:.0f})")
        print(f"batch {a.batch}, {a.steps} steps, beta {BETA}, AdamW lr {LR}, fp32, max_length {POSITIONS} for "
              f"both; dpogen max_tokens_per_batch {a.max_tokens}; torch {torch.__version__}, trl {trl.__version__}, "
              f"{a.threads} threads\n")
        r = {}
        for mode in ("ref-1x", "dpogen-1x", "trl", "ref-2x", "dpogen-2x"):
            r[mode] = run_child(mode, folder, a)
            print(f"   {mode:10s} done in {r[mode]['process_s']:6.1f} s (peak {r[mode]['peak_rss_mib']:.0f} MiB)",
                  flush=True)
    ours, theirs, long_ = r["dpogen-1x"], r["trl"], r["dpogen-2x"]
    mem_ratio = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    rate_ratio = ours["pairs_per_s"] / theirs["pairs_per_s"]
    cpu_ratio = theirs["cpu_s_per_pair"] / ours["cpu_s_per_pair"]
    best_ratio = ours["best_step_pairs_per_s"] / theirs["best_step_pairs_per_s"]
    len_ratio = long_["peak_rss_mib"] / ours["peak_rss_mib"]
    k = min(len(long_["peak_after_step_mib"]), len(ours["peak_after_step_mib"]))  # the same number of steps
    len_ratio_k = long_["peak_after_step_mib"][k - 1] / ours["peak_after_step_mib"][k - 1]

    def verdict(ok):
        return "met" if ok else "MISSED"

    print("\npeak memory (VmHWM of a fresh process, MiB)")
    print(f"   (a) dpogen training, 1x                 {ours['peak_rss_mib']:8.0f}   (its reference pass, own "
          f"process: {r['ref-1x']['peak_rss_mib']:.0f})")
    print(f"   (b) TRL DPOTrainer, precomputed ref     {theirs['peak_rss_mib']:8.0f}   (before train(), i.e. after "
          f"its reference pass: {theirs['peak_before_train_mib']:.0f})")
    print(f"   (c) dpogen training, 2x responses       {long_['peak_rss_mib']:8.0f}   (its reference pass: "
          f"{r['ref-2x']['peak_rss_mib']:.0f})")
    print("training throughput (training steps only; wall pairs/s, and process CPU-seconds per pair)")
    for key, name in (("dpogen-1x", "(a) dpogen, 1x"), ("trl", "(b) TRL, 1x"), ("dpogen-2x", "(c) dpogen, 2x")):
        x = r[key]
        print(f"   {name:38s}{x['pairs_per_s']:8.3f}   {x['steps']} steps in {x['train_s']:6.1f} s (fastest step "
              f"{x['best_step_pairs_per_s']:.3f} pairs/s), {x['cpu_s_per_pair']:6.2f} CPU-s/pair")
    print("ratios")
    print(f"   peak memory dpogen / TRL                {mem_ratio:8.2f}   target <= 0.7: {verdict(mem_ratio <= 0.7)}")
    print(f"   throughput dpogen / TRL (wall)          {rate_ratio:8.2f}   target >= 1:   {verdict(rate_ratio >= 1)}")
    print(f"   throughput dpogen / TRL (fastest steps) {best_ratio:8.2f}   (every step trains the same 8 pairs)")
    print(f"   throughput dpogen / TRL (CPU time)      {cpu_ratio:8.2f}   (less sensitive to other load here)")
    print(f"   dpogen peak 2x / 1x length              {len_ratio:8.2f}   target <= 1.2: {verdict(len_ratio <= 1.2)}")
    print(f"   the same, both after {k} steps             {len_ratio_k:8.2f}   (peak RSS after each step, 1x: "
          + ", ".join(f"{x:.0f}" for x in ours["peak_after_step_mib"]) + "; 2x: "
          + ", ".join(f"{x:.0f}" for x in long_["peak_after_step_mib"]) + ")")
    print(f"   final loss: dpogen {ours['loss']:.4f} (last step), TRL {theirs['loss']:.4f} (mean over steps)")
    load1 = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average at start {load0[0]:.1f}, at end {load1[0]:.1f} "
          f"(1 min; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
