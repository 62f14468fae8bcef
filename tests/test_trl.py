"""Agreement with TRL's DPOTrainer on the same tiny model, batch and β: per-pair policy and reference
log-probs, rewards, margins and the loss, for each loss type TRL shares with dpogen."""

import os

import numpy as np
import pytest
import torch

from dpogen import tables
from dpogen.engine.loss import dpo_loss
from dpogen import model as M
from dpogen.logprobs import encode_pairs, pair_logps

trl = pytest.importorskip("trl", reason="trl is a test dependency (pip install -e '.[test]')")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

BETA = 0.1
PROMPTS = [f'Is the following statement something you would say?\n"I {v} {o}."\n'
           for v, o in [("like", "people"), ("avoid", "things"), ("keep", "the world"), ("find", "life"),
                        ("call", "others"), ("like", "the work"), ("keep", "everyone"), ("avoid", "our future")]]
CHOSEN = [" Yes", " No", " Yes", " No", " Yes, clearly and always", " No", " I would say so", " Yes"]
REJECTED = [" No", " Yes", " No", " Yes", " No", " Not at all, never", " No", " Perhaps"]


@pytest.fixture(scope="module")
def policy_and_ref(tmp_path_factory, tiny_model_dir):
    """The reference is the tiny model; the policy is the reference with noise, so rewards are not zero."""
    folder = tmp_path_factory.mktemp("policy")
    model, tok = M.load(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g) * p.std().clamp(min=1e-3))
    M.save(model, tok, folder)
    return folder, tiny_model_dir


def trl_values(policy_dir, ref_dir, loss_type, label_smoothing=0.0):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    args = trl.DPOConfig(output_dir=str(policy_dir / f"trl-{loss_type}"), report_to="none", use_cpu=True, bf16=False,
                         fp16=False, gradient_checkpointing=False, beta=BETA, loss_type=[loss_type],
                         label_smoothing=label_smoothing, per_device_train_batch_size=len(PROMPTS),
                         per_device_eval_batch_size=len(PROMPTS), disable_tqdm=True, save_strategy="no")
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32),
                             args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(PROMPTS))])
    trainer.model.eval()
    pol = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch), 1)
    ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, batch), 1)
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return pol.double(), ref.double(), loss, metrics


def ours(policy_dir, ref_dir):
    out = []
    for folder in (policy_dir, ref_dir):
        model, tok = M.load(folder)
        model.eval()
        enc = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, append_eos=True)  # TRL always appends EOS
        with torch.no_grad():
            out.append(pair_logps(model, enc).double())
    return out[0], out[1], torch.tensor(enc.n_tokens, dtype=torch.float64)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_matches_trl(policy_and_ref, loss_type, eps):
    policy_dir, ref_dir = policy_and_ref
    t_pol, t_ref, t_loss, t_metrics = trl_values(policy_dir, ref_dir, loss_type, eps)
    pol, ref, n_tok = ours(policy_dir, ref_dir)
    np.testing.assert_allclose(pol, t_pol, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ref, t_ref, atol=1e-5, rtol=0)
    rewards = BETA * (pol - ref)
    t_rewards = BETA * (t_pol - t_ref)
    np.testing.assert_allclose(rewards, t_rewards, atol=1e-5, rtol=0)
    np.testing.assert_allclose(rewards[:, 0] - rewards[:, 1], t_rewards[:, 0] - t_rewards[:, 1], atol=1e-5, rtol=0)
    ours_name = {"ipo": "ipo_norm"}.get(loss_type, loss_type)  # TRL's IPO is the token-mean variant
    loss = dpo_loss(pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1], BETA, ours_name, eps, n_tok).mean().item()
    assert loss == pytest.approx(t_loss, abs=1e-5)
    # the aggregate metrics carry TRL's names and meanings
    agg = {"rewards/chosen": rewards[:, 0].mean(), "rewards/rejected": rewards[:, 1].mean(),
           "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
           "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).double().mean(),
           "logps/chosen": pol[:, 0].mean(), "logps/rejected": pol[:, 1].mean()}
    for name, value in agg.items():
        assert float(value) == pytest.approx(t_metrics[name], abs=1e-5), name
    assert set(agg) <= set(tables.METRICS.names)
