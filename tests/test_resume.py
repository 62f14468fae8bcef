"""A DPO job killed with SIGKILL mid-run resumes from its last save when the workflow is rerun, and ends
with the same tables as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dpogen import tables
from tests.conftest import REPO
from tests.workflow_util import snakemake

pytestmark = pytest.mark.slow  # the real workflow end to end

CFG = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
CFG["sweep"] = {"param": "data.k", "values": [2], "prefix": "k"}
CFG["dpo"].update(steps=800, save_every=50, eval_every=200, log_every=100)


def test_kill_9_then_rerun_resumes_and_matches(tmp_path):
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    for d in (ref_dir, killed_dir):
        d.mkdir()
        (d / "c.yaml").write_text(yaml.safe_dump(CFG))
    snakemake(REPO, ref_dir, "--configfile", str(ref_dir / "c.yaml"))

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(killed_dir),
           "--cores", "1", "--configfile", str(killed_dir / "c.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed_dir / "results" / "tiny" / "k2" / "dpo" / "resume" / "save" / "meta.pt"
    deadline = time.time() + 600
    while not state.exists():
        assert proc.poll() is None, "the workflow ended before the first training save"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: snakemake and the training process
    proc.wait()
    out = killed_dir / "results" / "tiny" / "k2"
    assert not (out / "dpo" / "metrics.parquet").exists()

    # as after a crash: release Snakemake's lock, then rerun; the incomplete job starts again and resumes
    snakemake(REPO, killed_dir, "--configfile", str(killed_dir / "c.yaml"), "--unlock")
    p = snakemake(REPO, killed_dir, "--configfile", str(killed_dir / "c.yaml"), "--rerun-incomplete")
    log = (killed_dir / "results" / "tiny" / "logs" / "dpo" / "k2.log").read_text()
    assert "resuming from step" in log, p.stdout[-2000:]
    resumed_at = int(log.split("resuming from step ")[1].split()[0])
    # the killed attempt's log is kept beside the new one
    history = (killed_dir / "results" / "tiny" / "logs" / "dpo" / "k2.attempts.log").read_text()
    assert history.count("=== attempt started") == 2 and "saved training state at step" in history.split("resuming")[0]
    assert 0 < resumed_at < CFG["dpo"]["steps"]

    a = tables.read_margins(ref_dir / "results" / "tiny" / "k2" / "dpo" / "margins.parquet")
    b = tables.read_margins(out / "dpo" / "margins.parquet")
    pd.testing.assert_frame_equal(a, b)  # same values, same rows: no duplicated or missing step
    ma = pd.read_parquet(ref_dir / "results" / "tiny" / "k2" / "dpo" / "metrics.parquet")
    mb = pd.read_parquet(out / "dpo" / "metrics.parquet")
    cols = [c for c in ma.columns if c not in ("pairs_per_s", "elapsed_s")]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])
    assert mb["step"].tolist() == list(range(CFG["dpo"]["steps"] + 1))
    # the in-batch margins of the steps before the save came back from it, the rest were recorded anew
    ba = pd.read_parquet(ref_dir / "results" / "tiny" / "k2" / "dpo" / "batch_margins.parquet")
    bb = pd.read_parquet(out / "dpo" / "batch_margins.parquet")
    pd.testing.assert_frame_equal(ba, bb)
    assert sorted(bb["step"].unique()) == list(range(CFG["dpo"]["steps"]))
