// Rotary position embedding for the CUDA build (see src/model/ops.rs, FusedRope): one pass over
// contiguous x [B, H, T, D] with cos/sin tables [B, 1, T, half]; the first 2·half features of
// each row are rotated, the rest pass through. Composed from candle ops it is two narrows, four
// products, a sum, a difference and a concatenation forward, and as many backward (the backward
// is this kernel with sin negated). Rounding follows transformers in the model dtype:
// x·cos and rotate_half(x)·sin are each rounded, then their sum.
#include "common.cuh"

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, size_t n, int d, int half,
                     int heads, int t) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    size_t row = i / (size_t)d;
    int j = (int)(i % (size_t)d);
    if (j >= 2 * half) {
      out[i] = x[i];
      continue;
    }
    int k = j < half ? j : j - half;
    size_t b = row / ((size_t)heads * (size_t)t);
    size_t ti = row % (size_t)t;
    size_t table = (b * (size_t)t + ti) * (size_t)half + (size_t)k;
    float c = load_f(cos[table]), s = load_f(sin[table]);
    const T* r = x + row * (size_t)d;
    float x1 = load_f(r[k]), x2 = load_f(r[k + half]);
    // [x1, x2]·cos + [−x2, x1]·sin
    float a = j < half ? x1 : x2;
    float rotated = j < half ? -x2 : x1;
    // __fmul_rn: no fused multiply-add, so f32 gives the separate products the CPU computes
    out[i] = store_f<T>(load_f(store_f<T>(__fmul_rn(a, c))) +
                        load_f(store_f<T>(__fmul_rn(rotated, s))));
  }
}

#define ROPE_OPS(T, SUFFIX)                                                                     \
  extern "C" __global__ void rope_##SUFFIX(const T* x, const T* cos, const T* sin, T* out,    \
                                           size_t n, int d, int half, int heads, int t) {     \
    rope<T>(x, cos, sin, out, n, d, half, heads, t);                                          \
  }

ROPE_OPS(float, f32)
ROPE_OPS(__nv_bfloat16, bf16)
ROPE_OPS(__half, f16)
