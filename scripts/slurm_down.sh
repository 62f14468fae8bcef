#!/usr/bin/env bash
# Stop slurmd, slurmctld, munged (by pid file); safe to run when nothing is running.
set -u
scancel --full -u "$(id -un)" 2>/dev/null || true
stop() {  # $1 pidfile
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/munge/munged.pid
# optional full reset of the controller state (job ids, node state):
[ "${PURGE_STATE:-0}" = 1 ] && rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
exit 0
