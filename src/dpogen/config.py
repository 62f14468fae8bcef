"""Workflow configuration: the sweep, per-run settings, checks the JSON schema cannot express."""

from __future__ import annotations

import copy
import math
from pathlib import Path


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


def normalize(cfg: dict) -> dict:
    """Snakemake merges config files key by key: a grid sweep replaces the default's single axis rather
    than joining it. Called on the merged config before validation."""
    if isinstance(cfg.get("sweep"), dict) and "grid" in cfg["sweep"]:
        cfg["sweep"] = {k: cfg["sweep"][k] for k in ("grid", "seeds") if k in cfg["sweep"]}
    sweep = cfg.get("sweep")
    # the default's prefix k names its own axis, data.k: a sweep over another key, merged over it, would keep
    # it (k0.1, k0.5 for dpo.beta) and read as K values; that key's own name is used instead
    if isinstance(sweep, dict) and sweep.get("prefix") == DEFAULT_PREFIX[1] and sweep.get("param") not in (
            None, DEFAULT_PREFIX[0]):
        cfg["sweep"] = {k: v for k, v in sweep.items() if k != "prefix"}
    return cfg


DEFAULT_PREFIX = ("data.k", "k")  # config/config.yaml's sweep axis and its run-name prefix


def axes(cfg: dict) -> list[dict]:
    """The sweep's axes: one for ``sweep: {param, values}``, several for ``sweep: {grid: [...]}``."""
    sweep = cfg.get("sweep")
    if not sweep:
        return []
    if "grid" in sweep:
        return list(sweep["grid"])
    return [{k: v for k, v in sweep.items() if k != "seeds"}] if "param" in sweep else []


def _prefix(axis: dict) -> str:
    return axis.get("prefix") or axis["param"].split(".")[-1]


# the seeds a replicate offsets: model init and batch order, the data subsample and split, the generators
SEED_KEYS = ("seed", "data.seed", "data.split_seed", "data.synthetic.seed", "data.gaussian.seed")


def replicate_seeds(cfg: dict) -> list[int] | None:
    """``sweep.seeds``: the replicate offsets (None: no replicates)."""
    sweep = cfg.get("sweep") or {}
    return list(sweep["seeds"]) if sweep.get("seeds") is not None else None


def _table(cfg: dict) -> dict[str, tuple[object, int | None, str]]:
    """Run name → (sweep value, replicate offset or None, group: the name without the replicate)."""
    import itertools

    ax, seeds = axes(cfg), replicate_seeds(cfg)
    out = {}
    for combo in itertools.product(*[a["values"] for a in ax]):
        # a grid axis over ``seed`` is a replicate axis too: its runs form one group
        single = cfg.get("experiment") or "main"  # without a sweep: one run, named by the experiment
        group = "-".join(f"{_prefix(a)}{v}" for a, v in zip(ax, combo) if a["param"] != "seed") or single
        value = combo[0] if len(ax) == 1 else (combo if ax else None)
        for s in seeds if seeds is not None else [None]:
            base = "-".join(f"{_prefix(a)}{v}" for a, v in zip(ax, combo)) or single
            name = base if s is None else (f"s{s}" if not ax else f"{base}-s{s}")
            if name in out:
                raise ConfigError(f"sweep values: {combo!r} given twice (run {name})")
            out[name] = (value, s, group)
    return out


def runs(cfg: dict) -> dict[str, object]:
    """Run name → sweep value, e.g. {'k1': 1, 'k2': 2}; for a grid, name → tuple of values, e.g.
    {'k1-q8': (1, 8), ...} (every combination, the first axis outermost). Without a sweep, one run named by
    the experiment.
    With ``sweep.seeds: [0, 1, 2]`` every combination runs once per replicate: 'k1-s0', 'k1-s1', ..."""
    return {name: value for name, (value, _, _) in _table(cfg).items()}


def replicate(cfg: dict, run: str) -> int | None:
    """The run's replicate offset (``sweep.seeds``), None without replicates."""
    return _table(cfg)[run][1]


def group_label(cfg: dict, run: str) -> str:
    """The run's name without its replicate: the runs of one group differ only in their seeds."""
    return _table(cfg)[run][2]


def with_replicate(cfg: dict, s: int | None) -> dict:
    """``cfg`` with every seed of SEED_KEYS offset by replicate ``s`` (a copy; s 0 or None: unchanged)."""
    rc = copy.deepcopy(cfg)
    if s:
        for key in SEED_KEYS:
            try:
                value = get(rc, key)
            except ConfigError:
                continue
            if isinstance(value, int):
                put(rc, key, value + s)
    return rc


def sweep_title(cfg: dict) -> str:
    """The sweep's name in figures: its prefixes joined ('k', 'k-q'), or 'run' without a sweep."""
    return "-".join(_prefix(a) for a in axes(cfg)) or "run"


def sweep_label(cfg: dict, value) -> str | object:
    """The sweep value as the report shows it: the value for one axis, 'k=1 q=8' for a grid."""
    ax = axes(cfg)
    if len(ax) < 2:
        return value
    return " ".join(f"{_prefix(a)}={v}" for a, v in zip(ax, value))


def run_config(cfg: dict, run: str) -> dict:
    """The full config of one run: the sweep's parameters set to the run's values."""
    value, s, _ = _table(cfg)[run]
    rc = copy.deepcopy(cfg)
    ax = axes(cfg)
    for a, v in zip(ax, value if len(ax) > 1 else [value]):
        if v is not None:
            put(rc, a["param"], v)
    rc = with_replicate(rc, s)  # after the axes: a replicate offsets a swept seed too
    if rc["dpo"].get("gradient_checkpointing") is None:  # on for pretrained models, off for the small scratch ones
        rc["dpo"]["gradient_checkpointing"] = rc["model"]["source"] == "pretrained"
    return rc


SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def validate_runs(cfg: dict, schema_path=SCHEMA) -> None:
    """Every run's config (its sweep values filled in) against the schema, as the base config is: a sweep
    value out of range (β = 0, confidence 1.5, a string for a number) stops the run before any job."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(yaml.safe_load(Path(schema_path).read_text()))
    for run in runs(cfg):
        errors = sorted(validator.iter_errors(run_config(cfg, run)), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError(f"run {run}: {schema_message(errors[0])}")


def schema_message(e) -> str:
    """One line for a schema error: the key, the value (cut short) and what is allowed; an unknown key named
    with the keys its section knows."""
    key = ".".join(str(k) for k in e.absolute_path) or "(top level)"
    if e.validator == "additionalProperties":
        known = sorted((e.schema.get("properties") or {}).keys())
        extra = sorted(set(e.instance) - set(known)) if isinstance(e.instance, dict) else []
        where = "" if key == "(top level)" else f" in {key}"
        return (f"unknown key(s) {', '.join(extra)}{where}" + (f"; known: {', '.join(known)}" if known else ""))
    value = repr(e.instance)
    value = value if len(value) <= 80 else value[:77] + "..."
    if e.validator == "enum":
        return f"{key} = {value}: not one of {e.validator_value}"
    return f"{key} = {value}: {e.message if len(e.message) <= 160 else e.message[:157] + '...'}"


def check(cfg: dict) -> None:
    """Checks beyond the schema, run before any job; each message names the key."""
    from .engine.schedule import eval_schedule, geometry_steps, log_schedule

    for a in axes(cfg):
        get(cfg, a["param"])
    validate_runs(cfg)
    if cfg["data"]["source"] == "gaussian":
        swept = {a["param"] for a in axes(cfg)}
        if "data.gaussian.d" in swept:
            raise ConfigError("sweep: data.gaussian.d cannot be swept (the linear head is built once per "
                              "experiment); run one experiment per d")
        if cfg["model"]["source"] != "scratch":
            raise ConfigError("model.source: the gaussian source trains its own linear head; set model.source: scratch")
        if cfg["sft"]["target"] != "none":
            raise ConfigError("sft.target: the gaussian source has no text to fine-tune on; set sft.target: none")
    if cfg["model"]["source"] == "pretrained":
        check_model_path(cfg["model"]["pretrained"])
    for run in runs(cfg):
        rc = run_config(cfg, run)
        try:
            if not rc["dpo"].get("epochs"):
                geometry_steps(rc["dpo"], eval_schedule(rc["dpo"]))
            elif (rc["dpo"].get("eval_schedule") or {}).get("log") is not None:
                log_schedule(2, rc["dpo"]["eval_schedule"]["log"])
        except ValueError as e:
            raise ConfigError(f"{e} (run {run})") from None
        check_meaning(rc, run)
        check_track(rc, run)
        d = rc["data"]
        if d["source"] == "gaussian":
            from .gaussian import GaussianSpec, check as check_gaussian

            try:
                check_gaussian(GaussianSpec.from_config(d["gaussian"]), d["k"])
            except ValueError as e:
                raise ConfigError(f"{e} (run {run})") from None
            if rc["dpo"]["regime"] != "last_layer":
                raise ConfigError(f"dpo.regime: the gaussian source gives g(x) and trains the head alone; set "
                                  f"dpo.regime: last_layer (run {run})")
        full_batch = rc["dpo"]["batch_size"] in ("full", None)
        if rc["dpo"].get("eval_at_tau1") and (rc["dpo"]["optimizer"] != "sgd" or not full_batch):
            raise ConfigError("dpo.eval_at_tau1: tau_1 in steps is defined for full-batch sgd (dpo.optimizer: sgd, "
                              "dpo.batch_size: full)")
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
        check_engine(rc, run)


def check_meaning(rc: dict, run: str) -> None:
    """What the schema cannot say: every float setting finite (NaN and Inf pass a type check), and a warm-up
    no longer than the run (the learning rate would never reach its value)."""
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{path}: {node} is not a finite number (run {run})")

    walk(rc, "")
    for section in ("sft", "dpo"):
        sec = rc.get(section) or {}
        if section == "sft" and sec.get("target") == "none":  # no SFT runs: its schedule is never used
            continue
        steps, warm = sec.get("steps"), sec.get("warmup_steps") or 0
        if not sec.get("epochs") and isinstance(steps, int) and warm > steps:
            raise ConfigError(f"{section}.warmup_steps: {warm} is more than {section}.steps: {steps}, so the learning "
                              f"rate would never reach {section}.lr={sec.get('lr')}; lower it or train longer "
                              f"(run {run})")


def pair_counts(rc: dict) -> dict[str, tuple[int, int]] | None:
    """(pairs, (concept, cluster) strata) per split when the config fixes them (synthetic, gaussian), else
    None (the data stage's check_data knows them for files)."""
    d = rc["data"]
    spec = d.get(d["source"]) or {}
    if d["source"] not in ("synthetic", "gaussian") or not d.get("k"):
        return None
    per = {"train": spec["train_per_cluster"] if d["source"] == "synthetic" else spec["q"],
           "test": spec["test_per_cluster"]}
    return {split: (2 * d["k"] * q, 2 * d["k"]) for split, q in per.items()}


def check_track(rc: dict, run: str, counts: dict[str, tuple[int, int]] | None = None) -> None:
    """dpo.track: each split's size within (0, N], a count no larger than the data, every (concept, cluster)
    stratum kept; with ``counts`` (or a source whose sizes the config fixes) against the real numbers."""
    from .engine.tracked import SPLITS, size_of

    track = rc["dpo"].get("track", "auto")
    if track in (None, "auto", "all"):
        return
    counts = counts or pair_counts(rc)
    for split in SPLITS:
        value = track.get(split, "all")
        key = f"dpo.track.{split}"
        total, strata = counts[split] if counts else (None, None)
        try:
            n = size_of(value, total if total is not None else 10**12, key)
        except ValueError as e:
            raise ConfigError(f"{e} (run {run})") from None
        if total is not None and n < total and n < 2 * strata:
            raise ConfigError(f"{key}: {n} pairs for {strata} (concept, cluster) strata would leave a stratum "
                              f"without the two pairs its spread needs; track at least {2 * strata} (run {run})")


def check_model_path(pre: dict) -> None:
    """A model that is neither a local folder nor a hub id stops the run here, naming how to get it."""
    path = pre.get("path")
    if not path:
        raise ConfigError("model.pretrained.path: a pretrained model needs a hub id or a local folder")
    local = Path(path).exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
    hint = " (SmolLM2: ./scripts/fetch_smollm2.sh)" if "smollm2" in str(path).lower() else ""
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"model.pretrained.path: {path}: no such folder{hint}; give a local folder or a hub id "
                          f"(owner/name) on a networked machine")
    gguf = pre.get("gguf_file")
    if gguf and not (Path(path).expanduser() / gguf).exists():
        raise ConfigError(f"model.pretrained.gguf_file: {Path(path) / gguf}: no such file{hint}")


def check_engine(rc: dict, run: str) -> None:
    """How a run's model jobs are spread and in which precision: what the engine would refuse later."""
    dpo = rc["dpo"]
    for key in ("dtype", "autocast"):
        if dpo.get(key) == "float16":
            raise ConfigError(f"dpo.{key}: float16 trains without a gradient scaler here and under- or overflows; "
                              f"use bfloat16 (run {run})")
    if dpo["regime"] == "last_layer" and dpo["processes"] > 1:
        raise ConfigError(f"dpo.processes: {dpo['processes']} with dpo.regime: last_layer; the head trains on "
                          f"cached features in one process: set dpo.processes: 1 (run {run})")
    if dpo.get("max_tokens_per_batch") and dpo["grad_accum"] > 1:
        raise ConfigError("dpo.grad_accum: set either it or dpo.max_tokens_per_batch (which sizes the micro-batches "
                          f"itself), not both (run {run})")
    limit = (rc.get("resources") or {}).get("gpus")
    if limit and str(dpo["device"]).startswith("cuda") and dpo["processes"] > limit:
        raise ConfigError(f"dpo.processes: {dpo['processes']} GPUs asked for, but resources.gpus allows {limit} "
                          f"(run {run})")
