"""The training engine at scale: FSDP2 and DDP against one process, token budgets and chunked logits
against one pass, resume of a killed 2-process FSDP job, sequences longer than the model."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dpogen import model as M
from dpogen import reference, tables
from dpogen.config import ConfigError, check_engine
from dpogen.settings import DPO, SFT, Data, build
from dpogen.data.stage import validate_pairs
from dpogen.engine import loop, schedule
from dpogen.logprobs import EncodingError, encode_pairs, pair_logps, row_batches
from dpogen.data.synthetic import generate
from tests.conftest import REPO, kill_at_checkpoint

SRC = REPO / "src"
MARGIN_COLS = ["logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected", "margin"]


@pytest.fixture
def run10(reference_run):
    """10 steps of batch 4 on the shared starting point (conftest.reference_run)."""
    train, test, cfg = reference_run
    return train, test, cfg.replace(steps=10, batch_size=4, eval_every=5, save_every=0, log_every=5)


def job(tmp_path, model_dir, cfg, name):
    out = tmp_path / name
    return {"ref_path": str(model_dir), "train": str(tmp_path / "train.parquet"),
            "test": str(tmp_path / "test.parquet"),
            "ref_logps_path": str(tmp_path / "ref.parquet"), "cfg": cfg, "seed": 7,
            "out_margins": str(out / "margins"), "out_metrics": str(out / "metrics.parquet"),
            "work_dir": str(out / "work"), "out_info": str(out / "run.json"),
            "out_batch_margins": str(out / "batch_margins.parquet")}


def one_process(tmp_path, model_dir, run, name, **over):
    train, test, cfg = run
    j = job(tmp_path, model_dir, cfg.replace(**over), name)
    loop.train_dpo(model_dir, train, test, j["ref_logps_path"], j["cfg"], 7, j["out_margins"], j["out_metrics"],
                   j["work_dir"], out_info=j["out_info"], out_batch_margins=j["out_batch_margins"])
    return tables.read_margins(j["out_margins"])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_give_the_same_margins_as_one(tmp_path, tiny_model_dir, run10, parallel):
    """Global-batch mean semantics: 2 CPU processes (gloo, accelerate launch) and 1 agree within 1e-5
    over the first 10 steps, with gradient checkpointing on in both."""
    from dpogen.launch import launch

    one = one_process(tmp_path, tiny_model_dir, run10, "one", gradient_checkpointing=True)
    j = job(tmp_path, tiny_model_dir, run10[2].replace(processes=2, parallel=parallel, gradient_checkpointing=True),
            "two")
    launch("dpo", j, 2)
    two = tables.read_margins(j["out_margins"])
    info = json.loads(open(j["out_info"]).read())
    assert info["processes"] == 2 and info["parallel"] == parallel and info["gradient_checkpointing"]
    pd.testing.assert_frame_equal(one.drop(columns=MARGIN_COLS), two.drop(columns=MARGIN_COLS))
    np.testing.assert_allclose(two["margin"], one["margin"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(two["logp_chosen"], one["logp_chosen"], atol=1e-5, rtol=0)
    assert (two.loc[two["step"] == 10, "margin"] != 0).all()
    # the in-batch margins: every pair of each global batch once, gathered from both processes
    b1 = pd.read_parquet(tmp_path / "one" / "batch_margins.parquet")
    b2 = pd.read_parquet(j["out_batch_margins"])
    pd.testing.assert_frame_equal(b1[["step", "sample_id"]], b2[["step", "sample_id"]])
    assert len(b2) == 10 * 4 and not b2.duplicated(["step", "sample_id"]).any()
    np.testing.assert_allclose(b2["margin"], b1["margin"], atol=1e-5, rtol=0)


def test_token_budget_and_logit_chunks_keep_the_margins(tmp_path, tiny_model_dir, run10):
    """Micro-batches sized by tokens (gradients accumulated), chunked logits and token-budgeted checkpoint
    passes change only the order of float operations."""
    base = one_process(tmp_path, tiny_model_dir, run10, "base")
    small = one_process(tmp_path, tiny_model_dir, run10, "small", max_tokens_per_batch=24, logit_chunk=3,
                        eval_max_tokens_per_batch=40)
    np.testing.assert_allclose(small["margin"], base["margin"], atol=1e-5, rtol=0)
    # token-sized micro-batches (gradients accumulated) record each pair of the batch once
    b0 = pd.read_parquet(tmp_path / "base" / "batch_margins.parquet").sort_values(["step", "sample_id"])
    b1 = pd.read_parquet(tmp_path / "small" / "batch_margins.parquet").sort_values(["step", "sample_id"])
    assert b1["sample_id"].tolist() == b0["sample_id"].tolist() and len(b1) == 40
    np.testing.assert_allclose(b1["margin"], b0["margin"], atol=1e-5, rtol=0)


def test_micro_batches_hold_the_budget():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=50)
    rows = np.full(50, 2)
    idx = rng.permutation(50)[:32]
    for world in (1, 2, 3):
        mbs = schedule.micro_batches(idx, tokens, rows, world, max_tokens=200)
        assert sorted(np.concatenate(mbs).tolist()) == sorted(idx.tolist())  # every pair once
        for mb in mbs:
            for r in range(world):
                share = mb[r::world]
                if len(share) > 1:
                    assert 2 * len(share) * tokens[share].max() <= 200
    # without a budget: grad_accum equal parts in batch order
    assert [len(m) for m in schedule.micro_batches(idx, tokens, rows, 1, accum=4)] == [8] * 4


def test_row_batches_deal_rows_to_every_process():
    lengths = np.array([30, 10, 20, 5, 25, 15])
    passes = row_batches(lengths, max_rows=None, max_tokens=50, world=2)
    assert sorted(np.concatenate(passes).tolist()) == list(range(6))
    for p in passes:
        for r in range(2):
            share = p[r::2]
            assert len(share) == 0 or len(share) * lengths[share].max() <= 50 or len(share) == 1


def test_chunked_logits_give_the_same_values_and_gradients(tiny, spec):
    model, tok = tiny
    train, _ = generate(2, 3, 1, spec)
    enc = encode_pairs(tok, train["prompt"], [c + " and more words here" for c in train["chosen"]],
                       list(train["rejected"]), append_eos=True)
    grads = []
    for chunk in (10_000, 3):
        model.zero_grad()
        lp = pair_logps(model, enc, logit_chunk=chunk)
        lp.sum().backward()
        grads.append((lp.detach(), model.get_output_embeddings().weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


def test_every_forward_pass_runs_without_kv_cache(tiny, spec):
    model, tok = tiny
    seen = []
    real = model.forward

    def spy(*a, **kw):
        seen.append(kw.get("use_cache"))
        return real(*a, **kw)

    model.forward = spy
    train, _ = generate(1, 2, 1, spec)
    enc = encode_pairs(tok, train["prompt"], train["chosen"], train["rejected"], append_eos=True)
    pair_logps(model, enc, batch_rows=1)
    assert seen and all(v is False for v in seen)


def test_a_sequence_longer_than_the_model_is_refused(tiny):
    model, tok = tiny
    n = M.positions(model)
    with pytest.raises(EncodingError, match=rf"pairs: row 1: \d+ tokens, more than the model's {n} positions"):
        encode_pairs(tok, ["Is it?\n", "Is it?\n"], [" Yes", " word" * (n + 5)], [" No", " No"], append_eos=False,
                     max_length=n)


def test_engine_settings_are_checked_before_any_job():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cases = [({"dtype": "float16"}, "dpo.dtype: float16"), ({"autocast": "float16"}, "dpo.autocast: float16"),
             ({"regime": "last_layer", "processes": 2}, "dpo.processes: 2 with dpo.regime: last_layer"),
             ({"max_tokens_per_batch": 64, "grad_accum": 2}, "dpo.grad_accum"),
             ({"device": "cuda", "processes": 8}, "dpo.processes: 8 GPUs asked for, but resources.gpus allows 4"),
             ({"processes": 3}, "dpo.processes: 3 cannot be split evenly over resources.nodes: 2"),
             ({"processes": 8, "batch_size": 4}, "dpo.batch_size: 4 pairs cannot be split over 8 processes"),
             ({"device": "cuda", "processes": 4}, "resources.gpus_per_node: 1, but dpo.processes 4 over "
                                                  "resources.nodes 2 puts 2 on each node")]
    for over, needle in cases:
        res = {"gpus": 4, "gpu_mem_gb": None, "nodes": 2, "gpus_per_node": 1 if "gpus_per_node" in needle else None}
        rc = build({**base, "dpo": {**base["dpo"], **over}, "resources": res})
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            check_engine(rc, "k1")


def _launch_cmd(job_file):
    from dpogen.launch import accelerate_command

    return accelerate_command(str(job_file), 2)


@pytest.mark.slow  # a kill and a relaunch of 2 processes, 120 steps: about 40 s (the workflow's resume tests too)
def test_killed_two_process_fsdp_job_resumes_to_identical_tables(tmp_path, tiny_model_dir, run10):
    """Each rank saves its shard with torch.distributed.checkpoint; SIGKILL of the whole job, then a new
    launch, ends with the tables of an uninterrupted 2-process run, bit for bit."""
    from dpogen.launch import job_record, launch

    cfg = run10[2].replace(processes=2, parallel="fsdp", steps=120, save_every=10, eval_every=40)
    full = job(tmp_path, tiny_model_dir, cfg, "full")
    launch("dpo", full, 2)
    killed = job(tmp_path, tiny_model_dir, cfg, "killed")
    job_file = tmp_path / "killed.json"
    job_file.write_text(json.dumps(job_record("dpo", killed)))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_launch_cmd(job_file), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    meta = tmp_path / "killed" / "work" / "save" / "meta.pt"
    deadline = time.time() + 300
    while not meta.exists():
        assert proc.poll() is None, "the job ended before its first save"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(killed["out_metrics"])
    saved = torch.load(meta, weights_only=False)
    assert 0 < saved["step"] < cfg.steps and saved["world"] == 2
    shards = list((tmp_path / "killed" / "work" / "save").glob("*.distcp"))
    assert len(shards) == 2  # one file per rank: no rank wrote the full state
    launch("dpo", killed, 2)
    a, b = tables.read_margins(full["out_margins"]), tables.read_margins(killed["out_margins"])
    pd.testing.assert_frame_equal(a, b)
    ma, mb = pd.read_parquet(full["out_metrics"]), pd.read_parquet(killed["out_metrics"])
    cols = [c for c in ma.columns if c not in ("pairs_per_s", "elapsed_s")]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])
    pd.testing.assert_frame_equal(pd.read_parquet(full["out_batch_margins"]),
                                  pd.read_parquet(killed["out_batch_margins"]))


def test_a_save_of_one_process_resumes_on_two(tmp_path, tiny_model_dir, run10, monkeypatch):
    """A save written by 1 process, resumed with dpo.processes 2: DCP reshards it, the log says so, and the
    tables equal an uninterrupted 1-process run's within 1e-5 (the same global batches)."""
    from dpogen.launch import launch

    cfg = run10[2].replace(save_every=5)
    whole = one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "whole")
    kill_at_checkpoint(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "w")
    j = job(tmp_path, tiny_model_dir, cfg.replace(processes=2), "w")
    log = tmp_path / "launch.log"
    launch("dpo", j, 2, log_path=str(log))
    text = log.read_text()
    assert "resuming a save of 1 processes on 2" in text and "resuming from step" in text
    resumed = tables.read_margins(j["out_margins"])
    pd.testing.assert_frame_equal(whole.drop(columns=MARGIN_COLS), resumed.drop(columns=MARGIN_COLS))
    np.testing.assert_allclose(resumed["margin"], whole["margin"], atol=1e-5, rtol=0)


def test_sft_and_reference_pass_on_two_processes(tmp_path, tiny_model_dir, run10):
    """SFT and the reference pass use the same engine: 2 FSDP processes give one process's results."""
    from dpogen.launch import launch

    train, test, cfg = run10
    sft_cfg = SFT(steps=4, batch_size=4, warmup_steps=0, log_every=2)
    from dpogen.sft import train_sft

    train_sft(tiny_model_dir, train, sft_cfg, tmp_path / "sft1", 0, engine=cfg.replace(processes=1))
    launch("sft", {"base": str(tiny_model_dir), "train": str(tmp_path / "train.parquet"), "cfg": sft_cfg,
                   "out": str(tmp_path / "sft2"), "seed": 0, "engine": cfg.replace(processes=2, parallel="fsdp")}, 2)
    a, _ = M.load(tmp_path / "sft1")
    b, _ = M.load(tmp_path / "sft2")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=name)
    launch("ref", {"ref_path": str(tmp_path / "sft1"), "train": str(tmp_path / "train.parquet"),
                   "test": str(tmp_path / "test.parquet"), "cfg": cfg.replace(processes=2, eval_batch_size=3),
                   "out_logps": str(tmp_path / "r2.parquet"), "out_features": str(tmp_path / "f2.npy")}, 2)
    reference.compute_reference(tmp_path / "sft1", train, test, cfg, tmp_path / "r1.parquet", tmp_path / "f1.npy")
    r1, r2 = pd.read_parquet(tmp_path / "r1.parquet"), pd.read_parquet(tmp_path / "r2.parquet")
    pd.testing.assert_series_equal(r1["sample_id"], r2["sample_id"])
    np.testing.assert_allclose(r2["ref_logp_chosen"], r1["ref_logp_chosen"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "f2.npy"), np.load(tmp_path / "f1.npy"), atol=1e-5, rtol=0)


def test_a_tied_model_is_read_into_its_shards_and_the_reference_holds_the_compute_dtype(tmp_path, tiny_gpt2_dir,
                                                                                        run10):
    """GPT-2 with its head tied to the embeddings, built empty and read into 2 FSDP2 processes' shards: the
    reference log-probs equal the one-process pass's; under dpo.autocast bfloat16 the sharded reference pass
    holds bf16 shards (it says so) and agrees with one process under torch.autocast to bf16 rounding."""
    from dpogen.launch import launch

    train, test, cfg = run10
    for name, c in (("fp32", cfg), ("bf16", cfg.replace(autocast="bfloat16"))):
        reference.compute_reference(tiny_gpt2_dir, train, test, c, tmp_path / f"{name}1.parquet", tmp_path / "f1.npy")
        log = tmp_path / f"{name}.log"
        launch("ref", {"ref_path": str(tiny_gpt2_dir), "train": str(tmp_path / "train.parquet"),
                       "test": str(tmp_path / "test.parquet"), "cfg": c.replace(processes=2),
                       "out_logps": str(tmp_path / f"{name}2.parquet"), "out_features": str(tmp_path / "f2.npy")}, 2,
               log_path=str(log))
        text = log.read_text()
        assert "weights read into their shards" in text
        assert ("shards held in bfloat16" in text) == (name == "bf16")
        r1, r2 = pd.read_parquet(tmp_path / f"{name}1.parquet"), pd.read_parquet(tmp_path / f"{name}2.parquet")
        tol = 1e-5 if name == "fp32" else 0.05 * np.abs(r1["ref_logp_chosen"]).max()
        np.testing.assert_allclose(r2["ref_logp_chosen"], r1["ref_logp_chosen"], atol=tol, rtol=0)
        np.testing.assert_allclose(r2["ref_logp_rejected"], r1["ref_logp_rejected"], atol=tol, rtol=0)


def test_fsdp_refuses_a_model_without_decoder_layers(tmp_path):
    from types import SimpleNamespace

    from dpogen.parallel import wrap

    model, _ = M.build_linear_head([" Yes", " No"], 8, 0)  # a transformers model with no layers
    model._no_split_modules = None
    with pytest.raises(ValueError, match="dpo.parallel: fsdp shards a model one decoder layer at a time"):
        wrap(model, DPO(parallel="fsdp"), SimpleNamespace(enabled=True, cuda=False, local_rank=0))


def test_pairs_longer_than_the_context_are_cut_or_dropped_and_counted(tiny):
    from collections import Counter

    from dpogen.data.stage import apply_context_limit, token_lengths

    _, tok = tiny
    df = validate_pairs(pd.DataFrame({"concept": "c", "cluster": 1, "prompt": ["Is it?\n", "Is it?\n"],
                                      "chosen": [" yes it is", " yes" + " word" * 40],
                                      "rejected": [" no", " no" + " thing" * 40]}), "t")
    context = int(token_lengths(tok, df)["prompt"].max()) + 12
    for mode, kept, key in (("drop", 1, "dropped_longer_than_context"), ("truncate", 2, "truncated_to_context")):
        counts = Counter()
        out = apply_context_limit(df, tok, context, Data(truncation=mode), counts)
        assert len(out) == kept and counts[key] == 1
        lens = token_lengths(tok, out)
        assert (lens["prompt"] + lens[["chosen", "rejected"]].max(axis=1) + 1 <= context).all()


def test_a_run_over_the_gpu_memory_stops_before_any_job(tmp_path):
    """The Snakefile checks every run's memory plan against resources.gpu_mem_gb while it parses."""
    from tests.workflow_util import snakemake

    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump({"dpo": {"device": "cuda", "processes": 2}, "resources": {"gpu_mem_gb": 0.001}}))
    p = snakemake(REPO, tmp_path, "-n", "--configfile", str(c), check=False)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert "resources.gpu_mem_gb: run k1, stage" in text and "more than the limit of 0.001 GB" in text, text[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_damaged_resume_save_is_moved_aside_and_training_starts_over(tmp_path, tiny_model_dir, run10, monkeypatch,
                                                                        caplog):
    """A killed job's save with a truncated shard: the rerun does not fail on it (as it would at every retry);
    it moves the save aside, kept as resume.damaged-<time>, says so, and trains from step 0 to the tables of
    an uninterrupted run."""
    cfg = run10[2].replace(save_every=5)
    full = one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "full")
    allow = kill_at_checkpoint(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "w")
    allow()
    shard = next((tmp_path / "w" / "work" / "save").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="dpogen"):
        again = one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "w")
    assert "is damaged" in caplog.text and "training starts from step 0" in caplog.text
    aside = list((tmp_path / "w").glob("work.damaged-*"))
    assert len(aside) == 1 and (aside[0] / shard.name).stat().st_size == 100  # kept as it was
    pd.testing.assert_frame_equal(again, full)
    # a save whose sizes.json was lost (renamed into place, contents never on disk) is damaged too
    with pytest.raises(KeyboardInterrupt):
        kill_at_checkpoint(monkeypatch, 10)
        one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "v")
    (tmp_path / "v" / "work" / "save" / "sizes.json").write_text("")
    monkeypatch.undo()
    pd.testing.assert_frame_equal(one_process(tmp_path, tiny_model_dir, (run10[0], run10[1], cfg), "v"), full)
    assert len(list((tmp_path / "v").glob("work.damaged-*"))) == 1
