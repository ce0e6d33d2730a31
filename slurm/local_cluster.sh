#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for the tests and for users without a cluster.
#
#   slurm/local_cluster.sh start [DIR]   install slurm-wlm if missing (Debian, as root), write DIR/slurm.conf,
#                                        start slurmctld and slurmd, wait until the node is idle
#   slurm/local_cluster.sh stop [DIR]    stop both daemons by their pid files
#   slurm/local_cluster.sh status [DIR]  sinfo
#
# Then point SLURM's commands at it: export SLURM_CONF=DIR/slurm.conf
# State, spool, pid files and logs all live in DIR (default: /tmp/imontage-slurm).
set -euo pipefail

action=${1:-}
dir=${2:-/tmp/imontage-slurm}
conf="$dir/slurm.conf"

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "local_cluster.sh: slurm-wlm is not installed and this is not a root Debian machine" >&2
        return 3
    fi
    echo "installing slurm-wlm (apt-get)..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null
}

write_conf() {
    mkdir -p "$dir/state" "$dir/spool"
    # slurmd -C reports this machine's real CPUs and memory; the node must not claim more.
    local node
    node=$(slurmd -C | head -n 1)
    cat >"$conf" <<CONF
ClusterName=imontage-local
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

stop_daemon() {
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

case "$action" in
start)
    install_slurm
    stop_daemon "$dir/slurmd.pid"
    stop_daemon "$dir/slurmctld.pid"
    write_conf
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 100); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM is up: export SLURM_CONF=$conf"
            exit 0
        fi
        sleep 0.2
    done
    echo "local_cluster.sh: the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    sinfo -N -l >&2 || true
    exit 1
    ;;
stop)
    stop_daemon "$dir/slurmd.pid"
    stop_daemon "$dir/slurmctld.pid"
    ;;
status)
    SLURM_CONF=$conf sinfo -N -l
    ;;
*)
    echo "usage: $0 start|stop|status [DIR]" >&2
    exit 2
    ;;
esac
