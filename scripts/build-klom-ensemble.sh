#!/usr/bin/env bash
# The model ensembles KLoM needs (arXiv 2410.23232 Def. 3): K retain oracles (trained without
# forget10) and K targets (each its oracle trained further on everything), differing only in
# their seeds. Member 0 is the bundled pair (data/models/{retain,target}, seeds 0 and 1); member
# k ≥ 1 uses the same recipes (recipes/build/*.toml) with seeds 2k and 2k+1 and is written to
# runs/klom/models/seed-k/{retain,target}. About 14 minutes per member on 2 cores.
#
#   scripts/build-klom-ensemble.sh [K]      (K = 5 by default; members already built are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-5}
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
for k in $(seq 1 $((K - 1))); do
  dir=runs/klom/models/seed-$k
  if [ ! -f "$dir/retain/model.safetensors" ]; then
    "$bin" train recipes/build/retain.toml --set train.seed=$((2 * k)) \
      --set output.dir="runs/klom/build/retain-$k" --set output.model="$dir/retain"
  fi
  if [ ! -f "$dir/target/model.safetensors" ]; then
    "$bin" train recipes/build/target.toml --set train.seed=$((2 * k + 1)) \
      --set model.path="$dir/retain" \
      --set output.dir="runs/klom/build/target-$k" --set output.model="$dir/target"
  fi
done
