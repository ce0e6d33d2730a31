#!/usr/bin/env bash
# Runs every case of the two-host SLURM tests again and again while busy processes compete for the
# CPUs, to show that each holds under load (issue 22).
#
#   slurm/stress_multi_host.sh [RUNS] [BUSY]    defaults: 5 runs, 2 busy processes
#
# Each run is one pytest process for TESTS (default: tests/test_slurm_multi_host.py, every case once,
# on the one two-host cluster it starts, as `make test` runs them). One line per case and run says
# PASS or FAIL and how long the case took (pytest's junit report), with the times a fault case
# prints (rank exits, job end, requeue); then, per case, the passes out of
# RUNS, the median and the largest time; then the 1-minute load average, sampled every 5 s over
# the whole loop (median and largest), since other work on the machine loads the cores too. The
# exit status is 0 only when every case passed in every run. Each run's pytest output (run-N.log),
# junit report (run-N.xml) and temporary folder (tmp-N: the jobs' logs, run directories, the
# cluster's slurmctld.log and slurmd logs) are kept in LOG_DIR (default: a new temporary folder).
# The busy processes are `python -c 'while True: pass'`, ended by a trap on exit.
set -uo pipefail

runs=${1:-5}
busy=${2:-2}
tests=${TESTS:-tests/test_slurm_multi_host.py}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/stress-multi-host.XXXXXX)}
mkdir -p "$log_dir"

children=()
stop_children() {
    for pid in "${children[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${children[@]}"; do wait "$pid" 2>/dev/null; done
    children=()
}
trap stop_children EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$busy"); do
    "$python" -c 'while True: pass' &
    children+=($!)
done
(while true; do cut -d' ' -f1 /proc/loadavg; sleep 5; done) >"$log_dir/load" &
children+=($!)

echo "stress_multi_host: $runs runs of $tests (-m '') with $busy busy processes; logs in $log_dir"
for i in $(seq "$runs"); do
    start=$SECONDS
    # shellcheck disable=SC2086  # TESTS may name several test ids
    (cd "$repo" && "$python" -m pytest -q -p no:cacheprovider -m "" --basetemp "$log_dir/tmp-$i" \
        --junitxml "$log_dir/run-$i.xml" -o junit_logging=system-out $tests) >"$log_dir/run-$i.log" 2>&1
    status=$?
    echo "run $i/$runs: pytest exit $status ($((SECONDS - start)) s) $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$python" - "$log_dir/run-$i.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as error:
    print(f"  no junit report: {error}")
    sys.exit(0)
for case in cases:
    verdict = "SKIP" if case.find("skipped") is not None else "PASS"
    if case.find("failure") is not None or case.find("error") is not None:
        verdict = "FAIL"
    print(f"  {verdict} {float(case.get('time', 0)):6.1f} s  {case.get('name')}")
    out = case.find("system-out")
    for line in (out.text or "").splitlines() if out is not None else []:
        if line.startswith(("preemption:", "lost-host:", "cut-link:")):  # the cases' measured times
            print(f"         {line}")
PY
done
"$python" - "$runs" "$log_dir" <<'PY'
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

runs, log_dir = int(sys.argv[1]), Path(sys.argv[2])
results: dict[str, list[tuple[bool, float]]] = {}
for i in range(1, runs + 1):
    try:
        cases = list(ET.parse(log_dir / f"run-{i}.xml").getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        cases = []
    for case in cases:
        failed = any(case.find(tag) is not None for tag in ("failure", "error", "skipped"))
        results.setdefault(case.get("name", "?"), []).append((not failed, float(case.get("time", 0))))
every = bool(results)
print("stress_multi_host: per case, passes / runs, median and largest time")
for name, outcomes in results.items():
    passed = sum(ok for ok, _ in outcomes)
    times = [t for _, t in outcomes]
    every &= passed == runs
    print(f"  {passed}/{runs}  median {statistics.median(times):6.1f} s  max {max(times):6.1f} s  {name}")
loads = [float(x) for x in (log_dir / "load").read_text().split()]
if loads:
    print(f"load average (1 min, every 5 s): median {statistics.median(loads):.2f}, max {max(loads):.2f}")
print("stress_multi_host: " + ("every case passed in every run" if every else "NOT every case passed every run"))
sys.exit(0 if every else 1)
PY
