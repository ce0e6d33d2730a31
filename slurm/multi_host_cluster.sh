#!/usr/bin/env bash
# A SLURM cluster of several hosts on one machine, each host in its own network namespace, for the
# multi-node tests and for trying slurm/multi_node.sbatch without a cluster (issue 22).
#
#   slurm/multi_host_cluster.sh start DIR [HOSTS]   (root) install slurm-wlm and iproute2 if missing,
#                                                   make a bridge, one namespace + veth pair per host,
#                                                   write DIR/slurm.conf, start slurmctld and one slurmd
#                                                   per host, wait until every node is idle
#   slurm/multi_host_cluster.sh stop DIR            stop the daemons and every process left in the
#                                                   namespaces, delete namespaces, veths and bridge
#   slurm/multi_host_cluster.sh status DIR          sinfo, and the processes of each namespace
#
# HOSTS defaults to 2. Everything the script makes is named from one short id derived from DIR
# (bridge imb<ID>, namespaces imontage-<ID>-hN, hosts im<ID>hN, subnet 10.231.<ID % 250>.0/24:
# slurmctld on .1, the bridge's address, host N on .(10+N)), and recorded in DIR/cluster.env, which
# `stop` reads; a failed `start` stops what it made before exiting. Inside its namespace each host
# has its own eth0 (the veth's inner end), so slurmd, slurmstepd and the ranks see only that
# network; gloo is told to use it by DIR/env.sh (GLOO_SOCKET_IFNAME=eth0), which a job sources
# through tools/submit.py --env-hook, as a site's NCCL settings would be. Host names resolve
# nowhere: slurmctld reaches a host at its NodeAddr, and the job script takes the master's
# NodeAddr from `scontrol show node` (slurm/multi_node.sbatch).
# Auth as in slurm/local_cluster.sh: auth/none and cred/none (no munge); proctrack/pgid (see the conf).
# Ports: SLURMCTLD_PORT (default 6917) on the bridge's address, SLURMD_PORT (default 6918) inside
# each namespace, so the one-node cluster's ports (6817/6818, or the tests' free ports) never clash.
set -euo pipefail

action=${1:-}
dir=${2:-}
hosts=${3:-2}
if [ -z "$dir" ]; then
    echo "usage: $0 start|stop|status DIR [HOSTS]" >&2
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"
cid=$(( $(printf '%s' "$dir" | cksum | cut -d' ' -f1) % 10000 ))
bridge="imb$cid"
subnet="10.231.$((cid % 250))"

install_tools() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v ip >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "multi_host_cluster.sh: slurm-wlm or iproute2 is missing and this is not a root Debian machine" >&2
        return 3
    fi
    echo "installing slurm-wlm and iproute2 (apt-get)..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm iproute2 >/dev/null
}

namespace() { echo "imontage-$cid-h$1"; }
host_name() { echo "im${cid}h$1"; }

# Kill every process of a namespace (slurmd, slurmstepd, the ranks), TERM first, then KILL.
kill_namespace_processes() {
    local ns=$1 pids
    [ -e "/run/netns/$ns" ] || return 0
    for signal in TERM KILL; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] && return 0
        # shellcheck disable=SC2086
        kill -s "$signal" $pids 2>/dev/null || true
        for _ in $(seq 30); do
            [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && return 0
            sleep 0.1
        done
    done
}

stop_pidfile() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

stop_cluster() {
    local made_hosts=$hosts
    # shellcheck disable=SC1091
    [ -f "$dir/cluster.env" ] && made_hosts=$(. "$dir/cluster.env" && echo "$HOSTS")
    for n in $(seq "$made_hosts"); do
        stop_pidfile "$dir/h$n/slurmd.pid"
        kill_namespace_processes "$(namespace "$n")"
        # The veth first (its pair goes with it): a namespace's deletion also destroys the veth, but
        # asynchronously, so after it the veth may be listed and then gone before `ip link del`.
        if ip link show "imv${cid}h$n" >/dev/null 2>&1; then ip link del "imv${cid}h$n"; fi
        if [ -e "/run/netns/$(namespace "$n")" ]; then ip netns del "$(namespace "$n")"; fi
    done
    stop_pidfile "$dir/slurmctld.pid"
    if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
    rm -f "$dir/cluster.env"
}

# Another cluster's bridge or subnet (a folder whose id is the same): refuse before making anything.
# (No `ip ... | grep -q` anywhere: under pipefail, grep's early exit fails the pipe with SIGPIPE.)
check_free() {
    local addresses
    addresses=$(ip -4 -o addr show)
    if ip link show "$bridge" >/dev/null 2>&1 || [[ "$addresses" == *" $subnet."* ]]; then
        echo "multi_host_cluster.sh: bridge $bridge or subnet $subnet.0/24 is taken (another cluster?)" >&2
        return 1
    fi
}

make_network() {
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    for n in $(seq "$hosts"); do
        local ns outer inner
        ns=$(namespace "$n")
        outer="imv${cid}h$n"
        inner="imp${cid}h$n"
        ip netns add "$ns"
        ip link add "$outer" type veth peer name "$inner"
        ip link set "$outer" master "$bridge"
        ip link set "$outer" up
        ip link set "$inner" netns "$ns"
        ip -n "$ns" link set "$inner" name eth0
        ip -n "$ns" addr add "$subnet.$((10 + n))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

write_conf() {
    mkdir -p "$dir/state"
    local node cpus_mem
    # slurmd -C reports this machine's real CPUs and memory; every host is the whole machine.
    node=$(slurmd -C | head -n 1)
    cpus_mem=$(echo "$node" | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    cat >"$conf" <<CONF
ClusterName=imontage-multi
SlurmctldHost=$(hostname -s)($subnet.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# pgid, not linuxproc: when a host fails, slurmctld cancels the job; srun, which forwards the first
# SIGTERM and keeps waiting for the lost host's task, outlives the batch script, and linuxproc,
# which finds a job's processes by their parents, loses it once it is orphaned (the step is "done"
# with srun still running). In the batch script's process group, srun is killed with it.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s, not 60: a requeued job released early starts seconds later.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# A host that does not answer for this long is DOWN and its jobs end (NODE_FAIL; requeued when they
# asked for --requeue); 20 s, not 300, so that a cut link ends a job within a test's patience.
SlurmdTimeout=${SLURMD_TIMEOUT:-20}
SlurmctldPort=${SLURMCTLD_PORT:-6917}
SlurmdPort=${SLURMD_PORT:-6918}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/%n/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/%n/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/%n/slurmd.log
CONF
    for n in $(seq "$hosts"); do
        echo "NodeName=$(host_name "$n") NodeHostname=$(host_name "$n") NodeAddr=$subnet.$((10 + n)) $cpus_mem State=UNKNOWN" >>"$conf"
    done
    echo "PartitionName=multi Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$conf"
    echo "export GLOO_SOCKET_IFNAME=eth0" >"$dir/env.sh"
    echo "HOSTS=$hosts" >"$dir/cluster.env"
}

start_cluster() {
    if [ "$(id -u)" != 0 ]; then
        echo "multi_host_cluster.sh: network namespaces, veths and a bridge need root" >&2
        return 3
    fi
    install_tools
    stop_cluster
    check_free
    # From here on a failure stops what was made; the trap is the only exit path until success.
    trap 'status=$?; stop_cluster; exit $status' EXIT
    make_network
    write_conf
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    for n in $(seq "$hosts"); do
        local name
        name=$(host_name "$n")
        mkdir -p "$dir/$name/spool"
        ln -sfn "$name" "$dir/h$n"
        # nsenter, not `ip netns exec`: that remounts /sys, without the cgroup mount slurmd reads.
        nsenter --net="/run/netns/$(namespace "$n")" slurmd -f "$conf" -N "$name"
    done
    for _ in $(seq 150); do
        if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "$hosts" ]; then
            trap - EXIT
            echo "SLURM is up with $hosts hosts: export SLURM_CONF=$conf; jobs: --env-hook $dir/env.sh"
            return 0
        fi
        sleep 0.2
    done
    echo "multi_host_cluster.sh: not every node became idle; see $dir/slurmctld.log and $dir/im*/slurmd.log" >&2
    sinfo -N -l >&2 || true
    return 1
}

case "$action" in
start)
    start_cluster
    ;;
stop)
    stop_cluster
    ;;
status)
    SLURM_CONF=$conf sinfo -N -l
    for n in $(seq "$hosts"); do
        echo "$(namespace "$n"): $(ip netns pids "$(namespace "$n")" 2>/dev/null | tr '\n' ' ')"
    done
    ;;
*)
    echo "usage: $0 start|stop|status DIR [HOSTS]" >&2
    exit 2
    ;;
esac
