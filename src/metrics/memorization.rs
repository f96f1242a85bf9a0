//! Memorisation metrics from teacher-forced argmax predictions (open-unlearning
//! `exact_memorization` and `extraction_strength`; metrics.md §3).
//!
//! Both take, for one item, the greedy (argmax) predicted token ids and the label ids at the
//! scored positions, aligned (`predicted[t]` is the argmax of the logits that predict
//! `labels[t]`). The positions are the answer labels **except the last one** (EOS), which
//! open-unlearning's `tokenwise_vocab_logprobs` drops; the caller selects them. N = their count.
use super::invalid;
use crate::error::Result;

fn check_len(predicted: &[u32], labels: &[u32], what: &str) -> Result<()> {
    if predicted.len() != labels.len() {
        return invalid(format!(
            "{what}: {} predicted ids but {} labels",
            predicted.len(),
            labels.len()
        ));
    }
    Ok(())
}

/// Exact memorisation EM = (1/N)·Σ_t [predicted_t = label_t]: the fraction of positions where
/// the teacher-forced argmax is the label. `None` when N = 0 (open-unlearning's score `None`,
/// skipped when averaging over items, see [`super::mean_defined`]). Higher = more memorised.
pub fn exact_memorization(predicted: &[u32], labels: &[u32]) -> Result<Option<f64>> {
    check_len(predicted, labels, "exact_memorization")?;
    if labels.is_empty() {
        return Ok(None);
    }
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(Some(hits as f64 / labels.len() as f64))
}

/// Extraction strength ES = 1 − k*/N, where k* is the smallest k in 0..N with
/// `predicted[k..] == labels[k..]` (the shortest prefix after which the model completes the rest
/// on its own). Higher = more memorised (1 = every token predicted).
///
/// Quirk kept from open-unlearning: the search loop stops at k = N − 1 without checking whether
/// that last suffix matched, so when even the last token is wrong ES = 1/N, not 0. ES = 0 when
/// N = 0.
pub fn extraction_strength(predicted: &[u32], labels: &[u32]) -> Result<f64> {
    check_len(predicted, labels, "extraction_strength")?;
    let n = labels.len();
    if n == 0 {
        return Ok(0.0);
    }
    // Suffix predicted[k..] == labels[k..] iff every position >= k matches: k* is one past the
    // last mismatch (0 if none); the loop caps it at N − 1.
    let k_star = match predicted.iter().zip(labels).rposition(|(p, l)| p != l) {
        None => 0,
        Some(last_mismatch) => (last_mismatch + 1).min(n - 1),
    };
    Ok(1.0 - k_star as f64 / n as f64)
}
