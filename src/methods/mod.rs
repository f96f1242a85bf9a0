//! Unlearning methods. Each is one file implementing [`Method`]; the trainer knows none of them
//! by name and only calls [`build`]. Formulas and defaults: open-unlearning, see
//! `shared/reference/algorithms.md`.
use crate::error::{Error, Result};
use crate::model::ops::causal_lm_loss;
use crate::model::{Decoder, ForwardOptions};
use crate::score::row_nll;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{DType, Tensor, Var, D};
use serde::Deserialize;

pub mod ce_u;
pub mod dmm;
pub mod eupmu;
pub mod grad_ascent;
pub mod grad_diff;
pub mod idk_dpo;
pub mod me;
pub mod npo;
pub mod oracle;
pub mod rmu;
pub mod satimp;
pub mod simnpo;
pub mod surgery;
pub mod undial;
pub mod wga;

/// serde default for the weights (γ, α, …) that default to 1
pub(crate) fn one() -> f64 {
    1.0
}

/// Named values a method reports for one step (written to metrics.jsonl).
pub type Logs = Vec<(String, f64)>;

/// What a method sees of the run at each micro-batch.
pub struct Ctx<'a> {
    pub model: &'a Decoder,
    /// the trainable LoRA variables, in a fixed order
    pub vars: &'a [Var],
    /// forward options for the trained model (dropout generator for this micro-batch)
    pub opts: &'a ForwardOptions,
    /// 0-based optimizer step and micro-batch within it
    pub step: usize,
    pub micro: usize,
}

pub struct LossOutput {
    /// scalar to minimise
    pub loss: Tensor,
    pub logs: Logs,
}

pub trait Method {
    fn name(&self) -> &'static str;

    /// Whether the method needs retain batches.
    fn needs_retain(&self) -> bool {
        true
    }

    /// One-time work that needs the tokenizer (e.g. tokenising alternative answers); the trainer
    /// calls it before [`Method::prepare`].
    fn prepare_text(&mut self, _tok: &crate::tokenizer::ChatTokenizer) -> Result<()> {
        Ok(())
    }

    /// One-time work before training, e.g. caching reference log-probs of the fixed forget set.
    fn prepare(
        &mut self,
        _model: &Decoder,
        _forget: &[EncodedExample],
        _pad_id: u32,
    ) -> Result<()> {
        Ok(())
    }

    /// The objective on one micro-batch.
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput>;

    /// Gradients of the step's objective for `ctx.vars`. The default is the backward of
    /// [`Method::loss`]; methods that combine several gradients override it.
    fn gradients(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<(Vec<Tensor>, Logs)> {
        let out = self.loss(ctx, batch)?;
        let loss_value = scalar(&out.loss)?;
        let mut logs = vec![("loss".to_string(), loss_value)];
        logs.extend(out.logs);
        if !loss_value.is_finite() {
            return Ok((vec![], logs));
        }
        Ok((grads_of(&out.loss, ctx.vars)?, logs))
    }

    /// After the optimizer step, with every micro-batch of the step (dual updates).
    fn after_update(&mut self, _ctx: &Ctx, _batches: &[PairedBatch]) -> Result<Logs> {
        Ok(vec![])
    }

    /// State to checkpoint (e.g. a dual variable) and restore.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// The available methods: (recipe name, one-line description).
pub const METHODS: &[(&str, &str)] = &[
    ("gradascent", "gradient ascent on the forget NLL"),
    (
        "graddiff",
        "gradient ascent on forget + descent on retain (NLL or KL to the base model)",
    ),
    (
        "npo",
        "negative preference optimisation against the adapter-free reference",
    ),
    ("simnpo", "reference-free NPO on length-normalised NLL"),
    (
        "me",
        "ME+GD: forget answers pushed to a flat next-token distribution, retain NLL or KL",
    ),
    (
        "eupmu",
        "constrained forgetting by implicit gradient surgery (dual variable on the retain loss)",
    ),
    (
        "surgery",
        "explicit unilateral gradient surgery baseline (two backward passes)",
    ),
    (
        "wga",
        "weighted gradient ascent: answer-token CE weighted by the detached p^beta",
    ),
    (
        "satimp",
        "SatImp: answer-token CE weighted by the detached p^beta1 (1-p)^beta2",
    ),
    (
        "undial",
        "UNDIAL: self-distillation to reference logits with the gold token lowered by beta",
    ),
    (
        "ceu",
        "CE-U: cross-entropy to the model's own detached distribution without the gold token",
    ),
    (
        "idkdpo",
        "DPO preferring an \"I don't know\" answer over the true answer",
    ),
    (
        "rmu",
        "RMU: steer a layer's forget activations to a random vector, anchor retain activations",
    ),
    (
        "oracle",
        "logit matching to a teacher checkpoint (MSE or KL), e.g. a retrained oracle",
    ),
    (
        "dmm",
        "datamodel matching: logits matched to a predicted retrained model (shadow adapter) or an oracle",
    ),
];

/// Build a method from its recipe name and parameters (unknown parameters are errors).
pub fn build(name: &str, params: &toml::Table) -> Result<Box<dyn Method>> {
    Ok(match name {
        "gradascent" | "ga" => Box::new(grad_ascent::GradAscent::from_params(params)?),
        "graddiff" => Box::new(grad_diff::GradDiff::from_params(params)?),
        "npo" => Box::new(npo::Npo::from_params(params)?),
        "simnpo" => Box::new(simnpo::SimNpo::from_params(params)?),
        "eupmu" => Box::new(eupmu::Eupmu::from_params(params)?),
        "surgery" => Box::new(surgery::Surgery::from_params(params)?),
        "wga" => Box::new(wga::Wga::from_params(params)?),
        "satimp" => Box::new(satimp::SatImp::from_params(params)?),
        "undial" => Box::new(undial::Undial::from_params(params)?),
        "ceu" | "ce-u" => Box::new(ce_u::CeU::from_params(params)?),
        "idkdpo" => Box::new(idk_dpo::IdkDpo::from_params(params)?),
        "rmu" => Box::new(rmu::Rmu::from_params(params)?),
        "oracle" => Box::new(oracle::Oracle::from_params(params)?),
        "dmm" => Box::new(dmm::Dmm::from_params(params)?),
        "me" => Box::new(me::Me::from_params(params)?),
        other => {
            let names: Vec<&str> = METHODS.iter().map(|m| m.0).collect();
            return Err(Error::InvalidArgument(format!(
                "unknown method '{other}'; available: {}",
                names.join(", ")
            )));
        }
    })
}

// ---- shared pieces ----------------------------------------------------------------------

pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
}

/// Logits of the trained model (LoRA on) for a batch.
pub fn logits(ctx: &Ctx, batch: &ItemBatch) -> Result<Tensor> {
    ctx.model.forward(&batch.input(), ctx.opts)
}

/// Logits of the reference model: the same weights with the adapter disabled (no graph).
pub fn reference_logits(model: &Decoder, batch: &ItemBatch) -> Result<Tensor> {
    model.forward(&batch.input(), &ForwardOptions::base_model())
}

/// NLL over all answer tokens of the batch, flattened (transformers' `outputs.loss`).
pub fn mean_nll(logits: &Tensor, batch: &ItemBatch) -> Result<Tensor> {
    Ok(causal_lm_loss(logits, &batch.labels)?)
}

/// Per-sequence summed NLL ℓ_sum \[B\] and scored-token counts \[B\].
pub fn seq_nll(logits: &Tensor, batch: &ItemBatch) -> Result<(Tensor, Tensor)> {
    row_nll(logits, &batch.labels)
}

/// log σ(x) with the exact gradient σ(−x) everywhere.
///
/// The stable closed form −(max(−x, 0) + log(1 + e^{−|x|})) has kinks (relu, abs) whose
/// autograd derivative at x = 0 is wrong — and NPO starts exactly at x = 0 (adapter off ≡
/// reference), where it would get no gradient at all. So the value comes from the stable form
/// on a detached copy and the gradient is attached as σ(−x)·(x − sg(x)), which is 0 in value.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let stable = |v: &Tensor| -> Result<Tensor> {
        let relu_neg = v.neg()?.relu()?;
        let tail = (v.abs()?.neg()?.exp()? + 1.0)?.log()?;
        Ok((relu_neg + tail)?.neg()?)
    };
    let value = stable(&xd)?;
    let slope = stable(&xd.neg()?)?.exp()?; // σ(−x)
    Ok((value + (slope * (x - &xd)?)?)?)
}

/// Gradients of `loss` for every var; a missing gradient is a cut graph and an error.
pub fn grads_of(loss: &Tensor, vars: &[Var]) -> Result<Vec<Tensor>> {
    let store = loss.backward()?;
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            // candle leaves a variable's gradient attached to the forward graph (when the
            // activations it was multiplied with are tracked, as with full-parameter training);
            // detached, the optimizer's moments do not chain every step's graph together.
            store.get(v.as_tensor()).map(Tensor::detach).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "trainable tensor #{i} received no gradient: the objective does not depend on it (e.g. RMU with adapters above the chosen layer)"
                ))
            })
        })
        .collect()
}

/// The retain term of GradDiff-style objectives.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetainLoss {
    #[default]
    Nll,
    /// KL(π_ref ‖ π_θ) on the retain batch, with π_ref the adapter-free model
    Kl,
}

/// NLL: mean over answer tokens. KL: Σ_v p_ref (log p_ref − log p_θ) summed over every
/// position and divided by B·T, prompt and padding included (open-unlearning's
/// `kl_div(..., reduction="batchmean")` on flattened logits).
pub fn retain_loss(kind: RetainLoss, ctx: &Ctx, batch: &ItemBatch) -> Result<Tensor> {
    let lg = logits(ctx, batch)?;
    match kind {
        RetainLoss::Nll => mean_nll(&lg, batch),
        RetainLoss::Kl => {
            let reference = reference_logits(ctx.model, batch)?;
            kl_ref_model(&reference, &lg)
        }
    }
}

pub fn kl_ref_model(reference_logits: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    let lp_ref = crate::model::ops::log_softmax_last_dim(&reference_logits.to_dtype(DType::F32)?)?;
    let lp = crate::model::ops::log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let kl = (lp_ref.exp()? * (lp_ref - lp)?)?
        .sum(D::Minus1)?
        .sum_all()?;
    Ok((kl / (b * t) as f64)?)
}

/// The parameters of a γ·L_f + α·L_r objective that has no others (GradDiff, ME).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightedRetainParams {
    #[serde(default = "one")]
    pub gamma: f64,
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default)]
    pub retain_loss: RetainLoss,
}

/// γ·L_f (+ α·L_r when α ≠ 0), with the usual logs.
pub fn combine_with_retain(
    lf: Tensor,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
    ctx: &Ctx,
    batch: &PairedBatch,
) -> Result<LossOutput> {
    let mut logs = vec![("forget_loss".into(), scalar(&lf)?)];
    let mut loss = (lf * gamma)?;
    if alpha != 0.0 {
        let lr = retain_loss(retain, ctx, batch.retain()?)?;
        logs.push(("retain_loss".into(), scalar(&lr)?));
        loss = (loss + (lr * alpha)?)?;
    }
    Ok(LossOutput { loss, logs })
}

/// The forget term shared by the constrained methods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ForgetLoss {
    /// −NLL(x_f)
    Ga,
    /// NPO with the adapter-free reference (reference ℓ_sum computed once per forget item)
    Npo { beta: f64 },
    /// SimNPO
    Simnpo { beta: f64, delta: f64 },
    /// KL(uniform ‖ π_θ) on the answer tokens (ME)
    Me,
    /// RMU's forget term divided by c²/d (so ≈ 1 at the start, 0 at the target): the hidden
    /// state after a layer, on the answer tokens, steered to a fixed random vector of norm c
    /// (no logits: the forward stops at that layer)
    Rmu(SteerTerm),
}

/// The forget-term keys of the constrained methods (eupmu, surgery).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetKeys {
    #[serde(default = "default_forget_loss")]
    forget_loss: String,
    beta: Option<f64>,
    delta: Option<f64>,
    layer: Option<usize>,
    steering_coeff: Option<f64>,
    steering_seed: Option<u64>,
}

const FORGET_KEYS: &[&str] = &[
    "forget_loss",
    "beta",
    "delta",
    "layer",
    "steering_coeff",
    "steering_seed",
];

fn default_forget_loss() -> String {
    "npo".into()
}

/// Where and how hard [`ForgetLoss::Rmu`] steers: the hidden state after decoder layer `layer`
/// (0-based) toward c·u/‖u‖, u drawn from `Rng::new(seed)` ([`rmu::steering_vector`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteerTerm {
    pub layer: usize,
    pub steering_coeff: f64,
    pub seed: u64,
}

impl SteerTerm {
    /// The factor d/c² that brings RMU's activation distances (≈ c²/d for a hidden state small
    /// next to the steering vector) to order 1.
    pub fn per_unit(&self, hidden_size: usize) -> f64 {
        hidden_size as f64 / (self.steering_coeff * self.steering_coeff)
    }
}

impl ForgetLoss {
    /// From recipe keys `forget_loss = "ga" | "npo" | "simnpo" | "me" | "rmu"`, `beta`, `delta`
    /// and, for `rmu` only, `layer`, `steering_coeff`, `steering_seed` (each defaulting to the
    /// `rmu` method's).
    fn from_keys(method: &str, k: ForgetKeys) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("method '{method}': {m}")));
        let (name, beta, delta) = (k.forget_loss.as_str(), k.beta, k.delta);
        let steer_given =
            k.layer.is_some() || k.steering_coeff.is_some() || k.steering_seed.is_some();
        if name == "rmu" {
            if beta.is_some() || delta.is_some() {
                return bad("beta/delta do not apply to forget_loss = \"rmu\"".into());
            }
            let term = SteerTerm {
                layer: k.layer.unwrap_or(rmu::default_layer()),
                steering_coeff: k.steering_coeff.unwrap_or(rmu::default_coeff()),
                seed: k.steering_seed.unwrap_or(rmu::default_seed()),
            };
            if !(term.steering_coeff.is_finite() && term.steering_coeff > 0.0) {
                return bad("steering_coeff must be > 0".into());
            }
            return Ok(ForgetLoss::Rmu(term));
        }
        if steer_given {
            return bad(format!(
                "layer/steering_coeff/steering_seed apply only to forget_loss = \"rmu\", not \"{name}\""
            ));
        }
        match name {
            "ga" | "gradascent" => {
                if beta.is_some() || delta.is_some() {
                    return bad("beta/delta do not apply to forget_loss = \"ga\"".into());
                }
                Ok(ForgetLoss::Ga)
            }
            "npo" => {
                if delta.is_some() {
                    return bad("delta does not apply to forget_loss = \"npo\"".into());
                }
                Ok(ForgetLoss::Npo {
                    beta: beta.unwrap_or(npo::default_beta()),
                })
            }
            "me" => {
                if beta.is_some() || delta.is_some() {
                    return bad("beta/delta do not apply to forget_loss = \"me\"".into());
                }
                Ok(ForgetLoss::Me)
            }
            "simnpo" => Ok(ForgetLoss::Simnpo {
                beta: beta.unwrap_or(simnpo::default_beta()),
                delta: delta.unwrap_or(0.0),
            }),
            other => bad(format!(
                "unknown forget_loss '{other}' (use ga, npo, simnpo, me or rmu)"
            )),
        }
    }

    /// The forget term of a constrained method's `[method]` table (`forget_loss`, default npo,
    /// and its keys), and the table's other keys for the method's own parameters.
    pub fn from_method_table(method: &str, params: &toml::Table) -> Result<(Self, toml::Table)> {
        let (keys, rest): (toml::Table, toml::Table) = params
            .clone()
            .into_iter()
            .partition(|(k, _)| FORGET_KEYS.contains(&k.as_str()));
        let k: ForgetKeys = crate::recipe::method_params(method, &keys)?;
        Ok((Self::from_keys(method, k)?, rest))
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, ForgetLoss::Npo { .. })
    }

    /// Checks against the model, before training: for `rmu`, the steered layer exists and no
    /// adapter sits above it (only the retain term would train it, and nothing once λ reaches 0:
    /// the trainer refuses variables without a gradient).
    pub fn check(&self, method: &str, model: &Decoder) -> Result<()> {
        if let ForgetLoss::Rmu(s) = self {
            rmu::check_steered_layer(&format!("{method}, forget_loss rmu"), s.layer, model)?;
        }
        Ok(())
    }
}

/// Per-item reference ℓ_sum of the forget set (adapter disabled), computed once.
pub fn reference_seq_nll(
    model: &Decoder,
    forget: &[EncodedExample],
    pad_id: u32,
) -> Result<Vec<f64>> {
    let mut out = vec![0.0; forget.len()];
    let idx: Vec<usize> = (0..forget.len()).collect();
    for chunk in idx.chunks(8) {
        let ex: Vec<&EncodedExample> = chunk.iter().map(|&i| &forget[i]).collect();
        let b = crate::score::collate(&ex, pad_id, &model.device)?;
        let lg = model.forward(
            &crate::model::ModelInput::new(&b.input_ids, Some(&b.attention_mask)),
            &ForwardOptions::base_model(),
        )?;
        let (sums, _) = row_nll(&lg, &b.labels)?;
        for (k, v) in sums
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .enumerate()
        {
            out[chunk[k]] = v;
        }
    }
    Ok(out)
}

/// Evaluate a [`ForgetLoss`] on a forget batch. `reference` holds the cached ℓ_sum^ref for NPO.
pub fn forget_term(
    kind: ForgetLoss,
    ctx: &Ctx,
    batch: &ItemBatch,
    reference: &[f64],
) -> Result<Tensor> {
    if let ForgetLoss::Rmu(s) = kind {
        let h = ctx
            .model
            .hidden_after_layer(&batch.input(), s.layer, ctx.opts)?;
        let d = h.dim(candle_core::D::Minus1)?;
        let control = Tensor::from_vec(
            rmu::steering_vector(d, s.steering_coeff, s.seed),
            d,
            h.device(),
        )?;
        // Times d/c²: the term is ≈ 1 while h is small next to c and falls to 0 as h reaches c,
        // the scale of the other forget losses, so that λ (which weighs the retain loss against
        // it) keeps its meaning; the raw term (≈ c²/d, 833 for c = 400 and d = 192) would swamp
        // any λ in the first steps.
        let raw = rmu::masked_activation_mse(&h, &control, &batch.labels)?;
        return Ok((raw * s.per_unit(d))?);
    }
    let lg = logits(ctx, batch)?;
    match kind {
        ForgetLoss::Ga => Ok(mean_nll(&lg, batch)?.neg()?),
        ForgetLoss::Npo { beta } => npo::npo_loss(&lg, batch, reference, beta),
        ForgetLoss::Simnpo { beta, delta } => simnpo::simnpo_loss(&lg, batch, beta, delta),
        ForgetLoss::Me => me::me_loss(&lg, batch),
        ForgetLoss::Rmu(_) => unreachable!("handled above: no logits"),
    }
}

// ---- shared pieces for token-level objectives (wga, satimp, undial, ce_u, oracle) ----------

/// The answer positions of a batch in next-token form: position (b, t) of the logits predicts
/// labels[b, t + 1], and carries a loss when that label is not −100.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerPositions {
    /// flat row b·T + t of the logits reshaped to [B·T, V]
    pub rows: Vec<u32>,
    /// the gold next token labels[b, t + 1]
    pub targets: Vec<u32>,
    /// 0-based rank of the position among the answer tokens of its sequence
    pub rank: Vec<usize>,
}

impl AnswerPositions {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Keep the positions for which `keep` is true.
    pub fn filter(&self, keep: impl Fn(usize) -> bool) -> AnswerPositions {
        let mut out = AnswerPositions {
            rows: vec![],
            targets: vec![],
            rank: vec![],
        };
        for i in 0..self.rows.len() {
            if keep(i) {
                out.rows.push(self.rows[i]);
                out.targets.push(self.targets[i]);
                out.rank.push(self.rank[i]);
            }
        }
        out
    }
    /// The gold ids as a u32 tensor \[M\].
    pub fn targets_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.targets.clone(),
            self.targets.len(),
            device,
        )?)
    }
}

/// The answer positions of labels [B, T] (i64, −100 = no loss).
pub fn answer_positions(labels: &Tensor) -> Result<AnswerPositions> {
    let rows_v = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut out = AnswerPositions {
        rows: vec![],
        targets: vec![],
        rank: vec![],
    };
    for (b, row) in rows_v.iter().enumerate() {
        let t_len = row.len();
        let mut rank = 0;
        for t in 0..t_len.saturating_sub(1) {
            let l = row[t + 1];
            if l >= 0 {
                out.rows.push((b * t_len + t) as u32);
                out.targets.push(l as u32);
                out.rank.push(rank);
                rank += 1;
            }
        }
    }
    Ok(out)
}

/// Rows `rows` of a [B, T, V] tensor flattened to [B·T, V], as f32 [M, V].
pub fn flat_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (b, t, v) = x.dims3()?;
    if rows.is_empty() {
        return Err(Error::InvalidArgument(
            "the batch has no positions to compute a loss on".into(),
        ));
    }
    let idx = Tensor::from_vec(rows.to_vec(), rows.len(), x.device())?;
    Ok(x.to_dtype(DType::F32)?
        .reshape((b * t, v))?
        .index_select(&idx, 0)?)
}

/// One-hot rows \[M, V\] (f32) of `targets` \[M\] (u32).
pub fn one_hot(targets: &Tensor, vocab: usize) -> Result<Tensor> {
    let m = targets.dim(0)?;
    let range = Tensor::arange(0u32, vocab as u32, targets.device())?.reshape((1, vocab))?;
    Ok(range
        .broadcast_eq(&targets.reshape((m, 1))?)?
        .to_dtype(DType::F32)?)
}

/// Per-position cross-entropy CE_t = −log p_θ(y_t) \[M\] at the answer positions, from logits
/// [B, T, V].
pub fn answer_ce(logits: &Tensor, pos: &AnswerPositions) -> Result<Tensor> {
    let z = flat_rows(logits, &pos.rows)?;
    let m = pos.len();
    let idx = Tensor::from_vec(pos.targets.clone(), (m, 1), z.device())?;
    Ok(crate::model::ops::log_softmax_last_dim(&z)?
        .gather(&idx, 1)?
        .squeeze(1)?
        .neg()?)
}

/// Mean over positions of the soft cross-entropy −Σ_v q_v log p_v, with `q` [M, V] a constant
/// target distribution and `z` [M, V] the trained logits.
pub fn soft_cross_entropy(z: &Tensor, q: &Tensor) -> Result<Tensor> {
    let lp = crate::model::ops::log_softmax_last_dim(z)?;
    Ok((q.detach() * lp)?.sum(D::Minus1)?.mean_all()?.neg()?)
}
