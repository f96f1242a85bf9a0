//! Evaluation statistics as plain functions over plain numbers: no model, no tensors.
//!
//! Every function reproduces a named reference implementation (scipy, scikit-learn, rouge_score,
//! NLTK, open-unlearning, EasyDUB); its doc comment states the exact definition and orientation.
//! The definitions follow `shared/reference/metrics.md` (TOFU, MUSE, MIA, WMDP/MMLU) and
//! `shared/reference/algorithms.md` §5 (KLoM).
//!
//! | module | what |
//! | --- | --- |
//! | [`stats`] | `hmean`, `roc_auc`, `zlib_len`, `percentile`, means |
//! | [`ks`] | `ks_2samp` (scipy, exact and asymptotic), `kstwo_sf` |
//! | [`mod@rouge`] | ROUGE-1 / ROUGE-L exactly as `rouge_score` with NLTK's Porter stemmer ([`porter`]) |
//! | [`tofu`] | answer probabilities, truth ratio, forget quality, model utility |
//! | [`memorization`] | exact memorisation, extraction strength |
//! | [`mia`] | LOSS, ZLib, Min-K%, Min-K%++, Reference, GradNorm scores; MIA AUC; privleak |
//! | [`mc`] | multiple-choice accuracy by answer log-likelihood, per-subject breakdown |
//! | [`mod@klom`] | KLoM: margins, binned KL, percentiles |
//!
//! All functions validate their input and return [`crate::error::Error::InvalidArgument`]
//! rather than panicking on user data (empty inputs, NaN, mismatched lengths).
pub mod klom;
pub mod ks;
pub mod mc;
pub mod memorization;
pub mod mia;
pub mod porter;
pub mod rouge;
pub mod stats;
pub mod tofu;

pub use klom::{
    binned_kl, klom, klom_sequence, logit_margin, KlomParams, KLOM_DIRECTION, KLOM_EPS,
};
pub use ks::{ks_2samp, ks_2samp_full, kstwo_sf, KsMethod, KsResult};
pub use mc::{accuracy_by_subject, mc_accuracy, mc_predict, GroupAccuracy, SubjectBreakdown};
pub use memorization::{exact_memorization, extraction_strength};
pub use mia::{
    mia_auc, mia_gradnorm, mia_loss, mia_min_k, mia_min_k_plus_plus, mia_reference, mia_zlib,
    privleak, rel_diff, vocab_logprob_moments, MIN_K_DEFAULT,
};
pub use porter::porter_stem;
pub use rouge::{rouge, rouge_tokenize, RougeScore, RougeScores};
pub use stats::{hmean, mean, mean_defined, percentile, roc_auc, zlib_len};
pub use tofu::{
    forget_quality, model_utility, normalised_prob, prob_from_avg_loss, prob_from_losses,
    prob_mean_score, truth_ratio, truth_ratio_closer_to_1, truth_ratio_true_better,
    UtilityComponents,
};

use crate::error::{Error, Result};

/// `Err(InvalidArgument)` with a formatted message.
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::InvalidArgument(msg.into()))
}

/// Reject NaN anywhere in `values`; `what` names the argument in the message.
pub(crate) fn check_no_nan(values: &[f64], what: &str) -> Result<()> {
    match values.iter().position(|v| v.is_nan()) {
        Some(i) => invalid(format!("{what}: element {i} is NaN")),
        None => Ok(()),
    }
}

/// Reject NaN and ±inf anywhere in `values`.
pub(crate) fn check_finite(values: &[f64], what: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => invalid(format!(
            "{what}: element {i} is {} (must be finite)",
            values[i]
        )),
        None => Ok(()),
    }
}

/// Reject an empty slice.
pub(crate) fn check_non_empty<T>(values: &[T], what: &str) -> Result<()> {
    if values.is_empty() {
        invalid(format!("{what} is empty"))
    } else {
        Ok(())
    }
}
