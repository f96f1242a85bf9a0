//! The MUSE suite (shared/reference/metrics.md §4–5): knowledge memorisation (few-shot QA,
//! ROUGE-L F1 of ≤ 32-token greedy answers), verbatim memorisation (ROUGE-L F1 of 128-token greedy
//! continuations, plus extraction strength and exact memorisation under teacher forcing) and
//! privacy leakage (Min-K% AUC of forget vs holdout texts against the retain/retrain model's).
//!
//! What a split measures follows from its name ([`split_role`]):
//!
//! | split | rows | summary keys |
//! | --- | --- | --- |
//! | `knowmem_X` | question, answer | `X_knowmem_ROUGE` |
//! | `knowmem_X_icl` | question, answer | (the in-context examples of `knowmem_X`) |
//! | `verbmem_X` | prompt, gt | `X_verbmem_ROUGE`, `extraction_strength`, `exact_memorization` (`X_…` unless X = forget) |
//! | `forget`, `holdout`, `retain` | text | `privleak`, `mia_loss`, `mia_zlib`, `mia_min_k`, `mia_min_k_plus_plus` (forget vs holdout), `retain_mia_min_k` (retain vs holdout) |
use super::lm::{generate, score, Lm, SplitData, TokenStats};
use super::suite::{SplitSection, Suite};
use super::tofu::{RefInput, RefValues};
use super::{SplitOut, SuiteOutput};
use crate::error::{Error, Result};
use crate::metrics::{
    self, exact_memorization, extraction_strength, mean, mean_defined, mia_auc, mia_min_k,
    mia_min_k_plus_plus, mia_zlib, rouge, MIN_K_DEFAULT,
};
use crate::tokenizer::{EncodedExample, IGNORE_INDEX};
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};
use std::path::Path;

/// privleak's members.
pub const FORGET: &str = "forget";
/// privleak's non-members.
pub const HOLDOUT: &str = "holdout";
/// Texts the model should still know (their AUC against holdout is `retain_mia_min_k`).
pub const RETAIN: &str = "retain";
/// MIA attacks: summary key (the AUC of forget vs holdout) and per-item score name.
const ATTACKS: [&str; 4] = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"];
/// Index of Min-K% in [`ATTACKS`] (privleak's attack).
const MIN_K: usize = 2;

/// What an invalid muse split name is told.
pub const SPLIT_NAMES_HELP: &str = "a muse split is named knowmem_NAME (rows question, answer), \
knowmem_NAME_icl (its in-context examples), verbmem_NAME (rows prompt, gt), or forget, holdout, \
retain (rows text, for privleak)";

/// What a muse split measures, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `knowmem_X`: few-shot QA, ROUGE-L F1
    Knowmem,
    /// `knowmem_X_icl`: the in-context examples of `knowmem_X`
    Icl,
    /// `verbmem_X`: continuation of a prompt, ROUGE-L F1 against gt
    Verbmem,
    /// `forget`, `holdout`, `retain`: texts scored for membership inference
    Text,
}

/// The role of a split name, `None` for names a muse suite does not know.
pub fn split_role(name: &str) -> Option<Role> {
    if matches!(name, FORGET | HOLDOUT | RETAIN) {
        return Some(Role::Text);
    }
    if let Some(rest) = name.strip_prefix("knowmem_") {
        if let Some(base) = rest.strip_suffix("_icl") {
            return (!base.is_empty()).then_some(Role::Icl);
        }
        return (!rest.is_empty()).then_some(Role::Knowmem);
    }
    if let Some(rest) = name.strip_prefix("verbmem_") {
        return (!rest.is_empty()).then_some(Role::Verbmem);
    }
    None
}

/// `X` of `knowmem_X` / `verbmem_X` (the name itself otherwise).
fn task(split: &str) -> &str {
    split
        .strip_prefix("knowmem_")
        .or_else(|| split.strip_prefix("verbmem_"))
        .unwrap_or(split)
}

/// The summary key of a knowmem split: `X_knowmem_ROUGE`.
pub fn knowmem_key(split: &str) -> String {
    format!("{}_knowmem_ROUGE", task(split))
}

/// The summary key of a verbmem split: `X_verbmem_ROUGE`.
pub fn verbmem_key(split: &str) -> String {
    format!("{}_verbmem_ROUGE", task(split))
}

/// Extraction strength / exact memorisation of a verbmem split: no prefix for verbmem_forget
/// (open-unlearning's `extraction_strength`), `X_{metric}` otherwise.
pub fn memorisation_key(split: &str, metric: &str) -> String {
    match task(split) {
        FORGET => metric.to_string(),
        t => format!("{t}_{metric}"),
    }
}

/// The in-context examples' split of a knowmem split.
pub fn icl_split(knowmem: &str) -> String {
    format!("{knowmem}_icl")
}

enum Rows {
    /// (question, answer)
    Qa(Vec<(String, String)>),
    /// (prompt, gt)
    Completion(Vec<(String, String)>),
    Text(Vec<String>),
}

/// A split ready to run: its rows checked for the fields its role needs.
pub struct Prepared {
    pub data: SplitData,
    pub settings: SplitSection,
    pub role: Role,
    rows: Rows,
}

impl Prepared {
    pub fn items(&self) -> usize {
        match &self.rows {
            Rows::Qa(r) | Rows::Completion(r) => r.len(),
            Rows::Text(r) => r.len(),
        }
    }

    /// Generations and forward passes this split costs (for the progress bar).
    pub fn work(&self) -> u64 {
        let n = self.items() as u64;
        match self.role {
            Role::Knowmem | Role::Text => n,
            Role::Verbmem => 2 * n,
            Role::Icl => 0,
        }
    }

    fn qa(&self) -> &[(String, String)] {
        match &self.rows {
            Rows::Qa(r) => r,
            _ => &[],
        }
    }
}

/// Check a split's rows against what its role needs.
pub fn prepare(data: SplitData, settings: SplitSection) -> Result<Prepared> {
    let role = split_role(&data.name).ok_or_else(|| {
        Error::InvalidArgument(format!("split '{}': {SPLIT_NAMES_HELP}", data.name))
    })?;
    if data.rows.is_empty() {
        return Err(Error::data(
            &data.path,
            format!("split '{}': the file holds no records", data.name),
        ));
    }
    let n = data.rows.len();
    let rows = match role {
        Role::Knowmem | Role::Icl => {
            let why = if role == Role::Knowmem {
                "knowmem"
            } else {
                "knowmem in-context examples"
            };
            Rows::Qa(
                (0..n)
                    .map(|i| {
                        Ok((
                            data.str_field(i, "question", why)?,
                            data.str_field(i, "answer", why)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Role::Verbmem => Rows::Completion(
            (0..n)
                .map(|i| {
                    Ok((
                        data.str_field(i, "prompt", "verbmem")?,
                        data.str_field(i, "gt", "verbmem")?,
                    ))
                })
                .collect::<Result<_>>()?,
        ),
        Role::Text => Rows::Text(
            (0..n)
                .map(|i| data.str_field(i, "text", "privleak"))
                .collect::<Result<_>>()?,
        ),
    };
    Ok(Prepared {
        data,
        settings,
        role,
        rows,
    })
}

/// Prepare the given splits, then add the in-context examples of each knowmem split from the
/// suite's `source` of `knowmem_X_icl` when the command line did not name that split.
pub fn prepare_all(raw: Vec<(SplitData, SplitSection)>, suite: &Suite) -> Result<Vec<Prepared>> {
    let mut out = raw
        .into_iter()
        .map(|(d, s)| prepare(d, s))
        .collect::<Result<Vec<_>>>()?;
    let missing: Vec<String> = out
        .iter()
        .filter(|p| p.role == Role::Knowmem)
        .map(|p| icl_split(&p.data.name))
        .filter(|n| !out.iter().any(|p| &p.data.name == n))
        .collect();
    for name in missing {
        if let Some(section) = suite.splits.get(&name) {
            if let Some(src) = &section.source {
                let data = SplitData::read(&name, src, section.max_items)?;
                out.push(prepare(data, section.clone())?);
            }
        }
    }
    Ok(out)
}

/// Prompts longer than the model allows (with room for `max_new` tokens) keep their last tokens
/// (and a leading BOS); returns how many were cut.
fn fit_prompts(lm: &Lm, prompts: &mut [Vec<u32>], max_new: usize) -> usize {
    let cap = lm.max_positions().saturating_sub(max_new).max(1);
    let bos = lm.tok.bos_token_id();
    let mut cut = 0;
    for p in prompts.iter_mut().filter(|p| p.len() > cap) {
        let keep_bos = cap > 1 && bos.is_some() && p.first().copied() == bos;
        let tail = if keep_bos { cap - 1 } else { cap };
        let mut v: Vec<u32> = if keep_bos { vec![p[0]] } else { vec![] };
        v.extend_from_slice(&p[p.len() - tail..]);
        *p = v;
        cut += 1;
    }
    cut
}

fn generation_settings(suite: &Suite, split: &Prepared) -> (usize, Vec<String>) {
    (
        split
            .settings
            .max_new_tokens
            .unwrap_or(suite.generation.max_new_tokens),
        split
            .settings
            .stop
            .clone()
            .unwrap_or_else(|| suite.generation.stop.clone()),
    )
}

fn add_bos(suite: &Suite) -> bool {
    suite.prompt.as_ref().is_some_and(|p| p.add_bos)
}

fn encode_prompt(lm: &Lm, split: &Prepared, i: usize, text: &str, bos: bool) -> Result<Vec<u32>> {
    let ids = lm.tok.encode(text, bos)?;
    if ids.is_empty() {
        return Err(split.data.error(i, "the prompt encodes to no tokens"));
    }
    Ok(ids)
}

/// The knowmem prompt prefix: the description, then each example as
/// "Question: {q}\nAnswer: {a}\n\n".
pub fn icl_prefix(description: &str, examples: &[(String, String)]) -> String {
    let mut s = description.to_string();
    for (q, a) in examples {
        s.push_str(&format!("Question: {q}\nAnswer: {a}\n\n"));
    }
    s
}

/// The knowmem prompt of one question after the prefix.
pub fn knowmem_prompt(prefix: &str, question: &str) -> String {
    format!("{prefix}Question: {question}\nAnswer: ")
}

fn rouge_scores(reference: &str, generation: &str) -> (f64, Map<String, Value>) {
    let r = rouge(reference.trim(), generation);
    let mut sc = Map::new();
    sc.insert("rougeL_f1".into(), json!(r.rouge_l.fmeasure));
    sc.insert("rougeL_recall".into(), json!(r.rouge_l.recall));
    sc.insert("rouge1_recall".into(), json!(r.rouge1.recall));
    (r.rouge_l.fmeasure, sc)
}

fn run_knowmem(
    lm: &Lm,
    suite: &Suite,
    split: &Prepared,
    all: &[Prepared],
    bar: &ProgressBar,
    notes: &mut Vec<String>,
) -> Result<(Vec<Value>, f64)> {
    let name = &split.data.name;
    let icl_name = icl_split(name);
    let icl = all.iter().find(|p| p.data.name == icl_name);
    let examples = icl.map_or(&[][..], |p| p.qa());
    let prompt = suite.prompt.clone().unwrap_or_default();
    let shots = prompt
        .shots
        .map_or(examples.len(), |k| k.min(examples.len()));
    match (icl, prompt.shots) {
        (_, Some(0)) => notes.push(format!("{name}: zero-shot prompts (prompt.shots = 0)")),
        (None, _) => notes.push(format!(
            "{name}: zero-shot prompts: no in-context examples (give --data {icl_name}=PATH)"
        )),
        (Some(_), Some(k)) if k > examples.len() => notes.push(format!(
            "{name}: prompt.shots = {k} but {icl_name} holds {} examples; {shots}-shot prompts",
            examples.len()
        )),
        (Some(_), _) => notes.push(format!("{name}: {shots}-shot prompts from {icl_name}")),
    }
    let prefix = icl_prefix(&prompt.description, &examples[..shots]);
    let (max_new, stop) = generation_settings(suite, split);
    let bos = add_bos(suite);
    let rows = split.qa();
    let mut prompts = rows
        .iter()
        .enumerate()
        .map(|(i, (q, _))| encode_prompt(lm, split, i, &knowmem_prompt(&prefix, q), bos))
        .collect::<Result<Vec<_>>>()?;
    let cut = fit_prompts(lm, &mut prompts, max_new);
    if cut > 0 {
        notes.push(format!(
            "{name}: {cut} prompts were too long for the model and lost their first tokens; use fewer shots (prompt.shots)"
        ));
    }
    bar.set_message(format!("{name}: generation"));
    let gens = generate(
        lm,
        &prompts,
        max_new,
        suite.generation.batch_size,
        &stop,
        bar,
    )?;
    let mut items = Vec::with_capacity(rows.len());
    let mut f1s = Vec::with_capacity(rows.len());
    for (i, ((q, a), (text, ids))) in rows.iter().zip(&gens).enumerate() {
        let (f1, sc) = rouge_scores(a, text);
        f1s.push(f1);
        items.push(json!({
            "index": i,
            "question": q,
            "answer": a,
            "shots": shots,
            "prompt_tokens": prompts[i].len(),
            "generation": text,
            "generation_tokens": ids.len(),
            "scores": sc,
        }));
    }
    Ok((items, mean(&f1s)?))
}

/// Summary entries of one split: (key, value).
type Summary = Vec<(String, f64)>;

fn run_verbmem(
    lm: &Lm,
    suite: &Suite,
    split: &Prepared,
    bar: &ProgressBar,
    notes: &mut Vec<String>,
) -> Result<(Vec<Value>, Summary)> {
    let name = &split.data.name;
    let rows = match &split.rows {
        Rows::Completion(r) => r,
        _ => return Ok((vec![], vec![])),
    };
    let (max_new, stop) = generation_settings(suite, split);
    let bos = add_bos(suite);
    let max_len = suite.scoring.max_length.min(lm.max_positions());
    let mut prompts = Vec::with_capacity(rows.len());
    let mut forced = Vec::with_capacity(rows.len());
    for (i, (p, gt)) in rows.iter().enumerate() {
        let ids = encode_prompt(lm, split, i, p, bos)?;
        // labels on gt: prompt + " " + gt with the prompt's tokens masked (open-unlearning)
        let full = lm.tok.encode(&format!("{p} {gt}"), bos)?;
        let labels = full
            .iter()
            .enumerate()
            .map(|(k, &id)| {
                if k < ids.len() {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let mut e = EncodedExample {
            input_ids: full,
            labels,
        };
        e.truncate(Some(max_len));
        if e.num_labelled() == 0 {
            return Err(split.data.error(
                i,
                format!("no gt tokens to score within {max_len} tokens after the prompt (empty gt, or the prompt fills the window)"),
            ));
        }
        forced.push(e);
        prompts.push(ids);
    }
    let cut = fit_prompts(lm, &mut prompts, max_new);
    if cut > 0 {
        notes.push(format!(
            "{name}: {cut} prompts were too long for the model and lost their first tokens"
        ));
    }
    bar.set_message(format!("{name}: generation"));
    let gens = generate(
        lm,
        &prompts,
        max_new,
        suite.generation.batch_size,
        &stop,
        bar,
    )?;
    bar.set_message(format!("{name}: teacher forcing"));
    let scored = score(lm, &forced, suite.scoring.batch_size, true, bar)?;
    let mut items = Vec::with_capacity(rows.len());
    let (mut f1s, mut es, mut em) = (vec![], vec![], vec![]);
    for (i, ((p, gt), (text, ids))) in rows.iter().zip(&gens).enumerate() {
        let (f1, mut sc) = rouge_scores(gt, text);
        f1s.push(f1);
        sc.insert("gt_tokens".into(), json!(scored[i].tokens));
        if let Some(st) = &scored[i].stats {
            let e = extraction_strength(&st.argmax, &st.labels)?;
            let m = exact_memorization(&st.argmax, &st.labels)?;
            sc.insert("extraction_strength".into(), json!(e));
            sc.insert("exact_memorization".into(), json!(m));
            es.push(e);
            em.push(m);
        }
        items.push(json!({
            "index": i,
            "prompt": p,
            "gt": gt,
            "prompt_tokens": prompts[i].len(),
            "generation": text,
            "generation_tokens": ids.len(),
            "scores": sc,
        }));
    }
    let mut summary = vec![(verbmem_key(name), mean(&f1s)?)];
    if !es.is_empty() {
        summary.push((memorisation_key(name, "extraction_strength"), mean(&es)?));
    }
    if let Some(v) = mean_defined(&em)? {
        summary.push((memorisation_key(name, "exact_memorization"), v));
    }
    Ok((items, summary))
}

/// Per-text MIA scores of a text split, per attack in [`ATTACKS`] order.
fn run_text(
    lm: &Lm,
    suite: &Suite,
    split: &Prepared,
    bar: &ProgressBar,
    prefix: &str,
) -> Result<(Vec<Value>, [Vec<f64>; 4])> {
    let name = &split.data.name;
    let texts = match &split.rows {
        Rows::Text(t) => t,
        _ => return Ok((vec![], Default::default())),
    };
    let max_len = suite.scoring.max_length.min(lm.max_positions());
    let mut encoded = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let e = lm.tok.encode_text(t, Some(max_len))?;
        if e.len() < 2 {
            return Err(split.data.error(
                i,
                "field 'text' has no tokens to score (the first token carries no loss)",
            ));
        }
        encoded.push(e);
    }
    bar.set_message(format!("{prefix}{name}: MIA scores"));
    let scored = score(lm, &encoded, suite.scoring.batch_size, true, bar)?;
    let mut scores: [Vec<f64>; 4] = Default::default();
    let mut items = Vec::with_capacity(texts.len());
    let no_stats = TokenStats::default();
    for (i, (s, e)) in scored.iter().zip(&encoded).enumerate() {
        let ids: Vec<u32> = e
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let decoded = lm.tok.decode(&ids, true)?;
        let st = s.stats.as_ref().unwrap_or(&no_stats);
        let values = [
            s.mean_nll,
            mia_zlib(s.mean_nll, &decoded)?,
            mia_min_k(&st.logprobs, MIN_K_DEFAULT)?,
            mia_min_k_plus_plus(&st.logprobs, &st.mu, &st.var, MIN_K_DEFAULT)?,
        ];
        let mut sc = Map::new();
        sc.insert("tokens".into(), json!(s.tokens));
        sc.insert("avg_loss".into(), json!(s.mean_nll));
        for (k, v) in values.into_iter().enumerate() {
            sc.insert(ATTACKS[k].into(), json!(v));
            scores[k].push(v);
        }
        items.push(json!({"index": i, "text": texts[i], "scores": sc}));
    }
    Ok((items, scores))
}

/// Read the retain (retrain) model's Min-K% AUC from an earlier EVAL.json of a muse suite, or
/// from an open-unlearning MUSE_EVAL.json (`mia_min_k.agg_value`).
pub fn read_retain_log(path: &Path) -> Result<RefValues> {
    let log = super::tofu::RetainLog::open(
        path,
        "muse",
        "--retain-log of a muse suite needs the EVAL.json of a muse suite run on the retain (retrain) model",
    )?;
    let (obj, source) = (&log.obj, log.source.clone());
    let bad = |m: String| Error::data(path, m);
    if let Some(name) = &log.suite {
        let auc = obj
            .get("summary")
            .and_then(|s| s.get("mia_min_k"))
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                bad("the log's summary has no numeric mia_min_k (that run needs the forget and holdout splits)".into())
            })?;
        return Ok(RefValues {
            source,
            suite: Some(name.clone()),
            forget_truth_ratio: None,
            mia_min_k: Some(auc),
        });
    }
    if obj.contains_key("forget_truth_ratio") {
        return Err(bad(
            "an open-unlearning TOFU log; a muse suite needs the retain model's MUSE_EVAL.json"
                .into(),
        ));
    }
    if let Some(m) = obj.get("mia_min_k") {
        let auc = m
            .get("agg_value")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("mia_min_k has no numeric agg_value".into()))?;
        return Ok(RefValues {
            source,
            suite: None,
            forget_truth_ratio: None,
            mia_min_k: Some(auc),
        });
    }
    Err(bad(
        "not an evaluation log: it has neither suite_kind (an unlearn EVAL.json) nor mia_min_k (an open-unlearning MUSE_EVAL.json)".into(),
    ))
}

fn text_split<'a>(splits: &'a [Prepared], name: &str) -> Option<&'a Prepared> {
    splits
        .iter()
        .find(|s| s.role == Role::Text && s.data.name == name)
}

/// Work units of the retain-model pass (for the progress bar).
pub fn reference_work(splits: &[Prepared]) -> u64 {
    match (text_split(splits, FORGET), text_split(splits, HOLDOUT)) {
        (Some(f), Some(h)) => f.work() + h.work(),
        _ => 0,
    }
}

/// The retain model's Min-K% AUC of forget vs holdout.
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
    if let (Some(f), Some(h)) = (text_split(splits, FORGET), text_split(splits, HOLDOUT)) {
        let (_, fs) = run_text(lm, suite, f, bar, "retain model ")?;
        let (_, hs) = run_text(lm, suite, h, bar, "retain model ")?;
        out.mia_min_k = Some(mia_auc(&fs[MIN_K], &hs[MIN_K])?);
    }
    Ok(out)
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
    let mut text_scores: Vec<(String, [Vec<f64>; 4])> = vec![];
    for split in splits {
        let name = &split.data.name;
        let items = match split.role {
            Role::Knowmem => {
                let (items, v) = run_knowmem(lm, suite, split, splits, bar, &mut out.notes)?;
                summary.insert(knowmem_key(name), json!(v));
                items
            }
            Role::Verbmem => {
                let (items, values) = run_verbmem(lm, suite, split, bar, &mut out.notes)?;
                for (k, v) in values {
                    summary.insert(k, json!(v));
                }
                items
            }
            Role::Text => {
                let (items, scores) = run_text(lm, suite, split, bar, "")?;
                text_scores.push((name.clone(), scores));
                items
            }
            Role::Icl => {
                let target = name.strip_suffix("_icl").unwrap_or(name);
                if !splits.iter().any(|s| s.data.name == target) {
                    out.notes.push(format!(
                        "{name} is unused: it holds the in-context examples of {target}, which was not given"
                    ));
                }
                split
                    .qa()
                    .iter()
                    .enumerate()
                    .map(|(i, (q, a))| json!({"index": i, "question": q, "answer": a}))
                    .collect()
            }
        };
        out.splits.push(SplitOut {
            name: name.clone(),
            spec: split.data.spec.clone(),
            path: split.data.path.clone(),
            items,
        });
    }

    let scores_of = |n: &str| text_scores.iter().find(|(s, _)| s == n).map(|(_, v)| v);
    let (forget, holdout, retain) = (scores_of(FORGET), scores_of(HOLDOUT), scores_of(RETAIN));
    let mut ref_values = None;
    if let (Some(f), Some(h)) = (forget, holdout) {
        for (k, name) in ATTACKS.iter().enumerate() {
            summary.insert((*name).into(), json!(mia_auc(&f[k], &h[k])?));
        }
        let auc = mia_auc(&f[MIN_K], &h[MIN_K])?;
        ref_values = match reference {
            RefInput::None => None,
            RefInput::Values(v) => Some(v),
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
        let r_auc = ref_values.as_ref().and_then(|v| v.mia_min_k);
        if r_auc.is_none() {
            out.notes.push(
                "privleak uses the reference AUC 0.5: no retain-model Min-K% AUC was given (--retain-model or --retain-log)".into(),
            );
        }
        summary.insert("privleak".into(), json!(metrics::privleak(auc, r_auc)?));
    } else if !text_scores.is_empty() {
        out.notes.push(format!(
            "privleak and the MIA AUCs need both a '{FORGET}' and a '{HOLDOUT}' split"
        ));
    }
    if let (Some(r), Some(h)) = (retain, holdout) {
        summary.insert(
            "retain_mia_min_k".into(),
            json!(mia_auc(&r[MIN_K], &h[MIN_K])?),
        );
    }
    out.summary = summary;
    out.reference = ref_values.map(|v| json!({"source": v.source, "mia_min_k": v.mia_min_k}));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_keys() {
        assert_eq!(split_role("knowmem_forget"), Some(Role::Knowmem));
        assert_eq!(split_role("knowmem_retain_icl"), Some(Role::Icl));
        assert_eq!(split_role("verbmem_forget"), Some(Role::Verbmem));
        assert_eq!(split_role("holdout"), Some(Role::Text));
        assert_eq!(split_role("knowmem_"), None);
        assert_eq!(split_role("wiki"), None);
        assert_eq!(knowmem_key("knowmem_forget"), "forget_knowmem_ROUGE");
        assert_eq!(knowmem_key("knowmem_retain"), "retain_knowmem_ROUGE");
        assert_eq!(verbmem_key("verbmem_forget"), "forget_verbmem_ROUGE");
        assert_eq!(
            memorisation_key("verbmem_forget", "extraction_strength"),
            "extraction_strength"
        );
        assert_eq!(
            memorisation_key("verbmem_news", "exact_memorization"),
            "news_exact_memorization"
        );
        let ex = vec![("Q1".to_string(), "A1".to_string())];
        assert_eq!(
            knowmem_prompt(&icl_prefix("", &ex), "Q2"),
            "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: "
        );
    }
}
