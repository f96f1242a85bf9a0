#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use unlearn::model::weights::WeightStore;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// Every tensor of a fixture's reference.safetensors, in its stored dtype.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(name).join("reference.safetensors");
    let store = WeightStore::open_files(std::slice::from_ref(&path), path.clone())
        .expect("reference.safetensors");
    store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.tensor_raw(&n).expect("tensor");
            (n, t)
        })
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

pub fn cpu() -> Device {
    Device::Cpu
}
