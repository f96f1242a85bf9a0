#!/usr/bin/env bash
# One command, both stacks, their ratio: `unlearn bench` (one forget-only LoRA step) vs the same
# step in transformers + PEFT. Extra arguments (shape, --steps) go to both.
#   scripts/bench-vs-peft.sh                      # CPU shape (PYTHON=path/to/python with torch)
#   UNLEARN_BIN=target/cuda/release/unlearn scripts/bench-vs-peft.sh --device cuda --dtype bf16 ...
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${UNLEARN_BIN:-target/release/unlearn}
[ -x "$bin" ] || cargo build --release
device=cpu; rust_args=(); py_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --dtype) py_args+=(--dtype "$2"); shift 2 ;;
    *) rust_args+=("$1"); py_args+=("$1"); shift ;;
  esac
done
ours=$("$bin" --device "$device" bench --methods gradascent --json "${rust_args[@]}")
theirs=$("${PYTHON:-python3}" benches/peft_step.py --device "$device" "${py_args[@]}")
echo "unlearn:     $ours"
echo "torch+peft:  $theirs"
"${PYTHON:-python3}" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"tokens/s ratio (unlearn / torch+peft): {a['tokens_per_second'] / b['tokens_per_second']:.2f}")
print(f"peak RSS ratio (unlearn / torch+peft): {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
PY
