//! Scaled dot-product attention with a backward that recomputes the scores.
use candle_core::backend::BackendStorage;
use candle_core::op::Mul;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::model::ops::{self, MaskedSoftmax, MaskedSoftmaxGrad};
use crate::model::recompute::recompute3;

/// `softmax(q·kᵀ · scale + mask) (⊙ keep) · v` over q [B, H, T, D] and k, v [B, H, C, D] (as
/// many heads as q), with the additive `mask` [B, 1, T, C] and `keep` [B, 1, T, 1] zeroing the
/// queries that see no key, as transformers' eager attention computes it (the softmax in f32,
/// see [`ops::masked_softmax`]). With Gemma 2's `softcap`, `cap · tanh(q·kᵀ · scale / cap)`
/// takes the place of the scaled scores: that, and the inputs [`FusedAttention`] does not take,
/// run the composed form as one node recomputed in the backward ([`recompute3`]), which keeps
/// no [B, H, T, C] tensor either.
///
/// Where [`MaskedSoftmax`] takes the scores (f32 on the CPU; CUDA) this is one node of the graph
/// that keeps only q, k and v, and recomputes the scores and probabilities in the backward, as
/// PyTorch's fused attention does: the composed form keeps both [B, H, T, C] tensors of every
/// layer until the backward is over (64 MB each per layer at 8×8 heads of 512 tokens in f32,
/// 134 MB each for Llama-3.2-1B's 32 heads in bf16). The values and gradients are the composed
/// form's, bit for bit.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    mask: &Tensor,
    keep: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if softcap.is_none() && fusable(&q, &k, v.dims(), mask, keep) {
        let op = FusedAttention {
            scale: scale as f32,
            mask: mask.contiguous()?,
            keep: keep.cloned(),
        };
        return q.apply_op3(&k, &v, op);
    }
    // the soft cap, and what the op does not take (CPU half types, f64): the composed form as
    // one node recomputed in the backward, which keeps q, k and v where the composed form keeps
    // about ten [B, H, T, C] tensors (the soft cap's product, division, tanh and their casts)
    let (mask, keep) = (mask.clone(), keep.cloned());
    recompute3(&q, &k, &v, move |q, k, v| {
        composed(q, k, v, scale, softcap, &mask, keep.as_ref())
    })
}

/// The composed form: the scores, the soft cap if any, [`ops::masked_softmax`], the keep
/// multiplier, the product.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    mask: &Tensor,
    keep: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    // kᵀ as a view of contiguous k: the matmul takes transposed strides
    let scores = q.matmul(&k.transpose(2, 3)?)?;
    // the scale goes into the softmax unless the soft cap comes between them
    let (scores, scale) = match softcap {
        Some(cap) => (ops::softcap(&ops::mul_scalar(&scores, scale)?, cap)?, 1.0),
        None => (scores, scale),
    };
    let mut probs = ops::masked_softmax(&scores, scale, mask)?;
    if let Some(keep) = keep {
        probs = probs.broadcast_mul(keep)?;
    }
    probs.matmul(v)
}

/// Whether [`FusedAttention`] takes these inputs: q [B, H, T, D], k and v [B, H, C, D], one
/// dtype and device throughout, a mask the softmax op takes and keep [B, 1, T, 1].
fn fusable(q: &Tensor, k: &Tensor, v_dims: &[usize], mask: &Tensor, keep: Option<&Tensor>) -> bool {
    let (&[b, h, t, d], &[bk, hk, c, dk]) = (q.dims(), k.dims()) else {
        return false;
    };
    let same = |x: &Tensor| x.dtype() == q.dtype() && x.device().same_device(q.device());
    (ops::fusable(q) || ops::cuda_fusable(q))
        && (bk, hk, dk) == (b, h, d)
        && v_dims == k.dims()
        && same(k)
        && same(mask)
        && keep.is_none_or(|keep| same(keep) && keep.dims() == [b, 1, t, 1])
        && crate::model::launch::attention(&[b, h, t, c], mask.dims(), 1.0).is_ok()
}

struct FusedAttention {
    scale: f32,
    /// contiguous [B, 1, T, C]
    mask: Tensor,
    keep: Option<Tensor>,
}

impl FusedAttention {
    /// The forward on backend `S`, whose storage `pick` takes out of a [`Storage`] (for the
    /// op's own mask and keep) and whose softmax is `softmax` (scores, mask → probabilities).
    fn forward<S: BackendStorage>(
        &self,
        pick: for<'a> fn(&'a Storage) -> Option<&'a S>,
        softmax: impl Fn(&S, &Layout, &S, &Layout) -> candle_core::Result<S>,
        (q, q_l): (&S, &Layout),
        (k, k_l): (&S, &Layout),
        (v, v_l): (&S, &Layout),
    ) -> candle_core::Result<(S, Shape)> {
        let (&[b, h, t, d], &[_, _, c, _]) = (q_l.dims(), k_l.dims()) else {
            candle_core::bail!(
                "attention: q {:?} and k {:?} are not 4-D",
                q_l.dims(),
                k_l.dims()
            );
        };
        // the same products, layouts and batch count as Tensor::matmul gives the composed form
        let scores = q.matmul(k, (b * h, t, c, d), q_l, &k_l.transpose(2, 3)?)?;
        let probs_l = Layout::contiguous((b, h, t, c));
        let (mask, mask_l) = self.mask.storage_and_layout();
        let mask = ops::held_storage(&mask, pick, "attention", "mask")?;
        let mut probs = softmax(&scores, &probs_l, mask, mask_l)?;
        drop(scores);
        if let Some(keep) = &self.keep {
            let (keep, keep_l) = keep.storage_and_layout();
            let keep = ops::held_storage(&keep, pick, "attention", "keep multiplier")?;
            probs =
                probs.binary_impl::<Mul>(keep, &probs_l, &keep_l.broadcast_as((b, h, t, c))?)?;
        }
        let out = probs.matmul(v, (b * h, t, d, c), &probs_l, v_l)?;
        Ok((out, Shape::from((b, h, t, d))))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let softmax = MaskedSoftmax { scale: self.scale };
        let cpu_softmax = |s: &CpuStorage, s_l: &Layout, m: &CpuStorage, m_l: &Layout| {
            softmax.cpu(s, s_l, m, m_l)
        };
        self.forward(ops::cpu_storage, cpu_softmax, (q, q_l), (k, k_l), (v, v_l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let scale = self.scale;
        let cuda_softmax = |s: &candle_core::CudaStorage,
                            s_l: &Layout,
                            m: &candle_core::CudaStorage,
                            m_l: &Layout| {
            Ok(crate::model::cuda_kernels::attention::forward(s, s_l, m, m_l, scale)?.0)
        };
        self.forward(
            ops::cuda_storage,
            cuda_softmax,
            (q, q_l),
            (k, k_l),
            (v, v_l),
        )
    }

    /// candle's backward of the composed form, op for op, with the scores and probabilities
    /// recomputed from q and k.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tracked = |t: &Tensor| t.is_variable() || t.track_op();
        let wanted = (tracked(q), tracked(k), tracked(v));
        // detached: the backward's own products need no graph
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let kt = k.transpose(2, 3)?;
        let scores = q.matmul(&kt)?;
        let softmax = MaskedSoftmax { scale: self.scale };
        let mut probs = scores.apply_op2_no_bwd(&self.mask, &softmax)?;
        if let Some(keep) = &self.keep {
            probs = probs.broadcast_mul(keep)?;
        }
        let grad_v = probs.t()?.matmul(grad)?;
        drop(probs);
        let mut grad_probs = grad.matmul(&v.t()?)?;
        if let Some(keep) = &self.keep {
            grad_probs = grad_probs.broadcast_mul(keep)?;
        }
        let softmax_grad = MaskedSoftmaxGrad { scale: self.scale };
        let grad_scores = scores.apply_op3_no_bwd(&self.mask, &grad_probs, &softmax_grad)?;
        drop((scores, grad_probs));
        let grad_q = wanted.0.then(|| grad_scores.matmul(&kt.t()?)).transpose()?;
        let grad_k = wanted
            .1
            .then(|| q.t()?.matmul(&grad_scores)?.t())
            .transpose()?;
        Ok((grad_q, grad_k, wanted.2.then_some(grad_v)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};

    fn uniform(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A causal mask [B, 1, T, C] over C − T cached keys in which batch row 1's first query sees
    /// no key, and the keep multiplier [B, 1, T, 1] that zeroes that query.
    pub(crate) fn mask_and_keep(b: usize, t: usize, c: usize) -> (Tensor, Tensor) {
        let past = c - t;
        let mut mask = vec![0f32; b * t * c];
        let mut keep = vec![1f32; b * t];
        for bi in 0..b {
            for qi in 0..t {
                let mut seen = false;
                for j in 0..c {
                    if j > past + qi || j < bi * (past + 1) {
                        mask[(bi * t + qi) * c + j] = -1e9;
                    } else {
                        seen = true;
                    }
                }
                if !seen {
                    keep[bi * t + qi] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, c), &Device::Cpu).unwrap();
        let keep = Tensor::from_vec(keep, (b, 1, t, 1), &Device::Cpu).unwrap();
        (mask, keep)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The fused op gives the composed form's output and the gradients of q, k and v bit for
    /// bit, with and without the keep multiplier, with keys from a cache (C > T), and whichever
    /// inputs need a gradient.
    #[test]
    fn fused_attention_equals_the_composed_form_bit_for_bit() {
        let (b, h, t, d) = (2, 3, 5, 8);
        for (c, with_keep) in [(5, false), (7, true), (9, false)] {
            for q_tracked in [true, false] {
                let q = Var::from_tensor(&uniform(&[b, h, t, d], 1, 2.0)).unwrap();
                let k = Var::from_tensor(&uniform(&[b, h, c, d], 2, 2.0)).unwrap();
                let v = Var::from_tensor(&uniform(&[b, h, c, d], 3, 1.0)).unwrap();
                let q_in = if q_tracked {
                    q.as_tensor().clone()
                } else {
                    q.as_tensor().detach()
                };
                let weights = uniform(&[b, h, t, d], 4, 1.0);
                let (mask, keep) = mask_and_keep(b, t, c);
                let keep = with_keep.then_some(&keep);
                let scale = 1.0 / (d as f64).sqrt() * 1.1;
                assert!(fusable(&q_in, k.as_tensor(), v.dims(), &mask, keep));
                let (k_in, v_in) = (k.as_tensor(), v.as_tensor());
                let fused = attention(&q_in, k_in, v_in, scale, None, &mask, keep).unwrap();
                let composed = composed(&q_in, k_in, v_in, scale, None, &mask, keep).unwrap();
                let case = format!("C {c}, keep {with_keep}, q tracked {q_tracked}");
                assert_eq!(bits(&fused), bits(&composed), "output, {case}");
                if with_keep {
                    // batch row 1's first query sees no key: its output is zero
                    let row = fused.get(1).unwrap().get(0).unwrap().get(0).unwrap();
                    assert!(bits(&row).iter().all(|&x| x == 0), "{case}");
                }
                let qkv = [&q, &k, &v];
                assert_same_gradients(&fused, &composed, &weights, qkv, q_tracked, &case);
            }
        }
    }

    /// Every value as f64 bits (exact for f32, bf16, f16 and f64).
    fn bits64(t: &Tensor) -> Vec<u64> {
        let v: Vec<f64> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The gradients of q, k and v under `sum(y ⊙ weights)` from `got` and from `want` are
    /// equal bit for bit and not all zero; only q, when it is not tracked, has none.
    fn assert_same_gradients(
        got: &Tensor,
        want: &Tensor,
        weights: &Tensor,
        qkv: [&Var; 3],
        q_tracked: bool,
        case: &str,
    ) {
        let grads = |y: &Tensor| {
            (y * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gg, gw) = (grads(got), grads(want));
        for (name, var) in ["q", "k", "v"].into_iter().zip(qkv) {
            match (gg.get(var.as_tensor()), gw.get(var.as_tensor())) {
                (Some(g), Some(w)) => {
                    assert_eq!(bits64(g), bits64(w), "gradient of {name}, {case}");
                    assert!(bits64(g).iter().any(|&x| x != 0), "zero {name}, {case}");
                }
                (None, None) => assert!(name == "q" && !q_tracked, "{name}, {case}"),
                _ => panic!("gradient of {name} on one side only, {case}"),
            }
        }
    }

    /// Gemma 2's soft cap and the inputs the fused op does not take (CPU bf16, f64) run the
    /// composed form recomputed in the backward: its output and the gradients of q, k and v
    /// are the composed form's with its whole graph, bit for bit.
    #[test]
    fn recomputed_attention_equals_the_composed_form_bit_for_bit() {
        let (b, h, t, c, d) = (2, 3, 5, 7, 8);
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            for softcap in [Some(1.5), None] {
                for q_tracked in [true, false] {
                    let var = |shape: &[usize], seed, s| {
                        Var::from_tensor(&uniform(shape, seed, s).to_dtype(dtype).unwrap()).unwrap()
                    };
                    let (q, k, v) = (
                        var(&[b, h, t, d], 1, 2.0),
                        var(&[b, h, c, d], 2, 2.0),
                        var(&[b, h, c, d], 3, 1.0),
                    );
                    let q_in = if q_tracked {
                        q.as_tensor().clone()
                    } else {
                        q.as_tensor().detach()
                    };
                    let weights = uniform(&[b, h, t, d], 4, 1.0).to_dtype(dtype).unwrap();
                    let (mask, keep) = mask_and_keep(b, t, c);
                    let (mask, keep) =
                        (mask.to_dtype(dtype).unwrap(), keep.to_dtype(dtype).unwrap());
                    let case = format!("{dtype:?}, soft cap {softcap:?}, q tracked {q_tracked}");
                    if softcap.is_none() && dtype == DType::F32 {
                        continue; // the fused op's case, tested above
                    }
                    let scale = 1.0 / (d as f64).sqrt();
                    let args = (&q_in, k.as_tensor(), v.as_tensor());
                    let got = attention(args.0, args.1, args.2, scale, softcap, &mask, Some(&keep))
                        .unwrap();
                    let want = composed(args.0, args.1, args.2, scale, softcap, &mask, Some(&keep))
                        .unwrap();
                    assert_eq!(bits64(&got), bits64(&want), "output, {case}");
                    let qkv = [&q, &k, &v];
                    assert_same_gradients(&got, &want, &weights, qkv, q_tracked, &case);
                }
            }
        }
    }

    /// What the op does not take goes to the composed form: mismatched heads, dtypes or keep
    /// shapes, half types on the CPU.
    #[test]
    fn unfusable_inputs_take_the_composed_form() {
        let (q, k) = (
            uniform(&[1, 2, 3, 4], 1, 1.0),
            uniform(&[1, 2, 3, 4], 2, 1.0),
        );
        let (mask, keep) = mask_and_keep(1, 3, 3);
        assert!(fusable(&q, &k, k.dims(), &mask, Some(&keep)));
        let one_head = uniform(&[1, 1, 3, 4], 3, 1.0);
        assert!(!fusable(&q, &one_head, one_head.dims(), &mask, None));
        assert!(!fusable(&q, &k, &[1, 2, 3, 5], &mask, None));
        let wide_keep = keep.broadcast_as((1, 2, 3, 1)).unwrap();
        assert!(!fusable(&q, &k, k.dims(), &mask, Some(&wide_keep)));
        let bf16 = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        assert!(!fusable(&bf16(&q), &bf16(&k), k.dims(), &bf16(&mask), None));
        // the composed form runs there, with the same values
        let got = attention(
            &bf16(&q),
            &bf16(&k),
            &bf16(&k),
            0.5,
            None,
            &bf16(&mask),
            None,
        )
        .unwrap();
        let want = composed(
            &bf16(&q),
            &bf16(&k),
            &bf16(&k),
            0.5,
            None,
            &bf16(&mask),
            None,
        )
        .unwrap();
        assert_eq!(
            bits(&got.to_dtype(DType::F32).unwrap()),
            bits(&want.to_dtype(DType::F32).unwrap())
        );
    }
}
