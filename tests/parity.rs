//! Logit and loss parity with transformers on every fixture checkpoint.
mod common;
use candle_core::DType;
use common::*;
use unlearn::model::ops::causal_lm_loss;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};

fn check(name: &str, logits_tol: f32) {
    let model =
        Decoder::load(&fixture(name), DType::F32, &cpu()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = reference(name);
    let input = ModelInput::new(&r["input_ids"], Some(&r["attention_mask"]));
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap();
    let diff = max_abs_diff(&logits, &r["logits"]);
    assert!(
        diff <= logits_tol,
        "{name}: max |logits - reference| = {diff}"
    );
    let loss = scalar(&causal_lm_loss(&logits, &r["labels"]).unwrap());
    // For bf16 weights the fixture's `loss` comes from transformers' bf16 run; the f32 loss
    // from the bf16 weights is the cross-entropy of the f32 reference logits.
    let expected = if r.contains_key("logits_bf16") {
        let bf16_loss = scalar(&r["loss"]);
        assert!(
            (loss - bf16_loss).abs() < 5e-3,
            "{name}: loss {loss} vs bf16 run {bf16_loss}"
        );
        scalar(&causal_lm_loss(&r["logits"], &r["labels"]).unwrap())
    } else {
        scalar(&r["loss"])
    };
    assert!(
        (loss - expected).abs() <= 1e-5,
        "{name}: loss {loss} vs reference {expected}"
    );
}

#[test]
fn llama() {
    check("llama", 1e-4);
}
#[test]
fn llama_tied() {
    check("llama-tied", 1e-4);
}
#[test]
fn llama_sharded() {
    check("llama-sharded", 1e-4);
}
#[test]
fn llama_bf16_weights_computed_in_f32() {
    check("llama-bf16", 1e-4);
}
#[test]
fn mistral_sliding_window() {
    check("mistral", 1e-4);
}
#[test]
fn qwen2_qkv_bias() {
    check("qwen2", 1e-4);
}
#[test]
fn qwen3_qk_norm() {
    check("qwen3", 1e-4);
}
#[test]
fn gemma2_softcap_sandwich_alternating_window() {
    check("gemma2", 1e-4);
}
#[test]
fn phi3_fused_projections() {
    check("phi3", 1e-4);
}
#[test]
fn gpt_neox_parallel_residual_partial_rotary() {
    check("gpt_neox", 1e-4);
}
#[test]
fn gpt2_conv1d_learned_positions() {
    check("gpt2", 1e-4);
}
#[test]
fn llama_lora_merged() {
    check("llama-lora-merged", 1e-4);
}
#[test]
fn qwen2_lora_merged() {
    check("qwen2-lora-merged", 1e-4);
}
