// Next-token cross-entropy kernels for the CUDA build (see src/model/ops.rs, FusedNll): one
// block per row of the logits [N, V], f32 arithmetic whatever the logits' dtype (transformers
// upcasts logits to f32 before its loss). Composed, the loss over a 128k vocabulary is a cast to
// f32 and about six passes of log-softmax forward and as many backward, over N × V values.
#include "common.cuh"

// Running (max, Σ exp(x − max)) pairs, merged without exp(−inf + inf) = NaN; an empty pair is
// (−inf, 0), and a NaN logit (a NaN sum) carries through to the loss as on the CPU.
__device__ __forceinline__ void merge_stats(float* m, float* s, float m2, float s2) {
  if (m2 == -INFINITY && s2 == 0.0f) return;
  if (*m == -INFINITY && *s == 0.0f) {
    *m = m2;
    *s = s2;
    return;
  }
  float mx = fmaxf(*m, m2);
  *s = *s * expf(*m - mx) + s2 * expf(m2 - mx);
  *m = mx;
}

// log Σ exp over one row, computed by the whole block; every thread gets it.
template <typename T>
__device__ float row_logsumexp(const T* x, int v) {
  // one (max, sum) pair per warp, for any block of up to 1024 threads
  __shared__ float shared_m[32];
  __shared__ float shared_s[32];
  float m = -INFINITY, s = 0.0f;
  for (int c = threadIdx.x; c < v; c += blockDim.x) {
    float z = load_f(x[c]);
    if (z == -INFINITY) continue;
    if (z > m) {
      // s·exp(m − z) is 0 while nothing was seen (m = −inf, s = 0) and NaN once a NaN was:
      // a NaN read first must not be reset by the next finite logit
      s = s * expf(m - z) + 1.0f;
      m = z;
    } else {
      s += expf(z - m);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_stats(&m, &s, m2, s2);
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x / 32;
    m = lane < warps ? shared_m[lane] : -INFINITY;
    s = lane < warps ? shared_s[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
      float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
      merge_stats(&m, &s, m2, s2);
    }
    if (lane == 0) {
      shared_m[0] = m;
      shared_s[0] = s;
    }
  }
  __syncthreads();
  return shared_m[0] + logf(shared_s[0]);
}

// nll[row] = logsumexp(logits[row]) − logits[row, label]; 0 where the label is < 0 or ≥ V.
template <typename T>
__device__ void nll_fwd(const T* logits, const int64_t* labels, float* nll, int v) {
  size_t row = blockIdx.x;
  int64_t label = labels[row];
  if (label < 0 || label >= v) {
    if (threadIdx.x == 0) nll[row] = 0.0f;
    return;
  }
  const T* x = logits + row * (size_t)v;
  float lse = row_logsumexp(x, v);
  if (threadIdx.x == 0) nll[row] = lse - load_f(x[label]);
}

// grad[row] = g[row]·(softmax(logits[row]) − onehot(label)); zeros where the label is ignored
// or g[row] = 0.
template <typename T>
__device__ void nll_bwd(const T* logits, const int64_t* labels, const float* upstream, T* grad,
                        int v) {
  size_t row = blockIdx.x;
  int64_t label = labels[row];
  float g = upstream[row];
  T* out = grad + row * (size_t)v;
  if (label < 0 || label >= v || g == 0.0f) {
    for (int c = threadIdx.x; c < v; c += blockDim.x) out[c] = store_f<T>(0.0f);
    return;
  }
  const T* x = logits + row * (size_t)v;
  float lse = row_logsumexp(x, v);
  for (int c = threadIdx.x; c < v; c += blockDim.x) {
    float d = g * expf(load_f(x[c]) - lse);
    if (c == label) d -= g;
    out[c] = store_f<T>(d);
  }
}

#define NLL_OPS(T, SUFFIX)                                                                      \
  extern "C" __global__ void nll_fwd_##SUFFIX(const T* logits, const int64_t* labels,         \
                                              float* nll, int v) {                            \
    nll_fwd<T>(logits, labels, nll, v);                                                       \
  }                                                                                           \
  extern "C" __global__ void nll_bwd_##SUFFIX(const T* logits, const int64_t* labels,         \
                                              const float* upstream, T* grad, int v) {        \
    nll_bwd<T>(logits, labels, upstream, grad, v);                                            \
  }

NLL_OPS(float, f32)
NLL_OPS(__nv_bfloat16, bf16)
NLL_OPS(__half, f16)
