// SwiGLU, silu(gate) ⊙ up, for the CUDA build (see src/model/ops.rs, FusedSwiglu). Composed
// from candle ops its backward is about eleven element-wise passes over the [tokens,
// intermediate] activations; here it is one pass forward and one per input backward. Rounding
// follows PyTorch's eager ops in the model dtype: silu(gate) is rounded before the product,
// the product after it; backward, g ⊙ up is rounded (the product's backward) before silu's
// derivative is applied in f32 and rounded once.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// silu(gate) rounded to T, as PyTorch's silu returns it
template <typename T>
__device__ __forceinline__ float silu_rounded(float g) {
  return load_f(store_f<T>(g / (1.0f + expf(-g))));
}

// ∂gate = silu'(gate) · round(grad ⊙ up), silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
template <typename T>
__device__ __forceinline__ T gate_grad(float g, float up, float grad) {
  float d_act = load_f(store_f<T>(grad * up));
  float s = sigmoid_f(g);
  return store_f<T>(d_act * s * (1.0f + g * (1.0f - s)));
}

template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    out[i] = store_f<T>(silu_rounded<T>(load_f(gate[i])) * load_f(up[i]));
  }
}

template <typename T>
__device__ void swiglu_gate_grad(const T* gate, const T* up, const T* grad, T* d_gate, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    d_gate[i] = gate_grad<T>(load_f(gate[i]), load_f(up[i]), load_f(grad[i]));
  }
}

// ∂up = grad ⊙ round(silu(gate))
template <typename T>
__device__ void swiglu_up_grad(const T* gate, const T* grad, T* d_up, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    d_up[i] = store_f<T>(load_f(grad[i]) * silu_rounded<T>(load_f(gate[i])));
  }
}

// The packed form of Phi-3's gate_up_proj: rows of y [rows, 2·inter] hold [gate | up], out is
// [rows, inter]. Reading the halves in place saves the two copies of the narrowed halves, and
// the backward writes ∂y [rows, 2·inter] whole where two narrow backwards would each pad a
// full-size zero tensor and add them. n = rows · inter.
template <typename T>
__device__ void swiglu_packed(const T* y, T* out, size_t n, size_t inter) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const T* r = y + (i / inter) * 2 * inter;
    size_t j = i % inter;
    out[i] = store_f<T>(silu_rounded<T>(load_f(r[j])) * load_f(r[inter + j]));
  }
}

template <typename T>
__device__ void swiglu_packed_bwd(const T* y, const T* grad, T* dy, size_t n, size_t inter) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    size_t offset = (i / inter) * 2 * inter, j = i % inter;
    float g = load_f(y[offset + j]), up = load_f(y[offset + inter + j]), dout = load_f(grad[i]);
    dy[offset + j] = gate_grad<T>(g, up, dout);
    dy[offset + inter + j] = store_f<T>(dout * silu_rounded<T>(g));
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
  }                                                                                           \
  extern "C" __global__ void swiglu_packed_##SUFFIX(const T* y, T* out, size_t n,             \
                                                    size_t inter) {                           \
    swiglu_packed<T>(y, out, n, inter);                                                       \
  }                                                                                           \
  extern "C" __global__ void swiglu_packed_bwd_##SUFFIX(const T* y, const T* grad, T* dy,     \
                                                        size_t n, size_t inter) {             \
    swiglu_packed_bwd<T>(y, grad, dy, n, inter);                                              \
  }

SWIGLU_OPS(float, f32)
SWIGLU_OPS(__nv_bfloat16, bf16)
SWIGLU_OPS(__half, f16)
