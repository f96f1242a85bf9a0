#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// Every element of `t` as f32, in row-major order.
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
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

/// The small forget/retain QA files of the engine tests.
pub fn unlearn_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unlearn")
        .join(name)
}

pub fn write_recipe(dir: &Path, method: &str, extra_method: &str, train: &str) -> PathBuf {
    write_recipe_with(dir, method, extra_method, train, "")
}

/// A tiny recipe on the llama fixture and the unlearn fixture data; `extra_tables` (e.g. an
/// `[eval]` table) goes before `[output]`.
pub fn write_recipe_with(
    dir: &Path,
    method: &str,
    extra_method: &str,
    train: &str,
    extra_tables: &str,
) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
[lora]
r = 4
alpha = 8
target_modules = "all-linear"
[data]
forget = "{forget}"
retain = "{retain}"
max_length = 64
[method]
name = "{method}"
{extra_method}
[train]
seed = 11
batch_size = 2
{lr_line}
{train}
{extra_tables}
[output]
dir = "{out}"
"#,
        model = fixture("llama").display(),
        forget = unlearn_data("forget.jsonl").display(),
        retain = unlearn_data("retain.jsonl").display(),
        out = dir.join("out").display(),
        lr_line = if train.contains("lr =") {
            ""
        } else {
            "lr = 5e-3"
        },
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}
