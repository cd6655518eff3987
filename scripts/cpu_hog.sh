#!/usr/bin/env bash
# Run a command with every core kept busy, as on a machine a few times slower.
#
#   scripts/cpu_hog.sh .venv/bin/pytest tests/faults -q
#
# One busy loop pinned to each core (taskset -c N) at nice 0, the priority the tests
# themselves run at, so each core is shared about half and half with the suite. The
# loops stop when the command ends (or is interrupted); the command's status is kept.
# CPU_HOG_CORES overrides which cores get a loop (default: all, e.g. "0 1").
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

cores=${CPU_HOG_CORES:-$(seq 0 $(($(nproc) - 1)))}
hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap stop_hogs EXIT INT TERM

for core in $cores; do
    nice -n 0 taskset -c "$core" bash -c 'while :; do :; done' &
    hogs+=("$!")
done
echo "cpu_hog: busy loop on core(s) $(echo $cores) (pids ${hogs[*]})" >&2

status=0
"$@" || status=$?
exit "$status"
