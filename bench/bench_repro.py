"""Benchmark: does a fresh run of the offline default reproduce the README's table?

Runs the default config to the end in a temporary copy of the workflow (about 2 minutes on 2 cores, with
the installed versions; ``scripts/setup.sh`` installs requirements.lock), then prints, per K, the README's
row beside the run's and the largest difference; exit status 1 when any printed digit differs.

    python bench/bench_repro.py [--work DIR] [--cores 2]

--work: a folder to run in and keep (a second call with the same folder reuses the finished run).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_workflow import run_default  # noqa: E402

COLUMNS = [("train margin", "train_margin_mean", 3), ("test margin", "test_margin_mean", 3),
           ("train error", "train_error", 3), ("test error", "test_error", 3),
           ("test error upper (95%)", "test_error_upper", 3)]


def readme_table(text: str) -> dict[int, list[float]]:
    """The README's default table (after 'The default experiment'): K → the row's numbers."""
    section = text[text.index("## The default experiment"):]
    header = next(line for line in section.splitlines() if line.startswith("| K |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    assert names[1:] == [c for c, _, _ in COLUMNS], f"README table columns changed: {names}"
    rows = {}
    for line in section[section.index(header):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[int(cells[0])] = [float(c) for c in cells[1:]]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="folder to run in and keep (default: a temporary one)")
    ap.add_argument("--cores", type=int, default=2)
    a = ap.parse_args()
    import pandas as pd

    want = readme_table((ROOT / "README.md").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        _, work, took = run_default(Path(a.work) if a.work else Path(tmp), "--cores", str(a.cores))
        s = pd.read_csv(work / "results" / "synthetic-persona" / "summary.csv")
    final = s.sort_values("step").groupby("run").tail(1).set_index("K").sort_index()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "tokenizers", "numpy"))
    print(f"default run: {took:.0f} s with --cores {a.cores}; python {platform.python_version()}, {versions}")
    print(f"{'K':>3} | " + " | ".join(f"{c:>22}" for c, _, _ in COLUMNS))
    worst, differ = 0.0, 0
    for k, row in want.items():
        got = final.loc[k]
        cells = []
        for (c, col, digits), readme in zip(COLUMNS, row):
            value = float(got[col])
            same = f"{value:.{digits}f}" == f"{readme:.{digits}f}"
            differ += not same
            worst = max(worst, abs(value - readme))
            cells.append(f"{readme:.{digits}f} -> {value:.{digits}f}{'' if same else ' *'}".rjust(22))
        print(f"{k:>3} | " + " | ".join(cells))
    extra = sorted(set(final.index) - set(want))
    if extra:
        print(f"runs not in the README's table: K = {extra}")
    print(f"largest difference {worst:.2e}; {differ} printed value(s) differ (* README -> this run)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
