#!/usr/bin/env bash
# Bring up a one-node SLURM cluster (munge + slurmctld + slurmd) on localhost, no systemd, no slurmdbd:
# what .ci/run starts for tests/test_slurm.py. Debian ships no slurm.conf; this writes a minimal one.
# Idempotent: safe to run repeatedly. Run as root.
set -euo pipefail
T0=$(date +%s.%N)
PARTITION=${SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf

if ! { command -v slurmctld && command -v slurmd && command -v munged && command -v sinfo; } >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi
T1=$(date +%s.%N); echo "install phase: $(python3 -c "print(round($T1-$T0,2))") s"

# --- munge -----------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then          # Debian's postinst normally creates it
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# --- slurm.conf (Debian ships none) -----------------------------------------
HOST=$(hostname -s)
NODELINE=$(slurmd -C | head -n1)                # "NodeName=<host> CPUs=.. Boards=.. ... RealMemory=.."
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
TMPCONF=$(mktemp)
cat > "$TMPCONF" <<CONF
ClusterName=ci
SlurmctldHost=${HOST}
SlurmUser=slurm
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmctldDebug=info
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdDebug=info
SlurmdLogFile=/var/log/slurm/slurmd.log
${NODELINE} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
CHANGED=0
if ! cmp -s "$TMPCONF" "$CONF"; then install -m 0644 "$TMPCONF" "$CONF"; CHANGED=1; fi
rm -f "$TMPCONF"

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- daemons ---------------------------------------------------------------
if running /run/slurmctld.pid && [ $CHANGED = 1 ]; then scontrol reconfigure || true; fi
running /run/slurmctld.pid || /usr/sbin/slurmctld      # daemonizes, runs as SlurmUser
for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
running /run/slurmd.pid || /usr/sbin/slurmd            # daemonizes, runs as root

# --- wait until the node is idle ---------------------------------------------
for i in $(seq 150); do
  STATE=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
  case "$STATE" in idle|mixed|allocated) break;; esac
  case "$STATE" in down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true;; esac
  sleep 0.2
done
sinfo
case "$STATE" in idle|mixed|allocated) echo "SLURM up: node $HOST $STATE; daemon phase: $(python3 -c "print(round($(date +%s.%N)-$T1,2))") s";; *) echo "node not idle: $STATE" >&2; tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2; exit 1;; esac
