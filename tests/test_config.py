"""Bad configuration stops the run before any job, with a message naming the key."""

import pytest
import yaml

from dpogen.codehash import stage_hash
from dpogen.config import ConfigError, run_config, runs
from tests.conftest import REPO
from tests.workflow_util import snakemake

BAD = [
    ({"dpo": {"beta": 0}}, "beta"),
    ({"dpo": {"beta": -0.5}}, "beta"),
    ({"dpo": {"beta": "high"}}, "beta"),
    ({"dpo": {"eval_steps": [5, 1000]}}, "dpo.eval_steps"),
    ({"data": {"synthetic": {"n_concepts": 4}}, "sweep": {"param": "data.k", "values": [2, 8]}}, "data.k"),
    ({"dpo": {"learning_rate": 0.1}}, "learning_rate"),
    ({"theory": {"confidence": 1.5}}, "confidence"),
    ({"sweep": {"param": "dpo.nonexistent", "values": [1]}}, "dpo.nonexistent"),
    # values that pass a type check but cannot be right (before any job, not inside the dpo job)
    ({"dpo": {"beta": float("nan")}}, "dpo.beta: nan is not a finite number (run k1)"),
    ({"dpo": {"lr": float("inf")}}, "dpo.lr: inf is not a finite number (run k1)"),
    ({"sweep": {"param": "dpo.lr", "values": [0.001, float("inf")]}}, "sweep.values[1]: inf is not a finite number"),
    ({"dpo": {"warmup_steps": 50, "steps": 4}}, "dpo.warmup_steps: 50 is more than dpo.steps: 4"),
    ({"sft": {"warmup_steps": 50, "steps": 4}}, "sft.warmup_steps: 50 is more than sft.steps: 4"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_stops_before_any_job(tmp_path, override, key):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"experiment": "bad", **override}))
    p = snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert p.returncode != 0
    assert key in p.stdout + p.stderr
    assert not (tmp_path / "results").exists()


def test_default_config_is_valid_and_sweeps_k():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert runs(cfg) == {"k1": 1, "k2": 2, "k4": 4, "k8": 8}
    assert run_config(cfg, "k4")["data"]["k"] == 4
    assert cfg["data"]["k"] == 1  # run_config copies; the base config is untouched


def test_run_config_rejects_unknown_key():
    with pytest.raises(ConfigError, match="data.nope"):
        run_config({"sweep": {"param": "data.nope", "values": [1]}, "data": {}}, "nope1")


def test_stage_hash_differs_by_stage():
    assert stage_hash("theory.py") == stage_hash("theory.py")
    assert stage_hash("theory.py") != stage_hash("dpo.py")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("path", sorted((REPO / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_configs_are_valid(path, monkeypatch):
    """Every experiment file, merged over config.yaml as --configfile does, passes the schema and checks,
    and names the compute it needs at its top."""
    from snakemake.utils import validate

    from dpogen import config as C
    from dpogen.config import check, normalize

    monkeypatch.setattr(C, "check_model_path", lambda pre: None)  # model files a clone has not fetched
    text = path.read_text()
    assert text.startswith("# Compute"), path
    cfg = normalize(_merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), yaml.safe_load(text)))
    validate(cfg, str(REPO / "config" / "schema.yaml"))
    check(cfg)
    assert cfg["experiment"] == path.stem
    from dpogen import plan

    plans = plan.plan(cfg) if cfg.get("resources", {}).get("gpu_mem_gb") else None
    plan.check(cfg, plans)  # the configs that name their GPUs fit them
    if path.stem.startswith(("v3-", "v5-full")):
        dpo = next(iter(plans.values()))["dpo"]
        assert dpo["resources"]["gpus"] == 4 and cfg["resources"]["gpu_mem_gb"] == 80
        # the header is the plan's
        assert f"per GPU {dpo['per_gpu']['total'] / 1e9:.1f} GB in dpo" in text.splitlines()[0]
    if path.stem == "v5-full-llama3.1-8b":
        assert dpo["per_gpu"]["total"] < 60e9


def test_a_sweep_over_another_key_is_named_by_that_key():
    """The default's prefix k belongs to data.k: a sweep over dpo.beta merged over it is named beta0.1, ...,
    never k0.1 (which reads as a value of K); a prefix given for that key stays."""
    from dpogen.config import normalize
    from dpogen.plan import merge

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg = normalize(merge(base, {"sweep": {"param": "dpo.beta", "values": [0.1, 0.5]}}))
    assert list(runs(cfg)) == ["beta0.1", "beta0.5"]
    cfg = normalize(merge(base, {"sweep": {"param": "dpo.beta", "values": [0.1], "prefix": "b"}}))
    assert list(runs(cfg)) == ["b0.1"]
    assert list(runs(normalize(base))) == ["k1", "k2", "k4", "k8"]


def test_a_schema_error_is_one_line_not_the_schema(tmp_path):
    """An unknown key or a value outside an enum: one line naming the run, the key and what is allowed, not
    Snakemake's dump of the whole schema."""
    for override, line in (({"dpo": {"learning_rate": 0.1}}, "run k1: unknown key(s) learning_rate in dpo; known: "),
                           ({"dpo": {"loss": "nope"}}, "run k1: dpo.loss = 'nope': not one of ['sigmoid', 'ipo'")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"experiment": "bad", **override}))
        p = snakemake(REPO, tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and line in out, out[-2000:]
        assert "additionalProperties" not in out and "'$schema'" not in out and len(out.splitlines()) < 40


def test_an_sft_schedule_that_never_runs_is_not_checked():
    """sft.target: none trains nothing: its steps and warm-up are not held against each other."""
    from dpogen.config import check, normalize

    cfg = normalize(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["sft"] = {**cfg["sft"], "target": "none", "steps": 0}
    check(cfg)
