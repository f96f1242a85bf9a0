//! The run loop: LoRA or full-parameter training with any [`Method`], gradient accumulation, clipping,
//! AdamW, per-step `metrics.jsonl`, atomic resumable checkpoints, NaN detection.
//!
//! Everything random is a pure function of (seed, step): data orders, retain pairing and dropout
//! masks. A checkpoint therefore needs only the adapter, the optimizer moments, the method state
//! and the step to continue bit for bit.
use crate::error::{Error, Result};
use crate::lora::{attach_lora, load_adapter, lora_vars, save_adapter, LoraConfig};
use crate::methods::{self, Ctx, Logs, Method};
use crate::model::weights::{
    remove_dir_if_exists, replace_dir, tmp_path, write_atomic, write_safetensors, OwnedView,
    WeightStore,
};
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::{Recipe, TrainSection};
use crate::rng::Rng;
use crate::tokenizer::ChatTokenizer;
use crate::train::batch::{draw, Dataset, ItemBatch, PairedBatch};
use crate::train::optim::{all_finite, clip_scale, lr_at, AdamW, AdamWConfig};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What a checkpoint's `state.json` holds beyond the tensors.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    /// optimizer steps completed
    step: usize,
    total_steps: usize,
    seed: u64,
    method: String,
    method_state: serde_json::Value,
    adam_step: usize,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    pub steps: usize,
    pub interrupted: bool,
    pub last_logs: Logs,
}

/// Options that are not part of the recipe.
pub struct RunOptions<'a> {
    /// a checkpoint directory, or an output directory whose latest checkpoint to continue
    pub resume: Option<PathBuf>,
    /// set by Ctrl-C: checkpoint and stop after the current step
    pub interrupt: Option<&'a AtomicBool>,
    pub device: Device,
    /// show a progress bar (when stderr is a terminal)
    pub progress: bool,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            resume: None,
            interrupt: None,
            device: Device::Cpu,
            progress: false,
        }
    }
}

pub fn model_path(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    crate::hub::resolve_model(spec)
}

/// What the optimizer updates, and how a checkpoint stores it.
pub(crate) enum Trainable {
    /// a LoRA adapter on a frozen base; checkpoints are PEFT adapter directories
    Lora {
        cfg: LoraConfig,
        /// `base_model_name_or_path` written into adapter_config.json
        base: String,
    },
    /// every base weight (`unlearn train` without `[lora]`); checkpoints are model directories
    Full {
        /// config.json to write next to the weights
        config_json: Vec<u8>,
        /// where tokenizer.json and tokenizer_config.json are copied from
        tokenizer_dir: PathBuf,
    },
}

impl Trainable {
    /// Write the trained tensors into a checkpoint directory: a PEFT adapter, or a whole model
    /// directory for full-parameter training.
    fn write(&self, dir: &Path, model: &Decoder, params: &[(String, Var)]) -> Result<()> {
        match self {
            Trainable::Lora { cfg, base } => save_adapter(model, cfg, dir, Some(base)),
            Trainable::Full {
                config_json,
                tokenizer_dir,
            } => write_model_files(dir, config_json, tokenizer_dir, params),
        }
    }

    /// Set `vars` from a checkpoint written by [`Trainable::write`].
    fn restore(&self, ckpt: &Path, model: &Decoder, names: &[String], vars: &[Var]) -> Result<()> {
        let saved: Vec<(String, Tensor)> = match self {
            Trainable::Lora { cfg, base } => {
                let mut restored = model.clone();
                crate::lora::detach_lora(&mut restored);
                let saved_cfg = load_adapter(&mut restored, ckpt)?;
                // the tensors' shapes pin r, the targets and the layers (checked below); these
                // would change the trajectory without changing a shape
                let changed = [
                    ("lora.alpha", saved_cfg.alpha != cfg.alpha),
                    ("lora.use_rslora", saved_cfg.use_rslora != cfg.use_rslora),
                    ("lora.dropout", saved_cfg.dropout != cfg.dropout),
                ];
                if let Some((key, _)) = changed.iter().find(|(_, differs)| *differs) {
                    return Err(Error::config(
                        ckpt.join("adapter_config.json"),
                        format!("the checkpoint was trained with another {key} than the recipe's"),
                    ));
                }
                check_same_base(ckpt, base)?;
                lora_vars(&restored)
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().clone()))
                    .collect()
            }
            Trainable::Full { .. } => {
                let file = ckpt.join("model.safetensors");
                let store = WeightStore::open_files(std::slice::from_ref(&file), file.clone())?;
                names
                    .iter()
                    .map(|n| Ok((n.clone(), store.tensor_raw(n)?)))
                    .collect::<Result<_>>()?
            }
        };
        if saved.len() != vars.len() {
            return Err(Error::config(
                ckpt,
                format!(
                    "checkpoint holds {} trainable tensors, the recipe makes {}",
                    saved.len(),
                    vars.len()
                ),
            ));
        }
        for ((name, var), (_, t)) in names.iter().zip(vars).zip(saved) {
            if var.as_tensor().dims() != t.dims() {
                return Err(Error::config(
                    ckpt,
                    format!("tensor {name} does not match the recipe's model or LoRA config"),
                ));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// The base model a LoRA checkpoint was trained on (its adapter_config.json's
/// `base_model_name_or_path`) must be the recipe's: the same directory, or the same hub id.
fn check_same_base(ckpt: &Path, base: &str) -> Result<()> {
    let cfg_path = ckpt.join("adapter_config.json");
    let raw: serde_json::Value = crate::error::read_json(&cfg_path)?;
    let Some(saved) = raw.get("base_model_name_or_path").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let same = |a: &str, b: &str| match (Path::new(a).canonicalize(), Path::new(b).canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    if !same(saved, base) {
        return Err(Error::config(
            cfg_path,
            format!("the checkpoint was trained on '{saved}', the recipe's model is '{base}'"),
        ));
    }
    Ok(())
}

/// A model directory transformers can load: config.json, model.safetensors (f32) and the
/// tokenizer files, written to a staging name and renamed into place.
pub(crate) fn write_model_dir(
    dir: &Path,
    config_json: &[u8],
    tokenizer_dir: &Path,
    params: &[(String, Var)],
) -> Result<()> {
    let staging = tmp_path(dir);
    remove_dir_if_exists(&staging)?;
    write_model_files(&staging, config_json, tokenizer_dir, params)?;
    replace_dir(&staging, dir)
}

/// The files of a model directory, written into `dir` (created if needed).
fn write_model_files(
    dir: &Path,
    config_json: &[u8],
    tokenizer_dir: &Path,
    params: &[(String, Var)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::with_capacity(params.len());
    for (name, var) in params {
        tensors.push((
            name.clone(),
            OwnedView::from_tensor(&var.as_tensor().to_dtype(candle_core::DType::F32)?)?,
        ));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    write_atomic(&dir.join("config.json"), config_json)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = tokenizer_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// Everything the step loop needs; `run` (unlearning) and `unlearn train` build one each.
pub(crate) struct Session<'a> {
    pub model: Decoder,
    pub params: Vec<(String, Var)>,
    pub trainable: Trainable,
    pub method: Box<dyn Method>,
    pub tok: &'a ChatTokenizer,
    /// the forget set (unlearning) or the training set (`unlearn train`)
    pub primary: Dataset,
    pub retain: Option<Dataset>,
    pub evaluator: Option<crate::train::evaluation::RunEvaluator>,
    pub train: &'a TrainSection,
    pub out_dir: PathBuf,
}

pub(crate) struct LoopEnd {
    pub steps: usize,
    pub interrupted: bool,
    pub last_logs: Logs,
}

pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary> {
    let t = &recipe.train;
    let out_dir = PathBuf::from(&recipe.output.dir);
    let model_dir = model_path(&recipe.model.path)?;
    let tok = ChatTokenizer::from_dir(&model_dir)?.with_prompt_style(recipe.data.prompt_style());
    let mut model = Decoder::load(
        &model_dir,
        crate::device::base_dtype(&opts.device),
        &opts.device,
    )?;
    let lora_cfg: LoraConfig = recipe.lora_config()?;
    attach_lora(
        &mut model,
        &lora_cfg,
        &mut Rng::new(t.seed).fork("lora-init"),
    )?;

    let forget = Dataset::load(Path::new(&recipe.data.forget), &tok, recipe.data.max_length)?;
    let method = methods::build(&recipe.method.name, &recipe.method.params)?;
    let retain = match &recipe.data.retain {
        Some(paths) => Some(Dataset::load_all(
            &paths.to_vec(),
            &tok,
            recipe.data.max_length,
        )?),
        None if method.needs_retain() => {
            return Err(Error::InvalidArgument(format!(
                "method '{}' needs retain data: set data.retain in the recipe",
                method.name()
            )))
        }
        None => None,
    };

    // The evaluation's suite, data and retain model are checked before the output dir is
    // written to (a retain model's evaluation is cached there).
    let evaluator = match &recipe.eval {
        Some(section) => Some(crate::train::evaluation::RunEvaluator::new(
            section,
            &model_dir,
            &recipe.model.path,
            &opts.device,
            &out_dir,
            recipe.data.prompt_style(),
        )?),
        None => None,
    };
    // Output dir: the resolved recipe first, so a run can always be repeated.
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    write_atomic(&out_dir.join("recipe.toml"), recipe.to_toml()?.as_bytes())?;
    let params = lora_vars(&model);
    let mut session = Session {
        model,
        params,
        trainable: Trainable::Lora {
            cfg: lora_cfg.clone(),
            base: recipe.model.path.clone(),
        },
        method,
        tok: &tok,
        primary: forget,
        retain,
        evaluator,
        train: t,
        out_dir: out_dir.clone(),
    };
    let end = drive(&mut session, opts)?;
    if !end.interrupted {
        save_adapter(
            &session.model,
            &lora_cfg,
            &out_dir.join("adapter"),
            Some(&recipe.model.path),
        )?;
        if let Some(ev) = &session.evaluator {
            if let Some((best_step, value)) = ev.best {
                let adapter = if best_step == 0 {
                    serde_json::Value::Null
                } else {
                    serde_json::json!(format!("checkpoints/step-{best_step:06}"))
                };
                let best = serde_json::json!({
                    "step": best_step,
                    "key": ev.select_key(),
                    "value": value,
                    "adapter": adapter,
                });
                write_atomic(&out_dir.join("best.json"), best.to_string().as_bytes())?;
            }
        }
        if recipe.output.merge {
            let merged = out_dir.join("merged");
            remove_dir_if_exists(&merged)?;
            crate::merge::merge(
                &model_dir,
                &out_dir.join("adapter"),
                &merged,
                &Default::default(),
            )?;
        }
    }
    Ok(RunSummary {
        out_dir,
        steps: end.steps,
        interrupted: end.interrupted,
        last_logs: end.last_logs,
    })
}

/// The step loop: resume, evaluate before, then steps with accumulation, clipping, AdamW,
/// metrics, checkpoints and evaluations until the step budget or an interrupt.
pub(crate) fn drive(s: &mut Session, opts: &RunOptions) -> Result<LoopEnd> {
    let t = s.train;
    let out_dir = s.out_dir.clone();
    let pad_id = s.tok.pad_token_id().or(s.tok.eos_token_id()).unwrap_or(0);
    // draw() fills a batch from further epochs when it outgrows the data, so a batch larger
    // than the data would hold examples twice (and an absurd one exhausts memory)
    for ds in std::iter::once(&s.primary).chain(s.retain.as_ref()) {
        if t.batch_size > ds.examples.len() {
            return Err(Error::InvalidArgument(format!(
                "train.batch_size {} is larger than the {} examples of {}: a batch would hold some twice (use at most {})",
                t.batch_size,
                ds.examples.len(),
                ds.name,
                ds.examples.len()
            )));
        }
    }
    let per_step = t.batch_size * t.grad_accum;
    let total_steps = t
        .steps
        .unwrap_or_else(|| t.epochs * s.primary.len().div_ceil(per_step));
    let (var_names, vars): (Vec<String>, Vec<Var>) = s.params.iter().cloned().unzip();
    let mut optimizer = AdamW::new(
        AdamWConfig {
            lr: t.lr,
            beta1: t.betas[0],
            beta2: t.betas[1],
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
        &vars,
    )?;
    let mut start_step = 0;
    if let Some(resume) = &opts.resume {
        let ckpt = find_checkpoint(resume)?;
        let state: CheckpointState = crate::error::read_json(&ckpt.join("state.json"))?;
        if state.method != s.method.name() || state.seed != t.seed {
            return Err(Error::config(
                ckpt.join("state.json"),
                format!(
                    "checkpoint is of method '{}' seed {}, the recipe says '{}' seed {}",
                    state.method,
                    state.seed,
                    s.method.name(),
                    t.seed
                ),
            ));
        }
        s.trainable.restore(&ckpt, &s.model, &var_names, &vars)?;
        let moments = WeightStore::open_files(
            &[ckpt.join("optimizer.safetensors")],
            ckpt.join("optimizer.safetensors"),
        )?;
        for (i, name) in var_names.iter().enumerate() {
            let exp_avg = moments.tensor_raw(&format!("m.{name}"))?;
            let exp_avg_sq = moments.tensor_raw(&format!("v.{name}"))?;
            optimizer
                .set_moments(i, &exp_avg, &exp_avg_sq)
                .map_err(|e| {
                    Error::config(ckpt.join("optimizer.safetensors"), format!("{name}: {e}"))
                })?;
        }
        optimizer.step = state.adam_step;
        s.method.load_state(&state.method_state)?;
        start_step = state.step;
        tracing::info!("resuming from {} at step {start_step}", ckpt.display());
    }

    if start_step > total_steps {
        return Err(Error::InvalidArgument(format!(
            "the checkpoint is at step {start_step}, past the recipe's {total_steps} steps (raise train.steps or train.epochs to go on from it)"
        )));
    }

    s.method.prepare_text(s.tok)?;
    s.method.prepare(&s.model, &s.primary.examples, pad_id)?;

    // What a previous run ending here wrote describes its end, not this run's: the adapter,
    // the merged model and charts are written again when this one ends; its evaluations
    // after the resumed step go below, and all of them when this run does not evaluate.
    for stale in ["adapter", "merged", "plots"] {
        remove_dir_if_exists(&out_dir.join(stale))?;
    }
    if s.evaluator.is_none() {
        remove_dir_if_exists(&out_dir.join("evals"))?;
    }
    let metrics_path = out_dir.join("metrics.jsonl");
    truncate_metrics(&metrics_path, start_step)?;
    drop_checkpoints_after(&out_dir.join("checkpoints"), start_step)?;
    drop_stale_best(&out_dir.join("best.json"), start_step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    if let Some(ev) = &mut s.evaluator {
        ev.drop_evals_after(start_step)?;
        ev.replay(&metrics_path)?;
        if start_step == 0 && ev.before() {
            let summary = ev.run(0, None)?;
            write_eval_line(&mut metrics, &metrics_path, 0, summary)?;
        }
    }

    let bar = progress_bar(opts.progress, total_steps, start_step);
    let started = std::time::Instant::now();
    let mut tokens_seen = 0usize;
    let mut last_logs: Logs = vec![];
    let mut interrupted = false;
    let mut step = start_step;
    while step < total_steps {
        let lr = lr_at(t.schedule, t.lr, step, t.warmup_steps, total_steps);
        let mut batches = Vec::with_capacity(t.grad_accum);
        let mut summed: Option<Vec<Tensor>> = None;
        let mut logs_acc: Vec<(String, f64)> = vec![];
        for micro in 0..t.grad_accum {
            let k = (step * t.grad_accum + micro) * t.batch_size;
            let fidx = draw(s.primary.len(), t.seed, "forget", k, t.batch_size);
            let forget_batch = ItemBatch::new(&s.primary, fidx, pad_id, &opts.device)?;
            let retain_batch = match &s.retain {
                Some(r) => Some(ItemBatch::new(
                    r,
                    draw(r.len(), t.seed, "retain", k, t.batch_size),
                    pad_id,
                    &opts.device,
                )?),
                None => None,
            };
            tokens_seen += forget_batch.input_ids.elem_count()
                + retain_batch
                    .as_ref()
                    .map_or(0, |b| b.input_ids.elem_count());
            let batch = PairedBatch {
                forget: forget_batch,
                retain: retain_batch,
            };
            let fwd = ForwardOptions::training(
                Rng::new(t.seed)
                    .fork("dropout")
                    .fork(&format!("{step}.{micro}")),
            );
            let ctx = Ctx {
                model: &s.model,
                vars: &vars,
                opts: &fwd,
                step,
                micro,
            };
            let (grads, logs) = s.method.gradients(&ctx, &batch)?;
            let loss = logs
                .iter()
                .find(|(k, _)| k == "loss")
                .map(|(_, v)| *v)
                .unwrap_or(0.0);
            if !loss.is_finite() || grads.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "step {}: the loss is {loss}; stopping (the last good checkpoint, if any, is in {})",
                    step + 1,
                    out_dir.join("checkpoints").display()
                )));
            }
            accumulate(&mut logs_acc, &logs, t.grad_accum);
            // a method's combined gradients must not keep this step's graph alive
            let grads: Vec<Tensor> = grads.iter().map(Tensor::detach).collect();
            let scaled: Vec<Tensor> = if t.grad_accum > 1 {
                grads
                    .iter()
                    .map(|g| g / t.grad_accum as f64)
                    .collect::<candle_core::Result<_>>()?
            } else {
                grads
            };
            summed = Some(match summed {
                None => scaled,
                Some(acc) => acc
                    .iter()
                    .zip(&scaled)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
            batches.push(batch);
        }
        let grads = summed.ok_or_else(|| Error::InvalidArgument("no micro-batches".into()))?;
        let (grad_norm, grad_scale) = clip_scale(&grads, t.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "step {}: the gradient norm is {grad_norm}; stopping",
                step + 1
            )));
        }
        optimizer.step_scaled(&vars, &grads, grad_scale, lr)?;
        let fwd = ForwardOptions::eval();
        let ctx = Ctx {
            model: &s.model,
            vars: &vars,
            opts: &fwd,
            step,
            micro: 0,
        };
        let after = s.method.after_update(&ctx, &batches)?;
        step += 1;
        logs_acc.extend(after);
        logs_acc.push(("grad_norm".into(), grad_norm));
        logs_acc.push(("lr".into(), lr));
        write_metrics_line(&mut metrics, &metrics_path, step, &logs_acc)?;
        let tok_s = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &bar {
            bar.set_position(step as u64);
            bar.set_message(format_logs(&logs_acc, tok_s));
        } else if t.log_every > 0 && (step % t.log_every == 0 || step == total_steps) {
            tracing::info!(
                "step {step}/{total_steps} {}",
                format_logs(&logs_acc, tok_s)
            );
        }
        last_logs = logs_acc;
        interrupted = opts.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
        let eval_due = s
            .evaluator
            .as_ref()
            .is_some_and(|ev| ev.due(step, total_steps));
        let due = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
        if due || eval_due || interrupted || step == total_steps {
            save_checkpoint(s, step, total_steps, &optimizer, &var_names)?;
        }
        if let (true, Some(ev)) = (eval_due, s.evaluator.as_mut()) {
            let ckpt = out_dir.join("checkpoints").join(format!("step-{step:06}"));
            let summary = ev.run(step, Some(&ckpt))?;
            write_eval_line(&mut metrics, &metrics_path, step, summary)?;
        }
        if t.keep_checkpoints > 0 && (due || eval_due || interrupted || step == total_steps) {
            // after the evaluation, so that a new best is known before older ones go
            let best = s.evaluator.as_ref().and_then(|ev| ev.best).map(|b| b.0);
            prune_checkpoints(&out_dir.join("checkpoints"), t.keep_checkpoints, best)?;
        }
        if interrupted {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(LoopEnd {
        steps: step,
        interrupted,
        last_logs,
    })
}

fn accumulate(acc: &mut Vec<(String, f64)>, logs: &Logs, n: usize) {
    for (k, v) in logs {
        // λ is a state, not a per-batch quantity: keep the value, do not average
        let avg = if k.starts_with("lambda") || k == "slack" {
            *v
        } else {
            v / n as f64
        };
        match acc.iter_mut().find(|(name, _)| name == k) {
            Some((_, total)) if !k.starts_with("lambda") && k != "slack" => *total += avg,
            Some((_, total)) => *total = avg,
            None => acc.push((k.clone(), avg)),
        }
    }
}

fn write_eval_line(
    file: &mut std::fs::File,
    path: &Path,
    step: usize,
    summary: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let line = serde_json::json!({"step": step, "eval": summary}).to_string();
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))?;
    file.flush().map_err(|e| Error::io(path, e))
}

fn format_logs(logs: &Logs, tok_s: f64) -> String {
    let mut s: Vec<String> = logs
        .iter()
        .filter(|(k, _)| k != "lr")
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    s.push(format!("{tok_s:.0} tok/s"));
    s.join("  ")
}

fn progress_bar(show: bool, total: usize, start: usize) -> Option<indicatif::ProgressBar> {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "step {pos}/{len} {bar:30} [{elapsed} < {eta}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    Some(bar)
}

fn write_metrics_line(
    file: &mut std::fs::File,
    path: &Path,
    step: usize,
    logs: &Logs,
) -> Result<()> {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), serde_json::json!(step));
    for (k, v) in logs {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    let line = serde_json::Value::Object(obj).to_string();
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))?;
    file.flush().map_err(|e| Error::io(path, e))
}

/// Drop lines past `step` (a resumed run rewrites them, so the file equals a straight run).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if step == 0 {
        return write_atomic(path, b"");
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

fn save_checkpoint(
    s: &Session,
    step: usize,
    total_steps: usize,
    optimizer: &AdamW,
    var_names: &[String],
) -> Result<()> {
    let root = s.out_dir.join("checkpoints");
    // every checkpoint, and so the adapter or model written at the end (after the last step's
    // checkpoint), holds finite weights: a step can overflow them without a NaN loss yet
    let weights: Vec<Tensor> = s
        .params
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    if !all_finite(&weights)? {
        return Err(Error::InvalidArgument(format!(
            "step {step}: the trained weights hold NaN or infinite values (is the learning rate too high?); not writing them (the last good checkpoint, if any, is in {})",
            root.display()
        )));
    }
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let final_dir = root.join(format!("step-{step:06}"));
    let staging = root.join(format!(".step-{step:06}.tmp"));
    remove_dir_if_exists(&staging)?;
    s.trainable.write(&staging, &s.model, &s.params)?;
    let mut moments = Vec::new();
    for (i, name) in var_names.iter().enumerate() {
        moments.push((
            format!("m.{name}"),
            OwnedView::from_tensor(&optimizer.exp_avg(i)?)?,
        ));
        moments.push((
            format!("v.{name}"),
            OwnedView::from_tensor(&optimizer.exp_avg_sq(i)?)?,
        ));
    }
    write_safetensors(&staging.join("optimizer.safetensors"), &moments)?;
    let state = CheckpointState {
        step,
        total_steps,
        seed: s.train.seed,
        method: s.method.name().to_string(),
        method_state: s.method.state(),
        adam_step: optimizer.step,
    };
    let text =
        serde_json::to_string_pretty(&state).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&staging.join("state.json"), text.as_bytes())?;
    replace_dir(&staging, &final_dir)
}

/// The complete checkpoints (`step-*` with a state.json) under `root`, oldest first.
fn checkpoint_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").exists()
        })
        .collect();
    // zero-padded step numbers: name order is step order
    steps.sort();
    Ok(steps)
}

/// A checkpoint dir itself, or the latest `checkpoints/step-*` of an output dir.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").exists() {
        return Ok(path.to_path_buf());
    }
    let root = path.join("checkpoints");
    let latest = checkpoint_dirs(&root)?
        .pop()
        .ok_or_else(|| Error::config(&root, "no checkpoint (step-*/state.json) to resume from"))?;
    // checkpoints are renamed into place whole, so a later step-* without state.json was
    // damaged afterwards: resuming from the one before it is right, but should be said
    let mut damaged: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("step-")
                    && latest
                        .file_name()
                        .is_some_and(|l| *n > *l.to_string_lossy())
            }) && !p.join("state.json").exists()
        })
        .collect();
    damaged.sort();
    if let Some(newest) = damaged.last() {
        tracing::warn!(
            "{} has no state.json (damaged?); resuming from the latest complete checkpoint, {}",
            newest.display(),
            latest.display()
        );
    }
    Ok(latest)
}

/// Remove the checkpoints of steps after `step` under `root`, as metrics.jsonl is truncated
/// there: a fresh run (`step` 0) into an old output directory, or a resume from an earlier
/// checkpoint, must not leave another trajectory's later checkpoints behind — `--resume DIR`
/// would continue that trajectory, and pruning (which keeps the latest) would delete this
/// run's own checkpoints in favour of them.
fn drop_checkpoints_after(root: &Path, step: usize) -> Result<()> {
    if !root.is_dir() {
        return Ok(());
    }
    for dir in checkpoint_dirs(root)? {
        let later = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|s| s > step);
        if later {
            tracing::info!("removing {}: a checkpoint of an earlier run", dir.display());
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
    }
    Ok(())
}

/// best.json of an earlier run: removed on a fresh start, or when it names a step after the
/// one resumed from (this run writes its own at the end).
fn drop_stale_best(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let best_step = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
    if step == 0 || best_step.is_none_or(|b| b as usize > step) {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Delete every checkpoint under `root` but the `keep` most recent and the one of step `best`
/// (the run's best evaluation names it in best.json).
fn prune_checkpoints(root: &Path, keep: usize, best: Option<usize>) -> Result<()> {
    let steps = checkpoint_dirs(root)?;
    let old = steps.len().saturating_sub(keep);
    let best_name = best.map(|b| format!("step-{b:06}"));
    for dir in &steps[..old] {
        if dir.file_name().and_then(|n| n.to_str()) == best_name.as_deref() {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn pruning_keeps_the_latest_and_the_best_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let root = &tmp.path().join("checkpoints");
        for step in 1..=5 {
            let d = root.join(format!("step-{step:06}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("state.json"), "{}").unwrap();
        }
        // a checkpoint still being written is not a checkpoint yet
        std::fs::create_dir_all(root.join(".step-000006.tmp")).unwrap();
        prune_checkpoints(root, 2, Some(2)).unwrap();
        assert_eq!(
            names(root),
            vec![
                ".step-000006.tmp",
                "step-000002",
                "step-000004",
                "step-000005"
            ]
        );
        prune_checkpoints(root, 1, None).unwrap();
        assert_eq!(names(root), vec![".step-000006.tmp", "step-000005"]);
        assert_eq!(
            find_checkpoint(tmp.path()).unwrap(),
            root.join("step-000005")
        );
        prune_checkpoints(root, 3, None).unwrap();
        assert_eq!(names(root), vec![".step-000006.tmp", "step-000005"]);
    }

    #[test]
    fn checkpoints_and_best_of_later_steps_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let root = &tmp.path().join("checkpoints");
        for step in [10, 20, 30] {
            let d = root.join(format!("step-{step:06}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("state.json"), "{}").unwrap();
        }
        drop_checkpoints_after(root, 20).unwrap();
        assert_eq!(names(root), vec!["step-000010", "step-000020"]);
        drop_checkpoints_after(root, 0).unwrap();
        assert!(names(root).is_empty());
        drop_checkpoints_after(&tmp.path().join("none"), 0).unwrap();

        let best = tmp.path().join("best.json");
        std::fs::write(&best, r#"{"step": 20}"#).unwrap();
        drop_stale_best(&best, 20).unwrap();
        assert!(best.exists(), "resuming at the best step keeps it");
        drop_stale_best(&best, 10).unwrap();
        assert!(
            !best.exists(),
            "a best step after the resumed one is another trajectory's"
        );
        std::fs::write(&best, r#"{"step": 0}"#).unwrap();
        drop_stale_best(&best, 0).unwrap();
        assert!(!best.exists(), "a fresh run writes its own");
    }
}
