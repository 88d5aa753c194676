# Phalanx task runner. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

export CARGO_BUILD_JOBS := env_var_or_default("CARGO_BUILD_JOBS", "2")

# Show the recipes.
default:
    @just --list

# Fetch libtorch 2.11.0 into .libtorch/ (idempotent; cheap when already there).
setup:
    python3 scripts/setup_libtorch.py

# Build the phalanx binaries (release): `phalanx` (no libtorch; the command to run) and
# `phalanx-train` beside it (the training verbs, which `phalanx` executes).
build: setup
    cargo build --release -p phalanx-cli

# The demo: a local cluster (3 controllers, 4 emulated GPUs + 1 spare) trains a GPT while
# a worker is killed, another hangs and the controller leader is killed; then a summary.
run: build
    ./target/release/phalanx demo --summary target/demo-summary.json

# Every test: unit, integration and end-to-end (real processes).
test: setup
    cargo build --release -p phalanx-cli
    PHALANX_BIN="$PWD/target/release/phalanx" cargo test --release --workspace -- --test-threads 2

# Needs root and `ip` (skipped otherwise); about 40 s; also part of `just test`.
# Real network partitions among 3 controllers in network namespaces, measurements printed.
partitions: setup
    cargo build --release -p phalanx-cli
    PHALANX_BIN="$PWD/target/release/phalanx" cargo test --release -p phalanx-tests --test controller_partitions -- --nocapture

# Reports land in target/chaos/; `just chaos 1,2,3` runs every file over three seeds.
# The chaos scenario library (soak excluded): a row per scenario (verdict, MTTR, bit-exact).
chaos seeds="": build
    ./target/release/phalanx scenario suite --report-root target/chaos {{ if seeds == "" { "" } else { "--seeds " + seeds } }}

# The swarm soak (at least 10 minutes of random faults drawn from the seed).
chaos-soak seed="7": build
    ./target/release/phalanx scenario run scenarios/soak-swarm.toml --seed {{seed}} --report target/chaos/soak-swarm

# Benchmarks, each a ratio measured side by side in one run; results land in bench-out/
# and are explained in docs/benchmarks.md.
bench: build
    cargo build --release -p phalanx-collective -p phalanx-checkpoint --bins
    mkdir -p bench-out
    scripts/bench_cli.sh bench-out/cli.json 20
    ./target/release/phalanx bench train --model small --steps 30 --rounds 9 --out bench-out/train.json
    ./target/release/phalanx bench train --model small --steps 30 --rounds 21 --telemetry-overhead --out bench-out/telemetry-overhead.json
    ./target/release/phalanx bench train --model base --steps 6 --rounds 5 --out bench-out/train-base.json
    ./target/release/phalanx bench train --model gpt2-124m --steps 2 --rounds 2 --out bench-out/train-gpt2.json
    ./target/release/phalanx bench numerics --model small --steps 100 --rounds 5 --out bench-out/numerics.json
    ./target/release/collective-bench --bytes 40000000 --worlds 2,4 --iters 5 --out bench-out/collective.json
    ./target/release/ckpt-bench --params 10000000 --iters 5 --out bench-out/checkpoint.json
    ./target/release/phalanx bench checkpoint --model base --checkpoints 5 --every 2 --out bench-out/checkpoint-stall.json
    ./target/release/phalanx controller bench --kills 30 --seconds 5 --out bench-out/controller.json
    ./target/release/phalanx demo --dir target/bench-spare --workers 5 --steps 200 --faults kill:rank:1@60 --summary bench-out/mttr-spare.json
    ./target/release/phalanx demo --dir target/bench-nospare --workers 4 --steps 200 --faults kill:rank:1@60 --summary bench-out/mttr-nospare.json
    ./target/release/phalanx demo --dir target/bench-hang --workers 5 --steps 200 --faults hang:rank:1@60:5s --summary bench-out/mttr-hang.json
    ./target/release/phalanx demo --dir target/bench-partition --workers 5 --steps 200 --faults partition:rank:1@60:4s --summary bench-out/mttr-partition.json
    ./target/release/phalanx demo --dir target/bench-kill-small --model small --workers 5 --steps 60 --faults kill:rank:1@20 --summary bench-out/mttr-kill-small.json
    ./target/release/phalanx demo --dir target/bench-hang-small --model small --workers 5 --steps 60 --faults hang:rank:1@20:5s --summary bench-out/mttr-hang-small.json
    ./target/release/phalanx demo --dir target/bench-partition-small --model small --workers 5 --steps 60 --faults partition:rank:1@20:4s --summary bench-out/mttr-partition-small.json
    ./target/release/phalanx demo --dir target/bench-perminute --model small --workers 5 --steps 1500 --fault-every-s 60 --summary bench-out/fault-per-minute.json
    cargo build --release -p phalanx-sim --bins
    ./target/release/sim-bench --out bench-out/sim.json

# The randomized simulation of the controller's Raft group (crashes, partitions, loss,
# duplication, reordering; checks one leader per term, committed entries, agreement,
# linearizable reads). `just sim-raft --seeds 10000`; `just sim-raft --seed 42` replays one.
sim-raft *args:
    cargo test --release -p phalanx-controller --test sim_raft -- {{args}}

# Leader stability: three controllers under client load beside two busy threads for 10
# minutes; fails on any new term (a spurious election). PHALANX_SOAK_S sets the length.
soak-leader:
    cargo test --release -p phalanx-controller --test soak_leader -- --ignored --nocapture

# Format and lint.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Recovery soak: the recovery-under-load cases over five seeds, and a 20-minute fault-free
# run beside two busy threads that must see no suspect or failed decision.
soak-recovery: build
    PHALANX_BIN="$PWD/target/release/phalanx" PHALANX_SOAK_SEEDS=7,8,9,10,11 PHALANX_SOAK_NO_FAULT_S=1200 cargo test --release -p phalanx-tests --test recovery_under_load -- --test-threads 1 --nocapture
