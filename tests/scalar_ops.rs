//! A tensor times or divided by a scalar, against PyTorch (tests/fixtures/hf/scalar-ops, from
//! scripts/fixtures/scalar-ops.py): the attention scale 1/√d and Gemma 2's soft caps. PyTorch
//! computes a half-precision tensor and a Python float in f32 and rounds once; candle's scalar
//! ops round the scalar to the tensor's dtype first (and divide by multiplying by 1/s).
mod common;
use candle_core::{DType, Tensor};
use common::*;
use unlearn::model::ops;

/// How many elements of `got` differ from `want` (both compared as f32).
fn differing(got: &Tensor, want: &Tensor) -> usize {
    assert_eq!(got.dtype(), want.dtype());
    let v = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().to_vec1().unwrap() };
    v(got)
        .iter()
        .zip(v(want))
        .filter(|(a, b)| **a != *b)
        .count()
}

#[test]
fn scalar_products_and_quotients_round_as_pytorch() {
    let r = reference("scalar-ops");
    for dtype in ["f32", "bf16", "f16"] {
        let x = &r[&format!("x_{dtype}")];
        for d in [64, 80, 128] {
            let scale = 1.0 / (d as f64).sqrt();
            let want = &r[&format!("mul_{d}_{dtype}")];
            let got = ops::mul_scalar(x, scale).unwrap();
            assert_eq!(differing(&got, want), 0, "{dtype} × 1/√{d}");
            if dtype == "bf16" && d != 64 {
                // candle's own product rounds the scale to bf16 first: 43 (1/√80) and 108
                // (1/√128) of the 4096 products come out one ulp off PyTorch's
                let candle = (x * scale).unwrap();
                assert!(differing(&candle, want) > 20, "{dtype} × 1/√{d}: candle");
            }
        }
        for cap in [50, 30] {
            let want = &r[&format!("div_{cap}_{dtype}")];
            let got = ops::div_scalar(x, cap as f64).unwrap();
            assert_eq!(differing(&got, want), 0, "{dtype} / {cap}");
        }
    }
}
