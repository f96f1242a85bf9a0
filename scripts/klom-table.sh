#!/usr/bin/env bash
# The KLoM table of the bundled benchmark (arXiv 2410.23232 Def. 3): K targets (different seeds)
# are each unlearned with every method below, and each method's K unlearned models are compared
# with the K retrained oracles by `unlearn klom` (margins of the gold answer tokens, 95th percentile
# per split, KL(unlearned ‖ oracle)). Needs the ensemble: scripts/build-klom-ensemble.sh K.
#
#   scripts/klom-table.sh [K]          → runs/klom/table.md, runs/klom/table.jsonl
#   MEMBERS="0 1" scripts/klom-table.sh [K]   only the unlearning runs of those members (while
#                                             the ensemble is still being built); no table
#
# Methods: the targets themselves (no unlearning); DMM on each target's own simulated-oracle
# shadow (`unlearn attribute recipes/klom/attribute.toml`: the target fine-tuned on the retain
# data alone, as an adapter); "dmm-influence", DMM on each target's influence-step shadow
# (recipes/klom/attribute-influence.toml); GradDiff; NPO; and oracle matching (OM, the upper
# bound of DMM) — OM of member k matches the retrained oracle of member k+1 mod K, so that no
# unlearned model is trained towards an oracle it is then compared with. Both DMM rows use
# recipes/klom/dmm.toml. The "retrain" row is the reference for a perfect unlearner: each
# member's oracle retrained once more (recipes/build/retrained.toml from the member's retain
# model), only the data-order seed changed — what exact retraining scores on each KLoM variant.
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-5}
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
member() { # member k → "oracle_dir target_dir retain_dir"
  if [ "$1" -eq 0 ]; then echo "data/models/retrained data/models/target data/models/retain"
  else echo "runs/klom/models/seed-$1/retrained runs/klom/models/seed-$1/target runs/klom/models/seed-$1/retain"; fi
}
oracles=(); targets=(); retains=()
for k in $(seq 0 $((K - 1))); do
  read -r r t b < <(member "$k")
  oracles+=("$r"); targets+=("$t"); retains+=("$b")
done
members=${MEMBERS:-$(seq 0 $((K - 1)))}
for k in $members; do
  for m in "${oracles[$k]}" "${targets[$k]}" "${oracles[$(((k + 1) % K))]}"; do
    [ -f "$m/model.safetensors" ] || { echo "missing $m: run scripts/build-klom-ensemble.sh $K" >&2; exit 1; }
  done
done
methods=(dmm dmm-influence graddiff npo oracle)
for k in $members; do
  t=${targets[$k]}
  [ -f "runs/klom/sim-$k/shadow/adapter_model.safetensors" ] ||
    "$bin" attribute recipes/klom/attribute.toml --set model.path="$t" --set output.dir="runs/klom/sim-$k"
  [ -f "runs/klom/attr-$k/shadow/adapter_model.safetensors" ] ||
    "$bin" attribute recipes/klom/attribute-influence.toml --set model.path="$t" --set output.dir="runs/klom/attr-$k"
  [ -f "runs/klom/retrain-$k/merged/model.safetensors" ] ||
    "$bin" train recipes/build/retrained.toml --set model.path="${retains[$k]}" \
      --set train.seed=$((1000 + k)) --set output.dir="runs/klom/retrain-$k" \
      --set output.model="runs/klom/retrain-$k/merged"
  for m in "${methods[@]}"; do
    [ -f "runs/klom/$m-$k/merged/model.safetensors" ] && continue
    recipe=recipes/klom/$m.toml
    extra=()
    case $m in
      dmm) extra=(--set method.target="shadow:runs/klom/sim-$k/shadow") ;;
      dmm-influence) recipe=recipes/klom/dmm.toml
        extra=(--set method.target="shadow:runs/klom/attr-$k/shadow") ;;
      oracle) extra=(--set method.teacher="${oracles[$(((k + 1) % K))]}") ;;
    esac
    "$bin" run "$recipe" --set model.path="$t" --set output.dir="runs/klom/$m-$k" "${extra[@]}"
  done
done
[ -n "${MEMBERS:-}" ] && exit 0
data=(forget=data/tofu/forget10.jsonl retain=data/tofu/retain_perturbed.jsonl holdout=data/tofu/holdout.jsonl)
: > runs/klom/table.jsonl
for m in target "${methods[@]}" retrain; do
  if [ "$m" = target ]; then models=("${targets[@]}")
  else models=(); for k in $(seq 0 $((K - 1))); do models+=("runs/klom/$m-$k/merged"); done; fi
  for kind in "--bins 20" "--bins 5" "--gaussian"; do
    # shellcheck disable=SC2086
    "$bin" klom --oracle "${oracles[@]}" --unlearned "${models[@]}" --data "${data[@]}" \
      $kind --label "$m" --json --out "runs/klom/klom-$m${kind// /}.json" >> runs/klom/table.jsonl
  done
done
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/klom/table.jsonl")]
out = ["| method | per-position KL | forget KLoM p95 | retain KLoM p95 | holdout KLoM p95 | forget mean | retain mean |",
       "|---|---|---|---|---|---|---|"]
for r in rows:
    how = f"{r['bins']} bins" if r["bins"] else "Gaussian fit"
    out.append(f"| {r['label']} | {how} | {r['forget_p95']:.3f} | {r['retain_p95']:.3f} | "
               f"{r['holdout_p95']:.3f} | {r['forget_mean']:.3f} | {r['retain_mean']:.3f} |")
out.append("")
out.append(f"KL direction: {rows[0]['klom_direction']}; margins of the gold answer tokens; lower is closer to the oracles.")
open("runs/klom/table.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
