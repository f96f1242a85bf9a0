//! Datamodel matching (DMM, arXiv 2410.23232; algorithms.md §4): fine-tune the adapter so the
//! model's next-token logits match *predicted* retrained-model logits, on batches that mix
//! forget and retain items:
//!
//!   L = s · M(x_f) + (1 − s) · M(x_r)
//!
//! with s = `forget_share` (0.2: the paper's finding is that ~20 % forget points in every batch
//! matters most) and M the matching loss over the non-padding positions of a micro-batch
//! ([`super::oracle::match_loss`]: MSE on logits by default, KL(target ‖ model) with
//! `loss = "kl"`, optionally restricted to the target's `top_k` logits). The trainer draws
//! forget and retain micro-batches of equal size, so the share is applied as this weight.
//!
//! `retain_target = "base"` takes the retain items' targets from the starting model itself (the
//! adapter switched off) instead: an influence step predicts the retain set worse than "no
//! change" does (`unlearn attribute` reports both), so this keeps the forget prediction and
//! anchors the rest.
//!
//! The targets are computed on the fly, per micro-batch:
//! - `target = "shadow:DIR"`: the shadow adapter written by `unlearn attribute` (an influence
//!   step predicting the retrained model). The same base weights serve both: the teacher is a
//!   copy of the model that shares every base tensor and carries the shadow adapter instead of
//!   the trained one, so it costs no second copy of the model.
//! - `target = "oracle:DIR"`: a checkpoint, e.g. a model really retrained without the forget set
//!   (oracle matching, the upper bound of DMM).
use super::oracle::{check_teacher, match_loss, teacher_forward, MatchLoss};
use super::{logits, scalar, Ctx, LossOutput, Method};
use crate::error::{Error, Result};
use crate::lora::{detach_lora, load_adapter};
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::method_params;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::Tensor;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// "shadow:DIR" (PEFT adapter from `unlearn attribute`) or "oracle:DIR" (a checkpoint)
    target: String,
    #[serde(default)]
    loss: MatchLoss,
    #[serde(default = "default_share")]
    forget_share: f64,
    top_k: Option<usize>,
    /// where the retain items' targets come from: "target" (the same source as the forget
    /// items, default) or "base" (the starting model itself: the adapter switched off)
    #[serde(default)]
    retain_target: RetainTarget,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetainTarget {
    #[default]
    Target,
    Base,
}

fn default_share() -> f64 {
    0.2
}

/// Where the matching targets come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Shadow(PathBuf),
    Oracle(PathBuf),
}

impl Target {
    pub fn parse(spec: &str) -> Result<Target> {
        match spec.split_once(':') {
            Some(("shadow", p)) if !p.is_empty() => Ok(Target::Shadow(p.into())),
            Some(("oracle", p)) if !p.is_empty() => Ok(Target::Oracle(p.into())),
            _ => Err(Error::InvalidArgument(format!(
                "method 'dmm': target must be \"shadow:DIR\" (an adapter from `unlearn attribute`) or \"oracle:DIR\" (a checkpoint), got \"{spec}\""
            ))),
        }
    }
}

pub struct Dmm {
    target: Target,
    loss: MatchLoss,
    forget_share: f64,
    top_k: Option<usize>,
    retain_target: RetainTarget,
    /// the model with the shadow adapter, or the oracle checkpoint
    teacher: Option<Decoder>,
}

impl Dmm {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("dmm", params)?;
        if !(p.forget_share > 0.0 && p.forget_share <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "method 'dmm': forget_share must be in (0, 1], got {}",
                p.forget_share
            )));
        }
        if p.top_k == Some(0) {
            return Err(Error::InvalidArgument(
                "method 'dmm': top_k must be ≥ 1".into(),
            ));
        }
        Ok(Dmm {
            target: Target::parse(&p.target)?,
            loss: p.loss,
            forget_share: p.forget_share,
            top_k: p.top_k,
            retain_target: p.retain_target,
            teacher: None,
        })
    }

    /// The targets' logits for a micro-batch (no graph).
    fn target_logits(&self, batch: &ItemBatch) -> Result<Tensor> {
        let teacher = self.teacher.as_ref().ok_or_else(|| {
            Error::InvalidArgument("method 'dmm': the targets were not prepared".into())
        })?;
        let opts = match self.target {
            // the shadow adapter, as constants
            Target::Shadow(_) => ForwardOptions::eval(),
            Target::Oracle(_) => ForwardOptions::base_model(),
        };
        teacher_forward(teacher, batch, &opts)
    }

    fn batch_term(&self, ctx: &Ctx, batch: &ItemBatch, from_base: bool) -> Result<Tensor> {
        let target = if from_base {
            super::reference_logits(ctx.model, batch)?.detach()
        } else {
            self.target_logits(batch)?
        };
        let student = logits(ctx, batch)?;
        match_loss(
            &student,
            &target,
            &batch.attention_mask,
            self.loss,
            self.top_k,
        )
    }
}

/// s·forget + (1 − s)·retain
pub fn mix(forget: &Tensor, retain: &Tensor, forget_share: f64) -> Result<Tensor> {
    Ok(((forget * forget_share)? + (retain * (1.0 - forget_share))?)?)
}

impl Method for Dmm {
    fn name(&self) -> &'static str {
        "dmm"
    }
    fn needs_retain(&self) -> bool {
        self.forget_share < 1.0
    }
    fn prepare(&mut self, model: &Decoder, _forget: &[EncodedExample], _pad_id: u32) -> Result<()> {
        let teacher = match &self.target {
            Target::Shadow(dir) => {
                // shares every base tensor with the trained model; only the adapter differs
                let mut t = model.clone();
                detach_lora(&mut t);
                load_adapter(&mut t, dir).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "method 'dmm': target shadow adapter {}: {e}",
                        dir.display()
                    ))
                })?;
                t
            }
            Target::Oracle(dir) => {
                if !Path::new(dir).is_dir() {
                    return Err(Error::InvalidArgument(format!(
                        "method 'dmm': target oracle '{}' is not a model directory",
                        dir.display()
                    )));
                }
                // in the student's base dtype: a frozen model like its base weights (bf16 on a
                // GPU by default, f32 on the CPU; --base-dtype chooses)
                Decoder::load(dir, model.dtype, &model.device)?
            }
        };
        check_teacher("dmm", "the target model", &teacher, model, self.top_k, "")?;
        self.teacher = Some(teacher);
        Ok(())
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = self.batch_term(ctx, &batch.forget, false)?;
        let mut logs = vec![("forget_match".into(), scalar(&lf)?)];
        if self.forget_share >= 1.0 {
            return Ok(LossOutput { loss: lf, logs });
        }
        let base = self.retain_target == RetainTarget::Base;
        let lr = self.batch_term(ctx, batch.retain()?, base)?;
        logs.push(("retain_match".into(), scalar(&lr)?));
        Ok(LossOutput {
            loss: mix(&lf, &lr, self.forget_share)?,
            logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t3(v: &[f32], shape: (usize, usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn value(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The DMM loss on a fixed batch, by hand: forget rows [2 positions × 3 logits] with the
    /// second position padded, retain rows fully used.
    #[test]
    fn dmm_loss_equals_hand_computation() {
        let dev = Device::Cpu;
        // forget: student z, target z̃ at two positions; the second is padding
        let zf = t3(&[1.0, 2.0, 0.0, 9.0, 9.0, 9.0], (1, 2, 3));
        let tf = t3(&[0.0, 2.0, 2.0, 0.0, 0.0, 0.0], (1, 2, 3));
        let mf = Tensor::new(&[[1u32, 0]], &dev).unwrap();
        // retain: one position
        let zr = t3(&[0.5, 0.5, 0.5], (1, 1, 3));
        let tr = t3(&[1.5, 0.5, -0.5], (1, 1, 3));
        let mr = Tensor::new(&[[1u32]], &dev).unwrap();
        let f = match_loss(&zf, &tf, &mf, MatchLoss::Mse, None).unwrap();
        let r = match_loss(&zr, &tr, &mr, MatchLoss::Mse, None).unwrap();
        // MSE over the unpadded position's 3 logits: (1 + 0 + 4)/3 and (1 + 0 + 1)/3
        assert!((value(&f) - 5.0 / 3.0).abs() < 1e-6);
        assert!((value(&r) - 2.0 / 3.0).abs() < 1e-6);
        let l = mix(&f, &r, 0.2).unwrap();
        assert!((value(&l) - (0.2 * 5.0 / 3.0 + 0.8 * 2.0 / 3.0)).abs() < 1e-6);
        // KL(target ‖ student) at the forget position, by hand
        let kl = match_loss(&zf, &tf, &mf, MatchLoss::Kl, None).unwrap();
        let lse = |z: &[f64]| z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let (zs, zt) = ([1.0, 2.0, 0.0], [0.0, 2.0, 2.0]);
        let (ls, lt) = (lse(&zs), lse(&zt));
        let hand: f64 = (0..3)
            .map(|k| {
                let (lpt, lps) = (zt[k] - lt, zs[k] - ls);
                lpt.exp() * (lpt - lps)
            })
            .sum();
        assert!((value(&kl) - hand).abs() < 1e-6, "{} vs {hand}", value(&kl));
        // top-2 of the target (entries 1 and 2): MSE over (0² + 2²)/2
        let top = match_loss(&zf, &tf, &mf, MatchLoss::Mse, Some(2)).unwrap();
        assert!((value(&top) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn targets_and_params_are_checked() {
        assert_eq!(
            Target::parse("shadow:runs/a/shadow").unwrap(),
            Target::Shadow("runs/a/shadow".into())
        );
        assert_eq!(
            Target::parse("oracle:data/models/retain").unwrap(),
            Target::Oracle("data/models/retain".into())
        );
        assert!(Target::parse("runs/a/shadow").is_err());
        assert!(Target::parse("shadow:").is_err());
        let params = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
        assert!(Dmm::from_params(&params("target = \"oracle:x\"\nforget_share = 0.0")).is_err());
        assert!(Dmm::from_params(&params("target = \"oracle:x\"\ntop_k = 0")).is_err());
        assert!(Dmm::from_params(&params("target = \"oracle:x\"\nbogus = 1")).is_err());
        let d = Dmm::from_params(&params("target = \"shadow:x\"")).unwrap();
        assert_eq!(d.forget_share, 0.2);
        assert_eq!(d.loss, MatchLoss::Mse);
    }
}
