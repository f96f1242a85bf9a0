#!/usr/bin/env bash
# Run on the GPU machine (carry target/cuda/release/unlearn). CUDA user-space libraries come
# with the machine's PyTorch install: find them and put them on the library path.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${UNLEARN_BIN:-target/cuda/release/unlearn}
libs=$(python3 - <<'PY'
import os, glob, site
roots = site.getsitepackages()
dirs = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        dirs.update(glob.glob(os.path.join(r, pat)))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$bin" --version
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
# 1. logits parity, CPU vs CUDA (bf16 base weights): per-record NLL of the same data
for dev in cpu cuda; do
  "$bin" --device $dev score --model tests/fixtures/hf/llama --adapter tests/fixtures/hf/llama-lora \
    --data tests/fixtures/unlearn/forget.jsonl --out "$out/score-$dev.jsonl"
done
python3 - "$out/score-cpu.jsonl" "$out/score-cuda.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
worst = max(abs(x["mean_nll"] - y["mean_nll"]) / abs(x["mean_nll"]) for x, y in zip(a, b))
print(f"score parity cpu vs cuda: worst relative mean-NLL difference {worst:.2e}")
assert worst < 2e-2, "beyond bf16 tolerance"
PY
# 2. a whole unlearning run on the GPU
"$bin" --device cuda run recipes/demo.toml --set output.dir="$out/demo"
# 3. step timings
"$bin" --device cuda bench --methods gradascent,graddiff,eupmu,eupmu-fast,surgery "$@"
