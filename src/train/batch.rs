//! Tokenised datasets, deterministic orders and paired forget/retain micro-batches.
use crate::data::{read_examples, Example};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::score::collate;
use crate::tokenizer::{ChatTokenizer, EncodedExample};
use candle_core::{Device, Tensor};
use std::path::Path;

/// A tokenised dataset; `examples[i]` keeps its index for per-item caches.
pub struct Dataset {
    pub name: String,
    pub examples: Vec<EncodedExample>,
}

impl Dataset {
    /// Load a local file or an `hf://datasets/…` file (resolved through the hub cache).
    pub fn load(path: &Path, tok: &ChatTokenizer, max_length: usize) -> Result<Self> {
        let resolved;
        let path = if path.exists() {
            path
        } else if path.to_string_lossy().starts_with("hf://") {
            resolved = crate::hub::resolve_file(&path.to_string_lossy())?;
            resolved.as_path()
        } else {
            path
        };
        let raw = read_examples(path)?;
        let mut examples = Vec::with_capacity(raw.len());
        for (i, ex) in raw.iter().enumerate() {
            let enc = match ex {
                Example::Qa { question, answer } => {
                    tok.encode_qa(question, answer, Some(max_length))
                }
                Example::Text { text } => tok.encode_text(text, Some(max_length)),
            }
            .map_err(|e| Error::data(path, format!("record {}: {e}", i + 1)))?;
            if enc.num_labelled() < 2 {
                return Err(Error::data(
                    path,
                    format!(
                        "record {}: fewer than 2 tokens to train on after truncation to {max_length} (raise data.max_length?)",
                        i + 1
                    ),
                ));
            }
            examples.push(enc);
        }
        Ok(Dataset {
            name: path.display().to_string(),
            examples,
        })
    }

    /// Several files trained on as one dataset (items keep their order, file after file).
    pub fn load_all(paths: &[String], tok: &ChatTokenizer, max_length: usize) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::InvalidArgument("no data file given".into()));
        }
        let mut names = Vec::with_capacity(paths.len());
        let mut examples = Vec::new();
        for p in paths {
            let part = Dataset::load(Path::new(p), tok, max_length)?;
            names.push(part.name);
            examples.extend(part.examples);
        }
        Ok(Dataset {
            name: names.join(" + "),
            examples,
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

/// The order of a dataset in pass `epoch`: a seeded permutation, a pure function of
/// (seed, stream, epoch) so that a resumed run sees exactly the same batches.
pub fn epoch_order(n: usize, seed: u64, stream: &str, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed)
        .fork(stream)
        .fork(&epoch.to_string())
        .shuffle(&mut order);
    order
}

/// Items `start .. start + count` of an endless sequence of seeded epochs.
pub fn draw(n: usize, seed: u64, stream: &str, start: usize, count: usize) -> Vec<usize> {
    (start..start + count)
        .map(|k| {
            let order = epoch_order(n, seed, stream, k / n);
            order[k % n]
        })
        .collect()
}

/// One side of a micro-batch: right-padded tensors plus the dataset indices of its rows.
pub struct ItemBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// −100 where no loss is taken (prompt, padding)
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

impl ItemBatch {
    pub fn new(ds: &Dataset, indices: Vec<usize>, pad_id: u32, device: &Device) -> Result<Self> {
        let ex: Vec<&EncodedExample> = indices.iter().map(|&i| &ds.examples[i]).collect();
        let b = collate(&ex, pad_id, device)?;
        Ok(ItemBatch {
            input_ids: b.input_ids,
            attention_mask: b.attention_mask,
            labels: b.labels,
            indices,
        })
    }

    pub fn input(&self) -> crate::model::ModelInput<'_> {
        crate::model::ModelInput::new(&self.input_ids, Some(&self.attention_mask))
    }
}

/// A forget micro-batch and the retain micro-batch paired with it.
pub struct PairedBatch {
    pub forget: ItemBatch,
    pub retain: Option<ItemBatch>,
}

impl PairedBatch {
    pub fn retain(&self) -> Result<&ItemBatch> {
        self.retain.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this method needs retain data: set data.retain in the recipe".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_seeded_permutations_and_draws_span_epochs() {
        let a = epoch_order(10, 1, "forget", 0);
        assert_eq!(a, epoch_order(10, 1, "forget", 0));
        assert_ne!(a, epoch_order(10, 1, "forget", 1));
        assert_ne!(a, epoch_order(10, 1, "retain", 0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        let d = draw(10, 1, "forget", 8, 4);
        assert_eq!(&d[..2], &a[8..]);
        assert_eq!(&d[2..], &epoch_order(10, 1, "forget", 1)[..2]);
    }
}
