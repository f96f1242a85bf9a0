//! LoRA in PEFT format: loading, logits, gradients against PEFT, round trips, init.
mod common;
use candle_core::{DType, Tensor};
use common::*;
use unlearn::lora::{
    attach_lora, load_adapter, lora_vars, save_adapter, LoraConfig, TargetModules,
};
use unlearn::model::ops::causal_lm_loss;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};
use unlearn::rng::Rng;

fn adapted(base: &str) -> Decoder {
    let mut model = Decoder::load(&fixture(base), DType::F32, &cpu()).unwrap();
    load_adapter(&mut model, &fixture(&format!("{base}-lora"))).unwrap();
    model
}

fn check_logits_loss_grads(base: &str) {
    let model = adapted(base);
    let r = reference(&format!("{base}-lora"));
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    let diff = max_abs_diff(&logits, &r["logits"]);
    assert!(diff <= 1e-4, "{base}-lora logits diff {diff}");
    let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
    let l = scalar(&loss);
    assert!(
        (l - scalar(&r["loss"])).abs() <= 1e-5,
        "loss {l} vs {}",
        scalar(&r["loss"])
    );

    let grads = loss.backward().unwrap();
    let vars = lora_vars(&model);
    assert_eq!(vars.len(), 28, "2 layers × 7 modules × (A, B)");
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let ref_name = format!("grad.{}", name.replace(".weight", ".default.weight"));
        let expected = &r[&ref_name];
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(g, expected);
        assert!(scale > 0.0, "{name}: reference gradient is zero");
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient max diff {diff}, reference scale {scale}"
        );
    }

    // Adapter disabled = the base model, exactly.
    let base_logits = model
        .forward(&input, &ForwardOptions::base_model())
        .unwrap();
    let base_ref = reference(base);
    assert!(max_abs_diff(&base_logits, &base_ref["logits"]) <= 1e-4);
}

#[test]
fn llama_adapter_logits_loss_and_gradients_match_peft() {
    check_logits_loss_grads("llama");
}

#[test]
fn qwen2_adapter_logits_loss_and_gradients_match_peft() {
    check_logits_loss_grads("qwen2");
}

#[test]
fn adapter_round_trip_is_identical() {
    let model = adapted("llama");
    let cfg = load_adapter(&mut model.clone(), &fixture("llama-lora")).unwrap();
    assert_eq!(cfg.r, 4);
    assert_eq!(cfg.alpha, 8.0);
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, dir.path(), Some("llama")).unwrap();
    // metadata {"format":"pt"} and PEFT names without ".default"
    let f = unlearn::model::weights::SafetensorsFile::open(
        &dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        f.metadata
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let orig = unlearn::model::weights::SafetensorsFile::open(
        &fixture("llama-lora").join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut a: Vec<_> = f.names().cloned().collect();
    let mut b: Vec<_> = orig.names().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for n in &a {
        assert_eq!(
            f.bytes(n).unwrap(),
            orig.bytes(n).unwrap(),
            "{n} differs after round trip"
        );
    }
    let mut again = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let cfg2 = load_adapter(&mut again, dir.path()).unwrap();
    assert_eq!(cfg, cfg2);
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["task_type"], "CAUSAL_LM");
    assert_eq!(written["base_model_name_or_path"], "llama");
}

#[test]
fn fresh_adapter_is_a_no_op_and_gradient_reaches_b_only() {
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers: None,
    };
    let n = attach_lora(&mut model, &cfg, &mut Rng::new(0)).unwrap();
    assert_eq!(n, 14);
    let r = reference("llama");
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    assert!(
        max_abs_diff(&logits, &r["logits"]) <= 1e-4,
        "B = 0 must leave the model unchanged"
    );
    // PEFT init: A ~ U(±1/√in)
    for (name, v) in lora_vars(&model) {
        let t = v.as_tensor();
        if name.contains("lora_A") {
            let bound = 1.0 / (t.dim(1).unwrap() as f32).sqrt();
            let m = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                m <= bound && m > 0.5 * bound,
                "{name}: max |A| = {m}, bound {bound}"
            );
        }
    }
    let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in lora_vars(&model) {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("gradient cut before {name}"));
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.contains("lora_A") {
            assert_eq!(m, 0.0, "{name}: with B = 0 the gradient of A is exactly 0");
        } else {
            assert!(m > 0.0, "{name}: gradient of B must be non-zero");
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    // Every op on the path must have a correct backward: compare one B entry per module with a
    // central difference of the loss, in f64 for precision.
    let model = Decoder::load(&fixture("gemma2"), DType::F64, &cpu()).unwrap();
    let mut model = model;
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: true,
        dropout: 0.0,
        target_modules: TargetModules::Regex(r".*\.(q_proj|v_proj|down_proj)".into()),
        layers: Some(vec![0]),
    };
    assert_eq!(attach_lora(&mut model, &cfg, &mut Rng::new(1)).unwrap(), 3);
    // make B non-zero so A also gets a gradient
    let mut noise_rng = Rng::new(17);
    for (_, v) in lora_vars(&model) {
        let t = v.as_tensor();
        let n: usize = t.dims().iter().product();
        let vals: Vec<f32> = (0..n).map(|_| (noise_rng.normal() * 0.05) as f32).collect();
        let noise = Tensor::from_vec(vals, t.dims(), &cpu()).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    let r = reference("gemma2");
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let loss_of = |m: &Decoder| -> f64 {
        let logits = m.forward(&input, &ForwardOptions::default()).unwrap();
        causal_lm_loss(&logits, &r["labels"])
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    let grads = causal_lm_loss(&logits, &r["labels"])
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in lora_vars(&model) {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = v.as_tensor().copy().unwrap();
        let flat = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let idx = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        let h = 1e-3f32;
        let mut plus = flat.clone();
        plus[idx] += h;
        v.set(&Tensor::from_vec(plus, orig.dims(), &cpu()).unwrap())
            .unwrap();
        let lp = loss_of(&model);
        let mut minus = flat.clone();
        minus[idx] -= h;
        v.set(&Tensor::from_vec(minus, orig.dims(), &cpu()).unwrap())
            .unwrap();
        let lm = loss_of(&model);
        v.set(&orig).unwrap();
        let fd = (lp - lm) / (2.0 * h as f64);
        let rel = (fd - g[idx]).abs() / g[idx].abs().max(1e-8);
        assert!(
            rel < 1e-4,
            "{name}: analytic {} vs finite difference {fd}",
            g[idx]
        );
    }
}

fn embed_lora_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft/llama-tied-embed-lora")
}

/// Logits on the attended positions only (row-wise mask), flattened.
fn attended(logits: &Tensor, mask: &Tensor) -> Vec<f32> {
    let (b, t, _) = logits.dims3().unwrap();
    let m = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let mut out = Vec::new();
    for (i, row) in m.iter().enumerate().take(b) {
        for (j, &keep) in row.iter().enumerate().take(t) {
            if keep == 1 {
                out.extend(
                    logits
                        .get(i)
                        .unwrap()
                        .get(j)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn embedding_and_tied_head_adapters_match_peft() {
    // PEFT (scripts/fixtures/peft-embedding-lora.py): LoRA on embed_tokens (lora_embedding_A/B),
    // the head tied to it, q_proj and k_proj (GQA: k is 64 → 32); the file also carries PEFT's
    // copies of the embedding and head base weights (save_embedding_layers)
    let mut model = Decoder::load(&fixture("llama-tied"), DType::F32, &cpu()).unwrap();
    let cfg = load_adapter(&mut model, &embed_lora_fixture()).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    assert!(model.embed_lora.is_some() && model.lm_head.lora.is_some());
    let r = unlearn::model::weights::SafetensorsFile::open(
        &embed_lora_fixture().join("reference.safetensors"),
    )
    .unwrap();
    let get = |n: &str| {
        let info = r.info(n).unwrap();
        unlearn::model::weights::bytes_to_tensor(
            info.dtype,
            &info.shape,
            r.bytes(n).unwrap(),
            std::path::Path::new("reference"),
            n,
        )
        .unwrap()
    };
    let (ids, mask, want) = (get("input_ids"), get("attention_mask"), get("logits"));
    let input = ModelInput::new(&ids, Some(&mask));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    let (got, want) = (attended(&logits, &mask), attended(&want, &mask));
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-4, "logits differ from PEFT's by {diff}");
    // the adapter matters: without it the logits are far off
    let plain = model
        .forward(&input, &ForwardOptions::base_model())
        .unwrap();
    let off = attended(&plain, &mask)
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(off > 1.0, "{off}");

    // saved by us (PEFT names, no base weights) and loaded back: the same logits
    let names: Vec<String> = lora_vars(&model).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"base_model.model.model.embed_tokens.lora_embedding_A".to_string()));
    assert!(names.contains(&"base_model.model.lm_head.lora_B.weight".to_string()));
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, dir.path(), Some("llama-tied")).unwrap();
    let mut again = Decoder::load(&fixture("llama-tied"), DType::F32, &cpu()).unwrap();
    load_adapter(&mut again, dir.path()).unwrap();
    let back = again.forward(&input, &ForwardOptions::default()).unwrap();
    assert_eq!(max_abs_diff(&back, &logits), 0.0);

    // a bf16 model holds the same weights rounded: the stored f32 copies still match
    let mut half = Decoder::load(&fixture("llama-tied"), DType::BF16, &cpu()).unwrap();
    load_adapter(&mut half, &embed_lora_fixture()).unwrap();
    // a stored base weight that is not the model's is refused, naming the module
    let mut other = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    assert_eq!(other.embed.dims(), model.embed.dims());
    let e = load_adapter(&mut other, &embed_lora_fixture())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("differs") && (e.contains("'model.embed_tokens'") || e.contains("'lm_head'")),
        "{e}"
    );
}

#[test]
fn lora_layers_outside_the_model_are_errors() {
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let mut cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers: Some(vec![0, 7]),
    };
    let e = attach_lora(&mut model, &cfg, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 7, but the model has 2 (0 to 1)"), "{e}");
    cfg.layers = Some(vec![]);
    let e = attach_lora(&mut model, &cfg, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty list"), "{e}");
    cfg.layers = Some(vec![1]);
    assert_eq!(attach_lora(&mut model, &cfg, &mut Rng::new(0)).unwrap(), 7);
}
