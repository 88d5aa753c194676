# Phalanx task runner. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

export CARGO_BUILD_JOBS := env_var_or_default("CARGO_BUILD_JOBS", "2")

# Show the recipes.
default:
    @just --list

# Fetch libtorch 2.11.0 into .libtorch/ (idempotent; cheap when already there).
setup:
    python3 scripts/setup_libtorch.py

# Build the phalanx binary (release).
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

# Benchmarks; results go to bench-out/ and are documented in docs/benchmarks.md.
bench: build
    cargo build --release -p phalanx-collective --bins
    mkdir -p bench-out
    ./target/release/phalanx bench train --model small --steps 8 --out bench-out/train.json
    ./target/release/collective-bench --bytes 40000000 --out bench-out/collective.json

# Format and lint.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
