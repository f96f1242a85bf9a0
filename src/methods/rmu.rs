//! RMU (WMDP, arXiv 2403.03218), the token-masked variant of open-unlearning (`rmu.py`):
//!
//!   L = γ·A(h_θ(x_f), c_vec) + α·A(h_θ(x_r), h_ref(x_r))
//!
//! with h the hidden state after decoder layer `layer` (0-based; the residual stream after the
//! block), h_ref the same with the adapter disabled, and c_vec = c·u/‖u‖, u ~ U[0, 1)^d drawn once
//! from our seeded generator (`Rng::new(seed)`, d draws of `next_f64`). The activation loss A is,
//! per sequence, the mean over d of the squared difference summed over the valid tokens
//! (labels ≠ −100) and divided by their count, then averaged over the batch. (open-unlearning
//! divides a \[B\] vector by a \[B, 1\] count, which broadcasts to a \[B, B\] matrix before the mean;
//! we compute the intended per-sequence mean.)
//!
//! The forward stops after `layer` (no LM head), so adapters above it would get no gradient:
//! `prepare` rejects such an adapter and suggests `lora.layers`.
use super::{scalar, Ctx, LossOutput, Method};
use crate::error::{Error, Result};
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::method_params;
use crate::rng::Rng;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_layer")]
    layer: usize,
    #[serde(default = "default_coeff")]
    steering_coeff: f64,
    #[serde(default = "super::one")]
    alpha: f64,
    #[serde(default = "super::one")]
    gamma: f64,
    #[serde(default = "default_seed")]
    seed: u64,
}

pub(crate) fn default_layer() -> usize {
    7
}
pub(crate) fn default_coeff() -> f64 {
    2.0
}
pub(crate) fn default_seed() -> u64 {
    42
}

pub struct Rmu {
    layer: usize,
    coeff: f64,
    alpha: f64,
    gamma: f64,
    seed: u64,
    control: Option<Tensor>,
}

impl Rmu {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("rmu", params)?;
        Ok(Rmu {
            layer: p.layer,
            coeff: p.steering_coeff,
            alpha: p.alpha,
            gamma: p.gamma,
            seed: p.seed,
            control: None,
        })
    }
}

/// c·u/‖u‖ with u_i = the i-th `next_f64` of `Rng::new(seed)`, i < dim.
pub fn steering_vector(dim: usize, coeff: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let u: Vec<f64> = (0..dim).map(|_| rng.next_f64()).collect();
    let norm = u
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    u.iter().map(|x| (coeff * x / norm) as f32).collect()
}

/// The decoder layer of a module path (`model.layers.3.mlp.down_proj` → 3, `transformer.h.5…` → 5).
pub fn layer_of(module_path: &str) -> Option<usize> {
    let parts: Vec<&str> = module_path.split('.').collect();
    parts
        .windows(2)
        .find(|w| matches!(w[0], "layers" | "h") && w[1].parse::<usize>().is_ok())
        .and_then(|w| w[1].parse().ok())
}

/// Adapted modules that the RMU objective at `layer` cannot train (above it, or of no layer).
pub fn modules_without_gradient(model: &Decoder, layer: usize) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|l| l.lora.is_some())
        .filter(|l| layer_of(&l.name).is_none_or(|i| i > layer))
        .map(|l| l.name.clone())
        .collect()
}

/// The checks of an objective that stops its forward after `layer`: the layer exists, and no
/// adapter sits above it (it would get no gradient from that objective).
pub fn check_steered_layer(method: &str, layer: usize, model: &Decoder) -> Result<()> {
    let n = model.layers.len();
    if layer >= n {
        return Err(Error::InvalidArgument(format!(
            "method '{method}': layer {layer} does not exist: the model has {n} layers (0..{})",
            n.saturating_sub(1)
        )));
    }
    let stranded = modules_without_gradient(model, layer);
    if !stranded.is_empty() {
        let lo = layer.saturating_sub(2);
        let suggestion: Vec<String> = (lo..=layer).map(|i| i.to_string()).collect();
        return Err(Error::InvalidArgument(format!(
            "method '{method}': the objective stops after layer {layer}, so these LoRA modules would get no gradient: {}; restrict the adapter to layers ≤ {layer}, e.g. lora.layers = [{}]",
            stranded.join(", "),
            suggestion.join(", ")
        )));
    }
    Ok(())
}

/// Per sequence: Σ_t mask_t · mean_d (h − target)² / Σ_t mask_t, with mask = labels ≠ −100;
/// then the mean over the batch. `target` broadcasts to h [B, T, d].
pub fn masked_activation_mse(h: &Tensor, target: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let counts: Vec<usize> = labels
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?
        .iter()
        .map(|r| r.iter().filter(|&&l| l >= 0).count())
        .collect();
    if counts.contains(&0) {
        return Err(Error::InvalidArgument(
            "method 'rmu': a sequence of the batch has no labelled tokens".into(),
        ));
    }
    let h = h.to_dtype(DType::F32)?;
    let target = target.to_dtype(DType::F32)?;
    let sq = h.broadcast_sub(&target)?.sqr()?.mean(D::Minus1)?;
    let mask = labels.ge(0i64)?.to_dtype(DType::F32)?;
    let n = Tensor::from_vec(
        counts.iter().map(|&c| c as f32).collect::<Vec<_>>(),
        counts.len(),
        h.device(),
    )?;
    let per_seq = ((sq * mask)?.sum(1)? / n)?;
    Ok(per_seq.mean_all()?)
}

impl Rmu {
    fn hidden(&self, model: &Decoder, batch: &ItemBatch, opts: &ForwardOptions) -> Result<Tensor> {
        model.hidden_after_layer(&batch.input(), self.layer, opts)
    }

    /// The forget term A(h_θ(x_f), c_vec).
    pub fn forget_loss(&self, ctx: &Ctx, batch: &ItemBatch) -> Result<Tensor> {
        let control = self.control.as_ref().ok_or_else(|| {
            Error::InvalidArgument("method 'rmu': the steering vector was not prepared".into())
        })?;
        let h = self.hidden(ctx.model, batch, ctx.opts)?;
        masked_activation_mse(&h, control, &batch.labels)
    }

    /// The retain term A(h_θ(x_r), h_ref(x_r)).
    pub fn retain_loss(&self, ctx: &Ctx, batch: &ItemBatch) -> Result<Tensor> {
        activation_drift(ctx.model, batch, self.layer, ctx.opts)
    }
}

/// A(h_θ(x), h_ref(x)): how far the hidden state after `layer` under `opts` has drifted from the
/// adapter-free model's (detached), on the labelled tokens ([`masked_activation_mse`]).
pub fn activation_drift(
    model: &Decoder,
    batch: &ItemBatch,
    layer: usize,
    opts: &ForwardOptions,
) -> Result<Tensor> {
    let h = model.hidden_after_layer(&batch.input(), layer, opts)?;
    let h_ref = model
        .hidden_after_layer(&batch.input(), layer, &ForwardOptions::base_model())?
        .detach();
    masked_activation_mse(&h, &h_ref, &batch.labels)
}

impl Method for Rmu {
    fn name(&self) -> &'static str {
        "rmu"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn prepare(&mut self, model: &Decoder, _forget: &[EncodedExample], _pad_id: u32) -> Result<()> {
        check_steered_layer("rmu", self.layer, model)?;
        let d = model.cfg.hidden_size;
        let v = steering_vector(d, self.coeff, self.seed);
        self.control = Some(Tensor::from_vec(v, d, &model.device)?);
        Ok(())
    }
    /// Not a state (u is re-drawn from the seed): the settings, recorded in every checkpoint.
    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "layer": self.layer,
            "steering_coeff": self.coeff,
            "seed": self.seed,
            "steering_distribution": "uniform[0,1) normalised",
            "mask": "labels != -100, per-sequence mean",
        })
    }
    /// A checkpoint of another layer, coefficient or seed steered toward another target.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let same = |key: &str, now: serde_json::Value| state.get(key).is_none_or(|v| *v == now);
        if !(same("layer", self.layer.into())
            && same("steering_coeff", self.coeff.into())
            && same("seed", self.seed.into()))
        {
            return Err(Error::InvalidArgument(format!(
                "method 'rmu': the checkpoint was trained with {state}, the recipe says layer {}, steering_coeff {}, seed {}",
                self.layer, self.coeff, self.seed
            )));
        }
        Ok(())
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = self.forget_loss(ctx, &batch.forget)?;
        let mut logs = vec![("forget_loss".into(), scalar(&lf)?)];
        let mut loss = (lf * self.gamma)?;
        if self.alpha != 0.0 {
            let lr = self.retain_loss(ctx, batch.retain()?)?;
            logs.push(("retain_loss".into(), scalar(&lr)?));
            loss = (loss + (lr * self.alpha)?)?;
        }
        Ok(LossOutput { loss, logs })
    }
}
