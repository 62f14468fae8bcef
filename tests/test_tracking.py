"""Per-pair tracking at scale (dpo.track, dpo.eval_schedule, batch margins, the one-prompt pass): what is
recorded equals what an independent computation gives, a subset is the full run's rows, and estimates from a
subset carry intervals that hold."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dpogen import model as M
from dpogen import reference, tables
from dpogen.config import ConfigError, check_track
from dpogen.data.stage import validate_pairs
from dpogen.engine import loop, schedule, tracked
from dpogen.estimates import split_estimates
from dpogen.logprobs import encode_pairs, pair_logps
from dpogen.report.summary import markdown, run_summary
from dpogen.data.synthetic import generate
from tests.conftest import REPO, dpo_settings


def dpo_cfg(**kw):
    return dpo_settings(**{"save_every": 0, "log_every": 5, "steps": 10, "batch_size": 4, "eval_every": 5, **kw})


@pytest.fixture(scope="module")
def pairs(spec):
    train, test = generate(2, 8, 4, spec)  # 2 concepts x 2 clusters: 32 train, 16 test pairs
    return validate_pairs(train, "train"), validate_pairs(test, "test")


def train(tmp_path, model_dir, pairs, name, **over):
    tr, te = pairs
    cfg = dpo_cfg(**over)
    ref = tmp_path / f"ref-{cfg.append_eos}.parquet"
    if not ref.exists():
        reference.compute_reference(model_dir, tr, te, cfg, ref, tmp_path / f"feat-{cfg.append_eos}.npy")
    out = tmp_path / name
    info = loop.train_dpo(model_dir, tr, te, ref, cfg, 7, out / "m", out / "x.parquet", out / "w",
                          out_info=out / "run.json", out_batch_margins=out / "batch.parquet")
    return tables.read_margins(out / "m"), pd.read_parquet(out / "batch.parquet"), info


@pytest.mark.parametrize("eos", [False, True], ids=["single-token", "multi-token"])
def test_batch_margins_are_the_pre_update_margins(tmp_path, tiny_model_dir, pairs, eos):
    """One row per pair of every step's batch, equal to the margins a checkpoint pass (eval mode, its own
    batching, the one-prompt pass for multi-token answers) computes under the same weights: the step's
    weights before its update, i.e. checkpoint s for the batch of step s."""
    m, b, info = train(tmp_path, tiny_model_dir, pairs, "every", eval_every=1, append_eos=eos, track="all")
    n_train = len(pairs[0])
    for s in range(10):
        idx = schedule.batch_indices(s, n_train, 4, 7)
        got = b[b["step"] == s]
        assert sorted(got["sample_id"]) == sorted(pairs[0]["sample_id"].iloc[np.unique(idx)])
    j = b.merge(m[m["split"] == "train"], on=["step", "sample_id"], suffixes=("", "_ckpt"))
    assert len(j) == len(b) == 40
    for col in ("logp_chosen", "logp_rejected", "margin"):
        np.testing.assert_allclose(j[col], j[f"{col}_ckpt"], rtol=1e-5, atol=1e-5)
    assert (j.loc[j["step"] > 0, "margin"].abs() > 0).any()
    np.testing.assert_array_equal(j["ref_logp_chosen"], j["ref_logp_chosen_ckpt"])
    assert info["time_s"]["batch_margins"] < info["time_s"]["training"]
    assert info["step0_reference_check"] < 1e-5  # the policy at step 0 reproduces the reference pass


def test_subset_rows_are_the_full_runs_rows(tmp_path, tiny_model_dir, pairs):
    """A tracked subset changes nothing else: its rows equal the same pairs' rows of a full-tracking run bit
    for bit, the training curve is identical, and each row carries its stratum's sampling weight."""
    full, bf, _ = train(tmp_path, tiny_model_dir, pairs, "full", append_eos=True, track="all")
    sub, bs, info = train(tmp_path, tiny_model_dir, pairs, "sub", append_eos=True,
                          track={"train": 8, "test": 0.5, "seed": 3})
    assert info["tracked"] == {"train": [8, 32], "test": [8, 16]}
    assert (full["weight"] == 1).all() and set(sub["weight"]) == {2.0, 4.0}
    j = sub.merge(full, on=["step", "split", "sample_id"], suffixes=("", "_full"))
    assert len(j) == len(sub) == 3 * 16
    cols = ["logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected", "margin"]
    np.testing.assert_array_equal(j[cols].to_numpy(), j[[f"{c}_full" for c in cols]].to_numpy())
    pd.testing.assert_frame_equal(bs, bf)  # training never depends on what the checkpoints score
    first = sub[sub["step"] == 0]
    for (split, _, _), g in first.groupby(["split", "concept", "cluster"]):
        assert len(g) >= 1  # every stratum kept
    assert first.groupby("split")["weight"].sum().to_dict() == {"test": 16.0, "train": 32.0}


def test_stratified_draw_and_sizes():
    df = pd.DataFrame({"split": ["train"] * 100 + ["test"] * 20, "sample_id": [f"s{i:03d}" for i in range(120)],
                       "concept": (["a"] * 70 + ["b"] * 30) + ["a"] * 10 + ["b"] * 10,
                       "cluster": np.tile([1, -1], 60)})
    t = tracked.draw(df, {"train": 10, "test": 20}, seed=0)
    sub = df.iloc[t.index]
    counts = sub[sub["split"] == "train"].groupby(["concept", "cluster"]).size().to_dict()
    # strata of 35, 35, 15, 15 pairs: 10 draws, proportional (3.5, 3.5, 1.5, 1.5) with two at least each
    assert sorted(counts.values()) == [2, 2, 3, 3] and sum(counts.values()) == 10
    # weights: each stratum's size over its draws, so they add up to the split's size
    assert pytest.approx(t.weight[sub["split"].to_numpy() == "train"].sum()) == 100
    assert (t.weight[sub["split"].to_numpy() == "test"] == 1).all()
    # the draw does not depend on the table's order
    t2 = tracked.draw(df.iloc[::-1].reset_index(drop=True), {"train": 10, "test": 20}, seed=0)
    assert set(df.iloc[t.index]["sample_id"]) == set(df.iloc[::-1].reset_index(drop=True).iloc[t2.index]["sample_id"])
    with pytest.raises(ValueError, match="without the two pairs its spread needs; track at least 8"):
        tracked.draw(df, {"train": 7, "test": 20}, seed=0)
    # strata of very unequal size: the floor of two holds everywhere, the rest goes to the large stratum
    take = tracked.allocate(np.array([2000] + [15] * 20), 60, "k")
    assert take.sum() == 60 and (take[1:] == 2).all() and take[0] == 20
    assert tracked.allocate(np.array([100, 1, 1, 1]), 5, "k").tolist() == [2, 1, 1, 1]
    for value, msg in ((1.5, r"outside \(0, 1\]"), (0.0, r"outside \(0, 1\]"), (101, "the run has 100"),
                       ("some", "use all")):
        with pytest.raises(ValueError, match=msg):
            tracked.size_of(value, 100, "dpo.track.train")
    assert tracked.size_of(0.25, 100, "k") == 25 and tracked.size_of(7, 100, "k") == 7


def test_config_check_refuses_bad_tracking_before_any_job():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    from dpogen.config import load, run_settings

    def refused(dpo, match):
        c = {**cfg, "dpo": {**cfg["dpo"], **dpo}}
        with pytest.raises(ConfigError, match=match):
            load(c)

    refused({"track": {"train": 10_000}}, r"dpo.track.train: 10000 pairs asked for, the run has 64 \(run k1\)")
    refused({"track": {"test": 1.5}}, r"dpo.track.test: fraction 1.5 outside \(0, 1\] \(run k1\)")
    refused({"track": {"train": 3}}, r"dpo.track.train: 3 pairs for 2 .*strata.*track at least 4 \(run k1\)")
    refused({"eval_schedule": {"log": 1}}, r"dpo.eval_schedule.log: 1 checkpoints; at least 2.* \(run k1\)")
    check_track(run_settings({**cfg, "dpo": {**cfg["dpo"], "track": {"train": 0.5}}}, "k8"), "k8")  # fine


def test_log_schedule():
    s = schedule.log_schedule(477, 15)
    assert len(s) == 15 == len(set(s)) and s[0] == 0 and s[-1] == 477 and s == sorted(s)
    gaps = np.diff(s)
    assert gaps[0] == 1 and gaps[-1] > 100  # dense early, sparse late
    assert schedule.log_schedule(10, 15) == list(range(11))
    cfg = dpo_settings(steps=100, eval_every=10, eval_steps=[33], eval_schedule={"log": 5})
    assert schedule.eval_schedule(cfg) == [0, 1, 5, 22, 33, 100]  # log replaces eval_every; eval_steps stay


def test_auto_tracks_everything_when_cheap_and_a_subset_on_long_responses():
    """auto on the default's sizes (short single-token pairs) keeps every pair and the schedule; on an
    UltraFeedback-shaped run (long responses, an 8B-sized forward) it chooses a log schedule and a subset
    that bring tracking to at most 0.25 of the training, every held-out pair first."""
    rng = np.random.default_rng(0)
    K = 8
    df = pd.DataFrame({"split": ["train"] * (2 * K * 32) + ["test"] * (2 * K * 24),
                       "concept": np.repeat([f"c{i}" for i in range(K)], 2).tolist() * 56,
                       "cluster": [1, -1] * (K * 56)})
    df["sample_id"] = [f"p{i}" for i in range(len(df))]
    df = pd.concat([df[df["split"] == "train"], df[df["split"] == "test"]], ignore_index=True)
    n_train = int((df["split"] == "train").sum())
    sched = schedule.eval_schedule(dpo_settings(steps=100, eval_every=10))
    tok = np.full(len(df), 20.0)
    t, s, why = tracked.choose(df, n_train, tok, tok, 100, 16, sched, set(), "auto", 0, 170_000, False)
    assert t.everything and s == sched and "every pair" in why

    long_train = rng.integers(400, 1400, len(df)).astype(float)  # two rows of prompt + response
    long_pass = long_train * 0.75  # the prompt once
    t, s, why = tracked.choose(df, n_train, long_train, long_pass, 477, 16, list(range(0, 478, 5)), {100}, "auto", 0,
                               8_000_000_000, True)
    assert not t.everything and 100 in s and len(s) <= tracked.LOG_POINTS + 1
    c = tracked.cost(long_train, long_pass, n_train, 477, 16, len(s), t.index, 8_000_000_000, True)
    assert c.ratio <= tracked.GOAL * 1.01
    assert t.counts["test"][0] == t.counts["test"][1] or t.counts["train"][0] >= tracked.MIN_TRACKED
    assert "chose" in why and f"{c.ratio:.3g}x" in why
    # steps the user listed stay checkpoints when auto switches to a log schedule
    t, s, _ = tracked.choose(df, n_train, long_train, long_pass, 477, 16, list(range(0, 478, 5)), {33, 250},
                             "auto", 0, 8_000_000_000, True)
    assert {33, 250} <= set(s)


def test_auto_subsamples_a_run_through_the_engine(tmp_path, tiny_model_dir, pairs, monkeypatch):
    """The engine applies auto's choice: with the absolute floor removed, a run whose tracking costs more than
    a quarter of its training scores a stratified subset at log-spaced checkpoints, and run.json says why."""
    monkeypatch.setattr(tracked, "FLOOR_FLOPS", 0.0)
    monkeypatch.setattr(tracked, "LOG_POINTS", 4)
    monkeypatch.setattr(tracked, "MIN_TRACKED", 4)
    m, _, info = train(tmp_path, tiny_model_dir, pairs, "auto", append_eos=True, eval_every=1, eval_steps=[7],
                       track="auto")
    assert sorted(m["step"].unique()) == sorted(set(schedule.log_schedule(10, 4)) | {7})  # eval_steps kept
    n = m[m["step"] == 0].groupby("split").size().to_dict()
    assert n["train"] < 32 and "chose 5 log-spaced checkpoints" in info["tracking"]
    saved = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert saved["tracked"]["train"] == [n["train"], 32] and saved["tracking"] == info["tracking"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_prompt_pass_equals_two_rows(tiny_model_dir, tiny_gpt2_dir, spec, arch):
    """Each prompt run once with both answers continuing from its cache gives the two-row log-probs and g(x)
    within 1e-5 (fp32), for prompts and answers of unequal lengths, left-padded prompts included."""
    model, tok = M.load(tiny_model_dir if arch == "llama" else tiny_gpt2_dir)
    model.eval()
    tr, te = generate(3, 6, 2, spec)
    df = pd.concat([tr, te], ignore_index=True)
    prompts = [p + " well" * (i % 4) for i, p in enumerate(df["prompt"])]
    chosen = [c + " really" * (i % 3) for i, c in enumerate(df["chosen"])]
    rejected = [r + " not quite so" * (i % 2) for i, r in enumerate(df["rejected"])]
    enc = encode_pairs(tok, prompts, chosen, rejected, append_eos=True)
    assert not enc.fused.any()
    with torch.no_grad():
        rows, f_rows = pair_logps(model, enc, batch_rows=5, features=True)
        shared, f_shared = pair_logps(model, enc, batch_rows=5, features=True, shared_prompt=True)
    np.testing.assert_allclose(shared.numpy(), rows.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_shared.numpy(), f_rows.numpy(), rtol=1e-5, atol=1e-5)


def test_estimates_and_their_intervals():
    """By hand: two strata of 4 and 2 pairs, 2 and 1 tracked. And over 400 subsets of a fixed population the
    95% intervals hold the full value at least 90% of the time."""
    g = pd.DataFrame({"margin": [1.0, 3.0, -2.0], "concept": ["a", "a", "b"], "cluster": [1, 1, 1],
                      "weight": [2.0, 2.0, 2.0]})
    e = split_estimates(g)
    # mean = 4/6 * 2 + 2/6 * (-2) = 2/3; Var = (4/6)^2 (1 - 2/4) * 2 / 2 + (2/6)^2 (1 - 1/2) * s_b^2 / 1, s_b^2
    # pooled from stratum a (2): 2/9 + 1/9 = 1/3
    assert e["margin_mean"] == pytest.approx(2 / 3) and e["n"] == 3 and e["N"] == 6 and not e["exact"]
    from scipy import stats

    half = stats.t.ppf(0.975, 1) * np.sqrt(1 / 3)
    assert e["margin_mean_hi"] - e["margin_mean"] == pytest.approx(half)
    assert e["error"] == pytest.approx(2 / 6)
    census = split_estimates(g.assign(weight=1.0))
    assert census["exact"] and census["margin_mean_lo"] == census["margin_mean"] == pytest.approx(2 / 3)
    # one tracked pair in every stratum: no spread to estimate, so no interval (never a zero-width one)
    alone = split_estimates(g.iloc[[0, 2]].assign(weight=[4.0, 2.0]))
    assert not alone["exact"] and np.isnan(alone["margin_mean_lo"]) and np.isnan(alone["margin_mean_hi"])
    # unequal weights: the error's interval rests on Kish's effective sample size, (Σw)²/Σw² < n
    from dpogen.estimates import kish

    assert kish(np.array([1.0, 1.0, 4.0])) == pytest.approx(36 / 18)

    rng = np.random.default_rng(1)
    pop = pd.DataFrame({"concept": np.repeat(["a", "b", "c", "d"], 250), "cluster": np.tile([1, -1], 500),
                        "sample_id": [f"x{i}" for i in range(1000)], "split": "train"})
    pop["margin"] = rng.normal(np.repeat([0.5, -0.1, 0.3, 1.0], 250), 1.0)
    true_m, true_e = pop["margin"].mean(), float((pop["margin"] <= 0).mean())
    held = []
    for seed in range(400):
        t = tracked.draw(pop, {"train": 80}, seed)
        e = split_estimates(pop.iloc[t.index].assign(weight=t.weight))
        held += [e["margin_mean_lo"] <= true_m <= e["margin_mean_hi"], e["error_lo"] <= true_e <= e["error_hi"]]
    assert np.mean(held) >= 0.9


def test_report_says_a_subset_is_an_estimate(tmp_path, tiny_model_dir, pairs):
    sub, _, _ = train(tmp_path, tiny_model_dir, pairs, "sub", append_eos=True, track={"train": 8})
    certs = pd.DataFrame({"step": sorted(sub["step"].unique()), "concept": "all", "upper": 0.5})
    bounds = pd.DataFrame([{"version": "v3", "value": 2.0, "conditions_hold": False},
                           {"version": "v5", "value": 3.0, "conditions_hold": False}])
    s = run_summary("k2", 2, sub, certs, bounds, {"K": 2, "Q_min": 8})
    last = s.iloc[-1]
    assert last["train_n"] == 8 and last["train_N"] == 32 and last["test_n"] == last["test_N"] == 16
    assert last["train_margin_mean_lo"] < last["train_margin_mean"] < last["train_margin_mean_hi"]
    assert last["test_margin_mean_lo"] == last["test_margin_mean"] == last["test_margin_mean_hi"]
    text = markdown("exp", s, {"settings": {}})
    assert "k2 tracks train 8 of 32 and test 16 of 16 pairs" in text and "stratified estimates" in text


def test_theory_stage_on_a_tracked_subset(tmp_path, tiny_model_dir, pairs):
    """In the theorems' regime the recursion still runs over every training pair; on a subset it predicts the
    tracked pairs exactly as on the full run, the attribution covers the tracked pairs, and the certificates
    say they rest on n tracked of N held-out pairs."""
    from dpogen.theory.attribution import exact_split
    from dpogen.theory.certificates import certificates
    from dpogen.theory.dynamics import dynamics

    exact = dict(regime="last_layer", optimizer="sgd", lr=0.1, beta=0.5, batch_size="full", steps=8, eval_every=4,
                 max_grad_norm=None, weight_decay=0.0, append_eos=False, dtype="float64")
    full, _, _ = train(tmp_path, tiny_model_dir, pairs, "full", track="all", **exact)
    sub, _, _ = train(tmp_path, tiny_model_dir, pairs, "sub", track={"train": 8, "test": 8}, **exact)
    ref = pd.read_parquet(tmp_path / "ref-False.parquet")
    feats = np.load(tmp_path / "feat-False.npy")
    cfg = dpo_cfg(**exact)
    pred_full, att_full = exact_split(feats, ref, full, cfg)
    pred_sub, att_sub = exact_split(feats, ref, sub, cfg, pairs[0])
    assert set(att_sub["sample_id"]) == set(sub["sample_id"])
    key = ["step", "sample_id", "train_concept", "train_cluster"]
    j = att_sub.merge(att_full, on=key, suffixes=("", "_full"))
    assert len(j) == len(att_sub)
    np.testing.assert_allclose(j["contribution"], j["contribution_full"], rtol=1e-12, atol=1e-15)
    per_pair, dyn = dynamics(feats, ref, sub, cfg, K=2, pred=pred_sub)
    assert set(per_pair["sample_id"]) == set(sub["sample_id"])
    moved = per_pair[per_pair["step"] > 0]
    assert np.abs(moved["predicted"] - moved["measured"]).max() < 1e-6 * np.abs(moved["measured"]).max()
    assert dyn["method"].str.contains("tracked subset: train 8 of 32, test 8 of 16").all()
    certs = certificates(sub, 0.95)
    assert certs["method"].str.contains("on 8 tracked of 16 held-out pairs").all() and (certs["n"] <= 8).all()


def test_margins_figure_marks_a_subset(tmp_path, tiny_model_dir, pairs):
    from dpogen.report import figures

    sub, _, _ = train(tmp_path, tiny_model_dir, pairs, "sub", append_eos=False, track={"train": 0.25})
    certs = pd.DataFrame({"step": sorted(sub["step"].unique()), "concept": "all", "upper": 0.5})
    bounds = pd.DataFrame([{"version": v, "value": 2.0, "conditions_hold": False} for v in ("v3", "v5")])
    s = run_summary("k2", 2, sub, certs, bounds, {"K": 2, "Q_min": 8})
    assert figures.subset_note(s) == "\nestimates from a tracked subset: train 8 of 32 pairs"
    figures.plot_run(s, "k2", tmp_path / "margins.png")
    assert (tmp_path / "margins.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_workflow_on_a_tracked_subset(tmp_path):
    """The real workflow with dpo.track drawing a subset in the full regime: every stage runs on it, the
    geometry at the last step is said to come from the tracked training pairs, the summary names the run as
    subsampled, and the in-batch margins cover every step."""
    from tests.workflow_util import snakemake

    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "data.k", "values": [2], "prefix": "k"}
    cfg["dpo"] = {**cfg["dpo"], "track": {"train": 8, "test": 0.7}, "eval_schedule": {"log": 3}, "steps": 6}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"))
    out = tmp_path / "results" / "tiny"
    m = tables.read_margins(out / "k2" / "dpo" / "margins.parquet")
    assert sorted(m["step"].unique()) == schedule.log_schedule(6, 3)
    first = m[m["step"] == 0].groupby("split").size().to_dict()
    assert first == {"train": 8, "test": 9}
    b = pd.read_parquet(out / "k2" / "dpo" / "batch_margins.parquet")
    assert sorted(b["step"].unique()) == list(range(6)) and len(b) == 6 * 4
    geo = pd.read_parquet(out / "k2" / "theory" / "geometry.parquet")
    assert geo.loc[geo["step"] == 6, "note"].str.contains("from the 8 tracked of 16 training pairs").all()
    text = (out / "summary.md").read_text()
    assert "k2 tracks train 8 of 16 and test 9 of 12 pairs" in text
    info = json.loads((out / "k2" / "dpo" / "run.json").read_text())
    assert info["tracked"] == {"train": [8, 16], "test": [9, 12]} and "stratified subset" in info["tracking"]
