//! SatImp: L_f = −mean over the batch's answer tokens of [sg(p_t^β1 · (1 − p_t)^β2) · CE_t]
//! (open-unlearning `satimp.py`). L = γ·L_f + α·L_r.
//!
//! Defaults follow open-unlearning's trainer config (β1 = 5, β2 = 1, γ = 0.1, α = 1); its README
//! says γ = 1, α = 0.1, which conflicts with the config.
use super::combine_with_retain;
use super::wga::weighted_ascent_loss;
use super::{logits, Ctx, LossOutput, Method, RetainLoss};
use crate::error::Result;
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_beta1")]
    beta1: f64,
    #[serde(default = "super::one")]
    beta2: f64,
    #[serde(default = "default_gamma")]
    gamma: f64,
    #[serde(default = "super::one")]
    alpha: f64,
    #[serde(default)]
    retain_loss: RetainLoss,
}

fn default_beta1() -> f64 {
    5.0
}
fn default_gamma() -> f64 {
    0.1
}

pub struct SatImp {
    beta1: f64,
    beta2: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl SatImp {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("satimp", params)?;
        Ok(SatImp {
            beta1: p.beta1,
            beta2: p.beta2,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

/// The SatImp forget loss.
pub fn satimp_loss(logits: &Tensor, batch: &ItemBatch, beta1: f64, beta2: f64) -> Result<Tensor> {
    weighted_ascent_loss(logits, batch, |p| {
        // 1 − p ≥ 0 up to rounding; clamp so a fractional β2 cannot produce NaN
        let q = p.affine(-1.0, 1.0)?.relu()?;
        Ok((p.powf(beta1)? * q.powf(beta2)?)?)
    })
}

impl Method for SatImp {
    fn name(&self) -> &'static str {
        "satimp"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = satimp_loss(
            &logits(ctx, &batch.forget)?,
            &batch.forget,
            self.beta1,
            self.beta2,
        )?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
