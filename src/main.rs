//! The `unlearn` command line.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use unlearn::data::{read_examples, Example};
use unlearn::lora::load_adapter;
use unlearn::merge::{merge, parse_dtype, MergeOptions};
use unlearn::model::weights::{write_atomic, WeightStore};
use unlearn::model::{ArchConfig, Decoder, ForwardOptions};
use unlearn::score::score_examples;
use unlearn::tokenizer::ChatTokenizer;

#[derive(Parser)]
#[command(
    name = "unlearn",
    version,
    about = "Remove knowledge from transformer language models with LoRA unlearning, and prove it.",
    long_about = "Remove knowledge from transformer language models with LoRA unlearning, and prove it.\n\n\
Models are Hugging Face checkpoint directories (config.json + safetensors + tokenizer files).\n\
Supported architectures: llama, mistral, qwen2, qwen3, gemma2, phi3, gpt_neox, gpt2.\n\
Adapters are read and written in PEFT's format (adapter_config.json + adapter_model.safetensors)."
)]
struct Cli {
    /// where to compute: cpu, cuda or cuda:N (CUDA needs a binary built with scripts/build-cuda.sh)
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// dtype the frozen base weights are computed in: f32, bf16 or f16 (default: bf16 on CUDA,
    /// f32 on CPU). LoRA weights, gradients, optimizer state and losses stay f32; full-parameter
    /// training (`unlearn train` without [lora]) stays f32
    #[arg(long, global = true)]
    base_dtype: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an unlearning recipe: train a LoRA adapter with the recipe's method, write the PEFT
    /// adapter, metrics.jsonl, checkpoints and (if asked) the merged model to the output dir.
    ///
    /// Ctrl-C writes a checkpoint and exits; `--resume` continues bit for bit.
    Run {
        /// TOML recipe (see recipes/)
        recipe: PathBuf,
        /// override any recipe field, e.g. --set train.lr=1e-4 --set method.beta=0.2
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// continue from a checkpoint dir or from the latest checkpoint of an output dir
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Train a model with next-token loss: the whole model or a LoRA adapter, from a checkpoint
    /// or from seeded random weights for a config.json. Builds target, retain and oracle models.
    ///
    /// The recipe has [model] (path, or config + tokenizer + init_std), optional [lora],
    /// [data] train = [files…] of question/answer or text items, [train] and [output] dir (+ model:
    /// where the trained model directory goes, default <dir>/model). Checkpoints, resume,
    /// metrics.jsonl and Ctrl-C behave as in `unlearn run`. See recipes/build/.
    Train {
        /// TOML recipe (see recipes/build/)
        recipe: PathBuf,
        /// override any recipe field, e.g. --set train.steps=4
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// continue from a checkpoint dir or from the latest checkpoint of an output dir
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Predict the model retrained without a forget set, without retraining it, as a PEFT
    /// "shadow" adapter (the target of `method = "dmm"`), with a report of how close it is to a
    /// real retrained oracle when [report] names one.
    ///
    /// Two kinds of estimator: an influence step δ = m·(C + λI)⁻¹·Σ_forget ∇ℓ in a LoRA subspace
    /// (cg, diagonal, identity), or the simulated oracle (simulated: the model fine-tuned on the
    /// retain data alone, its change stored exactly as a full-rank adapter on every linear
    /// module, the output head and the token embedding).
    ///
    /// The recipe has [model] path, [subspace] (r, target_modules, layers), [data] (forget,
    /// retain = the training data the retrained model would see: C is estimated on it and the
    /// simulated oracle trains on it, calibrate = unseen items for scale = "auto"), [attribute]
    /// (estimator cg|diagonal|identity|simulated, compare, curvature logits|fisher|empirical,
    /// samples, damping, cg_iters, cg_tol, steps, scale, seed, batch_size), [simulate] (the
    /// simulated oracle's training: the [train] keys of `unlearn train`), optional [report]
    /// (oracle, data = ["SPLIT=PATH", …], references) and [output] dir. Writes DIR/shadow/ (the
    /// main estimator's), DIR/report.json and DIR/report.md. See recipes/dmm/.
    Attribute {
        /// TOML recipe (see recipes/dmm/attribute.toml)
        recipe: PathBuf,
        /// override any recipe field, e.g. --set attribute.damping=0.01
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Regenerate the bundled fictional benchmark (OUT/tofu, OUT/wmdp) and train its tokenizer
    /// (OUT/tokenizer). Deterministic: the output equals the committed data/ byte for byte.
    Synth {
        /// output directory
        #[arg(long, default_value = "data")]
        out: PathBuf,
        /// BPE vocabulary size of the tokenizer
        #[arg(long, default_value_t = 2048)]
        vocab_size: usize,
    },
    /// List the unlearning methods a recipe can name.
    Methods,
    /// Download a model or dataset file from the Hugging Face hub into the cache (the same
    /// layout as Python's huggingface_hub) and print its local path.
    ///
    /// SPEC is `org/name[@revision]` for a model (config, tokenizer files and every safetensors
    /// shard; never *.bin unless --include asks) or `hf://datasets/org/name[@revision][/path]`.
    /// Honours HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE=1.
    Fetch {
        spec: String,
        #[arg(long)]
        revision: Option<String>,
        /// extra files to download, as globs (e.g. --include '*.bin')
        #[arg(long)]
        include: Vec<String>,
    },
    /// Time LoRA unlearning steps on a model with random weights: a Llama shape from the flags
    /// below, or any supported config.json (--config).
    ///
    /// Prints seconds per step, tokens/s, achieved TFLOP/s (model FLOPs: forward, and backward
    /// to the inputs only since base weights are frozen; with --peak-tflops also the model FLOP
    /// utilisation) and peak memory per method, and each method's cost relative to the first
    /// one. Each method's peak memory is measured anew (Linux).
    /// `scripts/bench-vs-peft.sh` times the same step in transformers + PEFT beside it.
    Bench {
        /// methods to time: gradascent, graddiff, npo, eupmu, eupmu-fast, surgery
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "graddiff,eupmu,eupmu-fast,surgery"
        )]
        methods: Vec<String>,
        #[arg(long, default_value_t = 512)]
        hidden: usize,
        #[arg(long, default_value_t = 8)]
        layers: usize,
        #[arg(long, default_value_t = 8)]
        heads: usize,
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        #[arg(long, default_value_t = 1376)]
        intermediate: usize,
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// timed steps (the median is reported)
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// untimed steps first
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// print JSON lines instead of a table
        #[arg(long)]
        json: bool,
        /// time greedy generation (KV cache) of this many new tokens per prompt instead of
        /// training steps; --batch prompts of --seq tokens
        #[arg(long)]
        generate: Option<usize>,
        /// a config.json (any supported architecture) instead of the Llama shape flags, e.g.
        /// benches/llama-3.2-1b/config.json
        #[arg(long, conflicts_with_all = ["hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"])]
        config: Option<PathBuf>,
        /// the device's peak dense TFLOP/s in the base dtype (H100 SXM bf16: 989), to report
        /// model FLOP utilisation
        #[arg(long)]
        peak_tflops: Option<f64>,
    },
    /// Check that a device computes what the CPU and PyTorch compute: logits, loss and LoRA
    /// gradients of a checkpoint + PEFT adapter on a reference batch.
    ///
    /// The reference file is a safetensors with `input_ids`, `attention_mask` and `labels`
    /// ([batch, seq]) and, optionally, transformers + PEFT's `logits`, `loss` and
    /// `grad.<PEFT parameter name>` (as the test fixtures' reference.safetensors). The run on
    /// --device with the base weights in --base-dtype is compared with the same run on the CPU in
    /// f32 and with the reference values, as relative L2 errors ‖x − y‖/‖y‖. Exits non-zero
    /// when one exceeds the tolerance: 1e-4 for f32 base weights, 5e-2 for bf16/f16 (about
    /// twice what PyTorch + PEFT itself deviates from f32 with bf16 base weights).
    Parity {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        reference: PathBuf,
        /// print one JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Describe a checkpoint: architecture, sizes, parameter count, dtype and LoRA targets.
    Inspect {
        /// model directory (config.json + safetensors)
        model: PathBuf,
        /// print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Negative log-likelihood of every record of a JSONL/JSON file, one JSON line per record.
    ///
    /// Records with `question` and `answer` are scored on the answer tokens plus EOS after the
    /// chat-templated question; records with `text` are scored on all tokens. Each output line is
    /// {"index", "tokens", "mean_nll", "sum_nll"}.
    Score {
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory applied on top of the model
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL file or JSON array of records
        #[arg(long)]
        data: PathBuf,
        /// output JSONL file
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// truncate each example to this many tokens
        #[arg(long)]
        max_length: Option<usize>,
    },
    /// Evaluate a model (optionally with an adapter) on a suite: tofu, muse, perplexity, mcq, or
    /// a suite .toml. Writes OUT/EVAL.json (every item: inputs, generation, scores),
    /// OUT/SUMMARY.json (metric → value) and OUT/report.md.
    ///
    /// Example: unlearn eval --model M --adapter A --suite tofu --data forget=forget10_perturbed.json
    /// --data retain=retain_perturbed.json --data holdout=holdout10.json --retain-log retain/EVAL.json --out eval/
    Eval(EvalArgs),
    /// Draw a run's charts as SVG: RUN_DIR/plots/training.svg (losses and λ over steps, from
    /// RUN_DIR/metrics.jsonl) and, when the run evaluated, RUN_DIR/plots/tradeoff.svg (forget
    /// metric against utility per evaluation). Prints the paths written.
    Plot {
        /// output directory of `unlearn run` (holds metrics.jsonl)
        run_dir: PathBuf,
    },
    /// Compare runs: one markdown row per run directory with its method, steps and each summary
    /// key before → after (the first and last evaluation in the run's
    /// metrics.jsonl). E.g. `unlearn compare runs/tofu-*`.
    Compare {
        /// output directories of `unlearn run`
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// summary keys to show (default: the keys of the quickstart's table, those present)
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
        /// print JSON lines instead of a markdown table
        #[arg(long)]
        json: bool,
    },
    /// KLoM (arXiv 2410.23232): how far an ensemble of unlearned models is from an ensemble of
    /// oracles (models retrained without the forget set), per item from the margins of the gold
    /// answer tokens, reported at the 95th percentile per split. Direction KL(unlearned ‖ oracle).
    ///
    /// Models are checkpoint directories (e.g. the merged/ of `unlearn run`), one in memory at
    /// a time; all must share the first oracle's tokenizer. scripts/klom-table.sh builds the
    /// bundled benchmark's table.
    Klom {
        /// oracle model directories (retrained without the forget set), one per seed
        #[arg(long, num_args = 1.., required = true)]
        oracle: Vec<PathBuf>,
        /// unlearned model directories, one per seed
        #[arg(long, num_args = 1.., required = true)]
        unlearned: Vec<PathBuf>,
        /// SPLIT=PATH question/answer files (e.g. forget=data/tofu/forget10.jsonl)
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// histogram bins per position (the paper's 20; with few models the ε floor dominates)
        #[arg(long, default_value_t = 20)]
        bins: usize,
        /// compare per position with a normal fit per ensemble instead of histograms (closed-form
        /// Gaussian KL; the proxy for small ensembles, ≈ 5–20 models)
        #[arg(long)]
        gaussian: bool,
        /// the reported percentile of the per-item KLoM
        #[arg(long, default_value_t = 95.0)]
        percentile: f64,
        /// a name for this ensemble in the output (e.g. the method)
        #[arg(long, default_value = "unlearned")]
        label: String,
        /// also write the full report (per-item values) to this JSON file
        #[arg(long)]
        out: Option<PathBuf>,
        /// print one JSON line instead of a table row
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 128)]
        max_length: usize,
    },
    /// Merge a PEFT LoRA adapter into its base model and write a checkpoint transformers loads.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        /// output directory (must not exist or be empty)
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights (default: the base checkpoint's)
        #[arg(long, value_parser = ["f32", "bf16", "f16"])]
        dtype: Option<String>,
    },
}

/// Keep freed memory in the process instead of returning it to the kernel after every step.
/// Training allocates and frees the same large activation buffers each step; with glibc's
/// defaults every one of them is a fresh mmap and a storm of page faults (measured ≈20% of step
/// time on CPU). This is set by the program itself so users need no environment tuning.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 * 1024 * 1024);
    }
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", each cause once: the library's file errors already
/// print their source ("PATH: No such file or directory"), which anyhow's `{:#}` would repeat.
fn error_message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

fn run(cli: Cli) -> Result<()> {
    let device = unlearn::device::parse_device(&cli.device)?;
    if let Some(d) = &cli.base_dtype {
        unlearn::device::set_base_dtype(parse_dtype(d).context("--base-dtype")?)?;
    }
    match cli.command {
        Command::Run {
            recipe,
            set,
            resume,
        } => run_recipe(&recipe, &set, resume, device),
        Command::Train {
            recipe,
            set,
            resume,
        } => train_recipe(&recipe, &set, resume, device),
        Command::Attribute { recipe, set } => attribute(&recipe, &set, device),
        Command::Synth { out, vocab_size } => {
            let mut files = unlearn::synth::write_benchmark(&out)?;
            let corpus: Vec<PathBuf> = files
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .cloned()
                .collect();
            let tok_dir = out.join("tokenizer");
            unlearn::synth::train_tokenizer(&corpus, vocab_size, &tok_dir)?;
            files.push(tok_dir);
            for f in &files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Bench {
            methods,
            hidden,
            layers,
            heads,
            kv_heads,
            intermediate,
            vocab,
            rank,
            batch,
            seq,
            steps,
            warmup,
            json,
            generate,
            config,
            peak_tflops,
        } => {
            if steps == 0 {
                bail!("--steps must be ≥ 1");
            }
            if peak_tflops.is_some_and(|p| p.is_nan() || p <= 0.0) {
                bail!("--peak-tflops must be a positive number");
            }
            let cfg = unlearn::bench::BenchConfig {
                hidden,
                layers,
                heads,
                kv_heads,
                intermediate,
                vocab,
                rank,
                batch,
                seq,
                steps,
                warmup,
                seed: 0,
                config,
                peak_tflops,
            };
            // before the table's header is printed
            cfg.validate()?;
            if let Some(new_tokens) = generate {
                let r = unlearn::bench::bench_generate(&cfg, new_tokens, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "greedy generation, batch {} × prompt {} + {} new tokens: {:.2} s, {:.1} generated tokens/s",
                        r.batch, r.prompt_tokens, r.new_tokens, r.seconds, r.tokens_per_second
                    );
                }
                return Ok(());
            }
            let mut first: Option<f64> = None;
            if !json {
                let shape = match &cfg.config {
                    Some(path) => format!("{} ({})", path.display(), {
                        let a = unlearn::bench::arch_config(&cfg)?;
                        format!(
                            "{}, hidden {}, {} layers, vocab {}",
                            a.family.model_type(),
                            a.hidden_size,
                            a.num_layers,
                            a.vocab_size
                        )
                    }),
                    None => format!("llama hidden {hidden}, {layers} layers, vocab {vocab}"),
                };
                println!(
                    "{shape}, LoRA r={rank} all-linear, batch {batch}x{seq}, median of {steps} steps"
                );
                let gpu = if device.is_cuda() {
                    format!(" {:>12}", "peak GPU MB")
                } else {
                    String::new()
                };
                println!(
                    "{:<12} {:>10} {:>10} {:>10} {:>9} {:>6} {:>12}{gpu}",
                    "method", "s/step", "tokens/s", "relative", "TFLOP/s", "MFU", "peak RSS MB"
                );
            }
            for m in &methods {
                let r = unlearn::bench::bench_method(&cfg, m, &device)?;
                let rel = r.seconds_per_step / *first.get_or_insert(r.seconds_per_step);
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let mfu = r
                        .mfu
                        .map_or("-".to_string(), |u| format!("{:.1}%", 100.0 * u));
                    let gpu = r
                        .peak_gpu_mb
                        .map_or(String::new(), |mb| format!(" {mb:>12.0}"));
                    println!(
                        "{:<12} {:>10.3} {:>10.0} {:>9.2}x {:>9.2} {:>6} {:>12.0}{gpu}",
                        r.method,
                        r.seconds_per_step,
                        r.tokens_per_second,
                        rel,
                        r.achieved_tflops,
                        mfu,
                        r.peak_rss_mb
                    );
                }
            }
            Ok(())
        }
        Command::Parity {
            model,
            adapter,
            reference,
            json,
        } => {
            let dtype = unlearn::device::base_dtype(&device);
            let report = unlearn::parity::check(&unlearn::parity::ParityRequest {
                model: model_dir(&model)?,
                adapter,
                reference,
                device,
                dtype,
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{} with {} base weights against cpu f32 and the reference (relative L2 error, tolerance {:e})",
                    report.device, report.dtype, report.tolerance
                );
                println!("{:<64} {:>10} {:>10}", "tensor", "vs cpu", "vs ref");
                for t in &report.tensors {
                    let r = t
                        .vs_reference
                        .map_or("-".to_string(), |v| format!("{v:.2e}"));
                    println!("{:<64} {:>10.2e} {:>10}", t.name, t.vs_cpu, r);
                }
                println!(
                    "two AdamW steps from the same gradients: {} of the LoRA weights' elements differ from the cpu's",
                    report.optimizer_step_mismatches
                );
                println!(
                    "worst {:.2e} ({}): {}",
                    report.worst,
                    report.worst_name,
                    if report.pass { "PASS" } else { "FAIL" }
                );
            }
            if report.optimizer_step_mismatches > 0 {
                bail!(
                    "parity: after two AdamW steps {} elements of the LoRA weights differ from the cpu's (the optimizer should be exact)",
                    report.optimizer_step_mismatches
                );
            }
            if !report.pass {
                bail!(
                    "parity: {} differs by {:.2e} (relative L2), beyond the {} tolerance {:e}",
                    report.worst_name,
                    report.worst,
                    report.dtype,
                    report.tolerance
                );
            }
            Ok(())
        }
        Command::Fetch {
            spec,
            revision,
            include,
        } => {
            let path = unlearn::hub::fetch(&spec, revision.as_deref(), &include)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Methods => {
            for (name, what) in unlearn::methods::METHODS {
                println!("{name:<12} {what}");
            }
            Ok(())
        }
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Score {
            model,
            adapter,
            data,
            out,
            batch_size,
            max_length,
        } => score(
            &model,
            adapter.as_deref(),
            &data,
            &out,
            batch_size,
            max_length,
            &device,
        ),
        Command::Eval(args) => eval_command(args, device),
        Command::Plot { run_dir } => plot(&run_dir),
        Command::Compare { runs, keys, json } => compare(&runs, &keys, json),
        Command::Klom {
            oracle,
            unlearned,
            data,
            bins,
            gaussian,
            percentile,
            label,
            out,
            json,
            max_length,
        } => klom_command(
            &oracle, &unlearned, &data, bins, gaussian, percentile, &label, out, json, max_length,
            device,
        ),
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
        } => {
            let model = model_dir(&model)?;
            let opts = MergeOptions {
                dtype: dtype.as_deref().map(parse_dtype).transpose()?,
                ..Default::default()
            };
            let report = merge(&model, &adapter, &out, &opts)?;
            println!(
                "merged {} adapted modules into {} tensors ({} shard{}, {:.1} MB) → {}",
                report.merged_modules,
                report.tensors,
                report.shards,
                if report.shards == 1 { "" } else { "s" },
                report.total_bytes as f64 / 1e6,
                out.display()
            );
            Ok(())
        }
    }
}

/// A model given on the command line: a local checkpoint directory, or a hub id
/// `org/name[@revision]` resolved through the cache (downloaded unless HF_HUB_OFFLINE=1).
fn model_dir(spec: &Path) -> Result<PathBuf> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    if spec.exists() {
        bail!(
            "model '{}' is a file; give the checkpoint directory that holds config.json",
            spec.display()
        );
    }
    Ok(unlearn::hub::resolve_model(&spec.to_string_lossy())?)
}

/// A data file: a local path or `hf://datasets/org/name[@revision]/path/in/repo`.
fn data_file(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    Ok(unlearn::hub::resolve_file(&spec.to_string_lossy())?)
}

/// First Ctrl-C: checkpoint after the current step and exit; a second one exits at once.
fn interrupt_flag() -> Result<&'static std::sync::atomic::AtomicBool> {
    let interrupt: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    ctrlc::set_handler(move || {
        if interrupt.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: writing a checkpoint after this step (Ctrl-C again to abort)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(interrupt)
}

fn run_recipe(
    path: &Path,
    overrides: &[String],
    resume: Option<PathBuf>,
    device: Device,
) -> Result<()> {
    let recipe = unlearn::recipe::Recipe::load(path, overrides)?;
    drive_recipe("run", resume, device, |opts| {
        let summary = unlearn::train::trainer::run(&recipe, opts)?;
        let adapter = summary.out_dir.join("adapter");
        Ok((summary, adapter))
    })
}

/// More histogram bins than any ensemble has models per position only measures the ε floor
/// (and each costs memory per position).
const MAX_KLOM_BINS: usize = 10_000;

#[allow(clippy::too_many_arguments)]
fn klom_command(
    oracles: &[PathBuf],
    unlearned: &[PathBuf],
    data: &[String],
    bins: usize,
    gaussian: bool,
    pct: f64,
    label: &str,
    out: Option<PathBuf>,
    json: bool,
    max_length: usize,
    device: Device,
) -> Result<()> {
    // checked before any model is scored
    if bins == 0 || bins > MAX_KLOM_BINS {
        bail!("--bins must be from 1 to {MAX_KLOM_BINS} (the paper uses 20), not {bins}");
    }
    if !(0.0..=100.0).contains(&pct) {
        bail!("--percentile must be in [0, 100], not {pct}");
    }
    // every member is scored on the first oracle's token ids: they must share its tokenizer
    let reference = oracles[0].join("tokenizer.json");
    if let Ok(first) = std::fs::read(&reference) {
        for dir in oracles.iter().chain(unlearned).skip(1) {
            let path = dir.join("tokenizer.json");
            if std::fs::read(&path).is_ok_and(|other| other != first) {
                bail!(
                    "{} differs from {}: the ensembles must share one tokenizer",
                    path.display(),
                    reference.display()
                );
            }
        }
    }
    let tok = unlearn::tokenizer::ChatTokenizer::from_dir(&oracles[0])?;
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    let mut splits = Vec::new();
    for entry in data {
        let (name, path) = entry
            .split_once('=')
            .with_context(|| format!("--data '{entry}' must look like SPLIT=PATH"))?;
        let ds = unlearn::train::batch::Dataset::load(Path::new(path), &tok, max_length)?;
        splits.push((name.to_string(), ds.examples));
    }
    let kind = if gaussian {
        unlearn::eval::klom::KlomKind::Gaussian
    } else {
        unlearn::eval::klom::KlomKind::Binned(unlearn::metrics::KlomParams {
            bins,
            ..Default::default()
        })
    };
    let report = unlearn::eval::klom::klom_ensembles(
        oracles,
        unlearned,
        &splits,
        &kind,
        pct,
        &device,
        pad,
        |d| eprintln!("margins of {}", d.display()),
    )?;
    if let Some(path) = &out {
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if json {
        let mut obj = serde_json::Map::new();
        obj.insert("label".into(), label.into());
        obj.insert("klom_direction".into(), report.klom_direction.into());
        obj.insert("kind".into(), report.kind.into());
        obj.insert("bins".into(), report.bins.into());
        for s in &report.splits {
            obj.insert(format!("{}_p{}", s.split, pct), s.klom_percentile.into());
            obj.insert(format!("{}_mean", s.split), s.klom_mean.into());
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        let head: Vec<String> = report
            .splits
            .iter()
            .map(|s| format!("{} KLoM p{} (mean)", s.split, pct))
            .collect();
        println!("| ensemble | {} |", head.join(" | "));
        println!("|---|{}", "---|".repeat(head.len()));
        let cells: Vec<String> = report
            .splits
            .iter()
            .map(|s| format!("{:.3} ({:.3})", s.klom_percentile, s.klom_mean))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
        eprintln!(
            "KLoM direction {}, {}, {} oracles vs {} unlearned models",
            report.klom_direction,
            report
                .bins
                .map_or("Gaussian fit".to_string(), |b| format!("{b} bins")),
            oracles.len(),
            unlearned.len()
        );
    }
    Ok(())
}

fn attribute(path: &Path, overrides: &[String], device: Device) -> Result<()> {
    let recipe = unlearn::recipe::AttributeRecipe::load(path, overrides)?;
    let report = unlearn::attribute::run(&recipe, &device, true)?;
    let dir = Path::new(&recipe.output.dir);
    for e in &report.estimators {
        let how = match (&report.simulated, e.scales.first()) {
            (Some(s), None) => format!("fine-tuned {} steps on the retain data", s.steps),
            (_, first) => format!(
                "{} step(s), scale {:.4e} (first)",
                e.scales.len(),
                first.copied().unwrap_or(0.0)
            ),
        };
        eprintln!(
            "{:>9}: {how}, forget NLL {:.3} → {:.3}",
            e.estimator, e.forget_nll_before, e.forget_nll_after
        );
        for s in &e.splits {
            eprintln!(
                "           {:<10} KL to oracle: target {:.4}, shadow {:.4} ({:.0}%), loss-change corr {}",
                s.split,
                s.kl_target_oracle,
                s.kl_shadow_oracle,
                100.0 * s.kl_shadow_oracle / s.kl_target_oracle.max(f64::MIN_POSITIVE),
                s.loss_change_correlation.map_or("–".into(), |c| format!("{c:.3}"))
            );
        }
    }
    eprintln!(
        "wrote {} (shadow adapter), report.json and report.md in {:.1} s",
        dir.join("shadow").display(),
        report.seconds
    );
    Ok(())
}

fn train_recipe(
    path: &Path,
    overrides: &[String],
    resume: Option<PathBuf>,
    device: Device,
) -> Result<()> {
    let recipe = unlearn::recipe::TrainRecipe::load(path, overrides)?;
    drive_recipe("train", resume, device, |opts| {
        Ok((
            unlearn::train::supervised::train(&recipe, opts)?,
            recipe.model_out(),
        ))
    })
}

/// Run `unlearn run` / `unlearn train` with Ctrl-C handling and a progress bar, then say what
/// was written (or how to resume).
fn drive_recipe(
    command: &str,
    resume: Option<PathBuf>,
    device: Device,
    job: impl FnOnce(
        &unlearn::train::trainer::RunOptions,
    ) -> unlearn::error::Result<(unlearn::train::trainer::RunSummary, PathBuf)>,
) -> Result<()> {
    let opts = unlearn::train::trainer::RunOptions {
        resume,
        interrupt: Some(interrupt_flag()?),
        device,
        progress: true,
    };
    let started = std::time::Instant::now();
    let (summary, product) = job(&opts)?;
    report_end(command, &summary, started, &product);
    if summary.interrupted {
        // checkpointed, but not finished: `unlearn run … && unlearn eval …` must not go on
        std::process::exit(130);
    }
    Ok(())
}

fn report_end(
    command: &str,
    summary: &unlearn::train::trainer::RunSummary,
    started: std::time::Instant,
    product: &Path,
) {
    let logs: Vec<String> = summary
        .last_logs
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    if summary.interrupted {
        eprintln!(
            "stopped at step {}; resume with: unlearn {command} {} --resume {}",
            summary.steps,
            // the resolved recipe carries every --set override of this run
            summary.out_dir.join("recipe.toml").display(),
            summary.out_dir.display()
        );
    } else if logs.is_empty() {
        // resumed at its last step: nothing was left to train
        eprintln!(
            "done: already at step {}, nothing left to train\nwrote: {}",
            summary.steps,
            product.display()
        );
    } else {
        eprintln!(
            "done: {} steps in {:.1}s; last step: {}\nwrote: {}",
            summary.steps,
            started.elapsed().as_secs_f64(),
            logs.join(", "),
            product.display()
        );
    }
}

fn inspect(spec: &Path, as_json: bool) -> Result<()> {
    let dir = model_dir(spec)?;
    let cfg = ArchConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open_dir(&dir)?;
    let stored_dtype = store
        .float_dtype()
        .map(|d| format!("{d:?}").to_lowercase())
        .unwrap_or_else(|| "?".into());
    // Loading checks that every weight is present with the right shape.
    let model = Decoder::load(&dir, DType::F32, &Device::Cpu)?;
    let mut targets: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.short_name().to_string())
        .collect();
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(t.clone()));
    let params = model.num_parameters();
    let window: Vec<String> = cfg
        .sliding_window
        .iter()
        .map(|w| w.map_or("full".into(), |w| w.to_string()))
        .collect();
    let info = serde_json::json!({
        "path": dir.display().to_string(),
        "model_type": cfg.family.model_type(),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": params,
        "stored_dtype": stored_dtype,
        "files": store.files().len(),
        "rope": cfg.rope.as_ref().map(|r| format!("theta {} rotary_dim {} scaling {:?}", r.theta, r.rotary_dim, r.scaling)),
        "attention_window": window,
        "lora_targets": targets,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model         {}", dir.display());
    println!("architecture  {}", cfg.family.model_type());
    println!(
        "layers        {} (hidden {}, mlp {}, heads {}/{} kv, head_dim {})",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    println!(
        "vocabulary    {}{}",
        cfg.vocab_size,
        if cfg.tie_word_embeddings {
            " (tied embeddings)"
        } else {
            ""
        }
    );
    println!("parameters    {} ({:.2} M)", params, params as f64 / 1e6);
    println!(
        "stored dtype  {} in {} file(s)",
        stored_dtype,
        store.files().len()
    );
    if let Some(r) = &cfg.rope {
        println!(
            "rope          theta {}, rotary dim {}, scaling {:?}",
            r.theta, r.rotary_dim, r.scaling
        );
    }
    println!("attention     {}", window.join(", "));
    println!("lora targets  {}", targets.join(", "));
    Ok(())
}

fn score(
    model_spec: &Path,
    adapter: Option<&Path>,
    data: &Path,
    out: &Path,
    batch_size: usize,
    max_length: Option<usize>,
    device: &Device,
) -> Result<()> {
    let dir = model_dir(model_spec)?;
    let mut model = Decoder::load(&dir, unlearn::device::base_dtype(device), device)?;
    if let Some(a) = adapter {
        load_adapter(&mut model, a)?;
    }
    let tok = ChatTokenizer::from_dir(&dir)?;
    let data = &data_file(data)?;
    let examples = read_examples(data)?;
    let encoded = examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            match ex {
                Example::Qa { question, answer } => tok.encode_qa(question, answer, max_length),
                Example::Text { text } => tok.encode_text(text, max_length),
            }
            .with_context(|| format!("{}: record {}", data.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some((i, _)) = encoded
        .iter()
        .enumerate()
        .find(|(_, e)| e.num_labelled() == 0)
    {
        bail!(
            "{}: record {} has no tokens to score (empty answer or text truncated away)",
            data.display(),
            i + 1
        );
    }
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    let bar = indicatif::ProgressBar::new(encoded.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("scoring {bar:40} {pos}/{len} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let rows = score_examples(
        &model,
        &encoded,
        batch_size,
        pad,
        &ForwardOptions::default(),
        |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    let mut buf = Vec::new();
    for r in &rows {
        serde_json::to_writer(&mut buf, r)?;
        buf.write_all(b"\n")?;
    }
    write_atomic(out, &buf)?;
    let total: f64 = rows.iter().map(|r| r.sum_nll).sum();
    let tokens: usize = rows.iter().map(|r| r.tokens).sum();
    eprintln!(
        "scored {} records, {} tokens, mean NLL {:.4} → {}",
        rows.len(),
        tokens,
        total / tokens.max(1) as f64,
        out.display()
    );
    Ok(())
}

/// The first and last `{"step", "eval"}` lines of a run's metrics.jsonl.
fn first_last_eval(run: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut evals = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.get("eval").is_some() => evals.push(v),
            Ok(_) => {}
            // a run killed while writing leaves a cut last line; anywhere else it is damage
            Err(_) if i + 1 == lines.len() => {
                eprintln!(
                    "note: {}: the last line is cut off (a run stopped while writing it); ignored",
                    path.display()
                )
            }
            Err(e) => anyhow::bail!("{} line {}: not a JSON record ({e})", path.display(), i + 1),
        }
    }
    match (evals.first(), evals.last()) {
        (Some(a), Some(b)) if evals.len() >= 2 => Ok((a.clone(), b.clone())),
        _ => anyhow::bail!(
            "{}: needs at least two evaluations (a recipe with [eval] and before = true)",
            path.display()
        ),
    }
}

fn compare(runs: &[PathBuf], keys: &[String], as_json: bool) -> Result<()> {
    const DEFAULT_KEYS: &[&str] = &[
        "forget_quality",
        "model_utility",
        "forget_Q_A_Prob",
        "forget_Q_A_ROUGE",
        "forget_truth_ratio",
        "privleak",
        "forget_acc",
        "retain_acc",
    ];
    let mut rows = vec![];
    for run in runs {
        let (first, last) = first_last_eval(run)?;
        let recipe = match unlearn::recipe::Recipe::load(&run.join("recipe.toml"), &[]) {
            Ok(r) => r.method.name,
            Err(e) => {
                eprintln!("note: the method of {} is unknown: {e}", run.display());
                "?".into()
            }
        };
        rows.push((run.clone(), recipe, first, last));
    }
    let keys: Vec<String> = if keys.is_empty() {
        DEFAULT_KEYS
            .iter()
            .filter(|k| rows.iter().any(|r| r.3["eval"].get(**k).is_some()))
            .map(|k| k.to_string())
            .collect()
    } else {
        // a key no run has is a typo, not a column of dashes
        for k in keys {
            let known = rows
                .iter()
                .any(|r| r.2["eval"].get(k).is_some() || r.3["eval"].get(k).is_some());
            if !known {
                let mut have: Vec<&String> = rows
                    .iter()
                    .filter_map(|r| r.3["eval"].as_object())
                    .flat_map(|o| o.keys())
                    .collect();
                have.sort();
                have.dedup();
                let have: Vec<&str> = have.iter().map(|k| k.as_str()).collect();
                anyhow::bail!(
                    "--keys: '{k}' is in no run's evaluations (they have: {})",
                    have.join(", ")
                );
            }
        }
        keys.to_vec()
    };
    let num = |v: &serde_json::Value| match v.as_f64() {
        None => "–".to_string(),
        // forget quality is a p-value: keep its order of magnitude visible
        Some(x) if x != 0.0 && x.abs() < 1e-3 => format!("{x:.1e}"),
        Some(x) => format!("{x:.4}"),
    };
    if as_json {
        for (run, method, first, last) in &rows {
            let mut obj = serde_json::Map::new();
            obj.insert("run".into(), serde_json::json!(run.display().to_string()));
            obj.insert("method".into(), serde_json::json!(method));
            obj.insert("steps".into(), last["step"].clone());
            for k in &keys {
                obj.insert(format!("{k}_before"), first["eval"][k].clone());
                obj.insert(format!("{k}_after"), last["eval"][k].clone());
            }
            println!("{}", serde_json::Value::Object(obj));
        }
        return Ok(());
    }
    let header: Vec<&str> = ["run", "method", "steps"]
        .into_iter()
        .chain(keys.iter().map(String::as_str))
        .collect();
    println!("| {} |", header.join(" | "));
    println!("|{}", " --- |".repeat(header.len()));
    for (run, method, first, last) in &rows {
        let cells: Vec<String> = keys
            .iter()
            .map(|k| format!("{} → {}", num(&first["eval"][k]), num(&last["eval"][k])))
            .collect();
        let row: Vec<String> = [
            run.display().to_string(),
            method.clone(),
            last["step"].to_string(),
        ]
        .into_iter()
        .chain(cells)
        .collect();
        println!("| {} |", row.join(" | "));
    }
    Ok(())
}

fn plot(run_dir: &Path) -> Result<()> {
    let plots = unlearn::eval::plots::plot_run(run_dir)?;
    for n in &plots.notes {
        eprintln!("note: {n}");
    }
    for p in &plots.written {
        println!("{}", p.display());
    }
    Ok(())
}

/// The arguments of `unlearn eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// model directory or hub id org/name[@revision]
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory applied on top of the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// built-in suite name (tofu, muse, perplexity, mcq) or a suite .toml file
    #[arg(long, default_value = "tofu")]
    suite: String,
    /// a split's data: SPLIT=PATH (JSONL/JSON file or hf://datasets/org/name/file), or SPLIT
    /// alone for the suite's default source; repeat for each split
    #[arg(long = "data", value_name = "SPLIT=PATH")]
    data: Vec<String>,
    /// the retain model (directory or hub id), evaluated on the forget (and holdout) split
    /// for forget_quality and privleak
    #[arg(long, conflicts_with = "retain_log")]
    retain_model: Option<PathBuf>,
    /// EVAL.json of an earlier run of the same suite on the retain model (or an
    /// open-unlearning TOFU_EVAL.json / MUSE_EVAL.json), instead of --retain-model
    #[arg(long)]
    retain_log: Option<PathBuf>,
    /// output directory
    #[arg(long)]
    out: PathBuf,
    /// batch size for scoring and generation (overrides the suite)
    #[arg(long)]
    batch_size: Option<usize>,
    /// generation length (overrides the suite; default 200)
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// evaluate only the first N items of each split
    #[arg(long)]
    limit: Option<usize>,
    /// system message before each question (open-unlearning uses "You are a helpful
    /// assistant." for Llama-3.x)
    #[arg(long)]
    system_prompt: Option<String>,
    /// `date_string` for the chat template (open-unlearning: "10 Apr 2025" for Llama-3.x)
    #[arg(long)]
    date_string: Option<String>,
}

fn eval_command(a: EvalArgs, device: Device) -> Result<()> {
    use unlearn::eval::{DataArg, EvalRequest, Reference, Suite};
    let suite = Suite::resolve(&a.suite)?;
    let data = a
        .data
        .iter()
        .map(|d| DataArg::parse(d))
        .collect::<unlearn::Result<Vec<_>>>()?;
    let reference = match (&a.retain_model, &a.retain_log) {
        (Some(m), _) => Some(Reference::Model {
            dir: model_dir(m)?,
            label: m.display().to_string(),
        }),
        (None, Some(p)) => Some(Reference::Log(p.clone())),
        (None, None) => None,
    };
    let req = EvalRequest {
        suite,
        data,
        model: model_dir(&a.model)?,
        model_label: a.model.display().to_string(),
        adapter: a.adapter,
        reference,
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        limit: a.limit,
        device,
        progress: true,
        prompt_style: unlearn::tokenizer::PromptStyle {
            system_prompt: a.system_prompt.clone(),
            date_string: a.date_string.clone(),
        },
    };
    let started = std::time::Instant::now();
    let out = unlearn::eval::evaluate(&req)?;
    unlearn::eval::write_outputs(&a.out, &out)?;
    let headline: Vec<String> = out
        .summary
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| format!("{k} {x:.4}")))
        .take(8)
        .collect();
    eprintln!(
        "evaluated in {:.1}s: {}
→ {}",
        started.elapsed().as_secs_f64(),
        headline.join(", "),
        a.out.join(unlearn::eval::REPORT_FILE).display()
    );
    Ok(())
}
