//! Differentiable building blocks.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` kernels have no
//! backward and silently cut the gradient, so everything on the training path here is either
//! composed from ops that have a backward or a custom op with an explicit `bwd`.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor, D};

use crate::model::config::Activation;
#[cfg(feature = "cuda")]
use crate::model::cuda_kernels::{
    attention as cuda_attention, elementwise as cuda_elementwise, map as cuda_map, nll as cuda_nll,
    rms_norm as cuda_rms_norm, swiglu_packed as cuda_swiglu_packed,
};

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

/// RMSNorm as transformers computes it: n = x · rsqrt(mean(x²) + ε) in f32, then
/// LlamaRMSNorm's `w * n.to(dtype)` (rounded to the model dtype before the product, which is
/// rounded again), or, for `plus_one` (Gemma), n · (1 + w) in f32 rounded once. In f32 the two
/// orders are the same; in bf16 they differ in a quarter of the outputs (tests/rms_norm.rs).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(accum_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    if plus_one {
        let w = (w.to_dtype(accum_dtype(dtype))? + 1.0)?;
        normed.broadcast_mul(&w)?.to_dtype(dtype)
    } else {
        normed.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
    }
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
    let fused =
        (fusable(x) || cuda_fusable(x)) && cos.dtype() == x.dtype() && sin.dtype() == x.dtype();
    if fused && x.rank() == 4 && x.elem_count() > 0 {
        let (b, _, t, d) = x.dims4()?;
        let half = cos.dim(D::Minus1)?;
        if cos.dims() == [b, 1, t, half] && sin.dims() == cos.dims() && 2 * half <= d {
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
/// zeros where the label is −100, mask [B, T−1]). On CPU f32, and on CUDA (src/cuda/nll.cu),
/// this is one fused op over the unshifted logits (no shifted copy, no log-softmax
/// intermediates of vocabulary size).
pub fn shifted_token_nll(
    logits: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, v) = logits.dims3()?;
    if fusable(logits) || cuda_fusable(logits) {
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
        let out = rows_filled(n, 1, |i, o| {
            let label = self.labels[i];
            if label < 0 || label as usize >= v {
                return;
            }
            let row = &x[i * v..(i + 1) * v];
            let m = row_max(row);
            let lse = m + row.iter().map(|z| fast_exp(z - m)).sum::<f32>().ln();
            o[0] = lse - row[label as usize];
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// src/cuda/nll.cu's `nll_fwd`: f32 losses from f32, bf16 or f16 logits.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let (n, _) = layout.shape().dims2()?;
        if self.labels.len() != n {
            candle_core::bail!("fused-nll: {} labels for {n} rows", self.labels.len());
        }
        let dev = storage.device();
        let nll = match &storage.slice {
            S::F32(x) => cuda_nll::forward(x, layout, &self.labels, dev)?,
            S::BF16(x) => cuda_nll::forward(x, layout, &self.labels, dev)?,
            S::F16(x) => cuda_nll::forward(x, layout, &self.labels, dev)?,
            _ => candle_core::bail!("fused-nll: f32, bf16 or f16 logits expected"),
        };
        Ok((cuda_map::wrap(S::F32(nll), dev), Shape::from(n)))
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

    /// src/cuda/nll.cu's `nll_bwd`: the gradient in the logits' dtype.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = layout.shape().dims2()?;
        if self.labels.len() != n || self.upstream.len() != n {
            candle_core::bail!(
                "fused-nll-grad: {} labels and {} gradients for {n} rows",
                self.labels.len(),
                self.upstream.len()
            );
        }
        let backward = cuda_nll::Backward {
            labels: &self.labels,
            upstream: &self.upstream,
        };
        cuda_map::map1(&backward, storage, layout)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-nll-grad")?;
        let (_, v) = l.shape().dims2()?;
        let out = rows_filled(x.len(), v, |i, o| {
            let (label, gi) = (self.labels[i], self.upstream[i]);
            if label < 0 || label as usize >= v || gi == 0.0 {
                return;
            }
            let scale = gi / exp_shifted(o, &x[i * v..(i + 1) * v]);
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

/// A new `len`-long buffer whose `row_len`-long rows (the last may be shorter) are each zeroed
/// and then handed to `f(i, row)`, in parallel on candle's own CPU pool.
///
/// Each row is zeroed by the thread that fills it, just before: a `vec![0.0; len]` first would
/// zero the whole buffer on the calling thread while the pool's other threads wait (about 4% of
/// a LoRA step on 2 cores, for megabyte-sized outputs), and the rows are then written a second
/// time out of cache.
///
/// Not rayon: candle's element-wise ops run on its barrier pool, whose helper threads spin for a
/// while after each op; work handed to rayon's separate pool then competes with those spinning
/// threads for the cores (on a 2-core machine the fused SwiGLU was slower than the composed ops
/// it replaces until it moved here).
fn rows_filled(len: usize, row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    struct Base(*mut f32);
    // SAFETY: every row index is handed to exactly one closure call, so the rows written
    // through the pointer are disjoint, and `out` outlives `execute_chunked`.
    unsafe impl Sync for Base {}
    let row_len = row_len.max(1);
    let mut out = Vec::<f32>::with_capacity(len);
    let base = Base(out.as_mut_ptr());
    let base = &base;
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(row_len), |rows| {
        for i in rows {
            let start = i * row_len;
            let n = row_len.min(len - start);
            // SAFETY: see `Base`; start + n ≤ len ≤ the capacity, and the row is initialised
            // (zeroed) before a slice is made of it.
            let row = unsafe {
                base.0.add(start).write_bytes(0, n);
                std::slice::from_raw_parts_mut(base.0.add(start), n)
            };
            f(i, row);
        }
    });
    // SAFETY: the rows cover 0..len and each was initialised above (a panic in `f` propagates
    // out of `execute_chunked` before this, dropping `out` with length 0).
    unsafe { out.set_len(len) };
    out
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// The contiguous f32 data of a custom op's input, or an error naming the op.
pub(crate) fn f32_input<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    contiguous_f32(s, l)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: f32 contiguous input expected")))
}

/// e^x in f32 within 2 ulp of `f32::exp` (Cephes' expf: x = n·ln 2 + r, a degree-6 polynomial
/// in r, times 2^n), with no branches and no libm call, so that loops over slices vectorize.
/// `f32::exp` is a scalar libm call: the fused softmax, SwiGLU and NLL spent most of their time
/// in it. Below −87.3 it gives 0 (so does `f32::exp`, nearly: subnormals are flushed), above
/// 88.7 +∞, and NaN stays NaN.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer with plain SSE2 adds
    const ROUND: f32 = 12_582_912.0;
    const MIN: f32 = -87.336_54;
    const MAX: f32 = 88.722_84;
    let xc = x.clamp(MIN, MAX);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ for n in [−126, 128] as two normal powers of two (2¹²⁸ alone is not a finite f32)
    let n = n as i32;
    let half = n >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    let y = p * pow2(half) * pow2(n - half);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else {
        y
    }
}

fn row_max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Writes exp(row − max) into `out` and returns its sum (the unnormalised softmax).
fn exp_shifted(out: &mut [f32], row: &[f32]) -> f32 {
    let m = row_max(row);
    // two loops: the first vectorizes, the sum keeps its sequential order
    for (o, &x) in out.iter_mut().zip(row) {
        *o = fast_exp(x - m);
    }
    out.iter().sum()
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
                // candle's kernel indexes with a 32-bit int
                if el > i32::MAX as usize {
                    candle_core::bail!("fused-softmax: {el} values exceed the kernel's int index");
                }
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
        cuda_map::map1(&RowSoftmax, storage, layout)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-softmax")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = rows_filled(x.len(), d, |i, o| {
            let inv = 1.0 / exp_shifted(o, &x[i * d..(i + 1) * d]);
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

/// RMSNorm over the last dimension: y = x · rsqrt(mean x² + ε) · (w or 1 + w), rounded on
/// CUDA as transformers rounds in the model dtype (src/cuda/rms_norm.cu, see [`rms_norm`]).
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
        let (eps, plus_one) = (self.eps, self.plus_one);
        let out = rows_filled(x.len(), d, |i, o| {
            let row = &x[i * d..(i + 1) * d];
            let r = inv_rms(row, eps);
            for ((oi, &xi), &wi) in o.iter_mut().zip(row).zip(w) {
                let scale = if plus_one { 1.0 + wi } else { wi };
                *oi = xi * r * scale;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = cuda_rms_norm::Kernel {
            root: "rms_norm",
            eps: self.eps,
            plus_one: self.plus_one,
        };
        cuda_map::map2(&kernel, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d, eps) = (x.dim(D::Minus1)? as f64, self.eps as f64);
        let r = || (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip();
        let scale = || {
            if self.plus_one {
                w + 1.0
            } else {
                Ok(w.clone())
            }
        };
        let gx = if x.device().is_cpu() {
            // ∂x = r·u − r³·x·Σ(u⊙x)/d, u = g ⊙ scale (composed: a fused form measured no
            // faster on the CPU, where the norms are a small part of the step)
            let (r, u) = (r()?, g.broadcast_mul(&scale()?)?);
            let ux = ((&u * x)?.sum_keepdim(D::Minus1)? / d)?;
            (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * ux)?)?)?
        } else {
            let grad = RmsNormGrad {
                eps: self.eps,
                plus_one: self.plus_one,
            };
            x.apply_op3_no_bwd(w, &g.contiguous()?, &grad)?
        };
        let gw = if w.is_variable() || w.track_op() {
            // `rms_norm_fused` sends a trainable weight on CUDA to the composed form
            if !x.device().is_cpu() {
                candle_core::bail!(
                    "internal: fused-rms-norm reached with a trainable weight on CUDA \
                     (rms_norm_fused composes it)"
                );
            }
            let normed = x.broadcast_mul(&r()?)?;
            let rows = normed.elem_count() / w.elem_count();
            Some((g * normed)?.reshape((rows, w.elem_count()))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(gx), gw))
    }
}

/// 1 / sqrt(mean x² + ε) of a row, as the composed form computes it.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// ∂x of [`FusedRmsNorm`] on CUDA from (x, w, ∂y): r·u − r³·x·Σ(u⊙x)/d with u = ∂y ⊙ (w or
/// 1 + w), in half types rounded as transformers' backward rounds it; one pass per row where
/// the composed form is about ten over the whole tensor.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RmsNormGrad {
    eps: f32,
    plus_one: bool,
}

impl candle_core::CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-rms-norm-grad: CUDA only (the CPU uses the composed form)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = cuda_rms_norm::Kernel {
            root: "rms_norm_bwd",
            eps: self.eps,
            plus_one: self.plus_one,
        };
        cuda_map::map3(&kernel, s1, l1, s2, l2, s3, l3)
    }
}

/// The CPU storage in a [`Storage`]: for a custom op that reads tensors of its own (a frozen
/// weight, a mask) besides its inputs.
pub(crate) fn cpu_storage(storage: &Storage) -> Option<&CpuStorage> {
    match storage {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

/// A custom op's own tensor's storage (`storage`, a frozen weight or a mask the op holds) on
/// the input's backend `S`, which `pick` takes out of a [`Storage`]; an error naming the op and
/// the tensor when it is on another device.
pub(crate) fn held_storage<'a, S>(
    storage: &'a Storage,
    pick: fn(&'a Storage) -> Option<&'a S>,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a S> {
    pick(storage).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: the {what} is on {:?}, not on the input's device",
            storage.device().location()
        ))
    })
}

/// The CUDA storage in a [`Storage`], as [`cpu_storage`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_storage(storage: &Storage) -> Option<&candle_core::CudaStorage> {
    match storage {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether the CUDA kernels of src/cuda/ (attention softmax, RMSNorm, RoPE, SwiGLU, next-token
/// loss) and the one-node ops (the LoRA linear, attention) take `x`: a CUDA tensor in f32, bf16
/// or f16, unless `UNLEARN_CUDA_FUSED=0` asks for the composed forms (to compare speed, or to
/// tell a fault of ours from anything else).
pub(crate) fn cuda_fusable(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && cuda_kernels_on()
}

/// `UNLEARN_CUDA_FUSED` read once per process: `cuda_fusable` runs for every layer's ops.
fn cuda_kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNLEARN_CUDA_FUSED").map_or(true, |v| v != "0"))
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

/// RMSNorm with a backward; fused on CPU f32 and on CUDA (src/cuda/rms_norm.cu, see
/// `cuda_fusable`), composed elsewhere.
pub fn rms_norm_fused(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    plus_one: bool,
) -> candle_core::Result<Tensor> {
    let op = FusedRmsNorm {
        eps: eps as f32,
        plus_one,
    };
    // the fused ops read w as one row of x's last dimension; anything else broadcasts (or
    // fails) in the composed form
    let fits = w.rank() == 1 && x.rank() > 0 && x.dim(D::Minus1)? == w.dim(0)?;
    if fusable(x) && w.dtype() == DType::F32 && fits {
        return x.contiguous()?.apply_op2(&w.contiguous()?, op);
    }
    // the CUDA backward gives ∂x only: a trainable norm weight takes the composed form there
    let frozen = !(w.is_variable() || w.track_op());
    if cuda_fusable(x) && w.dtype() == x.dtype() && frozen && fits && x.elem_count() > 0 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, op);
    }
    rms_norm(x, w, eps, plus_one)
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

    #[test]
    fn fused_swiglu_equals_composed_in_value_and_gradients() {
        let dev = Device::Cpu;
        // wide enough for several parallel chunks, with saturated sigmoids at both ends
        let shape = (3, 5, 1000);
        let gate = Var::from_tensor(&Tensor::randn(0f32, 6.0, shape, &dev).unwrap()).unwrap();
        let up = Var::from_tensor(&Tensor::randn(0f32, 2.0, shape, &dev).unwrap()).unwrap();
        let t = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                gated_activation(gate.as_tensor(), up.as_tensor(), Activation::Silu).unwrap()
            } else {
                (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap()
            };
            let grads = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
            (
                y,
                grads.get(gate.as_tensor()).unwrap().clone(),
                grads.get(up.as_tensor()).unwrap().clone(),
            )
        };
        let (y1, dg1, du1) = run(true);
        let (y2, dg2, du2) = run(false);
        // fast_exp is within 2 ulp of libm's exp, so all three agree to a few f32 ulp
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let scale = maxdiff(b, &b.zeros_like().unwrap());
            let diff = maxdiff(a, b);
            assert!(
                diff <= 1e-6 * scale,
                "{what}: {diff} against a scale of {scale}"
            );
        };
        close(&y1, &y2, "value");
        close(&dg1, &dg2, "gate grad");
        close(&du1, &du2, "up grad");
        // a non-SiLU activation keeps the composed form
        let gelu = gated_activation(gate.as_tensor(), up.as_tensor(), Activation::Gelu).unwrap();
        let expect = (gate.as_tensor().gelu_erf().unwrap() * up.as_tensor()).unwrap();
        assert_eq!(maxdiff(&gelu, &expect), 0.0);
    }

    #[test]
    fn packed_swiglu_equals_the_narrowed_halves_bit_for_bit() {
        let dev = Device::Cpu;
        let inter = 1000;
        let y =
            Var::from_tensor(&Tensor::randn(0f32, 4.0, (3, 5, 2 * inter), &dev).unwrap()).unwrap();
        let t = Tensor::randn(0f32, 1.0, (3, 5, inter), &dev).unwrap();
        let run = |packed: bool| {
            let y = y.as_tensor();
            let h = if packed {
                packed_gated_activation(y, inter, Activation::Silu).unwrap()
            } else {
                let gate = y.narrow(D::Minus1, 0, inter).unwrap();
                let up = y.narrow(D::Minus1, inter, inter).unwrap();
                gated_activation(&gate, &up, Activation::Silu).unwrap()
            };
            let grads = (&h * &t).unwrap().sum_all().unwrap().backward().unwrap();
            (h, grads.get(y).unwrap().clone())
        };
        let (h1, dy1) = run(true);
        let (h2, dy2) = run(false);
        assert_eq!(h1.dims(), [3, 5, inter]);
        assert_eq!(dy1.dims(), [3, 5, 2 * inter]);
        // the same per-element formulas: equal to the last bit, the gradient's halves included
        assert_eq!(maxdiff(&h1, &h2), 0.0);
        assert_eq!(maxdiff(&dy1, &dy2), 0.0);
        // a projection of the wrong width is an error naming both sizes
        let err = packed_gated_activation(y.as_tensor(), inter + 1, Activation::Silu).unwrap_err();
        assert!(err.to_string().contains("2000, not 2 × 1001"), "{err}");
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

    /// src/cuda/rope.cu, rounding in the model dtype as transformers does.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::model::cuda_kernels::rope::forward(storage, layout, &self.cos, &self.sin)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "fused-rope")?;
        let (_, h, t, d) = l.shape().dims4()?;
        let half = self.cos.dim(D::Minus1)?;
        let cos = self.cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = self.sin.flatten_all()?.to_vec1::<f32>()?;
        // one chunk per (batch, head, position) row of D values
        let out = rows_filled(x.len(), d, |row, o| {
            o.copy_from_slice(&x[row * d..row * d + o.len()]);
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

// ---- fused SwiGLU: silu(gate) ⊙ up ------------------------------------------------------------
//
// Composed, the gated MLP's activation is two passes forward and about eleven backward (candle's
// silu rule builds the sigmoid from neg, exp, +1 and recip, then its derivative from four more
// ops); on the CPU bench shape that was an eighth of the main thread. Fused, it is one pass
// forward and two backward (one per input), each recomputing the sigmoid.

/// silu(x) as candle computes it, x / (1 + e^−x), with [`fast_exp`].
fn silu_f32(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// ∂/∂gate of silu(gate) ⊙ up for the output gradient g: g ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ)).
fn silu_gate_grad_f32(gate: f32, up: f32, g: f32) -> f32 {
    let sigmoid = 1.0 / (1.0 + fast_exp(-gate));
    g * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
}

/// Applies `f` element-wise to equally long contiguous f32 inputs, in parallel chunks (callers
/// check the lengths: see [`same_shape_f32`]).
fn zip_map<const N: usize>(inputs: [&[f32]; N], f: impl Fn([f32; N]) -> f32 + Sync) -> Vec<f32> {
    const CHUNK: usize = 4096;
    let n = inputs[0].len();
    let out = rows_filled(n, CHUNK, |c, o| {
        let start = c * CHUNK;
        let chunk = inputs.map(|v| &v[start..start + o.len()]);
        for (i, oi) in o.iter_mut().enumerate() {
            *oi = f(chunk.map(|v| v[i]));
        }
    });
    out
}

/// Checks that a fused op's inputs are contiguous f32 of one shape, and returns their data.
fn same_shape_f32<'a, const N: usize>(
    inputs: [(&'a CpuStorage, &Layout); N],
    op: &str,
) -> candle_core::Result<[&'a [f32]; N]> {
    let shape = inputs[0].1.shape();
    let mut out = [&[][..]; N];
    for (slot, (s, l)) in out.iter_mut().zip(inputs) {
        if l.shape() != shape {
            candle_core::bail!("{op}: inputs of shapes {shape:?} and {:?}", l.shape());
        }
        *slot = f32_input(s, l, op)?;
    }
    Ok(out)
}

/// silu(gate) ⊙ up.
struct FusedSwiglu;

impl CustomOp2 for FusedSwiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = same_shape_f32([(s1, l1), (s2, l2)], self.name())?;
        let out = zip_map(inputs, |[gate, up]| silu_f32(gate) * up);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_map::map2(&cuda_elementwise::Kernel("swiglu"), s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &g, &SwigluGateGrad)?;
        let d_up = gate.apply_op2_no_bwd(&g, &SwigluUpGrad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// ∂/∂gate of silu(gate) ⊙ up: g ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ(gate))).
struct SwigluGateGrad;

impl candle_core::CustomOp3 for SwigluGateGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = same_shape_f32([(s1, l1), (s2, l2), (s3, l3)], self.name())?;
        let out = zip_map(inputs, |[gate, up, g]| silu_gate_grad_f32(gate, up, g));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_map::map3(
            &cuda_elementwise::Kernel("swiglu_gate_grad"),
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
        )
    }
}

/// ∂/∂up of silu(gate) ⊙ up: g ⊙ silu(gate).
struct SwigluUpGrad;

impl CustomOp2 for SwigluUpGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-up-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = same_shape_f32([(s1, l1), (s2, l2)], self.name())?;
        let out = zip_map(inputs, |[gate, g]| silu_f32(gate) * g);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_map::map2(&cuda_elementwise::Kernel("swiglu_up_grad"), s1, l1, s2, l2)
    }
}

/// `act(gate) ⊙ up`, the gated MLP's hidden activation; fused for SiLU on CPU f32 and on CUDA
/// (src/cuda/swiglu.cu, see `cuda_fusable`), composed elsewhere.
pub fn gated_activation(
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let fused = (fusable(gate) && fusable(up))
        || (cuda_fusable(gate) && up.dtype() == gate.dtype() && gate.elem_count() > 0);
    if act == Activation::Silu && fused && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, FusedSwiglu)
    } else {
        activation(gate, act)? * up
    }
}

/// `act(gate) ⊙ up` for a packed projection y [.., 2·inter] whose rows hold [gate | up] (Phi-3's
/// `gate_up_proj`). Fused for SiLU on CPU f32 and on CUDA, reading both halves in place; the
/// backward writes ∂y whole. Composed, the two halves are narrowed and copied, and each
/// narrow's backward pads a full-size zero tensor before the two are added.
pub fn packed_gated_activation(
    y: &Tensor,
    inter: usize,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let last = y.dim(D::Minus1)?;
    if last != 2 * inter {
        candle_core::bail!("packed gate/up projection: last dimension {last}, not 2 × {inter}");
    }
    let fused = act == Activation::Silu
        && inter > 0
        && y.elem_count() > 0
        && (fusable(y) || cuda_fusable(y));
    if fused {
        return y.contiguous()?.apply_op1(FusedSwigluPacked { inter });
    }
    gated_activation(
        &y.narrow(D::Minus1, 0, inter)?,
        &y.narrow(D::Minus1, inter, inter)?,
        act,
    )
}

/// silu(gate) ⊙ up over y [.., 2·inter] = [gate | up] (see [`packed_gated_activation`]).
struct FusedSwigluPacked {
    inter: usize,
}

impl FusedSwigluPacked {
    /// y's shape with the last dimension halved.
    fn out_shape(&self, y: &Layout) -> Shape {
        let mut dims = y.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.inter;
        }
        Shape::from(dims)
    }
}

impl candle_core::CustomOp1 for FusedSwigluPacked {
    fn name(&self) -> &'static str {
        "fused-swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_input(s, l, self.name())?;
        let inter = self.inter;
        if inter == 0 || l.dims().last() != Some(&(2 * inter)) {
            candle_core::bail!(
                "{}: y {:?} is not [.., 2 × {inter}]",
                self.name(),
                l.shape()
            );
        }
        let out = rows_filled(y.len() / 2, inter, |r, o| {
            let (gate, up) = y[2 * r * inter..2 * (r + 1) * inter].split_at(inter);
            for ((oi, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *oi = silu_f32(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), self.out_shape(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::Map1;
        let kernel = cuda_swiglu_packed::Kernel {
            root: "swiglu_packed",
            inter: self.inter,
        };
        let slice = kernel.map(&s.slice, s.device(), l)?;
        Ok((cuda_map::wrap(slice, s.device()), self.out_shape(l)))
    }

    fn bwd(&self, y: &Tensor, _out: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = SwigluPackedGrad { inter: self.inter };
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &grad)?))
    }
}

/// ∂y of [`FusedSwigluPacked`] from (y, ∂out): [∂gate | ∂up] in each row, as [`SwigluGateGrad`]
/// and [`SwigluUpGrad`] compute them.
struct SwigluPackedGrad {
    inter: usize,
}

impl CustomOp2 for SwigluPackedGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-packed-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_input(s1, l1, self.name())?;
        let g = f32_input(s2, l2, self.name())?;
        let inter = self.inter;
        if inter == 0 || l1.dims().last() != Some(&(2 * inter)) || 2 * g.len() != y.len() {
            candle_core::bail!(
                "{}: gradient {:?} for y {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let out = rows_filled(y.len(), 2 * inter, |r, o| {
            let (gate, up) = y[2 * r * inter..2 * (r + 1) * inter].split_at(inter);
            let grad = &g[r * inter..(r + 1) * inter];
            let (d_gate, d_up) = o.split_at_mut(inter);
            for j in 0..inter {
                d_gate[j] = silu_gate_grad_f32(gate[j], up[j], grad[j]);
                d_up[j] = silu_f32(gate[j]) * grad[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = cuda_swiglu_packed::Kernel {
            root: "swiglu_packed_bwd",
            inter: self.inter,
        };
        cuda_map::map2(&kernel, s1, l1, s2, l2)
    }
}

// ---- checks ----------------------------------------------------------------------------------

/// Σ of `per_tensor(t)` (a scalar tensor each, in its own dtype) over `tensors`, added in f64
/// on the device and read back once: one synchronisation on a GPU, not one per tensor.
pub fn sum_over(
    tensors: &[Tensor],
    per_tensor: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let sums = tensors
        .iter()
        .map(|t| per_tensor(t)?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()
}

/// Whether every element of `tensors` is finite: 0·x is 0 for a finite x and NaN for ±inf and
/// NaN, and a sum keeps a NaN.
pub fn all_finite(tensors: &[Tensor]) -> candle_core::Result<bool> {
    Ok(sum_over(tensors, |t| (t * 0.0)?.sum_all())? == 0.0)
}

// ---- a tensor and a scalar, rounded as PyTorch rounds them ------------------------------------

/// `x · s` as PyTorch computes a tensor times a Python float: in f32 for half-precision `x`,
/// rounded once to its dtype. candle's scalar product rounds `s` itself to the dtype first,
/// which in bf16 moves a scale of 1/√128 by 2e-4 and 1/√37 by 2e-3.
pub fn mul_scalar(x: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => (x.to_dtype(DType::F32)? * s)?.to_dtype(x.dtype()),
        _ => x * s,
    }
}

/// `x / s` as PyTorch computes it: a division (candle's `x / s` multiplies by 1/s), in f32 for
/// half-precision `x`, rounded once to its dtype.
pub fn div_scalar(x: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let wide = match dtype {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let divisor = Tensor::new(s, x.device())?.to_dtype(wide.dtype())?;
    wide.broadcast_div(&divisor)?.to_dtype(dtype)
}

/// Gemma 2's soft cap, `cap · tanh(x / cap)`, each step rounded as transformers rounds it.
///
/// One op each way ([`SoftCap`]) on CPU f32 and on CUDA, where the composed form keeps the
/// quotient and the tanh besides x until the backward is over and makes five more passes
/// backward: on the final logits, [tokens, vocab] tensors of 4 GB each for Gemma 2's 256k
/// vocabulary at 8 × 512 tokens. The values and gradient are the composed form's (bit for bit on
/// the CPU; the CUDA kernels round each step as the composed ops do).
pub fn softcap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    if fusable(x) || cuda_fusable(x) {
        return x.contiguous()?.apply_op1(SoftCap { cap: cap as f32 });
    }
    composed_softcap(x, cap)
}

/// The soft cap as candle ops: a division, tanh, a product.
pub fn composed_softcap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    mul_scalar(&div_scalar(x, cap)?.tanh()?, cap)
}

/// `cap · tanh(x / cap)` in f32, rounded as the composed ops round it: the quotient, its tanh,
/// and the product (candle's affine, `t · cap + 0`).
#[inline(always)]
fn softcap_f32(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap + 0.0
}

/// ∂x of the soft cap for the output gradient g, as candle's backward of the composed ops
/// computes it: the product's `g · cap + 0`, tanh's `−(g_t · (t·t · 1 − 1))` and the
/// division's `/ cap`, with t = tanh(x / cap) recomputed.
#[inline(always)]
fn softcap_grad_f32(x: f32, g: f32, cap: f32) -> f32 {
    let t = (x / cap).tanh();
    let g_t = g * cap + 0.0;
    -(g_t * (t * t * 1.0 + -1.0)) / cap
}

/// `cap · tanh(x / cap)` over a contiguous x; keeps only x, recomputes tanh in the backward.
struct SoftCap {
    cap: f32,
}

impl candle_core::CustomOp1 for SoftCap {
    fn name(&self) -> &'static str {
        "softcap"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, self.name())?;
        let cap = self.cap;
        let out = zip_map([x], |[x]| softcap_f32(x, cap));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = crate::model::cuda_kernels::softcap::Kernel { cap: self.cap };
        cuda_map::map1(&kernel, s, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = SoftCapGrad { cap: self.cap };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// ∂x of [`SoftCap`] from x and the output gradient.
struct SoftCapGrad {
    cap: f32,
}

impl CustomOp2 for SoftCapGrad {
    fn name(&self) -> &'static str {
        "softcap-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = same_shape_f32([(s1, l1), (s2, l2)], self.name())?;
        let cap = self.cap;
        let out = zip_map(inputs, |[x, g]| softcap_grad_f32(x, g, cap));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = crate::model::cuda_kernels::softcap::Kernel { cap: self.cap };
        cuda_map::map2(&kernel, s1, l1, s2, l2)
    }
}

// ---- attention softmax: softmax(scores · scale + mask) --------------------------------------

/// The attention probabilities `softmax(scores · scale + mask)` over the last dimension,
/// computed in f32 (f64 for f64 models) and returned in the scores' dtype, as transformers'
/// eager attention does: `matmul(q, kᵀ) * scaling`, then `+ mask`, each rounded in the model
/// dtype, then `softmax(dtype=float32)`. `scores` is the unscaled q·kᵀ [B, H, T, C], `mask` the
/// additive [B, 1, T, C].
///
/// On the CPU in f32 and on CUDA this is one op forward and one backward ([`MaskedSoftmax`])
/// instead of the composed product, add, casts and softmax, each a full pass over the
/// [B, H, T, C] scores; elsewhere (CPU half types, f64) the composed form.
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: &Tensor) -> candle_core::Result<Tensor> {
    if masked_softmax_fusable(scores, mask) {
        let op = MaskedSoftmax {
            scale: scale as f32,
        };
        return scores.contiguous()?.apply_op2(&mask.contiguous()?, op);
    }
    let dtype = scores.dtype();
    let scaled = if scale == 1.0 {
        scores.clone()
    } else {
        mul_scalar(scores, scale)?
    };
    softmax(&scaled.broadcast_add(mask)?.to_dtype(accum_dtype(dtype))?)?.to_dtype(dtype)
}

/// Whether [`MaskedSoftmax`] takes these scores and mask: f32 on the CPU, or what the CUDA
/// kernels take (`cuda_fusable`), with a mask of the scores' dtype and shape [B, 1, T, C].
pub(crate) fn masked_softmax_fusable(scores: &Tensor, mask: &Tensor) -> bool {
    (fusable(scores) || cuda_fusable(scores))
        && mask.dtype() == scores.dtype()
        && mask.device().same_device(scores.device())
        && crate::model::launch::attention(scores.dims(), mask.dims(), 1.0).is_ok()
}

/// softmax(scores · scale + mask) as one op each way: one pass over the [B, H, T, C] scores
/// forward and one backward, where the composed form makes about a dozen, each a fresh
/// scores-sized buffer that candle's graph keeps until the backward is over (the scaled
/// scores, the masked scores, the cast: 64 MB each per layer at 8×8 heads of 512 tokens). On
/// the CPU in f32; on CUDA src/cuda/attention.cu, rounded as transformers' eager attention
/// rounds in half types.
pub(crate) struct MaskedSoftmax {
    pub(crate) scale: f32,
}

/// Row `row` of contiguous scores [B, H, T, C] is (b, h, i) with row = (b·H + h)·T + i; its
/// mask row in the contiguous [B, 1, T, C] mask is b·T + i (as attention.cu's `mask_row`).
fn mask_row(row: usize, heads: usize, t_q: usize) -> usize {
    (row / (heads * t_q)) * t_q + row % t_q
}

/// The (heads, t_q, cols) of scores [B, H, T, C] whose mask is [B, 1, T, C].
fn attention_dims(scores: &Layout, mask: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    crate::model::launch::attention(scores.dims(), mask.dims(), 1.0)?;
    let &[_, heads, t_q, cols] = scores.dims() else {
        candle_core::bail!(
            "masked-softmax: scores {:?} are not [B, H, T, C]",
            scores.dims()
        );
    };
    Ok((heads, t_q, cols))
}

/// Writes softmax(scores · scale + mask) of one row into `out`, as the composed form computes
/// it in f32: the product, then the mask added, then [`FusedSoftmax`]'s max, exp and sum.
fn masked_softmax_row(out: &mut [f32], scores: &[f32], mask: &[f32], scale: f32) {
    for ((o, &s), &m) in out.iter_mut().zip(scores).zip(mask) {
        *o = s * scale + m;
    }
    let max = row_max(out);
    for o in out.iter_mut() {
        *o = fast_exp(*o - max);
    }
    let inv = 1.0 / out.iter().sum::<f32>();
    for o in out.iter_mut() {
        *o *= inv;
    }
}

impl MaskedSoftmax {
    /// The probabilities of f32 scores [B, H, T, C] and mask [B, 1, T, C] on the CPU.
    pub(crate) fn cpu(
        &self,
        scores: &CpuStorage,
        scores_l: &Layout,
        mask: &CpuStorage,
        mask_l: &Layout,
    ) -> candle_core::Result<CpuStorage> {
        let (heads, t_q, cols) = attention_dims(scores_l, mask_l)?;
        let scores = f32_input(scores, scores_l, "masked-softmax scores")?;
        let mask = f32_input(mask, mask_l, "masked-softmax mask")?;
        let out = rows_filled(scores.len(), cols, |row, o| {
            let m = mask_row(row, heads, t_q) * cols;
            let s = &scores[row * cols..(row + 1) * cols];
            masked_softmax_row(o, s, &mask[m..m + cols], self.scale);
        });
        Ok(CpuStorage::F32(out))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.cpu(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_attention::forward(s1, l1, s2, l2, self.scale)
    }

    fn bwd(
        &self,
        scores: &Tensor,
        mask: &Tensor,
        _probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = MaskedSoftmaxGrad { scale: self.scale };
        let d_scores = scores.apply_op3_no_bwd(mask, &grad.contiguous()?, &op)?;
        // the mask is a constant of the batch, never trained
        Ok((Some(d_scores), None))
    }
}

/// ∂scores of [`MaskedSoftmax`]: scale · p ⊙ (g − Σ g⊙p), with p recomputed in f32 from the
/// scores and the mask (on the CPU the same bits as the forward's; in half types on CUDA not
/// the rounded probabilities, as transformers' f32 softmax backward has it).
pub(crate) struct MaskedSoftmaxGrad {
    pub(crate) scale: f32,
}

impl candle_core::CustomOp3 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (heads, t_q, cols) = attention_dims(l1, l2)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!(
                "masked-softmax backward: gradient {:?} for scores {:?}",
                l3.shape(),
                l1.shape()
            );
        }
        let scores = f32_input(s1, l1, "masked-softmax scores")?;
        let mask = f32_input(s2, l2, "masked-softmax mask")?;
        let grad = f32_input(s3, l3, "masked-softmax gradient")?;
        let out = rows_filled(scores.len(), cols, |row, d| {
            let m = mask_row(row, heads, t_q) * cols;
            let span = row * cols..(row + 1) * cols;
            // the probabilities go into `d` first, then their gradient over them
            masked_softmax_row(d, &scores[span.clone()], &mask[m..m + cols], self.scale);
            let g = &grad[span];
            let dot: f32 = d.iter().zip(g).map(|(p, g)| p * g).sum();
            for (d, &g) in d.iter_mut().zip(g) {
                *d = *d * (g - dot) * self.scale;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_attention::backward(s1, l1, s2, l2, s3, l3, self.scale)
    }
}

#[cfg(test)]
mod masked_softmax_tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// Scores [B, H, T, C], a causal mask over a cache of C − T keys in which batch row 1's
    /// first query sees no key at all, and a gradient of the probabilities.
    fn case(b: usize, h: usize, t: usize, c: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let mut uniform = |n: usize, scale: f64| -> Vec<f32> {
            (0..n)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * scale) as f32)
                .collect()
        };
        let scores = Tensor::from_vec(uniform(b * h * t * c, 40.0), (b, h, t, c), &Device::Cpu);
        let grad = Tensor::from_vec(uniform(b * h * t * c, 1.0), (b, h, t, c), &Device::Cpu);
        let (mask, _) = crate::model::attention::tests::mask_and_keep(b, t, c);
        (scores.unwrap(), mask, grad.unwrap())
    }

    /// The composed form the op replaces: transformers' eager `q·kᵀ · scaling + mask`, then the
    /// softmax.
    fn composed(scores: &Tensor, scale: f64, mask: &Tensor) -> Tensor {
        softmax(
            &mul_scalar(scores, scale)
                .unwrap()
                .broadcast_add(mask)
                .unwrap(),
        )
        .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The fused CPU op gives the composed form's probabilities bit for bit, and its gradient
    /// within the rounding of the row sum Σ g⊙p (candle sums in SIMD lanes, the op in order);
    /// a query that sees no key gets the uniform average, as eager attention gives it.
    #[test]
    fn cpu_masked_softmax_equals_the_composed_form() {
        for (i, [b, h, t, c]) in [[2, 3, 5, 37], [3, 2, 7, 7], [2, 1, 3, 70]]
            .into_iter()
            .enumerate()
        {
            let scale = [0.125, 0.164_398_987_305_357_2][i % 2];
            let (scores, mask, grad) = case(b, h, t, c, i as u64 + 1);
            assert!(masked_softmax_fusable(&scores, &mask));
            let var = Var::from_tensor(&scores).unwrap();
            let fused = masked_softmax(var.as_tensor(), scale, &mask).unwrap();
            let reference = composed(var.as_tensor(), scale, &mask);
            let (got, want) = (values(&fused), values(&reference));
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "[{b}, {h}, {t}, {c}]: probabilities differ"
            );
            let masked_row = &got[(h * t) * c..(h * t + 1) * c];
            assert!(
                masked_row.iter().all(|&p| p == 1.0 / c as f32),
                "{masked_row:?}"
            );
            let grad_of = |probs: &Tensor| {
                let loss = (probs * &grad).unwrap().sum_all().unwrap();
                values(loss.backward().unwrap().get(var.as_tensor()).unwrap())
            };
            let (got, want) = (grad_of(&fused), grad_of(&reference));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            // g − Σ g⊙p cancels: each side's f32 error is about ε·|g| absolute, times the scale
            assert!(
                worst < 2e-7,
                "[{b}, {h}, {t}, {c}]: gradient off by {worst}"
            );
            assert!(got.iter().any(|&d| d.abs() > 1e-3), "vanishing gradient");
        }
    }

    /// Shapes the op does not cover take the composed form: no mask broadcast over heads, a
    /// mask of another dtype, half types on the CPU.
    #[test]
    fn masked_softmax_composes_what_the_op_does_not_cover() {
        let (scores, mask, _) = case(2, 2, 3, 3, 9);
        let per_head = mask
            .broadcast_as((2, 2, 3, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        assert!(!masked_softmax_fusable(&scores, &per_head));
        let half = mask.to_dtype(DType::BF16).unwrap();
        assert!(!masked_softmax_fusable(&scores, &half));
        let bf16 = scores.to_dtype(DType::BF16).unwrap();
        assert!(!masked_softmax_fusable(&bf16, &half));
        // and what it computes there is the composed form
        let got = values(&masked_softmax(&scores, 0.5, &per_head).unwrap());
        assert_eq!(got, values(&composed(&scores, 0.5, &per_head)));
    }
}

#[cfg(test)]
mod fast_exp_tests {
    use super::fast_exp;

    /// Distance in units in the last place between two positive finite f32.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_libm_over_its_range() {
        let mut worst = (0, 0.0);
        let mut x = -87.0f32;
        while x < 88.5 {
            let err = ulps(fast_exp(x), x.exp());
            if err > worst.0 {
                worst = (err, x);
            }
            x += 0.000_37;
        }
        assert!(worst.0 <= 2, "{} ulp at {}", worst.0, worst.1);
        // exact where exp is exact: the softmax's shifted maximum
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(-0.0), 1.0);
    }

    #[test]
    fn fast_exp_saturates_like_exp_and_keeps_nan() {
        // masked attention scores are about −1e9: their weight must be exactly 0
        for x in [-1e9f32, -100.0, -88.0, f32::NEG_INFINITY] {
            assert_eq!(fast_exp(x), 0.0, "exp({x})");
        }
        for x in [89.0f32, 1e9, f32::INFINITY] {
            assert_eq!(fast_exp(x), f32::INFINITY, "exp({x})");
        }
        assert!(fast_exp(f32::NAN).is_nan());
    }
}

#[cfg(test)]
mod softcap_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The one-node soft cap gives the composed form's values and gradient bit for bit on CPU
    /// f32, over the cap's linear and saturated ranges, zeros and a non-contiguous input.
    #[test]
    fn fused_soft_cap_equals_the_composed_form_bit_for_bit() {
        let dev = Device::Cpu;
        let n = 5000;
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => -0.0,
                _ => 150.0 * ((i as f32) * 0.37).sin(),
            })
            .collect();
        let x = Var::from_vec(x, (50, 100), &dev).unwrap();
        let g = Tensor::from_vec(
            (0..n)
                .map(|i| ((i as f32) * 0.11).cos())
                .collect::<Vec<f32>>(),
            (50, 100),
            &dev,
        )
        .unwrap();
        for transposed in [false, true] {
            let input = match transposed {
                true => x.as_tensor().t().unwrap(),
                false => x.as_tensor().clone(),
            };
            let g = match transposed {
                true => g.t().unwrap().contiguous().unwrap(),
                false => g.clone(),
            };
            for cap in [30.0, 50.0] {
                let fused = softcap(&input, cap).unwrap();
                let composed = composed_softcap(&input, cap).unwrap();
                let case = format!("cap {cap}, transposed {transposed}");
                assert_eq!(bits(&fused), bits(&composed), "values, {case}");
                let grad = |y: &Tensor| {
                    let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    bits(grads.get(x.as_tensor()).unwrap())
                };
                let (gf, gc) = (grad(&fused), grad(&composed));
                assert_eq!(gf, gc, "gradient, {case}");
                assert!(gf.iter().any(|&b| b != 0));
            }
        }
        // CPU bf16 is not fused: the composed form, the same values
        let half = x.as_tensor().to_dtype(DType::BF16).unwrap();
        let as_f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(
            bits(&as_f32(softcap(&half, 30.0).unwrap())),
            bits(&as_f32(composed_softcap(&half, 30.0).unwrap()))
        );
    }
}
