#!/usr/bin/env bash
# Every GPU check of the CUDA issue in one command, on the device machine (no Rust there):
# carry target/cuda/unlearn.xz, which scripts/build-cuda.sh writes, and run this script.
#   1. parity: logits, loss and LoRA gradients on CUDA against the CPU in f32 and against
#      transformers + PEFT (tests/fixtures/hf/*-lora/reference.safetensors), base weights in f32
#      and in bf16, and two AdamW steps that must leave the LoRA weights bit for bit as the
#      CPU's; `unlearn parity` exits non-zero past the tolerance or on any differing bit; and
#      Gemma 2 (soft caps) against the CPU alone, with a generated adapter
#   2. the quickstart recipe, whole (train, evaluate, merge), on CUDA
#   3. the Llama-3.2-1B-shape step (bf16, batch 8×512, LoRA r 8 on all linear layers) against
#      transformers + PEFT, with model FLOP utilisation and peak GPU memory; and PyTorch's step
#      with eager attention (materialised scores, as unlearn's), to tell attention's share
#   4. every bench method's step cost at that shape
#   5. the step with UNLEARN_CUDA_FUSED=0 (composed attention, attention softmax, LoRA linear,
#      RMSNorm, RoPE, SwiGLU, soft cap and loss),
#      to measure the kernels of src/cuda/; if parity fails with them and passes without, 2–4
#      run without them too
#   6. the Gemma-2-2B-shape step (bf16, 8×512: soft caps, 256k vocabulary) against
#      transformers + PEFT
# Everything printed goes to $OUT/gpu-checks.log as well; JSON results land in $OUT.
# DEVICE=cpu runs the same checks on the CPU with a small bench shape: a dry run of this script
# on a machine without a GPU (UNLEARN_BIN=target/release/unlearn PYTHON=... for that).
set -euo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
exec > >(tee "$out/gpu-checks.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}

bin=${UNLEARN_BIN:-}
if [ -z "$bin" ]; then
  if [ -f target/cuda/unlearn.xz ]; then
    bin=/tmp/unlearn-cuda
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      target/cuda/unlearn.xz "$bin"
    chmod +x "$bin"
  else
    bin=target/cuda/release/unlearn
  fi
fi
export UNLEARN_BIN="$bin"

if [ "$device" = cuda ]; then
  # CUDA user-space libraries (cuBLAS, cuRAND, NVRTC) come with the machine's PyTorch install
  libs=$("$PYTHON" - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for pattern in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        dirs.update(glob.glob(os.path.join(root, pattern)))
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  py_shape=(--config benches/llama-3.2-1b/config.json --batch 8 --seq 512 --dtype bf16)
  shape=("${py_shape[@]}" --peak-tflops "${PEAK_TFLOPS:-989}")
else
  py_shape=(--layers 2 --batch 2 --seq 64 --steps 2)
  shape=("${py_shape[@]}")
fi
"$bin" --version
failed=()
fused_kernels_wrong=false
step() { echo; echo "=== $*"; }

step "1. parity on $device (relative L2 error against CPU f32 and PEFT)"
parity() { # BASE DTYPE OUT_JSON: `unlearn parity` on that fixture
  "$bin" --device "$device" --base-dtype "$2" parity --model "tests/fixtures/hf/$1" \
    --adapter "tests/fixtures/hf/$1-lora" \
    --reference "tests/fixtures/hf/$1-lora/reference.safetensors" --json > "$3"
}
for base in llama qwen2; do
  for dtype in f32 bf16; do
    if ! parity "$base" "$dtype" "$out/parity-$base-$dtype.json"; then
      failed+=("parity $base $dtype")
      # tell the fused kernels (src/cuda/) from the rest: the same check with the composed
      # attention softmax, RMSNorm, RoPE, SwiGLU and loss
      if [ "$device" = cuda ] &&
        UNLEARN_CUDA_FUSED=0 parity "$base" "$dtype" "$out/parity-$base-$dtype-composed.json"; then
        echo "parity $base $dtype passes with UNLEARN_CUDA_FUSED=0: the fused kernels are wrong"
        fused_kernels_wrong=true
      fi
    fi
    "$PYTHON" - "$out/parity-$base-$dtype.json" <<'PY' || failed+=("parity $base $dtype: no report")
import json, sys
r = json.load(open(sys.argv[1]))
logits = r["tensors"][0]
grads = r["tensors"][2:]
vs_ref = lambda ts: max((t["vs_reference"] for t in ts if t["vs_reference"] is not None), default=float("nan"))
print(f"{sys.argv[1].split('/')[-1]}: logits {logits['vs_cpu']:.2e} vs cpu, {vs_ref([logits]):.2e} vs PEFT; "
      f"worst of {len(grads)} LoRA gradients {max(g['vs_cpu'] for g in grads):.2e} vs cpu, "
      f"{vs_ref(grads):.2e} vs PEFT; tolerance {r['tolerance']:.0e}; "
      f"{r['optimizer_step_mismatches']} differing bits after two AdamW steps: "
      f"{'PASS' if r['pass'] else 'FAIL'}")
PY
  done
done

# Gemma 2 (soft caps: the SoftCap kernels, the attention recomputed in its backward), against
# the CPU only: the fixtures hold no PEFT gradients for it (scripts/gemma2-parity-inputs.py)
"$PYTHON" scripts/gemma2-parity-inputs.py "$out/gemma2" || failed+=("gemma2 parity inputs")
for dtype in f32 bf16; do
  if ! "$bin" --device "$device" --base-dtype "$dtype" parity --model tests/fixtures/hf/gemma2 \
    --adapter "$out/gemma2/gemma2-lora" --reference "$out/gemma2/gemma2-batch.safetensors" \
    --json > "$out/parity-gemma2-$dtype.json"; then
    failed+=("parity gemma2 $dtype")
    if [ "$device" = cuda ] && UNLEARN_CUDA_FUSED=0 "$bin" --device "$device" --base-dtype "$dtype" \
      parity --model tests/fixtures/hf/gemma2 --adapter "$out/gemma2/gemma2-lora" \
      --reference "$out/gemma2/gemma2-batch.safetensors" --json > "$out/parity-gemma2-$dtype-composed.json"; then
      echo "parity gemma2 $dtype passes with UNLEARN_CUDA_FUSED=0: the fused kernels are wrong"
      fused_kernels_wrong=true
    fi
  fi
  "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].split("/")[-1] + ": worst of " + str(len(r["tensors"])) + " tensors vs cpu " + format(max(t["vs_cpu"] for t in r["tensors"]), ".2e") + ", " + str(r["optimizer_step_mismatches"]) + " differing bits after two AdamW steps: " + ("PASS" if r["pass"] else "FAIL"))' \
    "$out/parity-gemma2-$dtype.json" || failed+=("parity gemma2 $dtype: no report")
done

# timings of a wrong kernel mean nothing: the rest runs on the composed form then
if $fused_kernels_wrong; then export UNLEARN_CUDA_FUSED=0; fi

step "2. quickstart on $device"
qs=/tmp/gpu-checks-quickstart
rm -rf "$qs"
started=$(date +%s)
if "$bin" --device "$device" run recipes/quickstart.toml --set "output.dir=\"$qs\""; then
  echo "quickstart: $(( $(date +%s) - started )) s"
  "$bin" compare "$qs" | tee "$out/quickstart-compare.md" || failed+=("quickstart: compare")
  cp "$qs/evals/step-000040/SUMMARY.json" "$out/quickstart-summary.json" \
    || failed+=("quickstart: no final evaluation")
  [ -f "$qs/merged/config.json" ] || failed+=("quickstart: no merged checkpoint")
else
  failed+=("quickstart")
fi

step "3. one LoRA unlearning step against transformers + PEFT (${shape[*]})"
scripts/bench-vs-peft.sh --device "$device" "${shape[@]}" | tee "$out/bench-vs-peft.txt" \
  || failed+=("bench-vs-peft")
# PyTorch's default attention is SDPA (flash attention on a GPU); unlearn materialises the
# scores as transformers' eager attention does. Timing that too tells how much of the ratio is
# attention.
"$PYTHON" benches/peft_step.py --device "$device" --attn eager "${py_shape[@]}" \
  | tee "$out/peft-eager-attention.json" || failed+=("peft eager attention")

step "4. every method's step at that shape"
# --dtype is bench-vs-peft.sh's (both stacks); `unlearn bench` takes the global --base-dtype
bench_shape=() base_dtype=()
for ((i = 0; i < ${#shape[@]}; i++)); do
  if [ "${shape[$i]}" = --dtype ]; then base_dtype=(--base-dtype "${shape[$((i + 1))]}"); i=$((i + 1))
  else bench_shape+=("${shape[$i]}"); fi
done
"$bin" --device "$device" "${base_dtype[@]}" bench \
  --methods gradascent,graddiff,npo,eupmu,eupmu-fast,surgery "${bench_shape[@]}" \
  | tee "$out/bench-methods.txt" || failed+=("bench methods")

if [ "$device" = cuda ] && ! $fused_kernels_wrong; then
  step "5. the same step with the composed attention softmax, RMSNorm, RoPE, SwiGLU and loss (what src/cuda/ saves)"
  UNLEARN_CUDA_FUSED=0 "$bin" --device "$device" "${base_dtype[@]}" bench \
    --methods gradascent "${bench_shape[@]}" | tee "$out/bench-composed-kernels.txt" \
    || failed+=("bench composed kernels")
fi

if [ "$device" = cuda ]; then
  # last, so that a run out of time loses only this: Gemma 2 has the soft caps and a 256k
  # vocabulary, whose [tokens, vocab] logits dominate the step's memory
  step "6. the Gemma-2-2B-shape step against transformers + PEFT (bf16, 8 × 512)"
  scripts/bench-vs-peft.sh --device "$device" --config benches/gemma-2-2b/config.json \
    --batch 8 --seq 512 --dtype bf16 --steps 3 --peak-tflops "${PEAK_TFLOPS:-989}" \
    | tee "$out/bench-vs-peft-gemma2.txt" || failed+=("bench-vs-peft gemma2")
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
