// SwiGLU, silu(gate) ⊙ up, for the CUDA build (see src/model/ops.rs, FusedSwiglu). Composed
// from candle ops its backward is about eleven element-wise passes over the [tokens,
// intermediate] activations; here it is one pass forward and one per input backward. Rounding
// follows PyTorch's eager ops in the model dtype: silu(gate) is rounded before the product,
// the product after it; backward, g ⊙ up is rounded (the product's backward) before silu's
// derivative is applied in f32 and rounded once.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    float g = load_f(gate[i]);
    float act = load_f(store_f<T>(g / (1.0f + expf(-g))));
    out[i] = store_f<T>(act * load_f(up[i]));
  }
}

// ∂gate = silu'(gate) · round(grad ⊙ up), silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
template <typename T>
__device__ void swiglu_gate_grad(const T* gate, const T* up, const T* grad, T* d_gate, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    float g = load_f(gate[i]);
    float d_act = load_f(store_f<T>(load_f(grad[i]) * load_f(up[i])));
    float s = sigmoid_f(g);
    d_gate[i] = store_f<T>(d_act * s * (1.0f + g * (1.0f - s)));
  }
}

// ∂up = grad ⊙ round(silu(gate))
template <typename T>
__device__ void swiglu_up_grad(const T* gate, const T* grad, T* d_up, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    float g = load_f(gate[i]);
    float act = load_f(store_f<T>(g / (1.0f + expf(-g))));
    d_up[i] = store_f<T>(load_f(grad[i]) * act);
  }
}

#define SWIGLU_OPS(T, SUFFIX)                                                                   \
  extern "C" __global__ void swiglu_##SUFFIX(const T* gate, const T* up, T* out, size_t n) {   \
    swiglu<T>(gate, up, out, n);                                                              \
  }                                                                                           \
  extern "C" __global__ void swiglu_gate_grad_##SUFFIX(const T* gate, const T* up,            \
                                                       const T* grad, T* d_gate, size_t n) {  \
    swiglu_gate_grad<T>(gate, up, grad, d_gate, n);                                           \
  }                                                                                           \
  extern "C" __global__ void swiglu_up_grad_##SUFFIX(const T* gate, const T* grad, T* d_up,   \
                                                     size_t n) {                              \
    swiglu_up_grad<T>(gate, grad, d_up, n);                                                   \
  }

SWIGLU_OPS(float, f32)
SWIGLU_OPS(__nv_bfloat16, bf16)
SWIGLU_OPS(__half, f16)
