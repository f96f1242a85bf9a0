//! IdkDPO: DPO with an "I don't know" answer as the preferred response (open-unlearning
//! `DPO` trainer with the TOFU idk data):
//!
//!   L_f = −(2/β)·mean_b log σ(β·[r(y_w) − r(y_l)]),   r(y) = ℓ_sum^ref(y) − ℓ_sum^θ(y)
//!
//! with y_w an IDK answer to the same question and y_l the true answer; L = γ·L_f + α·L_r.
//!
//! The IDK answers are the lines of `idk_file` (blank lines skipped), by default a bundled list
//! (`data/idk.txt`). Each forget item gets one answer, drawn once from the seeded generator
//! (`seed`), where open-unlearning draws a fresh one at every access. y_w keeps the forget item's
//! prompt tokens (its leading −100 labels) and appends the IDK answer tokenised as `encode_qa`
//! tokenises answers (no special tokens, then EOS). y_w is not truncated to `data.max_length`
//! (which `prepare` does not see): its prompt is the already-truncated prompt of the forget item,
//! so it is at most one IDK answer longer. The reference ℓ_sum of y_w and y_l (adapter disabled)
//! is computed once in `prepare`.
use super::combine_with_retain;
use super::{log_sigmoid, logits, reference_seq_nll, seq_nll, Ctx, LossOutput, Method, RetainLoss};
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::recipe::method_params;
use crate::rng::Rng;
use crate::tokenizer::{ChatTokenizer, EncodedExample};
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{Tensor, D};
use serde::Deserialize;
use std::path::Path;

/// The bundled "I don't know" answers, one per line.
pub const DEFAULT_IDK: &str = include_str!("../../data/idk.txt");

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
    /// one answer per line; default: the bundled list
    idk_file: Option<String>,
    #[serde(default)]
    seed: u64,
}

fn default_beta() -> f64 {
    0.1
}

pub struct IdkDpo {
    beta: f64,
    gamma: f64,
    alpha: f64,
    retain: RetainLoss,
    seed: u64,
    answers: Vec<String>,
    /// token ids of each answer, EOS included (set by `prepare_text`)
    answer_ids: Vec<Vec<u32>>,
    /// y_w for each forget item
    winners: Vec<EncodedExample>,
    /// which answer each forget item got
    choice: Vec<usize>,
    ref_win: Vec<f64>,
    ref_lose: Vec<f64>,
    pad_id: u32,
}

/// The non-blank lines of a text, trimmed.
pub fn parse_answers(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

impl IdkDpo {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("idkdpo", params)?;
        if p.beta <= 0.0 {
            return Err(Error::InvalidArgument(
                "method 'idkdpo': beta must be > 0".into(),
            ));
        }
        let answers = match &p.idk_file {
            Some(f) => {
                let path = Path::new(f);
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let answers = parse_answers(&text);
                if answers.is_empty() {
                    return Err(Error::data(
                        path,
                        "method 'idkdpo': idk_file has no answers (one per line)",
                    ));
                }
                answers
            }
            None => parse_answers(DEFAULT_IDK),
        };
        Ok(IdkDpo {
            beta: p.beta,
            gamma: p.gamma,
            alpha: p.alpha,
            retain: p.retain_loss,
            seed: p.seed,
            answers,
            answer_ids: vec![],
            winners: vec![],
            choice: vec![],
            ref_win: vec![],
            ref_lose: vec![],
            pad_id: 0,
        })
    }

    /// The IDK answer (text) chosen for each forget item (after `prepare`).
    pub fn chosen_answers(&self) -> Vec<&str> {
        self.choice
            .iter()
            .map(|&k| self.answers[k].as_str())
            .collect()
    }

    /// y_w for each forget item (after `prepare`).
    pub fn winners(&self) -> &[EncodedExample] {
        &self.winners
    }
}

/// −(2/β)·mean log σ(β·[(ref_w − ℓ_w) − (ref_l − ℓ_l)]) for per-sequence summed NLLs \[B\].
pub fn dpo_loss(
    sum_win: &Tensor,
    sum_lose: &Tensor,
    ref_win: &[f64],
    ref_lose: &[f64],
    beta: f64,
) -> Result<Tensor> {
    let dev = sum_win.device();
    let rw = Tensor::from_vec(
        ref_win.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        ref_win.len(),
        dev,
    )?;
    let rl = Tensor::from_vec(
        ref_lose.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        ref_lose.len(),
        dev,
    )?;
    let r_win = (rw - sum_win)?;
    let r_lose = (rl - sum_lose)?;
    let margin = ((r_win - r_lose)? * beta)?;
    Ok((log_sigmoid(&margin)?.mean(D::Minus1)? * (-2.0 / beta))?)
}

impl Method for IdkDpo {
    fn name(&self) -> &'static str {
        "idkdpo"
    }
    fn needs_retain(&self) -> bool {
        self.alpha != 0.0
    }
    fn prepare_text(&mut self, tok: &ChatTokenizer) -> Result<()> {
        let eos = tok.eos_token_id().ok_or_else(|| {
            Error::InvalidArgument(
                "method 'idkdpo': the tokenizer has no EOS token to end the IDK answers".into(),
            )
        })?;
        self.answer_ids = self
            .answers
            .iter()
            .map(|a| {
                let mut ids = tok.encode(a, false)?;
                ids.push(eos);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
    fn prepare(&mut self, model: &Decoder, forget: &[EncodedExample], pad_id: u32) -> Result<()> {
        if self.answer_ids.len() != self.answers.len() || self.answer_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "method 'idkdpo': the IDK answers were not tokenised (prepare_text must run before prepare)".into(),
            ));
        }
        let mut rng = Rng::new(self.seed).fork("idk-answers");
        self.winners = Vec::with_capacity(forget.len());
        self.choice = Vec::with_capacity(forget.len());
        for (i, ex) in forget.iter().enumerate() {
            let prompt_len = ex.labels.iter().take_while(|&&l| l < 0).count();
            if prompt_len == 0 || prompt_len == ex.len() {
                return Err(Error::InvalidArgument(format!(
                    "method 'idkdpo': forget item {} has no question prompt followed by an answer; idkdpo needs question/answer items",
                    i + 1
                )));
            }
            let k = rng.below(self.answers.len());
            let answer = &self.answer_ids[k];
            let mut input_ids = ex.input_ids[..prompt_len].to_vec();
            input_ids.extend_from_slice(answer);
            let mut labels = vec![-100i64; prompt_len];
            labels.extend(answer.iter().map(|&id| i64::from(id)));
            self.winners.push(EncodedExample { input_ids, labels });
            self.choice.push(k);
        }
        self.pad_id = pad_id;
        self.ref_lose = reference_seq_nll(model, forget, pad_id)?;
        self.ref_win = reference_seq_nll(model, &self.winners, pad_id)?;
        Ok(())
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let idx = &batch.forget.indices;
        let lookup = |v: &[f64]| -> Result<Vec<f64>> {
            idx.iter()
                .map(|&i| {
                    v.get(i).copied().ok_or_else(|| {
                        Error::InvalidArgument(
                            "method 'idkdpo': reference log-probs were not prepared".into(),
                        )
                    })
                })
                .collect()
        };
        let ref_lose = lookup(&self.ref_lose)?;
        let ref_win = lookup(&self.ref_win)?;
        let win_ex: Vec<&EncodedExample> = idx.iter().map(|&i| &self.winners[i]).collect();
        let b = crate::score::collate(&win_ex, self.pad_id, &ctx.model.device)?;
        let win = ItemBatch {
            input_ids: b.input_ids,
            attention_mask: b.attention_mask,
            labels: b.labels,
            indices: idx.clone(),
        };
        let (sum_win, _) = seq_nll(&logits(ctx, &win)?, &win)?;
        let (sum_lose, _) = seq_nll(&logits(ctx, &batch.forget)?, &batch.forget)?;
        let lf = dpo_loss(&sum_win, &sum_lose, &ref_win, &ref_lose, self.beta)?;
        combine_with_retain(lf, self.gamma, self.alpha, self.retain, ctx, batch)
    }
}
