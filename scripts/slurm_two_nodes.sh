#!/usr/bin/env bash
# A second SLURM cluster on this machine with two compute nodes, for the multi-node test
# (tests/test_multinode.py): each slurmd runs in its own network, UTS and mount namespace, so each is a host
# of its own (hostname tn1 / tn2, addresses 10.77.0.11 / .12 on a bridge, names in a private /etc/hosts);
# the controller listens on the bridge (10.77.0.1, its own hostname tnctl). Its own config, ports
# (7817/7818), state and logs under $D; the one-node cluster of scripts/slurm_up.sh (whose munged it reuses)
# is left alone. Idempotent. Run as root.
#   bash scripts/slurm_two_nodes.sh [up]         then: export SLURM_CONF=/tmp/dpogen-twonode/slurm.conf
#   bash scripts/slurm_two_nodes.sh down [--purge]
# Look inside a node: nsenter -t $(cat /tmp/dpogen-twonode/run/slurmd.tn1.pid) -n -u -m bash
set -euo pipefail
D=${TWONODE_DIR:-/tmp/dpogen-twonode}
CONF=$D/slurm.conf
export SLURM_CONF=$CONF
BR=tnbr0
NET=10.77.0
NODES=(tn1 tn2)
declare -A IP=([tn1]=$NET.11 [tn2]=$NET.12)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && grep -q "$2" /proc/"$(cat "$1")"/comm; }
stop() {  # pidfile, command name
  running "$1" "$2" || { rm -f "$1"; return 0; }
  local p; p=$(cat "$1"); kill "$p"
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true; rm -f "$1"
}

if [ "${1:-up}" = down ]; then
  for n in "${NODES[@]}"; do stop $D/run/slurmd.$n.pid slurmd; done
  for n in "${NODES[@]}"; do  # job steps left in a node's network namespace, then the namespace
    if [ -e /run/netns/$n ]; then
      for p in $(ip netns pids $n 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del $n 2>/dev/null || true
    fi
    ip link del $n-h 2>/dev/null || true
  done
  stop $D/run/slurmctld.pid slurmctld
  ip link del $BR 2>/dev/null || true
  [ "${2:-}" = --purge ] && rm -rf "$D"
  exit 0
fi

T0=$(date +%s.%N)
for tool in slurmctld slurmd unshare nsenter ip; do
  command -v $tool >/dev/null || { echo "$tool is missing (scripts/slurm_up.sh installs SLURM)" >&2; exit 1; }
done
munge -n | unmunge >/dev/null || { echo "munged is not running: run scripts/slurm_up.sh first" >&2; exit 1; }
[ -e /etc/slurm/slurm.conf ] || { echo "/etc/slurm/slurm.conf is missing: run scripts/slurm_up.sh first" >&2; exit 1; }
install -d -m 0755 $D $D/run $D/spool
install -d -o slurm -g slurm -m 0755 $D/log $D/state
printf '127.0.0.1 localhost\n%s tnctl\n' $NET.1 > $D/hosts
for n in "${NODES[@]}"; do install -d -m 0755 $D/spool/$n; echo "${IP[$n]} $n" >> $D/hosts; done

# RealMemory: each slurmd sees the whole machine; 11 GB each keeps both within it and fits the plan's
# per-node host memory of a 2-process tiny job
# what does not depend on the hosts (authentication, process tracking, scheduling, no accounting) is the
# one-node cluster's, read from its slurm.conf, so the two clusters schedule alike
SHARED='^(SlurmUser|AuthType|ProctrackType|TaskPlugin|ReturnToService|SchedulerType|SelectType|SelectTypeParameters|DefMemPerCPU|AccountingStorageType|JobAcctGatherType|JobCompType|MpiDefault)='
cat > $CONF.new <<CONF
ClusterName=twonode
SlurmctldHost=tnctl($NET.1)
SlurmctldPort=7817
SlurmdPort=7818
SrunPortRange=60001-63000
MinJobAge=600
$(grep -E "$SHARED" /etc/slurm/slurm.conf)
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.%n.pid
SlurmdSpoolDir=$D/spool/%n
StateSaveLocation=$D/state
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
$(for n in "${NODES[@]}"; do echo "NodeName=$n NodeAddr=${IP[$n]} NodeHostname=$n CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=11000 State=UNKNOWN"; done)
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
CHANGED=0
if cmp -s $CONF.new $CONF; then rm -f $CONF.new; else mv $CONF.new $CONF; chmod 0644 $CONF; CHANGED=1; fi

# the network: a bridge here, one namespace and veth pair per node
ip link show $BR >/dev/null 2>&1 || ip link add $BR type bridge
ip addr show dev $BR | grep -q "inet $NET.1/24" || ip addr add $NET.1/24 dev $BR
ip link set $BR up
for n in "${NODES[@]}"; do
  [ -e /run/netns/$n ] || ip netns add $n
  if ! ip -n $n link show eth0 >/dev/null 2>&1; then
    ip link del $n-h 2>/dev/null || true
    ip link add $n-h type veth peer name $n-c
    ip link set $n-c netns $n
    ip -n $n link set $n-c name eth0
  fi
  ip link set $n-h master $BR up
  ip -n $n addr show dev eth0 | grep -q "inet ${IP[$n]}/24" || ip -n $n addr add ${IP[$n]}/24 dev eth0
  ip -n $n link set lo up
  ip -n $n link set eth0 up
done

# the controller: hostname tnctl and the private hosts file in namespaces of its own
if running $D/run/slurmctld.pid slurmctld; then
  if [ $CHANGED = 1 ]; then scontrol reconfigure; fi
else
  unshare --uts --mount --propagation private sh -c \
    "hostname tnctl; mount --bind $D/hosts /etc/hosts; exec /usr/sbin/slurmctld -f $CONF"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { echo "slurmctld did not come up:" >&2; tail -20 $D/log/slurmctld.log >&2; exit 1; }

# one slurmd per node, seeing this cluster's config as /etc/slurm/slurm.conf (Snakemake's jobstep executor
# drops SLURM_CONF from a job's environment: srun in a job reads the default path). nsenter --net, not
# `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd then stops ("No filesystem mounted
# on /sys/fs/cgroup")
for n in "${NODES[@]}"; do
  running $D/run/slurmd.$n.pid slurmd && continue
  nsenter --net=/run/netns/$n unshare --uts --mount --propagation private sh -c \
    "hostname $n; mount --bind $D/hosts /etc/hosts; mount --bind $CONF /etc/slurm/slurm.conf; exec /usr/sbin/slurmd -f $CONF"
done
READY=0
for _ in $(seq 150); do
  STATES=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
  READY=$(echo "$STATES" | grep -cE ' (idle|mixed|allocated)$' || true)
  [ "$READY" = ${#NODES[@]} ] && break
  for n in $(echo "$STATES" | awk '$2 ~ /^(down|drain)/ {print $1}'); do
    scontrol update NodeName=$n State=RESUME 2>/dev/null || true
  done
  sleep 0.2
done
if [ "$READY" != ${#NODES[@]} ]; then
  echo "the nodes did not come up: $STATES" >&2; tail -20 $D/log/*.log >&2; exit 1
fi
echo "two-node SLURM up in $(python3 -c "print(round($(date +%s.%N) - $T0, 2))") s: export SLURM_CONF=$CONF"
