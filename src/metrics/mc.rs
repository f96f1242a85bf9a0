//! Multiple-choice accuracy by answer log-likelihood (lm-evaluation-harness `acc` for WMDP and
//! MMLU; metrics.md §6).
use super::{check_no_nan, check_non_empty, invalid};
use crate::error::Result;
use std::collections::BTreeMap;

/// The predicted choice: argmax of the per-choice log-likelihoods log P(continuation | context)
/// (each summed over the continuation's tokens), **ties resolved to the first** maximum
/// (`np.argmax`). Errors on no choices or NaN.
pub fn mc_predict(loglikelihoods: &[f64]) -> Result<usize> {
    check_non_empty(loglikelihoods, "mc_predict: log-likelihoods")?;
    check_no_nan(loglikelihoods, "mc_predict: log-likelihoods")?;
    let mut best = 0;
    for (i, &v) in loglikelihoods.iter().enumerate() {
        if v > loglikelihoods[best] {
            best = i;
        }
    }
    Ok(best)
}

/// Accuracy = mean over questions of [argmax choice = gold], with `items[i] =
/// (per-choice log-likelihoods, gold index)`. Errors on no items or a gold index out of range.
pub fn mc_accuracy(items: &[(Vec<f64>, usize)]) -> Result<f64> {
    check_non_empty(items, "mc_accuracy: items")?;
    let mut correct = 0usize;
    for (i, (lls, gold)) in items.iter().enumerate() {
        if *gold >= lls.len() {
            return invalid(format!(
                "mc_accuracy: item {i}: gold index {gold} but only {} choices",
                lls.len()
            ));
        }
        if mc_predict(lls)? == *gold {
            correct += 1;
        }
    }
    Ok(correct as f64 / items.len() as f64)
}

/// Correct / total counts of one group of questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupAccuracy {
    pub correct: usize,
    pub total: usize,
}

impl GroupAccuracy {
    /// correct / total (0 for an empty group).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Per-subject accuracy breakdown.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubjectBreakdown {
    /// all questions pooled: the size-weighted (micro) accuracy, as recent lm-eval 0.4.x
    /// reports the MMLU group
    pub overall: GroupAccuracy,
    /// per subject, sorted by name
    pub per_subject: BTreeMap<String, GroupAccuracy>,
    /// unweighted mean of the per-subject accuracies (macro average), for older lm-eval
    /// versions' group accuracy
    pub macro_accuracy: f64,
}

/// Group per-question correctness by subject: `subjects[i]` and `correct[i]` describe question i.
pub fn accuracy_by_subject<S: AsRef<str>>(
    subjects: &[S],
    correct: &[bool],
) -> Result<SubjectBreakdown> {
    if subjects.len() != correct.len() {
        return invalid(format!(
            "accuracy_by_subject: {} subjects but {} results",
            subjects.len(),
            correct.len()
        ));
    }
    check_non_empty(correct, "accuracy_by_subject: results")?;
    let mut out = SubjectBreakdown::default();
    for (s, &c) in subjects.iter().zip(correct) {
        let g = out.per_subject.entry(s.as_ref().to_string()).or_default();
        g.total += 1;
        out.overall.total += 1;
        if c {
            g.correct += 1;
            out.overall.correct += 1;
        }
    }
    out.macro_accuracy =
        out.per_subject.values().map(|g| g.accuracy()).sum::<f64>() / out.per_subject.len() as f64;
    Ok(out)
}
