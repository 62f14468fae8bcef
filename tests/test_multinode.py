"""Several nodes, as srun starts them: two launchers (``python -m dpogen.launch --node``), each standing for
a node with 2 CPU processes (gloo), given the environment SLURM sets for a step's task, join one c10d
rendezvous on 127.0.0.1. FSDP2 and HSDP against one process, a lost node, a node that never comes, a
4-process save resumed on 2. At the end, a real 2-node SLURM cluster (scripts/slurm_two_nodes.sh) running the
workflow through the SLURM profile."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from dpogen import tables
from dpogen.launch import LaunchError, allocation, job_record, rendezvous, srun_command, torchrun_command
from tests.conftest import REPO
from tests.test_engine import MARGIN_COLS, job, one_process, run10  # noqa: F401 (run10: a fixture)

NODES, PER_NODE = 2, 2


def node_env(node: int) -> dict:
    """What srun sets for the task on node ``node`` of a 2-node step (the parts the launcher reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", SLURM_NODEID=str(node), SLURM_NNODES=str(NODES), SLURM_PROCID=str(node),
               SLURM_JOB_NODELIST="localhost", SLURM_STEP_NUM_NODES=str(NODES),
               PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return env


def job_file(tmp_path, j: dict, name: str, timeout: int = 60) -> str:
    rec = job_record("dpo", j, 1)
    rec["rendezvous"] = rendezvous("127.0.0.1", NODES, NODES * PER_NODE, timeout)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rec))
    return str(path)


def start_nodes(path: str, log, nodes=range(NODES)) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "dpogen.launch", "--node", path], env=node_env(n), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True) for n in nodes]


def two_nodes(tmp_path, j: dict, name: str) -> str:
    """Run ``j`` on the two launchers; returns their output."""
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        procs = start_nodes(job_file(tmp_path, j, name), out)
        codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], log.read_text()[-3000:]
    return log.read_text()


def kill_tree(pid: int) -> None:
    """A node lost: its launcher, its torchrun and the processes torchrun started (in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def assert_close(a: pd.DataFrame, b: pd.DataFrame, atol=1e-5):
    pd.testing.assert_frame_equal(a.drop(columns=MARGIN_COLS), b.drop(columns=MARGIN_COLS))
    np.testing.assert_allclose(b["margin"], a["margin"], atol=atol, rtol=0)
    np.testing.assert_allclose(b["logp_chosen"], a["logp_chosen"], atol=atol, rtol=0)


@pytest.mark.parametrize("parallel", ["fsdp", "hsdp"])
def test_two_nodes_train_as_one_process(tmp_path, tiny_model_dir, run10, parallel):  # noqa: F811
    """10 steps on 2 nodes × 2 processes: margins equal the 1-process run's within 1e-5; the weights were
    read into the shards; HSDP builds a 2 × 2 mesh (replicate over nodes, shard inside one)."""
    one = one_process(tmp_path, tiny_model_dir, run10, "one", gradient_checkpointing=True)
    j = job(tmp_path, tiny_model_dir, run10[2].replace(processes=4, parallel=parallel, gradient_checkpointing=True),
            parallel)
    out = two_nodes(tmp_path, j, parallel)
    assert "weights read into their shards" in out
    mesh = {"fsdp": "FSDP over a device mesh (4,) (shard)",
            "hsdp": "HSDP over a device mesh (2, 2) (replicate x shard)"}
    assert mesh[parallel] in out
    info = json.loads(open(j["out_info"]).read())
    assert info["processes"] == 4 and info["parallel"] == parallel
    assert_close(one, tables.read_margins(j["out_margins"]))


@pytest.mark.slow  # three 4-process runs and a 2-process one: about 55 s
def test_a_lost_node_stops_the_job_naming_its_ranks_and_the_rerun_resumes(tmp_path, tiny_model_dir, run10):  # noqa: F811
    """Kill one "node" (its launcher, torchrun and processes) after the first save: the other ends with an
    error naming the lost ranks; the rerun on 2 nodes resumes from the save to the tables of an uninterrupted
    run; the same 4-process save resumed on 2 processes (one node) gives them within 1e-5."""
    import shutil

    from dpogen.launch import launch

    cfg = run10[2].replace(processes=4, steps=30, eval_every=10, save_every=5)
    whole = job(tmp_path, tiny_model_dir, cfg, "whole")
    two_nodes(tmp_path, whole, "whole")
    expected = tables.read_margins(whole["out_margins"])

    j = job(tmp_path, tiny_model_dir, cfg, "killed")
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        procs = start_nodes(job_file(tmp_path, j, "killed"), out)
        save = tmp_path / "killed" / "work" / "save" / "meta.pt"
        deadline = time.time() + 300
        while not save.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        assert save.exists(), log.read_text()[-3000:]
        kill_tree(procs[1].pid)
        assert procs[0].wait(timeout=300) != 0
    text = log.read_text()
    assert "lost rank(s)" in text and "rendezvous c10d at 127.0.0.1" in text, text[-3000:]
    # the killed node's two ranks, named by the survivors (c10d gives a node either ranks 0-1 or 2-3)
    lost = set(re.findall(r"LaunchError: rank \d: lost rank\(s\) (\d, \d) of 4", text))
    assert len(lost) == 1 and lost <= {"0, 1", "2, 3"}, text[-3000:]
    shutil.copytree(tmp_path / "killed" / "work", tmp_path / "four-save")

    out = two_nodes(tmp_path, j, "rerun")
    assert "resuming from step" in out
    pd.testing.assert_frame_equal(expected, tables.read_margins(j["out_margins"]))

    k = job(tmp_path, tiny_model_dir, cfg.replace(processes=2), "on-two")
    shutil.copytree(tmp_path / "four-save", k["work_dir"])
    launch("dpo", k, 2, log_path=str(tmp_path / "on-two.log"))
    assert "resuming a save of 4 processes on 2" in (tmp_path / "on-two.log").read_text()
    assert_close(expected, tables.read_margins(k["out_margins"]))


def test_a_node_that_never_comes_fails_naming_the_rendezvous(tmp_path, tiny_model_dir, run10):  # noqa: F811
    """Only the first of 2 nodes starts: its launcher gives up after the join timeout (10 s here), naming the
    rendezvous, instead of waiting for ever."""
    j = job(tmp_path, tiny_model_dir, run10[2].replace(processes=4), "alone")
    log = tmp_path / "alone.log"
    t0 = time.time()
    with open(log, "w") as out:
        (proc,) = start_nodes(job_file(tmp_path, j, "alone", timeout=10), out, nodes=[0])
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code != 0 and time.time() - t0 < 90
    assert "node 0 of 2" in text and "rendezvous c10d at 127.0.0.1:" in text and "join timeout 10 s" in text


def test_the_commands_srun_runs():
    """One srun task per node, each that node's torchrun with the c10d rendezvous; node 0 hosts its store."""
    rz = {"endpoint": "gpu01:29811", "nodes": 4, "per_node": 8, "id": "77", "timeout": 300}
    assert srun_command("/shared/j.json", 4)[:5] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1",
                                                      "--kill-on-bad-exit=1"]
    cmd = torchrun_command("/shared/j.json", rz, 0)
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--nproc-per-node") + 1] == "8"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu01:29811" and "c10d" in cmd
    assert "is_host=1" in cmd[cmd.index("--rdzv-conf") + 1]
    assert "is_host=0" in torchrun_command("/shared/j.json", rz, 3)[cmd.index("--rdzv-conf") + 1]
    assert cmd[-3:] == ["-m", "dpogen.launch", "/shared/j.json"]


def test_several_nodes_outside_slurm_are_refused(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    with pytest.raises(LaunchError, match="resources.nodes: 2 needs a SLURM allocation"):
        allocation(2)
    with pytest.raises(LaunchError, match="cannot be split evenly"):
        rendezvous("h", 2, 3, 60)


# ------------------------------------------------------------------------------------ a real 2-node SLURM


@pytest.fixture(scope="module")
def two_node_slurm():
    """A second SLURM cluster of two nodes on this machine (scripts/slurm_two_nodes.sh: each slurmd in
    network, UTS and mount namespaces of its own); skipped, with the reason, where it cannot be had."""
    import shutil

    script = REPO / "scripts" / "slurm_two_nodes.sh"
    if os.geteuid() != 0 or not shutil.which("slurmd") or not shutil.which("unshare"):
        pytest.skip("a two-node SLURM here needs root, slurmd and unshare (scripts/slurm_up.sh installs SLURM)")
    up = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    if up.returncode:
        pytest.skip(f"the two-node SLURM could not be started: {(up.stdout + up.stderr)[-600:]}")
    yield "/tmp/dpogen-twonode/slurm.conf"
    subprocess.run(["bash", str(script), "down", "--purge"], capture_output=True, timeout=120)


@pytest.mark.slow  # a 2-node SLURM workflow (sft, ref_logps, dpo each across both nodes) and a local one: ~4 min
def test_a_two_node_dpo_job_through_the_slurm_profile(tmp_path, two_node_slurm):
    """Snakemake's SLURM executor submits sft, ref_logps and dpo with nodes=2 and one task per node; each job
    srun-starts one launcher per node (tn1, tn2: two hosts with their own addresses), joining one c10d
    rendezvous; the margins equal a 1-process local run's within 1e-5."""
    import yaml

    from tests.conftest import copy_repo
    from tests.test_slurm import CFG, run

    repo = copy_repo(tmp_path / "repo")
    cfg = {**CFG, "experiment": "twonode", "sweep": {"param": "data.k", "values": [2], "prefix": "k"},
           "dpo": {**CFG["dpo"], "steps": 10, "eval_every": 5, "save_every": 5, "processes": 4},
           "resources": {"nodes": 2}}
    target = "results/twonode/k2/dpo/run.json"
    works = {}
    for name, over in (("slurm", {}), ("local", {"dpo": {**cfg["dpo"], "processes": 1}, "resources": {"nodes": 1}})):
        work = works[name] = tmp_path / name
        work.mkdir()
        (work / "c.yaml").write_text(yaml.safe_dump({**cfg, **over}))
    env = {**os.environ, "SLURM_CONF": two_node_slurm}
    cmd = [sys.executable, "-m", "snakemake", target, "-s", str(repo / "Snakefile"), "--directory",
           str(works["slurm"]), "--workflow-profile", str(repo / "profiles" / "slurm"), "--jobs", "4", "--cores", "2",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--set-resources",
           *[f"{r}:mem_mb=1000" for r in ("base_model", "data", "check_data")],
           "--configfile", str(works["slurm"] / "c.yaml")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert "nodes=2, tasks=2, mpi=srun" in p.stdout + p.stderr
    logs = works["slurm"] / "results" / "twonode" / "logs"
    for stage in ("sft", "ref_logps", "dpo"):
        text = (logs / stage / "k2.log").read_text()
        assert "torchrun on 2 nodes under srun" in text, stage
        assert "node 0 of 2 (tn1)" in text and "node 1 of 2 (tn2)" in text, text[-3000:]
    run([sys.executable, "-m", "snakemake", target, "-s", str(repo / "Snakefile"), "--directory", str(works["local"]),
         "--cores", "2", "--configfile", str(works["local"] / "c.yaml")], timeout=600)
    one, two = (tables.read_margins(works[n] / "results" / "twonode" / "k2" / "dpo" / "margins.parquet")
                for n in ("local", "slurm"))
    assert_close(one, two)


def test_several_nodes_without_the_slurm_executor_are_refused_before_any_job(tmp_path):
    """resources.nodes: 2 on a workstation (the local executor): the workflow stops before its first job,
    naming the key and the fix; nothing is written under results/."""
    import yaml

    from tests.test_slurm import CFG

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CFG, "resources": {"nodes": 2},
                                                     "dpo": {**CFG["dpo"], "processes": 4}}))
    p = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                        "--cores", "1", "--configfile", str(tmp_path / "c.yaml")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "resources.nodes: 2 needs the SLURM executor" in p.stdout + p.stderr and "set resources.nodes: 1" in p.stderr
    assert not (tmp_path / "results").exists()
