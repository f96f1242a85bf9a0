//! NPO (arXiv 2404.05868): L_f = −(2/β)·mean_b log σ(β·(ℓ_sum^θ − ℓ_sum^ref)), with summed
//! (not length-normalised) answer NLLs; L = γ·L_f + α·L_r. The reference is the model with
//! the adapter disabled; its ℓ_sum on the fixed forget set is computed once in `prepare`.
use super::combine_with_retain;
use super::{log_sigmoid, logits, reference_seq_nll, seq_nll, Ctx, LossOutput, Method, RetainLoss};
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::recipe::method_params;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{Tensor, D};
use serde::Deserialize;

pub fn default_beta() -> f64 {
    0.1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default = "super::one")]
    gamma: f64,
    #[serde(default = "super::one")]
    alpha: f64,
    #[serde(default)]
    retain_loss: RetainLoss,
}

pub struct Npo {
    beta: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
    reference: Vec<f64>,
}

impl Npo {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("npo", params)?;
        if p.beta <= 0.0 {
            return Err(Error::InvalidArgument(
                "method 'npo': beta must be > 0".into(),
            ));
        }
        Ok(Npo {
            beta: p.beta,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
            reference: vec![],
        })
    }
}

/// The NPO forget loss on logits of the trained model; `reference[i]` is ℓ_sum^ref of forget item i.
pub fn npo_loss(
    logits: &Tensor,
    batch: &ItemBatch,
    reference: &[f64],
    beta: f64,
) -> Result<Tensor> {
    let (sums, _) = seq_nll(logits, batch)?;
    let refs: Vec<f32> = batch
        .indices
        .iter()
        .map(|&i| {
            reference.get(i).map(|&v| v as f32).ok_or_else(|| {
                Error::InvalidArgument("NPO reference log-probs were not prepared".into())
            })
        })
        .collect::<Result<_>>()?;
    let refs = Tensor::from_vec(refs, sums.dims(), sums.device())?;
    let ratio = ((sums - refs)? * beta)?;
    Ok((log_sigmoid(&ratio)?.mean(D::Minus1)? * (-2.0 / beta))?)
}

impl Method for Npo {
    fn name(&self) -> &'static str {
        "npo"
    }
    fn prepare(&mut self, model: &Decoder, forget: &[EncodedExample], pad_id: u32) -> Result<()> {
        self.reference = reference_seq_nll(model, forget, pad_id)?;
        Ok(())
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = npo_loss(
            &logits(ctx, &batch.forget)?,
            &batch.forget,
            &self.reference,
            self.beta,
        )?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
}
