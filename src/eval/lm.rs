//! What every suite needs from a model: loading with an optional adapter, per-example NLL with
//! per-token statistics, batched greedy generation with decoding, and reading split files with
//! errors that name the file and the record.
use crate::error::{Error, Result};
use crate::generate::{greedy, GenerationConfig};
use crate::lora::load_adapter;
use crate::model::ops::{accum_dtype, log_softmax_last_dim};
use crate::model::{Decoder, ForwardOptions, ModelInput};
use crate::score::{collate, row_nll, score_examples};
use crate::tokenizer::{ChatTokenizer, EncodedExample, IGNORE_INDEX};
use candle_core::{DType, Device, Tensor, D};
use indicatif::ProgressBar;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A model ready for evaluation.
pub struct Lm {
    pub model: Decoder,
    pub tok: ChatTokenizer,
    pub pad: u32,
    /// generation stops at any of these (tokenizer EOS plus generation_config.json's)
    pub eos: Vec<u32>,
    pub dir: PathBuf,
}

impl Lm {
    /// Load a model (with an optional adapter) and its tokenizer; `style` shapes question prompts.
    pub fn load(
        dir: &Path,
        adapter: Option<&Path>,
        device: &Device,
        style: &crate::tokenizer::PromptStyle,
    ) -> Result<Lm> {
        let mut model = Decoder::load(dir, crate::device::base_dtype(device), device)?;
        if let Some(a) = adapter {
            load_adapter(&mut model, a)?;
        }
        let tok = ChatTokenizer::from_dir(dir)?.with_prompt_style(style.clone());
        let mut eos: Vec<u32> = tok.eos_token_id().into_iter().collect();
        for id in generation_eos(dir)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let pad = tok
            .pad_token_id()
            .or(tok.eos_token_id())
            .or(eos.first().copied())
            .unwrap_or(0);
        Ok(Lm {
            model,
            tok,
            pad,
            eos,
            dir: dir.to_path_buf(),
        })
    }

    /// The longest sequence the model takes (its position table).
    pub fn max_positions(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }
}

/// `eos_token_id` of generation_config.json (an id or a list), if the file exists.
fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let v: Value = crate::error::read_json(&path)?;
    let ids = match v.get("eos_token_id") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        Some(x) => x.as_u64().into_iter().collect(),
    };
    Ok(ids
        .into_iter()
        .filter_map(|i| u32::try_from(i).ok())
        .collect())
}

/// Per-position statistics at the labelled positions of one example, the last one (EOS)
/// excluded, as open-unlearning's `tokenwise_vocab_logprobs` takes them.
#[derive(Debug, Clone, Default)]
pub struct TokenStats {
    /// log p(label)
    pub logprobs: Vec<f64>,
    /// argmax of the predicted distribution
    pub argmax: Vec<u32>,
    pub labels: Vec<u32>,
    /// Σ p·log p and Σ p·(log p)² − μ² over the vocabulary (Min-K%++)
    pub mu: Vec<f64>,
    pub var: Vec<f64>,
}

/// NLL of one example over its labelled tokens (EOS included).
#[derive(Debug, Clone)]
pub struct Scored {
    pub sum_nll: f64,
    pub tokens: usize,
    pub mean_nll: f64,
    pub stats: Option<TokenStats>,
}

fn length_order(examples: &[EncodedExample]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    order
}

/// Score examples: the NLL of [`score_examples`] and, with `token_stats`, per-token log-probs,
/// argmax predictions and vocabulary moments from the same forward pass.
pub fn score(
    lm: &Lm,
    examples: &[EncodedExample],
    batch_size: usize,
    token_stats: bool,
    bar: &ProgressBar,
) -> Result<Vec<Scored>> {
    if !token_stats {
        let rows = score_examples(
            &lm.model,
            examples,
            batch_size,
            lm.pad,
            &ForwardOptions::eval(),
            |n| bar.inc(n as u64),
        )?;
        return Ok(rows
            .into_iter()
            .map(|r| Scored {
                sum_nll: r.sum_nll,
                tokens: r.tokens,
                mean_nll: r.mean_nll,
                stats: None,
            })
            .collect());
    }
    if batch_size == 0 {
        return Err(Error::InvalidArgument("batch size must be ≥ 1".into()));
    }
    let mut out: Vec<Option<Scored>> = vec![None; examples.len()];
    for chunk in length_order(examples).chunks(batch_size) {
        let batch_examples: Vec<&EncodedExample> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = collate(&batch_examples, lm.pad, &lm.model.device)?;
        let input = ModelInput::new(&batch.input_ids, Some(&batch.attention_mask));
        let logits = lm.model.forward(&input, &ForwardOptions::eval())?;
        let (sums, counts) = row_nll(&logits, &batch.labels)?;
        let sums = sums.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let counts = counts.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let stats = batch_token_stats(&logits, &batch_examples)?;
        for ((k, &i), st) in chunk.iter().enumerate().zip(stats) {
            let tokens = counts[k] as usize;
            if !sums[k].is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "example {i}: the NLL under the model {} is not finite (are its weights finite?)",
                    lm.model.dir.display()
                )));
            }
            out[i] = Some(Scored {
                sum_nll: sums[k],
                tokens,
                mean_nll: if tokens > 0 {
                    sums[k] / tokens as f64
                } else {
                    f64::NAN
                },
                stats: Some(st),
            });
        }
        bar.inc(chunk.len() as u64);
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| Error::InvalidArgument(format!("example {i} was not scored")))
        })
        .collect()
}

/// Per-token statistics: only the labelled positions' logits are gathered before the
/// log-softmax, so memory grows with the answer tokens, not batch × sequence × vocabulary.
fn batch_token_stats(logits: &Tensor, examples: &[&EncodedExample]) -> Result<Vec<TokenStats>> {
    let (b, t, v) = logits.dims3()?;
    // (flat index into [B·(T−1)], label) per row; label of position j is the token at j + 1
    let mut per_row: Vec<Vec<(u32, u32)>> = Vec::with_capacity(b);
    for (r, e) in examples.iter().enumerate() {
        let mut pos: Vec<(u32, u32)> = (0..e.len().saturating_sub(1))
            .filter(|&j| e.labels[j + 1] != IGNORE_INDEX)
            .map(|j| ((r * (t - 1) + j) as u32, e.labels[j + 1] as u32))
            .collect();
        pos.pop(); // EOS
        per_row.push(pos);
    }
    let flat: Vec<u32> = per_row.iter().flatten().map(|p| p.0).collect();
    if flat.is_empty() || t < 2 {
        return Ok(vec![TokenStats::default(); b]);
    }
    let n = flat.len();
    let dev = logits.device();
    let rows = logits
        .narrow(1, 0, t - 1)?
        .reshape((b * (t - 1), v))?
        .index_select(&Tensor::from_vec(flat, n, dev)?, 0)?;
    let rows = rows.to_dtype(accum_dtype(rows.dtype()))?;
    let lsm = log_softmax_last_dim(&rows)?;
    let labels: Vec<u32> = per_row.iter().flatten().map(|p| p.1).collect();
    let picked = lsm
        .gather(&Tensor::from_vec(labels.clone(), (n, 1), dev)?, 1)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let argmax = lsm.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let plogp = (lsm.exp()? * &lsm)?;
    let mu = plogp.sum(D::Minus1)?;
    let m2 = (plogp * &lsm)?.sum(D::Minus1)?;
    let var = (m2 - mu.sqr()?)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mu = mu.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(b);
    let mut k = 0;
    for pos in &per_row {
        let r = k..k + pos.len();
        out.push(TokenStats {
            logprobs: picked[r.clone()].to_vec(),
            argmax: argmax[r.clone()].to_vec(),
            labels: labels[r.clone()].to_vec(),
            mu: mu[r.clone()].to_vec(),
            var: var[r].to_vec(),
        });
        k += pos.len();
    }
    Ok(out)
}

/// Greedy continuations of `prompts`, decoded (special tokens skipped), cut at the first stop
/// string and stripped; also the generated token ids. Prompts are batched by length.
pub fn generate(
    lm: &Lm,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    batch_size: usize,
    stop: &[String],
    bar: &ProgressBar,
) -> Result<Vec<(String, Vec<u32>)>> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument("batch size must be ≥ 1".into()));
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut out: Vec<Option<(String, Vec<u32>)>> = vec![None; prompts.len()];
    let eos_text: Vec<String> = lm.tok.eos_token().map(str::to_string).into_iter().collect();
    for chunk in order.chunks(batch_size) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        // never run past the model's position table
        let room = lm.max_positions().saturating_sub(longest);
        let ids = if room == 0 || max_new_tokens == 0 {
            vec![vec![]; batch.len()]
        } else {
            let mut cfg = GenerationConfig::new(lm.eos.clone(), lm.pad);
            cfg.max_new_tokens = max_new_tokens.min(room);
            greedy(&lm.model, &batch, &cfg)?
        };
        for (&i, ids) in chunk.iter().zip(ids) {
            let text = lm.tok.decode(&ids, true)?;
            let text = cut_at(&text, eos_text.iter().chain(stop));
            out[i] = Some((text.trim().to_string(), ids));
        }
        bar.inc(chunk.len() as u64);
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| Error::InvalidArgument(format!("prompt {i} was not generated")))
        })
        .collect()
}

fn cut_at<'a, S: AsRef<str> + 'a>(text: &str, stops: impl Iterator<Item = &'a S>) -> String {
    let mut end = text.len();
    for s in stops {
        if let Some(p) = text.find(s.as_ref()) {
            end = end.min(p);
        }
    }
    text[..end].to_string()
}

/// One split's rows, read from a JSONL/JSON file.
pub struct SplitData {
    pub name: String,
    /// as given (path or hf:// spec)
    pub spec: String,
    pub path: PathBuf,
    pub rows: Vec<Map<String, Value>>,
}

impl SplitData {
    /// Read `spec` (a local file or hf://datasets/…); keep the first `limit` rows.
    pub fn read(name: &str, spec: &str, limit: Option<usize>) -> Result<SplitData> {
        let path = crate::hub::resolve_file(spec).map_err(|e| match e {
            Error::Io { path, source } => Error::Data {
                path,
                msg: format!("split '{name}': cannot read the data file: {source}"),
            },
            other => other,
        })?;
        if path.is_dir() {
            return Err(Error::data(
                &path,
                format!("split '{name}': is a directory; give a JSONL or JSON file"),
            ));
        }
        let mut rows = crate::data::read_objects(&path)?;
        if let Some(n) = limit {
            rows.truncate(n);
        }
        Ok(SplitData {
            name: name.to_string(),
            spec: spec.to_string(),
            path,
            rows,
        })
    }

    fn row_err(&self, i: usize, msg: String) -> Error {
        Error::data(
            &self.path,
            format!("split '{}': record {}: {msg}", self.name, i + 1),
        )
    }

    /// A string field of row `i`; `why` says what needs it.
    pub fn str_field(&self, i: usize, key: &str, why: &str) -> Result<String> {
        match self.rows[i].get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.row_err(
                i,
                format!(
                    "field '{key}' must be a string, got {} (needed for {why})",
                    kind_of(other)
                ),
            )),
            None => Err(self.row_err(i, format!("missing field '{key}' (needed for {why})"))),
        }
    }

    /// A list of strings (a single string counts as a list of one), non-empty.
    pub fn str_list(&self, i: usize, key: &str, why: &str) -> Result<Vec<String>> {
        let bad = |got: &str| {
            self.row_err(
                i,
                format!("field '{key}' must be a list of strings, got {got} (needed for {why})"),
            )
        };
        match self.rows[i].get(key) {
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => {
                if a.is_empty() {
                    return Err(bad("an empty list"));
                }
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(kind_of(v)))
                    })
                    .collect()
            }
            Some(other) => Err(bad(kind_of(other))),
            None => Err(self.row_err(i, format!("missing field '{key}' (needed for {why})"))),
        }
    }

    /// A non-negative integer field.
    pub fn index_field(&self, i: usize, key: &str, why: &str) -> Result<usize> {
        match self.rows[i].get(key) {
            Some(Value::Number(x)) if x.as_u64().is_some() => {
                Ok(x.as_u64().map_or(0, |x| x as usize))
            }
            Some(other) => Err(self.row_err(
                i,
                format!(
                    "field '{key}' must be a non-negative integer, got {other} (needed for {why})"
                ),
            )),
            None => Err(self.row_err(i, format!("missing field '{key}' (needed for {why})"))),
        }
    }

    /// An error about row `i`.
    pub fn error(&self, i: usize, msg: impl Into<String>) -> Error {
        self.row_err(i, msg.into())
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A hidden bar when `show` is false; otherwise a bar over `len` items on stderr.
pub fn progress_bar(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:<28} {bar:40} {pos}/{len} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
