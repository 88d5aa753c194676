#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU: one summary line per check.
#
#   scripts/gpu-check.sh            # binaries from ./target/release
#   PHALANX_BIN_DIR=/opt/phalanx scripts/gpu-check.sh
#
# Needs, on the GPU machine:
#   - the two binaries `phalanx` and `phalanx-train` (built anywhere with
#     `cargo build --release -p phalanx-cli`; `strip` them to copy less: about 11 MB and
#     6 MB without debug info). They do not carry libtorch: they find it at run time.
#   - PyTorch 2.11 with CUDA (`pip install torch==2.11.0`), whose torch/lib holds
#     libtorch_cpu.so, libc10.so, libtorch_cuda.so and the CUDA libraries; this script
#     puts it first on LD_LIBRARY_PATH (the binaries' RUNPATH points at the build
#     machine's .libtorch/lib, which LD_LIBRARY_PATH overrides).
#   - nvidia-smi (the GPU's name for the MFU peak and its memory size for --memory-gib).
#   - a corpus: DATA (default: the C++ headers of that PyTorch, torch/include).
#
# Knobs: STEPS (gpt2-124m steps, default 30), GLOBAL_BATCH/MICRO_BATCH (default 64/16),
# CAP_GIB (each worker's memory cap when 4 share the GPU, default 20), OUT (results).
set -u

BIN_DIR=${PHALANX_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
PHALANX="$BIN_DIR/phalanx"
STEPS=${STEPS:-30}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
MICRO_BATCH=${MICRO_BATCH:-16}
CAP_GIB=${CAP_GIB:-20}
OUT=${OUT:-$(mktemp -d -t phalanx-gpu-check-XXXXXX)}
mkdir -p "$OUT"

TORCH_DIR=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null) || {
    echo "FAIL setup: python3 cannot import torch (install PyTorch 2.11 with CUDA)"
    exit 1
}
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DATA=${DATA:-"$TORCH_DIR/include/**/*.h"}
[ -x "$PHALANX" ] || { echo "FAIL setup: $PHALANX is missing (PHALANX_BIN_DIR)"; exit 1; }

failures=0
# summary NAME STATUS TEXT
summary() { printf '%-5s %-28s %s\n' "$2" "$1" "$3"; [ "$2" = FAIL ] && failures=$((failures + 1)); }
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null; }

# 1. The CUDA library loads and libtorch sees the GPUs.
if "$PHALANX" devices --cuda --json >"$OUT/devices.json" 2>"$OUT/devices.err"; then
    n=$(json "$OUT/devices.json" 'd["cuda"].get("devices", 0)')
    if [ "${n:-0}" -ge 1 ]; then
        summary "devices --cuda" PASS "$n CUDA device(s), library $(json "$OUT/devices.json" 'd["cuda"]["library"]')"
    else
        summary "devices --cuda" FAIL "$(json "$OUT/devices.json" 'd["cuda"]')"
    fi
else
    summary "devices --cuda" FAIL "$(tail -1 "$OUT/devices.err")"
fi

# 2. gpt2-124m in bf16 on cuda:0: tokens/s, MFU, the step profile (gradient copy share).
if timeout 1800 "$PHALANX" train --plain --workers 1 --device cuda:0 --precision bf16 \
    --model gpt2-124m --steps "$STEPS" --global-batch "$GLOBAL_BATCH" --micro-batch "$MICRO_BATCH" \
    --val-batches 1 --data "$DATA" --seed 1 --summary "$OUT/gpt2.json" >"$OUT/gpt2.log" 2>&1; then
    summary "train gpt2-124m bf16" PASS "$(json "$OUT/gpt2.json" '"%.0f tokens/s, MFU %.1f%% of %.0f TFLOP/s (%s); step %.1f ms, gradient copy %.1f ms, update %.1f ms" % (d["tokens_per_sec"], 100*d["mfu"]["mfu"], d["mfu"]["peak_tflops_per_device"], d["mfu"]["peak_source"], d["step_profile_ms"]["step"], d["step_profile_ms"]["grad_copy"], d["step_profile_ms"]["update"])')"
else
    summary "train gpt2-124m bf16" FAIL "$(tail -1 "$OUT/gpt2.log")"
fi

# 3. 1, 2 and 4 workers on the one GPU (each capped at CAP_GIB): the same bits.
shas=()
for w in 1 2 4; do
    if timeout 1800 "$PHALANX" train --plain --workers "$w" --device cuda:0 --memory-gib "$CAP_GIB" \
        --precision bf16 --model small --steps 20 --data "$DATA" --seed 7 \
        --summary "$OUT/share-$w.json" >"$OUT/share-$w.log" 2>&1; then
        shas+=("$(json "$OUT/share-$w.json" 'd["params_sha256"]')")
    else
        shas+=("failed: $(tail -1 "$OUT/share-$w.log")")
    fi
done
if [ "${shas[0]}" = "${shas[1]}" ] && [ "${shas[0]}" = "${shas[2]}" ] && [ "${#shas[0]}" = 64 ]; then
    summary "4 workers on one GPU" PASS "params_sha256 ${shas[0]:0:16}… for 1, 2 and 4 workers (cap $CAP_GIB GiB each)"
else
    summary "4 workers on one GPU" FAIL "1: ${shas[0]:0:40} | 2: ${shas[1]:0:40} | 4: ${shas[2]:0:40}"
fi

# 4. The demo with its faults on cuda:0, if this build's demo takes a device.
if "$PHALANX" demo --help 2>/dev/null | grep -q -- '--device'; then
    if timeout 1800 "$PHALANX" demo --device cuda:0 --dir "$OUT/demo" >"$OUT/demo.log" 2>&1; then
        summary "demo on cuda:0" PASS "$(grep -E 'bit-identical|params_sha256' "$OUT/demo.log" | tail -1)"
    else
        summary "demo on cuda:0" FAIL "$(tail -1 "$OUT/demo.log")"
    fi
else
    summary "demo on cuda:0" SKIP "this build's phalanx demo has no --device flag"
fi

echo "details in $OUT"
[ "$failures" -eq 0 ]
