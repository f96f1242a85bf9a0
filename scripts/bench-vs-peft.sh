#!/usr/bin/env bash
# One command, both stacks, their ratio: `unlearn bench` (one forget-only LoRA step) vs the same
# step in transformers + PEFT. Extra arguments (shape, --steps) go to both.
#   scripts/bench-vs-peft.sh                      # CPU shape (PYTHON=path/to/python with torch)
#   UNLEARN_BIN=target/cuda/release/unlearn scripts/bench-vs-peft.sh --device cuda --dtype bf16 \
#       --config benches/llama-3.2-1b/config.json --seq 512 --peak-tflops 989   # GPU shape
# Both report model FLOP utilisation from the same FLOP count (`unlearn bench`'s), when
# --peak-tflops gives the device's peak.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
device=cpu; rust_args=(); py_args=(); global_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --device=*) device=${1#--device=}; shift ;;
    --dtype) py_args+=(--dtype "$2"); global_args+=(--base-dtype "$2"); shift 2 ;;
    --peak-tflops) rust_args+=(--peak-tflops "$2"); shift 2 ;;
    *) rust_args+=("$1"); py_args+=("$1"); shift ;;
  esac
done
# On a GPU, peak memory is what nvidia-smi sees the device use beyond its level before the run
# (sampled every 50 ms): the same measure for both stacks, PyTorch's cached blocks included.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gpu_memory=false
if [[ $device == cuda* ]] && command -v nvidia-smi > /dev/null; then gpu_memory=true; fi
# the GPU of --device cuda:N as nvidia-smi numbers it: N, or the Nth entry of
# CUDA_VISIBLE_DEVICES when that is set (an index, a UUID or a MIG id, passed on as it is)
gpu_index=0
if $gpu_memory; then
  gpu_index=${device#cuda}; gpu_index=${gpu_index#:}; gpu_index=${gpu_index:-0}
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $gpu_index =~ ^[0-9]+$ ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    gpu_index=${visible[$gpu_index]:-$gpu_index}
  fi
fi
measured() { # NAME CMD...: run CMD; on a GPU, its peak memory in MiB goes to $tmp/NAME
  local name=$1; shift
  if ! $gpu_memory; then "$@"; return; fi
  local query=(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits --id="$gpu_index")
  local before; before=$("${query[@]}" 2> /dev/null | head -1) || true
  "${query[@]}" -lms 50 > "$tmp/$name.samples" 2> /dev/null &
  local sampler=$! rc=0
  "$@" || rc=$?
  kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null || true
  # a memory figure only when nvidia-smi gave numbers; the timing stands without it
  local peak; peak=$(grep -E '^[0-9]+$' "$tmp/$name.samples" | sort -n | tail -1) || true
  if [[ $before =~ ^[0-9]+$ && $peak =~ ^[0-9]+$ ]]; then
    echo $(( peak - before )) > "$tmp/$name"
  fi
  return $rc
}
ours=$(measured ours "$bin" --device "$device" "${global_args[@]}" bench --methods gradascent --json "${rust_args[@]}")
theirs=$(measured theirs "${PYTHON:-python3}" benches/peft_step.py --device "$device" "${py_args[@]}")
echo "unlearn:     $ours"
echo "torch+peft:  $theirs"
"${PYTHON:-python3}" - "$ours" "$theirs" "$tmp" <<'PY'
import json, os, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
peaks = [os.path.join(sys.argv[3], n) for n in ("ours", "theirs")]
if all(os.path.exists(p) for p in peaks):
    ga, gb = (float(open(p).read()) for p in peaks)
    print(f"peak GPU memory (nvidia-smi): unlearn {ga:.0f} MiB, torch+peft {gb:.0f} MiB, ratio {ga / gb:.2f}")
if "peak_gpu_mb" in a and "peak_gpu_mb" in b:
    ga, gb = a["peak_gpu_mb"], b["peak_gpu_mb"]
    print(f"peak GPU memory held by tensors: unlearn {ga:.0f} MiB, torch+peft {gb:.0f} MiB, ratio {ga / gb:.2f}")
print(f"tokens/s ratio (unlearn / torch+peft): {a['tokens_per_second'] / b['tokens_per_second']:.2f}")
print(f"peak RSS ratio (unlearn / torch+peft): {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
# the same step, so the same model FLOPs: each side's rate is that count over its own time
for who, r in (("unlearn", a), ("torch+peft", b)):
    tflops = a["model_tflop_per_step"] / r["seconds_per_step"]
    mfu = f", MFU {100 * tflops / a['peak_tflops']:.1f}%" if a.get("peak_tflops") else ""
    print(f"{who}: {tflops:.2f} TFLOP/s{mfu}")
PY
