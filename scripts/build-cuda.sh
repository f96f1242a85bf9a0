#!/usr/bin/env bash
# Build the CUDA binary on a machine without a CUDA install (no GPU needed).
#
# nvcc 13.0 and the CUDA headers/libraries come from NVIDIA's PyPI wheels, unpacked into
# .cuda/ (ignored by git); libcuda.so is the driver and ships with no wheel, so a stub with the
# right soname is generated for linking only — at run time the real driver is used.
# Output: target/cuda/release/unlearn (strip'ped) and target/cuda/unlearn.xz, the same binary
# compressed (about 9 MB against 66): carry that one to a GPU machine, whose working-tree limit
# is 64 MiB; scripts/gpu-checks.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.cuda"
mkdir -p "$root"
if [ ! -x "$root/venv/bin/python" ]; then
  python3 -m venv "$root/venv"
fi
"$root/venv/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
  "nvidia-cublas==13.*" "nvidia-curand==10.*" "nvidia-cuda-nvrtc==13.0.*"
site=$("$root/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
cu="$site/nvidia/cu13"
[ -d "$cu" ] || { echo "expected the CUDA 13 wheels under $cu" >&2; exit 1; }
export CUDA_HOME="$cu" CUDA_PATH="$cu" NVCC="$cu/bin/nvcc" PATH="$cu/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
# Unversioned .so links (the wheels ship only .so.N) and the libcuda stub.
libdir="$cu/lib"
mkdir -p "$libdir/stubs"
for f in "$libdir"/lib*.so.*; do
  base="${f%%.so.*}.so"
  [ -e "$base" ] || ln -sf "$(basename "$f")" "$base"
done
if [ ! -e "$libdir/stubs/libcuda.so" ]; then
  syms=$(grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cu/include/cuda.h" | sort -u)
  { for s in $syms; do echo "int $s(void) { return 999; }"; done; } > "$root/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$libdir/stubs/libcuda.so" "$root/libcuda_stub.c"
fi
# lets the binary start here for a CPU smoke test (LD_LIBRARY_PATH=$libdir:$libdir/stubs); never
# carried to the GPU machine, which has the real driver
ln -sf libcuda.so "$libdir/stubs/libcuda.so.1"
export LIBRARY_PATH="$libdir:$libdir/stubs:${LIBRARY_PATH:-}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $libdir -L $libdir/stubs"
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
strip target/cuda/release/unlearn
xz -T0 -6 -c target/cuda/release/unlearn > target/cuda/unlearn.xz.tmp
mv target/cuda/unlearn.xz.tmp target/cuda/unlearn.xz
ls -la target/cuda/release/unlearn target/cuda/unlearn.xz
