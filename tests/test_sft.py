import torch
import yaml

from dpogen import model as M
from dpogen.data.stage import validate_pairs
from dpogen.settings import SFT
from dpogen.sft import encode_sft, sft_sequences, train_sft
from dpogen.data.synthetic import generate
from tests.conftest import REPO


def _cfg(**kw) -> SFT:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["sft"]
    return SFT.model_validate({**cfg, "steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1, **kw})


def test_targets(spec):
    train, _ = generate(1, 3, 1, spec)
    p, r = sft_sequences(train, "both")
    assert len(p) == 2 * len(train) and sorted(set(r)) == [" No", " Yes"]
    # both answers after every prompt: the reference learns the format, not the preference
    assert sorted(zip(p, r)) == sorted([(x, " Yes") for x in train["prompt"]] + [(x, " No") for x in train["prompt"]])
    p, r = sft_sequences(train, "chosen")
    assert r == list(train["chosen"])


def test_loss_on_response_masks_the_prompt(tiny):
    _, tok = tiny
    (ids, labels), = encode_sft(tok, ["A prompt\n"], [" Yes"], "response")
    n = len(tok("A prompt\n")["input_ids"])
    assert labels[:n] == [-100] * n and labels[n:] == ids[n:] and ids[-1] == tok.eos_token_id
    (ids, labels), = encode_sft(tok, ["A prompt\n"], [" Yes"], "all")
    assert labels == ids


def test_none_keeps_the_base_and_both_trains(tmp_path, tiny_model_dir, spec):
    train, _ = generate(1, 4, 1, spec)
    train = validate_pairs(train, "t")
    base, _ = M.load(tiny_model_dir)
    train_sft(tiny_model_dir, train, _cfg(target="none"), tmp_path / "none", 0)
    same, _ = M.load(tmp_path / "none")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), same.state_dict().values()))
    train_sft(tiny_model_dir, train, _cfg(target="both"), tmp_path / "both", 0)
    trained, _ = M.load(tmp_path / "both")
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
