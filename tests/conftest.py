import shutil
from pathlib import Path

import pytest

from dpogen import model as M
from dpogen.settings import DPO, Scratch
from dpogen.data.synthetic import SyntheticSpec, corpus

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PERSONA = SHARED / "data" / "persona"

TINY_ARCH = Scratch(arch="llama", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   max_position_embeddings=128, tie_word_embeddings=False)


def dpo_settings(**kw) -> DPO:
    """The default's dpo settings (config/config.yaml) with ``kw`` changed, typed as the workflow builds them."""
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["dpo"]
    return DPO.model_validate({**cfg, **kw})


@pytest.fixture(scope="session")
def spec():
    return SyntheticSpec(n_concepts=4, topic_words=6, stance_words=4, seed=3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, spec):
    """A tiny Llama and a BPE tokenizer trained on synthetic text, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = M.train_tokenizer(corpus(spec, 8), 400)
    model = M.build_scratch(TINY_ARCH, tok, seed=0)
    M.save(model, tok, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tok = M.train_tokenizer(corpus(spec, 8), 400)
    model = M.build_scratch(TINY_ARCH.replace(arch="gpt2", tie_word_embeddings=True), tok, seed=0)
    M.save(model, tok, folder)
    return folder


@pytest.fixture(scope="session")
def _reference_pass(tmp_path_factory, tiny_model_dir, spec):
    """The reference pass of the tiny model over small synthetic pairs, computed once per session."""
    from dpogen import reference
    from dpogen.data.stage import validate_pairs
    from dpogen.data.synthetic import generate

    folder = tmp_path_factory.mktemp("reference")
    train, test = generate(2, 4, 2, spec)
    train, test = validate_pairs(train, "train"), validate_pairs(test, "test")
    reference.compute_reference(tiny_model_dir, train, test, dpo_settings(), folder / "ref.parquet",
                                folder / "feat.npy")
    train.to_parquet(folder / "train.parquet")
    test.to_parquet(folder / "test.parquet")
    return folder, train, test


@pytest.fixture
def reference_run(tmp_path, _reference_pass):
    """The one trained-run starting point of the engine tests: 2 concepts, 4 training and 2 held-out pairs per
    (concept, cluster), their reference log-probs (``tmp_path/ref.parquet``, g(x) in ``feat.npy``) and the
    pairs as Parquet for launched processes (``train.parquet``, ``test.parquet``), all in ``tmp_path``; with
    the default dpo settings, which each test changes with ``.replace``. Returns (train, test, settings)."""
    folder, train, test = _reference_pass
    for name in ("ref.parquet", "feat.npy", "train.parquet", "test.parquet"):
        shutil.copy2(folder / name, tmp_path / name)
    return train.copy(), test.copy(), dpo_settings()


@pytest.fixture
def tiny(tiny_model_dir):
    return M.load(tiny_model_dir)


def copy_repo(dest: Path) -> Path:
    """A copy of the workflow's files, so a test may edit the library without touching the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["Snakefile", "rules", "workflow_scripts", "src", "config", "report", "envs", "profiles"]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def kill_at_checkpoint(monkeypatch, step: int):
    """A simulated kill: the margin checkpoint at ``step`` raises KeyboardInterrupt (after the resume saves
    before it). Returns the function that lets checkpoints be written again."""
    from dpogen import tables

    real = tables.write_margins_checkpoint

    def fail(df, folder, s):
        if s == step:
            raise KeyboardInterrupt("simulated kill")
        return real(df, folder, s)

    monkeypatch.setattr(tables, "write_margins_checkpoint", fail)
    return lambda: monkeypatch.setattr(tables, "write_margins_checkpoint", real)
