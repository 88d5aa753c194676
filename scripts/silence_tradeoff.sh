#!/usr/bin/env bash
# The trade-off of the silence factor k (docs/benchmarks.md, "Silent failures"): for each
# k, (a) a fault-free tiny job of STEPS steps beside two busy threads, counting the silence
# reports the workers sent (each one costs a heartbeat; none may become a decision), and
# (b) the demo with one 5 s hang, for its MTTR. Usage: scripts/silence_tradeoff.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PHALANX_BIN:-./target/release/phalanx}
STEPS=${1:-600}
OUT=bench-out/silence-tradeoff.txt
mkdir -p bench-out
: > "$OUT"
busy() { for _ in 1 2; do (while :; do :; done) & done; }
for k in 2 4 8; do
    export PHALANX_SILENCE_FACTOR=$k
    dir=$(mktemp -d)
    busy
    $BIN cluster up --controllers 3 --workers 5 --dir "$dir/c" > "$dir/up.log" 2>&1 &
    up=$!
    for _ in $(seq 1 100); do $BIN status --dir "$dir/c" --json > /dev/null 2>&1 && break; sleep 0.3; done
    cat > "$dir/job.toml" <<TOML
name = "quiet-$k"
model = "tiny"
corpus = "default"
steps = $STEPS
global_batch = 8
seed = 7
checkpoint_interval_steps = 50
world_size_min = 3
world_size_max = 4
TOML
    for _ in $(seq 1 100); do $BIN job submit "$dir/job.toml" --dir "$dir/c" > /dev/null 2>&1 && break; sleep 0.3; done
    for _ in $(seq 1 1200); do
        $BIN job status --json --dir "$dir/c" 2>/dev/null | grep -q '"state": "completed"' && break
        sleep 0.5
    done
    reports=$(cat "$dir"/c/w*.log | grep -c "peer silent; reporting it" || true)
    decisions=$($BIN events --json --dir "$dir/c" | grep -cE '"kind": "worker_(suspect|failed)"' || true)
    $BIN cluster down --dir "$dir/c" > /dev/null 2>&1 || true
    wait $up 2> /dev/null || true
    kill $(jobs -p) 2> /dev/null || true
    busy
    $BIN demo --dir "$dir/demo" --workers 5 --steps 200 --faults hang:rank:1@60:5s --summary "$dir/hang.json" > "$dir/demo.log" 2>&1 || true
    kill $(jobs -p) 2> /dev/null || true
    mttr=$(python3 -c "import json;print(round(json.load(open('$dir/hang.json'))['faults'][0]['mttr_s'],2))" 2> /dev/null || echo "?")
    echo "k=$k steps=$STEPS silence_reports=$reports suspect_or_failed=$decisions hang_mttr_s=$mttr" | tee -a "$OUT"
    rm -rf "$dir"
done
