//! A linear layer with a frozen base weight and an optional LoRA branch.
use crate::error::Result;
use crate::model::ops;
use crate::rng::Rng;
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, Var};
use std::cell::RefCell;

/// The trainable low-rank update `scale · B·A` of one linear layer.
#[derive(Clone)]
pub struct LoraWeights {
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraWeights {
    /// `a` [r, in] and `b` [out, r] as variables (`Var::from_tensor`: copied unless already a
    /// variable).
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraWeights {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout,
        })
    }
}

/// Per-forward switches. Model code knows nothing of training; a trainer sets these.
pub struct ForwardOptions {
    /// apply the LoRA branches (false gives the base model: the reference model of NPO/DPO/RMU
    /// without a second copy of the weights)
    pub lora: bool,
    /// LoRA dropout: active only when a generator is given
    pub dropout_rng: Option<RefCell<Rng>>,
    /// use the LoRA weights as constants: no graph is built (candle has no no-grad mode), for
    /// evaluation passes during training
    pub detach_lora: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            lora: true,
            dropout_rng: None,
            detach_lora: false,
        }
    }
}

impl ForwardOptions {
    pub fn base_model() -> Self {
        ForwardOptions {
            lora: false,
            dropout_rng: None,
            detach_lora: false,
        }
    }
    pub fn training(seed_rng: Rng) -> Self {
        ForwardOptions {
            lora: true,
            dropout_rng: Some(RefCell::new(seed_rng)),
            detach_lora: false,
        }
    }
    /// the adapted model as constants: no dropout, no graph
    pub fn eval() -> Self {
        ForwardOptions {
            lora: true,
            dropout_rng: None,
            detach_lora: true,
        }
    }
}

#[derive(Clone)]
pub struct Linear {
    /// module path as in the transformers model, e.g. `model.layers.0.self_attn.q_proj`
    pub name: String,
    /// [out, in], frozen unless it is a `Var` (full-parameter training)
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
    /// stored transposed in the checkpoint (GPT-2's Conv1D): PEFT's `fan_in_fan_out`
    pub conv1d: bool,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    /// last component of the module path (`q_proj`, `c_attn`, …)
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    pub fn forward(&self, x: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        if let (true, Some(lora)) = (opts.lora, &self.lora) {
            if let Some(y) = self.fused_lora_forward(x, lora, opts)? {
                return Ok(y);
            }
        }
        self.composed_forward(x, opts)
    }

    /// The base product, bias and LoRA branch as separate ops of the graph: what
    /// [`LoraLinearOp`] computes in one, and the form for f64 and trainable bases.
    fn composed_forward(&self, x: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        let mut y = ops::linear(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let (true, Some(lora)) = (opts.lora, &self.lora) {
            // The branch runs in f32 whatever the base dtype: LoRA weights, gradients and
            // optimizer state stay f32.
            // (f64 models — used for gradient checks — keep f64)
            let branch_dtype = if x.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let mut h = x.to_dtype(branch_dtype)?;
            if let Some(mask) = dropout_mask(&h, lora, opts)? {
                h = (h * mask)?;
            }
            let dims = h.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let h2 = h.reshape((rows, dims[dims.len() - 1]))?;
            let (a, b) = if opts.detach_lora {
                (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
            } else {
                (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
            };
            let (a, b) = (a.to_dtype(branch_dtype)?, b.to_dtype(branch_dtype)?);
            // scale the rank-r intermediate, not the full-width output (one small tensor less)
            let low = (h2.matmul(&a.t()?)? * lora.scale)?;
            let up = low.matmul(&b.t()?)?;
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = self.out_features();
            let up = up.reshape(out_dims)?.to_dtype(y.dtype())?;
            y = (y + up)?;
        }
        Ok(y)
    }

    /// The base and LoRA branch as one [`LoraLinearOp`], when it computes what the composed
    /// form above computes: a half or f32 base with f32 LoRA weights (f64 gradient-check
    /// models and trainable base weights take the composed form).
    fn fused_lora_forward(
        &self,
        x: &Tensor,
        lora: &LoraWeights,
        opts: &ForwardOptions,
    ) -> Result<Option<Tensor>> {
        let dtype = x.dtype();
        let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
        // on CUDA `UNLEARN_CUDA_FUSED=0` asks for every composed form, this one's too
        let fusable = (x.device().is_cpu() || ops::cuda_fusable(x))
            && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && a.dtype() == DType::F32
            && b.dtype() == DType::F32
            && self.weight.dtype() == dtype
            && !self.weight.track_op()
            && (self.bias.as_ref()).is_none_or(|bias| bias.dtype() == dtype && !bias.track_op());
        if !fusable {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features()))?.contiguous()?;
        let (a, b) = if opts.detach_lora {
            (a.detach(), b.detach())
        } else {
            (a.clone(), b.clone())
        };
        let op = LoraLinearOp {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            scale: lora.scale,
            dropout: dropout_mask(&x2, lora, opts)?,
        };
        let y = x2.apply_op3(&a, &b, op)?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features();
        Ok(Some(y.reshape(out_dims)?))
    }
}

/// `x·Wᵀ (+ bias) + (scale·(x·Aᵀ))·Bᵀ` over x [rows, in], A [r, in], B [out, r] as one node of
/// the graph, computing exactly what [`Linear::forward`]'s composed form computes, in the same
/// order and roundings: the base product in the base dtype, the branch in f32 rounded to the
/// base dtype, then their sum.
///
/// Why: candle keeps every input of every node alive until the backward pass is over, and
/// each node's gradient is a buffer of its own. The composed form keeps the base output and
/// the branch output, two [rows, out] tensors per linear, that no gradient needs (about 1.4 GB
/// for an 8-layer model at 8×512 tokens), and makes seven nodes where this is one. Only x, A, B
/// and a drawn dropout mask are kept here; the rank-r intermediate is recomputed in the
/// backward.
struct LoraLinearOp {
    /// frozen [out, in]: no gradient (see `ops::linear`)
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    /// the inverted-dropout multiplier [rows, in] (f32) drawn for this forward, if any
    dropout: Option<Tensor>,
}

impl LoraLinearOp {
    /// The forward on backend `S`, whose storage `pick` takes out of a [`Storage`] (the op's
    /// own weight and bias must be on the input's device).
    fn forward<S: BackendStorage>(
        &self,
        pick: for<'a> fn(&'a Storage) -> Option<&'a S>,
        (x, x_l): (&S, &Layout),
        (a, a_l): (&S, &Layout),
        (b, b_l): (&S, &Layout),
    ) -> candle_core::Result<(S, Shape)> {
        let (w_storage, w_l) = self.weight.storage_and_layout();
        let w = ops::held_storage(&w_storage, pick, "lora-linear", "base weight")?;
        let (m, k) = x_l.shape().dims2()?;
        let (n, k_w) = w_l.shape().dims2()?;
        let (r, k_a) = a_l.shape().dims2()?;
        let (n_b, r_b) = b_l.shape().dims2()?;
        if k_w != k || k_a != k || n_b != n || r_b != r {
            candle_core::bail!(
                "lora-linear: input [{m}, {k}], weight [{n}, {k_w}], A [{r}, {k_a}], \
                 B [{n_b}, {r_b}] do not fit"
            );
        }
        let rows_out = Layout::contiguous((m, n));
        let mut y = x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?;
        if let Some(bias) = &self.bias {
            let (bias_storage, bias_l) = bias.storage_and_layout();
            let bias = ops::held_storage(&bias_storage, pick, "lora-linear", "bias")?;
            y = y.binary_impl::<Add>(bias, &rows_out, &bias_l.broadcast_as((m, n))?)?;
        }
        let widened;
        let (mut h, mut h_l) = if x.dtype() == DType::F32 {
            (x, x_l.clone())
        } else {
            widened = x.to_dtype(x_l, DType::F32)?;
            (&widened, Layout::contiguous((m, k)))
        };
        let dropped;
        if let Some(mask) = &self.dropout {
            let (mask_storage, mask_l) = mask.storage_and_layout();
            let mask = ops::held_storage(&mask_storage, pick, "lora-linear", "dropout mask")?;
            dropped = h.binary_impl::<Mul>(mask, &h_l, mask_l)?;
            (h, h_l) = (&dropped, Layout::contiguous((m, k)));
        }
        let low_l = Layout::contiguous((m, r));
        let low = h.matmul(a, (1, m, r, k), &h_l, &a_l.transpose(0, 1)?)?;
        let low = low.affine(&low_l, self.scale, 0.0)?;
        let mut up = low.matmul(b, (1, m, n, r), &low_l, &b_l.transpose(0, 1)?)?;
        if y.dtype() != DType::F32 {
            up = up.to_dtype(&rows_out, y.dtype())?;
        }
        Ok((
            y.binary_impl::<Add>(&up, &rows_out, &rows_out)?,
            Shape::from((m, n)),
        ))
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(ops::cpu_storage, (x, x_l), (a, a_l), (b, b_l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        a: &candle_core::CudaStorage,
        a_l: &Layout,
        b: &candle_core::CudaStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.forward(ops::cuda_storage, (x, x_l), (a, a_l), (b, b_l))
    }

    /// The gradients candle's backward gives the composed form, op for op: the base weight's
    /// input gradient `g·W` (no weight gradient), and the branch's through its two products,
    /// the scale and the casts, with the rank-r intermediate recomputed.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tracked = |t: &Tensor| t.is_variable() || t.track_op();
        let (x_tracked, a_tracked, b_tracked) = (tracked(x), tracked(a), tracked(b));
        // detached: the backward's own products need no graph
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let mut h = x.to_dtype(DType::F32)?;
        if let Some(mask) = &self.dropout {
            h = (h * mask)?;
        }
        let low = h.matmul(&a.t()?)?.affine(self.scale, 0.0)?;
        let g_up = g.to_dtype(DType::F32)?;
        let grad_b = low.t()?.matmul(&g_up)?.t()?;
        let grad_low = g_up.matmul(&b)?.affine(self.scale, 0.0)?;
        let grad_a = h.t()?.matmul(&grad_low)?.t()?;
        // an input that needs no gradient (layer 0's, from the frozen embedding) costs no GEMM
        let grad_x = if x_tracked {
            let mut grad_h = grad_low.matmul(&a)?;
            if let Some(mask) = &self.dropout {
                grad_h = (grad_h * mask)?;
            }
            Some((g.matmul(&self.weight)? + grad_h.to_dtype(x.dtype())?)?)
        } else {
            None
        };
        Ok((
            grad_x,
            a_tracked.then_some(grad_a),
            b_tracked.then_some(grad_b),
        ))
    }
}

/// The inverted-dropout multiplier (0 or 1/(1 − p), f32) for the LoRA branch's input `x`,
/// drawn from the forward's seeded generator, or `None` when no dropout is drawn.
fn dropout_mask(x: &Tensor, lora: &LoraWeights, opts: &ForwardOptions) -> Result<Option<Tensor>> {
    let (p, Some(rng)) = (lora.dropout, &opts.dropout_rng) else {
        return Ok(None);
    };
    if p <= 0.0 {
        return Ok(None);
    }
    let mut rng = rng.borrow_mut();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep as f32 })
        .collect();
    Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// The fused op gives the composed form's output and gradients bit for bit, in every base
    /// dtype, with and without a bias, with and without dropout drawn, whether or not its input
    /// needs a gradient: the training results do not depend on which form ran.
    #[test]
    fn fused_lora_linear_equals_the_composed_form_bit_for_bit() {
        let (inp, out, r) = (24, 40, 4);
        let cases = [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .flat_map(|d| [(d, false), (d, true)])
            .flat_map(|(d, bias)| [(d, bias, false), (d, bias, true)]);
        for (dtype, with_bias, with_dropout) in cases {
            for x_tracked in [true, false] {
                let p = if with_dropout { 0.25 } else { 0.0 };
                let lora = LoraWeights::from_tensors(
                    &random(&[r, inp], 1, DType::F32),
                    &random(&[out, r], 2, DType::F32),
                    16.0 / r as f64,
                    p,
                )
                .unwrap();
                let linear = Linear {
                    name: "model.layers.0.mlp.up_proj".into(),
                    weight: random(&[out, inp], 3, dtype),
                    bias: with_bias.then(|| random(&[out], 4, dtype)),
                    lora: Some(lora.clone()),
                    conv1d: false,
                };
                let x = random(&[2, 7, inp], 5, dtype);
                let x = if x_tracked {
                    Var::from_tensor(&x).unwrap().as_tensor().clone()
                } else {
                    x
                };
                // weights the loss so that every output element has its own gradient
                let weights = random(&[2, 7, out], 6, DType::F32);
                // the same seed: both forms draw the same dropout mask
                let opts = || ForwardOptions::training(Rng::new(11));
                let fused = linear
                    .fused_lora_forward(&x, &lora, &opts())
                    .unwrap()
                    .unwrap();
                let composed = linear.composed_forward(&x, &opts()).unwrap();
                let case =
                    format!("{dtype:?}, bias {with_bias}, dropout {p}, x tracked {x_tracked}");
                assert_eq!(bits(&fused), bits(&composed), "output, {case}");
                let loss = |y: &Tensor| {
                    (y.to_dtype(DType::F32).unwrap() * &weights)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                let (gf, gc) = (
                    loss(&fused).backward().unwrap(),
                    loss(&composed).backward().unwrap(),
                );
                for (name, t) in [("A", lora.a.as_tensor()), ("B", lora.b.as_tensor())] {
                    let (f, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                    assert_eq!(bits(f), bits(c), "gradient of {name}, {case}");
                    assert!(bits(f).iter().any(|&b| b != 0), "zero gradient of {name}");
                }
                match (gf.get(&x), gc.get(&x)) {
                    (Some(f), Some(c)) => assert_eq!(bits(f), bits(c), "gradient of x, {case}"),
                    (None, None) => assert!(!x_tracked, "no gradient of x, {case}"),
                    (f, c) => panic!(
                        "gradient of x: fused {} composed {}, {case}",
                        f.is_some(),
                        c.is_some()
                    ),
                }
            }
        }
    }

    /// A base weight that needs its own gradient (full-parameter training) and f64 models take
    /// the composed form, which the fused op does not cover.
    #[test]
    fn the_fused_op_declines_what_it_does_not_compute() {
        let lora = LoraWeights::from_tensors(
            &random(&[2, 8], 1, DType::F32),
            &random(&[8, 2], 2, DType::F32),
            1.0,
            0.1,
        )
        .unwrap();
        let linear = |weight: Tensor| Linear {
            name: "q_proj".into(),
            weight,
            bias: None,
            lora: Some(lora.clone()),
            conv1d: false,
        };
        let x = random(&[3, 8], 5, DType::F32);
        let frozen = linear(random(&[8, 8], 3, DType::F32));
        let plain = ForwardOptions::default();
        assert!(frozen
            .fused_lora_forward(&x, &lora, &plain)
            .unwrap()
            .is_some());
        let dropout = ForwardOptions::training(Rng::new(7));
        assert!(frozen
            .fused_lora_forward(&x, &lora, &dropout)
            .unwrap()
            .is_some());
        let trainable = Var::from_tensor(&random(&[8, 8], 3, DType::F32)).unwrap();
        let full = linear(trainable.as_tensor().clone());
        assert!(full
            .fused_lora_forward(&x, &lora, &plain)
            .unwrap()
            .is_none());
        let x64 = x.to_dtype(DType::F64).unwrap();
        let f64_model = linear(random(&[8, 8], 3, DType::F64));
        assert!(f64_model
            .fused_lora_forward(&x64, &lora, &plain)
            .unwrap()
            .is_none());
    }
}
