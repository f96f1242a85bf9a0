//! UNDIAL (arXiv 2402.10052): self-distillation to an adjusted reference distribution. At every
//! answer position, q = softmax(z_ref − β·e_y): the reference logits with the gold token's logit
//! lowered by β. L_f = mean_t (−Σ_v q_v log p_θ,v); L = γ·L_f + α·L_r.
//!
//! The reference is the model with the adapter disabled, run on the same batch (no graph).
//!
//! Masking (our choice): the mean covers only the **answer positions** (labels[:, t + 1] ≠ −100).
//! open-unlearning's `compute_undial_loss` has no mask: label −100 indexes vocabulary slot
//! V − 100 and the mean covers prompt and padding positions too.
use super::combine_with_retain;
use super::{
    answer_positions, flat_rows, logits, one_hot, reference_logits, soft_cross_entropy, Ctx,
    LossOutput, Method, RetainLoss,
};
use crate::error::Result;
use crate::model::ops::softmax_last_dim;
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default = "super::one")]
    gamma: f64,
    #[serde(default)]
    alpha: f64,
    #[serde(default)]
    retain_loss: RetainLoss,
}

fn default_beta() -> f64 {
    10.0
}

pub struct Undial {
    beta: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl Undial {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("undial", params)?;
        Ok(Undial {
            beta: p.beta,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

/// The UNDIAL forget loss from trained and reference logits [B, T, V] of the same batch.
pub fn undial_loss(
    logits: &Tensor,
    reference_logits: &Tensor,
    batch: &ItemBatch,
    beta: f64,
) -> Result<Tensor> {
    let pos = answer_positions(&batch.labels)?;
    let z = flat_rows(logits, &pos.rows)?;
    let z_ref = flat_rows(&reference_logits.detach(), &pos.rows)?;
    let hot = one_hot(&pos.targets_tensor(z.device())?, z.dim(1)?)?;
    let q = softmax_last_dim(&(z_ref - (hot * beta)?)?)?;
    soft_cross_entropy(&z, &q)
}

impl Method for Undial {
    fn name(&self) -> &'static str {
        "undial"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let reference = reference_logits(ctx.model, &batch.forget)?;
        let lf = undial_loss(
            &logits(ctx, &batch.forget)?,
            &reference,
            &batch.forget,
            self.beta,
        )?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
