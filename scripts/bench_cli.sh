#!/usr/bin/env bash
# The operator CLI's start-up (issue 14): the median of N runs of `phalanx --help` and of
# `phalanx status` against a running local cluster, beside the same for `phalanx-train
# --help` (the binary that links libtorch, i.e. what every verb cost before the split).
# Usage: scripts/bench_cli.sh [OUT.json] [RUNS]; needs target/release/phalanx{,-train}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/cli.json}"
runs="${2:-20}"
bin="$PWD/target/release/phalanx"
train="$PWD/target/release/phalanx-train"
for b in "$bin" "$train"; do
    [[ -x "$b" ]] || { echo "error: $b is missing: run \`just build\`" >&2; exit 1; }
done
dir="$(mktemp -d /tmp/phalanx-bench-cli.XXXXXX)"
cleanup() {
    "$bin" cluster down --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
"$bin" cluster up --dir "$dir" --controllers 3 >"$dir.log" 2>&1 &
# Wait (bounded) until the cluster has a leader.
deadline=$((SECONDS + 60))
until "$bin" status --dir "$dir" --json 2>/dev/null | grep -q '"leader_id": [1-9]'; do
    if ((SECONDS > deadline)); then
        echo "error: the cluster in $dir has no leader after 60 s" >&2
        cat "$dir.log" >&2
        exit 1
    fi
    sleep 0.2
done
# median_ms CMD...: the median wall time of $runs runs, in milliseconds.
median_ms() {
    local times=() t0 t1
    for ((i = 0; i < runs; i++)); do
        t0=$(date +%s%N)
        "$@" >/dev/null 2>&1 || { echo "error: $* failed" >&2; exit 1; }
        t1=$(date +%s%N)
        times+=($(((t1 - t0) / 1000)))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.2f", m / 1000}'
}
help_ms=$(median_ms "$bin" --help)
status_ms=$(median_ms "$bin" status --dir "$dir")
train_help_ms=$(median_ms "$train" --help)
forwarded_ms=$(median_ms "$bin" train --help)
mkdir -p "$(dirname "$out")"
cat >"$out" <<JSON
{
  "runs": $runs,
  "phalanx_help_median_ms": $help_ms,
  "phalanx_status_median_ms": $status_ms,
  "phalanx_train_help_median_ms": $train_help_ms,
  "phalanx_train_verb_help_median_ms": $forwarded_ms,
  "goal_ms": 30,
  "machine": "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
}
JSON
cat "$out"
