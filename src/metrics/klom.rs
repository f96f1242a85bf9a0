//! KLoM, KL divergence of margins (arXiv 2410.23232 Def. 3; algorithms.md §5), as EasyDUB's
//! `easydub/eval.py` (`binned_kl_divergence`, `klom_from_margins`) computes it, with the last
//! histogram bin made inclusive.
//!
//! **Direction: KL(unlearned ‖ oracle)** — the code direction of every released implementation
//! (`entropy(pk=unlearned, qk=oracle)`), not the paper's KL(oracle ‖ unlearned). Results should
//! carry [`KLOM_DIRECTION`].
use super::stats::mean;
use super::{check_no_nan, check_non_empty, invalid};
use crate::error::Result;

/// The KL direction, to be written into every result: `"unlearned||oracle"`.
pub const KLOM_DIRECTION: &str = "unlearned||oracle";

/// The floor ε = 1e-5 for empty oracle bins (so KLoM ≤ ln 1e5 ≈ 11.5).
pub const KLOM_EPS: f64 = 1e-5;

/// Histogram settings of [`binned_kl`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlomParams {
    /// number of equal-width bins over the combined range (20)
    pub bins: usize,
    /// floor for the oracle probability of a bin the unlearned sample occupies (1e-5)
    pub eps: f64,
    /// both samples are clipped to [clip_min, clip_max] first ([−100, 100])
    pub clip_min: f64,
    pub clip_max: f64,
}

impl Default for KlomParams {
    fn default() -> Self {
        KlomParams {
            bins: 20,
            eps: KLOM_EPS,
            clip_min: -100.0,
            clip_max: 100.0,
        }
    }
}

/// The margin φ = z_y − log Σ_{k≠y} exp(z_k) of the gold class `gold` from one position's
/// logits (for LMs: the gold next token under teacher forcing). Computed in f64 with the
/// max-shift; +inf if every other logit is −inf. Errors on NaN, an out-of-range `gold` or fewer
/// than two classes.
pub fn logit_margin(logits: &[f32], gold: usize) -> Result<f64> {
    if logits.len() < 2 {
        return invalid("logit_margin: need at least two logits");
    }
    if gold >= logits.len() {
        return invalid(format!(
            "logit_margin: gold index {gold} out of range for {} logits",
            logits.len()
        ));
    }
    if logits.iter().any(|v| v.is_nan()) {
        return invalid("logit_margin: NaN logit");
    }
    let zy = logits[gold] as f64;
    let others = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != gold)
        .map(|(_, &v)| v as f64);
    let m = others.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return Ok(f64::INFINITY);
    }
    let s: f64 = others.map(|v| (v - m).exp()).sum();
    Ok(zy - (m + s.ln()))
}

/// KL(P ‖ Q) between the histograms of two samples, EasyDUB `binned_kl_divergence(p, q)`:
///
/// 1. clip both samples to [clip_min, clip_max];
/// 2. `bins` equal-width bins over [min, max] of both samples together (edges
///    `np.linspace(min, max, bins + 1)`; if min = max, the range is [min, min + 1]); a value v
///    goes to bin i with edge_i <= v < edge_{i+1}, **and the maximum goes to the last bin**
///    (EasyDUB's `np.digitize` silently drops values equal to the maximum; algorithms.md asks for
///    an inclusive last bin);
/// 3. P, Q = counts / sample size;
/// 4. KL = Σ over bins with P_i > 0 of P_i·ln(P_i / max(Q_i, eps)): only Q is floored, only where
///    P is non-zero, and nothing is renormalised.
pub fn binned_kl(p_samples: &[f64], q_samples: &[f64], params: &KlomParams) -> Result<f64> {
    check_non_empty(p_samples, "binned_kl: first sample")?;
    check_non_empty(q_samples, "binned_kl: second sample")?;
    check_no_nan(p_samples, "binned_kl: first sample")?;
    check_no_nan(q_samples, "binned_kl: second sample")?;
    if params.bins == 0 {
        return invalid("binned_kl: bins must be >= 1");
    }
    let bad_eps = params.eps.is_nan() || params.eps <= 0.0;
    let bad_clip =
        params.clip_min.is_nan() || params.clip_max.is_nan() || params.clip_min >= params.clip_max;
    if bad_eps || bad_clip {
        return invalid("binned_kl: need eps > 0 and clip_min < clip_max");
    }
    let clip = |v: &f64| v.clamp(params.clip_min, params.clip_max);
    let p: Vec<f64> = p_samples.iter().map(clip).collect();
    let q: Vec<f64> = q_samples.iter().map(clip).collect();
    let start = p.iter().chain(&q).copied().fold(f64::INFINITY, f64::min);
    let mut end = p
        .iter()
        .chain(&q)
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if start >= end {
        end = start + 1.0;
    }
    // np.linspace(start, end, bins + 1)
    let bins = params.bins;
    let step = (end - start) / bins as f64;
    let mut edges: Vec<f64> = (0..=bins).map(|i| i as f64 * step + start).collect();
    edges[bins] = end;
    let histogram = |xs: &[f64]| -> Vec<f64> {
        let mut counts = vec![0usize; bins];
        for &x in xs {
            // number of edges <= x, minus one = np.digitize(x, edges) − 1; clamp the maximum
            // into the last bin
            let idx = edges.partition_point(|&e| e <= x).saturating_sub(1);
            counts[idx.min(bins - 1)] += 1;
        }
        counts.iter().map(|&c| c as f64 / xs.len() as f64).collect()
    };
    let pp = histogram(&p);
    let qq = histogram(&q);
    let mut kl = 0.0;
    for (pi, qi) in pp.iter().zip(&qq) {
        if *pi > 0.0 {
            kl += pi * (pi / qi.max(params.eps)).ln();
        }
    }
    Ok(kl)
}

/// KLoM of one evaluation point: KL(unlearned ‖ oracle) ([`binned_kl`] with
/// [`KlomParams::default`]: clip to ±100, 20 bins, ε = 1e-5) between the margins of the
/// unlearned-model ensemble and of the oracle (retrained) ensemble at that point. 0 = the
/// unlearned models are distributed like the oracles.
pub fn klom(unlearned_margins: &[f64], oracle_margins: &[f64]) -> Result<f64> {
    binned_kl(unlearned_margins, oracle_margins, &KlomParams::default())
}

/// KLoM of one sequence for an LM: `unlearned[m][t]` / `oracle[m][t]` is model m's margin at
/// position t; KLoM_t is computed per position across the models ([`klom`]) and the sequence
/// value is the mean over t. (The set value is the mean over sequences; the reported number is
/// a percentile over points, see [`super::percentile`], 95th by default.)
pub fn klom_sequence(unlearned: &[Vec<f64>], oracle: &[Vec<f64>]) -> Result<f64> {
    check_non_empty(unlearned, "klom_sequence: unlearned models")?;
    check_non_empty(oracle, "klom_sequence: oracle models")?;
    let t = unlearned[0].len();
    if t == 0 {
        return invalid("klom_sequence: no positions");
    }
    if unlearned.iter().chain(oracle).any(|row| row.len() != t) {
        return invalid("klom_sequence: every model must give a margin at every position");
    }
    let per_position: Vec<f64> = (0..t)
        .map(|i| {
            let u: Vec<f64> = unlearned.iter().map(|r| r[i]).collect();
            let o: Vec<f64> = oracle.iter().map(|r| r[i]).collect();
            klom(&u, &o)
        })
        .collect::<Result<_>>()?;
    mean(&per_position)
}

/// Floor of the per-ensemble margin variance in [`gaussian_kl`] (margins are O(1–10) nats).
pub const GAUSSIAN_VAR_FLOOR: f64 = 1e-3;

/// The small-ensemble proxy of [`binned_kl`] (algorithms.md §5: with ≈ 5–20 models per side the
/// histograms' ε floor dominates): fit a normal distribution to each sample (mean, unbiased
/// variance floored at [`GAUSSIAN_VAR_FLOOR`]) and return the closed form
/// KL(N(μp, σp²) ‖ N(μq, σq²)) = ln(σq/σp) + (σp² + (μp − μq)²) / (2σq²) − ½.
/// Samples are clipped to [−100, 100] first, as for the histograms. 0 for identical samples.
pub fn gaussian_kl(p_samples: &[f64], q_samples: &[f64]) -> Result<f64> {
    check_non_empty(p_samples, "gaussian_kl: first sample")?;
    check_non_empty(q_samples, "gaussian_kl: second sample")?;
    check_no_nan(p_samples, "gaussian_kl: first sample")?;
    check_no_nan(q_samples, "gaussian_kl: second sample")?;
    let fit = |xs: &[f64]| -> (f64, f64) {
        let v: Vec<f64> = xs.iter().map(|x| x.clamp(-100.0, 100.0)).collect();
        let n = v.len() as f64;
        let mu = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        (mu, var.max(GAUSSIAN_VAR_FLOOR))
    };
    let (mp, vp) = fit(p_samples);
    let (mq, vq) = fit(q_samples);
    Ok(0.5 * (vq / vp).ln() + (vp + (mp - mq).powi(2)) / (2.0 * vq) - 0.5)
}

#[cfg(test)]
mod gaussian_tests {
    use super::*;

    #[test]
    fn gaussian_kl_matches_the_closed_form() {
        assert_eq!(gaussian_kl(&[1.0, 3.0], &[1.0, 3.0]).unwrap(), 0.0);
        // p: mean 2, var 2; q: mean 4, var 8 → ½ln4 + (2 + 4)/16 − ½
        let k = gaussian_kl(&[1.0, 3.0], &[2.0, 6.0]).unwrap();
        let hand = 0.5 * 4f64.ln() + 6.0 / 16.0 - 0.5;
        assert!((k - hand).abs() < 1e-12, "{k} vs {hand}");
        // single models: both variances at the floor, only the means count
        let k = gaussian_kl(&[1.0], &[2.0]).unwrap();
        assert!((k - 1.0 / (2.0 * GAUSSIAN_VAR_FLOOR)).abs() < 1e-9, "{k}");
        assert!(gaussian_kl(&[], &[1.0]).is_err());
        assert!(gaussian_kl(&[f64::NAN], &[1.0]).is_err());
    }
}
