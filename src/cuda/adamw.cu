// AdamW for the CUDA build (see src/train/optim.rs): two in-place kernels per f32 variable of n
// elements, where the composed form was about fifteen kernels and as many temporaries.
//
// The arithmetic is torch.optim.AdamW's single-tensor step, op for op, each rounding explicit
// (no contraction but the fused multiply-adds torch's own kernels use), so that a step here
// equals optim.rs's CPU step bit for bit:
//   exp_avg.lerp_(g, w)                 w·(g − m) + m as one fma (g − (g − m)·(1 − w) if w ≥ 0.5)
//   exp_avg_sq.mul_(β2).addcmul_(g, g, value=c)      fma(c·g, g, v·β2)
//   param.mul_(1 − lr·wd)               (×1 when there is no decay: exact)
//   denom = sqrt(exp_avg_sq) / √bc2 + eps
//   param.addcdiv_(exp_avg, denom, value=−step)      param + (−step·m) / denom
#include "common.cuh"

// moments [2, n] (exp_avg, then exp_avg_sq) with the gradient times grad_scale (the clipping
// coefficient, 1 when not clipped: torch multiplies the gradients before the step).
extern "C" __global__ void adamw_moments_f32(float* moments, const float* grad, size_t n,
                                             float grad_scale, float lerp_weight, float beta2,
                                             float sq_weight) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    float g = __fmul_rn(grad[i], grad_scale);
    float m = moments[i];
    float diff = __fsub_rn(g, m);
    // torch's lerp, its branch for a large weight included (at::native::lerp)
    moments[i] = fabsf(lerp_weight) < 0.5f ? __fmaf_rn(lerp_weight, diff, m)
                                           : __fmaf_rn(__fsub_rn(lerp_weight, 1.0f), diff, g);
    float v = __fmul_rn(moments[n + i], beta2);
    moments[n + i] = __fmaf_rn(__fmul_rn(sq_weight, g), g, v);
  }
}

// param [n] with the updated moments [2, n].
extern "C" __global__ void adamw_param_f32(float* param, const float* moments, size_t n,
                                           float decay, float bc2_sqrt, float eps,
                                           float neg_step) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    float p = __fmul_rn(param[i], decay);
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(moments[n + i]), bc2_sqrt), eps);
    param[i] = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, moments[i]), denom));
  }
}
