"""Benchmark: the data stage on all 135 personas (133,204 pairs) of the paper's dataset.

Prints the wall time of dpogen's full data stage (read, validate, the authors' split, sample ids, token
lengths with a BPE tokenizer, data card, Parquet writes) next to a baseline in the same process: reading
the same files with pandas.read_json alone, the least any loader has to do.

    python bench/bench_data.py [--persona ../shared/data/persona]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from dpogen import model as M  # noqa: E402
from dpogen.data.stage import prepare  # noqa: E402
from dpogen.data.synthetic import SyntheticSpec, corpus  # noqa: E402
from dpogen.settings import Data  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--persona", default=str(ROOT.parent / "shared" / "data" / "persona"))
    a = ap.parse_args()
    folder = Path(a.persona)
    if not folder.is_dir():
        sys.exit(f"no persona folder at {folder}")
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["data"]
    cfg.update(source="persona", k=None)
    cfg["persona"]["path"] = str(folder)
    cfg = Data.model_validate(cfg)
    tok = M.train_tokenizer(corpus(SyntheticSpec(), 16), 2000)

    t = time.perf_counter()
    raw = pd.concat([pd.read_json(p, lines=True) for p in sorted(folder.glob("*.jsonl"))])
    t_raw = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        card = prepare(cfg, None, f"{d}/train.parquet", f"{d}/test.parquet", f"{d}/card.json", f"{d}/card.md",
                       tokenizer=tok)
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        prepare(cfg, None, f"{d}/train.parquet", f"{d}/test.parquet", f"{d}/card.json", f"{d}/card.md", tokenizer=None)
        t_notok = time.perf_counter() - t
    print(f"{len(raw)} raw pairs in {folder}; prepared: K={card['K']}, N={card['N']} train, {card['n_test']} test")
    print(f"{'step':<52}{'seconds':>9}{'x raw read':>12}")
    for name, s in (("baseline: pandas.read_json of every file", t_raw),
                    ("dpogen data stage, without token lengths", t_notok),
                    ("dpogen data stage, with token lengths (full card)", t_full)):
        print(f"{name:<52}{s:>9.2f}{s / t_raw:>11.1f}x")


if __name__ == "__main__":
    main()
