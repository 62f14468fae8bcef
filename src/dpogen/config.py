"""Workflow configuration: the sweep, per-run settings, checks the JSON schema cannot express, code hashes."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

SRC = Path(__file__).resolve().parent


class ConfigError(ValueError):
    pass


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key '{dotted}' does not exist (at '{part}')")
        node = node[part]
    return node


def put(cfg: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    node = cfg
    for part in head:
        node = node[part]
    if last not in node:
        raise ConfigError(f"config key '{dotted}' does not exist")
    node[last] = value


def runs(cfg: dict) -> dict[str, object]:
    """Run name → sweep value, e.g. {'k1': 1, 'k2': 2}. Without a sweep, one run named 'main'."""
    sweep = cfg.get("sweep")
    if not sweep:
        return {"main": None}
    prefix = sweep.get("prefix") or sweep["param"].split(".")[-1]
    out = {}
    for v in sweep["values"]:
        name = f"{prefix}{v}"
        if name in out:
            raise ConfigError(f"sweep.values: {v!r} given twice")
        out[name] = v
    return out


def run_config(cfg: dict, run: str) -> dict:
    """The full config of one run: the sweep's parameter set to the run's value."""
    rc = copy.deepcopy(cfg)
    value = runs(cfg)[run]
    if value is not None:
        put(rc, cfg["sweep"]["param"], value)
    return rc


def check(cfg: dict) -> None:
    """Checks beyond the schema, run before any job; each message names the key."""
    from .dpo import eval_schedule

    if cfg.get("sweep"):
        get(cfg, cfg["sweep"]["param"])
    if cfg["model"]["source"] == "pretrained" and not cfg["model"]["pretrained"].get("path"):
        raise ConfigError("model.pretrained.path: a pretrained model needs a hub id or a local folder")
    for run in runs(cfg):
        rc = run_config(cfg, run)
        try:
            if not rc["dpo"].get("epochs"):
                eval_schedule(rc["dpo"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        d = rc["data"]
        if d["source"] == "synthetic":
            if d["k"] is None:
                raise ConfigError("data.k: the synthetic source needs a number of concepts K")
            if d["k"] > d["synthetic"]["n_concepts"]:
                raise ConfigError(f"data.k: K={d['k']} (run {run}) is larger than the number of concepts, "
                                  f"data.synthetic.n_concepts={d['synthetic']['n_concepts']}")
        if d["source"] == "persona" and d["k"] and not d["persona"].get("names"):
            from .sources import DataError, persona_names, persona_set

            folder = Path(d["persona"]["path"])
            if folder.is_dir():
                try:
                    persona_set(persona_names(folder), d["k"], d["persona"]["seed"])
                except DataError as e:
                    raise ConfigError(f"{e} (run {run})") from None
        if rc["dpo"]["batch_size"] not in (None, "full") and rc["dpo"]["batch_size"] % rc["dpo"]["grad_accum"]:
            raise ConfigError("dpo.grad_accum: must divide dpo.batch_size")


STAGE_MODULES = {
    "data": ["data.py", "sources.py", "synthetic.py", "logprobs.py", "model.py"],
    "base": ["model.py", "data.py", "sources.py", "synthetic.py", "logprobs.py"],
    "sft": ["sft.py", "model.py", "training.py"],
    "ref": ["reference.py", "logprobs.py", "model.py"],
    "dpo": ["dpo.py", "reference.py", "logprobs.py", "model.py", "training.py", "distributed.py", "launch.py"],
    "theory": ["theory.py"],
    "report": ["report.py", "paper.py"],
}
COMMON_MODULES = ["io.py", "tables.py"]


def code_hash(stage: str) -> str:
    """Hash of the library modules a stage runs; a rule param, so editing them reruns the stage."""
    h = hashlib.sha256()
    for name in sorted(STAGE_MODULES[stage] + COMMON_MODULES):
        h.update(name.encode())
        h.update((SRC / name).read_bytes())
    return h.hexdigest()[:16]
