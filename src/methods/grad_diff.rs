//! GradDiff: L = γ·(−NLL(x_f)) + α·L_r, with L_r the retain NLL or KL(π_ref‖π_θ).
use super::{
    logits, mean_nll, retain_loss, scalar, Ctx, LossOutput, Method, RetainLoss,
    WeightedRetainParams,
};
use crate::error::Result;
use crate::recipe::method_params;
use crate::train::batch::PairedBatch;

pub struct GradDiff {
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl GradDiff {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: WeightedRetainParams = method_params("graddiff", params)?;
        Ok(GradDiff {
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

impl Method for GradDiff {
    fn name(&self) -> &'static str {
        "graddiff"
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let forget_nll = mean_nll(&logits(ctx, &batch.forget)?, &batch.forget)?;
        let retain = retain_loss(self.retain, ctx, batch.retain()?)?;
        let logs = vec![
            ("forget_nll".into(), scalar(&forget_nll)?),
            ("retain_loss".into(), scalar(&retain)?),
        ];
        let loss = ((forget_nll.neg()? * self.gamma)? + (retain * self.alpha)?)?;
        Ok(LossOutput { loss, logs })
    }
}
