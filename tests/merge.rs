//! `merge`: the merged checkpoint equals PEFT's merge_and_unload output.
mod common;
use candle_core::DType;
use common::*;
use unlearn::merge::{merge, MergeOptions};
use unlearn::model::weights::WeightStore;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};

fn merged_matches_fixture(base: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge(
        &fixture(base),
        &fixture(&format!("{base}-lora")),
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(report.merged_modules, 14);
    let ours = WeightStore::open_dir(&out).unwrap();
    let theirs = WeightStore::open_dir(&fixture(&format!("{base}-lora-merged"))).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for n in ours.names() {
        let d = max_abs_diff(
            &ours.tensor_raw(&n).unwrap(),
            &theirs.tensor_raw(&n).unwrap(),
        );
        assert!(d <= 1e-5, "{base}: {n} differs by {d}");
    }
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} not copied");
    }
    let model = Decoder::load(&out, DType::F32, &cpu()).unwrap();
    let r = reference(&format!("{base}-lora-merged"));
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    assert!(max_abs_diff(&logits, &r["logits"]) <= 1e-4);
    // nothing but the result is left behind
    let entries: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn llama_merge_equals_peft_merge_and_unload() {
    merged_matches_fixture("llama");
}

#[test]
fn qwen2_merge_equals_peft_merge_and_unload() {
    merged_matches_fixture("qwen2");
}

#[test]
fn merge_to_bf16_and_into_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let opts = MergeOptions {
        dtype: Some(DType::BF16),
        max_shard_bytes: 60_000,
    };
    let report = merge(&fixture("llama"), &fixture("llama-lora"), &out, &opts).unwrap();
    assert!(
        report.shards > 1,
        "expected several shards, got {}",
        report.shards
    );
    assert!(out.join("model.safetensors.index.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let ours = WeightStore::open_dir(&out).unwrap();
    let theirs = WeightStore::open_dir(&fixture("llama-lora-merged")).unwrap();
    for n in ours.names() {
        let (dt, _, _, _) = ours.raw(&n).unwrap();
        assert_eq!(dt, safetensors::Dtype::BF16);
        let exact_bf16 = theirs
            .tensor_raw(&n)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            max_abs_diff(&ours.tensor_raw(&n).unwrap(), &exact_bf16),
            0.0,
            "{n}: not the rounded f32 merge"
        );
    }
}

#[test]
fn merge_refuses_non_empty_output_and_bad_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("x"), "x").unwrap();
    let err = merge(
        &fixture("llama"),
        &fixture("llama-lora"),
        tmp.path(),
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    // an adapter on the token embedding (PEFT's lora_embedding_A/B) is refused, not half merged
    let out = tempfile::tempdir().unwrap();
    let embed_adapter = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft/llama-tied-embed-lora");
    let err = merge(
        &fixture("llama-tied"),
        &embed_adapter,
        &out.path().join("m"),
        &MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("embedding") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    assert!(!out.path().join("m").exists());
}

/// LoRA on fused and transposed (Conv1D) projections: the adapted model and the merged
/// checkpoint written from its saved adapter give the same logits.
#[test]
fn adapters_on_fused_and_conv1d_modules_merge_consistently() {
    use unlearn::lora::{attach_lora, lora_vars, save_adapter, LoraConfig, TargetModules};
    for (name, targets) in [
        ("gpt2", vec!["c_attn", "c_proj", "c_fc"]),
        ("gpt_neox", vec!["query_key_value", "dense_h_to_4h"]),
        ("phi3", vec!["qkv_proj", "gate_up_proj"]),
    ] {
        let mut model = Decoder::load(&fixture(name), DType::F32, &cpu()).unwrap();
        let cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            use_rslora: false,
            dropout: 0.0,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            layers: None,
        };
        let n = attach_lora(&mut model, &cfg, &mut unlearn::rng::Rng::new(5)).unwrap();
        assert_eq!(
            n,
            targets.len() * 2 + usize::from(name == "gpt2") * 2,
            "{name}"
        );
        for (_, v) in lora_vars(&model) {
            let t = v.as_tensor();
            v.set(&(t + candle_core::Tensor::randn(0f32, 0.1, t.dims(), &cpu()).unwrap()).unwrap())
                .unwrap();
        }
        let r = reference(name);
        let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
        let adapted = model.forward(&input, &ForwardOptions::default()).unwrap();
        assert!(
            max_abs_diff(&adapted, &r["logits"]) > 1e-3,
            "{name}: adapter has no effect"
        );
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(&model, &cfg, &tmp.path().join("adapter"), None).unwrap();
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written["fan_in_fan_out"], name == "gpt2", "{name}");
        merge(
            &fixture(name),
            &tmp.path().join("adapter"),
            &tmp.path().join("merged"),
            &MergeOptions::default(),
        )
        .unwrap();
        let merged = Decoder::load(&tmp.path().join("merged"), DType::F32, &cpu()).unwrap();
        let logits = merged.forward(&input, &ForwardOptions::default()).unwrap();
        let d = max_abs_diff(&logits, &adapted);
        assert!(d <= 1e-4, "{name}: merged vs adapted logits differ by {d}");
    }
}
