"""Bad configuration stops the run before any job, with a message naming the key."""

import pytest
import yaml

from dpogen.codehash import stage_hash
from dpogen.config import ConfigError, load, run_config, run_settings, runs
from dpogen.settings import build
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
    ({"dpo": {"beta": float("nan")}}, "dpo.beta = nan: should be a finite number"),
    ({"dpo": {"lr": float("inf")}}, "dpo.lr = inf: should be a finite number"),
    ({"sweep": {"param": "dpo.lr", "values": [0.001, float("inf")]}},
     "dpo.lr = inf: should be a finite number (run lrinf)"),
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
    assert runs(build(cfg)) == {"k1": 1, "k2": 2, "k4": 4, "k8": 8}
    assert run_settings(cfg, "k4").data.k == 4 and run_config(cfg, "k4")["data"]["k"] == 4
    assert cfg["data"]["k"] == 1  # run_config copies; the base config is untouched


def test_run_config_rejects_unknown_key():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="data.nope"):
        run_config({**cfg, "sweep": {"param": "data.nope", "values": [1]}}, "nope1")


def test_config_file_is_the_settings_defaults():
    """config/config.yaml, the commented file a user edits, holds every setting at its typed default (the
    sweep over K and the experiment's name aside): one place for a default, read back from both."""
    from dpogen.settings import Settings

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    defaults = Settings.model_validate({"experiment": "x", "seed": 0, "data": {}, "model": {}, "sft": {}, "dpo": {},
                                        "theory": {}}).model_dump()
    written = build(cfg).model_dump()
    for key in ("experiment", "seed", "sweep"):
        written.pop(key), defaults.pop(key)
    differ = {f"{s}.{k}": (written[s][k], defaults[s][k]) for s in defaults for k in defaults[s]
              if written[s][k] != defaults[s][k]}
    assert differ == {}, differ
    # and the file names every key (a key left out of the file is documented nowhere a user reads)
    missing = {f"{s}.{k}" for s in defaults for k in defaults[s] if k not in (cfg.get(s) or {})}
    assert missing == set(), missing


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
    """Every experiment file, merged over config.yaml as --configfile does, builds into settings and passes
    the checks, and names the compute it needs at its top."""
    from dpogen import config as C

    monkeypatch.setattr(C, "check_model_path", lambda pre: None)  # model files a clone has not fetched
    text = path.read_text()
    assert text.startswith("# Compute"), path
    cfg = _merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), yaml.safe_load(text))
    s, rss = load(cfg)
    assert s.experiment == path.stem
    from dpogen.plan import memory as plan

    plans = plan.plan(rss) if s.resources.gpu_mem_gb else None
    plan.check(s, rss, plans)  # the configs that name their GPUs fit them
    if path.stem.startswith(("v3-", "v5-full")):
        dpo = next(iter(plans.values()))["dpo"]
        if path.stem == "v5-full-llama3.1-70b":  # 4 nodes x 8 GPUs, planned under 60 GB each
            assert dpo["resources"]["gpus"] == 32 and dpo["resources"]["nodes"] == 4
            assert dpo["per_gpu"]["total"] < 60e9 and s.resources.gpu_mem_gb == 60
        else:
            assert dpo["resources"]["gpus"] == 4 and s.resources.gpu_mem_gb == 80
            # the 2-node variant named in the header is the plan's for twice the processes over 2 nodes
            two = _merge(cfg, {"dpo": {"processes": 8}, "resources": {"nodes": 2, "gpus": 8}})
            dpo2 = next(iter(plan.plan(load(two)[1]).values()))["dpo"]
            assert dpo2["resources"]["gpus_per_node"] == 4 and dpo2["per_gpu"]["total"] < dpo["per_gpu"]["total"]
            assert text.splitlines()[1].startswith("# On 2 nodes (resources.nodes: 2, dpo.processes: 8)")
            assert f"per GPU {dpo2['per_gpu']['total'] / 1e9:.1f} GB in dpo" in text.splitlines()[1]
        # the header is the plan's
        assert f"per GPU {dpo['per_gpu']['total'] / 1e9:.1f} GB in dpo" in text.splitlines()[0]
    if path.stem == "v5-full-llama3.1-8b":
        assert dpo["per_gpu"]["total"] < 60e9


def test_a_sweep_over_another_key_is_named_by_that_key():
    """The default's prefix k belongs to data.k: a sweep over dpo.beta merged over it is named beta0.1, ...,
    never k0.1 (which reads as a value of K); a prefix given for that key stays."""
    from dpogen.config import normalize
    from dpogen.config import merge

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg = normalize(merge(base, {"sweep": {"param": "dpo.beta", "values": [0.1, 0.5]}}))
    assert list(runs(build(cfg))) == ["beta0.1", "beta0.5"]
    cfg = normalize(merge(base, {"sweep": {"param": "dpo.beta", "values": [0.1], "prefix": "b"}}))
    assert list(runs(build(cfg))) == ["b0.1"]
    assert list(runs(build(normalize(base)))) == ["k1", "k2", "k4", "k8"]


def test_a_schema_error_is_one_line_not_the_schema(tmp_path):
    """An unknown key or a value outside an enum: one line naming the run, the key and what is allowed, not
    Snakemake's dump of the whole schema."""
    for override, line in (({"dpo": {"learning_rate": 0.1}}, "unknown key(s) learning_rate in dpo; known: "),
                           ({"dpo": {"loss": "nope"}}, "dpo.loss = 'nope': should be 'sigmoid', 'ipo'")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"experiment": "bad", **override}))
        p = snakemake(REPO, tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and line in out, out[-2000:]
        assert "additionalProperties" not in out and "'$schema'" not in out and len(out.splitlines()) < 40


def test_an_sft_schedule_that_never_runs_is_not_checked():
    """sft.target: none trains nothing: its steps and warm-up are not held against each other."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["sft"] = {**cfg["sft"], "target": "none", "steps": 0}
    load(cfg)
