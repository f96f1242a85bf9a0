//! Config styles and RoPE variants found on the hub, the hidden-state output and LoRA dropout.
mod common;
use candle_core::{DType, Tensor};
use common::*;
use serde_json::json;
use std::path::Path;
use unlearn::lora::{attach_lora, lora_vars, LoraConfig, TargetModules};
use unlearn::model::config::{ArchConfig, RopeScaling};
use unlearn::model::decoder::inv_freq;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};
use unlearn::rng::Rng;

fn llama_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("config.json")).unwrap())
        .unwrap()
}

fn parse(v: &serde_json::Value) -> ArchConfig {
    ArchConfig::from_value(v, Path::new("config.json")).unwrap()
}

#[test]
fn top_level_rope_theta_gives_the_same_logits_as_rope_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("llama").join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg = llama_config();
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), json!(10000.0));
    obj.insert("rope_scaling".into(), serde_json::Value::Null);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let model = Decoder::load(tmp.path(), DType::F32, &cpu()).unwrap();
    let r = reference("llama");
    let logits = model
        .forward(
            &ModelInput::new(&r["input_ids"], Some(&r["attention_mask"])),
            &ForwardOptions::default(),
        )
        .unwrap();
    assert!(max_abs_diff(&logits, &r["logits"]) <= 1e-4);
    // a different theta must change the logits (the key is really read)
    let obj = cfg.as_object_mut().unwrap();
    obj.insert("rope_theta".into(), json!(500.0));
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let model = Decoder::load(tmp.path(), DType::F32, &cpu()).unwrap();
    let logits = model
        .forward(
            &ModelInput::new(&r["input_ids"], Some(&r["attention_mask"])),
            &ForwardOptions::default(),
        )
        .unwrap();
    assert!(max_abs_diff(&logits, &r["logits"]) > 1e-3);
}

#[test]
fn llama3_scaling_in_both_config_styles_matches_transformers_formula() {
    // Llama-3.2 rope settings on a head_dim-64 model.
    let scaling = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut old = llama_config();
    {
        let o = old.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("head_dim".into(), json!(64));
        o.insert("rope_theta".into(), json!(500000.0));
        o.insert("rope_scaling".into(), scaling.clone());
    }
    let mut new = llama_config();
    {
        let o = new.as_object_mut().unwrap();
        o.insert("head_dim".into(), json!(64));
        let mut p = scaling.as_object().unwrap().clone();
        p.insert("rope_theta".into(), json!(500000.0));
        o.insert("rope_parameters".into(), serde_json::Value::Object(p));
    }
    for cfg in [parse(&old), parse(&new)] {
        let rope = cfg.rope.clone().unwrap();
        assert_eq!(rope.theta, 500000.0);
        assert!(matches!(rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        let f = inv_freq(&rope, 10);
        assert_eq!(f.len(), 32);
        // Expected values: transformers' _compute_llama3_parameters evaluated in Python
        // (float64 arithmetic; see the session note for the script).
        let expected: [(usize, f64); 8] = [
            (0, 1.0),
            (1, 6.636012377e-01),
            (2, 4.403666027e-01),
            (3, 2.922278226e-01),
            (20, 8.570255490e-06),
            (22, 3.774054294e-06),
            (25, 1.102883669e-06),
            (31, 9.418306725e-08),
        ];
        for (i, e) in expected {
            assert!(
                ((f[i] as f64) - e).abs() <= 1e-6 * e,
                "inv_freq[{i}] = {} vs {e}",
                f[i]
            );
        }
    }
}

#[test]
fn linear_and_dynamic_scaling() {
    let mut cfg = llama_config();
    cfg.as_object_mut().unwrap().insert(
        "rope_parameters".into(),
        json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
    );
    let lin = parse(&cfg).rope.unwrap();
    let base = inv_freq(&parse(&llama_config()).rope.unwrap(), 10);
    for (a, b) in inv_freq(&lin, 10).iter().zip(&base) {
        assert!((a * 4.0 - b).abs() < 1e-7);
    }
    cfg.as_object_mut().unwrap().insert(
        "rope_scaling".into(),
        json!({"type": "dynamic", "factor": 2.0}),
    );
    cfg.as_object_mut().unwrap().remove("rope_parameters");
    cfg.as_object_mut()
        .unwrap()
        .insert("max_position_embeddings".into(), json!(16));
    let dynamic = parse(&cfg).rope.unwrap();
    // within the original context: unchanged
    assert_eq!(inv_freq(&dynamic, 16), base);
    // beyond it: base = θ·((f·L/L0) − (f − 1))^(d/(d−2)) = 48760.546… for L = 40 (Python)
    let f = inv_freq(&dynamic, 40);
    for (i, e) in [(0usize, 1.0f64), (1, 2.594128170e-01), (2, 6.729500963e-02)] {
        assert!(
            ((f[i] as f64) - e).abs() <= 1e-6 * e,
            "{i}: {} vs {e}",
            f[i]
        );
    }
}

#[test]
fn unsupported_rope_type_is_a_clear_error() {
    let mut cfg = llama_config();
    cfg.as_object_mut().unwrap().insert(
        "rope_parameters".into(),
        json!({"rope_type": "yarn", "factor": 4.0}),
    );
    let e = ArchConfig::from_value(&cfg, Path::new("x/config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("x/config.json") && e.contains("yarn"), "{e}");
}

#[test]
fn hidden_state_after_the_last_layer_gives_the_logits() {
    let model = Decoder::load(&fixture("qwen3"), DType::F32, &cpu()).unwrap();
    let r = reference("qwen3");
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let opts = ForwardOptions::default();
    let last = model.hidden_after_layer(&input, 1, &opts).unwrap();
    let logits = model
        .lm_head
        .forward(&model.final_norm.forward(&last).unwrap(), &opts)
        .unwrap();
    assert!(max_abs_diff(&logits, &r["logits"]) <= 1e-4);
    let first = model.hidden_after_layer(&input, 0, &opts).unwrap();
    assert_eq!(first.dims(), &[2, 41, 64]);
    assert!(max_abs_diff(&first, &last) > 1e-3);
    assert!(model.hidden_after_layer(&input, 2, &opts).is_err());
}

#[test]
fn lora_dropout_is_seeded_and_only_active_with_a_generator() {
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.5,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        layers: None,
    };
    attach_lora(&mut model, &cfg, &mut Rng::new(3)).unwrap();
    for (n, v) in lora_vars(&model) {
        if n.contains("lora_B") {
            v.set(&Tensor::ones(v.as_tensor().dims(), DType::F32, &cpu()).unwrap())
                .unwrap();
        }
    }
    let r = reference("llama");
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let eval1 = model.forward(&input, &ForwardOptions::default()).unwrap();
    let eval2 = model.forward(&input, &ForwardOptions::default()).unwrap();
    assert_eq!(max_abs_diff(&eval1, &eval2), 0.0);
    let t1 = model
        .forward(&input, &ForwardOptions::training(Rng::new(9)))
        .unwrap();
    let t2 = model
        .forward(&input, &ForwardOptions::training(Rng::new(9)))
        .unwrap();
    let t3 = model
        .forward(&input, &ForwardOptions::training(Rng::new(10)))
        .unwrap();
    assert_eq!(max_abs_diff(&t1, &t2), 0.0, "same seed, same masks");
    assert!(max_abs_diff(&t1, &t3) > 1e-4, "another seed, other masks");
    assert!(
        max_abs_diff(&t1, &eval1) > 1e-4,
        "dropout active in training"
    );
}
