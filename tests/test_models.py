"""Loading models: by path with options, a pointer folder for the unchanged base model, GGUF conversion."""

import json

import pytest
import torch

from dpogen import model as M
from tests.conftest import REPO

GGUF_DIR = REPO / "models" / "smollm2"
GGUF = next(iter(sorted(GGUF_DIR.glob("*.gguf"))), None) if GGUF_DIR.is_dir() else None


def test_pointer_folder_loads_the_model_it_names(tmp_path, tiny_model_dir):
    M.save_pointer(tiny_model_dir, tmp_path / "ref", {"attn_implementation": "eager"})
    assert json.loads((tmp_path / "ref" / M.POINTER).read_text())["path"] == str(tiny_model_dir)
    a, _ = M.load(tmp_path / "ref")
    b, _ = M.load(tiny_model_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config._attn_implementation == "eager"


def test_load_options_reach_from_pretrained(tiny_model_dir):
    from dpogen.parallel import Dist, load_for
    from dpogen.settings import DPO, Model

    model, _ = M.load(tiny_model_dir, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    # a stage's model: the run's model.attn_implementation passed down, no module-wide state
    options = Model(attn_implementation="eager").load_options()
    model, _ = load_for(tiny_model_dir, DPO(), Dist("cpu"), load=options)
    assert options == {"attn_implementation": "eager"} and model.config._attn_implementation == "eager"
    model, _ = load_for(tiny_model_dir, DPO(), Dist("cpu"))
    assert model.config._attn_implementation != "eager"
    with pytest.raises((OSError, ValueError)):
        M.load(tiny_model_dir / "absent")


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="SmolLM2's GGUF file is not fetched (./scripts/fetch_smollm2.sh)")
def test_gguf_is_converted_once_to_plain_safetensors(tmp_path):
    M.convert_gguf(GGUF_DIR, GGUF.name, tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors").exists()
    model, tok = M.load(tmp_path / "base")  # no gguf_file: plain weights
    assert model.config.hidden_size == 576 and len(tok) == 49152
    assert len(tok(" Yes")["input_ids"]) == 1 and len(tok(" No")["input_ids"]) == 1
