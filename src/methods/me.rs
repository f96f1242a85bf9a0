//! ME+GD (maximum-entropy forgetting; Yuan et al., "A Closer Look at Machine Unlearning for
//! Large Language Models", arXiv 2410.08109):
//!
//!   L_f = mean over the forget batch's answer positions of KL(U ‖ p_θ(· | x, y_<t))
//!       = mean_t [ −log V − (1/V) Σ_v log p_θ(v | x, y_<t) ],  U uniform over the V tokens,
//!   L   = γ·L_f + α·L_r, with L_r the retain NLL (default) or KL(π_ref ‖ π_θ).
//!
//! Unlike gradient ascent or NPO, which only push the gold tokens down (and are free to move the
//! mass onto any junk, e.g. never ending the answer), the minimiser of L_f is a flat next-token
//! distribution: the gold value ends up no more likely than any alternative, which is what a
//! model that never saw the forget set looks like to probability-based evaluations. L_f is 0 at
//! the uniform distribution and bounded below, so it cannot diverge like gradient ascent.
use super::combine_with_retain;
use super::{
    answer_positions, flat_rows, logits, Ctx, LossOutput, Method, RetainLoss, WeightedRetainParams,
};
use crate::error::Result;
use crate::model::ops::log_softmax_last_dim;
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{Tensor, D};

pub struct Me {
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl Me {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: WeightedRetainParams = method_params("me", params)?;
        Ok(Me {
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

/// Mean over the answer positions of KL(U ‖ p_θ): 0 for a flat distribution.
pub fn me_loss(logits: &Tensor, batch: &ItemBatch) -> Result<Tensor> {
    let pos = answer_positions(&batch.labels)?;
    let lp = log_softmax_last_dim(&flat_rows(logits, &pos.rows)?)?;
    let vocab = lp.dim(1)? as f64;
    Ok((lp.mean(D::Minus1)?.neg()? - vocab.ln())?.mean_all()?)
}

impl Method for Me {
    fn name(&self) -> &'static str {
        "me"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = me_loss(&logits(ctx, &batch.forget)?, &batch.forget)?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
