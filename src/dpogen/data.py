"""The data stage: any source → validated train/test pair tables with stable sample ids, plus a data card."""

from __future__ import annotations

import hashlib
from collections import Counter

import pandas as pd

from . import synthetic, tables
from .io import write_json, write_text

REQUIRED = ["concept", "cluster", "prompt", "chosen", "rejected"]


class DataError(ValueError):
    """Bad input data; the message names the file, field and row."""


def sample_id(concept: str, prompt: str, chosen: str, rejected: str) -> str:
    """Stable across runs and machines: a hash of the four texts (unit-separated)."""
    h = hashlib.sha256("\x1f".join([concept, prompt, chosen, rejected]).encode("utf-8"))
    return h.hexdigest()[:20]


def validate_pairs(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check a pair table; raise DataError naming source, field and row. Returns it with sample ids."""
    for col in REQUIRED:
        if col not in df.columns:
            raise DataError(f"{source}: missing column '{col}' (have {list(df.columns)})")
    for col in ["concept", "prompt", "chosen", "rejected"]:
        for i, v in enumerate(df[col].tolist()):
            if not isinstance(v, str):
                raise DataError(f"{source}: row {i}, field '{col}': expected a string, got {type(v).__name__} ({v!r})")
            if col != "prompt" and v.strip() == "" or col == "prompt" and v == "":
                raise DataError(f"{source}: row {i}, field '{col}': empty")
    same = (df["chosen"] == df["rejected"]).to_numpy().nonzero()[0]
    if len(same):
        raise DataError(f"{source}: row {int(same[0])}, fields 'chosen'/'rejected': identical responses {df['chosen'].iloc[same[0]]!r}")
    bad = (~df["cluster"].isin([1, -1])).to_numpy().nonzero()[0]
    if len(bad):
        raise DataError(f"{source}: row {int(bad[0])}, field 'cluster': must be +1 or -1, got {df['cluster'].iloc[bad[0]]!r}")
    df = df.copy()
    df.insert(0, "sample_id", [sample_id(*r) for r in df[["concept", "prompt", "chosen", "rejected"]].itertuples(index=False)])
    return df


def drop_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    before = len(df)
    df = df.drop_duplicates("sample_id", keep="first").reset_index(drop=True)
    return df, before - len(df)


def cluster_preferences(df: pd.DataFrame) -> dict[tuple[str, int], tuple[str, str]]:
    """The most common (chosen, rejected) of each (concept, cluster): its cluster-level preference."""
    out = {}
    for key, g in df.groupby(["concept", "cluster"], sort=True):
        out[(str(key[0]), int(key[1]))] = Counter(zip(g["chosen"], g["rejected"])).most_common(1)[0][0]
    return out


def token_reuse_z(df: pd.DataFrame) -> int:
    """Z (THEORY.md section 3): the most cluster-level preferences any one response token appears in."""
    counts: Counter = Counter()
    for chosen, rejected in cluster_preferences(df).values():
        for tok in {chosen, rejected}:
            counts[tok] += 1
    return max(counts.values()) if counts else 0


def data_card(train: pd.DataFrame, test: pd.DataFrame, extra: dict) -> dict:
    both = pd.concat([train.assign(split="train"), test.assign(split="test")])
    per = both.groupby(["concept", "cluster", "split"]).size().rename("pairs").reset_index()
    q = train.groupby(["concept", "cluster"]).size()
    return {
        "K": int(train["concept"].nunique()),
        "N": int(len(train)),
        "n_test": int(len(test)),
        "Q_min": int(q.min()),
        "Q_max": int(q.max()),
        "Q_mean": float(q.mean()),
        "Z": token_reuse_z(train),
        "pairs": per.to_dict(orient="records"),
        **extra,
    }


def card_markdown(card: dict) -> str:
    lines = [
        "# Data card",
        "",
        f"K = {card['K']} concepts, N = {card['N']} training pairs, {card['n_test']} test pairs, "
        f"Q per cluster {card['Q_min']}..{card['Q_max']}, Z = {card['Z']}.",
        "",
        "| concept | cluster | split | pairs |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['concept']} | {r['cluster']:+d} | {r['split']} | {r['pairs']} |" for r in card["pairs"]]
    others = {k: v for k, v in card.items() if k not in {"pairs", "K", "N", "n_test", "Q_min", "Q_max", "Q_mean", "Z"}}
    if others:
        lines += ["", "| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(others.items())]
    return "\n".join(lines) + "\n"


def prepare(cfg: dict, k: int, out_train, out_test, out_card_json, out_card_md) -> dict:
    """Run the data stage for one run's resolved data config."""
    source = cfg["source"]
    if source == "synthetic":
        s = cfg["synthetic"]
        spec = synthetic.SyntheticSpec(s["n_concepts"], s["topic_words"], s["stance_words"], s["seed"])
        train, test = synthetic.generate(k, s["train_per_cluster"], s["test_per_cluster"], spec)
        origin = "synthetic"
    else:
        raise DataError(f"data.source: unknown source {source!r}")
    train = validate_pairs(train, f"{origin} (train)")
    test = validate_pairs(test, f"{origin} (test)")
    train, dup_train = drop_duplicates(train)
    test, dup_test = drop_duplicates(test)
    leaked = set(train["sample_id"]) & set(test["sample_id"])
    if leaked:
        test = test[~test["sample_id"].isin(leaked)].reset_index(drop=True)
    card = data_card(train, test, {"source": source, "duplicates_dropped": dup_train + dup_test,
                                   "test_pairs_dropped_as_in_train": len(leaked)})
    tables.write_pairs(train, out_train)
    tables.write_pairs(test, out_test)
    write_json(card, out_card_json)
    write_text(card_markdown(card), out_card_md)
    return card
