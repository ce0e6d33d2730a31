#!/usr/bin/env bash
# Runs the SLURM preemption test again and again while busy processes compete for the CPUs, to
# show that the USR2 -> checkpoint -> requeue -> resume sequence holds under load (issue 13).
#
#   slurm/stress_preemption.sh [RUNS] [BUSY]    defaults: 10 runs, 2 busy processes
#
# Each run is one pytest process for TEST (default: the USR2 preemption test of
# tests/test_slurm.py), which starts its own local cluster (slurm/local_cluster.sh). One line per
# run says PASS or FAIL and how long it took; a summary follows; the exit status is 0 only when
# every run passed. Each run's pytest output (run-N.log) and temporary folder (tmp-N: the job's
# log, the run directory, the cluster's slurmctld.log and slurmd.log) are kept in LOG_DIR
# (default: a new temporary folder).
# The busy processes are `python -c 'while True: pass'`, ended by a trap on exit.
set -uo pipefail

runs=${1:-10}
busy=${2:-2}
test_id=${TEST:-tests/test_slurm.py::test_usr2_preemption_saves_requeues_and_resumes_exactly}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/stress-preemption.XXXXXX)}
mkdir -p "$log_dir"

busy_pids=()
stop_busy() {
    for pid in "${busy_pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${busy_pids[@]}"; do wait "$pid" 2>/dev/null; done
    busy_pids=()
}
trap stop_busy EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$busy"); do
    "$python" -c 'while True: pass' &
    busy_pids+=($!)
done

echo "stress_preemption: $runs runs of $test_id with $busy busy processes; logs in $log_dir"
passed=0
for i in $(seq "$runs"); do
    start=$SECONDS
    if (cd "$repo" && "$python" -m pytest -q -p no:cacheprovider --basetemp "$log_dir/tmp-$i" "$test_id") >"$log_dir/run-$i.log" 2>&1; then
        verdict=PASS
        passed=$((passed + 1))
    else
        verdict=FAIL
    fi
    echo "run $i/$runs: $verdict ($((SECONDS - start)) s) $(date -u +%H:%M:%S) $log_dir/run-$i.log"
done
echo "stress_preemption: $passed/$runs passed under $busy busy processes"
[ "$passed" = "$runs" ]
