//! CE-U (arXiv 2503.01224): cross-entropy to the model's own distribution with the gold token
//! removed. At every answer position except the first n of each sequence (footnote of the
//! paper's training settings; n = `ignore_first_n_answer_tokens`, default 1),
//! q = sg(softmax(z_t with z_{t,y_t} = −∞)) from the current model's logits, and
//! L = mean_t (−Σ_v q_v log p_θ,v). No retain term.
use super::{
    answer_positions, flat_rows, logits, one_hot, scalar, soft_cross_entropy, Ctx, LossOutput,
    Method,
};
use crate::error::{Error, Result};
use crate::model::ops::softmax_last_dim;
use crate::recipe::method_params;
use crate::train::batch::{ItemBatch, PairedBatch};
use candle_core::{DType, Tensor};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "one")]
    ignore_first_n_answer_tokens: usize,
}

fn one() -> usize {
    1
}

pub struct CeU {
    skip: usize,
}

impl CeU {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let p: Params = method_params("ceu", params)?;
        Ok(CeU {
            skip: p.ignore_first_n_answer_tokens,
        })
    }
}

/// The CE-U loss on logits [B, T, V] of the trained model.
pub fn ceu_loss(logits: &Tensor, batch: &ItemBatch, skip: usize) -> Result<Tensor> {
    let all = answer_positions(&batch.labels)?;
    let pos = all.filter(|i| all.rank[i] >= skip);
    if pos.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "method 'ceu': no answer tokens left in the batch after ignoring the first {skip} of each answer"
        )));
    }
    let z = flat_rows(logits, &pos.rows)?;
    let hot = one_hot(&pos.targets_tensor(z.device())?, z.dim(1)?)?.to_dtype(DType::U8)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, z.dims(), z.device())?;
    let masked = hot.where_cond(&neg_inf, &z.detach())?;
    let q = softmax_last_dim(&masked)?.detach();
    soft_cross_entropy(&z, &q)
}

impl Method for CeU {
    fn name(&self) -> &'static str {
        "ceu"
    }
    fn needs_retain(&self) -> bool {
        false
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let loss = ceu_loss(&logits(ctx, &batch.forget)?, &batch.forget, self.skip)?;
        let logs = vec![("forget_loss".into(), scalar(&loss)?)];
        Ok(LossOutput { loss, logs })
    }
}
