//! RMSNorm against transformers' own modules (tests/fixtures/hf/rms-norm, from
//! scripts/fixtures/rms-norm.py): LlamaRMSNorm rounds x·rsqrt(mean x² + ε) to the model dtype
//! before multiplying by the weight; Gemma2RMSNorm multiplies by 1 + w in f32 and rounds once.
//! Checked forward and through autograd, in f32, bf16 and f16, with weights that are not ones.
mod common;
use candle_core::{Tensor, Var};
use common::*;
use unlearn::model::ops;

const EPS: f64 = 1e-6;

/// (elements not bit-equal, largest |difference| relative to the largest |reference|)
fn compare(got: &Tensor, want: &Tensor) -> (usize, f32) {
    assert_eq!(got.dims(), want.dims());
    assert_eq!(got.dtype(), want.dtype());
    let (g, w) = (to_f32_vec(got), to_f32_vec(want));
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let differ = g.iter().zip(&w).filter(|(a, b)| a != b).count();
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (differ, worst / scale)
}

/// The fixture's widths: under a warp, several warps, past one 256-thread pass, a model's.
pub const WIDTHS: [usize; 4] = [7, 96, 1000, 4096];

#[test]
fn rms_norm_matches_transformers_in_every_dtype_forward_and_backward() {
    let r = reference("rms-norm");
    for d in WIDTHS {
        for dtype in ["f32", "bf16", "f16"] {
            let key = format!("d{d}_{dtype}");
            for (family, weight, plus_one) in
                [("llama", "w", false), ("gemma2", "w_plus_one", true)]
            {
                let x = Var::from_tensor(&r[&format!("x_{key}")]).unwrap();
                let w = &r[&format!("{weight}_{key}")];
                let y = ops::rms_norm_fused(x.as_tensor(), w, EPS, plus_one).unwrap();
                let g = &r[&format!("g_{key}")];
                let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).unwrap();
                let (y_differ, y_err) = compare(&y, &r[&format!("{family}_y_{key}")]);
                let (dx_differ, dx_err) = compare(dx, &r[&format!("{family}_dx_{key}")]);
                let what = format!("{family} {key}");
                if dtype == "f32" {
                    // torch's rsqrt and summation order: an ulp or two
                    assert!(
                        y_err <= 1e-6 && dx_err <= 1e-6,
                        "{what}: {y_err:e} / {dx_err:e}"
                    );
                } else {
                    // the same roundings as transformers: bit for bit but where an f32 sum in
                    // another order moves an element across a rounding boundary (1 of 3000
                    // outputs at d = 1000 in f16); a rounding in the wrong place moves a quarter
                    let n = dx.elem_count();
                    assert!(
                        y_differ * 100 <= n && y_err <= 1e-3,
                        "{what}: {y_differ} of {n} outputs ({y_err:e})"
                    );
                    assert!(
                        dx_differ * 100 <= n && dx_err <= 1e-3,
                        "{what}: {dx_differ} of {n} gradients ({dx_err:e})"
                    );
                }
            }
        }
    }
}
