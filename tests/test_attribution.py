"""Per-concept attribution in the theorems' regime: every margin split exactly over the training concepts."""

import numpy as np
import pandas as pd
import pytest
import torch

from dpogen.theory import attribution as A
from dpogen.theory import stage
from tests.conftest import kill_at_checkpoint
from tests.test_regimes import dpo_cfg, train_run

EXACT = dict(regime="last_layer", optimizer="sgd", lr=0.1, beta=0.5, batch_size="full", steps=12, eval_every=4,
             max_grad_norm=None, weight_decay=0.0, append_eos=False, dtype="float64")


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, tiny_model_dir, spec):
    tmp = tmp_path_factory.mktemp("att")
    cfg = dpo_cfg(**EXACT)
    train, test, m = train_run(tmp, tiny_model_dir, spec, cfg, k=3, q=6)
    return {"cfg": cfg, "margins": m, "ref": pd.read_parquet(tmp / "ref.parquet"), "g": np.load(tmp / "feat.npy"),
            "tmp": tmp}


def test_contributions_sum_to_every_measured_margin(exact_run):
    att, inter = A.attribution(exact_run["g"], exact_run["ref"], exact_run["margins"], exact_run["cfg"])
    assert att["method"].eq(A.METHOD_EXACT).all()
    total = att.groupby(["step", "sample_id"])["contribution"].sum()
    measured = exact_run["margins"].set_index(["step", "sample_id"])["margin"].loc[total.index]
    assert np.abs(total - measured).max() <= 1e-9 * max(1.0, np.abs(measured).max())
    assert set(att["train_cluster"]) == {1, -1} and att["train_concept"].nunique() == 3
    # the interference matrix: K × K per checkpoint, each held-out concept's shares summing to one
    last = inter[inter["step"] == inter["step"].max()]
    assert len(last) == 9 and last["share"].abs().groupby(last["concept"]).sum().to_numpy() == pytest.approx(np.ones(3))
    share = A.cross_concept_share(inter)
    assert share.index.tolist() == sorted(inter["step"].unique()) and 0 < share.loc[share.index.max()] < 1
    one = inter[inter["train_concept"] == inter["concept"]]  # as if K were 1: nothing from other concepts
    assert (A.cross_concept_share(one).fillna(0) == 0).all()


def test_one_step_without_a_concept_changes_margins_by_its_contribution(exact_run):
    """Autograd on the DPO loss of a softmax head over g(x), one sgd step from the start with concept c's
    pairs weighted 0 (still divided by N): each margin moves by its full-data step minus c's contribution."""
    ref, g, cfg, m = exact_run["ref"], torch.tensor(exact_run["g"]), exact_run["cfg"], exact_run["margins"]
    tr = torch.tensor((ref["split"] == "train").to_numpy())
    w, lo = torch.tensor(ref["token_chosen"].to_numpy()), torch.tensor(ref["token_rejected"].to_numpy())
    concept = m[m["step"] == 0].set_index("sample_id").loc[ref["sample_id"], "concept"].to_numpy()
    W0 = torch.randn(int(max(w.max(), lo.max())) + 1, g.shape[1], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
    beta, lr = cfg.beta, cfg.lr

    def margins(W):
        lp, lp0 = torch.log_softmax(g @ W.T, -1), torch.log_softmax(g @ W0.T, -1)
        idx = torch.arange(len(g))
        return beta * ((lp[idx, w] - lp0[idx, w]) - (lp[idx, lo] - lp0[idx, lo]))

    def one_step(weight):
        W = W0.clone().requires_grad_(True)
        r = margins(W)
        loss = (weight * -torch.nn.functional.logsigmoid(r[tr])).sum() / int(tr.sum())
        loss.backward()
        with torch.no_grad():
            return margins(W - lr * W.grad).numpy()

    m0 = m[m["step"] == 0]
    att, _ = A.attribution(exact_run["g"], ref, pd.concat([m0, m0.assign(step=1)]), cfg.replace(steps=1))
    c1 = att[att["step"] == 1]
    full = one_step(torch.ones(int(tr.sum()), dtype=torch.float64))
    for c in sorted(set(concept)):
        keep = torch.tensor(concept[tr.numpy()] != c, dtype=torch.float64)
        without = one_step(keep)
        part = c1[c1["train_concept"] == c].groupby("sample_id", sort=False)["contribution"].sum()
        np.testing.assert_allclose(full - without, part.loc[ref["sample_id"]].to_numpy(), rtol=1e-9, atol=1e-12)


def test_outside_the_regime_the_tables_say_why():
    cfg = dpo_cfg(optimizer="adam")
    ref = pd.DataFrame({"token_chosen": [5], "token_rejected": [7]})
    reason = stage.attribution_reason(ref, cfg, pd.DataFrame({"step": [0], "split": ["train"], "concept": ["c"],
                                                          "cluster": [1]}))
    assert reason.startswith("not computed exactly: outside the theorems' regime")
    att, inter = A.attribution(None, None, None, cfg, reason)
    assert att["method"].iloc[0] == reason and inter["method"].iloc[0] == reason and inter["share"].isna().all()


# ------------------------------------------------- outside the exact regime: the actual updates, split (2)


def _split_sums(tmp, m):
    split = pd.read_parquet(tmp / "split.parquet")
    total = split.groupby(["step", "sample_id"])["contribution"].sum()
    margin = m.set_index(["step", "sample_id"])["margin"].loc[total.index]
    return split, total, margin


def test_update_split_in_the_exact_regime_equals_the_recursion(exact_run, tmp_path_factory):
    """Full-batch sgd: the dpo stage's split of the head's actual updates (torch, step by step) and the
    recursion's split (numpy, from the kernel) are the same numbers, pair by pair and concept by concept."""
    att, _ = A.attribution(exact_run["g"], exact_run["ref"], exact_run["margins"], exact_run["cfg"])
    split = pd.read_parquet(exact_run["tmp"] / "split.parquet")
    assert split["method"].str.startswith("estimate: the actual minibatch sgd updates").all()
    key = ["step", "sample_id", "train_concept", "train_cluster"]
    both = att.merge(split, on=key, suffixes=("_rec", "_upd"))
    assert len(both) == len(att) == len(split)
    scale = np.abs(both["contribution_rec"]).max()
    assert scale > 1e-3 and np.abs(both["contribution_rec"] - both["contribution_upd"]).max() <= 1e-9 * scale


@pytest.mark.parametrize("opt,extra", [("adam", {"batch_size": 4, "max_grad_norm": 0.05}),
                                       ("adamw", {"batch_size": 6, "weight_decay": 0.1}),
                                       ("sgd", {"batch_size": 4, "schedule": "cosine", "warmup_steps": 2})])
def test_update_split_outside_the_regime_sums_to_every_margin(tmp_path, tiny_model_dir, spec, opt, extra):
    """Adam, AdamW, clipped and minibatch sgd with a schedule: every margin is the sum of its groups' parts (and,
    with weight decay, the decay's), in float64 to 1e-9; without weight decay nothing is left over."""
    cfg = dpo_cfg(**{**EXACT, "optimizer": opt, "lr": 0.05, "steps": 10, "eval_every": 5, **extra})
    _, _, m = train_run(tmp_path, tiny_model_dir, spec, cfg, k=3, q=6)
    split, total, margin = _split_sums(tmp_path, m)
    assert np.abs(margin).max() > 1e-2
    assert np.abs(total - margin).max() <= 1e-9 * max(1.0, np.abs(margin).max())
    decay = split[split["train_concept"] == "(weight decay)"]
    assert (len(decay) > 0) == bool(extra.get("weight_decay"))
    if len(decay):
        assert np.abs(decay["contribution"]).max() > 1e-6
        # weight decay is no training concept: it never counts as interference
        assert A.METHOD_EXACT not in split["method"].iloc[0]
        assert "(weight decay)" not in set(A.interference(split)["train_concept"])
    assert split["method"].str.startswith("estimate:").all()
    assert ("adam" in split["method"].iloc[0]) == opt.startswith("adam")


def test_update_split_resumes_to_the_same_table(tmp_path, tiny_model_dir, spec, monkeypatch):
    """Killed after a resume save and run again: the same table as an uninterrupted run (Adam's per-group
    moments and the running sums are part of the saved state)."""
    cfg = dpo_cfg(**{**EXACT, "optimizer": "adam", "lr": 0.05, "batch_size": 4, "steps": 8, "eval_every": 4,
                     "save_every": 2})
    train_run(tmp_path / "full", tiny_model_dir, spec, cfg, k=3, q=6)
    restore = kill_at_checkpoint(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "resumed", tiny_model_dir, spec, cfg, k=3, q=6)
    restore()
    train_run(tmp_path / "resumed", tiny_model_dir, spec, cfg, k=3, q=6)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "full" / "split.parquet"),
                                  pd.read_parquet(tmp_path / "resumed" / "split.parquet"))


def test_when_the_backbone_trains_tracin_is_computed_or_the_table_says_why(tmp_path, tiny_model_dir, spec):
    cfg = dpo_cfg(regime="full", steps=2, eval_every=1, append_eos=False, batch_size=4)
    train_run(tmp_path / "a", tiny_model_dir, spec, cfg, k=2, q=3)
    att = pd.read_parquet(tmp_path / "a" / "split.parquet")
    assert att["method"].str.startswith("estimate: TracIn over the margin checkpoints (the LM head's").all()
    assert (att.loc[att["step"] == 0, "contribution"] == 0).all() and att["contribution"].abs().max() > 0
    train_run(tmp_path / "b", tiny_model_dir, spec, cfg.replace(tracin={"params": "none", "dim": 512}), k=2, q=3)
    none = pd.read_parquet(tmp_path / "b" / "split.parquet")
    assert len(none) == 1 and none["step"].iloc[0] == -1
    assert none["method"].iloc[0] == "not computed: dpo.tracin.params: none"


# ------------------------------------------------------- validation: leave one concept out and retrain (3)


def test_leave_one_concept_out_against_the_exact_attribution(exact_run, tiny_model_dir, spec):
    """Retrained without each concept in turn, the held-out concepts' mean margins move the way the exact
    attribution says (first order: N and every later step change too): correlation over the K x K cells."""
    from dpogen import tables
    from dpogen.theory.attribution_check import correlation, leave_one_out
    from dpogen.data.stage import validate_pairs
    from dpogen.data.synthetic import generate

    tmp = exact_run["tmp"]
    train, test = generate(3, 6, 3, spec)
    train, test = validate_pairs(train, "train"), validate_pairs(test, "test")
    _, inter = A.attribution(exact_run["g"], exact_run["ref"], exact_run["margins"], exact_run["cfg"])
    check = leave_one_out(tiny_model_dir, train, test, tmp / "ref.parquet", tmp / "feat.npy", exact_run["margins"],
                          inter, exact_run["cfg"], 0)
    tables.write_attribution_check(check, tmp / "check.parquet")
    c = correlation(check)
    assert c["cells"] == 9 and check["method"].eq(A.METHOD_EXACT).all()
    assert np.abs(check["measured"]).max() > 1e-3
    assert c["pearson_r"] > 0.9, (c, check)
    n_left = len(train) - int((train["concept"] == train["concept"].iloc[0]).sum())
    with pytest.raises(ValueError,
                       match=f"dpo.batch_size {n_left + 1} is larger than the {n_left} training pairs left"):
        leave_one_out(tiny_model_dir, train, test, tmp / "ref.parquet", tmp / "feat.npy", exact_run["margins"], inter,
                      exact_run["cfg"].replace(batch_size=n_left + 1), 0)
    # the estimate is minus the removed concept's contribution: its own held-out pairs lose the most
    own = check[check["train_concept"] == check["concept"]]
    assert (own["measured"] < 0).all() and (own["estimated"] < 0).all()


@pytest.mark.slow
def test_the_workflow_checks_the_adam_attribution_by_retraining(tmp_path):
    """The real workflow, last_layer with Adam on minibatches and theory.attribution_check: the theory stage's
    attribution is the dpo stage's update split (labelled an estimate), each run is retrained once per
    training concept, and the summary reports the correlation (a one-concept run says why it has none)."""
    import yaml

    from tests.conftest import REPO
    from tests.workflow_util import snakemake

    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["dpo"] = {**cfg["dpo"], "regime": "last_layer", "optimizer": "adam", "lr": 0.05, "steps": 6,
                  "eval_every": 3}
    cfg["theory"] = {"attribution_check": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"))
    out = tmp_path / "results" / "tiny"
    att = pd.read_parquet(out / "k2" / "theory" / "attribution.parquet")
    assert att["method"].str.startswith("estimate: the actual adam updates").all()
    margins = pd.read_parquet(out / "k2" / "dpo" / "margins.parquet")
    total = att.groupby(["step", "sample_id"])["contribution"].sum()
    measured = margins.set_index(["step", "sample_id"])["margin"].loc[total.index]
    assert np.abs(total - measured).max() <= 1e-4 * max(1.0, np.abs(measured).max())  # float32 training
    check = pd.read_csv(out / "attribution_check.csv").set_index("run")
    assert check.loc["k2", "cells"] == 4 and np.isfinite(check.loc["k2", "pearson_r"])
    assert check.loc["k1", "note"].startswith("not computed: one training concept")
    assert "leave-one-concept-out retraining" in (out / "summary.md").read_text()


def test_tracin_is_the_first_order_change_of_one_small_step(tmp_path, tiny_model_dir, spec):
    """Full fine-tuning, one full-batch sgd step with a small lr, float64: TracIn over every trained parameter,
    unprojected, sums to the measured margin change of every pair to first order; the 512-dim projection and
    the head-only estimate follow it."""
    base = dict(regime="full", optimizer="sgd", lr=1e-3, beta=0.5, batch_size="full", steps=1, eval_every=1,
                max_grad_norm=None, weight_decay=0.0, append_eos=True, dtype="float64")
    runs = {}
    for name, tracin in (("exact", {"params": "trainable", "dim": None}), ("proj", {"params": "trainable", "dim": 512}),
                         ("head", {"params": "head", "dim": None})):
        _, _, m = train_run(tmp_path / name, tiny_model_dir, spec, dpo_cfg(**base, tracin=tracin), k=2, q=4)
        att = pd.read_parquet(tmp_path / name / "split.parquet")
        runs[name] = att[att["step"] == 1].groupby(["sample_id", "train_concept"])["contribution"].sum()
    measured = m[m["step"] == 1].set_index("sample_id")["margin"]
    total = runs["exact"].groupby("sample_id").sum().loc[measured.index]
    assert np.abs(measured).max() > 1e-5
    assert np.abs(total - measured).max() <= 0.02 * np.abs(measured).max(), (total - measured).abs().max()
    for name in ("proj", "head"):
        r = np.corrcoef(runs["exact"].to_numpy(), runs[name].loc[runs["exact"].index].to_numpy())[0, 1]
        assert r > 0.8, (name, r)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo_norm"])  # one backward pass of the log-ratio, or one per answer
def test_tracin_over_lora_adapters_is_the_first_order_change(tmp_path, tiny_model_dir, spec, monkeypatch, loss):
    """One small sgd step of LoRA adapters: the unprojected TracIn sum is the margin change to first order, and
    the batched per-pair gradients (hooks on the adapters' Linear layers) give the numbers of one backward pass
    per pair and answer."""
    from dpogen.engine import tracin

    base = dict(regime="lora", optimizer="sgd", lr=1e-2, beta=0.5, batch_size="full", steps=1, eval_every=1,
                max_grad_norm=None, weight_decay=0.0, append_eos=True, dtype="float64", loss=loss)
    _, _, m = train_run(tmp_path, tiny_model_dir, spec, dpo_cfg(**base, tracin={"params": "auto", "dim": None}),
                        k=2, q=4)
    att = pd.read_parquet(tmp_path / "split.parquet")
    assert att["method"].str.contains("every trained parameter's gradient, unprojected").all()
    measured = m[m["step"] == 1].set_index("sample_id")["margin"]
    total = att[att["step"] == 1].groupby("sample_id")["contribution"].sum().loc[measured.index]
    assert np.abs(measured).max() > 1e-7
    assert np.abs(total - measured).max() <= 0.02 * np.abs(measured).max(), (total - measured).abs().max()
    monkeypatch.setattr(tracin, "trained_linears", lambda model, params: None)  # one backward per pair
    train_run(tmp_path / "loop", tiny_model_dir, spec, dpo_cfg(**base, tracin={"params": "auto", "dim": None}),
              k=2, q=4)
    loop = pd.read_parquet(tmp_path / "loop" / "split.parquet")
    assert np.abs(att["contribution"] - loop["contribution"]).max() <= 1e-9 * np.abs(loop["contribution"]).max()
