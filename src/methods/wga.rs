//! WGA (weighted gradient ascent): L_f = −mean over the batch's answer tokens of
//! [sg(p_t)^β · CE_t], with CE_t = −log p_θ(y_t | y_<t), p_t = exp(−CE_t) and sg a stop-gradient
//! (open-unlearning `compute_wga_loss`). L = γ·L_f + α·L_r, L_r the retain NLL or KL.
use super::combine_with_retain;
use super::{answer_ce, answer_positions, logits, Ctx, LossOutput, Method, RetainLoss};
use crate::error::Result;
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "super::one")]
    beta: f64,
    #[serde(default = "super::one")]
    gamma: f64,
    #[serde(default = "super::one")]
    alpha: f64,
    #[serde(default)]
    retain_loss: RetainLoss,
}

pub struct Wga {
    beta: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl Wga {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("wga", params)?;
        Ok(Wga {
            beta: p.beta,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

/// −mean over answer tokens of [w(sg(p_t)) · CE_t]: the forget term of WGA and SatImp.
/// `weight` maps the detached token probabilities \[M\] to weights \[M\].
pub fn weighted_ascent_loss(
    logits: &Tensor,
    batch: &ItemBatch,
    weight: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let pos = answer_positions(&batch.labels)?;
    let ce = answer_ce(logits, &pos)?;
    let p = ce.detach().neg()?.exp()?;
    let w = weight(&p)?.detach();
    Ok((w * ce)?.mean_all()?.neg()?)
}

/// The WGA forget loss.
pub fn wga_loss(logits: &Tensor, batch: &ItemBatch, beta: f64) -> Result<Tensor> {
    weighted_ascent_loss(logits, batch, |p| Ok(p.powf(beta)?))
}

impl Method for Wga {
    fn name(&self) -> &'static str {
        "wga"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = wga_loss(&logits(ctx, &batch.forget)?, &batch.forget, self.beta)?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
