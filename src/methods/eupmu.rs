//! EUPMU (arXiv 2510.22124): minimise the forget loss subject to a bounded increase of the
//! retain loss, by implicit gradient surgery.
//!
//! Each step backpropagates `combine(L_f, L_r, λ)` once with λ held constant — its gradient is
//! the Lagrangian direction g_f + λ·g_r — and after the optimizer step a forward-only pass
//! re-measures the retain loss on the same retain batch. The dual variable follows the finite
//! difference
//!
//!   δ = h(L_r_old) − h(L_r_new) + tolerance,     λ ← max(0, λ − lr_λ · step(δ))
//!
//! **Sign convention.** `tolerance` ≥ 0 is the retain-loss increase allowed per step (the
//! paper's ε, in units of h): λ grows only when the retain loss rises by more than `tolerance`.
//! The reference code's `error` has the opposite sign (`error` > 0 *demands* a decrease); give
//! `code_error = x` to use that convention (it sets tolerance = −x).
//!
//! `fast = true` skips the extra forward: at the start of step t+1 the difference is taken
//! between L_r(θ_t; batch_t) and L_r(θ_{t+1}; batch_{t+1}) — two different retain batches, so
//! noisier, but free.
use super::rmu::activation_drift;
use super::{
    forget_term, mean_nll, reference_seq_nll, scalar, Ctx, ForgetLoss, Logs, LossOutput, Method,
};
use crate::error::{Error, Result};
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::method_params;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Combination {
    /// λ·L_r + L_f
    Raw,
    /// (λ·L_r + L_f)/(1+λ)
    Convex,
    /// λ·log L_r + log L_f (FAMO-style; needs positive losses)
    Log,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DualOptimizer {
    /// torch.optim.Adam on λ with gradient δ and L2 weight decay (the reference code)
    Adam,
    /// plain projected dual ascent: λ ← max(0, λ − lr·δ)
    Ascent,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    Identity,
    Log,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    // forget_loss, beta, delta, layer, steering_coeff, steering_seed: ForgetLoss::from_method_table
    #[serde(default = "default_combination")]
    combination: Combination,
    #[serde(default = "super::one")]
    lambda_init: f64,
    #[serde(default = "default_lambda_lr")]
    lambda_lr: f64,
    #[serde(default = "default_dual")]
    lambda_optimizer: DualOptimizer,
    /// the reference code's `gamma`: L2 decay pulling λ toward 0 (Adam only)
    #[serde(default = "default_decay")]
    lambda_weight_decay: f64,
    #[serde(default)]
    tolerance: Option<f64>,
    /// the reference code's `error` (opposite sign of `tolerance`)
    #[serde(default)]
    code_error: Option<f64>,
    #[serde(default = "default_transform")]
    transform: Transform,
    #[serde(default)]
    fast: bool,
    /// the constrained retain loss: "nll" (default) or "activation" (with forget_loss = "rmu":
    /// RMU's retain term, the drift of the steered layer's hidden state on the retain answers
    /// from the adapter-free model's, over the same c²/d as the forget term)
    #[serde(default)]
    retain_loss: ConstrainedRetain,
}

/// What the constraint keeps from rising.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConstrainedRetain {
    /// the retain answers' mean NLL
    #[default]
    Nll,
    /// ‖h_θ(x_r) − h_ref(x_r)‖² at the RMU layer (answer tokens, per-sequence mean) · d/c²
    Activation,
}

fn default_combination() -> Combination {
    Combination::Raw
}
fn default_lambda_lr() -> f64 {
    0.1
}
fn default_dual() -> DualOptimizer {
    DualOptimizer::Adam
}
fn default_decay() -> f64 {
    0.01
}
fn default_transform() -> Transform {
    Transform::Identity
}

/// The dual variable and its optimizer state (checkpointed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DualState {
    pub lambda: f64,
    pub adam_m: f64,
    pub adam_v: f64,
    pub adam_t: u64,
    /// retain losses of the current step's micro-batches (before the update)
    pub retain_before: Vec<f64>,
    /// fast variant: h(L_r) of the previous step
    pub previous: Option<f64>,
}

pub struct Eupmu {
    forget: ForgetLoss,
    combination: Combination,
    lambda_lr: f64,
    dual: DualOptimizer,
    decay: f64,
    tolerance: f64,
    transform: Transform,
    fast: bool,
    retain_kind: ConstrainedRetain,
    reference: Vec<f64>,
    pub state: DualState,
}

impl Eupmu {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let (forget, rest) = ForgetLoss::from_method_table("eupmu", params)?;
        let p: Params = method_params("eupmu", &rest)?;
        let tolerance = match (p.tolerance, p.code_error) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "method 'eupmu': give either tolerance or code_error, not both".into(),
                ))
            }
            (Some(t), None) => t,
            (None, Some(e)) => -e,
            (None, None) => 0.0,
        };
        if p.combination == Combination::Log && forget == ForgetLoss::Ga {
            return Err(Error::InvalidArgument(
                "method 'eupmu': combination = \"log\" needs a positive forget loss; use npo or simnpo with it, or raw/convex with ga".into(),
            ));
        }
        if p.retain_loss == ConstrainedRetain::Activation && !matches!(forget, ForgetLoss::Rmu(_)) {
            return Err(Error::InvalidArgument(
                "method 'eupmu': retain_loss = \"activation\" constrains the hidden state of the layer forget_loss = \"rmu\" steers; use it with forget_loss = \"rmu\"".into(),
            ));
        }
        if p.lambda_init < 0.0 || p.lambda_lr <= 0.0 {
            return Err(Error::InvalidArgument(
                "method 'eupmu': lambda_init must be ≥ 0 and lambda_lr > 0".into(),
            ));
        }
        Ok(Eupmu {
            forget,
            combination: p.combination,
            lambda_lr: p.lambda_lr,
            dual: p.lambda_optimizer,
            decay: p.lambda_weight_decay,
            tolerance,
            transform: p.transform,
            fast: p.fast,
            retain_kind: p.retain_loss,
            reference: vec![],
            state: DualState {
                lambda: p.lambda_init,
                adam_m: 0.0,
                adam_v: 0.0,
                adam_t: 0,
                retain_before: vec![],
                previous: None,
            },
        })
    }

    fn h(&self, x: f64) -> f64 {
        match self.transform {
            Transform::Identity => x,
            Transform::Log => x.max(1e-12).ln(),
        }
    }

    /// One dual step from the slack δ; returns δ.
    pub fn dual_step(&mut self, delta: f64) -> f64 {
        let s = &mut self.state;
        match self.dual {
            DualOptimizer::Ascent => s.lambda -= self.lambda_lr * delta,
            DualOptimizer::Adam => {
                let g = delta + self.decay * s.lambda;
                s.adam_t += 1;
                s.adam_m = 0.9 * s.adam_m + 0.1 * g;
                s.adam_v = 0.999 * s.adam_v + 0.001 * g * g;
                let mh = s.adam_m / (1.0 - 0.9f64.powi(s.adam_t as i32));
                let vh = s.adam_v / (1.0 - 0.999f64.powi(s.adam_t as i32));
                s.lambda -= self.lambda_lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        // Clamp (the fork does; upstream lets λ drift below 0 and recover slowly).
        s.lambda = s.lambda.max(0.0);
        delta
    }

    /// The constrained retain loss of `batch` under `opts`.
    fn retain_term(
        &self,
        model: &Decoder,
        batch: &ItemBatch,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        match (self.retain_kind, self.forget) {
            (ConstrainedRetain::Activation, ForgetLoss::Rmu(s)) => {
                let raw = activation_drift(model, batch, s.layer, opts)?;
                Ok((raw * s.per_unit(model.cfg.hidden_size))?)
            }
            _ => mean_nll(&model.forward(&batch.input(), opts)?, batch),
        }
    }

    pub fn combine(&self, lf: &Tensor, lr: &Tensor) -> Result<Tensor> {
        let lp = self.state.lambda.max(0.0);
        Ok(match self.combination {
            Combination::Raw => ((lr * lp)? + lf)?,
            Combination::Convex => (((lr * lp)? + lf)? / (1.0 + lp))?,
            Combination::Log => ((lr.log()? * lp)? + lf.log()?)?,
        })
    }
}

impl Method for Eupmu {
    fn name(&self) -> &'static str {
        "eupmu"
    }

    fn prepare(&mut self, model: &Decoder, forget: &[EncodedExample], pad_id: u32) -> Result<()> {
        self.forget.check("eupmu", model)?;
        if self.forget.needs_reference() {
            self.reference = reference_seq_nll(model, forget, pad_id)?;
        }
        Ok(())
    }

    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let retain = batch.retain()?;
        let lr = self.retain_term(ctx.model, retain, ctx.opts)?;
        let lr_value = scalar(&lr)?;
        let mut logs: Logs = vec![];
        if ctx.micro == 0 {
            self.state.retain_before.clear();
            if self.fast {
                if let Some(prev) = self.state.previous {
                    let delta = prev - self.h(lr_value) + self.tolerance;
                    self.dual_step(delta);
                    logs.push(("slack".into(), delta));
                }
            }
        }
        self.state.retain_before.push(lr_value);
        let lf = forget_term(self.forget, ctx, &batch.forget, &self.reference)?;
        logs.push(("forget_loss".into(), scalar(&lf)?));
        logs.push(("retain_loss".into(), lr_value));
        logs.push(("lambda".into(), self.state.lambda));
        Ok(LossOutput {
            loss: self.combine(&lf, &lr)?,
            logs,
        })
    }

    fn after_update(&mut self, ctx: &Ctx, batches: &[PairedBatch]) -> Result<Logs> {
        let before = self.state.retain_before.iter().sum::<f64>()
            / self.state.retain_before.len().max(1) as f64;
        if self.fast {
            self.state.previous = Some(self.h(before));
            return Ok(vec![]);
        }
        // Forward only, same retain batches, no dropout, LoRA as constants (no graph).
        let eval = ForwardOptions::eval();
        let mut after = 0.0;
        for b in batches {
            after += scalar(&self.retain_term(ctx.model, b.retain()?, &eval)?)?;
        }
        after /= batches.len().max(1) as f64;
        let delta = self.h(before) - self.h(after) + self.tolerance;
        self.dual_step(delta);
        Ok(vec![
            ("retain_loss_after".into(), after),
            ("slack".into(), delta),
            ("lambda_next".into(), self.state.lambda),
        ])
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).unwrap_or(serde_json::Value::Null)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.state = serde_json::from_value(state.clone())
            .map_err(|e| Error::InvalidArgument(format!("eupmu checkpoint state: {e}")))?;
        Ok(())
    }
}
