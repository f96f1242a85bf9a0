//! Oracle logit matching: train the adapter so the model's next-token logits match those of a
//! teacher checkpoint (e.g. a model retrained without the forget set: "oracle matching", the
//! upper bound of datamodel matching, arXiv 2410.23232).
//!
//!   L = M(x_f) + retain_weight · M(x_r)
//!
//! each M a mean over the non-padding positions (attention mask 1, prompt included) of its batch,
//! or with `positions = "answer"` only over the positions that predict an answer token (the
//! prompt's logits are then free, which leaves the adapter's capacity to the answers):
//! - `loss = "mse"` (default): mean over positions and vocabulary of (z_θ − z_teacher)²;
//! - `loss = "kl"`: KL(teacher ‖ student) = Σ_v p_T (log p_T − log p_θ) per position.
//!
//! `top_k = k` restricts every position to the teacher's k largest logits: MSE over those k
//! entries, and KL between the teacher and student distributions renormalised over those k tokens.
//! The teacher is loaded once (f32, no adapter) and must have the model's vocabulary size; its
//! logits are computed per batch.
use super::{logits, scalar, Ctx, LossOutput, Method};
use crate::error::{Error, Result};
use crate::model::ops::log_softmax_last_dim;
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::method_params;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MatchLoss {
    #[default]
    Mse,
    Kl,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// teacher model directory
    teacher: String,
    #[serde(default)]
    loss: MatchLoss,
    #[serde(default = "super::one")]
    retain_weight: f64,
    top_k: Option<usize>,
    #[serde(default)]
    positions: MatchPositions,
}

/// Which positions' logits are matched: every non-padding position (prompt included) or only
/// those that predict an answer token.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MatchPositions {
    #[default]
    All,
    Answer,
}

/// The [B, T] mask of the positions whose next token is an answer token (labels[b, t + 1] ≥ 0).
pub fn answer_mask(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let mut out = vec![0u32; b * t];
    for row in super::answer_positions(labels)?.rows {
        out[row as usize] = 1;
    }
    Ok(Tensor::from_vec(out, (b, t), labels.device())?)
}

pub struct Oracle {
    teacher_path: String,
    loss: MatchLoss,
    retain_weight: f64,
    top_k: Option<usize>,
    positions: MatchPositions,
    teacher: Option<Decoder>,
}

impl Oracle {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("oracle", params)?;
        if p.top_k == Some(0) {
            return Err(Error::InvalidArgument(
                "method 'oracle': top_k must be ≥ 1".into(),
            ));
        }
        if !(p.retain_weight >= 0.0 && p.retain_weight.is_finite()) {
            return Err(Error::InvalidArgument(
                "method 'oracle': retain_weight must be ≥ 0".into(),
            ));
        }
        Ok(Oracle {
            teacher_path: p.teacher,
            loss: p.loss,
            retain_weight: p.retain_weight,
            top_k: p.top_k,
            positions: p.positions,
            teacher: None,
        })
    }

    fn teacher_logits(&self, batch: &ItemBatch) -> Result<Tensor> {
        let teacher = self.teacher.as_ref().ok_or_else(|| {
            Error::InvalidArgument("method 'oracle': the teacher was not loaded".into())
        })?;
        teacher_forward(teacher, batch, &ForwardOptions::base_model())
    }

    /// M(x) for one batch: student logits against the teacher's.
    pub fn batch_term(&self, ctx: &Ctx, batch: &ItemBatch) -> Result<Tensor> {
        let teacher = self.teacher_logits(batch)?;
        let student = logits(ctx, batch)?;
        let mask = match self.positions {
            MatchPositions::All => batch.attention_mask.clone(),
            MatchPositions::Answer => answer_mask(&batch.labels)?,
        };
        match_loss(&student, &teacher, &mask, self.loss, self.top_k)
    }
}

/// A teacher's logits for a micro-batch, on the teacher's device, without a graph.
pub fn teacher_forward(
    teacher: &Decoder,
    batch: &ItemBatch,
    opts: &ForwardOptions,
) -> Result<Tensor> {
    let input_ids = batch.input_ids.to_device(&teacher.device)?;
    let mask = batch.attention_mask.to_device(&teacher.device)?;
    Ok(teacher
        .forward(
            &crate::model::ModelInput::new(&input_ids, Some(&mask)),
            opts,
        )?
        .detach())
}

/// A teacher's logits can be matched with the model's: the same vocabulary, and `top_k` within
/// it. `what` names the teacher in the message, `tail` ends the vocabulary message.
pub fn check_teacher(
    method: &str,
    what: &str,
    teacher: &Decoder,
    model: &Decoder,
    top_k: Option<usize>,
    tail: &str,
) -> Result<()> {
    if teacher.cfg.vocab_size != model.cfg.vocab_size {
        return Err(Error::InvalidArgument(format!(
            "method '{method}': {what} has vocabulary size {}, the model {}{tail}",
            teacher.cfg.vocab_size, model.cfg.vocab_size
        )));
    }
    if let Some(k) = top_k {
        if k > model.cfg.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "method '{method}': top_k = {k} exceeds the vocabulary size {}",
                model.cfg.vocab_size
            )));
        }
    }
    Ok(())
}

/// Indices [M, k] of the k largest entries of each row (ties: lower index first).
fn top_k_indices(z: &Tensor, k: usize) -> Result<Tensor> {
    let rows = z.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let m = rows.len();
    let mut out = Vec::with_capacity(m * k);
    for row in &rows {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        out.extend(idx);
    }
    Ok(Tensor::from_vec(out, (m, k), z.device())?)
}

/// The matching loss between student and teacher logits [B, T, V] over the positions where
/// `attention_mask` [B, T] is 1.
pub fn match_loss(
    student: &Tensor,
    teacher: &Tensor,
    attention_mask: &Tensor,
    kind: MatchLoss,
    top_k: Option<usize>,
) -> Result<Tensor> {
    let (_, t, v) = student.dims3()?;
    if teacher.dims() != student.dims() {
        return Err(Error::InvalidArgument(format!(
            "method 'oracle': teacher logits {:?} do not match the model's {:?}",
            teacher.dims(),
            student.dims()
        )));
    }
    let mask = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let rows: Vec<u32> = mask
        .iter()
        .enumerate()
        .flat_map(|(b, r)| {
            r.iter()
                .enumerate()
                .filter(|(_, &m)| m != 0)
                .map(move |(j, _)| (b * t + j) as u32)
        })
        .collect();
    let mut zs = super::flat_rows(student, &rows)?;
    let mut zt = super::flat_rows(&teacher.to_device(student.device())?, &rows)?.detach();
    if let Some(k) = top_k {
        if k > v {
            return Err(Error::InvalidArgument(format!(
                "method 'oracle': top_k = {k} exceeds the vocabulary size {v}"
            )));
        }
        let idx = top_k_indices(&zt, k)?;
        zs = zs.gather(&idx, 1)?;
        zt = zt.gather(&idx, 1)?;
    }
    Ok(match kind {
        MatchLoss::Mse => (zs - zt)?.sqr()?.mean_all()?,
        MatchLoss::Kl => {
            let lp_t = log_softmax_last_dim(&zt)?;
            let lp_s = log_softmax_last_dim(&zs)?;
            (lp_t.exp()? * (lp_t - lp_s)?)?.sum(D::Minus1)?.mean_all()?
        }
    })
}

impl Method for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn needs_retain(&self) -> bool {
        self.retain_weight != 0.0
    }
    fn prepare(&mut self, model: &Decoder, _forget: &[EncodedExample], _pad_id: u32) -> Result<()> {
        let path = Path::new(&self.teacher_path);
        if !path.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "method 'oracle': teacher '{}' is not a model directory",
                path.display()
            )));
        }
        // in the student's base dtype, like its frozen base weights
        let teacher = Decoder::load(path, model.dtype, &model.device)?;
        let what = format!("the teacher {}", path.display());
        check_teacher(
            "oracle",
            &what,
            &teacher,
            model,
            self.top_k,
            ": logits cannot be matched",
        )?;
        self.teacher = Some(teacher);
        Ok(())
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = self.batch_term(ctx, &batch.forget)?;
        let mut logs = vec![("forget_match".into(), scalar(&lf)?)];
        let mut loss = lf;
        if self.retain_weight != 0.0 {
            let lr = self.batch_term(ctx, batch.retain()?)?;
            logs.push(("retain_match".into(), scalar(&lr)?));
            loss = (loss + (lr * self.retain_weight)?)?;
        }
        Ok(LossOutput { loss, logs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Position t is kept when labels[t + 1] is an answer token: prompt and padding are not.
    #[test]
    fn answer_mask_marks_positions_predicting_answer_tokens() {
        let labels = Tensor::new(
            &[[-100i64, -100, 7, 8, -100], [-100, 5, 6, 9, 4]],
            &Device::Cpu,
        )
        .unwrap();
        let mask = answer_mask(&labels).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(mask, vec![vec![0, 1, 1, 0, 0], vec![1, 1, 1, 1, 0]]);
    }

    #[test]
    fn positions_parameter_is_checked() {
        let mut t = toml::Table::new();
        t.insert("teacher".into(), "x".into());
        t.insert("positions".into(), "answer".into());
        assert_eq!(
            Oracle::from_params(&t).unwrap().positions,
            MatchPositions::Answer
        );
        t.insert("positions".into(), "prompt".into());
        assert!(Oracle::from_params(&t).is_err());
    }
}
