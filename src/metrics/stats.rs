//! Basic statistics with the exact numerics of their numpy / scipy / scikit-learn references.
use super::{check_finite, check_no_nan, check_non_empty, invalid};
use crate::error::Result;
use std::io::Write;

/// numpy's pairwise summation (`np.add.reduce` on a contiguous float64 array): blocks of at most
/// 128 elements are summed with 8 interleaved accumulators, larger arrays are split in two at a
/// multiple of 8. Using the same association as numpy keeps means bit-identical in most cases.
pub(crate) fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// Arithmetic mean as `np.mean`: pairwise sum ÷ n. Errors on an empty slice or NaN.
pub fn mean(values: &[f64]) -> Result<f64> {
    check_non_empty(values, "mean: values")?;
    check_no_nan(values, "mean: values")?;
    Ok(pairwise_sum(values) / values.len() as f64)
}

/// Mean of the defined (`Some`) values, `None` if there are none: open-unlearning's `agg_value`
/// over `value_by_index`, where items whose score is `None` (e.g. exact memorisation with no
/// answer token) are skipped.
pub fn mean_defined(values: &[Option<f64>]) -> Result<Option<f64>> {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    if defined.is_empty() {
        return Ok(None);
    }
    mean(&defined).map(Some)
}

/// Harmonic mean exactly as `scipy.stats.hmean(values)`: `1 / mean(1 / values)`.
///
/// * a zero value makes `1/0 = inf`, so the result is **0** (scipy's behaviour; TOFU's
///   model_utility relies on it);
/// * `+inf` values contribute `1/inf = 0`;
/// * negative values are an error (scipy returns NaN with a warning), as are NaN and an empty
///   slice.
pub fn hmean(values: &[f64]) -> Result<f64> {
    check_non_empty(values, "hmean: values")?;
    check_no_nan(values, "hmean: values")?;
    if let Some(i) = values.iter().position(|&v| v < 0.0) {
        return invalid(format!(
            "hmean: element {i} is negative ({}); the harmonic mean needs values >= 0",
            values[i]
        ));
    }
    let inv: Vec<f64> = values.iter().map(|&v| 1.0 / v).collect();
    Ok(1.0 / (pairwise_sum(&inv) / values.len() as f64))
}

/// Area under the ROC curve exactly as `sklearn.metrics.roc_auc_score(labels, scores)`, with
/// `true` the positive class (label 1).
///
/// Orientation: AUC = P(score of a random positive > score of a random negative), ties counting
/// ½ (scikit-learn's trapezoid over the ROC curve with one point per distinct score, which is the
/// Mann–Whitney midrank statistic). The computation follows `roc_curve` step by step (stable
/// descending sort, one point per distinct score, `drop_intermediate=True`, prepend (0, 0),
/// normalise, `np.trapezoid` with pairwise summation) so the result matches to rounding.
///
/// Errors: lengths differ, empty input, only one class present (scikit-learn: undefined, NaN),
/// or a non-finite score (scikit-learn rejects NaN and ±inf).
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64> {
    if labels.len() != scores.len() {
        return invalid(format!(
            "roc_auc: {} labels but {} scores",
            labels.len(),
            scores.len()
        ));
    }
    check_non_empty(scores, "roc_auc: scores")?;
    check_finite(scores, "roc_auc: scores")?;
    let n_pos = labels.iter().filter(|&&l| l).count();
    if n_pos == 0 || n_pos == labels.len() {
        return invalid(
            "roc_auc: only one class is present in the labels; ROC AUC is undefined".to_string(),
        );
    }
    // Descending by score. numpy: argsort(kind="mergesort")[::-1]; the order inside a run of ties
    // does not matter because only cumulative counts at the end of each run are used.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
    // One (fps, tps) point per distinct score value (at the last index of each run).
    let mut tps: Vec<f64> = Vec::new();
    let mut fps: Vec<f64> = Vec::new();
    let mut tp = 0.0f64;
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        }
        let last_of_run = k + 1 == order.len() || scores[order[k + 1]] != scores[i];
        if last_of_run {
            tps.push(tp);
            fps.push((k + 1) as f64 - tp);
        }
    }
    // drop_intermediate: keep the end points and every point where the second difference of
    // fps or tps is non-zero (i.e. drop collinear points).
    if fps.len() > 2 {
        let mut keep = vec![true; fps.len()];
        for i in 1..fps.len() - 1 {
            let d2f = fps[i + 1] - 2.0 * fps[i] + fps[i - 1];
            let d2t = tps[i + 1] - 2.0 * tps[i] + tps[i - 1];
            keep[i] = d2f != 0.0 || d2t != 0.0;
        }
        let (mut f2, mut t2) = (Vec::new(), Vec::new());
        for i in 0..fps.len() {
            if keep[i] {
                f2.push(fps[i]);
                t2.push(tps[i]);
            }
        }
        fps = f2;
        tps = t2;
    }
    fps.insert(0, 0.0);
    tps.insert(0, 0.0);
    let (fmax, tmax) = (fps[fps.len() - 1], tps[tps.len() - 1]);
    let fpr: Vec<f64> = fps.iter().map(|&f| f / fmax).collect();
    let tpr: Vec<f64> = tps.iter().map(|&t| t / tmax).collect();
    // np.trapezoid(tpr, fpr) = add.reduce(diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)
    let terms: Vec<f64> = (1..fpr.len())
        .map(|i| (fpr[i] - fpr[i - 1]) * (tpr[i] + tpr[i - 1]) / 2.0)
        .collect();
    Ok(pairwise_sum(&terms))
}

/// `len(zlib.compress(text.encode("utf-8")))`: the length of the zlib stream (2-byte header,
/// raw deflate at the default level 6, Adler-32 trailer) of the UTF-8 bytes. Uses the C zlib
/// backend, so the length is identical to CPython's.
pub fn zlib_len(text: &str) -> Result<usize> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(text.as_bytes())
        .and_then(|_| enc.finish())
        .map(|out| out.len())
        .map_err(|e| crate::error::Error::InvalidArgument(format!("zlib_len: {e}")))
}

/// The `q`-th percentile (0 ≤ q ≤ 100) exactly as `np.percentile(values, q)` with the default
/// `method="linear"`: sort, virtual index `(n − 1)·q/100`, and numpy's `_lerp` between the two
/// neighbours (`a + (b−a)·t` for t < ½, `b − (b−a)·(1−t)` otherwise).
pub fn percentile(values: &[f64], q: f64) -> Result<f64> {
    check_non_empty(values, "percentile: values")?;
    check_no_nan(values, "percentile: values")?;
    if !(0.0..=100.0).contains(&q) {
        return invalid(format!("percentile: q = {q} is outside [0, 100]"));
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let virtual_index = (n - 1) as f64 * (q / 100.0);
    let prev = virtual_index.floor();
    let (lo, hi) = if virtual_index >= (n - 1) as f64 {
        (n - 1, n - 1)
    } else {
        let lo = prev as usize;
        (lo, lo + 1)
    };
    let t = virtual_index - prev;
    let (a, b) = (v[lo], v[hi]);
    let diff = b - a;
    Ok(if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_matches_plain_sum_on_exact_values() {
        // integers are summed exactly whatever the association
        for n in [0usize, 1, 7, 8, 9, 127, 128, 129, 1000, 4097] {
            let v: Vec<f64> = (0..n).map(|i| i as f64).collect();
            assert_eq!(
                pairwise_sum(&v),
                (n * n.saturating_sub(1) / 2) as f64,
                "n={n}"
            );
        }
    }

    #[test]
    fn percentile_linear() {
        // sorted [1, 2, 3, 4]: index 3·0.95 = 2.85 → 3 + 0.85·(4−3) = 3.85
        assert!((percentile(&[4.0, 1.0, 3.0, 2.0], 95.0).unwrap() - 3.85).abs() < 1e-15);
        // index 3·0.5 = 1.5 → 2.5; extremes are the min and the max
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0).unwrap(), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.0).unwrap(), 1.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 100.0).unwrap(), 4.0);
        assert_eq!(percentile(&[7.0], 95.0).unwrap(), 7.0);
        assert!(percentile(&[], 50.0).is_err());
        assert!(percentile(&[1.0], 101.0).is_err());
    }
}
