// Gemma 2's soft cap, cap · tanh(x / cap), for the CUDA build (see src/model/ops.rs, SoftCap).
// Composed from candle ops it keeps the quotient and the tanh besides x until the backward is
// over, and its backward is five more passes; on the final logits each of those is a
// [tokens, vocab] tensor. Rounding follows the composed ops in the model dtype T: the quotient
// is computed in f32 and rounded to T, tanh is taken in f32 of it and rounded, the product
// with cap (candle's affine, t · cap + 0) is computed in f32 and rounded. Backward, as candle's rules for those ops compute
// it: g_t = round(g · cap), then tanh's −round(g_t · round(round(t·t) − 1)) in T, then
// round(that / cap) from f32.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float softcap_tanh(float x, float cap) {
  float q = load_f(store_f<T>(x / cap));
  return load_f(store_f<T>(tanhf(q)));
}

template <typename T>
__device__ void softcap(const T* x, T* out, size_t n, float cap) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    out[i] = store_f<T>(__fadd_rn(__fmul_rn(softcap_tanh<T>(load_f(x[i]), cap), cap), 0.0f));
  }
}

template <typename T>
__device__ void softcap_grad(const T* x, const T* grad, T* dx, size_t n, float cap) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    // __fmul_rn / __fadd_rn: nvcc would contract t·t − 1 into one fused multiply-add, which
    // rounds once where the composed ops round twice
    float t = softcap_tanh<T>(load_f(x[i]), cap);
    float g_t = load_f(store_f<T>(__fadd_rn(__fmul_rn(load_f(grad[i]), cap), 0.0f)));
    float t2 = load_f(store_f<T>(__fmul_rn(t, t)));
    float minus_dtanh = load_f(store_f<T>(__fadd_rn(t2, -1.0f)));
    float g_q = -load_f(store_f<T>(__fmul_rn(g_t, minus_dtanh)));
    dx[i] = store_f<T>(g_q / cap);
  }
}

#define SOFTCAP_OPS(T, SUFFIX)                                                                  \
  extern "C" __global__ void softcap_##SUFFIX(const T* x, T* out, size_t n, float cap) {       \
    softcap<T>(x, out, n, cap);                                                               \
  }                                                                                           \
  extern "C" __global__ void softcap_grad_##SUFFIX(const T* x, const T* grad, T* dx, size_t n, \
                                                   float cap) {                               \
    softcap_grad<T>(x, grad, dx, n, cap);                                                     \
  }

SOFTCAP_OPS(float, f32)
SOFTCAP_OPS(__nv_bfloat16, bf16)
SOFTCAP_OPS(__half, f16)
