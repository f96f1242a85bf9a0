//! TOFU statistics (arXiv 2401.06121) as open-unlearning computes them
//! (`src/evals/metrics/memorization.py`, `utility.py`; metrics.md §1–2).
//!
//! Inputs are per-answer `avg_loss` values: the mean token cross-entropy over an answer's label
//! tokens (teacher forcing, EOS included), i.e. the NLL per token.
use super::stats::{hmean, mean, pairwise_sum};
use super::{check_finite, check_no_nan, check_non_empty, invalid};
use crate::error::Result;

/// prob = exp(−avg_loss): the length-normalised probability of one answer.
pub fn prob_from_avg_loss(avg_loss: f64) -> f64 {
    (-avg_loss).exp()
}

/// exp(−mean(avg_losses)): open-unlearning's `aggregate_to_1D` for an item with several answers
/// (e.g. the 5 perturbed answers): the losses are **averaged first, then exponentiated**, which
/// is the geometric mean of the per-answer normalised probabilities. Errors on an empty slice or
/// NaN.
pub fn prob_from_losses(avg_losses: &[f64]) -> Result<f64> {
    Ok(prob_from_avg_loss(mean(avg_losses)?))
}

/// Per-item truth ratio R = P_wrong / (P_correct + 1e-10), with
/// P_correct = exp(−mean(correct_losses)) and P_wrong = exp(−mean(wrong_losses))
/// ([`prob_from_losses`]).
///
/// * forget / retain: correct = the `paraphrased_answer` (one loss), wrong = the 5
///   `perturbed_answer`s;
/// * real authors / world facts: correct = the `answer`, wrong = the 3 perturbed answers.
///
/// R is near 1 when the model cannot tell the right answer from wrong ones, near 0 when it
/// prefers the right one. Aggregate with [`truth_ratio_closer_to_1`] (forget) or
/// [`truth_ratio_true_better`] (retain, ra, wf). Forget quality uses the raw R values.
pub fn truth_ratio(correct_losses: &[f64], wrong_losses: &[f64]) -> Result<f64> {
    let pc = prob_from_losses(correct_losses)?;
    let pw = prob_from_losses(wrong_losses)?;
    Ok(pw / (pc + 1e-10))
}

/// open-unlearning `closer_to_1_better` (forget set): mean over items of
/// min(R, 1/(R + 1e-10)). 1 is best (the model is indifferent between the paraphrased and the
/// perturbed answers).
pub fn truth_ratio_closer_to_1(ratios: &[f64]) -> Result<f64> {
    check_non_empty(ratios, "truth_ratio_closer_to_1: ratios")?;
    check_no_nan(ratios, "truth_ratio_closer_to_1: ratios")?;
    let v: Vec<f64> = ratios.iter().map(|&r| r.min(1.0 / (r + 1e-10))).collect();
    mean(&v)
}

/// open-unlearning `true_better` (retain, real authors, world facts; the `*_Truth_Ratio`
/// entries of model utility): mean over items of max(0, 1 − R). Higher is better.
pub fn truth_ratio_true_better(ratios: &[f64]) -> Result<f64> {
    check_non_empty(ratios, "truth_ratio_true_better: ratios")?;
    check_no_nan(ratios, "truth_ratio_true_better: ratios")?;
    let v: Vec<f64> = ratios.iter().map(|&r| (1.0 - r).max(0.0)).collect();
    mean(&v)
}

/// open-unlearning meta-eval `prob_mean`: mean over items of P_c / (P_c + P_w), from paired
/// per-item probabilities (P_w already aggregated per item as in [`truth_ratio`]).
pub fn prob_mean_score(p_correct: &[f64], p_wrong: &[f64]) -> Result<f64> {
    if p_correct.len() != p_wrong.len() {
        return invalid(format!(
            "prob_mean_score: {} correct but {} wrong probabilities",
            p_correct.len(),
            p_wrong.len()
        ));
    }
    check_non_empty(p_correct, "prob_mean_score: probabilities")?;
    let v: Vec<f64> = p_correct
        .iter()
        .zip(p_wrong)
        .map(|(&c, &w)| c / (c + w))
        .collect();
    mean(&v)
}

/// Per-item normalised probability (TOFU `ra` / `wf` `Q_A_Prob_normalised`):
/// P_c / (P_c + Σ_i P_i + 1e-10), where every P is the probability of a **single** answer
/// (exp(−avg_loss), not averaged): `correct_loss` is the answer's avg_loss and `wrong_losses`
/// those of the perturbed answers. The metric is the mean over items.
pub fn normalised_prob(correct_loss: f64, wrong_losses: &[f64]) -> Result<f64> {
    check_no_nan(&[correct_loss], "normalised_prob: correct loss")?;
    check_no_nan(wrong_losses, "normalised_prob: wrong losses")?;
    let pc = prob_from_avg_loss(correct_loss);
    let pw: Vec<f64> = wrong_losses
        .iter()
        .map(|&l| prob_from_avg_loss(l))
        .collect();
    Ok(pc / (pc + pairwise_sum(&pw) + 1e-10))
}

/// TOFU forget quality: the two-sided `scipy.stats.ks_2samp(R_unlearned, R_retain).pvalue` on
/// the raw per-item forget truth ratios of the unlearned model and of the retain model (from the
/// retain model's eval log). Higher is better (1 = indistinguishable from the retain model).
/// Inverting R (legacy TOFU) gives the same value.
pub fn forget_quality(tr_unlearned: &[f64], tr_retain: &[f64]) -> Result<f64> {
    Ok(super::ks::ks_2samp(tr_unlearned, tr_retain)?.1)
}

/// The nine inputs of TOFU model utility.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilityComponents {
    pub retain_q_a_prob: f64,
    pub retain_q_a_rouge: f64,
    /// `true_better` aggregate
    pub retain_truth_ratio: f64,
    pub ra_q_a_prob_normalised: f64,
    pub ra_q_a_rouge: f64,
    pub ra_truth_ratio: f64,
    pub wf_q_a_prob_normalised: f64,
    pub wf_q_a_rouge: f64,
    pub wf_truth_ratio: f64,
}

impl UtilityComponents {
    /// The nine values in open-unlearning's order.
    pub fn to_array(&self) -> [f64; 9] {
        [
            self.retain_q_a_prob,
            self.retain_q_a_rouge,
            self.retain_truth_ratio,
            self.ra_q_a_prob_normalised,
            self.ra_q_a_rouge,
            self.ra_truth_ratio,
            self.wf_q_a_prob_normalised,
            self.wf_q_a_rouge,
            self.wf_truth_ratio,
        ]
    }
}

/// TOFU model utility: `scipy.stats.hmean` of the nine components (0 if any is 0). Errors on a
/// negative or non-finite component.
pub fn model_utility(c: &UtilityComponents) -> Result<f64> {
    let v = c.to_array();
    check_finite(&v, "model_utility: components")?;
    hmean(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_ratio_by_hand() {
        // correct loss ln 2 → P_c = 1/2; wrong losses ln 2 and ln 8 → mean = 2 ln 2 → P_w = 1/4
        let r = truth_ratio(&[2f64.ln()], &[2f64.ln(), 8f64.ln()]).unwrap();
        assert!((r - 0.25 / (0.5 + 1e-10)).abs() < 1e-15);
        assert!((r - 0.5).abs() < 1e-9);
    }
}
