//! Membership-inference scores and privleak (open-unlearning `src/evals/metrics/mia_utils.py`
//! and `privacy.py`; metrics.md §4).
//!
//! **Orientation of every score: higher means "looks less like a member"** (a higher loss).
//! [`mia_auc`] labels the forget (member) scores 0 and the holdout (non-member) scores 1, so
//! an AUC near 1 means the forget set is still recognised (memorised), 0.5 means no signal.
use super::stats::{mean, roc_auc};
use super::{check_finite, check_no_nan, check_non_empty, invalid};
use crate::error::Result;

/// k of Min-K% / Min-K%++ used by the default evaluation (metrics.md: k = 0.4).
pub const MIN_K_DEFAULT: f64 = 0.4;

/// LOSS attack: the sample's avg_loss = −mean of its per-token log-probabilities
/// (`token_logprobs[t] = log p(y_t | y_<t)` at the answer positions). Errors on an empty slice
/// or NaN.
pub fn mia_loss(token_logprobs: &[f64]) -> Result<f64> {
    Ok(-mean(token_logprobs)?)
}

/// ZLib attack: avg_loss / len(zlib.compress(text.encode("utf-8"))), where `text` is the answer
/// decoded from the labels with special tokens skipped ([`super::zlib_len`]; the length is >= 8,
/// never 0).
pub fn mia_zlib(avg_loss: f64, text: &str) -> Result<f64> {
    check_no_nan(&[avg_loss], "mia_zlib: avg_loss")?;
    Ok(avg_loss / super::stats::zlib_len(text)? as f64)
}

/// The `n = max(1, ⌊N·k⌋)` smallest values, as −mean (0 for N = 0).
fn neg_mean_of_smallest(values: &[f64], k: f64) -> Result<f64> {
    if values.is_empty() {
        return Ok(0.0);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = ((values.len() as f64 * k) as usize).max(1);
    Ok(-mean(&v[..n])?)
}

fn check_k(k: f64) -> Result<()> {
    if !(k > 0.0 && k <= 1.0) {
        return invalid(format!("Min-K%: k = {k} must be in (0, 1]"));
    }
    Ok(())
}

/// Min-K% attack: keep the n = max(1, ⌊N·k⌋) smallest per-token log-probabilities at the answer
/// positions (EOS excluded) and return −mean of them. N = 0 gives 0 (open-unlearning). Default
/// k = [`MIN_K_DEFAULT`] = 0.4.
pub fn mia_min_k(token_logprobs: &[f64], k: f64) -> Result<f64> {
    check_k(k)?;
    check_no_nan(token_logprobs, "mia_min_k: token log-probs")?;
    neg_mean_of_smallest(token_logprobs, k)
}

/// Mean μ = Σ_v p_v·log p_v and variance σ² = Σ_v p_v·(log p_v)² − μ² of the log-probability
/// under the model's own next-token distribution, from one position's full-vocabulary
/// log-probabilities (log-softmax). σ² is returned unclamped; [`mia_min_k_plus_plus`] clamps it.
pub fn vocab_logprob_moments(vocab_logprobs: &[f32]) -> Result<(f64, f64)> {
    check_non_empty(vocab_logprobs, "vocab_logprob_moments: log-probs")?;
    let (mut mu, mut m2) = (0.0f64, 0.0f64);
    for &lp in vocab_logprobs {
        let lp = lp as f64;
        if lp.is_nan() {
            return invalid("vocab_logprob_moments: NaN log-prob");
        }
        if lp == f64::NEG_INFINITY {
            continue; // p = 0 contributes 0 (0·log 0 := 0)
        }
        let p = lp.exp();
        mu += p * lp;
        m2 += p * lp * lp;
    }
    Ok((mu, m2 - mu * mu))
}

/// Min-K%++ attack: at each position t, z_t = (log p(y_t) − μ_t)/σ_t with μ_t, σ²_t the mean and
/// variance of the log-probability under the model's distribution at t
/// ([`vocab_logprob_moments`]), σ²_t clamped at 1e-6; score = −mean of the n = max(1, ⌊N·k⌋)
/// smallest z_t. N = 0 gives 0.
pub fn mia_min_k_plus_plus(token_logprobs: &[f64], mu: &[f64], var: &[f64], k: f64) -> Result<f64> {
    check_k(k)?;
    if token_logprobs.len() != mu.len() || mu.len() != var.len() {
        return invalid(format!(
            "mia_min_k_plus_plus: lengths differ (log-probs {}, mu {}, var {})",
            token_logprobs.len(),
            mu.len(),
            var.len()
        ));
    }
    check_no_nan(token_logprobs, "mia_min_k_plus_plus: token log-probs")?;
    check_finite(mu, "mia_min_k_plus_plus: mu")?;
    check_finite(var, "mia_min_k_plus_plus: var")?;
    let z: Vec<f64> = token_logprobs
        .iter()
        .zip(mu.iter().zip(var))
        .map(|(&lp, (&m, &v))| (lp - m) / v.max(1e-6).sqrt())
        .collect();
    neg_mean_of_smallest(&z, k)
}

/// GradNorm attack: the mean over parameter tensors of ‖∇_θ L‖₂ for the sample's loss
/// L = −mean token log-prob (batch 1); the input is the per-tensor gradient norms (which tensors
/// is the caller's choice, e.g. the LoRA parameters). Orientation as the others: a larger
/// gradient means "less like a member".
pub fn mia_gradnorm(per_tensor_grad_norms: &[f64]) -> Result<f64> {
    check_finite(per_tensor_grad_norms, "mia_gradnorm: gradient norms")?;
    mean(per_tensor_grad_norms)
}

/// Reference attack: avg_loss(model) − avg_loss(reference model) (the retain model for TOFU,
/// `muse-bench/MUSE-*_retrain` for MUSE).
pub fn mia_reference(avg_loss_model: f64, avg_loss_ref: f64) -> Result<f64> {
    check_no_nan(&[avg_loss_model, avg_loss_ref], "mia_reference: losses")?;
    Ok(avg_loss_model - avg_loss_ref)
}

/// MIA AUC: `roc_auc_score(labels, scores)` with the forget (member) scores labelled 0 and the
/// holdout (non-member) scores labelled 1. With the score orientation above, AUC → 1 means the
/// forget set is far more likely than holdout (memorised); 0.5 is chance.
pub fn mia_auc(forget_scores: &[f64], holdout_scores: &[f64]) -> Result<f64> {
    let labels: Vec<bool> = std::iter::repeat_n(false, forget_scores.len())
        .chain(std::iter::repeat_n(true, holdout_scores.len()))
        .collect();
    let scores: Vec<f64> = forget_scores
        .iter()
        .chain(holdout_scores)
        .copied()
        .collect();
    roc_auc(&labels, &scores)
}

/// privleak (open-unlearning): (s − r)/(r + 1e-10)·100 with s = 1 − AUC(unlearned model) and
/// r = 1 − AUC(reference: retain / retrain model), both Min-K% [`mia_auc`] values; without the
/// reference model's log (`auc_reference = None`) its AUC defaults to 0.5, so r = 0.5.
///
/// 0 is ideal; strongly negative = the forget set still leaks (under-unlearned, e.g. ≈ −100 for
/// the fully fine-tuned model); positive = over-unlearned. This is the original MUSE
/// (AUC − AUC_retrain)/AUC_retrain·100 expressed in MUSE's own AUC orientation (1 − ours).
pub fn privleak(auc_model: f64, auc_reference: Option<f64>) -> Result<f64> {
    let r_auc = auc_reference.unwrap_or(0.5);
    check_finite(&[auc_model, r_auc], "privleak: AUCs")?;
    let s = 1.0 - auc_model;
    let r = 1.0 - r_auc;
    Ok((s - r) / (r + 1e-10) * 100.0)
}

/// open-unlearning `rel_diff`: (score − reference)/reference·100, no flip.
pub fn rel_diff(score: f64, reference: f64) -> Result<f64> {
    check_finite(&[score, reference], "rel_diff")?;
    if reference == 0.0 {
        return invalid("rel_diff: reference value is 0");
    }
    Ok((score - reference) / reference * 100.0)
}
