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
