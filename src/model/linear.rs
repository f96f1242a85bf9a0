//! A linear layer with a frozen base weight and an optional LoRA branch.
use crate::error::Result;
use crate::model::ops;
use crate::rng::Rng;
use candle_core::{DType, Tensor, Var};
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
            if lora.dropout > 0.0 {
                if let Some(rng) = &opts.dropout_rng {
                    h = dropout(&h, lora.dropout, &mut rng.borrow_mut())?;
                }
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
}

/// Inverted dropout with a mask drawn from our seeded generator.
fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}
