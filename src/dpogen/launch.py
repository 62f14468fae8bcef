"""Start a model stage (dpo training, SFT, the reference pass) in several processes: on one node with
``accelerate launch``; over several nodes of a SLURM allocation with one ``torchrun`` per node under
``srun``, joined by a c10d rendezvous on the allocation's first node.

    python -m dpogen.launch JOB.json           # what each launched process runs
    python -m dpogen.launch --node JOB.json    # what srun runs on each node: that node's torchrun

The job file names the stage and holds its function's arguments (paths and settings); the workflow
script writes it (beside the job's log when it spans nodes: every node reads it). The processes find each
other through the environment the launcher sets (dpogen.parallel).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]


# the stages' entry points, named rather than imported: a stage's code hash follows only its own imports
STAGES = {"dpo": "dpogen.engine.loop:train_dpo_files", "sft": "dpogen.sft:train_sft_files",
          "ref": "dpogen.reference:compute_reference_files"}


class LaunchError(RuntimeError):
    """A multi-process job that could not start, or whose processes lost each other."""


def launch(stage: str, job: dict, processes: int, log_path: str | None = None, threads: int = 1, nodes: int = 1,
           rendezvous_timeout: int = 300) -> None:
    """Run ``stage`` (a name of STAGES, or "module:function") on the keyword arguments ``job`` in
    ``processes`` processes over ``nodes`` nodes; raise if any fails."""
    record = job_record(stage, job, threads)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    folder = None
    if nodes > 1:
        record["rendezvous"] = rendezvous(allocation(nodes)[0], nodes, processes, rendezvous_timeout)
        folder = Path(log_path).parent if log_path else Path.cwd()  # shared by the nodes, as results/ is
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=folder, prefix=".launch-") as f:
        json.dump(record, f)
    cmd = srun_command(f.name, nodes) if nodes > 1 else accelerate_command(f.name, processes)
    try:
        _run(cmd, env, log_path)
    except subprocess.CalledProcessError as e:
        if nodes == 1:
            raise
        rz = record["rendezvous"]
        raise LaunchError(f"the {nodes}-node job failed (exit {e.returncode}): its launchers met through the c10d "
                          f"rendezvous at {rz['endpoint']} (join timeout {rz['timeout']} s); "
                          f"see {log_path or 'the output above'} for the node and rank that failed") from None
    finally:
        os.unlink(f.name)


def accelerate_command(job_file: str, processes: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dpogen.launch",
            job_file]


def _run(cmd: list[str], env: dict, log_path: str | None) -> None:
    """Run the launcher with its processes' output appended to the job's log; when it fails, that output (their
    tracebacks) is copied into the attempts log too, which outlives the job's log when Snakemake retries."""
    if not log_path:
        subprocess.run(cmd, check=True, env=env)
        return
    from .training import attempts_path

    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "a") as out:
        p = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if p.returncode:
        history = attempts_path(log_path)
        if os.path.exists(history):
            with open(log_path, "rb") as f, open(history, "ab") as out:
                f.seek(max(start, os.path.getsize(log_path) - (4 << 20)))  # its last 4 MiB at most
                out.write(b"--- the processes' output ---\n" + f.read() + b"--- end of the processes' output ---\n")
        raise subprocess.CalledProcessError(p.returncode, cmd)


# ------------------------------------------------------------------------------------------ several nodes


def allocation(nodes: int) -> list[str]:
    """The host names of this SLURM job's nodes (the first hosts the rendezvous); refused outside an
    allocation of at least ``nodes`` nodes."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise LaunchError(f"resources.nodes: {nodes} needs a SLURM allocation of {nodes} nodes, and this job runs "
                          f"outside SLURM (no SLURM_JOB_ID); run the workflow with the SLURM executor "
                          f"(--workflow-profile profiles/slurm) or set resources.nodes: 1")
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:  # the jobstep executor keeps only SLURM_JOB_ID in a job's environment
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
        m = re.search(r"\bNodeList=(\S+)", out.stdout)
        if out.returncode or not m:
            raise LaunchError(f"SLURM job {job}: scontrol cannot name its nodes ({(out.stderr or out.stdout)[-300:]})")
        nodelist = m.group(1)
    hosts = hostnames(nodelist)
    if len(hosts) < nodes:
        raise LaunchError(f"resources.nodes: {nodes}, but SLURM job {job} holds {len(hosts)} node(s) ({nodelist}); "
                          f"the rule asks for resources.nodes nodes: rerun it, or lower resources.nodes")
    return hosts[:nodes]


def hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed node list (``gpu[01-03,07],login1``) as host names, through scontrol."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(head: str, nodes: int, processes: int, timeout: int) -> dict:
    """Where the nodes' launchers meet: a port free on the head node (this job runs there: a batch script
    runs on its allocation's first node)."""
    if processes % nodes:
        raise LaunchError(f"dpo.processes: {processes} cannot be split evenly over resources.nodes: {nodes}")
    port = free_port()
    monitor = next(p for p in iter(free_port, None) if p != port)
    return {"endpoint": f"{head}:{port}", "monitor": f"{head}:{monitor}", "nodes": nodes,
            "per_node": processes // nodes, "id": os.environ.get("SLURM_JOB_ID", "dpogen"), "timeout": timeout}


def srun_command(job_file: str, nodes: int) -> list[str]:
    """One task per node, each that node's torchrun; one failing task ends them all."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            sys.executable, "-m", "dpogen.launch", "--node", job_file]


def torchrun_command(job_file: str, rz: dict, node: int) -> list[str]:
    """This node's torchrun: ``per_node`` processes joining the c10d rendezvous; node 0 hosts its store."""
    conf = f"join_timeout={rz['timeout']},is_host={int(node == 0)}"
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(rz["nodes"]),
            "--nproc-per-node", str(rz["per_node"]), "--rdzv-backend", "c10d", "--rdzv-endpoint", rz["endpoint"],
            "--rdzv-id", str(rz["id"]), "--rdzv-conf", conf, "--max-restarts", "0", "--monitor-interval", "1",
            "-m", "dpogen.launch", job_file]


def node_main(job_file: str) -> int:
    """One node's share of a multi-node job, as srun starts it: the node is SLURM_NODEID of SLURM_NNODES."""
    rz = json.loads(Path(job_file).read_text())["rendezvous"]
    node, nnodes = int(os.environ.get("SLURM_NODEID", "0")), int(os.environ.get("SLURM_NNODES", "1"))
    host = socket.gethostname()
    if nnodes != rz["nodes"]:
        print(f"dpogen: node {node} ({host}): this srun step spans {nnodes} node(s), the job {rz['nodes']}",
              file=sys.stderr)
        return 2
    print(f"dpogen: node {node} of {nnodes} ({host}): {rz['per_node']} processes joining the c10d rendezvous at "
          f"{rz['endpoint']}", file=sys.stderr, flush=True)
    # node 0's launcher holds the store the processes count their heartbeats in (lost_ranks reads it)
    monitor = _monitor(rz["monitor"], master=True) if node == 0 else None  # noqa: F841 (kept open)
    env = {**os.environ, "DPOGEN_MONITOR": rz["monitor"]}
    rc = subprocess.run(torchrun_command(job_file, rz, node), env=env).returncode
    if rc:
        print(f"dpogen: node {node} of {nnodes} ({host}): torchrun exited with {rc}; rendezvous c10d at "
              f"{rz['endpoint']} (id {rz['id']}, join timeout {rz['timeout']} s)", file=sys.stderr)
    return rc


def job_record(stage: str, job: dict, threads: int = 1) -> dict:
    """What a launched process reads (JSON): the stage's entry point, its arguments (the model's loading
    options among them) and the threads per process."""
    return {"stage": STAGES.get(stage, stage), "args": {k: _encode(v) for k, v in job.items()}, "threads": threads}


def _encode(value):
    """A typed settings section travels as its class name and fields (the job file is JSON)."""
    from .settings import Section

    return {"section": type(value).__name__, "fields": value.model_dump()} if isinstance(value, Section) else value


def _decode(value):
    from .settings import sections

    if isinstance(value, dict) and set(value) == {"section", "fields"}:
        return getattr(sections, value["section"]).model_validate(value["fields"])
    return value


def run_stage(stage: str, args: dict) -> None:
    """The stage's entry point on its arguments, in this process."""
    import importlib

    module, func = STAGES.get(stage, stage).split(":")
    getattr(importlib.import_module(module), func)(**args)


def main(job_file: str) -> None:
    import logging

    import torch

    from .training import setup_logging

    job = json.loads(Path(job_file).read_text())
    setup_logging(None)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("dpogen").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, job.get("threads", 1)))
    stop = heartbeat()
    try:
        run_stage(job["stage"], {k: _decode(v) for k, v in job["args"].items()})
    except Exception as e:
        # a failed collective (a peer gone), not an error every rank raises alike (a diverged loss, a bad file)
        lost = lost_ranks() if type(e) is RuntimeError or "DistError" in type(e).__name__ else []
        if lost:
            raise LaunchError(f"rank {os.environ.get('RANK')}: lost rank(s) {', '.join(map(str, lost))} of "
                              f"{os.environ.get('WORLD_SIZE')} (a node or a process died): the job stops; a rerun "
                              f"resumes from the last save") from e
        raise
    finally:
        stop()


def heartbeat():
    """In a process of a multi-node job: count this rank's heartbeats in the monitor store (hosted by node 0's
    launcher, DPOGEN_MONITOR), once a second, from a thread, so that a rank stuck in a collective whose peer
    gave up still counts as alive. Returns the function that stops it (before the interpreter exits: a
    thread left inside the store's C++ client then would abort the process)."""
    import threading

    addr = os.environ.get("DPOGEN_MONITOR")
    if not addr:
        return lambda: None
    store, key, done = _monitor(addr), f"beat/{os.environ.get('RANK', '0')}", threading.Event()

    def beat():
        while not done.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the monitor is gone: the job is ending
                return
            done.wait(1.0)

    thread = threading.Thread(target=beat, daemon=True, name="dpogen-heartbeat")
    thread.start()

    def stop():
        done.set()
        thread.join(timeout=10)

    return stop


def _monitor(addr: str, master: bool = False):
    import datetime

    from torch.distributed import TCPStore

    host, port = addr.rsplit(":", 1)
    return TCPStore(host, int(port), is_master=master, timeout=datetime.timedelta(seconds=30),
                    wait_for_workers=False)


def lost_ranks(wait_s: float = 4.0) -> list[int]:
    """After a failure in a multi-node job: the ranks whose heartbeats stopped (counted twice, ``wait_s``
    apart), or [] when it cannot tell (one node, or the monitor gone with node 0)."""
    addr, world = os.environ.get("DPOGEN_MONITOR"), int(os.environ.get("WORLD_SIZE", "1"))
    if not addr or world == 1:
        return []
    try:
        store = _monitor(addr)
        first = [int(store.add(f"beat/{r}", 0)) for r in range(world)]
        time.sleep(wait_s)
        second = [int(store.add(f"beat/{r}", 0)) for r in range(world)]
    except Exception:
        return []
    return [r for r in range(world) if second[r] == first[r]]


if __name__ == "__main__":
    if sys.argv[1] == "--node":
        sys.exit(node_main(sys.argv[2]))
    main(sys.argv[1])
