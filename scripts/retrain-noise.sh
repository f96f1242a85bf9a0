#!/usr/bin/env bash
# How far retraining itself is from the bundled retain model, on the two bars the unlearning
# runs are judged by: TOFU forget quality of each other-seed retain model against
# data/models/retain (the quickstart's reference), and the KL of other-seed retrained models to
# data/models/retrained (the attribution report's oracle; one by one and their mean). Needs the
# ensemble of scripts/build-klom-ensemble.sh K (runs/klom/models/seed-*). It also builds (once,
# about 8 minutes each on 2 cores) the oracle's same-base siblings: recipes/build/retrained.toml
# with data-order seeds 2 and 3 (runs/retrain-noise/samebase-s*), retrained exactly like the
# oracle from data/models/retain, and reports their KL to it one by one.
#
#   scripts/retrain-noise.sh            → runs/retrain-noise/summary.md
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
seeds=$(ls -d runs/klom/models/seed-* 2>/dev/null | sort -V || true)
[ -n "$seeds" ] || { echo "no runs/klom/models/seed-*: run scripts/build-klom-ensemble.sh first" >&2; exit 1; }
out=runs/retrain-noise
mkdir -p "$out"
tofu=(--suite tofu --max-new-tokens 48
  --data forget=data/tofu/forget10.jsonl --data retain=data/tofu/retain_perturbed.jsonl
  --data wf=data/tofu/general.jsonl --data holdout=data/tofu/holdout.jsonl)
# the reference's own evaluation once, then every seed against its log
[ -f "$out/reference/EVAL.json" ] || "$bin" eval --model data/models/retain "${tofu[@]}" --out "$out/reference"
{
  echo "# Retraining noise on the bundled benchmark"
  echo
  echo "Forget quality of retain models from other seeds against data/models/retain:"
  echo
  echo "| model | forget quality | model utility | forget Q_A_Prob |"
  echo "|---|---|---|---|"
} > "$out/summary.md.tmp"
refs=()
for dir in $seeds; do
  name=$(basename "$dir")
  "$bin" eval --model "$dir/retain" "${tofu[@]}" --retain-log "$out/reference/EVAL.json" --out "$out/$name" >/dev/null
  python3 - "$out/$name/SUMMARY.json" "$dir/retain" >> "$out/summary.md.tmp" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {s['forget_quality']:.3g} | {s['model_utility']:.3f} | {s['forget_Q_A_Prob']:.3f} |")
EOF
  refs+=("\"$dir/retrained\"")
done
# the attribution report with the other seeds' retrained models as references (the floor line)
list=$(IFS=,; echo "${refs[*]}")
"$bin" attribute recipes/dmm/attribute.toml --set "report.references=[$list]" \
  --set "output.dir=\"$out/attribute\"" >/dev/null
{
  echo
  echo "KL to data/models/retrained (the attribution oracle), from $out/attribute/report.md:"
  echo
  echo "Mean of the other seeds' retrained models (the KLoM ensemble's: each retrained from scratch on its own base):"
  echo
  sed -n '/^| split | KL(references/,/^$/p' "$out/attribute/report.md"
  echo "The target and the shadow adapters:"
  echo
  sed -n '/^| estimator | split/,/^$/p' "$out/attribute/report.md"
} >> "$out/summary.md.tmp"
# the oracle's same-base siblings: its recipe with another data-order seed, one by one
for s in 2 3; do
  sib="$out/samebase-s$s"
  [ -f "$sib/model.safetensors" ] || "$bin" train recipes/build/retrained.toml \
    --set train.seed=$s --set "output.dir=\"$out/build-samebase-s$s\"" \
    --set "output.model=\"$sib\"" >/dev/null
  "$bin" attribute recipes/dmm/attribute.toml --set "report.references=[\"$sib\"]" \
    --set "output.dir=\"$out/attribute-samebase-s$s\"" --set 'attribute.compare=[]' >/dev/null
  {
    echo
    echo "Retrained from the oracle's own base with data-order seed $s ($sib):"
    echo
    sed -n '/^| split | KL(references/,/^$/p' "$out/attribute-samebase-s$s/report.md"
  } >> "$out/summary.md.tmp"
done
mv "$out/summary.md.tmp" "$out/summary.md"
cat "$out/summary.md"
