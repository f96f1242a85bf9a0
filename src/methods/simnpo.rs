//! SimNPO (arXiv 2410.07163): L_f = −(2/β)·mean log σ(β·(ℓ_sum/|y| − δ)), no reference model;
//! |y| counts the labelled tokens of the unshifted labels, as open-unlearning does.
//! L = γ·L_f + α·L_r.
use super::combine_with_retain;
use super::{log_sigmoid, logits, seq_nll, Ctx, LossOutput, Method, RetainLoss};
use crate::error::{Error, Result};
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;

pub fn default_beta() -> f64 {
    4.5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default)]
    delta: f64,
    /// TOFU forget10 default
    #[serde(default = "default_gamma")]
    gamma: f64,
    #[serde(default = "super::one")]
    alpha: f64,
    #[serde(default)]
    retain_loss: RetainLoss,
}

fn default_gamma() -> f64 {
    0.125
}

pub struct SimNpo {
    beta: f64,
    delta: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
}

impl SimNpo {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("simnpo", params)?;
        if p.beta <= 0.0 {
            return Err(Error::InvalidArgument(
                "method 'simnpo': beta must be > 0".into(),
            ));
        }
        Ok(SimNpo {
            beta: p.beta,
            delta: p.delta,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
        })
    }
}

pub fn simnpo_loss(logits: &Tensor, batch: &ItemBatch, beta: f64, delta: f64) -> Result<Tensor> {
    let (sums, _) = seq_nll(logits, batch)?;
    let lengths = batch
        .labels
        .ge(0i64)?
        .to_dtype(DType::F32)?
        .sum(D::Minus1)?;
    let normalised = ((sums / lengths)? - delta)?;
    Ok((log_sigmoid(&(normalised * beta)?)?.mean(D::Minus1)? * (-2.0 / beta))?)
}

impl Method for SimNpo {
    fn name(&self) -> &'static str {
        "simnpo"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = simnpo_loss(
            &logits(ctx, &batch.forget)?,
            &batch.forget,
            self.beta,
            self.delta,
        )?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
