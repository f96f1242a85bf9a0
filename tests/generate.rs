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

/// The benchmark harness itself works (tiny shape, so the test is quick; the numbers in the
/// README come from the release build at the default shape).
#[test]
fn bench_harness_runs_on_a_tiny_shape() {
    let c = unlearn::bench::BenchConfig {
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
        seed: 0,
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
    }
    assert!(unlearn::bench::bench_method(&c, "nope", &cpu()).is_err());
}
