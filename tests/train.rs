//! `unlearn train`: full-parameter gradients, training from a random init, bit-exact resume,
//! LoRA training with a merged output, and recipe errors.
mod common;

use candle_core::{DType, Tensor};
use common::{cpu, fixture, reference, unlearn_data};
use std::path::{Path, PathBuf};
use unlearn::model::config::ArchConfig;
use unlearn::model::ops::causal_lm_loss;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};
use unlearn::recipe::TrainRecipe;
use unlearn::train::supervised::train;
use unlearn::train::trainer::RunOptions;

fn loss_f64(model: &Decoder, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    causal_lm_loss(&logits, &r["labels"]).unwrap()
}

fn to_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Every base tensor of the model gets a gradient, and the largest entry of each equals a
/// central finite difference of the loss (f64). Covers embeddings, tied heads, RMS norms (also
/// Gemma's 1+w and Qwen 3's q/k norms), layer norms with bias, fused QKV and soft-capping.
#[test]
fn full_parameter_gradients_match_finite_differences() {
    for name in ["llama", "gemma2", "qwen3", "gpt_neox"] {
        let dir = fixture(name);
        let cfg = ArchConfig::from_file(&dir.join("config.json")).unwrap();
        let (model, params) =
            Decoder::trainable(cfg, Some(&dir), (0, 0.02), DType::F64, &cpu()).unwrap();
        assert!(!params.is_empty());
        let counted: usize = {
            let mut seen = std::collections::HashSet::new();
            params
                .iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        assert_eq!(
            counted,
            model.num_parameters(),
            "{name}: every weight is trainable"
        );
        let r = reference(name);
        // the Var-backed model computes the reference loss (stock matmul path, f64)
        let loss = loss_f64(&model, &r);
        let expected = common::scalar(&r["loss"]) as f64;
        let tol = 1e-4;
        assert!(
            (to_f64(&loss) - expected).abs() < tol,
            "{name}: loss {} vs transformers {expected}",
            to_f64(&loss)
        );
        // the gradients a method hands the optimizer are detached from the forward graph (else
        // the moments chain every step's graph together: memory grew ~37 MB per step)
        let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
        for g in unlearn::methods::grads_of(&loss, &vars).unwrap() {
            assert!(
                !g.track_op(),
                "{name}: gradient still attached to the graph"
            );
        }
        let grads = loss.backward().unwrap();
        for (pname, var) in &params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let idx = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap()
                .0;
            assert!(g[idx] != 0.0, "{name}: {pname} has an all-zero gradient");
            let h = 1e-5;
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, orig.dims(), &cpu()).unwrap())
                    .unwrap();
                to_f64(&loss_f64(&model, &r))
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&orig).unwrap();
            let rel = (fd - g[idx]).abs() / g[idx].abs().max(1e-6);
            assert!(
                rel < 1e-4,
                "{name}: {pname}[{idx}] analytic {} vs finite difference {fd}",
                g[idx]
            );
        }
    }
}

fn write_train_recipe(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("train.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn random_init_recipe(out: &Path, steps: usize) -> String {
    format!(
        r#"
[model]
config = "{cfg}"
tokenizer = "{tok}"
init_std = 0.02
[data]
train = ["{f}", "{r}"]
max_length = 64
[train]
seed = 5
steps = {steps}
batch_size = 4
lr = 3e-3
schedule = "cosine"
warmup_steps = 2
checkpoint_every = 10
[output]
dir = "{out}"
"#,
        cfg = fixture("llama").join("config.json").display(),
        tok = fixture("llama").display(),
        f = unlearn_data("forget.jsonl").display(),
        r = unlearn_data("retain.jsonl").display(),
        out = out.display(),
    )
}

fn metric_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn trains_from_random_weights_and_resumes_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let recipe_path = write_train_recipe(tmp.path(), &random_init_recipe(&out, 30));
    let recipe = TrainRecipe::load(&recipe_path, &[]).unwrap();
    let summary = train(&recipe, &RunOptions::default()).unwrap();
    assert_eq!(summary.steps, 30);
    let losses = metric_losses(&out);
    assert_eq!(losses.len(), 30);
    // N(0, 0.02²) weights predict a near-uniform distribution: the first loss is ≈ ln(vocab)
    let uniform = (320f64).ln();
    assert!(
        (losses[0] - uniform).abs() < 0.05,
        "first loss {} vs ln 320 = {uniform}",
        losses[0]
    );
    assert!(
        losses[29] < 0.6 * losses[0],
        "loss {} → {}",
        losses[0],
        losses[29]
    );

    // the trained model is an ordinary checkpoint directory
    let model_dir = out.join("model");
    let model = Decoder::load(&model_dir, DType::F32, &cpu()).unwrap();
    let tok = unlearn::tokenizer::ChatTokenizer::from_dir(&model_dir).unwrap();
    assert_eq!(model.cfg.vocab_size, 320);
    assert!(tok.eos_token_id().is_some());
    let trained = std::fs::read(model_dir.join("model.safetensors")).unwrap();

    // resuming from the step-10 checkpoint reproduces the straight run byte for byte
    let opts = RunOptions {
        resume: Some(out.join("checkpoints").join("step-000010")),
        ..RunOptions::default()
    };
    train(&recipe, &opts).unwrap();
    assert_eq!(
        std::fs::read(model_dir.join("model.safetensors")).unwrap(),
        trained,
        "resumed run differs from the straight run"
    );
    assert_eq!(metric_losses(&out), losses);

    // the same seed twice gives the same model; another seed another init
    let out2 = tmp.path().join("run2");
    let p2 = write_train_recipe(tmp.path(), &random_init_recipe(&out2, 30));
    let r2 = TrainRecipe::load(&p2, &["train.seed=6".into()]).unwrap();
    train(&r2, &RunOptions::default()).unwrap();
    assert_ne!(
        std::fs::read(out2.join("model/model.safetensors")).unwrap(),
        trained
    );
}

#[test]
fn lora_training_writes_a_merged_model_that_fits_better() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let body = format!(
        r#"
[model]
path = "{base}"
[lora]
r = 4
alpha = 8
[data]
train = ["{f}"]
max_length = 64
[train]
steps = 15
batch_size = 2
lr = 1e-2
[output]
dir = "{out}"
model = "{model}"
"#,
        base = fixture("llama").display(),
        f = unlearn_data("forget.jsonl").display(),
        out = out.display(),
        model = tmp.path().join("merged").display(),
    );
    let recipe = TrainRecipe::load(&write_train_recipe(tmp.path(), &body), &[]).unwrap();
    train(&recipe, &RunOptions::default()).unwrap();
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let score = |dir: &Path| -> f64 {
        let model = Decoder::load(dir, DType::F32, &cpu()).unwrap();
        let tok = unlearn::tokenizer::ChatTokenizer::from_dir(dir).unwrap();
        let ex = unlearn::data::read_examples(&unlearn_data("forget.jsonl")).unwrap();
        let enc: Vec<_> = ex
            .iter()
            .map(|e| match e {
                unlearn::data::Example::Qa { question, answer } => {
                    tok.encode_qa(question, answer, None).unwrap()
                }
                unlearn::data::Example::Text { text } => tok.encode_text(text, None).unwrap(),
            })
            .collect();
        let refs: Vec<_> = enc.iter().collect();
        let b = unlearn::score::collate(&refs, 0, &cpu()).unwrap();
        let logits = model
            .forward(
                &ModelInput::new(&b.input_ids, Some(&b.attention_mask)),
                &ForwardOptions::default(),
            )
            .unwrap();
        to_f64(&causal_lm_loss(&logits, &b.labels).unwrap())
    };
    let before = score(&fixture("llama"));
    let after = score(&tmp.path().join("merged"));
    assert!(after < before - 0.5, "forget NLL {before} → {after}");
}

#[test]
fn bad_train_recipes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let base = random_init_recipe(&out, 2);
    let err = |body: &str, sets: &[&str]| -> String {
        let p = write_train_recipe(tmp.path(), body);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match TrainRecipe::load(&p, &sets) {
            Err(e) => e.to_string(),
            Ok(r) => train(&r, &RunOptions::default())
                .map(|_| ())
                .expect_err("must fail")
                .to_string(),
        }
    };
    let e = err(
        &base,
        &[&format!("model.path=\"{}\"", fixture("llama").display())],
    );
    assert!(e.contains("not both") && e.contains("train.toml"), "{e}");
    let e = err(&base.replace("tokenizer = ", "# "), &[]);
    assert!(e.contains("model.tokenizer"), "{e}");
    let e = err(&base, &["data.train=[]"]);
    assert!(e.contains("data.train"), "{e}");
    let e = err(&base, &["train.epoch=3"]);
    assert!(e.contains("epoch"), "{e}");
    // a config whose vocabulary is smaller than the tokenizer's
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("llama").join("config.json")).unwrap())
            .unwrap();
    let mut small = cfg.clone();
    small["vocab_size"] = serde_json::json!(100);
    let small_path = tmp.path().join("small.json");
    std::fs::write(&small_path, small.to_string()).unwrap();
    let e = err(
        &base,
        &[&format!("model.config=\"{}\"", small_path.display())],
    );
    assert!(
        e.contains("vocab_size is 100") && e.contains("small.json"),
        "{e}"
    );
    // GPT-2 keeps a transposed copy of its Conv1D weights: full training is refused
    let e = err(
        &base
            .replace("config = ", "# config = ")
            .replace("tokenizer = ", "# tokenizer = "),
        &[&format!("model.path=\"{}\"", fixture("gpt2").display())],
    );
    assert!(e.contains("GPT-2") && e.contains("[lora]"), "{e}");
    // an empty data file names the file
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = err(&base, &[&format!("data.train=[\"{}\"]", empty.display())]);
    assert!(e.contains("empty.jsonl"), "{e}");
    assert!(
        !out.join("model").exists(),
        "no model is written by a failed run"
    );
}
