//! The perplexity suite: token-weighted mean NLL and perplexity of each split.
use super::lm::{score, Lm, SplitData};
use super::suite::Suite;
use super::{SplitOut, SuiteOutput};
use crate::error::Result;
use crate::metrics::mean;
use crate::tokenizer::EncodedExample;
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

enum Record {
    Qa { question: String, answer: String },
    Text(String),
}

/// A split's records, checked.
pub struct Prepared {
    pub data: SplitData,
    records: Vec<Record>,
}

impl Prepared {
    pub fn items(&self) -> usize {
        self.records.len()
    }
}

pub fn prepare(data: SplitData) -> Result<Prepared> {
    let mut records = Vec::with_capacity(data.rows.len());
    for (i, row) in data.rows.iter().enumerate() {
        let s = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
        records.push(match (s("question"), s("answer"), s("text")) {
            (Some(question), Some(answer), _) => Record::Qa { question, answer },
            (_, _, Some(text)) => Record::Text(text),
            _ => {
                return Err(data.error(i, "needs string fields 'question' and 'answer', or 'text'"))
            }
        });
    }
    Ok(Prepared { data, records })
}

pub fn run(lm: &Lm, suite: &Suite, splits: &[Prepared], bar: &ProgressBar) -> Result<SuiteOutput> {
    let max_text = suite.scoring.max_length.min(lm.max_positions());
    let max_qa = suite
        .scoring
        .max_length_qa
        .unwrap_or(suite.scoring.max_length)
        .min(lm.max_positions());
    let mut out = SuiteOutput::default();
    let (mut all_sum, mut all_tokens) = (0.0, 0usize);
    for split in splits {
        bar.set_message(format!("{}: scoring", split.data.name));
        let mut encoded: Vec<EncodedExample> = Vec::with_capacity(split.records.len());
        for (i, r) in split.records.iter().enumerate() {
            let e = match r {
                Record::Qa { question, answer } => {
                    lm.tok.encode_qa(question, answer, Some(max_qa))?
                }
                Record::Text(t) => lm.tok.encode_text(t, Some(max_text))?,
            };
            if e.num_labelled() == 0 || (matches!(r, Record::Text(_)) && e.len() < 2) {
                return Err(split.data.error(
                    i,
                    "has no tokens to score (empty answer or text, or truncated away)",
                ));
            }
            encoded.push(e);
        }
        let scored = score(lm, &encoded, suite.scoring.batch_size, false, bar)?;
        let mut items = Vec::with_capacity(scored.len());
        let (mut sum, mut tokens) = (0.0, 0usize);
        let mut item_means = vec![];
        for (i, (s, r)) in scored.iter().zip(&split.records).enumerate() {
            let mut row = Map::new();
            row.insert("index".into(), json!(i));
            match r {
                Record::Qa { question, answer } => {
                    row.insert("question".into(), json!(question));
                    row.insert("answer".into(), json!(answer));
                }
                Record::Text(t) => {
                    row.insert("text".into(), json!(t));
                }
            }
            row.insert(
                "scores".into(),
                json!({
                    "tokens": s.tokens,
                    "sum_nll": s.sum_nll,
                    "mean_nll": s.mean_nll,
                    "perplexity": s.mean_nll.exp(),
                }),
            );
            items.push(Value::Object(row));
            sum += s.sum_nll;
            tokens += s.tokens;
            item_means.push(s.mean_nll);
        }
        let name = &split.data.name;
        let nll = sum / tokens.max(1) as f64;
        out.summary.insert(format!("{name}_nll"), json!(nll));
        out.summary
            .insert(format!("{name}_perplexity"), json!(nll.exp()));
        out.summary
            .insert(format!("{name}_item_nll"), json!(mean(&item_means)?));
        out.summary.insert(format!("{name}_tokens"), json!(tokens));
        all_sum += sum;
        all_tokens += tokens;
        out.splits.push(SplitOut {
            name: name.clone(),
            spec: split.data.spec.clone(),
            path: split.data.path.clone(),
            items,
        });
    }
    if splits.len() > 1 {
        let nll = all_sum / all_tokens.max(1) as f64;
        out.summary.insert("nll".into(), json!(nll));
        out.summary.insert("perplexity".into(), json!(nll.exp()));
    }
    Ok(out)
}
