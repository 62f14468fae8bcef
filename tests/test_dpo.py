import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpogen import tables
from dpogen.engine import loop, schedule
from dpogen.engine.loss import dpo_loss
from tests.conftest import dpo_settings, kill_at_checkpoint


def L(h, beta, *a, **kw):
    """dpo_loss for a given log-ratio difference h (chosen ratio h, rejected ratio 0)."""
    return dpo_loss(h, torch.zeros_like(h), beta, *a, **kw)


def test_sigmoid_loss_is_minus_log_sigmoid_of_margin():
    h = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    beta = 0.1
    got = L(h, beta)
    want = torch.tensor([math.log1p(math.exp(-beta * x)) for x in h.tolist()])
    assert torch.allclose(got, want, atol=1e-7)
    assert got[1] == pytest.approx(math.log(2))


def test_loss_variants():
    h = torch.tensor([-1.0, 0.0, 2.0, 30.0])
    beta, eps = 0.5, 0.2
    r = beta * h
    cdpo = L(h, beta, "sigmoid", eps)
    want = -(1 - eps) * torch.log(torch.sigmoid(r)) - eps * torch.log(torch.sigmoid(-r))
    assert torch.allclose(cdpo, want, atol=1e-6)
    robust = L(h, beta, "robust", eps)
    want = (-(1 - eps) * torch.log(torch.sigmoid(r)) + eps * torch.log(torch.sigmoid(-r))) / (1 - 2 * eps)
    assert torch.allclose(robust, want, atol=1e-6)
    assert torch.allclose(L(h, beta, "ipo"), (h - 1 / (2 * beta)) ** 2)
    assert torch.allclose(L(h, beta, "hinge"), torch.clamp(1 - r, min=0))
    # TRL's IPO: each log-ratio divided by its response's token count
    rc, rr, n = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([[2.0, 4.0], [1.0, 3.0]])
    want = (rc / n[:, 0] - rr / n[:, 1] - 1 / (2 * beta)) ** 2
    assert torch.allclose(dpo_loss(rc, rr, beta, "ipo_norm", n_tokens=n), want)
    with pytest.raises(ValueError, match="unknown"):
        L(h, beta, "nope")


def test_gradient_pushes_margin_up():
    h = torch.zeros(3, requires_grad=True)
    for loss in ("sigmoid", "ipo", "hinge", "robust"):
        h.grad = None
        L(h, 0.1, loss, 0.1 if loss == "robust" else 0.0).sum().backward()
        assert (h.grad < 0).all(), loss


def test_eval_schedule():
    cfg = dpo_settings(steps=10, eval_every=4, eval_steps=[3])
    assert schedule.eval_schedule(cfg) == [0, 3, 4, 8, 10]
    with pytest.raises(ValueError, match="eval_steps"):
        schedule.eval_schedule(dpo_settings(steps=10, eval_every=None, eval_steps=[11]))


def test_batches_depend_on_step_only():
    a = [schedule.batch_indices(s, 10, 4, seed=1) for s in range(6)]
    b = [schedule.batch_indices(s, 10, 4, seed=1) for s in range(6)]
    assert all((x == y).all() for x, y in zip(a, b))
    # five steps of four cover two epochs: every index exactly twice
    assert np.bincount(np.concatenate(a[:5]), minlength=10).tolist() == [2] * 10


@pytest.fixture
def small_run(reference_run):
    train, test, cfg = reference_run
    return train, test, cfg.replace(steps=6, batch_size=4, eval_every=3, save_every=2, log_every=2)


def _train(tmp_path, tiny_model_dir, run, name):
    train, test, cfg = run
    out = tmp_path / name
    loop.train_dpo(tiny_model_dir, train, test, tmp_path / "ref.parquet", cfg, 7, out / "margins",
                   out / "metrics.parquet", out / "work")
    return tables.read_margins(out / "margins"), pd.read_parquet(out / "metrics.parquet")


def plain_logps(model, tok, prompts, answers) -> np.ndarray:
    """Σ log p(answer tokens | prompt) with plain transformers, one text at a time: the answer is what
    tokenize(prompt + answer) holds beyond tokenize(prompt) (no EOS, the default)."""
    out = []
    for p, a in zip(prompts, answers):
        n = len(tok(p)["input_ids"])
        ids = torch.tensor([tok(p + a)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        out.append(sum(float(logp[q - 1, ids[0, q]]) for q in range(n, ids.shape[1])))
    return np.array(out)


def test_training_records_every_pair_and_is_reproducible(tmp_path, tiny_model_dir, small_run, monkeypatch):
    """Every pair at every checkpoint, and each margin equal to β((log π − log π_ref)(chosen) − (log π −
    log π_ref)(rejected)) computed independently with plain transformers from the trained weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = {}
    real = loop.MarginWriter.__call__

    def keep_weights(self, step):  # the policy's weights at each checkpoint, for the independent computation
        weights[step] = {k: v.detach().clone() for k, v in self.policy.model.state_dict().items()}
        return real(self, step)

    monkeypatch.setattr(loop.MarginWriter, "__call__", keep_weights)
    m, metrics = _train(tmp_path, tiny_model_dir, small_run, "a")
    monkeypatch.setattr(loop.MarginWriter, "__call__", real)
    train, test, cfg = small_run
    assert sorted(m["step"].unique()) == [0, 3, 6]
    assert len(m) == (len(train) + len(test)) * 3
    assert (m[m["step"] == 0]["margin"] == 0).all()  # exactly: θ = ref at step 0
    assert not (m[m["step"] == 6]["margin"] == 0).any()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = pd.concat([train, test], ignore_index=True)
    ref = [plain_logps(model, tok, pairs["prompt"], pairs[c]) for c in ("chosen", "rejected")]
    model.load_state_dict(weights[6])
    pol = [plain_logps(model, tok, pairs["prompt"], pairs[c]) for c in ("chosen", "rejected")]
    want = pd.Series(cfg.beta * ((pol[0] - ref[0]) - (pol[1] - ref[1])), index=pairs["sample_id"])
    last = m[m["step"] == 6].set_index("sample_id")["margin"]
    np.testing.assert_allclose(last.to_numpy(), want.loc[last.index].to_numpy(), rtol=1e-4, atol=1e-5)
    assert metrics["step"].tolist() == list(range(7))
    assert metrics.loc[metrics["step"].isin([0, 3, 6]), "test_error"].notna().all()
    assert metrics.loc[metrics["step"] == 0, "train_error"].item() == 1.0  # margin 0 counts as an error
    m2, _ = _train(tmp_path, tiny_model_dir, small_run, "b")
    pd.testing.assert_frame_equal(m, m2)  # same config twice: same margins


def test_resume_from_saved_state_gives_identical_tables(tmp_path, tiny_model_dir, small_run, monkeypatch):
    full, full_metrics = _train(tmp_path, tiny_model_dir, small_run, "full")
    # interrupt a run after its step-4 save by failing the step-6 checkpoint, then run again
    restore = kill_at_checkpoint(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, tiny_model_dir, small_run, "resumed")
    assert (tmp_path / "resumed" / "work" / "save" / "meta.pt").exists()
    assert not (tmp_path / "resumed" / "margins").exists()  # nothing half-written in the outputs
    restore()
    resumed, resumed_metrics = _train(tmp_path, tiny_model_dir, small_run, "resumed")
    pd.testing.assert_frame_equal(full, resumed)
    cols = [c for c in full_metrics.columns if c not in ("pairs_per_s", "elapsed_s")]
    pd.testing.assert_frame_equal(full_metrics[cols], resumed_metrics[cols])
    assert not (tmp_path / "resumed" / "work").exists()


def test_policy_features_are_saved_at_the_chosen_checkpoints(tmp_path, tiny_model_dir, small_run):
    """When the backbone trains, g(x) of the training pairs is saved at schedule.geometry_steps: the reference's
    g(x) to rounding when the weights barely move, and visibly different once they train."""
    train, test, cfg = small_run
    ref_feats = np.load(tmp_path / "feat.npy")
    for name, lr, close in (("still", 1e-12, True), ("moved", 1e-2, False)):
        c = cfg.replace(geometry_steps=[3, "last"], optimizer="sgd", lr=lr)
        out = tmp_path / name
        loop.train_dpo(tiny_model_dir, train, test, tmp_path / "ref.parquet", c, 7, out / "margins",
                      out / "metrics.parquet", out / "work", out_features=out / "features")
        index = json.loads((out / "features" / "index.json").read_text())
        assert index["steps"] == [3, 6]
        for s in (3, 6):
            g = np.load(out / "features" / f"step={s}.npy")
            assert g.shape == (len(train), ref_feats.shape[1])
            assert np.allclose(g, ref_feats[: len(train)], atol=1e-5) == close, (name, s)
    with pytest.raises(ValueError, match="geometry_steps"):
        schedule.geometry_steps(dpo_settings(steps=6, geometry_steps=[4]), [0, 3, 6])
