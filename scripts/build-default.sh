#!/usr/bin/env bash
# Rebuild the offline default from nothing: the fictional benchmark and its tokenizer (data/),
# the retain model and the target model (data/models/). Deterministic on a given machine; the
# benchmark and tokenizer are byte-identical everywhere (tests/bundled.rs checks them).
# 15 to 22 minutes on 2 cores, depending on the machine's load.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
./target/release/unlearn synth --out data
./target/release/unlearn train recipes/build/retain.toml
./target/release/unlearn train recipes/build/target.toml
./target/release/unlearn train recipes/build/retrained.toml
