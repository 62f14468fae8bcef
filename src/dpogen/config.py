"""The boundary: the merged config dict becomes typed settings here, once per experiment and once per run.

The sweep is written as dotted keys over the config file (``data.k``), so its expansion works on the dict:
each run's dict has its sweep values and replicate offsets set, then is built into ``Settings``. Past this
module every stage reads settings by attribute. ``check`` adds what one field's type cannot say.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

from .settings import ConfigError, Settings, build

__all__ = ["ConfigError", "load", "run_settings", "runs", "check"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
DEFAULT_PREFIX = ("data.k", "k")  # config/config.yaml's sweep axis and its run-name prefix
# the seeds a replicate offsets: model init and batch order, the data subsample and split, the generators
SEED_KEYS = ("seed", "data.seed", "data.split_seed", "data.synthetic.seed", "data.gaussian.seed")


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
    node[last] = value

def merge(base: dict, over: dict) -> dict:
    """Snakemake's merge of config files: dicts are updated key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out



def read_yaml(path) -> dict:
    """A config file's mapping; a YAML error names the file, line and column (1-based) and what the parser
    expected, where Snakemake's own reading says only "not valid JSON or YAML"."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context}, from line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ConfigError(f"{path}{at}: not valid YAML: {e.problem}{context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a character YAML does not allow, bytes not UTF-8
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds keys at its top level, not a {type(data).__name__}")
    return data or {}


def load_config(files: list[str], default: str | Path = DEFAULT_CONFIG) -> dict:
    cfg = read_yaml(default)
    for f in files:
        cfg = merge(cfg, read_yaml(f))
    return normalize(cfg)



def normalize(cfg: dict) -> dict:
    """Snakemake merges config files key by key: a grid sweep replaces the default's single axis rather
    than joining it. Called on the merged config before it is built."""
    if isinstance(cfg.get("sweep"), dict) and "grid" in cfg["sweep"]:
        cfg["sweep"] = {k: cfg["sweep"][k] for k in ("grid", "seeds") if k in cfg["sweep"]}
    sweep = cfg.get("sweep")
    # the default's prefix k names its own axis, data.k: a sweep over another key, merged over it, would keep
    # it (k0.1, k0.5 for dpo.beta) and read as K values; that key's own name is used instead
    if isinstance(sweep, dict) and sweep.get("prefix") == DEFAULT_PREFIX[1] and sweep.get("param") not in (
            None, DEFAULT_PREFIX[0]):
        cfg["sweep"] = {k: v for k, v in sweep.items() if k != "prefix"}
    return cfg


def load(cfg: dict) -> tuple[Settings, dict[str, Settings]]:
    """The experiment's settings and each run's (the sweep's values filled in), from the merged config:
    normalized, built, checked. A bad key or value raises ConfigError with one line naming it (and the run)."""
    s = build(normalize(cfg))
    rss = {run: run_settings(cfg, run) for run in runs(s)}
    check(s, rss)
    return s, rss


# --------------------------------------------------------------------------------------------- the sweep


def axes(s: Settings) -> list:
    """The sweep's axes: one for ``sweep: {param, values}``, several for ``sweep: {grid: [...]}``."""
    sweep = s.sweep
    if sweep is None or not hasattr(sweep, "grid") and not hasattr(sweep, "param"):
        return []
    return list(sweep.grid) if hasattr(sweep, "grid") else [sweep]


def _prefix(axis) -> str:
    return axis.prefix or axis.param.split(".")[-1]


def replicate_seeds(s: Settings) -> list[int] | None:
    """``sweep.seeds``: the replicate offsets (None: no replicates)."""
    return list(s.sweep.seeds) if s.sweep is not None and s.sweep.seeds is not None else None


def _table(s: Settings) -> dict[str, tuple[object, int | None, str]]:
    """Run name → (sweep value, replicate offset or None, group: the name without the replicate)."""
    ax, seeds = axes(s), replicate_seeds(s)
    out = {}
    for combo in itertools.product(*[a.values for a in ax]):
        # a grid axis over ``seed`` is a replicate axis too: its runs form one group
        group = "-".join(f"{_prefix(a)}{v}" for a, v in zip(ax, combo) if a.param != "seed") or s.experiment
        value = combo[0] if len(ax) == 1 else (combo if ax else None)
        for r in seeds if seeds is not None else [None]:
            base = "-".join(f"{_prefix(a)}{v}" for a, v in zip(ax, combo)) or s.experiment
            name = base if r is None else (f"s{r}" if not ax else f"{base}-s{r}")
            if name in out:
                raise ConfigError(f"sweep values: {combo!r} given twice (run {name})")
            out[name] = (value, r, group)
    return out


def runs(s: Settings) -> dict[str, object]:
    """Run name → sweep value, e.g. {'k1': 1, 'k2': 2}; for a grid, name → tuple of values, e.g.
    {'k1-q8': (1, 8), ...} (every combination, the first axis outermost). Without a sweep, one run named by
    the experiment. With ``sweep.seeds: [0, 1, 2]`` every combination runs once per replicate: 'k1-s0', ..."""
    return {name: value for name, (value, _, _) in _table(s).items()}


def replicate(s: Settings, run: str) -> int | None:
    """The run's replicate offset (``sweep.seeds``), None without replicates."""
    return _table(s)[run][1]


def group_label(s: Settings, run: str) -> str:
    """The run's name without its replicate: the runs of one group differ only in their seeds."""
    return _table(s)[run][2]


def sweep_title(s: Settings) -> str:
    """The sweep's name in figures: its prefixes joined ('k', 'k-q'), or 'run' without a sweep."""
    return "-".join(_prefix(a) for a in axes(s)) or "run"


def sweep_label(s: Settings, value) -> str | object:
    """The sweep value as the report shows it: the value for one axis, 'k=1 q=8' for a grid."""
    ax = axes(s)
    if len(ax) < 2:
        return value
    return " ".join(f"{_prefix(a)}={v}" for a, v in zip(ax, value))


def with_replicate(cfg: dict, r: int | None) -> dict:
    """A complete config dict (``Settings.model_dump()``) with every seed of SEED_KEYS offset by replicate
    ``r`` (a copy; r 0 or None: unchanged)."""
    rc = copy.deepcopy(cfg)
    for key in SEED_KEYS if r else ():
        put(rc, key, get(rc, key) + r)
    return rc


def run_config(cfg: dict, run: str) -> dict:
    """The complete config dict of one run: the sweep's parameters set to the run's values, seeds offset by
    its replicate, gradient checkpointing resolved (on for pretrained models, off for small scratch ones)."""
    s = build(cfg)
    value, r, _ = _table(s)[run]
    rc = s.model_dump()
    ax = axes(s)
    for a, v in zip(ax, value if len(ax) > 1 else [value]):
        if v is not None:
            get(rc, a.param)  # a key the settings do not have is a typo, not a new setting
            put(rc, a.param, v)
    rc = with_replicate(rc, r)  # after the axes: a replicate offsets a swept seed too
    if rc["dpo"]["gradient_checkpointing"] is None:
        rc["dpo"]["gradient_checkpointing"] = rc["model"]["source"] == "pretrained"
    return rc


def base_settings(cfg: dict, replicate: int | None = None) -> Settings:
    """The experiment's settings, seeds offset by ``replicate`` (what a base model built per replicate reads)."""
    s = build(cfg)
    return build(with_replicate(s.model_dump(), replicate)) if replicate else s


def run_settings(cfg: dict, run: str) -> Settings:
    """The typed settings of one run (its sweep values filled in); a value out of range names the run."""
    return build(run_config(cfg, run), f"run {run}")


# --------------------------------------------------------------------------------------------- checks


def check(s: Settings, rss: dict[str, Settings]) -> None:
    """What one field's type cannot say, for the experiment ``s`` and every run's settings ``rss``; each
    message names the key and the run. Called before any job."""
    from .engine.schedule import eval_schedule, geometry_steps, log_schedule

    swept = {a.param for a in axes(s)}
    if s.data.source == "gaussian":
        if "data.gaussian.d" in swept:
            raise ConfigError("sweep: data.gaussian.d cannot be swept (the linear head is built once per "
                              "experiment); run one experiment per d")
        if s.model.source != "scratch":
            raise ConfigError("model.source: the gaussian source trains its own linear head; set model.source: scratch")
        if s.sft.target != "none":
            raise ConfigError("sft.target: the gaussian source has no text to fine-tune on; set sft.target: none")
    if s.model.source == "pretrained":
        check_model_path(s.model.pretrained)
    for run, rs in rss.items():
        try:
            if not rs.dpo.epochs:
                geometry_steps(rs.dpo, eval_schedule(rs.dpo))
            elif rs.dpo.eval_schedule is not None:
                log_schedule(2, rs.dpo.eval_schedule.log)
        except ValueError as e:
            raise ConfigError(f"{e} (run {run})") from None
        check_warmup(rs, run)
        check_track(rs, run)
        check_data(rs, run)
        check_engine(rs, run)
        if s.resources.nodes > 1:  # the rules ask SLURM for nodes and GPUs per node once per experiment
            for key, mine, its in (("resources.nodes", rs.resources.nodes, s.resources.nodes),
                                   ("dpo.processes", rs.dpo.processes, s.dpo.processes),
                                   ("dpo.device", rs.dpo.device, s.dpo.device)):
                if mine != its:
                    raise ConfigError(f"{key}: one value per experiment when resources.nodes > 1 (the rules ask SLURM "
                                      f"for nodes and GPUs per node from it); run {run} has {mine}, the experiment "
                                      f"{its}")


def check_data(rs: Settings, run: str) -> None:
    """The data settings against each other: K within the source, the gaussian world's conditions."""
    d, dpo = rs.data, rs.dpo
    if d.source == "gaussian":
        from .data.gaussian import GaussianSpec, check as check_gaussian

        try:
            check_gaussian(GaussianSpec.from_config(d.gaussian), d.k)
        except ValueError as e:
            raise ConfigError(f"{e} (run {run})") from None
        if dpo.regime != "last_layer":
            raise ConfigError(f"dpo.regime: the gaussian source gives g(x) and trains the head alone; set "
                              f"dpo.regime: last_layer (run {run})")
    if d.source == "synthetic":
        if d.k is None:
            raise ConfigError("data.k: the synthetic source needs a number of concepts K")
        if d.k > d.synthetic.n_concepts:
            raise ConfigError(f"data.k: K={d.k} (run {run}) is larger than the number of concepts, "
                              f"data.synthetic.n_concepts={d.synthetic.n_concepts}")
    if d.source == "persona" and d.k and not d.persona.names:
        from .data.sources import DataError, persona_names, persona_set

        folder = Path(d.persona.path)
        if folder.is_dir():
            try:
                persona_set(persona_names(folder), d.k, d.persona.seed)
            except DataError as e:
                raise ConfigError(f"{e} (run {run})") from None


def check_warmup(rs: Settings, run: str) -> None:
    """A warm-up no longer than the run (the learning rate would never reach its value)."""
    for name, sec in (("sft", rs.sft), ("dpo", rs.dpo)):
        if name == "sft" and sec.target == "none":  # no SFT runs: its schedule is never used
            continue
        if not getattr(sec, "epochs", None) and sec.warmup_steps > sec.steps:
            raise ConfigError(f"{name}.warmup_steps: {sec.warmup_steps} is more than {name}.steps: {sec.steps}, so "
                              f"the learning rate would never reach {name}.lr={sec.lr}; lower it or train longer "
                              f"(run {run})")


def pair_counts(rs: Settings) -> dict[str, tuple[int, int]] | None:
    """(pairs, (concept, cluster) strata) per split when the settings fix them (synthetic, gaussian), else
    None (the data stage's check_data knows them for files)."""
    d = rs.data
    if d.source not in ("synthetic", "gaussian") or not d.k:
        return None
    per = ({"train": d.synthetic.train_per_cluster, "test": d.synthetic.test_per_cluster}
           if d.source == "synthetic" else {"train": d.gaussian.q, "test": d.gaussian.test_per_cluster})
    return {split: (2 * d.k * q, 2 * d.k) for split, q in per.items()}


def check_track(rs: Settings, run: str, counts: dict[str, tuple[int, int]] | None = None) -> None:
    """dpo.track: each split's size within (0, N], a count no larger than the data, every (concept, cluster)
    stratum kept; with ``counts`` (or a source whose sizes the settings fix) against the real numbers."""
    from .engine.tracked import SPLITS, size_of

    track = rs.dpo.track
    if isinstance(track, str):
        return
    counts = counts or pair_counts(rs)
    for split in SPLITS:
        value = getattr(track, split)
        key = f"dpo.track.{split}"
        total, strata = counts[split] if counts else (None, None)
        try:
            n = size_of(value, total if total is not None else 10**12, key)
        except ValueError as e:
            raise ConfigError(f"{e} (run {run})") from None
        if total is not None and n < total and n < 2 * strata:
            raise ConfigError(f"{key}: {n} pairs for {strata} (concept, cluster) strata would leave a stratum "
                              f"without the two pairs its spread needs; track at least {2 * strata} (run {run})")


def check_model_path(pre) -> None:
    """A model that is neither a local folder nor a hub id stops the run here, naming how to get it."""
    path = pre.path
    if not path:
        raise ConfigError("model.pretrained.path: a pretrained model needs a hub id or a local folder")
    local = Path(path).exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
    hint = " (SmolLM2: ./scripts/fetch_smollm2.sh)" if "smollm2" in str(path).lower() else ""
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"model.pretrained.path: {path}: no such folder{hint}; give a local folder or a hub id "
                          f"(owner/name) on a networked machine")
    if pre.gguf_file and not (Path(path).expanduser() / pre.gguf_file).exists():
        raise ConfigError(f"model.pretrained.gguf_file: {Path(path) / pre.gguf_file}: no such file{hint}")


def check_engine(rs: Settings, run: str) -> None:
    """How a run's model jobs are spread and in which precision: what the engine would refuse later."""
    dpo = rs.dpo
    for key in ("dtype", "autocast"):
        if getattr(dpo, key) == "float16":
            raise ConfigError(f"dpo.{key}: float16 trains without a gradient scaler here and under- or overflows; "
                              f"use bfloat16 (run {run})")
    if dpo.regime == "last_layer" and dpo.processes > 1:
        raise ConfigError(f"dpo.processes: {dpo.processes} with dpo.regime: last_layer; the head trains on "
                          f"cached features in one process: set dpo.processes: 1 (run {run})")
    if dpo.max_tokens_per_batch and dpo.grad_accum > 1:
        raise ConfigError("dpo.grad_accum: set either it or dpo.max_tokens_per_batch (which sizes the micro-batches "
                          f"itself), not both (run {run})")
    if dpo.eval_at_tau1 and (dpo.optimizer != "sgd" or not dpo.full_batch):
        raise ConfigError("dpo.eval_at_tau1: tau_1 in steps is defined for full-batch sgd (dpo.optimizer: sgd, "
                          "dpo.batch_size: full)")
    if not dpo.full_batch and dpo.batch_size % dpo.grad_accum:
        raise ConfigError("dpo.grad_accum: must divide dpo.batch_size")
    limit = rs.resources.gpus
    if limit and str(dpo.device).startswith("cuda") and dpo.processes > limit:
        raise ConfigError(f"dpo.processes: {dpo.processes} GPUs asked for, but resources.gpus allows {limit} "
                          f"(run {run})")
    check_nodes(rs, run)


def check_nodes(rs: Settings, run: str) -> None:
    """How the processes spread over nodes: evenly, within a node's GPUs, each with a share of the batch."""
    dpo, res = rs.dpo, rs.resources
    nodes = res.nodes
    if dpo.processes % nodes:
        raise ConfigError(f"dpo.processes: {dpo.processes} cannot be split evenly over resources.nodes: {nodes}; "
                          f"use a multiple of {nodes} (run {run})")
    per_node = dpo.processes // nodes
    if res.gpus_per_node and str(dpo.device).startswith("cuda") and per_node > res.gpus_per_node:
        raise ConfigError(f"resources.gpus_per_node: {res.gpus_per_node}, but dpo.processes {dpo.processes} over "
                          f"resources.nodes {nodes} puts {per_node} on each node; use more nodes (run {run})")
    if not dpo.full_batch and dpo.processes > 1 and dpo.batch_size < dpo.processes:
        raise ConfigError(f"dpo.batch_size: {dpo.batch_size} pairs cannot be split over {dpo.processes} processes "
                          f"(each needs one at least); raise it to {dpo.processes} or lower dpo.processes (run {run})")
