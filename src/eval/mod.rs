//! `unlearn eval`: evaluation suites over split files, written as `EVAL.json` (every item with
//! its inputs, generation and scores), `SUMMARY.json` (metric → value) and `report.md`.
//!
//! | suite kind | what | module |
//! | --- | --- | --- |
//! | `tofu` | TOFU / open-unlearning: probabilities, truth ratio, ROUGE, forget quality, model utility, privleak | [`tofu`] |
//! | `perplexity` | token-weighted NLL and perplexity per split | [`perplexity`] |
//! | `mcq` | WMDP / MMLU zero-shot multiple choice by letter log-likelihood | [`mcq`] |
//! | `muse` | MUSE: knowmem / verbmem ROUGE-L F1, extraction strength, privleak | [`muse`] |
//!
//! [`plots`] draws SVG charts: the tofu truth-ratio histogram written next to report.md, and the
//! training curves and forget/utility trade-off of `unlearn plot RUN_DIR`.
//!
//! Suites are TOML files ([`suite`]); the built-in ones are `evals/*.toml`, compiled in. The
//! statistics come from [`crate::metrics`]; NLLs from [`crate::score`]; generations from
//! [`crate::generate::greedy`].
pub mod klom;
pub mod lm;
pub mod mcq;
pub mod muse;
pub mod perplexity;
pub mod plots;
mod report;
pub mod suite;
pub mod tofu;

pub use suite::{Suite, SuiteKind};

use crate::error::{Error, Result};
use crate::model::weights::write_atomic;
use candle_core::Device;
use lm::{progress_bar, Lm, SplitData};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub const EVAL_FILE: &str = "EVAL.json";
pub const SUMMARY_FILE: &str = "SUMMARY.json";
pub const REPORT_FILE: &str = "report.md";
/// `format` of EVAL.json
pub const LOG_FORMAT: &str = "unlearn-eval/1";

/// `--data SPLIT=PATH`, or `--data SPLIT` for the suite's own source of that split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataArg {
    pub split: String,
    pub spec: Option<String>,
}

impl DataArg {
    pub fn parse(s: &str) -> Result<DataArg> {
        let (split, spec) = match s.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (s.trim(), None),
        };
        if split.is_empty() || spec == Some("") {
            return Err(Error::InvalidArgument(format!(
                "--data '{s}': use SPLIT=PATH (e.g. forget=forget10_perturbed.json), or SPLIT for the suite's default source"
            )));
        }
        Ok(DataArg {
            split: split.to_string(),
            spec: spec.map(str::to_string),
        })
    }
}

/// The retain model that forget quality and privleak compare against.
#[derive(Debug, Clone)]
pub enum Reference {
    /// evaluate this checkpoint directory (`label` is how the user named it)
    Model { dir: PathBuf, label: String },
    /// read an earlier EVAL.json of a tofu suite (or an open-unlearning TOFU_EVAL.json)
    Log(PathBuf),
}

pub struct EvalRequest {
    pub suite: Suite,
    pub data: Vec<DataArg>,
    /// checkpoint directory
    pub model: PathBuf,
    /// the model as the user named it (recorded in the log)
    pub model_label: String,
    pub adapter: Option<PathBuf>,
    pub reference: Option<Reference>,
    /// overrides generation.batch_size and scoring.batch_size
    pub batch_size: Option<usize>,
    /// overrides generation.max_new_tokens
    pub max_new_tokens: Option<usize>,
    /// evaluate only the first N items of each split
    pub limit: Option<usize>,
    pub device: Device,
    /// show a progress bar on stderr
    pub progress: bool,
    /// system prompt / template date for question prompts (the retain model gets the same)
    pub prompt_style: crate::tokenizer::PromptStyle,
}

/// One split's per-item records.
pub struct SplitOut {
    pub name: String,
    pub spec: String,
    pub path: PathBuf,
    pub items: Vec<Value>,
}

/// What a suite evaluator returns.
#[derive(Default)]
pub struct SuiteOutput {
    pub splits: Vec<SplitOut>,
    pub summary: Map<String, Value>,
    pub notes: Vec<String>,
    pub reference: Option<Value>,
}

/// The three output files' contents.
pub struct EvalOutput {
    pub log: Value,
    pub summary: Map<String, Value>,
    pub report: String,
    /// charts written next to report.md: (file name, SVG)
    pub plots: Vec<(String, String)>,
}

enum Prepared {
    Tofu(Vec<tofu::Prepared>),
    Perplexity(Vec<perplexity::Prepared>),
    Mcq(Vec<mcq::Prepared>),
    Muse(Vec<muse::Prepared>),
}

/// Read and check every input (suite settings, split files, retain log) before any model work.
fn read_splits(suite: &Suite, req: &EvalRequest) -> Result<Vec<(SplitData, suite::SplitSection)>> {
    if req.data.is_empty() {
        let known: Vec<&str> = suite.splits.keys().map(String::as_str).collect();
        return Err(Error::InvalidArgument(format!(
            "no --data given: name at least one split as --data SPLIT=PATH{}",
            if known.is_empty() {
                String::new()
            } else {
                format!(" (suite '{}' knows {})", suite.name, known.join(", "))
            }
        )));
    }
    let mut out: Vec<(SplitData, suite::SplitSection)> = vec![];
    for arg in &req.data {
        if out.iter().any(|(d, _)| d.name == arg.split) {
            return Err(Error::InvalidArgument(format!(
                "--data names split '{}' twice",
                arg.split
            )));
        }
        let settings = suite.split(&arg.split)?;
        let spec = match (&arg.spec, &settings.source) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => s.clone(),
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                "--data {}: give a path (--data {}=PATH); suite '{}' has no default source for it",
                arg.split, arg.split, suite.name
            )))
            }
        };
        let limit = match (req.limit, settings.max_items) {
            // in-context examples are not evaluated items
            _ if suite.kind == SuiteKind::Muse
                && muse::split_role(&arg.split) == Some(muse::Role::Icl) =>
            {
                settings.max_items
            }
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        out.push((SplitData::read(&arg.split, &spec, limit)?, settings));
    }
    Ok(out)
}

/// The suite with the command line's overrides applied.
fn effective_suite(req: &EvalRequest) -> Result<Suite> {
    let mut suite = req.suite.clone();
    if let Some(b) = req.batch_size {
        if b == 0 {
            return Err(Error::InvalidArgument("--batch-size must be ≥ 1".into()));
        }
        suite.generation.batch_size = b;
        suite.scoring.batch_size = b;
    }
    if let Some(n) = req.max_new_tokens {
        suite.generation.max_new_tokens = n;
        for s in suite.splits.values_mut() {
            s.max_new_tokens = None;
        }
    }
    if req.limit == Some(0) {
        return Err(Error::InvalidArgument("--limit must be ≥ 1".into()));
    }
    Ok(suite)
}

/// Run a suite. Inputs are checked before the model is loaded.
pub fn evaluate(req: &EvalRequest) -> Result<EvalOutput> {
    let suite = effective_suite(req)?;
    let raw = read_splits(&suite, req)?;
    if req.reference.is_some() && suite.kind == SuiteKind::Muse {
        let has = |n: &str| raw.iter().any(|(d, _)| d.name == n);
        if !has(muse::FORGET) || !has(muse::HOLDOUT) {
            return Err(Error::InvalidArgument(format!(
                "--retain-model / --retain-log need the '{}' and '{}' text splits (--data {}=PATH --data {}=PATH): privleak compares their Min-K% AUC",
                muse::FORGET, muse::HOLDOUT, muse::FORGET, muse::HOLDOUT
            )));
        }
    } else if req.reference.is_some() {
        if suite.kind != SuiteKind::Tofu {
            return Err(Error::InvalidArgument(format!(
                "--retain-model / --retain-log apply to tofu suites (and to privleak of muse suites); '{}' is a {} suite",
                suite.name,
                suite.kind.as_str()
            )));
        }
        if !raw.iter().any(|(d, _)| d.name == tofu::FORGET) {
            return Err(Error::InvalidArgument(format!(
                "--retain-model / --retain-log need the '{}' split (--data {}=PATH): forget quality compares its truth ratios",
                tofu::FORGET,
                tofu::FORGET
            )));
        }
    }
    let prepared = match suite.kind {
        SuiteKind::Tofu => Prepared::Tofu(
            raw.into_iter()
                .map(|(d, s)| tofu::prepare(d, s))
                .collect::<Result<_>>()?,
        ),
        SuiteKind::Perplexity => Prepared::Perplexity(
            raw.into_iter()
                .map(|(d, _)| perplexity::prepare(d))
                .collect::<Result<_>>()?,
        ),
        SuiteKind::Mcq => Prepared::Mcq(
            raw.into_iter()
                .map(|(d, s)| mcq::prepare(d, &s))
                .collect::<Result<_>>()?,
        ),
        SuiteKind::Muse => Prepared::Muse(muse::prepare_all(raw, &suite)?),
    };
    let ref_values = match &req.reference {
        Some(Reference::Log(p)) if suite.kind == SuiteKind::Muse => Some(muse::read_retain_log(p)?),
        Some(Reference::Log(p)) => Some(tofu::read_retain_log(p)?),
        _ => None,
    };

    let lm = Lm::load(
        &req.model,
        req.adapter.as_deref(),
        &req.device,
        &req.prompt_style,
    )?;
    let ref_lm = match &req.reference {
        Some(Reference::Model { dir, .. }) => {
            Some(Lm::load(dir, None, &req.device, &req.prompt_style)?)
        }
        _ => None,
    };
    // what forget quality / privleak compare with (used by the tofu and muse suites)
    let reference = match (&req.reference, &ref_lm, ref_values) {
        (_, _, Some(v)) => tofu::RefInput::Values(v),
        (Some(Reference::Model { label, .. }), Some(l), None) => {
            tofu::RefInput::Model(l, format!("model {label}"))
        }
        _ => tofu::RefInput::None,
    };
    let output = match &prepared {
        Prepared::Tofu(splits) => {
            let mut work: u64 = splits.iter().map(|s| s.work()).sum();
            if ref_lm.is_some() {
                work += tofu::reference_work(splits);
            }
            let bar = progress_bar(req.progress, work);
            let out = tofu::run(&lm, &suite, splits, reference, &bar)?;
            bar.finish_and_clear();
            out
        }
        Prepared::Perplexity(splits) => {
            let bar = progress_bar(req.progress, splits.iter().map(|s| s.items() as u64).sum());
            let out = perplexity::run(&lm, &suite, splits, &bar)?;
            bar.finish_and_clear();
            out
        }
        Prepared::Mcq(splits) => {
            let bar = progress_bar(req.progress, splits.iter().map(|s| s.items() as u64).sum());
            let out = mcq::run(&lm, &suite, splits, &bar)?;
            bar.finish_and_clear();
            out
        }
        Prepared::Muse(splits) => {
            let mut work: u64 = splits.iter().map(|s| s.work()).sum();
            if ref_lm.is_some() {
                work += muse::reference_work(splits);
            }
            let bar = progress_bar(req.progress, work);
            let out = muse::run(&lm, &suite, splits, reference, &bar)?;
            bar.finish_and_clear();
            out
        }
    };
    Ok(assemble(req, &suite, &lm, output))
}

fn assemble(req: &EvalRequest, suite: &Suite, lm: &Lm, out: SuiteOutput) -> EvalOutput {
    let mut splits = Map::new();
    for s in &out.splits {
        splits.insert(
            s.name.clone(),
            json!({
                "source": s.spec,
                "path": s.path.display().to_string(),
                "items": s.items,
            }),
        );
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let reference = match (&req.reference, &out.reference) {
        (Some(Reference::Log(p)), r) => json!({"log": p.display().to_string(), "values": r}),
        (Some(Reference::Model { dir, label }), r) => {
            json!({"model": label, "model_dir": dir.display().to_string(), "values": r})
        }
        (None, _) => Value::Null,
    };
    let log = json!({
        "format": LOG_FORMAT,
        "suite": suite.name,
        "suite_kind": suite.kind.as_str(),
        "model": req.model_label,
        "model_dir": req.model.display().to_string(),
        "adapter": req.adapter.as_ref().map(|a| a.display().to_string()),
        "device": if req.device.is_cuda() { "cuda" } else { "cpu" },
        "dtype": format!("{:?}", lm.model.dtype).to_lowercase(),
        "created_unix": created,
        "settings": serde_json::to_value(suite).unwrap_or(Value::Null),
        "summary": out.summary,
        "notes": out.notes,
        "reference": reference,
        "splits": splits,
    });
    let mut report = report::render(&log, suite);
    let plots = plots::eval_plots(&log);
    report.push_str(&plots::report_section(&plots));
    EvalOutput {
        summary: out.summary,
        log,
        report,
        plots,
    }
}

/// Write EVAL.json, SUMMARY.json, report.md and the charts it links to into `dir` (created if
/// needed), each through a temporary name and a rename.
pub fn write_outputs(dir: &Path, out: &EvalOutput) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json_bytes = |v: &Value| -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec_pretty(v)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the log: {e}")))?;
        b.push(b'\n');
        Ok(b)
    };
    write_atomic(&dir.join(EVAL_FILE), &json_bytes(&out.log)?)?;
    write_atomic(
        &dir.join(SUMMARY_FILE),
        &json_bytes(&Value::Object(out.summary.clone()))?,
    )?;
    for (name, svg) in &out.plots {
        write_atomic(&dir.join(name), svg.as_bytes())?;
    }
    write_atomic(&dir.join(REPORT_FILE), out.report.as_bytes())
}
