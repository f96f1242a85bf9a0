//! `unlearn bench`: time LoRA unlearning steps (forward, backward, clipping, AdamW, the method's
//! own extra work) on a Llama-shaped model with seeded random weights and a synthetic batch.
//! Reports seconds per step, tokens/s, the process's peak resident memory and, on a GPU, the
//! peak of GPU memory held by tensors.
use crate::error::{Error, Result};
use crate::lora::{attach_lora, lora_vars, LoraConfig, TargetModules};
use crate::methods::{self, Ctx};
use crate::model::{ArchConfig, Decoder, ForwardOptions};
use crate::rng::Rng;
use crate::tokenizer::EncodedExample;
use crate::train::batch::{Dataset, ItemBatch, PairedBatch};
use crate::train::optim::{clip_scale, AdamW, AdamWConfig};
use candle_core::{Device, Var};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// a config.json to bench instead of the Llama shape of the fields above (its vocabulary
    /// and sizes win; `rank`, `batch` and `seq` still apply)
    pub config: Option<PathBuf>,
    /// the device's peak dense TFLOP/s in the base dtype: with it, model FLOP utilisation is
    /// reported
    pub peak_tflops: Option<f64>,
}

impl Default for BenchConfig {
    /// The CPU shape of the performance issue: hidden 512, 8 layers, vocab 8192, r = 8 on all
    /// seven projections, batch 8 × 128.
    fn default() -> Self {
        BenchConfig {
            hidden: 512,
            layers: 8,
            heads: 8,
            kv_heads: 8,
            intermediate: 1376,
            vocab: 8192,
            rank: 8,
            batch: 8,
            seq: 128,
            steps: 5,
            warmup: 1,
            seed: 0,
            config: None,
            peak_tflops: None,
        }
    }
}

impl BenchConfig {
    /// Sizes a step can run with: a bad one would otherwise fail deep inside the step with a
    /// message about empty batches or missing gradients.
    pub fn validate(&self) -> Result<()> {
        let mut sizes = vec![
            ("--batch", self.batch, 1),
            ("--seq", self.seq, 2),
            ("--steps", self.steps, 1),
            ("--rank", self.rank, 1),
        ];
        if self.config.is_none() {
            sizes.extend([
                ("--hidden", self.hidden, 1),
                ("--layers", self.layers, 1),
                ("--heads", self.heads, 1),
                ("--kv-heads", self.kv_heads, 1),
                ("--intermediate", self.intermediate, 1),
                ("--vocab", self.vocab, 2),
            ]);
        }
        for (flag, value, least) in sizes {
            if value < least {
                return Err(Error::InvalidArgument(format!(
                    "bench: {flag} must be at least {least}, not {value}"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// the method name as given (`eupmu-fast` = EUPMU with fast = true)
    pub method: String,
    pub seconds_per_step: f64,
    /// tokens of the trained batches per second (forget + retain where the method uses both)
    pub tokens_per_second: f64,
    pub tokens_per_step: usize,
    pub peak_rss_mb: f64,
    /// on a GPU, the peak of memory held by tensors (the driver pool's high-water mark), as
    /// `torch.cuda.max_memory_allocated`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mb: Option<f64>,
    /// model FLOPs of one step by [`lora_step_flops_per_token`] (extra passes a method makes,
    /// such as a reference model's forward, are not counted: they are its overhead)
    pub model_tflop_per_step: f64,
    pub achieved_tflops: f64,
    /// the `--peak-tflops` given, and achieved / peak
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

/// (registry name, parameters) for a bench method label.
fn method_spec(label: &str) -> Result<(&'static str, toml::Table)> {
    let parse = |s: &str| -> toml::Table { toml::from_str(s).unwrap_or_default() };
    Ok(match label {
        "gradascent" => ("gradascent", parse("")),
        "graddiff" => ("graddiff", parse("")),
        "npo" => ("npo", parse("")),
        "eupmu" => ("eupmu", parse("forget_loss = \"ga\"")),
        "eupmu-fast" => ("eupmu", parse("forget_loss = \"ga\"\nfast = true")),
        "surgery" => ("surgery", parse("forget_loss = \"ga\"")),
        other => {
            return Err(Error::InvalidArgument(format!(
                "bench: unknown method '{other}' (gradascent, graddiff, npo, eupmu, eupmu-fast, surgery)"
            )))
        }
    })
}

/// The architecture benched: `c.config` when given, else [`llama_config`].
pub fn arch_config(c: &BenchConfig) -> Result<ArchConfig> {
    match &c.config {
        Some(path) => ArchConfig::from_file(path),
        None => llama_config(c),
    }
}

/// Model FLOPs of one LoRA training step per token of a `seq`-token row, counted the way
/// MFU is (PaLM, appendix B) but for a frozen base: the forward pass is 2 FLOPs per base weight
/// (output head included) and the backward pass 2 more, for the input gradient only, since the
/// base weights get none; each LoRA pair of rank r adds 2·r·(in + out) forward and twice that
/// backward (input and weight gradients); attention adds 4·T·(heads·head_dim) per layer forward
/// (q·kᵀ and p·v over the full T × T square, as MFU counts it) and twice that backward.
pub fn lora_step_flops_per_token(model: &Decoder, seq: usize) -> f64 {
    let mut base = 0.0;
    let mut lora = 0.0;
    for l in model.linears_with_head() {
        let (i, o) = (l.in_features() as f64, l.out_features() as f64);
        base += i * o;
        if let Some(w) = &l.lora {
            lora += w.a.as_tensor().dims()[0] as f64 * (i + o);
        }
    }
    let cfg = &model.cfg;
    let attention =
        4.0 * seq as f64 * (cfg.num_heads * cfg.head_dim) as f64 * cfg.num_layers as f64;
    4.0 * base + 6.0 * lora + 3.0 * attention
}

pub fn llama_config(c: &BenchConfig) -> Result<ArchConfig> {
    let v = serde_json::json!({
        "model_type": "llama",
        "hidden_size": c.hidden,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "intermediate_size": c.intermediate,
        "vocab_size": c.vocab,
        "max_position_embeddings": c.seq.max(2048),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    ArchConfig::from_value(&v, Path::new("<bench config>"))
}

fn synthetic(n: usize, seq: usize, vocab: usize, rng: &mut Rng) -> Dataset {
    let examples = (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..seq).map(|_| rng.below(vocab) as u32).collect();
            // prompt = first quarter (no loss), answer = the rest
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < seq / 4 { -100 } else { t as i64 })
                .collect();
            EncodedExample {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    Dataset {
        name: "synthetic".into(),
        examples,
    }
}

/// The benched model: random weights drawn on the device (fast for 1B+ shapes), seeded.
fn random_model(cfg: ArchConfig, c: &BenchConfig, device: &Device) -> Result<Decoder> {
    // candle's CPU generator has no seed to set; timings do not depend on the values
    if !device.is_cpu() {
        device.set_seed(c.seed)?;
    }
    Decoder::random_on_device(cfg, 0.02, crate::device::base_dtype(device), device)
}

/// Starts a new peak-memory measurement, so that methods timed one after another in one
/// process each report their own peak: returns freed heap memory to the kernel (the program
/// keeps it otherwise, see `tune_allocator` in main.rs), then resets Linux's `VmHWM` to the
/// current resident size (`/proc/self/clear_refs`, Linux ≥ 4.0). Elsewhere it does nothing.
pub fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no live allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
    // on a kernel without the reset the figure stays the process's peak
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process in MB since the start or the last
/// [`reset_peak_rss`] (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn bench_method(c: &BenchConfig, label: &str, device: &Device) -> Result<BenchResult> {
    c.validate()?;
    reset_peak_rss();
    crate::device::reset_peak_gpu_memory(device)?;
    let (name, params) = method_spec(label)?;
    let cfg = arch_config(c)?;
    let vocab = cfg.vocab_size;
    let mut model = random_model(cfg, c, device)?;
    let lora = LoraConfig {
        r: c.rank,
        alpha: 2.0 * c.rank as f64,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers: None,
    };
    attach_lora(&mut model, &lora, &mut Rng::new(c.seed + 1))?;
    // B = 0 at init would make the first steps trivial for some methods; start from a
    // trained-looking adapter.
    let mut rng = Rng::new(c.seed + 2);
    for (n, v) in lora_vars(&model) {
        if n.contains("lora_B") {
            let d = v.as_tensor().dims().to_vec();
            let vals: Vec<f32> = (0..d.iter().product::<usize>())
                .map(|_| (rng.normal() * 0.01) as f32)
                .collect();
            v.set(&candle_core::Tensor::from_vec(vals, d, device)?)?;
        }
    }
    let vars: Vec<Var> = lora_vars(&model).into_iter().map(|(_, v)| v).collect();
    let forget = synthetic(c.batch, c.seq, vocab, &mut rng);
    let retain = synthetic(c.batch, c.seq, vocab, &mut rng);
    let mut method = methods::build(name, &params)?;
    method.prepare(&model, &forget.examples, 0)?;
    let rows: Vec<usize> = (0..c.batch).collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &vars,
    )?;
    let mut times = Vec::new();
    for step in 0..c.warmup + c.steps {
        let batch = PairedBatch {
            forget: ItemBatch::new(&forget, rows.clone(), 0, device)?,
            retain: Some(ItemBatch::new(&retain, rows.clone(), 0, device)?),
        };
        let started = std::time::Instant::now();
        let fwd = ForwardOptions::default();
        let ctx = Ctx {
            model: &model,
            vars: &vars,
            opts: &fwd,
            step,
            micro: 0,
        };
        let (grads, _) = method.gradients(&ctx, &batch)?;
        let (_, grad_scale) = clip_scale(&grads, 1.0)?;
        opt.step_scaled(&vars, &grads, grad_scale, 1e-4)?;
        let eval = ForwardOptions::eval();
        let ctx = Ctx {
            model: &model,
            vars: &vars,
            opts: &eval,
            step,
            micro: 0,
        };
        method.after_update(&ctx, std::slice::from_ref(&batch))?;
        // the step's graph goes with its gradients: freeing it is part of every training step
        // (PyTorch's backward frees its graph as it goes), so it is timed
        drop(grads);
        device.synchronize()?;
        if step >= c.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let tokens = c.batch * c.seq * if method.needs_retain() { 2 } else { 1 };
    let tflop = lora_step_flops_per_token(&model, c.seq) * tokens as f64 / 1e12;
    let achieved = tflop / median;
    Ok(BenchResult {
        method: label.to_string(),
        seconds_per_step: median,
        tokens_per_second: tokens as f64 / median,
        tokens_per_step: tokens,
        peak_rss_mb: peak_rss_mb(),
        peak_gpu_mb: crate::device::peak_gpu_memory_mb(device)?,
        model_tflop_per_step: tflop,
        achieved_tflops: achieved,
        peak_tflops: c.peak_tflops,
        mfu: c.peak_tflops.map(|p| achieved / p),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateResult {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// generated tokens per second over the whole batch (prefill included in the time)
    pub tokens_per_second: f64,
}

/// Time batched greedy generation with the KV cache on the random-weight model of `c`:
/// `c.batch` prompts of `c.seq` random tokens, `new_tokens` tokens each (no EOS).
pub fn bench_generate(
    c: &BenchConfig,
    new_tokens: usize,
    device: &Device,
) -> Result<GenerateResult> {
    let cfg = arch_config(c)?;
    let vocab = cfg.vocab_size;
    let model = random_model(cfg, c, device)?;
    let mut rng = Rng::new(c.seed + 3);
    let prompts: Vec<Vec<u32>> = (0..c.batch)
        .map(|_| (0..c.seq).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let mut gen = crate::generate::GenerationConfig::new(vec![], 0);
    gen.max_new_tokens = new_tokens;
    // one short warm-up run
    let mut warm = gen.clone();
    warm.max_new_tokens = 2;
    crate::generate::greedy(&model, &prompts, &warm)?;
    let started = std::time::Instant::now();
    let out = crate::generate::greedy(&model, &prompts, &gen)?;
    device.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(Vec::len).sum();
    Ok(GenerateResult {
        batch: c.batch,
        prompt_tokens: c.seq,
        new_tokens,
        seconds,
        tokens_per_second: generated as f64 / seconds,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::{peak_rss_mb, reset_peak_rss};

    #[test]
    fn sizes_a_step_cannot_run_with_are_named() {
        let ok = super::BenchConfig::default();
        ok.validate().unwrap();
        let cases = [
            (
                super::BenchConfig {
                    batch: 0,
                    ..ok.clone()
                },
                "--batch must be at least 1, not 0",
            ),
            (
                super::BenchConfig {
                    seq: 1,
                    ..ok.clone()
                },
                "--seq must be at least 2, not 1",
            ),
            (
                super::BenchConfig {
                    intermediate: 0,
                    ..ok.clone()
                },
                "--intermediate must be at least 1",
            ),
        ];
        for (c, flag) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    /// The VmHWM reset. (The block is mmapped, so dropping it unmaps it; `malloc_trim`'s part,
    /// heap pages the tuned allocator would keep, is not exercised here.)
    #[test]
    fn peak_rss_is_measured_anew_after_a_reset() {
        let block = vec![1u8; 300 << 20];
        std::hint::black_box(&block);
        let with_block = peak_rss_mb();
        assert!(
            with_block >= 300.0,
            "peak {with_block} MB with 300 MB touched"
        );
        drop(block);
        reset_peak_rss();
        let after = peak_rss_mb();
        assert!(
            after < with_block - 200.0,
            "peak {after} MB after freeing 300 of {with_block}"
        );
    }
}
