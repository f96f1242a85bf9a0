//! Best rank-k approximation of a weight change, for shadow adapters of a size LoRA can hold.
//!
//! Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, algorithms
//! 4.4 and 5.1): Q spans Δ's dominant left singular subspace (k + 10 columns, two power
//! iterations), then the top-k eigenvectors U_k of (QᵀΔ)(QᵀΔ)ᵀ give Δ_k = (Q·U_k)(U_kᵀ·QᵀΔ),
//! the projection of Δ onto its k leading left singular vectors. As LoRA factors B = Q·U_k
//! (orthonormal columns) and A = U_kᵀ·QᵀΔ, so ‖Δ_k‖ = ‖A‖ and ‖Δ − Δ_k‖² = ‖Δ‖² − ‖A‖².
//! The large products run as candle matmuls in f32; the small Gram matrix in f64, its
//! eigenproblem and the orthonormalisation in f64 on the host.
use crate::error::{Error, Result};
use crate::rng::Rng;
use candle_core::{DType, Tensor};

/// Columns beyond k sampled for the range (the usual oversampling of the randomized SVD).
const OVERSAMPLE: usize = 10;
/// Power iterations: each sharpens the range towards the leading singular vectors.
const POWER_ITERS: usize = 2;

/// (A [k, n], B [m, k]) with B·A the best rank-k approximation of `delta` [m, n] (up to the
/// randomized range's accuracy). `k` must be below min(m, n); `rng` draws the test matrix.
pub fn low_rank(delta: &Tensor, k: usize, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
    let (m, n) = delta.dims2()?;
    if k == 0 || k >= m.min(n) {
        return Err(Error::InvalidArgument(format!(
            "low-rank approximation: rank {k} of a {m} × {n} matrix must be in 1..{}",
            m.min(n)
        )));
    }
    let dev = delta.device();
    let delta = delta.to_dtype(DType::F32)?;
    let size = delta
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if !size.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "low-rank approximation: the {m} × {n} change has non-finite entries"
        )));
    }
    let l = (k + OVERSAMPLE).min(m.min(n));
    let omega: Vec<f32> = (0..n * l).map(|_| rng.normal() as f32).collect();
    let omega = Tensor::from_vec(omega, (n, l), dev)?;
    let mut q = orthonormal_columns(&delta.matmul(&omega)?)?;
    let delta_t = delta.t()?;
    for _ in 0..POWER_ITERS {
        let z = orthonormal_columns(&delta_t.matmul(&q)?)?;
        q = orthonormal_columns(&delta.matmul(&z)?)?;
    }
    // small [l, n] problem: its left singular vectors are eigenvectors of G = S·Sᵀ, formed in
    // f64 (in f32 the squaring would drown singular values below ~3e-4·σ₁ in rounding)
    let small = q.t()?.matmul(&delta)?;
    let small64 = small.to_dtype(DType::F64)?;
    let g = small64.matmul(&small64.t()?)?.to_vec2::<f64>()?;
    let (eigenvalues, vectors) = symmetric_eigen(g);
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&i, &j| eigenvalues[j].total_cmp(&eigenvalues[i]));
    // U_k [l, k]: the top-k eigenvectors as columns
    let u_k: Vec<f32> = (0..l)
        .flat_map(|row| {
            let vectors = &vectors;
            order[..k].iter().map(move |&c| vectors[row][c] as f32)
        })
        .collect();
    let u_k = Tensor::from_vec(u_k, (l, k), dev)?;
    let b = q.matmul(&u_k)?.contiguous()?;
    let a = u_k.t()?.matmul(&small)?.contiguous()?;
    Ok((a, b))
}

/// The columns of `y` [m, l] made orthonormal (modified Gram-Schmidt, twice: "twice is
/// enough"); a column dependent on the earlier ones becomes zero.
fn orthonormal_columns(y: &Tensor) -> Result<Tensor> {
    let (m, l) = y.dims2()?;
    let mut cols: Vec<Vec<f64>> = y.t()?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for _pass in 0..2 {
        // the largest column of this pass's input (1 in the second pass)
        let scale: f64 = cols
            .iter()
            .map(|c| c.iter().map(|x| x * x).sum::<f64>())
            .fold(0.0, f64::max)
            .sqrt();
        for j in 0..l {
            let (done, rest) = cols.split_at_mut(j);
            let cj = &mut rest[0];
            for ci in done.iter() {
                let dot: f64 = ci.iter().zip(cj.iter()).map(|(a, b)| a * b).sum();
                for (x, c) in cj.iter_mut().zip(ci) {
                    *x -= dot * c;
                }
            }
            let norm = cj.iter().map(|x| x * x).sum::<f64>().sqrt();
            // relative to the largest input column: below rounding level it is no direction
            let keep = norm > 1e-10 * scale.max(f64::MIN_POSITIVE);
            for x in cj.iter_mut() {
                *x = if keep { *x / norm } else { 0.0 };
            }
        }
    }
    let flat: Vec<f32> = cols.into_iter().flatten().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (l, m), y.device())?
        .t()?
        .contiguous()?)
}

/// Eigenvalues and eigenvectors (as the columns of the returned matrix) of a small symmetric
/// matrix, by cyclic Jacobi rotations.
pub fn symmetric_eigen(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let total: f64 = a.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                // the rotation that zeroes a[p][q] (Golub & Van Loan 8.5.2)
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
                let (head, tail) = a.split_at_mut(q);
                for (x, y) in head[p].iter_mut().zip(tail[0].iter_mut()) {
                    (*x, *y) = (c * *x - s * *y, s * *x + c * *y);
                }
                for row in v.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Δ = U·diag(σ)·Vᵀ with orthonormal U [m, r], V [n, r] of a seeded draw.
    fn known_spectrum(m: usize, n: usize, sigma: &[f64], seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let r = sigma.len();
        let mut draw = |rows: usize| {
            let g: Vec<f32> = (0..rows * r).map(|_| rng.normal() as f32).collect();
            orthonormal_columns(&Tensor::from_vec(g, (rows, r), &Device::Cpu).unwrap()).unwrap()
        };
        let (u, v) = (draw(m), draw(n));
        let s: Vec<f32> = sigma.iter().map(|&x| x as f32).collect();
        let s = Tensor::from_vec(s, r, &Device::Cpu).unwrap();
        let delta = u
            .broadcast_mul(&s)
            .unwrap()
            .matmul(&v.t().unwrap())
            .unwrap();
        (delta, u, v)
    }

    fn norm(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    }

    #[test]
    fn recovers_the_leading_singular_directions() {
        let sigma = [10.0, 6.0, 3.0, 1.0, 0.5, 0.25, 0.1, 0.05];
        let (delta, u, v) = known_spectrum(60, 40, &sigma, 1);
        let (a, b) = low_rank(&delta, 3, &mut Rng::new(7)).unwrap();
        assert_eq!((a.dims(), b.dims()), (&[3, 40][..], &[60, 3][..]));
        let approx = b.matmul(&a).unwrap();
        // the optimum: the first three terms of the SVD
        let u3 = u.narrow(1, 0, 3).unwrap();
        let v3 = v.narrow(1, 0, 3).unwrap();
        let s3 = Tensor::new(&[10f32, 6.0, 3.0], &Device::Cpu).unwrap();
        let best = u3
            .broadcast_mul(&s3)
            .unwrap()
            .matmul(&v3.t().unwrap())
            .unwrap();
        let err = norm(&(&approx - &best).unwrap()) / norm(&best);
        assert!(err < 1e-4, "{err}");
        // ‖Δ_k‖ = ‖A‖ (B orthonormal), and the residual is the dropped spectrum
        let kept = (10.0f64 * 10.0 + 36.0 + 9.0).sqrt();
        assert!((norm(&a) - kept).abs() < 1e-4 * kept, "{}", norm(&a));
        let dropped: f64 = sigma[3..].iter().map(|s| s * s).sum::<f64>().sqrt();
        let resid = norm(&(&delta - &approx).unwrap());
        assert!(
            (resid - dropped).abs() < 1e-3 * dropped + 1e-5,
            "{resid} vs {dropped}"
        );
        let btb = b.t().unwrap().matmul(&b).unwrap();
        let eye = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
        assert!(norm(&(&btb - &eye).unwrap()) < 1e-5);
    }

    #[test]
    fn an_exactly_low_rank_change_is_kept_whole_and_bad_ranks_are_refused() {
        let (delta, _, _) = known_spectrum(30, 50, &[4.0, 2.0], 3);
        let (a, b) = low_rank(&delta, 2, &mut Rng::new(0)).unwrap();
        let err = norm(&(&b.matmul(&a).unwrap() - &delta).unwrap()) / norm(&delta);
        assert!(err < 1e-5, "{err}");
        // rank above the true rank: the spare direction carries nothing
        let (a4, b4) = low_rank(&delta, 4, &mut Rng::new(0)).unwrap();
        let err = norm(&(&b4.matmul(&a4).unwrap() - &delta).unwrap()) / norm(&delta);
        assert!(err < 1e-5, "{err}");
        for bad in [0, 30, 31] {
            assert!(low_rank(&delta, bad, &mut Rng::new(0)).is_err(), "{bad}");
        }
        let nan = (&delta * f64::NAN).unwrap();
        let e = low_rank(&nan, 2, &mut Rng::new(0)).unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
    }

    #[test]
    fn jacobi_diagonalises_a_symmetric_matrix() {
        // eigenvalues of [[2, 1], [1, 2]] are 1 and 3
        let (vals, vecs) = symmetric_eigen(vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        let mut sorted = vals.clone();
        sorted.sort_by(f64::total_cmp);
        assert!((sorted[0] - 1.0).abs() < 1e-12 && (sorted[1] - 3.0).abs() < 1e-12);
        for (i, &lambda) in vals.iter().enumerate() {
            let x = [vecs[0][i], vecs[1][i]];
            let ax = [2.0 * x[0] + x[1], x[0] + 2.0 * x[1]];
            assert!((ax[0] - lambda * x[0]).abs() < 1e-12 && (ax[1] - lambda * x[1]).abs() < 1e-12);
        }
    }
}
