//! Suite definitions: TOML files naming the splits an evaluation knows, the metrics per split and
//! the generation and scoring settings. The built-in suites live in `evals/` and are compiled in;
//! `--suite PATH.toml` loads another one. Unknown keys and wrong types are errors that name the
//! file and the key.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The built-in suites: (name, TOML source).
pub const BUILTIN: [(&str, &str); 4] = [
    ("tofu", include_str!("../../evals/tofu.toml")),
    ("perplexity", include_str!("../../evals/perplexity.toml")),
    ("mcq", include_str!("../../evals/mcq.toml")),
    ("muse", include_str!("../../evals/muse.toml")),
];

/// Which evaluator runs the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuiteKind {
    Tofu,
    Perplexity,
    Mcq,
    Muse,
}

impl SuiteKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SuiteKind::Tofu => "tofu",
            SuiteKind::Perplexity => "perplexity",
            SuiteKind::Mcq => "mcq",
            SuiteKind::Muse => "muse",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    pub kind: SuiteKind,
    #[serde(default)]
    pub description: String,
    /// summary keys shown first in report.md
    #[serde(default)]
    pub headline: Vec<String>,
    /// tofu: the summary keys whose harmonic mean is `model_utility`
    #[serde(default)]
    pub model_utility: Vec<String>,
    /// accept split names that `splits` does not list (with default settings)
    #[serde(default)]
    pub any_split: bool,
    #[serde(default)]
    pub generation: GenerationSection,
    #[serde(default)]
    pub scoring: ScoringSection,
    /// mcq and muse only
    #[serde(default)]
    pub prompt: Option<PromptSection>,
    #[serde(default)]
    pub splits: BTreeMap<String, SplitSection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_gen_batch")]
    pub batch_size: usize,
    /// the decoded generation is cut at the first of these
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_max_new_tokens() -> usize {
    200
}
fn default_gen_batch() -> usize {
    32
}

impl Default for GenerationSection {
    fn default() -> Self {
        GenerationSection {
            max_new_tokens: default_max_new_tokens(),
            batch_size: default_gen_batch(),
            stop: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringSection {
    #[serde(default = "default_score_batch")]
    pub batch_size: usize,
    /// tokens per example (question/answer examples in tofu and mcq contexts; text in perplexity)
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// perplexity: tokens per question/answer example (text uses `max_length`)
    #[serde(default)]
    pub max_length_qa: Option<usize>,
}

fn default_score_batch() -> usize {
    16
}
fn default_max_length() -> usize {
    512
}

impl Default for ScoringSection {
    fn default() -> Self {
        ScoringSection {
            batch_size: default_score_batch(),
            max_length: default_max_length(),
            max_length_qa: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// prepended to every context; `{subject}` is replaced by the subject
    #[serde(default)]
    pub description: String,
    /// tokenize contexts with the tokenizer's special tokens (BOS)
    #[serde(default)]
    pub add_bos: bool,
    /// mcq: score each choice's own text as the continuation of description + question
    /// (lm-eval's cloze form, as in ARC/PIQA `acc`) instead of lettered choices and " A", " B", …
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cloze: bool,
    /// muse: in-context examples per knowmem prompt, the first N of the split's `{split}_icl`
    /// examples (default: all of them)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shots: Option<usize>,
}

/// The field that holds the correct answer for the truth ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectField {
    Answer,
    ParaphrasedAnswer,
}

impl CorrectField {
    pub fn key(&self) -> &'static str {
        match self {
            CorrectField::Answer => "answer",
            CorrectField::ParaphrasedAnswer => "paraphrased_answer",
        }
    }
}

/// How per-item truth ratios R are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruthRatioAgg {
    /// mean(min(R, 1/R)): the forget set
    #[serde(rename = "closer_to_1")]
    CloserTo1,
    /// mean(max(0, 1 − R)): retain, real authors, world facts
    TrueBetter,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSection {
    /// the data used by `--data SPLIT` without a path (a local path or hf://datasets/…)
    #[serde(default)]
    pub source: Option<String>,
    /// tofu: metrics computed on this split (see [`TOFU_METRICS`])
    #[serde(default)]
    pub metrics: Vec<String>,
    /// tofu: the correct answer of the truth ratio (default `answer`)
    #[serde(default)]
    pub correct: Option<CorrectField>,
    /// tofu: how truth ratios are aggregated (default `true_better`)
    #[serde(default)]
    pub truth_ratio: Option<TruthRatioAgg>,
    /// mcq: the subject of rows without one
    #[serde(default)]
    pub subject: Option<String>,
    /// evaluate only the first N items (legacy TOFU scored 300)
    #[serde(default)]
    pub max_items: Option<usize>,
    /// muse: this split's generation length (overrides generation.max_new_tokens;
    /// `--max-new-tokens` overrides both)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// muse: this split's stop strings (overrides generation.stop)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

/// The metrics a tofu split may list.
pub const TOFU_METRICS: [&str; 9] = [
    "Q_A_Prob",
    "Q_A_PARA_Prob",
    "Q_A_PERT_Prob",
    "Q_A_Prob_normalised",
    "Q_A_ROUGE",
    "truth_ratio",
    "extraction_strength",
    "exact_memorization",
    "mia",
];

impl Suite {
    /// A built-in suite by name, or a TOML file: `spec` is a path when it ends in `.toml`,
    /// contains a '/', or is not a built-in name but names an existing file.
    pub fn resolve(spec: &str) -> Result<Suite> {
        let path = Path::new(spec);
        let builtin = BUILTIN.iter().find(|(n, _)| *n == spec);
        if spec.ends_with(".toml") || spec.contains('/') || (builtin.is_none() && path.is_file()) {
            return Suite::load(path);
        }
        match builtin {
            Some((name, src)) => Suite::parse(src, &PathBuf::from(format!("evals/{name}.toml"))),
            None => Err(Error::InvalidArgument(format!(
                "unknown suite '{spec}': use one of {} or a path to a suite .toml",
                BUILTIN.map(|(n, _)| n).join(", ")
            ))),
        }
    }

    pub fn load(path: &Path) -> Result<Suite> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Suite::parse(&text, path)
    }

    /// Parse and validate; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Suite> {
        let suite: Suite = toml::from_str(text).map_err(|e| {
            Error::config(path, format!("invalid suite: {}", e.to_string().trim_end()))
        })?;
        suite.validate(path)?;
        Ok(suite)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        if self.name.trim().is_empty() {
            return bad("name must not be empty".into());
        }
        if self.generation.batch_size == 0 || self.scoring.batch_size == 0 {
            return bad("generation.batch_size and scoring.batch_size must be ≥ 1".into());
        }
        if self.scoring.max_length < 2 || self.scoring.max_length_qa.is_some_and(|n| n < 2) {
            return bad("scoring.max_length and scoring.max_length_qa must be ≥ 2".into());
        }
        if let Some(s) = self.generation.stop.iter().position(String::is_empty) {
            return bad(format!("generation.stop[{s}] is empty"));
        }
        if self.splits.is_empty() && !self.any_split {
            return bad(
                "the suite lists no [splits.NAME] and does not set any_split = true".into(),
            );
        }
        for (name, split) in &self.splits {
            if !valid_split_name(name) {
                return bad(format!(
                    "splits.{name}: split names may hold letters, digits, '_' and '-'"
                ));
            }
            if split.max_items == Some(0) {
                return bad(format!("splits.{name}.max_items must be ≥ 1"));
            }
            let tofu_only =
                !split.metrics.is_empty() || split.correct.is_some() || split.truth_ratio.is_some();
            if tofu_only && self.kind != SuiteKind::Tofu {
                return bad(format!(
                    "splits.{name}: metrics, correct and truth_ratio apply to kind = \"tofu\" only"
                ));
            }
            if split.subject.is_some() && self.kind != SuiteKind::Mcq {
                return bad(format!(
                    "splits.{name}.subject applies to kind = \"mcq\" only"
                ));
            }
            if (split.max_new_tokens.is_some() || split.stop.is_some())
                && self.kind != SuiteKind::Muse
            {
                return bad(format!(
                    "splits.{name}: max_new_tokens and stop apply to kind = \"muse\" only"
                ));
            }
            if let Some(s) = split
                .stop
                .as_ref()
                .and_then(|s| s.iter().position(String::is_empty))
            {
                return bad(format!("splits.{name}.stop[{s}] is empty"));
            }
            if self.kind == SuiteKind::Muse && super::muse::split_role(name).is_none() {
                return bad(format!("splits.{name}: {}", super::muse::SPLIT_NAMES_HELP));
            }
            for (i, m) in split.metrics.iter().enumerate() {
                if !TOFU_METRICS.contains(&m.as_str()) {
                    return bad(format!(
                        "splits.{name}.metrics[{i}]: unknown metric '{m}'; known: {}",
                        TOFU_METRICS.join(", ")
                    ));
                }
            }
            if self.kind == SuiteKind::Tofu && split.metrics.is_empty() {
                return bad(format!("splits.{name}.metrics is empty"));
            }
        }
        match self.kind {
            SuiteKind::Tofu => {
                if self.any_split {
                    return bad("any_split does not apply to kind = \"tofu\": a tofu split needs its metrics".into());
                }
            }
            SuiteKind::Muse if self.any_split => {
                return bad("any_split does not apply to kind = \"muse\": a muse split's name says what it measures".into());
            }
            _ => {
                if !self.model_utility.is_empty() {
                    return bad("model_utility applies to kind = \"tofu\" only".into());
                }
            }
        }
        if self.prompt.is_some() && !matches!(self.kind, SuiteKind::Mcq | SuiteKind::Muse) {
            return bad("[prompt] applies to kind = \"mcq\" and \"muse\" only".into());
        }
        if self.prompt.as_ref().is_some_and(|p| p.cloze) && self.kind != SuiteKind::Mcq {
            return bad("prompt.cloze applies to kind = \"mcq\" only".into());
        }
        if self.prompt.as_ref().is_some_and(|p| p.shots.is_some()) && self.kind != SuiteKind::Muse {
            return bad("prompt.shots applies to kind = \"muse\" only".into());
        }
        Ok(())
    }

    /// The settings of a split the user named, or an error listing the known splits.
    pub fn split(&self, name: &str) -> Result<SplitSection> {
        if let Some(s) = self.splits.get(name) {
            return Ok(s.clone());
        }
        if self.any_split && valid_split_name(name) {
            return Ok(SplitSection::default());
        }
        if self.any_split {
            return Err(Error::InvalidArgument(format!(
                "split name '{name}': use letters, digits, '_' and '-'"
            )));
        }
        Err(Error::InvalidArgument(format!(
            "suite '{}' has no split '{name}'; its splits: {}",
            self.name,
            self.splits.keys().cloned().collect::<Vec<_>>().join(", ")
        )))
    }
}

fn valid_split_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_suites_parse() {
        for (name, _) in BUILTIN {
            let s = Suite::resolve(name).unwrap();
            assert_eq!(s.name, name);
        }
        let t = Suite::resolve("tofu").unwrap();
        assert_eq!(t.generation.max_new_tokens, 200);
        assert_eq!(t.model_utility.len(), 9);
        assert_eq!(
            t.splits["forget"].truth_ratio,
            Some(TruthRatioAgg::CloserTo1)
        );
        assert!(Suite::resolve("nope").is_err());
    }

    #[test]
    fn unknown_keys_and_metrics_name_the_file_and_key() {
        let p = Path::new("x.toml");
        let e = Suite::parse(
            "name='a'\nkind='tofu'\nbogus=1\n[splits.f]\nmetrics=['mia']",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.toml") && e.contains("bogus"), "{e}");
        let e = Suite::parse(
            "name='a'\nkind='tofu'\n[splits.f]\nmetrics=['Q_A_Probb']",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("splits.f.metrics[0]") && e.contains("Q_A_Probb"),
            "{e}"
        );
        let e = Suite::parse("name='a'\nkind='nope'\nany_split=true", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kind"), "{e}");
        let e = Suite::parse(
            "name='a'\nkind='perplexity'\nany_split=true\n[generation]\nmax_new=3",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_new"), "{e}");
    }
}
