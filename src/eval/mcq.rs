//! The multiple-choice suite, as lm-evaluation-harness runs WMDP and MMLU zero-shot
//! (metrics.md §6): the prediction is the letter continuation (" A", " B", …) with the highest
//! log-likelihood after the context.
use super::lm::{score, Lm, SplitData};
use super::suite::{SplitSection, Suite};
use super::{SplitOut, SuiteOutput};
use crate::error::{Error, Result};
use crate::metrics::{accuracy_by_subject, mc_predict};
use crate::model::ops::log_softmax_last_dim;
use crate::model::ForwardOptions;
use crate::model::ModelInput;
use crate::score::{collate, row_nll};
use crate::tokenizer::{EncodedExample, IGNORE_INDEX};
use candle_core::DType;
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

struct Row {
    question: String,
    choices: Vec<String>,
    answer: usize,
    /// the row's own subject, else the split's
    subject: Option<String>,
}

pub struct Prepared {
    pub data: SplitData,
    rows: Vec<Row>,
}

impl Prepared {
    pub fn items(&self) -> usize {
        self.rows.len()
    }
}

pub fn prepare(data: SplitData, settings: &SplitSection) -> Result<Prepared> {
    let mut rows = Vec::with_capacity(data.rows.len());
    for i in 0..data.rows.len() {
        let why = "multiple choice";
        let question = data.str_field(i, "question", why)?;
        let choices = data.str_list(i, "choices", why)?;
        if choices.len() < 2 || choices.len() > LETTERS.len() {
            return Err(data.error(
                i,
                format!(
                    "'choices' has {} entries; multiple choice needs 2 to {}",
                    choices.len(),
                    LETTERS.len()
                ),
            ));
        }
        let answer = data.index_field(i, "answer", why)?;
        if answer >= choices.len() {
            return Err(data.error(
                i,
                format!(
                    "'answer' is {answer} but there are only {} choices (answer is a 0-based index)",
                    choices.len()
                ),
            ));
        }
        let subject = match data.rows[i].get("subject") {
            None | Some(Value::Null) => settings.subject.clone(),
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(data.error(i, format!("'subject' must be a string, got {other}")))
            }
        };
        rows.push(Row {
            question,
            choices,
            answer,
            subject,
        });
    }
    Ok(Prepared { data, rows })
}

/// lm-eval's context: description + question + lettered choices + "Answer:"; in cloze form
/// description + question alone.
fn context(description: &str, row: &Row, cloze: bool) -> String {
    let desc = match (&row.subject, description.contains("{subject}")) {
        (Some(s), true) => description.replace("{subject}", &s.replace('_', " ")),
        (None, true) => String::new(),
        (_, false) => description.to_string(),
    };
    if cloze {
        return format!("{desc}{}", row.question.trim());
    }
    let mut c = format!("{desc}{}\n", row.question.trim());
    for (k, choice) in row.choices.iter().enumerate() {
        c.push_str(&format!("{}. {choice}\n", &LETTERS[k..k + 1]));
    }
    c.push_str("Answer:");
    c
}

/// lm-eval's `_encode_pair`: the continuation is the tail of the joint encoding after the
/// context's own encoding (trailing whitespace of the context moved to the continuation).
fn encode_pair(lm: &Lm, ctx: &str, cont: &str, bos: bool) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = ctx.trim_end();
    let cont = format!("{}{cont}", &ctx[trimmed.len()..]);
    let whole = lm.tok.encode(&format!("{trimmed}{cont}"), bos)?;
    let ctx_enc = lm.tok.encode(trimmed, bos)?;
    let cont_enc = whole.get(ctx_enc.len()..).unwrap_or_default().to_vec();
    Ok((ctx_enc, cont_enc))
}

/// Log-likelihood of each choice of each row. When a row's continuations all have the same
/// length and differ only in their last token (" A" = one token, or "Ġ" + "A"), one forward of
/// context + shared prefix scores them all; otherwise (or with `generic`) each choice is scored
/// as its own sequence. A context too long for `scoring.max_length` (or the model) loses its
/// first tokens so that context + continuation fit.
fn loglikelihoods(
    lm: &Lm,
    suite: &Suite,
    split: &Prepared,
    bar: &ProgressBar,
    generic: bool,
) -> Result<Vec<Vec<f64>>> {
    let prompt = suite.prompt.clone().unwrap_or_default();
    let max_len = suite.scoring.max_length.min(lm.max_positions());
    let bs = suite.scoring.batch_size;
    // (row, context + shared prefix with labels on the prefix, last token of each choice)
    let mut shared: Vec<(usize, EncodedExample, Vec<u32>)> = vec![];
    // (row, one example per choice)
    let mut each: Vec<(usize, EncodedExample)> = vec![];
    for (i, row) in split.rows.iter().enumerate() {
        let ctx = context(&prompt.description, row, prompt.cloze);
        let mut pairs = vec![];
        for (k, choice) in row.choices.iter().enumerate() {
            let cont = if prompt.cloze {
                format!(" {}", choice.trim())
            } else {
                format!(" {}", &LETTERS[k..k + 1])
            };
            pairs.push(encode_pair(lm, &ctx, &cont, prompt.add_bos)?);
        }
        if pairs
            .iter()
            .any(|(c, cont)| c.is_empty() || cont.is_empty())
        {
            return Err(split
                .data
                .error(i, "the context or a continuation encodes to no tokens"));
        }
        let (c0, k0) = &pairs[0];
        let prefix = &k0[..k0.len() - 1];
        let one_pass = !generic
            && pairs
                .iter()
                .all(|(c, k)| c == c0 && k.len() == k0.len() && &k[..k.len() - 1] == prefix);
        if one_pass {
            let mut ids = c0.clone();
            // the same context window as scoring each choice alone
            left_truncate(&mut ids, max_len.saturating_sub(k0.len()).max(1));
            let mut labels = vec![IGNORE_INDEX; ids.len()];
            labels.extend(prefix.iter().map(|&t| i64::from(t)));
            ids.extend_from_slice(prefix);
            let last = pairs.iter().map(|(_, k)| k[k.len() - 1]).collect();
            shared.push((
                i,
                EncodedExample {
                    input_ids: ids,
                    labels,
                },
                last,
            ));
        } else {
            for (mut c, cont) in pairs {
                left_truncate(&mut c, max_len.saturating_sub(cont.len()).max(1));
                let mut labels = vec![IGNORE_INDEX; c.len()];
                labels.extend(cont.iter().map(|&t| i64::from(t)));
                c.extend(&cont);
                each.push((
                    i,
                    EncodedExample {
                        input_ids: c,
                        labels,
                    },
                ));
            }
        }
    }
    let mut out: Vec<Vec<f64>> = vec![vec![]; split.rows.len()];
    let mut order: Vec<usize> = (0..shared.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(shared[k].1.len()));
    for chunk in order.chunks(bs) {
        let refs: Vec<&EncodedExample> = chunk.iter().map(|&k| &shared[k].1).collect();
        let batch = collate(&refs, lm.pad, &lm.model.device)?;
        let logits = lm.model.forward(
            &ModelInput::new(&batch.input_ids, Some(&batch.attention_mask)),
            &ForwardOptions::eval(),
        )?;
        // NLL of the shared prefix (0 when the letters are single tokens)
        let (prefix_nll, _) = row_nll(&logits, &batch.labels)?;
        let prefix_nll = prefix_nll.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (r, &k) in chunk.iter().enumerate() {
            let (row, ex, letters) = &shared[k];
            let last = logits.get(r)?.get(ex.len() - 1)?.to_dtype(DType::F32)?;
            let lsm = log_softmax_last_dim(&last.unsqueeze(0)?)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            out[*row] = letters
                .iter()
                .map(|&t| {
                    lsm.get(t as usize)
                        .map(|&v| f64::from(v) - prefix_nll[r])
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "token {t} is outside the model's vocabulary"
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
        }
        bar.inc(chunk.len() as u64);
    }
    if !each.is_empty() {
        let examples: Vec<EncodedExample> = each.iter().map(|s| s.1.clone()).collect();
        let scored = score(lm, &examples, bs, false, &ProgressBar::hidden())?;
        for ((row, _), s) in each.iter().zip(scored) {
            out[*row].push(-s.sum_nll);
        }
        let rows: std::collections::BTreeSet<usize> = each.iter().map(|s| s.0).collect();
        bar.inc(rows.len() as u64);
    }
    Ok(out)
}

fn left_truncate(ids: &mut Vec<u32>, max_len: usize) {
    if ids.len() > max_len {
        ids.drain(..ids.len() - max_len);
    }
}

pub fn run(lm: &Lm, suite: &Suite, splits: &[Prepared], bar: &ProgressBar) -> Result<SuiteOutput> {
    let mut out = SuiteOutput::default();
    let (mut all_correct, mut all_total) = (0usize, 0usize);
    let prompt = suite.prompt.clone().unwrap_or_default();
    for split in splits {
        let name = &split.data.name;
        bar.set_message(format!("{name}: choices"));
        let lls = loglikelihoods(lm, suite, split, bar, false)?;
        let mut items = Vec::with_capacity(split.rows.len());
        let mut correct = Vec::with_capacity(split.rows.len());
        let mut subjects = Vec::with_capacity(split.rows.len());
        for (i, (row, ll)) in split.rows.iter().zip(&lls).enumerate() {
            let pred = mc_predict(ll)?;
            let ok = pred == row.answer;
            correct.push(ok);
            subjects.push(row.subject.clone().unwrap_or_else(|| name.clone()));
            let mut m = Map::new();
            m.insert("index".into(), json!(i));
            m.insert("question".into(), json!(row.question));
            m.insert("choices".into(), json!(row.choices));
            m.insert("answer".into(), json!(row.answer));
            m.insert("subject".into(), json!(row.subject));
            m.insert(
                "prompt".into(),
                json!(context(&prompt.description, row, prompt.cloze)),
            );
            m.insert(
                "scores".into(),
                json!({"loglikelihoods": ll, "prediction": pred, "correct": ok}),
            );
            items.push(Value::Object(m));
        }
        let b = accuracy_by_subject(&subjects, &correct)?;
        out.summary
            .insert(format!("{name}_acc"), json!(b.overall.accuracy()));
        out.summary
            .insert(format!("{name}_acc_macro"), json!(b.macro_accuracy));
        let by: Map<String, Value> = b
            .per_subject
            .iter()
            .map(|(s, g)| (s.clone(), json!(g.accuracy())))
            .collect();
        out.summary
            .insert(format!("{name}_acc_by_subject"), Value::Object(by));
        all_correct += b.overall.correct;
        all_total += b.overall.total;
        out.splits.push(SplitOut {
            name: name.clone(),
            spec: split.data.spec.clone(),
            path: split.data.path.clone(),
            items,
        });
    }
    if splits.len() > 1 && all_total > 0 {
        out.summary
            .insert("acc".into(), json!(all_correct as f64 / all_total as f64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_lm_eval_format() {
        let row = Row {
            question: " What? ".into(),
            choices: vec!["x".into(), "y".into()],
            answer: 0,
            subject: Some("college_biology".into()),
        };
        assert_eq!(
            context("About {subject}.\n\n", &row, false),
            "About college biology.\n\nWhat?\nA. x\nB. y\nAnswer:"
        );
        assert_eq!(
            context("About {subject}.\n\n", &row, true),
            "About college biology.\n\nWhat?"
        );
        let row = Row {
            subject: None,
            ..row
        };
        assert_eq!(
            context("About {subject}.\n\n", &row, false),
            "What?\nA. x\nB. y\nAnswer:"
        );
    }

    #[test]
    fn one_pass_and_per_choice_scoring_agree() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let lm = Lm::load(&dir, None, &candle_core::Device::Cpu, &Default::default()).unwrap();
        let suite = Suite::resolve("mcq").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"question\":\"Who?\",\"choices\":[\"a\",\"b\",\"c\"],\"answer\":1}\n\
             {\"question\":\"Where was it set?\",\"choices\":[\"x\",\"y\"],\"answer\":0,\"subject\":\"world_facts\"}\n",
        )
        .unwrap();
        let data = SplitData::read("wmdp_bio", p.to_str().unwrap(), None).unwrap();
        let split = prepare(data, &suite.splits["wmdp_bio"]).unwrap();
        let bar = ProgressBar::hidden();
        let fast = loglikelihoods(&lm, &suite, &split, &bar, false).unwrap();
        let slow = loglikelihoods(&lm, &suite, &split, &bar, true).unwrap();
        assert_eq!(fast.len(), 2);
        for (f, s) in fast.iter().zip(&slow) {
            assert_eq!(f.len(), s.len());
            for (a, b) in f.iter().zip(s) {
                assert!((a - b).abs() < 1e-4, "{f:?} vs {s:?}");
            }
        }
    }

    #[test]
    fn cloze_scores_each_choice_text_after_the_question() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let lm = Lm::load(&dir, None, &candle_core::Device::Cpu, &Default::default()).unwrap();
        let mut suite = Suite::resolve("mcq").unwrap();
        suite.prompt = Some(super::super::suite::PromptSection {
            cloze: true,
            ..Default::default()
        });
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"question\":\"The capital of Ana is\",\"choices\":[\"Lisboa\",\"a long river\"],\"answer\":0}\n",
        )
        .unwrap();
        let data = SplitData::read("wmdp_bio", p.to_str().unwrap(), None).unwrap();
        let split = prepare(data, &suite.splits["wmdp_bio"]).unwrap();
        let lls = loglikelihoods(&lm, &suite, &split, &ProgressBar::hidden(), false).unwrap();
        // reference: log p(choice tokens | question) from one forward of question + " " + choice
        for (k, choice) in ["Lisboa", "a long river"].iter().enumerate() {
            let q = lm.tok.encode("The capital of Ana is", false).unwrap();
            let whole = lm
                .tok
                .encode(&format!("The capital of Ana is {choice}"), false)
                .unwrap();
            assert_eq!(&whole[..q.len()], &q[..], "the question is a token prefix");
            let ids = candle_core::Tensor::new(whole.as_slice(), &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = lm
                .model
                .forward(&ModelInput::new(&ids, None), &ForwardOptions::eval())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let lsm = log_softmax_last_dim(&logits).unwrap();
            let mut expected = 0f64;
            for pos in q.len()..whole.len() {
                let row = lsm.get(pos - 1).unwrap().to_vec1::<f32>().unwrap();
                expected += f64::from(row[whole[pos] as usize]);
            }
            assert!(
                (lls[0][k] - expected).abs() < 1e-4,
                "choice {k}: {} vs {expected}",
                lls[0][k]
            );
        }
    }
}
