//! Greedy generation: with cache == without cache == alone or in a left-padded batch of 4.
mod common;
use candle_core::DType;
use common::*;
use unlearn::generate::{greedy, greedy_uncached, GenerationConfig};
use unlearn::model::Decoder;

fn prompts(name: &str) -> Vec<Vec<u32>> {
    let r = reference(name);
    let ids = r["input_ids"].to_vec2::<i64>().unwrap();
    // four prompts of different lengths cut from the reference rows
    [(0, 5), (1, 17), (0, 11), (1, 3)]
        .iter()
        .map(|&(row, len)| ids[row][..len].iter().map(|&x| x as u32).collect())
        .collect()
}

#[test]
fn cached_uncached_and_batch_sizes_agree() {
    for name in [
        "llama", "mistral", "gemma2", "qwen3", "phi3", "gpt_neox", "gpt2",
    ] {
        let model = Decoder::load(&fixture(name), DType::F32, &cpu()).unwrap();
        let mut cfg = GenerationConfig::new(vec![1], 2);
        cfg.max_new_tokens = 14;
        let ps = prompts(name);
        let batched = greedy(&model, &ps, &cfg).unwrap();
        let uncached = greedy_uncached(&model, &ps, &cfg).unwrap();
        assert_eq!(batched, uncached, "{name}: cache changes the output");
        for (i, p) in ps.iter().enumerate() {
            let alone = greedy(&model, std::slice::from_ref(p), &cfg).unwrap();
            assert_eq!(
                alone[0], batched[i],
                "{name}: prompt {i} alone vs in a batch of 4"
            );
            assert!(batched[i].len() <= 14);
        }
        assert!(
            batched.iter().any(|o| !o.is_empty()),
            "{name}: nothing generated"
        );
    }
}

#[test]
fn generation_stops_at_eos_and_respects_the_limit() {
    let model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let ps = prompts("llama");
    let mut cfg = GenerationConfig::new(vec![], 2);
    cfg.max_new_tokens = 6;
    let free = greedy(&model, &ps, &cfg).unwrap();
    assert!(free.iter().all(|o| o.len() == 6));
    // declare the third generated token of prompt 0 an EOS: that row stops before it
    let stop = free[0][2];
    let first = free[0].iter().position(|&t| t == stop).unwrap();
    cfg.eos_token_ids = vec![stop];
    let stopped = greedy(&model, &ps[..1], &cfg).unwrap();
    assert_eq!(stopped[0], free[0][..first].to_vec());
    assert!(greedy(&model, &[vec![]], &cfg).is_err());
}

/// A Llama shape small enough for debug-build tests: hidden 32, 4 heads of 8, 2 KV heads,
/// intermediate 64, vocab 128, 2 layers, LoRA r 2, batch 2 × 16.
fn tiny_bench() -> unlearn::bench::BenchConfig {
    unlearn::bench::BenchConfig {
        hidden: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        vocab: 128,
        rank: 2,
        batch: 2,
        seq: 16,
        steps: 2,
        warmup: 1,
        ..Default::default()
    }
}

/// The benchmark harness itself works (tiny shape, so the test is quick; the numbers in the
/// README come from the release build at the default shape).
#[test]
fn bench_harness_runs_on_a_tiny_shape() {
    let c = unlearn::bench::BenchConfig {
        peak_tflops: Some(2.0),
        ..tiny_bench()
    };
    let g = unlearn::bench::bench_generate(&c, 5, &cpu()).unwrap();
    assert_eq!((g.batch, g.new_tokens), (2, 5));
    assert!(g.tokens_per_second > 0.0);
    for m in ["gradascent", "graddiff", "eupmu", "eupmu-fast", "surgery"] {
        let r = unlearn::bench::bench_method(&c, m, &cpu()).unwrap();
        assert!(
            r.seconds_per_step > 0.0
                && r.tokens_per_step == if m == "gradascent" { 32 } else { 64 },
            "{m}: {r:?}"
        );
        // the model FLOPs below for every trained token; MFU against the given peak
        let tflop = 114_688.0 * r.tokens_per_step as f64 / 1e12;
        assert!((r.model_tflop_per_step - tflop).abs() < 1e-18, "{m}: {r:?}");
        assert!(
            (r.achieved_tflops - tflop / r.seconds_per_step).abs()
                < 1e-12 * r.achieved_tflops.max(1.0)
        );
        assert_eq!(r.mfu, Some(r.achieved_tflops / 2.0));
    }
    assert!(unlearn::bench::bench_method(&c, "nope", &cpu()).is_err());

    // a config.json instead of the shape flags: its vocabulary and sizes are used
    let from_file = unlearn::bench::BenchConfig {
        config: Some(fixture("llama").join("config.json")),
        peak_tflops: None,
        ..c.clone()
    };
    let arch = unlearn::bench::arch_config(&from_file).unwrap();
    assert_eq!((arch.vocab_size, arch.hidden_size), (320, 64));
    let r = unlearn::bench::bench_method(&from_file, "gradascent", &cpu()).unwrap();
    assert_eq!((r.tokens_per_step, r.mfu), (32, None));
    let missing = unlearn::bench::BenchConfig {
        config: Some("/nonexistent/config.json".into()),
        ..c
    };
    let e = unlearn::bench::bench_method(&missing, "gradascent", &cpu()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/config.json"), "{e}");
}

/// Model FLOPs per trained token, by hand for [`tiny_bench`] (hidden 32, 4 heads of 8, 2 KV
/// heads, intermediate 64, vocab 128, 2 layers, r 2, T 16):
/// base weights per layer q 1024 + k 512 + v 512 + o 1024 + gate/up/down 3 × 2048 = 9216, two
/// layers and the 128 × 32 head: N = 22528; LoRA r·(in + out) per layer 128 + 96 + 96 + 128 +
/// 3 × 192 = 1024, R = 2048; attention 4·T·32·2 layers = 4096 forward.
/// 4N + 6R + 3·4096 = 90112 + 12288 + 12288 = 114688.
#[test]
fn lora_step_flops_are_counted_as_mfu_counts_them() {
    use unlearn::lora::{attach_lora, LoraConfig, TargetModules};
    let cfg = unlearn::bench::llama_config(&tiny_bench()).unwrap();
    let mut model = Decoder::random_on_device(cfg, 0.02, DType::F32, &cpu()).unwrap();
    assert_eq!(
        unlearn::bench::lora_step_flops_per_token(&model, 16),
        4.0 * 22528.0 + 3.0 * 4096.0
    );
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers: None,
    };
    attach_lora(&mut model, &lora, &mut unlearn::rng::Rng::new(1)).unwrap();
    assert_eq!(
        unlearn::bench::lora_step_flops_per_token(&model, 16),
        114_688.0
    );
}
