//! Per-example negative log-likelihood: the `score` command, and the building block of
//! evaluation (answer probabilities, perplexity).
use crate::error::{Error, Result};
use crate::model::ops::shifted_token_nll;
use crate::model::{Decoder, ForwardOptions, ModelInput};
use crate::tokenizer::EncodedExample;
use candle_core::{Device, Tensor};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScoreRow {
    pub index: usize,
    /// number of scored (labelled, predicted) tokens
    pub tokens: usize,
    pub mean_nll: f64,
    pub sum_nll: f64,
}

/// Right-padded batch tensors: input ids [B, T] (u32), attention mask [B, T] (u32), labels
/// [B, T] (i64, −100 on padding).
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

pub fn collate(examples: &[&EncodedExample], pad_id: u32, device: &Device) -> Result<Batch> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        return Err(Error::InvalidArgument(
            "cannot build a batch from empty examples".into(),
        ));
    }
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut labels = vec![-100i64; b * t];
    for (i, e) in examples.iter().enumerate() {
        for j in 0..e.len() {
            ids[i * t + j] = e.input_ids[j];
            mask[i * t + j] = 1;
            labels[i * t + j] = e.labels[j];
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
    })
}

/// Sum of NLL and number of scored tokens per row: logits[:, :-1] predict labels[:, 1:].
pub fn row_nll(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    if t < 2 {
        let z = Tensor::zeros(b, candle_core::DType::F32, logits.device())?;
        return Ok((z.clone(), z));
    }
    let (nll, mask) = shifted_token_nll(logits, labels)?;
    Ok((nll.sum(1)?, mask.sum(1)?))
}

/// Score examples in batches of `batch_size`. Examples are grouped by length to waste little
/// on padding; rows come back in input order. `on_batch` is told how many rows were done.
pub fn score_examples(
    model: &Decoder,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
    opts: &ForwardOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<ScoreRow>> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument("batch size must be ≥ 1".into()));
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut rows: Vec<Option<ScoreRow>> = vec![None; examples.len()];
    for chunk in order.chunks(batch_size) {
        let batch_examples: Vec<&EncodedExample> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = collate(&batch_examples, pad_id, &model.device)?;
        let input = ModelInput::new(&batch.input_ids, Some(&batch.attention_mask));
        let logits = model.forward(&input, opts)?;
        let (sums, counts) = row_nll(&logits, &batch.labels)?;
        let sums = sums.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let counts = counts.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        for (k, &i) in chunk.iter().enumerate() {
            let tokens = counts[k] as usize;
            if !sums[k].is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "example {i}: the NLL under the model {} is not finite (are its weights finite?)",
                    model.dir.display()
                )));
            }
            rows[i] = Some(ScoreRow {
                index: i,
                tokens,
                mean_nll: if tokens > 0 {
                    sums[k] / tokens as f64
                } else {
                    f64::NAN
                },
                sum_nll: sums[k],
            });
        }
        on_batch(chunk.len());
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| Error::InvalidArgument(format!("example {i} was not scored")))
        })
        .collect()
}
