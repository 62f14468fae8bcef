"""Benchmark: what a finished default run costs to re-plan, and what each kind of change reschedules.

Runs the default config to the end in a temporary copy of the workflow (about 2 minutes on 2 cores),
then prints the no-op dry run's time beside ``snakemake --version`` (the least any invocation costs) and
beside a do-nothing workflow with as many jobs, all finished (the same rules per run, one small output
each, no Python beyond Snakemake's: what parsing and checking the DAG costs Snakemake itself); medians of
3 each. Then the jobs a dry run schedules after: a ``dpo.log_every`` change, a comment edit in each module
of src/dpogen, a body edit in each, a ``dpo.beta`` change, a ``theory.confidence`` change. The last line:

    parse: no-op dry run 1.23 s, do-nothing workflow of 27 jobs 0.98 s, ratio 1.26x (goal 1.5x)

    python bench/bench_workflow.py [--work DIR] [--repeats 3]

--work: a folder to run in and keep (a second call with the same folder skips the full run).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.workflow_util import planned_jobs, snakemake  # noqa: E402

COPIED = ["Snakefile", "rules", "workflow_scripts", "src", "config", "report", "envs", "profiles"]
PROBE_BODY = "\n\ndef _probe_edit():\n    return 1\n"
PROBE_COMMENT = "\n# a probe comment\n"


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_default(base: Path, *args) -> tuple[Path, Path, float]:
    """The default config run to the end in a copy of the workflow under ``base``: (repo, work, seconds)."""
    repo = copy_workflow(base / "repo")
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    snakemake(repo, work, *args, timeout=3600)
    return repo, work, time.perf_counter() - t


def median_time(cmd, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


RUN_RULES = ("data", "sft", "ref_logps", "dpo", "theory", "run_report")


def do_nothing(folder: Path, runs: list[str]) -> Path:
    """A workflow with the default's jobs (base_model, six rules per run, summary, all), every output made:
    a dry run of it has nothing to do. Returns its Snakefile."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"RUNS = {runs!r}", "", "rule all:", "    input: 'out/summary.txt'", "",
             "rule base_model:", "    output: 'out/base.txt'", "    shell: 'echo base > {output}'", ""]
    before = "'out/base.txt'"
    for rule in RUN_RULES:
        lines += [f"rule {rule}:", f"    input: {before}", f"    output: 'out/{{run}}/{rule}.txt'",
                  "    shell: 'echo done > {output}'", ""]
        before = f"'out/{{run}}/{rule}.txt'"
    lines += ["rule summary:", "    input: expand('out/{run}/run_report.txt', run=RUNS)",
              "    output: 'out/summary.txt'", "    shell: 'echo done > {output}'", ""]
    snakefile = folder / "Snakefile"
    snakefile.write_text("\n".join(lines))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(folder),
                    "--cores", "2", "--quiet"], check=True, capture_output=True)
    return snakefile


@contextlib.contextmanager
def appended(path: Path, text: str):
    old = path.read_bytes()
    path.write_bytes(old + text.encode())
    try:
        yield
    finally:
        path.write_bytes(old)


def jobs(plan: dict[str, int]) -> str:
    return " ".join(f"{r}:{n}" for r, n in sorted(plan.items()) if r != "all") or "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="folder to run in and keep (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo, work, t_run = run_default(Path(a.work) if a.work else Path(tmp))
        assert planned_jobs(repo, work) == {}, "the default run did not finish"

        smk = [sys.executable, "-m", "snakemake"]
        t_version = median_time([*smk, "--version"], a.repeats)
        t_noop = median_time([*smk, "-s", str(repo / "Snakefile"), "--directory", str(work), "--cores", "2", "-n"],
                             a.repeats)
        runs = sorted({p.parent.parent.name for p in (work / "results").glob("*/*/dpo/run.json")})
        empty = do_nothing(Path(tmp) / "do-nothing", runs)
        t_empty = median_time([*smk, "-s", str(empty), "--directory", str(empty.parent), "--cores", "2", "-n"],
                              a.repeats)
        n_jobs = 3 + len(RUN_RULES) * len(runs)

        def with_config(name, over: str):
            path = work / f"{name}.yaml"
            path.write_text(over)
            return planned_jobs(repo, work, "--configfile", str(path))

        rows = [("dpo.log_every: 10 -> 5", with_config("log_every", "dpo: {log_every: 5}\n"))]
        pkg = repo / "src" / "dpogen"
        modules = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py"))
        for m in modules:
            with appended(pkg / m, PROBE_COMMENT):
                rows.append((f"comment appended to {m}", planned_jobs(repo, work)))
        for m in modules:
            with appended(pkg / m, PROBE_BODY):
                rows.append((f"function appended to {m}", planned_jobs(repo, work)))
        rows.append(("dpo.beta: 0.1 -> 0.2", with_config("beta", "dpo: {beta: 0.2}\n")))
        rows.append(("theory.confidence: 0.95 -> 0.9", with_config("confidence", "theory: {confidence: 0.9}\n")))
        assert planned_jobs(repo, work) == {}, "an edit was not restored"

    print(f"default config, finished in {t_run:.0f} s ({sys.executable})")
    print(f"{'command':<40}{'seconds':>9}{'x --version':>13}")
    print(f"{'snakemake --version':<40}{t_version:>9.2f}{1:>12.1f}x")
    print(f"{'snakemake -n (nothing to do)':<40}{t_noop:>9.2f}{t_noop / t_version:>12.1f}x")
    print(f"{'do-nothing workflow, ' + str(n_jobs) + ' jobs, -n':<40}{t_empty:>9.2f}{t_empty / t_version:>12.1f}x")
    print()
    w = max(len(name) for name, _ in rows) + 2
    print(f"{'change':<{w}}{'jobs':>5}  rules: jobs (the total counts all as well)")
    for name, plan in rows:
        print(f"{name:<{w}}{sum(plan.values()):>5}  {jobs(plan)}")
    print(f"parse: no-op dry run {t_noop:.2f} s, do-nothing workflow of {n_jobs} jobs {t_empty:.2f} s, "
          f"ratio {t_noop / t_empty:.2f}x (goal 1.5x)")


if __name__ == "__main__":
    main()
