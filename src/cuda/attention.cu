// Attention softmax kernels for the CUDA build (compiled to PTX by build.rs, loaded with
// CudaDevice::get_or_load_custom_func; see src/model/ops.rs, MaskedSoftmax).
//
// The composed path (q·kᵀ times the scale, + mask, cast to f32, softmax, cast back; and the
// backward's casts, g⊙y, row sum, subtract, multiply, scale) reads and writes the [B, H, T, T]
// scores about a dozen times per layer. These two kernels read them once forward and once
// backward, one warp per row, all arithmetic in f32 as transformers' eager attention does it
// (softmax(dtype=float32) then a cast to the model dtype).
#include "common.cuh"

// Row `row` of contiguous scores [B, H, T, C] is (b, h, i) with row = (b·H + h)·T + i; its mask
// row in the contiguous [B, 1, T, C] mask is b·T + i.
__device__ __forceinline__ size_t mask_row(size_t row, int heads, int t_q) {
  size_t i = row % (size_t)t_q;
  size_t b = row / ((size_t)heads * (size_t)t_q);
  return b * (size_t)t_q + i;
}

// round(round(scores · scale) + mask) in T before the f32 softmax, as transformers' eager
// attention computes `matmul(q, kᵀ) * scaling + mask` in the model dtype (a product in f32,
// rounded; __fmul_rn keeps it apart from the add): for a row that sees no key (−1e9
// everywhere) the rounding is what makes it the uniform average that eager attention gives.
template <typename T>
__device__ __forceinline__ float masked(const T* s, const T* m, int c, float scale) {
  return load_f(store_f<T>(load_f(store_f<T>(__fmul_rn(load_f(s[c]), scale))) + load_f(m[c])));
}

// The row's max and 1 / Σ exp(x − max) of x = scores + mask, every lane ending with both.
template <typename T>
__device__ __forceinline__ void row_stats(const T* s, const T* m, int cols, float scale, int lane,
                                          float* max_out, float* inv_sum_out) {
  float mx = -INFINITY;
  for (int c = lane; c < cols; c += 32) {
    mx = fmaxf(mx, masked(s, m, c, scale));
  }
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int c = lane; c < cols; c += 32) {
    sum += expf(masked(s, m, c, scale) - mx);
  }
  sum = warp_sum(sum);
  *max_out = mx;
  *inv_sum_out = 1.0f / sum;
}

// probs = softmax(scores · scale + mask) over the last dimension. Block (32, rows_per_block).
template <typename T>
__device__ void masked_softmax(const T* scores, const T* mask, T* probs, int64_t rows, int cols,
                               int heads, int t_q, float scale) {
  int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int lane = threadIdx.x;
  const T* s = scores + (size_t)row * cols;
  const T* m = mask + mask_row(row, heads, t_q) * cols;
  T* y = probs + (size_t)row * cols;
  float mx, inv;
  row_stats(s, m, cols, scale, lane, &mx, &inv);
  for (int c = lane; c < cols; c += 32) {
    y[c] = store_f<T>(expf(masked(s, m, c, scale) - mx) * inv);
  }
}

// d_scores = round(round(p ⊙ (g − Σ g⊙p)) · scale), with p recomputed in f32 from the scores
// (not read back from the rounded probabilities), as the composed path's f32 softmax backward
// has it; the softmax's gradient is rounded to T (the cast's backward), then the product's.
template <typename T>
__device__ void masked_softmax_bwd(const T* scores, const T* mask, const T* grad, T* d_scores,
                                   int64_t rows, int cols, int heads, int t_q, float scale) {
  int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int lane = threadIdx.x;
  const T* s = scores + (size_t)row * cols;
  const T* m = mask + mask_row(row, heads, t_q) * cols;
  const T* g = grad + (size_t)row * cols;
  T* d = d_scores + (size_t)row * cols;
  float mx, inv;
  row_stats(s, m, cols, scale, lane, &mx, &inv);
  float dot = 0.0f;
  for (int c = lane; c < cols; c += 32) {
    dot += load_f(g[c]) * (expf(masked(s, m, c, scale) - mx) * inv);
  }
  dot = warp_sum(dot);
  for (int c = lane; c < cols; c += 32) {
    float p = expf(masked(s, m, c, scale) - mx) * inv;
    d[c] = store_f<T>(__fmul_rn(load_f(store_f<T>(p * (load_f(g[c]) - dot))), scale));
  }
}

#define MASKED_SOFTMAX_OPS(T, SUFFIX)                                                             \
  extern "C" __global__ void masked_softmax_##SUFFIX(const T* scores, const T* mask, T* probs,    \
                                                     int64_t rows, int cols, int heads, int t_q, \
                                                     float scale) {                              \
    masked_softmax<T>(scores, mask, probs, rows, cols, heads, t_q, scale);                       \
  }                                                                                               \
  extern "C" __global__ void masked_softmax_bwd_##SUFFIX(const T* scores, const T* mask,         \
                                                         const T* grad, T* d_scores,             \
                                                         int64_t rows, int cols, int heads,      \
                                                         int t_q, float scale) {                 \
    masked_softmax_bwd<T>(scores, mask, grad, d_scores, rows, cols, heads, t_q, scale);          \
  }

MASKED_SOFTMAX_OPS(float, f32)
MASKED_SOFTMAX_OPS(__nv_bfloat16, bf16)
MASKED_SOFTMAX_OPS(__half, f16)
