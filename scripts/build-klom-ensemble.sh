#!/usr/bin/env bash
# The model ensembles KLoM needs (arXiv 2410.23232 Def. 3): K targets and K oracles retrained
# without forget10, differing only in their seeds. Per member: a retain model (random init, no
# forget10), the target (it, trained 12 more epochs on everything) and the retrained oracle (the
# same 12 epochs, same seed, without forget10 — the target's exact counterfactual). Member 0 is
# the bundled set (data/models/{retain,target,retrained}, seeds 0 and 1); member k ≥ 1 uses the
# same recipes (recipes/build/*.toml) with seeds 2k and 2k+1 and is written to
# runs/klom/models/seed-k/. About 20 minutes per member on 2 cores.
#
#   scripts/build-klom-ensemble.sh [K]      (K = 5 by default; members already built are kept)
#
# MEMBERS="1 3" builds only those members: two single-threaded builds side by side use 2 cores
# far better than one (candle's CPU thread pool spins when cores are shared):
#   CANDLE_NUM_THREADS=1 MEMBERS="1 3" scripts/build-klom-ensemble.sh &
#   CANDLE_NUM_THREADS=1 MEMBERS="2 4" scripts/build-klom-ensemble.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-5}
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
for k in ${MEMBERS:-$(seq 1 $((K - 1)))}; do
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
  if [ ! -f "$dir/retrained/model.safetensors" ]; then
    "$bin" train recipes/build/retrained.toml --set train.seed=$((2 * k + 1)) \
      --set model.path="$dir/retain" \
      --set output.dir="runs/klom/build/retrained-$k" --set output.model="$dir/retrained"
  fi
done
