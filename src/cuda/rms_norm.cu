// RMSNorm for the CUDA build (see src/model/ops.rs, FusedRmsNorm): one block per row of
// x [rows, d], f32 arithmetic, rounded as transformers rounds in the model dtype:
//   LlamaRMSNorm (plus_one = 0): y = round(w · round(n)),  n = x · rsqrt(mean x² + ε)
//   Gemma2RMSNorm (plus_one = 1): y = round(n · (1 + w))
// Composed, it is a cast, square, mean, add, sqrt, reciprocal, two products and a cast
// forward, and about as many passes backward, three times per layer.
#include "common.cuh"

// Σ v over the block, every thread getting it. Called twice by the backward: the trailing
// barrier keeps the second call's writes from racing the first call's reads. One partial sum
// per warp, for any block of up to 1024 threads.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  v = warp_sum(v);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x / 32;
    v = warp_sum(lane < warps ? partial[lane] : 0.0f);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  float total = partial[0];
  __syncthreads();
  return total;
}

// 1 / sqrt(mean x² + ε) of the row, as the CPU computes it (sqrt then a division, both
// correctly rounded, where rsqrtf would be off by an ulp)
template <typename T>
__device__ float inv_rms(const T* x, int d, float eps) {
  float ss = 0.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float v = load_f(x[c]);
    ss += v * v;
  }
  return 1.0f / sqrtf(block_sum(ss) / (float)d + eps);
}

template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* y, int d, float eps, int plus_one) {
  const T* xr = x + (size_t)blockIdx.x * d;
  T* yr = y + (size_t)blockIdx.x * d;
  float r = inv_rms(xr, d, eps);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float n = load_f(xr[c]) * r;
    float wc = load_f(w[c]);
    yr[c] = plus_one ? store_f<T>(n * (1.0f + wc)) : store_f<T>(load_f(store_f<T>(n)) * wc);
  }
}

// ∂x = r·u − r³·x·Σ(u⊙x)/d with u the gradient of n: round(g·w) for Llama (the product's
// backward in the model dtype), g·(1 + w) in f32 for Gemma; rounded once at the end.
template <typename T>
__device__ float grad_of_normed(const T* g, const T* w, int c, int plus_one) {
  float gc = load_f(g[c]), wc = load_f(w[c]);
  return plus_one ? gc * (1.0f + wc) : load_f(store_f<T>(gc * wc));
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, T* dx, int d, float eps,
                             int plus_one) {
  size_t offset = (size_t)blockIdx.x * d;
  const T* xr = x + offset;
  const T* gr = g + offset;
  T* out = dx + offset;
  float r = inv_rms(xr, d, eps);
  float ux = 0.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    ux += grad_of_normed(gr, w, c, plus_one) * load_f(xr[c]);
  }
  float k = r * r * r * (block_sum(ux) / (float)d);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    out[c] = store_f<T>(r * grad_of_normed(gr, w, c, plus_one) - load_f(xr[c]) * k);
  }
}

#define RMS_NORM_OPS(T, SUFFIX)                                                                 \
  extern "C" __global__ void rms_norm_##SUFFIX(const T* x, const T* w, T* y, int d, float eps, \
                                               int plus_one) {                                \
    rms_norm<T>(x, w, y, d, eps, plus_one);                                                   \
  }                                                                                           \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* g, T* dx, \
                                                   int d, float eps, int plus_one) {          \
    rms_norm_bwd<T>(x, w, g, dx, d, eps, plus_one);                                           \
  }

RMS_NORM_OPS(float, f32)
RMS_NORM_OPS(__nv_bfloat16, bf16)
RMS_NORM_OPS(__half, f16)
