"""Running the real Snakefile in temp folders."""

import re
import subprocess
import sys
from pathlib import Path


def snakemake(repo: Path, workdir: Path, *args, check=True, timeout=900):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def planned_jobs(repo: Path, workdir: Path, *args) -> dict[str, int]:
    """Rule → number of jobs a dry run would execute (empty when nothing is to be done)."""
    p = snakemake(repo, workdir, "--dry-run", *args)
    text = p.stdout + p.stderr
    m = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\n\s*total", text, re.S)
    if not m:
        assert "Nothing to be done" in text, text[-3000:]
        return {}
    return {name: int(n) for name, n in (line.split() for line in m.group(1).strip().splitlines())}
