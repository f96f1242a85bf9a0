//! The TOFU suite: answer probabilities, truth ratios, ROUGE of greedy generations, memorisation
//! and membership-inference scores per split; forget quality, model utility and privleak over
//! the splits (shared/reference/metrics.md §2–4).
use super::lm::{generate, score, Lm, Scored, SplitData};
use super::suite::{CorrectField, SplitSection, Suite, TruthRatioAgg};
use super::{SplitOut, SuiteOutput};
use crate::error::{Error, Result};
use crate::metrics::{
    self, exact_memorization, extraction_strength, forget_quality, hmean, mean, mean_defined,
    mia_auc, mia_min_k, mia_min_k_plus_plus, mia_zlib, normalised_prob, prob_from_avg_loss,
    prob_from_losses, rouge, truth_ratio, truth_ratio_closer_to_1, truth_ratio_true_better,
    MIN_K_DEFAULT,
};
use crate::tokenizer::{EncodedExample, IGNORE_INDEX};
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// The split whose truth ratios give forget quality and whose MIA scores are the members.
pub const FORGET: &str = "forget";
/// The split of non-members for the MIA AUCs and privleak.
pub const HOLDOUT: &str = "holdout";
/// MIA attacks: summary key (the AUC of forget vs holdout) and per-item score name.
const ATTACKS: [&str; 4] = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"];

/// A split ready to run: its rows parsed and checked for the fields its metrics need.
pub struct Prepared {
    pub data: SplitData,
    pub settings: SplitSection,
    pub metrics: BTreeSet<String>,
    items: Vec<Item>,
}

struct Item {
    question: String,
    answer: String,
    paraphrased: Option<String>,
    perturbed: Option<Vec<String>>,
}

impl Prepared {
    pub fn items(&self) -> usize {
        self.items.len()
    }
    fn has(&self, m: &str) -> bool {
        self.metrics.contains(m)
    }
    fn correct(&self) -> CorrectField {
        self.settings.correct.unwrap_or(CorrectField::Answer)
    }
    fn needs_para(&self) -> bool {
        self.has("Q_A_PARA_Prob")
            || (self.correct() == CorrectField::ParaphrasedAnswer
                && (self.has("truth_ratio") || self.has("Q_A_Prob_normalised")))
    }
    fn needs_pert(&self) -> bool {
        self.has("Q_A_PERT_Prob") || self.has("truth_ratio") || self.has("Q_A_Prob_normalised")
    }
    fn needs_stats(&self) -> bool {
        self.has("extraction_strength") || self.has("exact_memorization") || self.has("mia")
    }
    fn needs_qa(&self) -> bool {
        self.needs_stats()
            || self.has("Q_A_Prob")
            || self.has("Q_A_ROUGE")
            || (self.correct() == CorrectField::Answer
                && (self.has("truth_ratio") || self.has("Q_A_Prob_normalised")))
    }
    /// Forward passes and generations this split costs (for the progress bar).
    pub fn work(&self) -> u64 {
        let n = self.items.len() as u64;
        let pert: u64 = self
            .items
            .iter()
            .map(|i| i.perturbed.as_ref().map_or(0, |p| p.len() as u64))
            .sum();
        n * (u64::from(self.needs_qa())
            + u64::from(self.needs_para())
            + u64::from(self.has("Q_A_ROUGE")))
            + if self.needs_pert() { pert } else { 0 }
    }

    /// The same split restricted to `metrics` (the retain model computes only what the
    /// reference values need).
    pub fn restricted(&self, metrics: &[&str]) -> Option<Prepared> {
        let keep: BTreeSet<String> = self
            .metrics
            .iter()
            .filter(|m| metrics.contains(&m.as_str()))
            .cloned()
            .collect();
        if keep.is_empty() {
            return None;
        }
        Some(Prepared {
            data: SplitData {
                name: self.data.name.clone(),
                spec: self.data.spec.clone(),
                path: self.data.path.clone(),
                rows: vec![],
            },
            settings: self.settings.clone(),
            metrics: keep,
            items: self
                .items
                .iter()
                .map(|i| Item {
                    question: i.question.clone(),
                    answer: i.answer.clone(),
                    paraphrased: i.paraphrased.clone(),
                    perturbed: i.perturbed.clone(),
                })
                .collect(),
        })
    }
}

/// Check a split's rows against what its metrics need.
pub fn prepare(data: SplitData, settings: SplitSection) -> Result<Prepared> {
    let metrics: BTreeSet<String> = settings.metrics.iter().cloned().collect();
    let mut p = Prepared {
        data,
        settings,
        metrics,
        items: vec![],
    };
    let (needs_para, needs_pert) = (p.needs_para(), p.needs_pert());
    let para_why = if p.has("Q_A_PARA_Prob") {
        "Q_A_PARA_Prob"
    } else {
        "the truth ratio"
    };
    let pert_why = if p.has("truth_ratio") {
        "the truth ratio"
    } else {
        "Q_A_PERT_Prob / Q_A_Prob_normalised"
    };
    for i in 0..p.data.rows.len() {
        let d = &p.data;
        let item = Item {
            question: d.str_field(i, "question", "every tofu metric")?,
            answer: d.str_field(i, "answer", "every tofu metric")?,
            paraphrased: if needs_para {
                Some(d.str_field(i, "paraphrased_answer", para_why)?)
            } else {
                None
            },
            perturbed: if needs_pert {
                Some(d.str_list(i, "perturbed_answer", pert_why)?)
            } else {
                None
            },
        };
        p.items.push(item);
    }
    Ok(p)
}

/// The summary key of a split metric, with open-unlearning's names.
pub fn metric_key(split: &str, metric: &str) -> String {
    match (split, metric) {
        (FORGET, "truth_ratio") => "forget_truth_ratio".into(),
        (_, "truth_ratio") => format!("{split}_Truth_Ratio"),
        (FORGET, "extraction_strength") => "extraction_strength".into(),
        (FORGET, "exact_memorization") => "exact_memorization".into(),
        _ => format!("{split}_{metric}"),
    }
}

/// Per-item results of one split.
struct SplitScores {
    items: Vec<Value>,
    summary: Vec<(String, f64)>,
    truth_ratios: Option<Vec<f64>>,
    /// per attack in [`ATTACKS`] order
    mia: Option<[Vec<f64>; 4]>,
}

fn encode_checked(
    lm: &Lm,
    split: &Prepared,
    i: usize,
    question: &str,
    answer: &str,
    what: &str,
    max_len: usize,
) -> Result<EncodedExample> {
    let e = lm.tok.encode_qa(question, answer, Some(max_len))?;
    if e.num_labelled() == 0 {
        return Err(split.data.error(
            i,
            format!("the {what} has no tokens left to score after truncation to {max_len} tokens"),
        ));
    }
    Ok(e)
}

fn run_split(
    lm: &Lm,
    split: &Prepared,
    suite: &Suite,
    bar: &ProgressBar,
    prefix: &str,
) -> Result<SplitScores> {
    let name = &split.data.name;
    let max_len = suite.scoring.max_length.min(lm.max_positions());
    let bs = suite.scoring.batch_size;
    let n = split.items.len();
    let set_msg = |what: &str| bar.set_message(format!("{prefix}{name}: {what}"));

    let mut qa = vec![];
    let mut para = vec![];
    let mut pert = vec![];
    let mut pert_owner = vec![];
    for (i, it) in split.items.iter().enumerate() {
        if split.needs_qa() {
            qa.push(encode_checked(
                lm,
                split,
                i,
                &it.question,
                &it.answer,
                "answer",
                max_len,
            )?);
        }
        if let (true, Some(p)) = (split.needs_para(), &it.paraphrased) {
            para.push(encode_checked(
                lm,
                split,
                i,
                &it.question,
                p,
                "paraphrased answer",
                max_len,
            )?);
        }
        if let (true, Some(ps)) = (split.needs_pert(), &it.perturbed) {
            for p in ps {
                pert.push(encode_checked(
                    lm,
                    split,
                    i,
                    &it.question,
                    p,
                    "perturbed answer",
                    max_len,
                )?);
                pert_owner.push(i);
            }
        }
    }
    set_msg("answers");
    let qa_scores: Vec<Scored> = score(lm, &qa, bs, split.needs_stats(), bar)?;
    set_msg("paraphrased answers");
    let para_scores = score(lm, &para, bs, false, bar)?;
    set_msg("perturbed answers");
    let pert_scores = score(lm, &pert, bs, false, bar)?;
    let mut pert_losses: Vec<Vec<f64>> = vec![vec![]; n];
    for (s, &owner) in pert_scores.iter().zip(&pert_owner) {
        pert_losses[owner].push(s.mean_nll);
    }

    let generations = if split.has("Q_A_ROUGE") {
        set_msg("generation");
        let prompts = split
            .items
            .iter()
            .map(|it| lm.tok.encode_prompt(&it.question))
            .collect::<Result<Vec<_>>>()?;
        Some(generate(
            lm,
            &prompts,
            suite.generation.max_new_tokens,
            suite.generation.batch_size,
            &suite.generation.stop,
            bar,
        )?)
    } else {
        None
    };

    let mut items = Vec::with_capacity(n);
    let (mut probs, mut para_probs, mut pert_probs, mut norm_probs) =
        (vec![], vec![], vec![], vec![]);
    let (mut ratios, mut rouges, mut es, mut em) = (vec![], vec![], vec![], vec![]);
    let mut mia: [Vec<f64>; 4] = Default::default();
    for (i, it) in split.items.iter().enumerate() {
        let mut row = Map::new();
        row.insert("index".into(), json!(i));
        row.insert("question".into(), json!(it.question));
        row.insert("answer".into(), json!(it.answer));
        if let Some(p) = &it.paraphrased {
            row.insert("paraphrased_answer".into(), json!(p));
        }
        if let Some(p) = &it.perturbed {
            row.insert("perturbed_answer".into(), json!(p));
        }
        let mut sc = Map::new();
        let qa_s = qa_scores.get(i);
        if let Some(s) = qa_s {
            sc.insert("answer_tokens".into(), json!(s.tokens));
            sc.insert("avg_loss".into(), json!(s.mean_nll));
            let p = prob_from_avg_loss(s.mean_nll);
            sc.insert("prob".into(), json!(p));
            probs.push(p);
        }
        let para_loss = para_scores.get(i).map(|s| s.mean_nll);
        if let Some(l) = para_loss {
            let p = prob_from_avg_loss(l);
            sc.insert("paraphrased_avg_loss".into(), json!(l));
            sc.insert("paraphrased_prob".into(), json!(p));
            para_probs.push(p);
        }
        if split.needs_pert() {
            let losses = &pert_losses[i];
            sc.insert("perturbed_avg_loss".into(), json!(losses));
            let pp = prob_from_losses(losses)?;
            sc.insert("perturbed_prob".into(), json!(pp));
            pert_probs.push(pp);
            let correct = match split.correct() {
                CorrectField::Answer => qa_s.map(|s| s.mean_nll),
                CorrectField::ParaphrasedAnswer => para_loss,
            };
            if let Some(c) = correct {
                if split.has("truth_ratio") {
                    let r = truth_ratio(&[c], losses)?;
                    sc.insert("truth_ratio".into(), json!(r));
                    ratios.push(r);
                }
                if split.has("Q_A_Prob_normalised") {
                    let p = normalised_prob(c, losses)?;
                    sc.insert("prob_normalised".into(), json!(p));
                    norm_probs.push(p);
                }
            }
        }
        if let Some(g) = &generations {
            let (text, ids) = &g[i];
            let reference = answer_text(lm, &qa[i])?;
            let r = rouge(reference.trim(), text);
            row.insert("generation".into(), json!(text));
            row.insert("generation_tokens".into(), json!(ids.len()));
            sc.insert("rougeL_recall".into(), json!(r.rouge_l.recall));
            sc.insert("rougeL_f1".into(), json!(r.rouge_l.fmeasure));
            sc.insert("rouge1_recall".into(), json!(r.rouge1.recall));
            rouges.push(r.rouge_l.recall);
        }
        if let Some(st) = qa_s.and_then(|s| s.stats.as_ref()) {
            if split.has("extraction_strength") {
                let v = extraction_strength(&st.argmax, &st.labels)?;
                sc.insert("extraction_strength".into(), json!(v));
                es.push(v);
            }
            if split.has("exact_memorization") {
                let v = exact_memorization(&st.argmax, &st.labels)?;
                sc.insert("exact_memorization".into(), json!(v));
                em.push(v);
            }
            if split.has("mia") {
                let loss = qa_s.map_or(f64::NAN, |s| s.mean_nll);
                let text = answer_text(lm, &qa[i])?;
                let scores = [
                    loss,
                    mia_zlib(loss, &text)?,
                    mia_min_k(&st.logprobs, MIN_K_DEFAULT)?,
                    mia_min_k_plus_plus(&st.logprobs, &st.mu, &st.var, MIN_K_DEFAULT)?,
                ];
                for (k, v) in scores.into_iter().enumerate() {
                    sc.insert(ATTACKS[k].into(), json!(v));
                    mia[k].push(v);
                }
            }
        }
        row.insert("scores".into(), Value::Object(sc));
        items.push(Value::Object(row));
    }

    let mut summary = vec![];
    let mut put = |metric: &str, v: f64| summary.push((metric_key(name, metric), v));
    if split.has("Q_A_Prob") {
        put("Q_A_Prob", mean(&probs)?);
    }
    if split.has("Q_A_PARA_Prob") {
        put("Q_A_PARA_Prob", mean(&para_probs)?);
    }
    if split.has("Q_A_PERT_Prob") {
        put("Q_A_PERT_Prob", mean(&pert_probs)?);
    }
    if split.has("Q_A_Prob_normalised") {
        put("Q_A_Prob_normalised", mean(&norm_probs)?);
    }
    if split.has("Q_A_ROUGE") {
        put("Q_A_ROUGE", mean(&rouges)?);
    }
    if split.has("truth_ratio") {
        let agg = match split
            .settings
            .truth_ratio
            .unwrap_or(TruthRatioAgg::TrueBetter)
        {
            TruthRatioAgg::CloserTo1 => truth_ratio_closer_to_1(&ratios)?,
            TruthRatioAgg::TrueBetter => truth_ratio_true_better(&ratios)?,
        };
        put("truth_ratio", agg);
    }
    if split.has("extraction_strength") {
        put("extraction_strength", mean(&es)?);
    }
    if split.has("exact_memorization") {
        if let Some(v) = mean_defined(&em)? {
            put("exact_memorization", v);
        }
    }
    Ok(SplitScores {
        items,
        summary,
        truth_ratios: split.has("truth_ratio").then_some(ratios),
        mia: split.has("mia").then_some(mia),
    })
}

/// The answer as open-unlearning's ROUGE reference and ZLib text: the labelled tokens decoded
/// with special tokens skipped.
fn answer_text(lm: &Lm, e: &EncodedExample) -> Result<String> {
    let ids: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    lm.tok.decode(&ids, true)
}

/// The retain model's values that forget quality and privleak compare against.
#[derive(Debug, Clone, Default)]
pub struct RefValues {
    pub source: String,
    /// the suite name recorded in the retain log
    pub suite: Option<String>,
    pub forget_truth_ratio: Option<Vec<f64>>,
    pub mia_min_k: Option<f64>,
}

impl RefValues {
    fn to_json(&self) -> Value {
        json!({
            "source": self.source,
            "forget_truth_ratio": self.forget_truth_ratio,
            "mia_min_k": self.mia_min_k,
        })
    }
}

/// A `--retain-log` file: a JSON object that is either one of our EVAL.json files (it has
/// `suite_kind`, checked to be `kind`; `suite` holds its suite name) or a foreign log
/// (open-unlearning's *_EVAL.json; `suite` is None).
pub(crate) struct RetainLog {
    pub obj: serde_json::Map<String, Value>,
    pub suite: Option<String>,
    /// "log PATH", for the report
    pub source: String,
}

impl RetainLog {
    /// `needs` ends the error for a log of another suite kind.
    pub(crate) fn open(path: &Path, kind: &str, needs: &str) -> Result<Self> {
        let v: Value = crate::error::read_json(path)?;
        let Value::Object(obj) = v else {
            return Err(Error::data(
                path,
                "not an evaluation log (expected a JSON object)",
            ));
        };
        let suite = match obj.get("suite_kind") {
            None => None,
            Some(found) => {
                let name = obj.get("suite").and_then(Value::as_str).unwrap_or("?");
                if found.as_str() != Some(kind) {
                    return Err(Error::data(
                        path,
                        format!("a log of the '{name}' suite (kind {found}); {needs}"),
                    ));
                }
                Some(name.to_string())
            }
        };
        Ok(RetainLog {
            obj,
            suite,
            source: format!("log {}", path.display()),
        })
    }
}

/// Read the reference values from an earlier EVAL.json of a tofu suite, or from an
/// open-unlearning TOFU_EVAL.json (`forget_truth_ratio.value_by_index`, `mia_min_k.agg_value`).
pub fn read_retain_log(path: &Path) -> Result<RefValues> {
    let log = RetainLog::open(
        path,
        "tofu",
        "--retain-log needs the EVAL.json of a tofu suite run on the retain model",
    )?;
    let (obj, source) = (&log.obj, log.source.clone());
    let bad = |m: String| Error::data(path, m);
    if let Some(name) = &log.suite {
        let ratios = obj
            .get("splits")
            .and_then(|s| s.get(FORGET))
            .and_then(|s| s.get("items"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .map(|it| it["scores"]["truth_ratio"].as_f64())
                    .collect::<Option<Vec<f64>>>()
            });
        let ratios = match ratios {
            None => None,
            Some(None) => {
                return Err(bad(
                    "the forget split's items lack a numeric scores.truth_ratio".into(),
                ))
            }
            Some(Some(r)) => Some(r),
        };
        let mia_min_k = obj
            .get("summary")
            .and_then(|s| s.get("mia_min_k"))
            .and_then(Value::as_f64);
        return Ok(RefValues {
            source,
            suite: Some(name.clone()),
            forget_truth_ratio: ratios,
            mia_min_k,
        });
    }
    if let Some(tr) = obj.get("forget_truth_ratio") {
        let by_index = tr
            .get("value_by_index")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("forget_truth_ratio has no value_by_index object".into()))?;
        let mut pairs = vec![];
        for (k, item) in by_index {
            let idx: u64 = k.parse().map_err(|_| {
                bad(format!(
                    "forget_truth_ratio.value_by_index: key '{k}' is not an index"
                ))
            })?;
            let score = item.get("score").and_then(Value::as_f64).ok_or_else(|| {
                bad(format!(
                    "forget_truth_ratio.value_by_index.{k}: no numeric score"
                ))
            })?;
            pairs.push((idx, score));
        }
        pairs.sort_by_key(|p| p.0);
        let mia_min_k = obj
            .get("mia_min_k")
            .and_then(|m| m.get("agg_value"))
            .and_then(Value::as_f64);
        return Ok(RefValues {
            source,
            suite: None,
            forget_truth_ratio: Some(pairs.into_iter().map(|p| p.1).collect()),
            mia_min_k,
        });
    }
    Err(bad(
        "not an evaluation log: it has neither suite_kind (an unlearn EVAL.json) nor forget_truth_ratio (an open-unlearning TOFU_EVAL.json)".into(),
    ))
}

/// Evaluate the retain model on what the reference values need.
fn reference_from_model(
    lm: &Lm,
    source: String,
    splits: &[Prepared],
    suite: &Suite,
    bar: &ProgressBar,
) -> Result<RefValues> {
    let mut out = RefValues {
        source,
        ..Default::default()
    };
    let forget = splits.iter().find(|s| s.data.name == FORGET);
    let holdout = splits.iter().find(|s| s.data.name == HOLDOUT);
    let mia_pair = forget.is_some_and(|f| f.has("mia")) && holdout.is_some_and(|h| h.has("mia"));
    let mut forget_mia = None;
    if let Some(f) = forget {
        let mut wanted = vec!["truth_ratio"];
        if mia_pair {
            wanted.push("mia");
        }
        if let Some(r) = f.restricted(&wanted) {
            let s = run_split(lm, &r, suite, bar, "retain model ")?;
            out.forget_truth_ratio = s.truth_ratios;
            forget_mia = s.mia;
        }
    }
    if let (true, Some(h), Some(fm)) = (mia_pair, holdout, forget_mia) {
        if let Some(r) = h.restricted(&["mia"]) {
            let s = run_split(lm, &r, suite, bar, "retain model ")?;
            if let Some(hm) = s.mia {
                out.mia_min_k = Some(mia_auc(&fm[2], &hm[2])?);
            }
        }
    }
    Ok(out)
}

/// Work units of the retain-model pass (for the progress bar).
pub fn reference_work(splits: &[Prepared]) -> u64 {
    let forget = splits.iter().find(|s| s.data.name == FORGET);
    let holdout = splits.iter().find(|s| s.data.name == HOLDOUT);
    let mia_pair = forget.is_some_and(|f| f.has("mia")) && holdout.is_some_and(|h| h.has("mia"));
    let mut w = 0;
    if let Some(r) = forget.and_then(|f| {
        f.restricted(if mia_pair {
            &["truth_ratio", "mia"]
        } else {
            &["truth_ratio"]
        })
    }) {
        w += r.work();
    }
    if mia_pair {
        if let Some(r) = holdout.and_then(|h| h.restricted(&["mia"])) {
            w += r.work();
        }
    }
    w
}

/// Where forget quality and privleak get the retain model's values.
pub enum RefInput<'a> {
    None,
    /// read from a log
    Values(RefValues),
    /// evaluate this model (described by the string)
    Model(&'a Lm, String),
}

/// Run the suite on the prepared splits.
pub fn run(
    lm: &Lm,
    suite: &Suite,
    splits: &[Prepared],
    reference: RefInput,
    bar: &ProgressBar,
) -> Result<SuiteOutput> {
    let mut out = SuiteOutput::default();
    let mut summary: Map<String, Value> = Map::new();
    let mut forget_ratios = None;
    let mut mia_by_split: Vec<(String, [Vec<f64>; 4])> = vec![];
    for split in splits {
        let s = run_split(lm, split, suite, bar, "")?;
        for (k, v) in s.summary {
            summary.insert(k, json!(v));
        }
        if split.data.name == FORGET {
            forget_ratios = s.truth_ratios;
        }
        if let Some(m) = s.mia {
            mia_by_split.push((split.data.name.clone(), m));
        }
        out.splits.push(SplitOut {
            name: split.data.name.clone(),
            spec: split.data.spec.clone(),
            path: split.data.path.clone(),
            items: s.items,
        });
    }

    let ref_values = match reference {
        RefInput::None => None,
        RefInput::Values(values) => Some(values),
        RefInput::Model(ref_lm, source) => {
            Some(reference_from_model(ref_lm, source, splits, suite, bar)?)
        }
    };

    if let Some(logged) = ref_values.as_ref().and_then(|v| v.suite.as_ref()) {
        if *logged != suite.name {
            out.notes.push(format!(
                "the retain log comes from suite '{logged}', this run is '{}'",
                suite.name
            ));
        }
    }
    // forget quality
    if let Some(r) = &forget_ratios {
        match ref_values
            .as_ref()
            .and_then(|v| v.forget_truth_ratio.as_ref())
        {
            Some(reference) if !reference.is_empty() => {
                summary.insert(
                    "forget_quality".into(),
                    json!(forget_quality(r, reference)?),
                );
                if reference.len() != r.len() {
                    out.notes.push(format!(
                        "forget_quality compares {} forget truth ratios with the retain model's {}: were both evaluated on the same forget set?",
                        r.len(),
                        reference.len()
                    ));
                }
            }
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "the retain model's forget truth ratios are empty".into(),
                ))
            }
            None => {
                summary.insert("forget_quality".into(), Value::Null);
                out.notes.push(match &ref_values {
                    None => "forget_quality is null: give --retain-model or --retain-log".into(),
                    Some(v) => format!(
                        "forget_quality is null: {} has no forget truth ratios",
                        v.source
                    ),
                });
            }
        }
    }

    // MIA AUCs and privleak
    let forget_mia = mia_by_split.iter().find(|(n, _)| n == FORGET);
    let holdout_mia = mia_by_split.iter().find(|(n, _)| n == HOLDOUT);
    if let (Some((_, f)), Some((_, h))) = (forget_mia, holdout_mia) {
        let mut min_k_auc = f64::NAN;
        for (k, name) in ATTACKS.iter().enumerate() {
            let auc = mia_auc(&f[k], &h[k])?;
            if *name == "mia_min_k" {
                min_k_auc = auc;
            }
            summary.insert((*name).into(), json!(auc));
        }
        let r_auc = ref_values.as_ref().and_then(|v| v.mia_min_k);
        if r_auc.is_none() {
            out.notes.push(
                "privleak uses the reference AUC 0.5: no retain-model Min-K% AUC was given (it needs forget and holdout splits)".into(),
            );
        }
        summary.insert(
            "privleak".into(),
            json!(metrics::privleak(min_k_auc, r_auc)?),
        );
    } else if forget_mia.is_some() || holdout_mia.is_some() {
        out.notes.push(format!(
            "privleak and the MIA AUCs need both a '{FORGET}' and a '{HOLDOUT}' split with the mia metric"
        ));
    }

    // model utility
    if !suite.model_utility.is_empty() {
        let present: Vec<(String, f64)> = suite
            .model_utility
            .iter()
            .filter_map(|k| {
                summary
                    .get(k)
                    .and_then(Value::as_f64)
                    .map(|v| (k.clone(), v))
            })
            .collect();
        if !present.is_empty() {
            let values: Vec<f64> = present.iter().map(|p| p.1).collect();
            summary.insert("model_utility".into(), json!(hmean(&values)?));
            summary.insert(
                "model_utility_components".into(),
                json!(present.iter().map(|p| &p.0).collect::<Vec<_>>()),
            );
            if present.len() < suite.model_utility.len() {
                let missing: Vec<&String> = suite
                    .model_utility
                    .iter()
                    .filter(|k| !present.iter().any(|p| &p.0 == *k))
                    .collect();
                out.notes.push(format!(
                    "model_utility is the harmonic mean of {} of its {} components; missing: {}",
                    present.len(),
                    suite.model_utility.len(),
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    out.summary = summary;
    out.reference = ref_values.map(|v| v.to_json());
    Ok(out)
}
