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
"$bin" bench --methods gradascent,graddiff,eupmu,eupmu-fast,surgery "$@"
