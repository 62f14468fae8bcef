"""The workflow on a real one-node SLURM cluster (scripts/slurm_up.sh starts one on localhost; CI does).

Skipped, with the reason, where no SLURM cluster answers."""

import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dpogen import tables
from tests.conftest import REPO, copy_repo


def _slurm_state() -> str | None:
    if not shutil.which("sinfo"):
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


STATE = _slurm_state()
pytestmark = [
    pytest.mark.skipif(STATE is None or not re.search(r"idle|mixed|allocated", STATE or ""),
                       reason=f"no SLURM cluster answers here (sinfo: {STATE!r}); start one with "
                              "scripts/slurm_up.sh as root, as .ci/run does"),
]
pytest.importorskip("snakemake_executor_plugin_slurm", reason="the SLURM executor plugin is not installed")

CFG = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())


def slurm_cmd(repo, work, cfg_path, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(work),
            "--workflow-profile", str(repo / "profiles" / "slurm"), "--jobs", "4", "--cores", "2",
            "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
            # the profile's memory is sized for real models; the tiny config needs little
            "--set-resources",
            *[f"{r}:mem_mb=1000" for r in ("base_model", "data", "sft", "ref_logps", "dpo", "theory")],
            "--configfile", str(cfg_path), *args]


def run(cmd, timeout=240):
    """Run snakemake; on a timeout stop it with SIGINT (it ignores SIGTERM under this executor)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        raise AssertionError(f"snakemake timed out:\n{out[-4000:]}")
    assert p.returncode == 0, out[-6000:]
    return out


def jobs(output: str) -> tuple[dict, dict]:
    """Rules submitted to SLURM and rules run locally, with their counts."""
    sub, loc = {}, {}
    for local, rule in re.findall(r"^(local)?rule (\w+):", output, re.M):
        d = loc if local else sub
        d[rule] = d.get(rule, 0) + 1
    return sub, loc


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """One run of a single sweep point under SLURM with --retries 1, whose DPO job the scheduler cancels
    after the first training save; the workflow must resubmit it and finish."""
    root = tmp_path_factory.mktemp("slurm")
    repo = copy_repo(root / "repo")
    work = root / "work"
    work.mkdir()
    cfg = {**CFG, "sweep": {"param": "data.k", "values": [2], "prefix": "k"},
           "dpo": {**CFG["dpo"], "steps": 600, "save_every": 50, "eval_every": 200}}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen(slurm_cmd(repo, work, work / "c.yaml", "--retries", "1"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    state = work / "results" / "tiny" / "k2" / "dpo" / "resume" / "save" / "meta.pt"
    deadline = time.time() + 300
    while not state.exists():
        if p.poll() is not None:
            raise AssertionError(p.stdout.read()[-4000:])
        if time.time() > deadline:
            p.send_signal(signal.SIGINT)
            raise AssertionError("no training save within 5 minutes")
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout
    dpo_jobs = [line.split()[0] for line in queue.splitlines() if "rule_dpo" in line]
    assert dpo_jobs, queue
    subprocess.run(["scancel", *dpo_jobs], check=True)  # the scheduler kills the training job
    try:
        out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        raise
    assert p.returncode == 0, out[-6000:]
    return repo, work, cfg, out


def test_killed_training_job_is_resubmitted_and_resumes(killed_run):
    _, work, cfg, out = killed_run
    sub, loc = jobs(out)
    # every model stage went to SLURM (dpo twice: cancelled, then resubmitted); aggregation ran locally
    assert sub == {"base_model": 1, "data": 1, "sft": 1, "ref_logps": 1, "dpo": 2, "theory": 1}, sub
    assert loc == {"run_report": 1, "summary": 1, "all": 1}, loc
    assert "submitted with SLURM jobid" in out
    assert "CANCELLED" in out and "Trying to restart job" in out, out[-4000:]
    r = work / "results" / "tiny" / "k2"
    log = (work / "results" / "tiny" / "logs" / "dpo" / "k2.log").read_text()
    resumed = int(re.search(r"resuming from step (\d+)", log).group(1))
    assert 0 < resumed < cfg["dpo"]["steps"]
    m = tables.read_margins(r / "dpo" / "margins.parquet")
    n = len(pd.read_parquet(r / "data" / "train.parquet")) + len(pd.read_parquet(r / "data" / "test.parquet"))
    assert sorted(m["step"].unique()) == [0, 200, 400, 600] and len(m) == 4 * n
    assert not m.duplicated(["step", "sample_id"]).any()
    assert pd.read_parquet(r / "dpo" / "metrics.parquet")["step"].tolist() == list(range(601))


def test_changing_one_setting_resubmits_only_stale_jobs(killed_run):
    repo, work, cfg, _ = killed_run
    (work / "c.yaml").write_text(yaml.safe_dump({**cfg, "theory": {"confidence": 0.8}}))
    sub, loc = jobs(run(slurm_cmd(repo, work, work / "c.yaml")))
    assert sub == {"theory": 1} and loc == {"run_report": 1, "summary": 1, "all": 1}, (sub, loc)
    assert (work / "results" / "tiny" / "summary.csv").exists()
