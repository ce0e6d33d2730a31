#!/usr/bin/env bash
# tools/fill_wheels.sh LIST DIR: download the wheels pinned in LIST (tools/device_wheels.txt) for CPython
# 3.12 on manylinux x86_64 into DIR, building those PyPI has as source only (deepspeed, DS_BUILD_OPS=0);
# then print each wheel's size and the total, and fail above the device tool's budget (BUDGET_MIB, 60 by
# default: 64 MiB travel with the tree, which takes about 2). PY names the Python that runs pip.
set -euo pipefail
list=${1:?usage: tools/fill_wheels.sh LIST DIR}
dir=${2:?usage: tools/fill_wheels.sh LIST DIR}
py=${PY:-python3}
budget_mib=${BUDGET_MIB:-60}
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
while read -r requirement; do
  requirement=${requirement%%#*}
  requirement=${requirement//[[:space:]]/}
  [[ -z $requirement ]] && continue
  name=${requirement%%==*}
  # Wheel file names spell the project with underscores, lower case.
  stem=$(tr 'A-Z-' 'a-z_' <<<"$name")
  if compgen -G "$dir/${stem}-${requirement##*==}-*.whl" >/dev/null; then
    continue
  fi
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "$requirement"; then
    echo "no 3.12 wheel of $requirement: building one from its source" >&2
    # Its build imports torch: build against this environment's (the wheel itself is pure Python).
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$requirement"
  fi
done <"$list"
du -b "$dir"/*.whl | sort -n | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
awk -v t="$total" -v b="$budget_mib" 'BEGIN {printf "%8.2f MiB  total (budget %d MiB)\n", t / 1048576, b; exit !(t <= b * 1048576)}'
