//! The influence step of attribution-estimated unlearning targets (algorithms.md §4.2): the
//! parameter change that removing the forget set F would cause,
//!
//!   δ = (C + λI)⁻¹ · g_F,   g_F = Σ_{z∈F} ∇ℓ(z; θ0),
//!
//! with C the curvature of the *retain* training loss (the loss the retrained model minimises).
//! For a quadratic loss this is exact: at the full-data optimum ∇L_R(θ0) = −g_F, so one Newton
//! step on L_R from θ0 lands on the retrained optimum θ0 + H_R⁻¹·g_F. δ raises the forget loss.
//!
//! C is given as rows v_i (C = weight · Σ_i v_i v_iᵀ): per-example gradients (empirical Fisher),
//! gradients of labels sampled from the model (Fisher), or output Jacobian rows (Gauss-Newton),
//! and is never formed: [`Estimator::Cg`] solves with conjugate gradients using two passes over
//! the rows per iteration. Pure `f64` arithmetic on slices, no model code.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How (C + λI)⁻¹ is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// the full curvature C, solved matrix-free by conjugate gradients
    Cg,
    /// diag(C) only: δ_j = g_j / (C_jj + λ) (cheaper, ignores parameter interactions)
    Diagonal,
    /// no curvature: δ = g / λ (plain gradient similarity, TracIn-like)
    Identity,
    /// no influence step: the simulated oracle (the target fine-tuned on the retain data alone,
    /// `[simulate]`), see [`super::simulated`]
    Simulated,
}

impl Estimator {
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Cg => "cg",
            Estimator::Diagonal => "diagonal",
            Estimator::Identity => "identity",
            Estimator::Simulated => "simulated",
        }
    }
}

/// The curvature C = weight · Σ_i v_i v_iᵀ, rows stored in f32 (they are gradients).
pub struct Curvature {
    pub dim: usize,
    pub rows: Vec<Vec<f32>>,
    /// e.g. n_train / n_sampled, so that C estimates the curvature of the whole training sum
    pub weight: f64,
}

impl Curvature {
    pub fn new(dim: usize, rows: Vec<Vec<f32>>, weight: f64) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidArgument(
                "curvature: no per-example vectors".into(),
            ));
        }
        if let Some(bad) = rows.iter().position(|r| r.len() != dim) {
            return Err(Error::InvalidArgument(format!(
                "curvature: vector {bad} has {} entries, expected {dim}",
                rows[bad].len()
            )));
        }
        if rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(
                "curvature: a per-example gradient is not finite".into(),
            ));
        }
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(Error::InvalidArgument(
                "curvature: weight must be > 0".into(),
            ));
        }
        Ok(Curvature { dim, rows, weight })
    }

    /// C·x
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.dim];
        for row in &self.rows {
            let dot: f64 = row.iter().zip(x).map(|(&r, &v)| r as f64 * v).sum();
            let c = self.weight * dot;
            for (o, &r) in out.iter_mut().zip(row) {
                *o += c * r as f64;
            }
        }
        out
    }

    /// diag(C)
    pub fn diagonal(&self) -> Vec<f64> {
        let mut d = vec![0.0; self.dim];
        for row in &self.rows {
            for (o, &r) in d.iter_mut().zip(row) {
                *o += self.weight * (r as f64) * (r as f64);
            }
        }
        d
    }

    /// trace(C) / dim: the mean eigenvalue, the unit of the relative damping
    pub fn mean_eigenvalue(&self) -> f64 {
        self.diagonal().iter().sum::<f64>() / self.dim as f64
    }
}

/// What a conjugate-gradient solve did.
#[derive(Debug, Clone, Serialize)]
pub struct SolveInfo {
    pub iterations: usize,
    /// ‖(C + λI)δ − g‖ / ‖g‖ at the end
    pub relative_residual: f64,
}

/// δ = (C + λI)⁻¹ g with the chosen estimator; `damping` is the absolute λ (> 0).
pub fn influence_step(
    curvature: &Curvature,
    g: &[f64],
    damping: f64,
    estimator: Estimator,
    max_iters: usize,
    tol: f64,
) -> Result<(Vec<f64>, SolveInfo)> {
    if g.len() != curvature.dim {
        return Err(Error::InvalidArgument(format!(
            "influence step: gradient has {} entries, curvature {}",
            g.len(),
            curvature.dim
        )));
    }
    if !(damping > 0.0 && damping.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "influence step: damping must be > 0, got {damping}"
        )));
    }
    if g.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(
            "influence step: the forget gradient is not finite".into(),
        ));
    }
    let exact = |delta: Vec<f64>| {
        let info = SolveInfo {
            iterations: 0,
            relative_residual: 0.0,
        };
        Ok((delta, info))
    };
    match estimator {
        Estimator::Identity => exact(g.iter().map(|v| v / damping).collect()),
        Estimator::Diagonal => {
            let d = curvature.diagonal();
            exact(g.iter().zip(&d).map(|(v, c)| v / (c + damping)).collect())
        }
        Estimator::Cg => conjugate_gradient(
            |x| {
                let mut y = curvature.apply(x);
                for (yi, xi) in y.iter_mut().zip(x) {
                    *yi += damping * xi;
                }
                y
            },
            g,
            max_iters,
            tol,
        ),
        Estimator::Simulated => Err(Error::InvalidArgument(
            "the simulated estimator takes no influence step".into(),
        )),
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solve A x = b for a symmetric positive definite A given as a product, from x = 0, until
/// ‖r‖ ≤ tol·‖b‖ or `max_iters`.
pub fn conjugate_gradient(
    apply: impl Fn(&[f64]) -> Vec<f64>,
    b: &[f64],
    max_iters: usize,
    tol: f64,
) -> Result<(Vec<f64>, SolveInfo)> {
    let n = b.len();
    let b_norm = dot(b, b).sqrt();
    let mut x = vec![0.0; n];
    if b_norm == 0.0 {
        let info = SolveInfo {
            iterations: 0,
            relative_residual: 0.0,
        };
        return Ok((x, info));
    }
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    let mut iterations = 0;
    while iterations < max_iters && rr.sqrt() > tol * b_norm {
        let ap = apply(&p);
        let pap = dot(&p, &ap);
        if pap.is_nan() || pap <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "conjugate gradient: the system is not positive definite (pᵀAp = {pap})"
            )));
        }
        let alpha = rr / pap;
        for i in 0..n {
            x[i] += alpha * p[i];
            r[i] -= alpha * ap[i];
        }
        let rr_new = dot(&r, &r);
        let beta = rr_new / rr;
        for i in 0..n {
            p[i] = r[i] + beta * p[i];
        }
        rr = rr_new;
        iterations += 1;
    }
    let info = SolveInfo {
        iterations,
        relative_residual: rr.sqrt() / b_norm,
    };
    Ok((x, info))
}

/// The top-`r` right singular vectors of the row-major matrix `g` ([rows, cols]) as the rows of
/// an [r, cols] matrix (orthonormal), by subspace iteration on gᵀg from a seeded start. Used to
/// pick the LoRA `A` of the influence subspace: the input directions the forget gradient uses
/// most, so that ∇_B = g·Aᵀ keeps the largest part of the full gradient.
pub fn top_right_singular_vectors(
    g: &[f64],
    rows: usize,
    cols: usize,
    r: usize,
    seed: u64,
) -> Result<Vec<Vec<f64>>> {
    if g.len() != rows * cols || r == 0 || r > cols {
        return Err(Error::InvalidArgument(format!(
            "singular vectors: need a {rows}×{cols} matrix and 1 ≤ r ≤ {cols}, got {} entries, r = {r}",
            g.len()
        )));
    }
    // gᵀg, [cols, cols]
    let mut gram = vec![0.0; cols * cols];
    for row in g.chunks(cols) {
        for i in 0..cols {
            if row[i] == 0.0 {
                continue;
            }
            let gi = row[i];
            let out = &mut gram[i * cols..(i + 1) * cols];
            for (o, &gj) in out.iter_mut().zip(row) {
                *o += gi * gj;
            }
        }
    }
    let mut rng = crate::rng::Rng::new(seed);
    let mut q: Vec<Vec<f64>> = (0..r)
        .map(|_| (0..cols).map(|_| rng.normal()).collect())
        .collect();
    orthonormalise(&mut q);
    for _ in 0..100 {
        let mut next: Vec<Vec<f64>> = q
            .iter()
            .map(|v| {
                (0..cols)
                    .map(|i| dot(&gram[i * cols..(i + 1) * cols], v))
                    .collect()
            })
            .collect();
        orthonormalise(&mut next);
        let change: f64 = next
            .iter()
            .zip(&q)
            .map(|(a, b)| 1.0 - dot(a, b).abs())
            .fold(0.0, f64::max);
        q = next;
        if change < 1e-10 {
            break;
        }
    }
    // order by Rayleigh quotient, largest first
    let mut scored: Vec<(f64, Vec<f64>)> = q
        .into_iter()
        .map(|v| {
            let gv: Vec<f64> = (0..cols)
                .map(|i| dot(&gram[i * cols..(i + 1) * cols], &v))
                .collect();
            (dot(&v, &gv), v)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(scored.into_iter().map(|(_, v)| v).collect())
}

/// Modified Gram-Schmidt; a vector that collapses (rank-deficient input) is replaced by a
/// deterministic unit vector orthogonal to the others.
fn orthonormalise(vs: &mut [Vec<f64>]) {
    let n = vs.first().map_or(0, |v| v.len());
    for i in 0..vs.len() {
        for attempt in 0..=n {
            for j in 0..i {
                let (head, tail) = vs.split_at_mut(i);
                let d = dot(&head[j], &tail[0]);
                for (x, y) in tail[0].iter_mut().zip(&head[j]) {
                    *x -= d * y;
                }
            }
            let norm = dot(&vs[i], &vs[i]).sqrt();
            if norm > 1e-12 {
                vs[i].iter_mut().for_each(|x| *x /= norm);
                break;
            }
            // collapsed: try the next basis vector
            vs[i] = (0..n)
                .map(|k| if k == attempt % n { 1.0 } else { 0.0 })
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Solve a small dense SPD system by Gaussian elimination (the test's exact reference).
    fn solve_dense(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
        let n = b.len();
        for c in 0..n {
            let p = (c..n)
                .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
                .unwrap();
            a.swap(c, p);
            b.swap(c, p);
            for r in c + 1..n {
                let f = a[r][c] / a[c][c];
                let pivot = a[c].clone();
                for (x, p) in a[r][c..].iter_mut().zip(&pivot[c..]) {
                    *x -= f * p;
                }
                b[r] -= f * b[c];
            }
        }
        let mut x = vec![0.0; n];
        for r in (0..n).rev() {
            let s: f64 = (r + 1..n).map(|k| a[r][k] * x[k]).sum();
            x[r] = (b[r] - s) / a[r][r];
        }
        x
    }

    /// Ridge regression θ = argmin ½Σ(x·θ − y)² + ½λ|θ|² over the given rows.
    fn ridge(xs: &[Vec<f64>], ys: &[f64], lambda: f64) -> Vec<f64> {
        let d = xs[0].len();
        let mut a = vec![vec![0.0; d]; d];
        let mut b = vec![0.0; d];
        for (x, y) in xs.iter().zip(ys) {
            for i in 0..d {
                b[i] += x[i] * y;
                for j in 0..d {
                    a[i][j] += x[i] * x[j];
                }
            }
        }
        for (i, row) in a.iter_mut().enumerate() {
            row[i] += lambda;
        }
        solve_dense(a, b)
    }

    fn data(n: usize, d: usize, seed: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
        let mut rng = crate::rng::Rng::new(seed);
        let xs: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..d).map(|_| rng.normal()).collect())
            .collect();
        let ys = xs
            .iter()
            .map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, v)| v * (i as f64 - 2.0))
                    .sum::<f64>()
                    + rng.normal()
            })
            .collect();
        (xs, ys)
    }

    /// A linear model with squared loss: the influence step with the retain Gauss-Newton rows
    /// (the inputs) and the ridge λ as damping lands exactly on the model retrained without F.
    #[test]
    fn influence_step_equals_retraining_for_ridge_regression() {
        let (d, lambda) = (6, 0.5);
        let (xs, ys) = data(40, d, 3);
        let (forget_x, retain_x) = xs.split_at(7);
        let (forget_y, retain_y) = ys.split_at(7);
        let theta0 = ridge(&xs, &ys, lambda);
        let retrained = ridge(retain_x, retain_y, lambda);
        // g_F = Σ_F x (x·θ0 − y)
        let mut g = vec![0.0; d];
        for (x, y) in forget_x.iter().zip(forget_y) {
            let res = dot(x, &theta0) - y;
            for i in 0..d {
                g[i] += x[i] * res;
            }
        }
        let rows = retain_x
            .iter()
            .map(|x| x.iter().map(|&v| v as f32).collect())
            .collect();
        let curv = Curvature::new(d, rows, 1.0).unwrap();
        // the rows are f32: compare the step with the f32 rows' exact retrained solution
        let retain_x32: Vec<Vec<f64>> = retain_x
            .iter()
            .map(|x| x.iter().map(|&v| v as f32 as f64).collect())
            .collect();
        let mut h = vec![vec![0.0; d]; d];
        for x in &retain_x32 {
            for i in 0..d {
                for j in 0..d {
                    h[i][j] += x[i] * x[j];
                }
            }
        }
        for (i, row) in h.iter_mut().enumerate() {
            row[i] += lambda;
        }
        let newton = solve_dense(h, g.clone());
        let (delta, info) = influence_step(&curv, &g, lambda, Estimator::Cg, 100, 1e-12).unwrap();
        assert!(info.relative_residual < 1e-10, "{info:?}");
        for i in 0..d {
            assert!(
                (delta[i] - newton[i]).abs() < 1e-9,
                "{i}: {} vs {}",
                delta[i],
                newton[i]
            );
        }
        // and, up to the f32 rounding of the rows, θ0 + δ is the retrained model
        for i in 0..d {
            let predicted = theta0[i] + delta[i];
            assert!(
                (predicted - retrained[i]).abs() < 1e-5,
                "{i}: {predicted} vs {}",
                retrained[i]
            );
        }
        // the step moves away from the forget data: the forget loss rises
        let forget_loss = |t: &[f64]| -> f64 {
            forget_x
                .iter()
                .zip(forget_y)
                .map(|(x, y)| (dot(x, t) - y).powi(2))
                .sum()
        };
        let moved: Vec<f64> = theta0.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert!(forget_loss(&moved) > forget_loss(&theta0));
    }

    #[test]
    fn diagonal_and_identity_estimators_match_their_formulas() {
        let rows = vec![vec![1.0f32, 2.0, 0.0], vec![0.0, 1.0, 3.0]];
        let curv = Curvature::new(3, rows, 2.0).unwrap();
        // diag(C) = 2·(1, 5, 9)
        assert_eq!(curv.diagonal(), vec![2.0, 10.0, 18.0]);
        assert!((curv.mean_eigenvalue() - 10.0).abs() < 1e-12);
        let g = [1.0, 1.0, 1.0];
        let (d, _) = influence_step(&curv, &g, 1.0, Estimator::Diagonal, 0, 0.0).unwrap();
        assert_eq!(d, vec![1.0 / 3.0, 1.0 / 11.0, 1.0 / 19.0]);
        let (i, _) = influence_step(&curv, &g, 4.0, Estimator::Identity, 0, 0.0).unwrap();
        assert_eq!(i, vec![0.25; 3]);
        // C·x = 2·Σ v (v·x)
        assert_eq!(curv.apply(&[1.0, 0.0, 0.0]), vec![2.0, 4.0, 0.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(Curvature::new(2, vec![], 1.0).is_err());
        assert!(Curvature::new(2, vec![vec![1.0]], 1.0).is_err());
        assert!(Curvature::new(1, vec![vec![f32::NAN]], 1.0).is_err());
        let c = Curvature::new(1, vec![vec![1.0]], 1.0).unwrap();
        assert!(influence_step(&c, &[1.0, 2.0], 1.0, Estimator::Cg, 10, 1e-9).is_err());
        assert!(influence_step(&c, &[1.0], 0.0, Estimator::Cg, 10, 1e-9).is_err());
        assert!(influence_step(&c, &[f64::NAN], 1.0, Estimator::Cg, 10, 1e-9).is_err());
    }

    #[test]
    fn singular_vectors_of_a_known_matrix() {
        // g = 3·u1 v1ᵀ + 1·u2 v2ᵀ with orthonormal v1 = (1,1,0,0)/√2, v2 = (0,0,1,−1)/√2
        let s = 1.0 / 2f64.sqrt();
        let v1 = [s, s, 0.0, 0.0];
        let v2 = [0.0, 0.0, s, -s];
        let u1 = [1.0, 0.0, 0.0];
        let u2 = [0.0, 0.6, 0.8];
        let mut g = vec![0.0; 12];
        for i in 0..3 {
            for j in 0..4 {
                g[i * 4 + j] = 3.0 * u1[i] * v1[j] + u2[i] * v2[j];
            }
        }
        let vs = top_right_singular_vectors(&g, 3, 4, 2, 7).unwrap();
        assert!((dot(&vs[0], &v1).abs() - 1.0).abs() < 1e-9, "{:?}", vs[0]);
        assert!((dot(&vs[1], &v2).abs() - 1.0).abs() < 1e-9, "{:?}", vs[1]);
        // rank 1 matrix asked for 2 directions: still an orthonormal pair
        let rank1: Vec<f64> = (0..12).map(|k| u1[k / 4] * v1[k % 4]).collect();
        let vs = top_right_singular_vectors(&rank1, 3, 4, 2, 7).unwrap();
        assert!((dot(&vs[0], &vs[0]) - 1.0).abs() < 1e-9);
        assert!(dot(&vs[0], &vs[1]).abs() < 1e-9);
        assert!((dot(&vs[0], &v1).abs() - 1.0).abs() < 1e-9);
    }
}
