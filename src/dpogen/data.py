"""The data stage: any source → validated train/test pair tables with stable sample ids, and a data card.

Order of work, for every source: read → map to (concept, cluster, prompt, chosen, rejected) → validate
(naming file, field and row) → optional seeded subsample per concept → split → filters (label confidence,
length) → duplicates dropped → write. Filters and de-duplication come after the split, so the persona
split stays exactly the authors' for every pair that remains.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from . import gaussian, sources, synthetic, tables
from .io import write_json, write_text
from .sources import DataError

REQUIRED = ["concept", "cluster", "prompt", "chosen", "rejected"]
__all__ = ["DataError", "prepare", "sample_id", "split_concepts", "validate_pairs"]


def sample_id(concept: str, prompt: str, chosen: str, rejected: str) -> str:
    """Stable across runs and machines: a hash of the four texts (unit-separated)."""
    h = hashlib.sha256("\x1f".join([concept, prompt, chosen, rejected]).encode("utf-8"))
    return h.hexdigest()[:20]


def _where(df: pd.DataFrame, i: int, source: str) -> str:
    if "_file" in df.columns:
        return f"{df['_file'].iloc[i]}: {df['_row'].iloc[i]}"
    return f"{source}: row {i}"


def validate_pairs(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check a pair table; raise DataError naming file, field and row. Returns it with sample ids first."""
    for col in REQUIRED:
        if col not in df.columns:
            raise DataError(f"{source}: missing column '{col}' (have {[c for c in df.columns if not c.startswith('_')]})")
    for col in ["concept", "prompt", "chosen", "rejected"]:
        values = df[col].tolist()
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise DataError(f"{_where(df, i, source)}, field '{col}': expected a string, got "
                                f"{type(v).__name__} ({v!r})")
            if not v.strip():
                raise DataError(f"{_where(df, i, source)}, field '{col}': empty")
    same = (df["chosen"] == df["rejected"]).to_numpy().nonzero()[0]
    if len(same):
        i = int(same[0])
        raise DataError(f"{_where(df, i, source)}, fields 'chosen'/'rejected': identical responses {df['chosen'].iloc[i]!r}")
    cluster = pd.to_numeric(df["cluster"], errors="coerce")
    bad = (~cluster.isin([1, -1])).to_numpy().nonzero()[0]
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{_where(df, i, source)}, field 'cluster': must be +1 or -1, got {df['cluster'].iloc[i]!r}")
    df = df.copy()
    df["cluster"] = cluster.astype("int8")
    df.insert(0, "sample_id", [sample_id(*r) for r in df[["concept", "prompt", "chosen", "rejected"]].itertuples(index=False)])
    return df


def split_concepts(frames: list[pd.DataFrame], test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The authors' split: one generator seeded once; for each concept in order, its pairs in their order
    are shuffled with ``random.shuffle`` and the first int((1 − test_fraction)·n) are train."""
    rng = random.Random(seed)
    train, test = [], []
    for df in frames:
        n = len(df)
        idx = list(range(n))
        rng.shuffle(idx)
        n_train = int((1 - test_fraction) * n)
        if n_train == 0 or n_train == n:
            name = df["concept"].iloc[0] if n else "?"
            raise DataError(f"{_where(df, 0, 'data') if n else name}, field 'concept': concept {name!r} has {n} "
                            f"pair(s), too few to split with data.test_fraction={test_fraction}")
        train.append(df.iloc[idx[:n_train]])
        test.append(df.iloc[idx[n_train:]])
    return pd.concat(train, ignore_index=True), pd.concat(test, ignore_index=True)


def cluster_preferences(df: pd.DataFrame) -> dict[tuple[str, int], tuple[str, str]]:
    """The most common (chosen, rejected) of each (concept, cluster): its cluster-level preference."""
    out = {}
    for key, g in df.groupby(["concept", "cluster"], sort=True):
        out[(str(key[0]), int(key[1]))] = Counter(zip(g["chosen"], g["rejected"])).most_common(1)[0][0]
    return out


def token_reuse_z(df: pd.DataFrame) -> int:
    """Z (THEORY.md section 3): the most cluster-level preferences any one response appears in."""
    counts: Counter = Counter()
    for chosen, rejected in cluster_preferences(df).values():
        for tok in {chosen, rejected}:
            counts[tok] += 1
    return max(counts.values()) if counts else 0


# ------------------------------------------------------------------------------------- token lengths


def token_lengths(tokenizer, df: pd.DataFrame) -> pd.DataFrame:
    """Prompt and response lengths in tokens, with the prompt/response boundary of the log-prob function."""
    from .logprobs import encode_pairs

    enc = encode_pairs(tokenizer, df["prompt"], df["chosen"], df["rejected"], append_eos=False, fuse=False,
                       source="data")
    return pd.DataFrame({"prompt": enc.feature_at[:, 1] + 1, "chosen": enc.n_tokens[:, 0],
                         "rejected": enc.n_tokens[:, 1]}, index=df.index)


def apply_length_limits(df: pd.DataFrame, tokenizer, cfg: dict, counts: Counter) -> pd.DataFrame:
    """Enforce data.max_prompt_tokens / max_response_tokens: drop the pair, or truncate (a prompt keeps its
    end, a response its start). Every dropped or truncated pair is counted for the data card."""
    mp, mr = cfg.get("max_prompt_tokens"), cfg.get("max_response_tokens")
    if not (mp or mr) or df.empty:
        return df
    lens = token_lengths(tokenizer, df)
    too_long_p = lens["prompt"] > mp if mp else pd.Series(False, index=df.index)
    too_long_r = (lens[["chosen", "rejected"]].max(axis=1) > mr) if mr else pd.Series(False, index=df.index)
    if cfg["truncation"] == "drop":
        drop = too_long_p | too_long_r
        counts["dropped_too_long"] += int(drop.sum())
        return df[~drop]
    df = df.copy()
    special = len(tokenizer("")["input_ids"])  # tokens the tokenizer adds around a prompt (a BOS, say)
    for i in df.index[too_long_p]:
        offs = tokenizer(df.at[i, "prompt"], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        df.at[i, "prompt"] = df.at[i, "prompt"][offs[-max(1, mp - special)][0]:]
    for i in df.index[too_long_r]:
        for col in ("chosen", "rejected"):
            offs = tokenizer(df.at[i, col], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
            if len(offs) > mr:
                df.at[i, col] = df.at[i, col][: offs[mr - 1][1]]
    counts["truncated_prompts"] += int(too_long_p.sum())
    counts["truncated_responses"] += int(too_long_r.sum())
    return df


def apply_context_limit(df: pd.DataFrame, tokenizer, context: int, cfg: dict, counts: Counter) -> pd.DataFrame:
    """No pair longer than the model's context: prompt + the longer response + one token (an EOS) must fit.
    truncation drop: drop it; truncate: cut both responses to what fits after the prompt (a prompt that
    alone leaves no room is dropped). Counted in the data card."""
    if df.empty:
        return df
    lens = token_lengths(tokenizer, df)
    room = context - 1 - lens["prompt"]
    over = lens[["chosen", "rejected"]].max(axis=1) > room
    if not over.any():
        return df
    no_room = over & (room < 1)
    if cfg["truncation"] == "drop" or no_room.all():
        counts["dropped_longer_than_context"] += int(over.sum())
        return df[~over]
    df = df.copy()
    for i in df.index[over & ~no_room]:
        for col in ("chosen", "rejected"):
            offs = tokenizer(df.at[i, col], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
            if len(offs) > room[i]:
                df.at[i, col] = df.at[i, col][: offs[int(room[i]) - 1][1]]
    counts["truncated_to_context"] += int((over & ~no_room).sum())
    counts["dropped_longer_than_context"] += int(no_room.sum())
    return df[~no_room]


# ---------------------------------------------------------------------------------------------- card


def _length_stats(lens: pd.DataFrame) -> dict:
    return {col: {"min": int(lens[col].min()), "mean": float(lens[col].mean()), "max": int(lens[col].max())}
            for col in lens.columns} if len(lens) else {}


def data_card(train: pd.DataFrame, test: pd.DataFrame, extra: dict, tokenizer=None) -> dict:
    both = pd.concat([train.assign(split="train"), test.assign(split="test")])
    per = both.groupby(["concept", "cluster", "split"]).size().rename("pairs").reset_index()
    q = train.groupby(["concept", "cluster"]).size()
    card = {
        "K": int(train["concept"].nunique()),
        "N": int(len(train)),
        "n_test": int(len(test)),
        "Q_min": int(q.min()),
        "Q_max": int(q.max()),
        "Q_mean": float(q.mean()),
        "Q_per_cluster": {f"{c}:{k:+d}": int(v) for (c, k), v in q.items()},
        "Z": token_reuse_z(train),
        "pairs": per.to_dict(orient="records"),
        **extra,
    }
    if tokenizer is not None:
        card["tokens"] = {"train": _length_stats(token_lengths(tokenizer, train)),
                          "test": _length_stats(token_lengths(tokenizer, test))}
    return card


CARD_CORE = {"pairs", "K", "N", "n_test", "Q_min", "Q_max", "Q_mean", "Q_per_cluster", "Z", "tokens", "counts"}


def card_markdown(card: dict) -> str:
    lines = [
        "# Data card",
        "",
        f"Source: {card.get('source')}. K = {card['K']} concepts, N = {card['N']} training pairs, "
        f"{card['n_test']} test pairs, Q per cluster {card['Q_min']}..{card['Q_max']} (mean {card['Q_mean']:.1f}), "
        f"Z = {card['Z']}.",
        "",
    ]
    if card.get("tokens"):
        lines += ["| split | field | min tokens | mean | max |", "|---|---|---|---|---|"]
        for split, stats in card["tokens"].items():
            lines += [f"| {split} | {f} | {s['min']} | {s['mean']:.1f} | {s['max']} |" for f, s in stats.items()]
        lines.append("")
    if card.get("counts"):
        lines += ["| dropped or changed | pairs |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(card["counts"].items())]
        lines.append("")
    lines += ["| concept | cluster | split | pairs |", "|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['cluster']:+d} | {r['split']} | {r['pairs']} |" for r in card["pairs"]]
    others = {k: v for k, v in card.items() if k not in CARD_CORE}
    if others:
        lines += ["", "| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(others.items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- sources


def _concept_frames(cfg: dict, k: int | None, tokenizer) -> tuple[list[pd.DataFrame], dict]:
    """Validated pairs, one frame per concept, in the order the split visits them."""
    source = cfg["source"]
    if source == "persona":
        p = cfg["persona"]
        folder = sources.resolve_persona_folder(p["path"])
        names = p.get("names") or (sources.persona_set(sources.persona_names(folder), k, p["seed"]) if k
                                    else sources.persona_names(folder))
        frames = sources.load_persona(folder, names)
        info = {"personas": names, "persona_path": str(folder)}
    elif source in ("hf", "files"):
        if source == "hf":
            raw = sources.load_hf(cfg["hf"])
        else:
            paths = cfg["files"]["paths"]
            if not paths:
                raise DataError("data.files.paths: no files given")
            raw = pd.concat([sources.read_file(f) for f in paths], ignore_index=True)
        pairs = sources.to_pairs(raw, cfg, tokenizer)
        names = sorted(pairs["concept"].unique())
        if k:
            if k > len(names):
                raise DataError(f"data.k: K={k} is larger than the {len(names)} concept(s) in the data")
            names = names[:k]
        frames = [pairs[pairs["concept"] == c].reset_index(drop=True) for c in names]
        info = {"concepts": names}
        if source == "hf" and sources.is_hub_dataset(cfg["hf"]["path"]):
            info["hf_revision"] = cfg["hf"]["revision"]  # the commit it was read at (pin_hf_revision)
    else:
        raise DataError(f"data.source: unknown source {source!r}")
    return [validate_pairs(f, source) for f in frames], info


def prepare(cfg: dict, k: int | None, out_train, out_test, out_card_json, out_card_md, tokenizer=None,
            context: int | None = None) -> dict:
    """Run the data stage for one run's resolved ``data`` config; writes nothing unless all of it succeeds.
    ``context``: the model's positions; longer pairs are cut or dropped (data.truncation) and counted."""
    counts: Counter = Counter()
    if cfg["source"] == "synthetic":
        s = cfg["synthetic"]
        spec = synthetic.SyntheticSpec.from_config(s)
        train, test = synthetic.generate(k, s["train_per_cluster"], s["test_per_cluster"], spec)
        train, test = validate_pairs(train, "synthetic (train)"), validate_pairs(test, "synthetic (test)")
        info = {}
    elif cfg["source"] == "gaussian":
        spec = gaussian.GaussianSpec.from_config(cfg["gaussian"])
        train, test = gaussian.generate(k, spec)
        train, test = validate_pairs(train, "gaussian (train)"), validate_pairs(test, "gaussian (test)")
        info = gaussian.card_extra(k, spec)
    else:
        frames, info = _concept_frames(cfg, k, tokenizer)
        if cfg.get("pairs_per_concept"):
            n = cfg["pairs_per_concept"]
            frames = [f.iloc[np.sort(np.random.default_rng([cfg["seed"], i]).choice(len(f), n, replace=False))]
                      if len(f) > n else f for i, f in enumerate(frames)]
        train, test = split_concepts(frames, cfg["test_fraction"], cfg["split_seed"])
    threshold = cfg.get("min_label_confidence")
    if threshold is not None:
        if "label_confidence" not in train.columns:
            raise DataError("data.min_label_confidence: the data has no label_confidence field")
        for name, df in (("train", train), ("test", test)):
            keep = df["label_confidence"] >= threshold
            counts[f"dropped_low_confidence_{name}"] += int((~keep).sum())
        train = train[train["label_confidence"] >= threshold]
        test = test[test["label_confidence"] >= threshold]
    limits = cfg.get("max_prompt_tokens") or cfg.get("max_response_tokens")
    if limits or (context and tokenizer is not None and "embedding" not in train.columns):
        if tokenizer is None:
            raise DataError("data.max_prompt_tokens/max_response_tokens need the run's tokenizer")
        train = apply_length_limits(train, tokenizer, cfg, counts)
        test = apply_length_limits(test, tokenizer, cfg, counts)
        if context:
            train = apply_context_limit(train, tokenizer, context, cfg, counts)
            test = apply_context_limit(test, tokenizer, context, cfg, counts)
        # truncated texts are checked again (two responses cut to the same start are identical) and get
        # the ids of their new texts
        train = validate_pairs(train.drop(columns="sample_id"), f"{cfg['source']} (train, after truncation)")
        test = validate_pairs(test.drop(columns="sample_id"), f"{cfg['source']} (test, after truncation)")
    before = len(train), len(test)
    train = train.drop_duplicates("sample_id").reset_index(drop=True)
    test = test.drop_duplicates("sample_id").reset_index(drop=True)
    counts["duplicates_dropped"] += (before[0] - len(train)) + (before[1] - len(test))
    leaked = test["sample_id"].isin(set(train["sample_id"]))
    counts["test_dropped_as_in_train"] += int(leaked.sum())
    test = test[~leaked].reset_index(drop=True)
    for name, df in (("train", train), ("test", test)):
        if df.empty:
            raise DataError(f"data: no {name} pairs left after filtering ({dict(counts)})")
    train = train.drop(columns=[c for c in ("_file", "_row") if c in train.columns])
    test = test.drop(columns=[c for c in ("_file", "_row") if c in test.columns])
    card = data_card(train, test, {"source": cfg["source"], "counts": dict(counts), **info}, tokenizer)
    tables.write_pairs(train, out_train)
    tables.write_pairs(test, out_test)
    write_json(card, out_card_json)
    write_text(card_markdown(card), out_card_md)
    return card


def corpus(cfg: dict, per_cluster: int, ks: dict[str, int | None] | None = None) -> list[str]:
    """Text to train a from-scratch tokenizer on: every concept the source has (independent of K), each
    prompt followed by either answer. Synthetic: ``per_cluster`` statements per cluster of the pool.
    ``ks``: each run's K (run name → K); one larger than the data's concepts stops here, before any model is
    built, naming the run."""
    if cfg["source"] == "gaussian":
        raise DataError("data.source gaussian has no text corpus: its model is built by model.build_linear_head")
    if cfg["source"] == "synthetic":
        return synthetic.corpus(synthetic.SyntheticSpec.from_config(cfg["synthetic"]), per_cluster)
    frames, _ = _concept_frames(cfg, None, None)
    if cfg["source"] in ("hf", "files"):  # persona's K is a seeded set size, checked by persona_set
        for run, k in (ks or {}).items():
            if k and k > len(frames):
                raise DataError(f"data.k: K={k} (run {run}) is larger than the {len(frames)} concept(s) in the data")
    df = pd.concat(frames, ignore_index=True)
    return list(df["prompt"] + df["chosen"]) + list(df["prompt"] + df["rejected"])


def hf_pin_path(experiment: str) -> Path:
    """Where an experiment records the hub commit its data were read at."""
    return Path("results") / experiment / "hf_revision.json"


def pin_hf_revision(cfg: dict, pin_path) -> dict:
    """The ``data`` config with a hub dataset's revision pinned to a commit: the configured revision, resolved;
    with none configured, the commit the experiment's first data job resolved (recorded in ``pin_path``), so
    every run of an experiment reads the same data however the hub moves. Local data: unchanged."""
    hf = cfg["hf"]
    if cfg["source"] != "hf" or not sources.is_hub_dataset(hf["path"]):
        return cfg
    pin_path = Path(pin_path)
    key = {"path": hf["path"], "name": hf.get("name"), "revision": hf.get("revision")}
    pinned = json.loads(pin_path.read_text()) if pin_path.exists() else None
    if pinned and {k: pinned.get(k) for k in key} == key:
        sha = pinned["commit"]
    else:
        sha = sources.hub_revision(hf["path"], hf.get("revision"))
        write_json({**key, "commit": sha}, pin_path)
    return {**cfg, "hf": {**hf, "revision": sha}}


def load_tokenizer(path):
    if path is None:
        return None
    from .model import load_tokenizer as load

    return load(path)
