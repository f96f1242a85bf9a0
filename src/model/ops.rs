//! Differentiable building blocks.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` kernels have no
//! backward and silently cut the gradient, so everything on the training path here is either
//! composed from ops that have a backward or a custom op with an explicit `bwd`.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::model::config::Activation;

/// The dtype reductions run in: f32, or f64 for f64 inputs (gradient checks need it).
pub fn accum_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x · Wᵀ` for a frozen `W`: the backward returns only the input gradient.
///
/// candle's matmul backward always computes the gradient of both operands; for a frozen base
/// weight that is a wasted GEMM per linear (≈⅓ of backward FLOPs) and a weight-sized buffer kept
/// in the gradient store.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x · Wᵀ` over the last dimension of `x` (any rank). When `w` is a variable (full-parameter
/// training), the stock matmul is used so that `w` gets its gradient.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_features = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, in_features))?;
    // a weight derived from a variable (e.g. a transposed Conv1D Var) must keep its gradient too
    let y = if w.track_op() {
        x2.matmul(&w.t()?)?
    } else {
        let x2 = x2.contiguous()?;
        if x2.track_op() {
            x2.apply_op2(w, FrozenMatmul)?
        } else {
            // Nothing upstream needs a gradient (evaluation): the plain matmul is the same work.
            x2.matmul(&w.t()?)?
        }
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

pub fn activation(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

/// RMSNorm in f32 as transformers computes it: x · rsqrt(mean(x²) + ε) · w.
/// `plus_one` is Gemma's variant, which scales by (1 + w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(accum_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    let w = w.to_dtype(accum_dtype(dtype))?;
    let w = if plus_one { (w + 1.0)? } else { w };
    normed.broadcast_mul(&w)?.to_dtype(dtype)
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(accum_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed
        .broadcast_mul(&w.to_dtype(accum_dtype(dtype))?)?
        .broadcast_add(&b.to_dtype(accum_dtype(dtype))?)?
        .to_dtype(dtype)
}

/// Numerically stable softmax over the last dimension, composed so it has a backward.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

pub fn log_softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Half-rotation RoPE (transformers' `rotate_half`) on the first `cos.dim(-1)*2` dimensions of
/// each head; the rest pass through (partial rotary, GPT-NeoX / Phi).
/// `x`: [B, H, T, D]; `cos`, `sin`: [B, 1, T, rot/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(x) && cos.dtype() == DType::F32 && x.rank() == 4 {
        let (b, _, t, _) = x.dims4()?;
        if cos.dims() == [b, 1, t, cos.dim(D::Minus1)?] {
            return x.contiguous()?.apply_op1(FusedRope {
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            });
        }
    }
    rope_composed(x, cos, sin)
}

/// The composed form of [`rope`] (any device or dtype).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = cos.dim(D::Minus1)?;
    let rot = 2 * half;
    let (x_rot, x_pass) = if rot < d {
        (
            x.narrow(D::Minus1, 0, rot)?,
            Some(x.narrow(D::Minus1, rot, d - rot)?),
        )
    } else {
        (x.clone(), None)
    };
    let x1 = x_rot.narrow(D::Minus1, 0, half)?;
    let x2 = x_rot.narrow(D::Minus1, half, half)?;
    // [x1, x2]·cos + [-x2, x1]·sin, with cos/sin duplicated across the halves
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    match x_pass {
        Some(p) => Tensor::cat(&[&r1, &r2, &p], D::Minus1),
        None => Tensor::cat(&[&r1, &r2], D::Minus1),
    }
}

/// Cross-entropy per position: `-log p(label)`, with `labels` i64 \[N\] (−100 = ignore) and
/// `logits` \[N, V\]. Returns (per-position NLL \[N\] with zeros where ignored, mask \[N\] as f32).
pub fn token_nll(logits: &Tensor, labels: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let logits = logits.to_dtype(accum_dtype(logits.dtype()))?;
    let labels_v = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let mask: Vec<f32> = labels_v
        .iter()
        .map(|&l| if l < 0 { 0.0 } else { 1.0 })
        .collect();
    let safe: Vec<u32> = labels_v.iter().map(|&l| l.max(0) as u32).collect();
    let n = safe.len();
    let dev = logits.device();
    let idx = Tensor::from_vec(safe, (n, 1), dev)?;
    let mask = Tensor::from_vec(mask, n, dev)?.to_dtype(logits.dtype())?;
    let logp = log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let nll = (picked.neg()? * &mask)?;
    Ok((nll, mask))
}

/// Next-token NLL per position: logits[:, t] predict labels[:, t+1]. Returns (nll [B, T−1] with
/// zeros where the label is −100, mask [B, T−1]). On CPU f32 this is one fused op over the
/// unshifted logits (no shifted copy, no log-softmax intermediates of vocabulary size).
pub fn shifted_token_nll(
    logits: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, v) = logits.dims3()?;
    if fusable(logits) {
        let lab = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        // row b·T + i is scored against labels[b][i + 1]; the last position of each row has none
        let shifted: Vec<i64> = lab
            .iter()
            .flat_map(|row| (0..t).map(move |i| if i + 1 < t { row[i + 1] } else { -100 }))
            .collect();
        let mask: Vec<f32> = shifted
            .iter()
            .map(|&l| if l < 0 { 0.0 } else { 1.0 })
            .collect();
        let flat = logits.contiguous()?.reshape((b * t, v))?;
        let nll = flat
            .apply_op1(FusedNll { labels: shifted })?
            .reshape((b, t))?
            .narrow(1, 0, t - 1)?;
        let mask = Tensor::from_vec(mask, (b, t), logits.device())?.narrow(1, 0, t - 1)?;
        return Ok((nll, mask));
    }
    let shift_logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let shift_labels = labels.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?;
    let (nll, mask) = token_nll(&shift_logits, &shift_labels)?;
    Ok((nll.reshape((b, t - 1))?, mask.reshape((b, t - 1))?))
}

/// −log softmax(z)[label] per row of contiguous f32 logits [N, V]; 0 where label < 0.
/// Backward: g·(softmax(z) − onehot(label)).
struct FusedNll {
    labels: Vec<i64>,
}

impl candle_core::CustomOp1 for FusedNll {
    fn name(&self) -> &'static str {
        "fused-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-nll")?;
        let (n, v) = l.shape().dims2()?;
        if self.labels.len() != n {
            candle_core::bail!("fused-nll: {} labels for {n} rows", self.labels.len());
        }
        use rayon::prelude::*;
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(self.labels.par_iter())
            .map(|(row, &label)| {
                if label < 0 || label as usize >= v {
                    return 0.0;
                }
                let m = row_max(row);
                let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f32>().ln();
                lse - row[label as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let upstream = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad = x.detach().contiguous()?.apply_op1(FusedNllGrad {
            labels: self.labels.clone(),
            upstream,
        })?;
        Ok(Some(grad))
    }
}

/// The gradient of [`FusedNll`] as one pass over the logits: g·(softmax(z) − onehot(label)).
struct FusedNllGrad {
    labels: Vec<i64>,
    upstream: Vec<f32>,
}

impl candle_core::CustomOp1 for FusedNllGrad {
    fn name(&self) -> &'static str {
        "fused-nll-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-nll-grad")?;
        let (_, v) = l.shape().dims2()?;
        let mut out = vec![0f32; x.len()];
        use rayon::prelude::*;
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.labels.par_iter().zip(self.upstream.par_iter()))
            .for_each(|((o, row), (&label, &gi))| {
                if label < 0 || label as usize >= v || gi == 0.0 {
                    return;
                }
                let scale = gi / exp_shifted(o, row);
                for oi in o.iter_mut() {
                    *oi *= scale;
                }
                o[label as usize] -= gi;
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// transformers' causal-LM loss: logits[:, :-1] predict labels[:, 1:], mean over labels ≠ −100.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (nll, mask) = shifted_token_nll(logits, labels)?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count == 0.0 {
        candle_core::bail!("no label positions to compute a loss on");
    }
    nll.sum_all()? / count
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_matches_plain_matmul_and_skips_weight_grad() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12.0, &dev)?
                .reshape((2, 2, 3))?
                .affine(0.1, -0.3)?,
        )?;
        let w = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &dev)?;
        let y = linear(x.as_tensor(), &w)?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let grads = (y.sqr()?.sum_all()?).backward()?;
        assert!(
            grads.get(&w).is_none(),
            "frozen weight must get no gradient"
        );
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        // d/dx sum(y²) = 2·y·W
        let expected = (reference * 2.0)?.broadcast_matmul(&w)?;
        let diff = (gx - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn softmax_and_log_softmax_have_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &dev)?)?;
        let y = softmax_last_dim(x.as_tensor())?;
        let target = Tensor::new(&[[0.0f32, 1.0, 0.0], [1.0, 0.0, 0.0]], &dev)?;
        let loss = (y.clone() * &target)?.sum_all()?;
        let g = loss.backward()?.get(x.as_tensor()).expect("grad").clone();
        // analytic: y ⊙ (t − Σ t⊙y)
        let yt = (y.clone() * &target)?.sum_keepdim(1)?;
        let expected = (y * target.broadcast_sub(&yt)?)?;
        let diff = (g - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let ls = log_softmax_last_dim(x.as_tensor())?.exp()?.sum_keepdim(1)?;
        let diff = (ls - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }
}

// ---- fused CPU kernels with a backward -----------------------------------------------------
//
// candle's fused softmax / RMSNorm kernels drop the gradient; the composed forms above keep it
// but allocate 4–6 full-size intermediates each, all kept alive by the graph. These custom ops
// compute the forward in one pass (f32, contiguous, CPU) and give the analytic backward. Other
// devices and dtypes use the composed forms.

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// The contiguous f32 data of a custom op's input, or an error naming the op.
fn f32_input<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    contiguous_f32(s, l)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: f32 contiguous input expected")))
}

fn row_max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Writes exp(row − max) into `out` and returns its sum (the unnormalised softmax).
fn exp_shifted(out: &mut [f32], row: &[f32]) -> f32 {
    let m = row_max(row);
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(row) {
        let e = (x - m).exp();
        *o = e;
        sum += e;
    }
    sum
}

struct FusedSoftmax;

impl candle_core::CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    /// candle's own row softmax kernel (the one `candle_nn::ops::softmax_last_dim` launches,
    /// one warp per row, f32 accumulation), launched the way candle-nn launches it; that
    /// function has no backward, this op has [`FusedSoftmax::bwd`].
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{kernel_name, kernels, Map1, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        struct RowSoftmax;
        impl Map1 for RowSoftmax {
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &Layout,
            ) -> candle_core::Result<CudaSlice<T>> {
                let src = match layout.contiguous_offsets() {
                    None => candle_core::bail!("fused-softmax: contiguous input expected"),
                    Some((o1, o2)) => src.slice(o1..o2),
                };
                let el = layout.shape().elem_count();
                let n_cols = layout.shape().dims().last().copied().unwrap_or(1).max(1);
                let cfg = LaunchConfig {
                    grid_dim: ((el / n_cols) as u32, 1, 1),
                    block_dim: (1, 32, 1),
                    shared_mem_bytes: 0,
                };
                let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel
                let dst = unsafe { dev.alloc::<T>(el)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                candle_core::builder_arg!(builder, n_cols as i32);
                // SAFETY: the kernel's signature is (src, dst, ncols)
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        use candle_core::backend::BackendStorage;
        let dev = storage.device();
        let slice = RowSoftmax.map(&storage.slice, dev, layout)?;
        let out = candle_core::cuda_backend::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((out, layout.shape().clone()))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-softmax")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        use rayon::prelude::*;
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let inv = 1.0 / exp_shifted(o, row);
                for oi in o.iter_mut() {
                    *oi *= inv;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // ∂x = y ⊙ (g − Σ g⊙y)
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

/// RMSNorm over the last dimension: y = x · rsqrt(mean x² + ε) · (w or 1 + w).
struct FusedRmsNorm {
    eps: f32,
    plus_one: bool,
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s1, l1, "fused-rms-norm")?;
        let w = f32_input(s2, l2, "fused-rms-norm")?;
        let d = w.len();
        if d == 0 || x.len() % d != 0 {
            candle_core::bail!("fused-rms-norm: weight of {d} does not fit the input");
        }
        let mut out = vec![0f32; x.len()];
        use rayon::prelude::*;
        let (eps, plus_one) = (self.eps, self.plus_one);
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((oi, &xi), &wi) in o.iter_mut().zip(row).zip(w) {
                    let scale = if plus_one { 1.0 + wi } else { wi };
                    *oi = xi * r * scale;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)? as f64;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let scale = if self.plus_one { (w + 1.0)? } else { w.clone() };
        let u = g.broadcast_mul(&scale)?;
        // ∂x = r·u − r³·x·Σ(u⊙x)/d
        let ux = ((&u * x)?.sum_keepdim(D::Minus1)? / d)?;
        let gx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * ux)?)?)?;
        let gw = if w.is_variable() || w.track_op() {
            let normed = x.broadcast_mul(&r)?;
            let rows = normed.elem_count() / w.elem_count();
            Some((g * normed)?.reshape((rows, w.elem_count()))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(gx), gw))
    }
}

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Softmax over the last dimension with a backward; fused on CPU f32 and, through candle's
/// kernel, on CUDA f32 (the attention probabilities: one pass instead of five).
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(x) || (x.device().is_cuda() && x.dtype() == DType::F32) {
        x.contiguous()?.apply_op1(FusedSoftmax)
    } else {
        softmax_last_dim(x)
    }
}

/// RMSNorm with a backward; fused on CPU f32, composed elsewhere.
pub fn rms_norm_fused(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    plus_one: bool,
) -> candle_core::Result<Tensor> {
    if fusable(x) && w.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            FusedRmsNorm {
                eps: eps as f32,
                plus_one,
            },
        )
    } else {
        rms_norm(x, w, eps, plus_one)
    }
}

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_softmax_equals_composed_in_value_and_gradient() {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 3, 5, 7), &Device::Cpu).unwrap()))
            .unwrap();
        let t = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                softmax(x.as_tensor()).unwrap()
            } else {
                softmax_last_dim(x.as_tensor()).unwrap()
            };
            let g = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        assert!(maxdiff(&y1, &y2) < 1e-6);
        assert!(maxdiff(&g1, &g2) < 1e-6);
    }

    #[test]
    fn fused_rms_norm_equals_composed_in_value_and_gradients() {
        for plus_one in [false, true] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 16), &Device::Cpu).unwrap())
                .unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap()).unwrap();
            let t = Tensor::randn(0f32, 1.0, (3, 4, 16), &Device::Cpu).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    rms_norm_fused(x.as_tensor(), w.as_tensor(), 1e-6, plus_one).unwrap()
                } else {
                    rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, plus_one).unwrap()
                };
                let g = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    y,
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(w.as_tensor()).unwrap().clone(),
                )
            };
            let (y1, gx1, gw1) = run(true);
            let (y2, gx2, gw2) = run(false);
            assert!(maxdiff(&y1, &y2) < 1e-5, "value");
            assert!(
                maxdiff(&gx1, &gx2) < 1e-4,
                "grad x: {}",
                maxdiff(&gx1, &gx2)
            );
            assert!(maxdiff(&gw1, &gw2) < 1e-4, "grad w");
        }
    }
}

/// RoPE as one pass over a contiguous f32 [B, H, T, D] input. RoPE is a rotation, so the
/// backward is the same op with sin negated.
struct FusedRope {
    /// [B, 1, T, rot/2]
    cos: Tensor,
    sin: Tensor,
}

impl candle_core::CustomOp1 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-rope")?;
        let (_, h, t, d) = l.shape().dims4()?;
        let half = self.cos.dim(D::Minus1)?;
        let cos = self.cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = self.sin.flatten_all()?.to_vec1::<f32>()?;
        let mut out = x.to_vec();
        use rayon::prelude::*;
        // one chunk per (batch, head, position) row of D values
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let bi = row / (h * t);
            let ti = row % t;
            let base = (bi * t + ti) * half;
            for k in 0..half {
                let (c, s_) = (cos[base + k], sin[base + k]);
                let (x1, x2) = (o[k], o[k + half]);
                o[k] = x1 * c - x2 * s_;
                o[k + half] = x2 * c + x1 * s_;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = FusedRope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(g.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(test)]
mod rope_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_rope_equals_composed_in_value_and_gradient_with_partial_rotary() {
        let dev = Device::Cpu;
        for (d, half) in [(16, 8), (16, 2)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, d), &dev).unwrap()).unwrap();
            let ang = Tensor::randn(0f32, 2.0, (2, 1, 5, half), &dev).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            let t = Tensor::randn(0f32, 1.0, (2, 3, 5, d), &dev).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    rope(x.as_tensor(), &cos, &sin).unwrap()
                } else {
                    rope_composed(x.as_tensor(), &cos, &sin).unwrap()
                };
                let g = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (y1, g1) = run(true);
            let (y2, g2) = run(false);
            let md = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(md(&y1, &y2) < 1e-6, "value, d {d} half {half}");
            assert!(md(&g1, &g2) < 1e-6, "gradient, d {d} half {half}");
        }
    }
}

#[cfg(test)]
mod nll_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_shifted_nll_equals_the_composed_form_in_value_and_gradient() {
        let dev = Device::Cpu;
        let logits32 = Tensor::randn(0f32, 3.0, (2, 5, 11), &dev).unwrap();
        let labels =
            Tensor::new(&[[-100i64, 3, 7, -100, 10], [-100, -100, 0, 5, 5]], &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
        // f32 takes the fused path, f64 the composed one
        let run = |dtype: DType| {
            let x = Var::from_tensor(&logits32.to_dtype(dtype).unwrap()).unwrap();
            let (nll, mask) = shifted_token_nll(x.as_tensor(), &labels).unwrap();
            let w = weights.to_dtype(dtype).unwrap();
            let g = (nll.clone() * w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
            (
                nll.to_dtype(DType::F32).unwrap(),
                mask.to_dtype(DType::F32).unwrap(),
                gx,
            )
        };
        let (n1, m1, g1) = run(DType::F32);
        let (n2, m2, g2) = run(DType::F64);
        let md = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(n1.dims(), &[2, 4]);
        assert!(md(&n1, &n2) < 1e-5, "values");
        assert_eq!(md(&m1, &m2), 0.0);
        assert!(md(&g1, &g2) < 1e-5, "gradients");
        // ignored positions contribute nothing
        assert_eq!(n1.to_vec2::<f32>().unwrap()[0][2], 0.0);
    }
}

#[cfg(test)]
mod trainable_weight_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_weight_derived_from_a_variable_gets_its_gradient() {
        let dev = Device::Cpu;
        // stored [in, out] like GPT-2's Conv1D, used as [out, in]
        let stored =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap())
                .unwrap();
        let w = stored.as_tensor().t().unwrap().contiguous().unwrap();
        let x = Tensor::new(&[[1.0f32, -1.0, 0.5]], &dev).unwrap();
        let y = linear(&x, &w).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gs = g
            .get(stored.as_tensor())
            .expect("gradient of the stored weight")
            .to_vec2::<f32>()
            .unwrap();
        // d/dW_stored[i][j] of Σ_j Σ_i x_i W_stored[i][j] = x_i
        assert_eq!(gs, vec![vec![1.0, 1.0], vec![-1.0, -1.0], vec![0.5, 0.5]]);
    }
}
