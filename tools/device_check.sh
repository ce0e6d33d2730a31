#!/usr/bin/env bash
# The GPU check of issue 19 (docs/performance.md, "GPU check"): on a lent GPU machine, install the wheels
# of tools/device_wheels.txt from .whl/ and the project itself over the machine's torch, without
# touching torch (--no-deps, --no-index), then run tools/device_check.py: kernels, benchmarks and a
# training run, logs and CSVs in OUT_DIR, a short table last.
#
#   tools/device_check.sh OUT_DIR [device_check.py options]         on the GPU machine (python3 there)
#   tools/device_check.sh --cpu OUT_DIR [device_check.py options]   here, small sizes, nothing installed
#
# PYTHON overrides the interpreter (default: python3 on the GPU machine, .venv/bin/python with --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=0
if [[ ${1:-} == --cpu ]]; then
  cpu=1
  shift
fi
out=${1:?usage: tools/device_check.sh [--cpu] OUT_DIR [device_check.py options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ((cpu)); then
  exec "${PYTHON:-.venv/bin/python}" tools/device_check.py --cpu "$out" "$@"
fi

py=${PYTHON:-python3}
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo ".whl/ holds no wheels: run 'make device-wheels' on the CPU machine and carry .whl" >&2
  exit 2
fi
torch_before=$("$py" -c 'import torch; print(torch.__version__)')
{
  echo "torch before: $torch_before"
  "$py" -m pip install --no-index --no-deps --no-cache-dir --no-compile --find-links .whl \
    -r tools/device_wheels.txt
  # The project from this tree (setuptools is in the image). Editable, as in .venv: run from the root,
  # `imontage` is this tree's folder, and only the editable finder maps imontage.kernels to kernels/.
  "$py" -m pip install --no-index --no-deps --no-cache-dir --no-compile --no-build-isolation -e .
} >"$out/install.log" 2>&1 || {
  tail -n 30 "$out/install.log" >&2
  exit 2
}
torch_after=$("$py" -c 'import torch; print(torch.__version__)')
echo "installed $(grep -c '==' tools/device_wheels.txt) wheels and imontage over torch $torch_after" \
  "(log: $out/install.log)"
if [[ $torch_after != "$torch_before" ]]; then
  echo "torch changed from $torch_before to $torch_after: refusing to measure" >&2
  exit 2
fi
exec "$py" tools/device_check.py "$out" "$@"
