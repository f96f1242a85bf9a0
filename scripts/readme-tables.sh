#!/usr/bin/env bash
# Reruns the measurements behind the README's tables on the bundled benchmark, so that a change
# that moves training (an ulp in a backward is enough to move a KS p-value) can be followed by
# one command that brings them up to date:
#
#   scripts/readme-tables.sh [methods|lr|wmdp|attribute|all]   (default: all)
#
# methods    every recipes/tofu/*.toml and the quickstart      → runs/tables/methods.md
# lr         the learning-rate table (`--set train.lr=…`)       → runs/tables/lr.md
# wmdp       every recipes/wmdp/*.toml, and EUPMU with the NPO forget term
#                                                               → runs/tables/wmdp.md
# attribute  `unlearn attribute recipes/dmm/attribute.toml` (simulated, CG, diagonal, identity)
#            → runs/tables/attribute/report.md; DMM on its shadow (recipes/klom/dmm.toml) and
#            that model's distance to the oracle             → runs/tables/attribute-dmm/report.md
#
# The KLoM table has its own script (scripts/klom-table.sh, after scripts/build-klom-ensemble.sh).
# Each run is skipped when its merged model exists; delete runs/tables/<run> to redo one.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
out=runs/tables
mkdir -p "$out"
what=${1:-all}

# run NAME RECIPE [--set …]: one unlearning run into runs/tables/NAME
run() {
  local name=$1 recipe=$2
  shift 2
  [ -f "$out/$name/merged/model.safetensors" ] && return 0
  echo "== $name: $recipe $*" >&2
  "$bin" run "$recipe" --set output.dir="$out/$name" "$@"
}

# the simulated shadow and the attribution report (what DMM matches)
attribute() {
  [ -f "$out/attribute/shadow/adapter_model.safetensors" ] ||
    "$bin" attribute recipes/dmm/attribute.toml --set output.dir="$out/attribute"
}

if [[ $what == methods || $what == all ]]; then
  run quickstart recipes/quickstart.toml
  dirs=("$out/quickstart")
  for r in recipes/tofu/*.toml; do
    n=tofu-$(basename "$r" .toml)
    extra=()
    # DMM matches the simulated shadow of the attribute step below
    if [ "$n" = tofu-dmm ]; then
      attribute
      extra=(--set method.target="shadow:$out/attribute/shadow")
    fi
    run "$n" "$r" "${extra[@]}"
    dirs+=("$out/$n")
  done
  "$bin" compare "${dirs[@]}" > "$out/methods.md"
  cat "$out/methods.md"
fi

if [[ $what == lr || $what == all ]]; then
  dirs=()
  for spec in ceu:1e-3 ceu:3e-3 gradascent:1e-3 gradascent:3e-3 graddiff:1e-3 graddiff:3e-3 \
    npo:3e-3 satimp:2e-2 satimp:5e-2 simnpo:2e-2 simnpo:5e-2 surgery:1e-3 surgery:3e-3 \
    undial:2e-2 undial:5e-2 wga:3e-3; do
    m=${spec%%:*} lr=${spec#*:}
    run "lr-$m-$lr" "recipes/tofu/$m.toml" --set train.lr="$lr"
    dirs+=("$out/lr-$m-$lr")
  done
  # ME+GD with a stronger retain weight and longer, and logit matching to the retain model itself
  run lr-me-alpha10 recipes/tofu/me.toml --set method.alpha=10.0 --set train.steps=80
  run lr-oracle-retain recipes/tofu/oracle.toml --set train.lr=2e-2 --set train.steps=80
  dirs+=("$out/lr-me-alpha10" "$out/lr-oracle-retain")
  "$bin" compare "${dirs[@]}" > "$out/lr.md"
  cat "$out/lr.md"
fi

if [[ $what == wmdp || $what == all ]]; then
  dirs=()
  for r in recipes/wmdp/*.toml; do
    n=wmdp-$(basename "$r" .toml)
    run "$n" "$r"
    dirs+=("$out/$n")
  done
  # the RMU forget term's keys (its layer, steering) do not apply to NPO's: a copy without them
  # (its relative paths resolve the same from runs/tables/); the activation constraint holds
  # the layer RMU steers, so the retain term is the NLL
  grep -v '^layer =\|^steering_coeff =' recipes/wmdp/eupmu.toml > "$out/wmdp-eupmu-npo.toml"
  run wmdp-eupmu-npo "$out/wmdp-eupmu-npo.toml" --set method.forget_loss=npo --set method.retain_loss=nll \
    --set train.steps=60 --set train.lr=1e-2 --set 'lora.layers=[0,1,2,3]'
  dirs+=("$out/wmdp-eupmu-npo")
  "$bin" compare "${dirs[@]}" > "$out/wmdp.md"
  cat "$out/wmdp.md"
fi

if [[ $what == attribute || $what == all ]]; then
  attribute
  cat "$out/attribute/report.md"
  run klom-dmm recipes/klom/dmm.toml --set method.target="shadow:$out/attribute/shadow"
  # the DMM model's distance to the oracle: the report's references line
  [ -f "$out/attribute-dmm/report.md" ] ||
    "$bin" attribute recipes/dmm/attribute.toml --set 'attribute.compare=[]' \
      --set "report.references=[\"$out/klom-dmm/merged\"]" --set output.dir="$out/attribute-dmm"
  sed -n '/^| split | KL(references/,/^$/p' "$out/attribute-dmm/report.md"
fi
