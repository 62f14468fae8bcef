"""Training regimes: last_layer (the theorems' regime, checked against the recursion exactly), lora, autocast."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dpogen import reference, tables
from dpogen.engine import loop
from dpogen.engine.policy import Policy, untie_head
from dpogen import model as M
from dpogen.theory import dynamics
from dpogen.data.stage import validate_pairs
from dpogen.logprobs import encode_pairs
from dpogen.data.synthetic import generate
from tests.conftest import dpo_settings


def dpo_cfg(**kw):
    return dpo_settings(**{"save_every": 0, "log_every": 5, **kw})


def train_run(tmp_path, model_dir, spec, cfg, k=2, q=6, use_features=True):
    train, test = generate(k, q, 3, spec)
    train, test = validate_pairs(train, "train"), validate_pairs(test, "test")
    reference.compute_reference(model_dir, train, test, cfg, tmp_path / "ref.parquet", tmp_path / "feat.npy")
    loop.train_dpo(model_dir, train, test, tmp_path / "ref.parquet", cfg, 0, tmp_path / "m", tmp_path / "x.parquet",
                  tmp_path / "w", out_info=tmp_path / "run.json",
                  ref_features_path=tmp_path / "feat.npy" if use_features else None,
                  out_attribution=tmp_path / "split.parquet")
    return train, test, tables.read_margins(tmp_path / "m")


def test_margin_only_training_equals_the_full_softmax(tmp_path, tiny_model_dir, spec, monkeypatch):
    """Single-token pairs in the last layer train on the two answer logits alone (the log-partition cancels):
    the same margins as through the full softmax, under Adam and weight decay too."""
    cfg = dpo_cfg(regime="last_layer", steps=8, eval_every=4, optimizer="adamw", lr=1e-2, weight_decay=0.01,
                  append_eos=False, batch_size=8)
    _, _, fast = train_run(tmp_path / "fast", tiny_model_dir, spec, cfg)
    info = yaml.safe_load((tmp_path / "fast" / "run.json").read_text())
    metrics = pd.read_parquet(tmp_path / "fast" / "x.parquet")
    real_init = Policy.__init__

    def full_softmax(self, *a, **kw):
        real_init(self, *a, **kw)
        self.margin_only = False

    monkeypatch.setattr(Policy, "__init__", full_softmax)
    _, _, slow = train_run(tmp_path / "slow", tiny_model_dir, spec, cfg)
    np.testing.assert_allclose(fast["margin"], slow["margin"], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(fast["logp_chosen"], slow["logp_chosen"], atol=1e-5)
    assert (fast.loc[fast["step"] == 8, "margin"] != 0).all() and info["regime"] == "last_layer"
    slow_metrics = pd.read_parquet(tmp_path / "slow" / "x.parquet")
    np.testing.assert_allclose(metrics["loss"], slow_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], slow_metrics["rewards/margins"], atol=1e-6)
    # absolute rewards and log-probs are not computed on this path: left empty rather than mixed in
    assert metrics["rewards/chosen"].isna().all() and slow_metrics.loc[1:, "rewards/chosen"].notna().all()


@pytest.mark.parametrize("append_eos", [False, True])
def test_last_layer_cache_from_reference_features_or_forward_pass(tmp_path, tiny_model_dir, spec, append_eos):
    """Single-token pairs reuse the reference pass's g(x); multi-token pairs cache every target by a forward
    pass. Either way the margins are those of the same head on the same hidden states."""
    cfg = dpo_cfg(regime="last_layer", steps=6, eval_every=3, optimizer="adam", lr=1e-2, append_eos=append_eos)
    _, _, a = train_run(tmp_path / "a", tiny_model_dir, spec, cfg, use_features=True)
    _, _, b = train_run(tmp_path / "b", tiny_model_dir, spec, cfg, use_features=False)
    assert (a.loc[a["step"] == 0, "margin"] == 0).all() and (b.loc[b["step"] == 0, "margin"] == 0).all()
    np.testing.assert_allclose(a["margin"], b["margin"], atol=1e-6, rtol=0)
    assert (a.loc[a["step"] == 6, "margin"] != 0).all()


def multiple_choice(df: pd.DataFrame) -> pd.DataFrame:
    """The synthetic Yes/No pairs as a multiple-choice question: answers " (A)" / " (B)" (several tokens each,
    differing in one), chosen " (A)" in cluster +1 and " (B)" in cluster -1."""
    out = df.copy()
    out["prompt"] = df["prompt"] + "Choices: (A) Yes (B) No\nAnswer:"
    yes = df["chosen"] == " Yes"
    out["chosen"] = np.where(yes, " (A)", " (B)")
    out["rejected"] = np.where(yes, " (B)", " (A)")
    return out


def assert_recursion(tmp_path, model_dir, spec, loss="sigmoid", extra=None, score="sequence", pairs_as=None):
    """Train the head alone by full-batch GD and compare every checkpoint's margins with the recursion."""
    extra = extra or {}
    beta, lr, steps = 0.5, (0.002 if loss == "ipo" else 0.1), 24
    cfg = dpo_cfg(regime="last_layer", optimizer="sgd", lr=lr, beta=beta, batch_size="full", steps=steps,
                  eval_every=6, max_grad_norm=None, weight_decay=0.0, append_eos=False, dtype="float64",
                  loss=loss, score=score, **extra)
    train, test = generate(2, 6, 3, spec)
    if pairs_as is not None:
        train, test = pairs_as(train), pairs_as(test)
    train, test = validate_pairs(train, "train"), validate_pairs(test, "test")
    reference.compute_reference(model_dir, train, test, cfg, tmp_path / "ref.parquet", tmp_path / "feat.npy")
    loop.train_dpo(model_dir, train, test, tmp_path / "ref.parquet", cfg, 0, tmp_path / "m", tmp_path / "x.parquet",
                   tmp_path / "w", out_info=tmp_path / "run.json", ref_features_path=tmp_path / "feat.npy")
    m = tables.read_margins(tmp_path / "m")
    _, tok = M.load(model_dir)
    pairs = pd.concat([train, test], ignore_index=True)
    enc = encode_pairs(tok, pairs["prompt"], pairs["chosen"], pairs["rejected"], append_eos=False, score=score)
    assert enc.fused.all()  # single-token responses after the same prompt
    w = np.array([t[0, 1] for t in enc.row_targets])
    lo = np.array([t[1, 1] for t in enc.row_targets])
    g = np.load(tmp_path / "feat.npy")  # g(x) from the reference pass (same row order as pairs)
    assert g.dtype == np.float64
    n = len(train)
    pred = dynamics.predicted_margins(g[:n], w[:n], lo[:n], g, w, lo, beta=beta, lr=lr, steps=steps,
                               checkpoints=range(0, steps + 1, 6), loss=loss, **extra)
    for step, r_pred in pred.items():
        got = m[m["step"] == step].set_index("sample_id")["margin"]
        r_meas = got.loc[pairs["sample_id"]].to_numpy()
        if step == 0:
            assert (r_meas == 0).all()
            continue
        rel = np.linalg.norm(r_meas - r_pred) / np.linalg.norm(r_pred)
        assert rel < 1e-6, (step, rel)
        assert np.abs(r_pred).max() > 1e-3  # the margins really moved
    return pd.read_parquet(tmp_path / "ref.parquet")


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("hinge", {}),
                                        ("robust", {"label_smoothing": 0.2}),
                                        ("ipo", {})])
def test_last_layer_margins_equal_the_recursion(tmp_path, tiny_model_dir, spec, loss, extra):
    """docs/theory.md section 2: with the head alone training by full-batch GD, single-token answers and no
    weight decay, margins follow r_j(k+1) = r_j(k) + η(β²/N) Σ_i −f′(r_i) C_ij exactly, for train and
    held-out pairs alike."""
    assert_recursion(tmp_path, tiny_model_dir, spec, loss, extra)


def test_first_difference_puts_multiple_choice_pairs_in_the_recursion(tmp_path, tiny_model_dir, spec):
    """Answers " (A)" / " (B)" are several tokens; scored by their first differing token ("A" against "B",
    after the shared " (") every pair is a single-token pair read at the last shared position, and the
    margins follow the recursion exactly."""
    ref = assert_recursion(tmp_path, tiny_model_dir, spec, score="first_difference", pairs_as=multiple_choice)
    assert (ref["n_tokens_chosen"] == 1).all() and (ref["n_tokens_rejected"] == 1).all()
    assert ref["token_chosen"].nunique() == 2 and (ref["token_chosen"] != ref["token_rejected"]).all()


def test_last_layer_trains_only_an_untied_head(tmp_path, tiny_gpt2_dir, spec):
    model, _ = M.load(tiny_gpt2_dir)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    emb = model.get_input_embeddings().weight.detach().clone()
    untie_head(model)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(model.get_output_embeddings().weight, emb)
    cfg = dpo_cfg(regime="last_layer", steps=4, eval_every=2, optimizer="adam", lr=1e-2)
    _, _, m = train_run(tmp_path, tiny_gpt2_dir, spec, cfg)
    assert (m.loc[m["step"] == 0, "margin"] == 0).all()
    assert (m.loc[m["step"] == 4, "margin"] != 0).all()
    info = yaml.safe_load((tmp_path / "run.json").read_text())
    assert (info["regime"] == "last_layer"
            and info["trainable_parameters"] == model.get_output_embeddings().weight.numel())


def test_lora_trains_adapters(tmp_path, tiny_model_dir, spec):
    cfg = dpo_cfg(regime="lora", steps=4, eval_every=2, lr=5e-3,
                  lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    _, _, m = train_run(tmp_path, tiny_model_dir, spec, cfg)
    assert (m.loc[m["step"] == 0, "margin"] == 0).all()
    assert (m.loc[m["step"] == 4, "margin"].abs() > 0).all()
    info = yaml.safe_load((tmp_path / "run.json").read_text())
    base, _ = M.load(tiny_model_dir)
    assert 0 < info["trainable_parameters"] < sum(p.numel() for p in base.parameters()) / 10


def test_autocast_keeps_logps_fp32(tmp_path, tiny_model_dir, spec):
    cfg = dpo_cfg(autocast="bfloat16", steps=2, eval_every=1)
    _, _, m = train_run(tmp_path, tiny_model_dir, spec, cfg)
    assert (m.loc[m["step"] == 0, "margin"] == 0).all()
    assert np.isfinite(m["margin"]).all()


def test_epochs_set_the_number_of_steps(tmp_path, tiny_model_dir, spec):
    cfg = dpo_cfg(epochs=1.5, batch_size=8, eval_every=None, eval_steps=[])
    train, _, m = train_run(tmp_path, tiny_model_dir, spec, cfg)  # 24 train pairs: 1.5 epochs = 36 = 4.5 batches
    assert sorted(m["step"].unique()) == [0, 5]


def test_theory_stage_predicts_the_measured_margins(tmp_path, tiny_model_dir, spec):
    """The theory stage's dynamics: exact in the theorems' regime; a fitted time scale for Adam; no
    prediction (with the reason) for multi-token answers."""
    exact = dpo_cfg(regime="last_layer", optimizer="sgd", lr=0.1, beta=0.5, batch_size="full", steps=12,
                    eval_every=4, max_grad_norm=None, weight_decay=0.0, append_eos=False, dtype="float64")
    train, test, m = train_run(tmp_path / "a", tiny_model_dir, spec, exact)
    ref = pd.read_parquet(tmp_path / "a" / "ref.parquet")
    per_pair, dyn = dynamics.dynamics(np.load(tmp_path / "a" / "feat.npy"), ref, m, exact, K=2)
    assert dyn["method"].str.startswith("exact").all()
    moved = per_pair[per_pair["step"] > 0]
    assert np.abs(moved["predicted"] - moved["measured"]).max() < 1e-6 * np.abs(moved["measured"]).max()
    assert set(dyn["split"]) == {"train", "test"} and len(dyn) == 2 * 4
    assert (dyn["r_L"] <= dyn["r_U"]).all()

    adam = dpo_cfg(regime="last_layer", optimizer="adam", lr=1e-2, batch_size="full", steps=12, eval_every=4,
                   append_eos=False)
    _, _, m2 = train_run(tmp_path / "b", tiny_model_dir, spec, adam)
    per_pair, dyn = dynamics.dynamics(np.load(tmp_path / "b" / "feat.npy"),
                                      pd.read_parquet(tmp_path / "b" / "ref.parquet"), m2, adam, K=2)
    assert dyn["method"].str.contains("fitted").all() and np.isfinite(dyn["eta"]).all()
    first = dyn[(dyn["step"] == 4) & (dyn["split"] == "train")].iloc[0]
    # the slope at t = 0 is fitted to the first checkpoint, so there the two agree up to the curvature
    assert first["predicted_margin"] == pytest.approx(first["measured_margin"], rel=0.05)

    eos = dpo_cfg(steps=2, eval_every=1, append_eos=True)
    _, _, m3 = train_run(tmp_path / "c", tiny_model_dir, spec, eos)
    none, reason = dynamics.dynamics(np.load(tmp_path / "c" / "feat.npy"),
                                     pd.read_parquet(tmp_path / "c" / "ref.parquet"), m3, eos, K=2)
    assert none is None and "single tokens" in reason
