//! Two-sample Kolmogorov–Smirnov test, a port of `scipy.stats.ks_2samp` (scipy 1.17, default
//! arguments: `alternative="two-sided"`, `method="auto"`), and the one-sample two-sided
//! Kolmogorov distribution `scipy.stats.kstwo.sf` it falls back on.
//!
//! Mode selection (as scipy): `auto` tries the **exact** distribution when
//! `max(n1, n2) <= 10000`, and uses the asymptotic `kstwo.sf(D, round(n1·n2/(n1+n2)))`
//! otherwise, or when the exact computation fails (a probability outside [0, 1]).
//!
//! * exact, `n1 == n2`: `_compute_prob_outside_square` (Horner form of the alternating sum of
//!   binomial ratios);
//! * exact, `n1 != n2`: `_compute_outer_prob_inside_method` (Hodges' lattice-path count, with
//!   Viehmann's recursion for 1 − p);
//! * asymptotic: `_kolmogn` (Simard & L'Ecuyer's selection among Ruben–Gambino, the Durbin
//!   matrix (Marsaglia–Tsang–Wang), Pomeranz, Pelz–Good, and 2·Smirnov's one-sided
//!   Birnbaum–Tingey sum).
//!
//! Ties need no special handling: scipy computes D from the two empirical CDFs evaluated at
//! every observation (`searchsorted(side="right")`), and so does this port.
use super::{check_no_nan, check_non_empty, invalid};
use crate::error::Result;

/// Which p-value computation `ks_2samp` used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsMethod {
    Exact,
    Asymptotic,
}

/// Result of [`ks_2samp_full`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsResult {
    /// D = sup |F1 − F2|; with the exact method scipy reports it as `h / lcm(n1, n2)`.
    pub statistic: f64,
    /// Two-sided p-value, clipped to [0, 1].
    pub pvalue: f64,
    pub method: KsMethod,
}

/// `scipy.stats.ks_2samp(a, b)` with default arguments: returns `(statistic, pvalue)`.
///
/// Two-sided test of equal distributions; the p-value is exact for `max(n1, n2) <= 10000`
/// (ties included, as scipy: the exact null distribution of D for continuous data evaluated at
/// the observed D), asymptotic (`kstwo.sf`) above. Errors on an empty sample or NaN (scipy
/// would propagate NaN). ±inf are ordinary, ordered values.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Result<(f64, f64)> {
    let r = ks_2samp_full(a, b)?;
    Ok((r.statistic, r.pvalue))
}

/// [`ks_2samp`] that also reports which method produced the p-value.
pub fn ks_2samp_full(a: &[f64], b: &[f64]) -> Result<KsResult> {
    const MAX_AUTO_N: usize = 10000;
    check_non_empty(a, "ks_2samp: first sample")?;
    check_non_empty(b, "ks_2samp: second sample")?;
    check_no_nan(a, "ks_2samp: first sample")?;
    check_no_nan(b, "ks_2samp: second sample")?;
    let mut d1 = a.to_vec();
    let mut d2 = b.to_vec();
    d1.sort_by(f64::total_cmp);
    d2.sort_by(f64::total_cmp);
    let (n1, n2) = (d1.len(), d2.len());
    // cdf1 - cdf2 at every observation; searchsorted(side="right") = number of values <= x.
    let (mut min_diff, mut max_diff) = (f64::INFINITY, f64::NEG_INFINITY);
    for &x in d1.iter().chain(d2.iter()) {
        let c1 = d1.partition_point(|&v| v <= x) as f64 / n1 as f64;
        let c2 = d2.partition_point(|&v| v <= x) as f64 / n2 as f64;
        let diff = c1 - c2;
        min_diff = min_diff.min(diff);
        max_diff = max_diff.max(diff);
    }
    let min_s = (-min_diff).clamp(0.0, 1.0);
    let max_s = max_diff;
    let mut d = if min_s > max_s { min_s } else { max_s };

    let g = gcd(n1 as u64, n2 as u64);
    if n1.max(n2) <= MAX_AUTO_N {
        let (n1u, n2u) = (n1 as u64, n2 as u64);
        let lcm = (n1u / g) * n2u;
        let h = (d * lcm as f64).round_ties_even() as u64;
        d = h as f64 / lcm as f64;
        if h == 0 {
            return Ok(KsResult {
                statistic: d,
                pvalue: 1.0,
                method: KsMethod::Exact,
            });
        }
        let prob = if n1 == n2 {
            Some(prob_outside_square(n1u, h))
        } else {
            outer_prob_inside_method(n1u, n2u, g, h)
        };
        if let Some(p) = prob {
            if (0.0..=1.0).contains(&p) {
                return Ok(KsResult {
                    statistic: d,
                    pvalue: p,
                    method: KsMethod::Exact,
                });
            }
        }
        // scipy: "Exact calculation unsuccessful. Switching to method=asymp."
    }
    let (m, n) = if n1 >= n2 {
        (n1 as f64, n2 as f64)
    } else {
        (n2 as f64, n1 as f64)
    };
    let en = (m * n / (m + n)).round_ties_even();
    let p = kstwo_sf(d, en as u64)?;
    Ok(KsResult {
        statistic: d,
        pvalue: p.clamp(0.0, 1.0),
        method: KsMethod::Asymptotic,
    })
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// scipy `_compute_prob_outside_square(n, h)`: P(D_{n,n} >= h/n) for two samples of size n,
/// `2·Σ_k (−1)^(k+1) C(2n, n−kh)/C(2n, n)` in Horner form.
fn prob_outside_square(n: u64, h: u64) -> f64 {
    let (n, h) = (n as i64, h as i64);
    let mut p = 0.0f64;
    let mut k = n / h;
    while k >= 0 {
        let mut p1 = 1.0f64;
        for j in 0..h {
            p1 = (n - k * h - j) as f64 * p1 / (n + k * h + j + 1) as f64;
        }
        p = p1 * (1.0 - p);
        k -= 1;
    }
    2.0 * p
}

/// scipy `_compute_outer_prob_inside_method(m, n, g, h)` (pythran): the proportion of lattice
/// paths from (0,0) to (m,n) that leave the band |x/m − y/n| < h/lcm(m,n), by Viehmann's
/// recursion for 1 − p over a sliding window of one column. `None` where numpy would raise an
/// index error (never expected).
fn outer_prob_inside_method(m: u64, n: u64, g: u64, h: u64) -> Option<f64> {
    let (mut m, mut n) = (m as i64, n as i64);
    if m < n {
        std::mem::swap(&mut m, &mut n);
    }
    let (g, h) = (g as i64, h as i64);
    let mg = m / g;
    let ng = n / g;
    let ceil_div = |a: i64, b: i64| -> i64 { -((-a).div_euclid(b)) };
    let mut minj: i64 = 0;
    let mut maxj: i64 = ceil_div(h, mg).min(n + 1);
    let mut curlen = maxj - minj;
    let len_a = (2 * maxj + 2).min(n + 1) as usize;
    let mut a = vec![1.0f64; len_a];
    for v in a.iter_mut().take(maxj as usize).skip(minj as usize) {
        *v = 0.0;
    }
    for i in 1..=m {
        let lastminj = minj;
        let lastlen = curlen;
        minj = ((ng * i - h).div_euclid(mg) + 1).max(0);
        minj = minj.min(n);
        maxj = ceil_div(ng * i + h, mg).min(n + 1);
        if maxj <= minj {
            return Some(1.0);
        }
        let mut val = if minj == 0 { 0.0 } else { 1.0 };
        let fi = i as f64;
        for jj in 0..(maxj - minj) {
            let j = jj + minj;
            let idx = (jj + minj - lastminj) as usize;
            let prev = *a.get(idx)?;
            val = (prev * fi + val * j as f64) / (i + j) as f64;
            *a.get_mut(jj as usize)? = val;
        }
        curlen = maxj - minj;
        if lastlen > curlen {
            let start = (maxj - minj) as usize;
            let end = ((maxj - minj + (lastlen - curlen)) as usize).min(len_a);
            for v in a.iter_mut().take(end).skip(start) {
                *v = 1.0;
            }
        }
    }
    a.get((maxj - minj - 1) as usize).copied()
}

/// `scipy.stats.kstwo.sf(d, n)`: P(D_n >= d) for the two-sided one-sample Kolmogorov–Smirnov
/// statistic D_n = sup|F_n − F| of n observations. 1 for d <= 1/(2n) (the support's lower end),
/// 0 for d >= 1. Port of `scipy.stats._ksstats._kolmogn(n, d, cdf=False)`. Errors for n = 0
/// or NaN d.
pub fn kstwo_sf(d: f64, n: u64) -> Result<f64> {
    if n == 0 {
        return invalid("kstwo_sf: n must be >= 1");
    }
    if d.is_nan() {
        return invalid("kstwo_sf: d is NaN");
    }
    if d >= 1.0 {
        return Ok(0.0);
    }
    if d <= 0.5 / n as f64 {
        return Ok(1.0);
    }
    Ok(kolmogn_sf(n, d).clamp(0.0, 1.0))
}

const E128: i32 = 128;
const EP128: f64 = 3.402_823_669_209_385e38; // 2^128
const EM128: f64 = 2.938_735_877_055_719e-39; // 2^-128

/// x · 2^e without intermediate overflow/underflow for |e| beyond the f64 exponent range.
fn ldexp(mut x: f64, mut e: i64) -> f64 {
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
        if x.is_infinite() {
            return x;
        }
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
        if x == 0.0 {
            return x;
        }
    }
    x * 2f64.powi(e as i32)
}

/// `_kolmogn(n, x, cdf=False)`, x in (0, 1).
fn kolmogn_sf(n: u64, x: f64) -> f64 {
    if x >= 1.0 {
        return 0.0;
    }
    if x <= 0.0 {
        return 1.0;
    }
    let nf = n as f64;
    let t = nf * x;
    if t <= 1.0 {
        // Ruben–Gambino: 1/2n <= x <= 1/n
        if t <= 0.5 {
            return 1.0;
        }
        let prob = if n <= 140 {
            let mut p = 1.0;
            for i in 1..=n {
                p *= i as f64 * (1.0 / nf) * (2.0 * t - 1.0);
            }
            p
        } else {
            (log_nfactorial_div_n_pow_n(nf) + nf * (2.0 * t - 1.0).ln()).exp()
        };
        return 1.0 - prob;
    }
    if t >= nf - 1.0 {
        // Ruben–Gambino
        return 2.0 * (1.0 - x).powf(nf);
    }
    if x >= 0.5 {
        return 2.0 * smirnov_sf(n, x);
    }
    let nxsquared = t * x;
    if n <= 140 {
        if nxsquared <= 0.754693 {
            return 1.0 - kolmogn_dmtw_cdf(n, x);
        }
        if nxsquared <= 4.0 {
            return 1.0 - kolmogn_pomeranz_cdf(n, x);
        }
        return 2.0 * smirnov_sf(n, x);
    }
    if nxsquared >= 370.0 {
        return 0.0;
    }
    if nxsquared >= 2.2 {
        return 2.0 * smirnov_sf(n, x);
    }
    let cdf = if n <= 100_000 && nf * x.powf(1.5) <= 1.4 {
        kolmogn_dmtw_cdf(n, x)
    } else {
        kolmogn_pelz_good_cdf(n, x)
    };
    1.0 - cdf
}

/// log(n!/n^n) by Stirling's series with n·log(n) removed up front.
fn log_nfactorial_div_n_pow_n(n: f64) -> f64 {
    const STIRLING: [f64; 8] = [
        -0.029550653594771242,
        0.00641025641025641,
        -0.0019175269175269176,
        0.0008417508417508417,
        -0.0005952380952380953,
        0.0007936507936507937,
        -0.002777777777777778,
        0.08333333333333333,
    ];
    let rn = 1.0 / n;
    let z = rn / n;
    let mut poly = 0.0;
    for c in STIRLING {
        poly = poly * z + c;
    }
    n.ln() / 2.0 - n + (2.0 * std::f64::consts::PI).ln() / 2.0 + rn * poly
}

fn matmul(a: &[f64], b: &[f64], m: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * m];
    for i in 0..m {
        for k in 0..m {
            let aik = a[i * m + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..m {
                c[i * m + j] += aik * b[k * m + j];
            }
        }
    }
    c
}

/// `_kolmogn_DMTW`: P(D_n <= d) by the Durbin matrix algorithm in the Marsaglia–Tsang–Wang form,
/// (n!/n^n)·(H^n)[k−1, k−1] with exponent bookkeeping.
fn kolmogn_dmtw_cdf(n: u64, d: f64) -> f64 {
    if d >= 1.0 {
        return 1.0;
    }
    let nf = n as f64;
    let nd = nf * d;
    if nd <= 0.5 {
        return 0.0;
    }
    let k = nd.ceil() as usize;
    let h = k as f64 - nd;
    let m = 2 * k - 1;
    let mut v: Vec<f64> = (1..=m).map(|j| 1.0 - h.powf(j as f64)).collect();
    let mut w = vec![0.0; m];
    let mut fac = 1.0f64;
    for j in 1..=m {
        w[j - 1] = fac;
        fac /= j as f64;
        v[j - 1] *= fac;
    }
    let tt = (2.0 * h - 1.0).max(0.0).powf(m as f64) - 2.0 * h.powf(m as f64);
    v[m - 1] = (1.0 + tt) * fac;
    let mut hm = vec![0.0; m * m];
    for i in 1..m {
        for r in (i - 1)..m {
            hm[r * m + i] = w[r - (i - 1)];
        }
    }
    for r in 0..m {
        hm[r * m] = v[r];
    }
    for c in 0..m {
        hm[(m - 1) * m + c] = v[m - 1 - c];
    }
    let mut hpwr = vec![0.0; m * m];
    for i in 0..m {
        hpwr[i * m + i] = 1.0;
    }
    let mut nn = n;
    let mut expnt: i64 = 0;
    let mut hexpnt: i64 = 0;
    while nn > 0 {
        if nn % 2 == 1 {
            hpwr = matmul(&hpwr, &hm, m);
            expnt += hexpnt;
        }
        hm = matmul(&hm, &hm, m);
        hexpnt *= 2;
        if hm[(k - 1) * m + (k - 1)].abs() > EP128 {
            for x in hm.iter_mut() {
                *x /= EP128;
            }
            hexpnt += E128 as i64;
        }
        nn /= 2;
    }
    let mut p = hpwr[(k - 1) * m + (k - 1)];
    for i in 1..=n {
        p = i as f64 * p / nf;
        if p.abs() < EM128 {
            p *= EP128;
            expnt -= E128 as i64;
        }
    }
    if expnt != 0 {
        p = ldexp(p, expnt);
    }
    p
}

fn pomeranz_j1j2(i: i64, n: i64, ll: i64, ceilf: i64, roundf: i64) -> (i64, i64) {
    let (j1, j2) = if i == 0 {
        (-ll - ceilf - 1, ll + ceilf - 1)
    } else {
        let (ip1div2, ip1mod2) = ((i + 1) / 2, (i + 1) % 2);
        if ip1mod2 == 0 {
            if ip1div2 == n + 1 {
                (n - ll - ceilf - 1, n + ll + ceilf - 1)
            } else {
                (ip1div2 - 1 - ll - roundf - 1, ip1div2 + ll - 1 + ceilf - 1)
            }
        } else {
            (ip1div2 - 1 - ll - 1, ip1div2 + ll + roundf - 1)
        }
    };
    ((j1 + 2).max(0), j2.min(n))
}

/// `_kolmogn_Pomeranz`: P(D_n <= x) by Pomeranz's recursion (rows are convolutions with
/// truncated Poisson weights), with exponent bookkeeping.
fn kolmogn_pomeranz_cdf(n: u64, x: f64) -> f64 {
    let nf = n as f64;
    let n = n as i64;
    let t = nf * x;
    let ll = t.floor() as i64;
    let f = t - ll as f64;
    let g = f.min(1.0 - f);
    let ceilf = i64::from(f > 0.0);
    let roundf = i64::from(f > 0.5);
    let npwrs = (2 * (ll + 1)) as usize;
    let mut gpower = vec![0.0; npwrs];
    let mut twogpower = vec![0.0; npwrs];
    let mut onem2gpower = vec![0.0; npwrs];
    gpower[0] = 1.0;
    twogpower[0] = 1.0;
    onem2gpower[0] = 1.0;
    let mut expnt: i64 = 0;
    let (g_over_n, two_g_over_n, one_minus_two_g_over_n) =
        (g / nf, 2.0 * g / nf, (1.0 - 2.0 * g) / nf);
    for m in 1..npwrs {
        gpower[m] = gpower[m - 1] * g_over_n / m as f64;
        twogpower[m] = twogpower[m - 1] * two_g_over_n / m as f64;
        onem2gpower[m] = onem2gpower[m - 1] * one_minus_two_g_over_n / m as f64;
    }
    let mut v0 = vec![0.0; npwrs];
    let mut v1 = vec![0.0; npwrs];
    v1[0] = 1.0;
    let (mut v0s, mut v1s): (i64, i64) = (0, 0);
    let (mut j1, _) = pomeranz_j1j2(0, n, ll, ceilf, roundf);
    for i in 1..(2 * n + 2) {
        let k1 = j1;
        std::mem::swap(&mut v0, &mut v1);
        std::mem::swap(&mut v0s, &mut v1s);
        v1.fill(0.0);
        let (new_j1, j2) = pomeranz_j1j2(i, n, ll, ceilf, roundf);
        j1 = new_j1;
        let pwrs = if i == 1 || i == 2 * n + 1 {
            &gpower
        } else if i % 2 == 1 {
            &twogpower
        } else {
            &onem2gpower
        };
        let ln2 = j2 - k1 + 1;
        if ln2 > 0 {
            // np.convolve(V0[k1 - V0s : k1 - V0s + ln2], pwrs[:ln2]) (full), with numpy's
            // slice clipping at the array ends.
            let s = (k1 - v0s).max(0) as usize;
            let e = ((k1 - v0s + ln2).max(0) as usize).min(npwrs);
            let seg: &[f64] = if s < e { &v0[s..e] } else { &[] };
            let ker = &pwrs[..(ln2 as usize).min(npwrs)];
            let conv_len_full = if seg.is_empty() || ker.is_empty() {
                0
            } else {
                seg.len() + ker.len() - 1
            };
            let conv_start = (j1 - k1).max(0) as usize;
            let conv_len = (j2 - j1 + 1).max(0) as usize;
            for (out, idx) in v1
                .iter_mut()
                .zip(conv_start..conv_start + conv_len)
                .take(npwrs)
            {
                if idx >= conv_len_full {
                    break;
                }
                let lo = idx.saturating_sub(ker.len() - 1);
                let hi = idx.min(seg.len() - 1);
                let mut acc = 0.0;
                for a in lo..=hi {
                    acc += seg[a] * ker[idx - a];
                }
                *out = acc;
            }
            let vmax = v1.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if 0.0 < vmax && vmax < EM128 {
                for x in v1.iter_mut() {
                    *x *= EP128;
                }
                expnt -= E128 as i64;
            }
            v1s = v0s + j1 - k1;
        }
    }
    let idx = n - v1s;
    let mut ans = if idx >= 0 && (idx as usize) < npwrs {
        v1[idx as usize]
    } else {
        0.0
    };
    for m in 1..=n {
        if ans.abs() > EP128 {
            ans *= EM128;
            expnt += E128 as i64;
        }
        ans *= m as f64;
    }
    if expnt != 0 {
        ans = ldexp(ans, expnt);
    }
    ans
}

/// `_kolmogn_PelzGood`: the Pelz–Good approximation of P(D_n <= x).
fn kolmogn_pelz_good_cdf(n: u64, x: f64) -> f64 {
    use std::f64::consts::PI;
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let nf = n as f64;
    let sqrt2pi = (2.0 * PI).sqrt();
    let pi2 = PI.powi(2);
    let pi4 = PI.powi(4);
    let pi6 = PI.powi(6);
    let z = nf.sqrt() * x;
    let (zsquared, zthree, zfour, zsix) = (z.powf(2.0), z.powf(3.0), z.powf(4.0), z.powf(6.0));
    let qlog = -pi2 / 8.0 / zsquared;
    if qlog < -708.0 {
        return 0.0;
    }
    let q = qlog.exp();
    let k1a = -zsquared;
    let k1b = pi2 / 4.0;
    let k2a = 6.0 * zsix + 2.0 * zfour;
    let k2b = (2.0 * zfour - 5.0 * zsquared) * pi2 / 4.0;
    let k2c = pi4 * (1.0 - 2.0 * zsquared) / 16.0;
    let k3d = pi6 * (5.0 - 30.0 * zsquared) / 64.0;
    let k3c = pi4 * (-60.0 * zsquared + 212.0 * zfour) / 16.0;
    let k3b = pi2 * (135.0 * zfour - 96.0 * zsix) / 4.0;
    let k3a = -30.0 * zsix - 90.0 * z.powf(8.0);
    let mut kk = [0.0f64; 4];
    let maxk = (16.0 * z / PI).ceil() as i64;
    for k in (1..=maxk).rev() {
        let m = (2 * k - 1) as f64;
        let (msquared, mfour, msix) = (m.powf(2.0), m.powf(4.0), m.powf(6.0));
        let qpower = q.powf((8 * k) as f64);
        let coeffs = [
            1.0,
            k1a + k1b * msquared,
            k2a + k2b * msquared + k2c * mfour,
            k3a + k3b * msquared + k3c * mfour + k3d * msix,
        ];
        for (v, c) in kk.iter_mut().zip(coeffs) {
            *v *= qpower;
            *v += c;
        }
    }
    let divisors = [z, 6.0 * zfour, 72.0 * z.powf(7.0), 6480.0 * z.powf(10.0)];
    for (v, dv) in kk.iter_mut().zip(divisors) {
        *v *= q;
        *v *= sqrt2pi;
        *v /= dv;
    }
    let q = (-pi2 / 2.0 / zsquared).exp();
    let sqrt3z = 3f64.sqrt() * z;
    let mut t2 = Vec::with_capacity(maxk.max(0) as usize);
    let mut t3 = Vec::with_capacity(maxk.max(0) as usize);
    for k in (1..=maxk).rev() {
        let kf = k as f64;
        let ksquared = (k * k) as f64;
        let qp = q.powf(ksquared);
        let kspi = PI * kf;
        t2.push(ksquared * qp);
        t3.push((sqrt3z + kspi) * (sqrt3z - kspi) * ksquared * qp);
    }
    let k2extra = super::stats::pairwise_sum(&t2) * (pi2 * sqrt2pi / (-36.0 * zthree));
    kk[2] += k2extra;
    let k3extra = super::stats::pairwise_sum(&t3) * (pi2 * sqrt2pi / (216.0 * zsix));
    kk[3] += k3extra;
    for (j, v) in kk.iter_mut().enumerate() {
        *v /= nf.powf(j as f64 / 2.0);
    }
    let mut ksum = 0.0;
    for v in kk {
        ksum += v;
    }
    ksum
}

/// `scipy.special.smirnov(n, x)`: P(D_n^+ >= x) for the one-sided statistic, by the
/// Birnbaum–Tingey sum `x·Σ_{v=0}^{⌊n(1−x)⌋} C(n,v)(x+v/n)^(v−1)(1−x−v/n)^(n−v)` (all terms
/// positive), each term evaluated in log space, with the same special cases, early termination
/// and n > 10^6 approximation as the C implementation (which uses double-double arithmetic;
/// this port agrees to ~1e-12 relative).
fn smirnov_sf(n: u64, x: f64) -> f64 {
    if !(0.0..=1.0).contains(&x) || n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return 1.0 - x;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x == 1.0 {
        return 0.0;
    }
    let nf = n as f64;
    // n·x = nx_hi + nx_lo exactly
    let nx_hi = nf * x;
    let nx_lo = nf.mul_add(x, -nx_hi);
    let mut nxfl = nx_hi.floor();
    let mut alpha = (nx_hi - nxfl) + nx_lo;
    if alpha < 0.0 {
        nxfl -= 1.0;
        alpha += 1.0;
    }
    if alpha >= 1.0 {
        nxfl += 1.0;
        alpha -= 1.0;
    }
    if nxfl == 0.0 || (nxfl == 1.0 && alpha == 0.0) {
        let cdf = x * (1.0 + x).powf(nf - 1.0);
        return 1.0 - cdf;
    }
    const MINLOG: f64 = -7.451_332_191_019_412e2; // log(2^-1075), xsf const.h
    if -2.0 * nf * x * x < MINLOG {
        return 0.0;
    }
    if nxfl >= nf - 1.0 {
        return (1.0 - x).powf(nf);
    }
    if n > 1_000_000 {
        let logp = -(6.0 * nf * x + 1.0).powi(2) / 18.0 / nf;
        return if logp < -std::f64::consts::LN_2 {
            logp.exp()
        } else {
            1.0 - (-logp.exp_m1())
        };
    }
    // Lower sum: v = 0 ..= n1mxfl, the v with 1 − x − v/n > 0.
    let nxfl_u = nxfl as u64;
    let mut n1mxfl = n - nxfl_u - u64::from(alpha != 0.0);
    if alpha == 0.0 {
        n1mxfl -= 1;
    }
    let n_terms = n1mxfl + 1;
    let vmid = n / 2;
    // log C(n, v), accumulated with Neumaier compensation
    let (mut lc, mut lc_comp) = (0.0f64, 0.0f64);
    let (mut sum, mut sum_comp) = (0.0f64, 0.0f64);
    let neumaier = |s: &mut f64, c: &mut f64, v: f64| {
        let t = *s + v;
        if s.abs() >= v.abs() {
            *c += (*s - t) + v;
        } else {
            *c += (v - t) + *s;
        }
        *s = t;
    };
    for v in 0..n_terms {
        if v > 0 {
            let step = ((n - v + 1) as f64).ln() - (v as f64).ln();
            neumaier(&mut lc, &mut lc_comp, step);
        }
        let vf = v as f64;
        // b1 = x + v/n = (v + nx)/n ; b2 = 1 − x − v/n = (n − v − nx)/n
        let b1 = ((vf + nx_hi) + nx_lo) / nf;
        let b2 = (((nf - vf) - nx_hi) - nx_lo) / nf;
        if b2 <= 0.0 {
            break;
        }
        let ln_b1 = if b1 > 0.5 { (-b2).ln_1p() } else { b1.ln() };
        let ln_b2 = if b2 > 0.5 { (-b1).ln_1p() } else { b2.ln() };
        let ln_term = (lc + lc_comp) + (vf - 1.0) * ln_b1 + (nf - vf) * ln_b2;
        let aj = ln_term.exp();
        if aj.is_finite() && aj != 0.0 {
            neumaier(&mut sum, &mut sum_comp, aj);
        }
        if aj != 0.0 {
            if 4.0 * (n_terms - v) as f64 * aj.abs() < f64::EPSILON * (sum + sum_comp)
                && v != n_terms - 1
            {
                break;
            }
        } else if v > vmid {
            break;
        }
    }
    (x * (sum + sum_comp)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_full_separation_is_two_over_binomial() {
        // D = 1 for n = m = 3: p = 2 / C(6, 3) = 2/20 = 0.1
        assert!((prob_outside_square(3, 3) - 0.1).abs() < 1e-15);
        // n = m = 2, h = 1 (D = 1/2): every path leaves the band |x − y| < 1 → p = 1
        assert!((prob_outside_square(2, 1) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn inside_method_full_separation() {
        // m = 3, n = 2, D = 1 → h = lcm = 6: p = 2 / C(5, 2) = 0.2
        let p = outer_prob_inside_method(3, 2, 1, 6).unwrap();
        assert!((p - 0.2).abs() < 1e-15, "{p}");
    }

    #[test]
    fn smirnov_small_n_closed_form() {
        // n = 2, x = 0.6 (x >= 1 − 1/n): (1 − x)^n = 0.16
        assert!((smirnov_sf(2, 0.6) - 0.16).abs() < 1e-15);
        // n = 2, x = 0.25 (x <= 1/n): 1 − x(1 + x)^(n−1) = 1 − 0.3125; the Birnbaum–Tingey sum
        // agrees: x·[C(2,0)·x^(−1)·(1−x)² + C(2,1)·(x+½)^0·(1−x−½)^1] = 0.25·(2.25 + 0.5)
        assert!((smirnov_sf(2, 0.25) - 0.6875).abs() < 1e-15);
        // n = 3, x = 0.4 (lower sum, v = 0, 1; v = 2 has 1 − x − 2/3 < 0):
        // x·[(1−x)³/x + 3·(1 − x − 1/3)²] = 0.4·(0.54 + 3·(4/15)²)
        let want = 0.4 * (0.54 + 3.0 * (4.0f64 / 15.0).powi(2));
        assert!((smirnov_sf(3, 0.4) - want).abs() < 1e-15);
    }
}
