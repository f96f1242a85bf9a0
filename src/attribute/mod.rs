//! `unlearn attribute`: predict the model retrained without the forget set — without
//! retraining — as a "shadow" LoRA adapter, the target of datamodel matching (`method = "dmm"`,
//! arXiv 2410.23232; algorithms.md §4.2).
//!
//! The shadow is written in PEFT's format, so the predicted-retrained logits of any input are one
//! forward pass with that adapter (no logit dumps on disk). Two kinds of estimator produce it:
//! one influence step δ = m·(C + λI)⁻¹·g_F ([`influence`]) in a LoRA-shaped subspace (cg,
//! diagonal, identity; below), or the simulated oracle ([`simulated`]: the model fine-tuned on
//! the retain data alone, its change stored exactly as a full-rank adapter). Several can run
//! side by side; the report says which is closest to an oracle, and the main one is saved.
//!
//! **The subspace.** A fresh LoRA (B = 0) is degenerate for a first-order step: ∇_A = 0, and
//! with a random A the gradient w.r.t. B only sees the forget gradient's projection on r random
//! input directions (≈ r/in of it). We fix A per module to the top-r right singular vectors of
//! that module's full forget gradient G = Σ_F ∂ℓ/∂W (one backward over the forget set) and make
//! B (out × r) the parameters. Then ∇_B = G·Aᵀ is the best rank-r part of G, the subspace is
//! where removing F pushes hardest, and ΔW = B·A is an ordinary PEFT adapter (alpha = r).
//!
//! **The curvature.** C estimates the curvature of the retain training loss from per-example
//! vectors in that subspace on `attribute.samples` retain items, rescaled to the whole retain
//! set. "logits" (default) uses random projections uᵀJ of each item's answer-position logit
//! Jacobian J (u ~ N(0, I)), so E\[C\] = Σ JᵀJ, the Gauss-Newton matrix of the logit-MSE loss DMM
//! matches with: the step then moves the retain logits least. "fisher" samples each answer token
//! from the model's own prediction (the Fisher of the NLL), "empirical" uses the gold tokens'
//! gradients — both nearly vanish on memorised data, where the softmax is saturated.
//! λ = damping · trace(C)/P.
//!
//! **The scale m.** "auto" picks m so that the shadow's mean per-token NLL on the forget set
//! equals the model's own NLL on items it never saw (`data.calibrate`, e.g. holdout people): a
//! model retrained without F treats F like unseen data. No oracle is used for this.
pub mod influence;
pub mod lowrank;
pub mod simulated;

use crate::error::{Error, Result};
use crate::lora::{attach_lora, lora_vars, save_adapter, LoraConfig};
use crate::methods::grads_of;
use crate::model::decoder::LoraWeights;
use crate::model::ops::{log_softmax_last_dim, shifted_token_nll};
use crate::model::{Decoder, ForwardOptions};
use crate::recipe::{AttributeRecipe, StepScale};
use crate::rng::Rng;
use crate::score::{collate, score_examples};
use crate::tokenizer::{ChatTokenizer, EncodedExample};
use crate::train::batch::Dataset;
use candle_core::{DType, Device, Tensor, Var, D};
use influence::{influence_step, Curvature, Estimator, SolveInfo};
use serde::Serialize;
use simulated::SimulatedInfo;
use std::path::Path;

/// What `unlearn attribute` reports (report.json).
#[derive(Debug, Clone, Serialize)]
pub struct AttributeReport {
    pub model: String,
    pub forget: String,
    /// the influence step's subspace and curvature (when an influence estimator ran)
    pub influence: Option<InfluenceInfo>,
    /// the simulated oracle and its adapter (when the simulated estimator ran)
    pub simulated: Option<SimulatedInfo>,
    /// per estimator, the main one first
    pub estimators: Vec<EstimatorReport>,
    /// the estimator whose shadow is closest to the oracle on the first report split
    /// (only with a `[report]` section)
    pub closest: Option<String>,
    pub seconds: f64,
}

/// The influence step's subspace and curvature.
#[derive(Debug, Clone, Serialize)]
pub struct InfluenceInfo {
    pub subspace_rank: usize,
    pub modules: usize,
    /// parameters of the subspace (Σ out_features · r)
    pub parameters: usize,
    pub curvature: String,
    pub curvature_samples: usize,
    /// λ = damping · mean eigenvalue
    pub damping: f64,
    pub lambda: f64,
    pub mean_eigenvalue: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EstimatorReport {
    pub estimator: String,
    /// per step (attribute.steps; 1 = the plain influence step)
    pub solves: Vec<SolveInfo>,
    pub scales: Vec<f64>,
    /// mean per-token NLL of the model on data.calibrate (the auto-scale's goal)
    pub calibrate_nll: Option<f64>,
    pub forget_nll_before: f64,
    pub forget_nll_after: f64,
    /// ‖δ‖ of the saved (scaled) step
    pub step_norm: f64,
    pub splits: Vec<SplitReport>,
}

/// How close the model and its shadow are to the oracle on one split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub split: String,
    pub items: usize,
    pub tokens: usize,
    /// mean over answer tokens of KL(target ‖ oracle) of the next-token distributions
    pub kl_target_oracle: f64,
    /// … and of KL(shadow ‖ oracle)
    pub kl_shadow_oracle: f64,
    /// Pearson correlation over items of the per-item loss change (mean NLL) predicted by the
    /// shadow (shadow − target) and the real one (oracle − target)
    pub loss_change_correlation: Option<f64>,
    /// mean over answer tokens of KL(mean of the report.references models ‖ oracle)
    pub kl_references_oracle: Option<f64>,
}

/// Per-item sums over answer tokens.
#[derive(Debug, Clone, Copy, Default)]
struct ItemStats {
    tokens: usize,
    kl_to_oracle: f64,
    nll: f64,
    oracle_nll: f64,
}

/// Run an attribute recipe: write `<dir>/shadow/` (PEFT adapter), `report.json`, `report.md`.
pub fn run(recipe: &AttributeRecipe, device: &Device, progress: bool) -> Result<AttributeReport> {
    let started = std::time::Instant::now();
    // a local checkpoint directory or a hub id, as in every recipe
    let model_dir = crate::train::trainer::model_path(&recipe.model.path)?;
    let model_dir = model_dir.as_path();
    let tok = ChatTokenizer::from_dir(model_dir)?.with_prompt_style(recipe.data.prompt_style());
    let pad_id = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    let a = &recipe.attribute;
    let out = Path::new(&recipe.output.dir);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::model::weights::write_atomic(&out.join("recipe.toml"), recipe.to_toml()?.as_bytes())?;
    let mut estimators: Vec<Estimator> = vec![a.estimator];
    for e in &a.compare {
        if !estimators.contains(e) {
            estimators.push(*e);
        }
    }
    // the simulated oracle's fine-tuning first, before the models of the report are loaded
    let simulated_run = if estimators.contains(&Estimator::Simulated) {
        let train = recipe.simulate.as_ref().ok_or_else(|| {
            Error::InvalidArgument("the simulated estimator needs a [simulate] section".into())
        })?;
        say(progress, "simulated oracle: fine-tuning on the retain data");
        Some(simulated::fine_tune(
            recipe,
            train,
            &out.join("simulate"),
            device,
            progress,
        )?)
    } else {
        None
    };
    // gradients and the step are computed in f32 whatever the device
    let base = Decoder::load(model_dir, DType::F32, device)?;
    let max_len = recipe.data.max_length;
    let forget = Dataset::load(Path::new(&recipe.data.forget), &tok, max_len)?;
    let calibrate = match &recipe.data.calibrate {
        Some(p) => Some(Dataset::load(Path::new(p), &tok, max_len)?),
        None => None,
    };

    let calibrate_nll = match &calibrate {
        Some(c) => Some(mean_nll(
            &base,
            &c.examples,
            a.batch_size,
            pad_id,
            &ForwardOptions::base_model(),
        )?),
        None => None,
    };
    let forget_nll_before = mean_nll(
        &base,
        &forget.examples,
        a.batch_size,
        pad_id,
        &ForwardOptions::base_model(),
    )?;
    let report_sets = match &recipe.report {
        Some(r) => Some(report_sets(r, &base, &tok, max_len, a.batch_size, pad_id)?),
        None => None,
    };
    let ctx = Shared {
        tok: &tok,
        forget: &forget,
        calibrate_nll,
        forget_nll_before,
        report_sets: report_sets.as_ref(),
        pad_id,
    };

    let mut reports = Vec::new();
    let mut influence_info = None;
    let mut simulated_info = None;
    // the main estimator's adapter, staged in the run directory
    let staging = out.join(".shadow.partial");
    crate::model::weights::remove_dir_if_exists(&staging)?;
    let influence: Vec<Estimator> = estimators
        .iter()
        .copied()
        .filter(|e| *e != Estimator::Simulated)
        .collect();
    for &est in &estimators {
        let main = reports.is_empty();
        if est == Estimator::Simulated {
            let (tuned_dir, steps) = simulated_run.as_ref().ok_or_else(|| {
                Error::InvalidArgument("the simulated oracle was not fine-tuned".into())
            })?;
            let (report, info) = run_simulated(
                recipe,
                &base,
                &ctx,
                (tuned_dir, *steps),
                device,
                progress,
                main.then_some(staging.as_path()),
            )?;
            reports.push(report);
            simulated_info = Some(info);
        } else if influence_info.is_none() {
            // every influence estimator shares one subspace and curvature
            let (r, info) = run_influence(
                recipe,
                &base,
                &ctx,
                &influence,
                progress,
                main.then_some(staging.as_path()),
            )?;
            reports.extend(r);
            influence_info = Some(info);
        }
    }
    let closest = report_sets.as_ref().and_then(|_| {
        reports
            .iter()
            .filter_map(|r| {
                r.splits
                    .first()
                    .map(|s| (s.kl_shadow_oracle, r.estimator.clone()))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, name)| name)
    });

    // the main estimator's shadow adapter and the report
    crate::model::weights::replace_dir(&staging, &out.join("shadow"))?;
    let report = AttributeReport {
        model: recipe.model.path.clone(),
        forget: recipe.data.forget.clone(),
        influence: influence_info,
        simulated: simulated_info,
        estimators: reports,
        closest,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json =
        serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    crate::model::weights::write_atomic(&out.join("report.json"), json.as_bytes())?;
    crate::model::weights::write_atomic(&out.join("report.md"), markdown(&report).as_bytes())?;
    Ok(report)
}

/// A report split: its items, the target's per-item stats against the oracle, and the
/// references' mixture KL.
type ReportSet = (String, Dataset, Vec<ItemStats>, Option<f64>);

/// What every estimator reads.
struct Shared<'a> {
    tok: &'a ChatTokenizer,
    forget: &'a Dataset,
    calibrate_nll: Option<f64>,
    forget_nll_before: f64,
    /// the oracle and the report splits
    report_sets: Option<&'a (Decoder, Vec<ReportSet>)>,
    pad_id: u32,
}

impl Shared<'_> {
    /// How close `model` (with `opts`) gets to the oracle on each report split.
    fn splits(
        &self,
        model: &Decoder,
        opts: &ForwardOptions,
        batch: usize,
    ) -> Result<Vec<SplitReport>> {
        let mut splits = Vec::new();
        if let Some((oracle, sets)) = self.report_sets {
            for (split, ds, target, floor) in sets {
                let shadow = item_stats(model, opts, oracle, &ds.examples, batch, self.pad_id)?;
                splits.push(split_report(split, target, &shadow, *floor));
            }
        }
        Ok(splits)
    }
}

/// Load the oracle, the references and the report splits, and score the target on them.
fn report_sets(
    r: &crate::recipe::AttributeReportSection,
    model: &Decoder,
    tok: &ChatTokenizer,
    max_len: usize,
    batch: usize,
    pad_id: u32,
) -> Result<(Decoder, Vec<ReportSet>)> {
    let device = model.device.clone();
    let load = |key: &str, p: &str| -> Result<Decoder> {
        let m = Decoder::load(Path::new(p), DType::F32, &device)?;
        if m.cfg.vocab_size != model.cfg.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "{key} {p}: vocabulary size {} differs from the model's {}",
                m.cfg.vocab_size, model.cfg.vocab_size
            )));
        }
        Ok(m)
    };
    let oracle = load("report.oracle", &r.oracle)?;
    let references = r
        .references
        .iter()
        .map(|p| load("report.references", p))
        .collect::<Result<Vec<_>>>()?;
    let mut sets = Vec::new();
    for entry in &r.data {
        let (split, path) = entry.split_once('=').unwrap_or(("data", entry));
        let ds = Dataset::load(Path::new(path), tok, max_len)?;
        let target = item_stats(
            model,
            &ForwardOptions::base_model(),
            &oracle,
            &ds.examples,
            batch,
            pad_id,
        )?;
        let floor = if references.is_empty() {
            None
        } else {
            Some(mixture_kl(
                &references,
                &oracle,
                &ds.examples,
                batch,
                pad_id,
            )?)
        };
        sets.push((split.to_string(), ds, target, floor));
    }
    Ok((oracle, sets))
}

/// The simulated oracle ([`simulated`]), fine-tuned into `tuned_dir` in `steps` steps: store its
/// change as an adapter (into `stage` when this is the main estimator) and report what that
/// adapter predicts — read back from disk, as DMM will read it.
fn run_simulated(
    recipe: &AttributeRecipe,
    base: &Decoder,
    ctx: &Shared,
    (tuned_dir, steps): (&Path, usize),
    device: &Device,
    progress: bool,
    stage: Option<&Path>,
) -> Result<(EstimatorReport, SimulatedInfo)> {
    let a = &recipe.attribute;
    let out = Path::new(&recipe.output.dir);
    let train = recipe.simulate.clone().unwrap_or_default();
    say(progress, "simulated oracle: its adapter");
    let tuned = Decoder::load(tuned_dir, DType::F32, device)?;
    let mut rng = crate::rng::Rng::new(a.seed).fork("shadow-rank");
    let (shadow, cfg, drops) = simulated::shadow_adapter(base, &tuned, a.shadow_rank, &mut rng)?;
    drop(tuned);
    let dir = match stage {
        Some(s) => s.to_path_buf(),
        None => out.join(".simulated.partial"),
    };
    crate::model::weights::remove_dir_if_exists(&dir)?;
    save_adapter(&shadow, &cfg, &dir, Some(&recipe.model.path))?;
    drop(shadow);
    let mut reader = base.clone();
    crate::lora::load_adapter(&mut reader, &dir)?;
    if stage.is_none() {
        crate::model::weights::remove_dir_if_exists(&dir)?;
    }
    say(progress, "simulated oracle: report");
    let forget_nll_after = mean_nll(
        &reader,
        &ctx.forget.examples,
        a.batch_size,
        ctx.pad_id,
        &ForwardOptions::eval(),
    )?;
    let report = EstimatorReport {
        estimator: Estimator::Simulated.name().into(),
        solves: vec![],
        scales: vec![],
        calibrate_nll: ctx.calibrate_nll,
        forget_nll_before: ctx.forget_nll_before,
        forget_nll_after,
        step_norm: drops.carried_norm,
        splits: ctx.splits(&reader, &ForwardOptions::eval(), a.batch_size)?,
    };
    let info = SimulatedInfo {
        steps,
        train,
        adapter: drops,
    };
    Ok((report, info))
}

/// The influence estimators (one shared subspace and curvature): one report each, the first's
/// adapter saved into `stage` when it is the main estimator.
fn run_influence(
    recipe: &AttributeRecipe,
    base: &Decoder,
    ctx: &Shared,
    estimators: &[Estimator],
    progress: bool,
    stage: Option<&Path>,
) -> Result<(Vec<EstimatorReport>, InfluenceInfo)> {
    let a = &recipe.attribute;
    let pad_id = ctx.pad_id;
    let forget = ctx.forget;
    let mut model = base.clone();
    let retain = Dataset::load_all(
        &recipe.data.retain.to_vec(),
        ctx.tok,
        recipe.data.max_length,
    )?;
    let cfg = recipe.subspace.to_config()?;

    // 1. the subspace: A from the forget gradient of each targeted weight
    say(
        progress,
        &format!(
            "forget gradient of the targeted weights ({} items)",
            forget.len()
        ),
    );
    let grads = forget_weight_gradients(&model, &cfg, &forget.examples, a.batch_size, pad_id)?;
    let mut g_f: Vec<f64> = Vec::new();
    let mut bases: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    for (name, out, inp, g) in &grads {
        let basis = influence::top_right_singular_vectors(g, *out, *inp, cfg.r, a.seed)?;
        // ∇_B = G·Aᵀ, [out, r] row-major (B's layout)
        for row in g.chunks(*inp) {
            for v in &basis {
                g_f.push(row.iter().zip(v).map(|(x, y)| x * y).sum());
            }
        }
        bases.push((name.clone(), basis));
    }
    attach_basis(&mut model, &cfg, &bases)?;
    let b_vars: Vec<Var> = lora_vars(&model)
        .into_iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, v)| v)
        .collect();
    let parameters = g_f.len();

    // 2. the curvature of the retain loss in the subspace
    let n_samples = a.samples.min(retain.len());
    let mut order: Vec<usize> = (0..retain.len()).collect();
    Rng::new(a.seed).fork("curvature").shuffle(&mut order);
    order.truncate(n_samples);
    let bar = bar(progress, n_samples, "per-example gradients");
    let mut curv_rng = Rng::new(a.seed).fork("curvature-rows");
    let mut rows = Vec::with_capacity(n_samples);
    for &i in &order {
        let ex = &retain.examples[i];
        rows.push(example_gradient(
            &model,
            &b_vars,
            ex,
            pad_id,
            match a.curvature.as_str() {
                "fisher" => Curv::Fisher(&mut curv_rng),
                "logits" => Curv::Logits(&mut curv_rng),
                _ => Curv::Empirical,
            },
        )?);
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let curvature = Curvature::new(parameters, rows, retain.len() as f64 / n_samples as f64)?;
    let mean_eigenvalue = curvature.mean_eigenvalue();
    if mean_eigenvalue.is_nan() || mean_eigenvalue <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{}: the per-example gradients are all zero, so the curvature is empty",
            retain.name
        )));
    }
    let lambda = a.damping * mean_eigenvalue;

    // 3. the step for each estimator, its scale, and (with an oracle) how close it gets
    let zero: Vec<f64> = vec![0.0; parameters];
    let scale = recipe
        .step_scale()
        .map_err(|m| Error::InvalidArgument(format!("attribute.scale: {m}")))?;
    let mut reports = Vec::new();
    let mut main_step = None;
    for &est in estimators {
        say(
            progress,
            &format!("influence step ({}), scale and report", est.name()),
        );
        let mut step = zero.clone();
        let mut scales = Vec::with_capacity(a.steps);
        let mut solves = Vec::with_capacity(a.steps);
        for k in 0..a.steps {
            // re-linearise: the forget gradient in the subspace where the last step ended
            let g = if k == 0 {
                g_f.clone()
            } else {
                set_b(&b_vars, &step)?;
                subspace_forget_gradient(&model, &b_vars, &forget.examples, a.batch_size, pad_id)?
            };
            let (delta, solve) = influence_step(&curvature, &g, lambda, est, a.cg_iters, a.cg_tol)?;
            let m = match scale {
                StepScale::Fixed(m) => m,
                StepScale::Auto => {
                    let goal = ctx.calibrate_nll.ok_or_else(|| {
                        Error::InvalidArgument(
                            "attribute.scale = \"auto\" needs data.calibrate".into(),
                        )
                    })?;
                    // equal ratios of forget NLL per step, ending at the goal
                    let frac = (k + 1) as f64 / a.steps as f64;
                    let before = ctx.forget_nll_before;
                    let goal_k = before * (goal / before).powf(frac);
                    let forget = &forget.examples;
                    calibrate_scale(
                        &model,
                        &b_vars,
                        &step,
                        &delta,
                        forget,
                        goal_k,
                        a.batch_size,
                        pad_id,
                    )?
                }
            };
            for (s, d) in step.iter_mut().zip(&delta) {
                *s += m * d;
            }
            scales.push(m);
            solves.push(solve);
        }
        let forget_nll_after = nll_with_step(
            &model,
            &b_vars,
            &step,
            &forget.examples,
            a.batch_size,
            pad_id,
        )?;
        let splits = ctx.splits(&model, &ForwardOptions::eval(), a.batch_size)?;
        reports.push(EstimatorReport {
            estimator: est.name().into(),
            solves,
            scales,
            calibrate_nll: ctx.calibrate_nll,
            forget_nll_before: ctx.forget_nll_before,
            forget_nll_after,
            step_norm: step.iter().map(|v| v * v).sum::<f64>().sqrt(),
            splits,
        });
        if main_step.is_none() {
            main_step = Some(step);
        }
    }
    if let Some(dir) = stage {
        set_b(&b_vars, main_step.as_deref().unwrap_or(&zero))?;
        save_adapter(&model, &cfg, dir, Some(&recipe.model.path))?;
    }
    let info = InfluenceInfo {
        subspace_rank: cfg.r,
        modules: bases.len(),
        parameters,
        curvature: a.curvature.clone(),
        curvature_samples: n_samples,
        damping: a.damping,
        lambda,
        mean_eigenvalue,
    };
    Ok((reports, info))
}

/// One line per phase on stderr when run from the command line (the default log level hides
/// tracing's info).
fn say(progress: bool, what: &str) {
    if progress {
        eprintln!("{what}…");
    }
}

fn bar(progress: bool, len: usize, what: &str) -> Option<indicatif::ProgressBar> {
    if !progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}]"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    Some(indicatif::ProgressBar::new(len as u64).with_style(style))
}

/// (module path, out_features, in_features, row-major gradient)
type WeightGradient = (String, usize, usize, Vec<f64>);

/// Σ_F ∂ℓ/∂W for every targeted weight W (ℓ = summed answer-token NLL of one item), as
/// (module path, out, in, row-major f64 values). The targeted weights become variables of a
/// copy of the model that shares every other tensor.
fn forget_weight_gradients(
    model: &Decoder,
    cfg: &LoraConfig,
    forget: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<WeightGradient>> {
    let mut copy = model.clone();
    let mut vars = Vec::new();
    let mut meta = Vec::new();
    for lin in copy.linears_mut() {
        if !cfg.targets(&lin.name)? {
            continue;
        }
        if lin.conv1d {
            return Err(Error::InvalidArgument(format!(
                "attribute: {} is a Conv1D (GPT-2) weight; the influence subspace supports linear layers only",
                lin.name
            )));
        }
        let var = Var::from_tensor(&lin.weight)?;
        lin.weight = var.as_tensor().clone();
        meta.push((lin.name.clone(), lin.out_features(), lin.in_features()));
        vars.push(var);
    }
    if vars.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "subspace.target_modules {:?} match no module of this model",
            cfg.target_modules
        )));
    }
    let sums = summed_nll_gradients(
        &copy,
        &vars,
        forget,
        batch_size,
        pad_id,
        &ForwardOptions::base_model(),
    )?;
    Ok(meta
        .into_iter()
        .zip(sums)
        .map(|((n, o, i), g)| (n, o, i, g))
        .collect())
}

/// Σ_F ∂ℓ/∂B at the current B, flattened in model order.
fn subspace_forget_gradient(
    model: &Decoder,
    b_vars: &[Var],
    forget: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<f64>> {
    let opts = ForwardOptions::default();
    let sums = summed_nll_gradients(model, b_vars, forget, batch_size, pad_id, &opts)?;
    Ok(sums.concat())
}

/// Σ over `examples` of the gradient of the summed answer-token NLL w.r.t. each of `vars`
/// (flattened, f64), in batches of `batch_size`.
fn summed_nll_gradients(
    model: &Decoder,
    vars: &[Var],
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
    opts: &ForwardOptions,
) -> Result<Vec<Vec<f64>>> {
    let mut sums: Vec<Vec<f64>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    for chunk in refs.chunks(batch_size) {
        let batch = collate(chunk, pad_id, &model.device)?;
        let logits = model.forward(
            &crate::model::ModelInput::new(&batch.input_ids, Some(&batch.attention_mask)),
            opts,
        )?;
        let (nll, _) = shifted_token_nll(&logits, &batch.labels)?;
        for (sum, g) in sums.iter_mut().zip(grads_of(&nll.sum_all()?, vars)?) {
            let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            for (s, v) in sum.iter_mut().zip(g) {
                *s += v;
            }
        }
    }
    Ok(sums)
}

/// Give each targeted module a LoRA with A = its basis (fixed) and B = 0, scale 1.
fn attach_basis(
    model: &mut Decoder,
    cfg: &LoraConfig,
    bases: &[(String, Vec<Vec<f64>>)],
) -> Result<()> {
    // attach_lora validates and places adapters exactly where PEFT would; A is then replaced
    attach_lora(model, cfg, &mut Rng::new(0))?;
    let mut it = bases.iter();
    for lin in model.linears_mut() {
        let Some(l) = &mut lin.lora else { continue };
        let (name, basis) = it.next().ok_or_else(|| {
            Error::InvalidArgument("attribute: more adapters than gradient bases".into())
        })?;
        if name != &lin.name {
            return Err(Error::InvalidArgument(format!(
                "attribute: basis for {name} given to {}",
                lin.name
            )));
        }
        let flat: Vec<f32> = basis.iter().flatten().map(|&v| v as f32).collect();
        let a = Tensor::from_vec(
            flat,
            (basis.len(), lin.weight.dims()[1]),
            lin.weight.device(),
        )?;
        *l = LoraWeights {
            a: Var::from_tensor(&a)?,
            b: l.b.clone(),
            scale: 1.0,
            dropout: 0.0,
        };
    }
    Ok(())
}

/// One curvature row for one item, w.r.t. every B, flattened in model order (see [`Curv`]).
fn example_gradient(
    model: &Decoder,
    b_vars: &[Var],
    ex: &EncodedExample,
    pad_id: u32,
    mut curv: Curv,
) -> Result<Vec<f32>> {
    let batch = collate(&[ex], pad_id, &model.device)?;
    let logits = model.forward(
        &crate::model::ModelInput::new(&batch.input_ids, Some(&batch.attention_mask)),
        &ForwardOptions::default(),
    )?;
    if let Curv::Logits(rng) = &mut curv {
        // a random projection uᵀz of the answer positions' logits: E[∇(uᵀz)∇(uᵀz)ᵀ] = JᵀJ
        let (_, t, v) = logits.dims3()?;
        let mut u = vec![0f32; t * v];
        for j in 1..ex.len() {
            if ex.labels[j] != -100 {
                for k in 0..v {
                    u[(j - 1) * v + k] = rng.normal() as f32;
                }
            }
        }
        let u = Tensor::from_vec(u, (1, t, v), &model.device)?;
        let proj = (logits.to_dtype(DType::F32)? * u)?.sum_all()?;
        return flat_grads(&proj, b_vars);
    }
    let sampled = match &mut curv {
        Curv::Fisher(rng) => Some(rng),
        _ => None,
    };
    let labels = match sampled {
        None => batch.labels.clone(),
        Some(rng) => {
            let probs = candle_nn::ops::softmax_last_dim(&logits.detach().to_dtype(DType::F32)?)?
                .squeeze(0)?
                .to_vec2::<f32>()?;
            let mut labels = ex.labels.to_vec();
            for j in 1..labels.len() {
                if labels[j] != -100 {
                    labels[j] = sample(&probs[j - 1], rng) as i64;
                }
            }
            Tensor::from_vec(labels, (1, ex.len()), &model.device)?
        }
    };
    let (nll, _) = shifted_token_nll(&logits, &labels)?;
    flat_grads(&nll.sum_all()?, b_vars)
}

fn flat_grads(loss: &Tensor, b_vars: &[Var]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for g in grads_of(loss, b_vars)? {
        out.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// What the rows of the curvature are.
enum Curv<'a> {
    /// gradients of the gold answer tokens' NLL
    Empirical,
    /// gradients of the NLL of answer tokens drawn from the model
    Fisher(&'a mut Rng),
    /// random projections of the answer positions' logit Jacobian (Gauss-Newton of logit MSE)
    Logits(&'a mut Rng),
}

fn sample(probs: &[f32], rng: &mut Rng) -> usize {
    let u = rng.next_f64() * probs.iter().map(|&p| p as f64).sum::<f64>();
    let mut acc = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        acc += p as f64;
        if u < acc {
            return i;
        }
    }
    probs.len() - 1
}

/// Write a flat vector into the B variables (model order, each [out, r] row-major).
fn set_b(b_vars: &[Var], flat: &[f64]) -> Result<()> {
    let mut offset = 0;
    for v in b_vars {
        let n = v.elem_count();
        let part: Vec<f32> = flat[offset..offset + n].iter().map(|&x| x as f32).collect();
        v.set(&Tensor::from_vec(part, v.shape(), v.device())?)?;
        offset += n;
    }
    if offset != flat.len() {
        return Err(Error::InvalidArgument(format!(
            "attribute: step has {} entries, the subspace {offset}",
            flat.len()
        )));
    }
    Ok(())
}

/// Set B to `step` and return the mean per-token NLL of `examples` under that adapter.
fn nll_with_step(
    model: &Decoder,
    b_vars: &[Var],
    step: &[f64],
    examples: &[EncodedExample],
    batch: usize,
    pad_id: u32,
) -> Result<f64> {
    set_b(b_vars, step)?;
    mean_nll(model, examples, batch, pad_id, &ForwardOptions::eval())
}

/// Mean per-token NLL over all answer tokens of `examples`.
fn mean_nll(
    model: &Decoder,
    examples: &[EncodedExample],
    batch: usize,
    pad_id: u32,
    opts: &ForwardOptions,
) -> Result<f64> {
    let rows = score_examples(model, examples, batch, pad_id, opts, |_| {})?;
    let tokens: usize = rows.iter().map(|r| r.tokens).sum();
    if tokens == 0 {
        return Err(Error::InvalidArgument("no answer tokens to score".into()));
    }
    Ok(rows.iter().map(|r| r.sum_nll).sum::<f64>() / tokens as f64)
}

/// The m > 0 at which the forget NLL with B = base + m·δ equals `goal`: bracket by doubling, then
/// bisect on log m. Errors if the step cannot raise the forget NLL to the goal.
#[allow(clippy::too_many_arguments)]
fn calibrate_scale(
    model: &Decoder,
    b_vars: &[Var],
    base: &[f64],
    delta: &[f64],
    forget: &[EncodedExample],
    goal: f64,
    batch: usize,
    pad_id: u32,
) -> Result<f64> {
    let nll_at = |m: f64| -> Result<f64> {
        let step: Vec<f64> = base.iter().zip(delta).map(|(b, d)| b + d * m).collect();
        nll_with_step(model, b_vars, &step, forget, batch, pad_id)
    };
    let norm = delta.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Err(Error::InvalidArgument(
            "attribute: the influence step is zero (the forget gradient vanishes in the subspace)"
                .into(),
        ));
    }
    if nll_at(0.0)? >= goal {
        return Err(Error::InvalidArgument(format!(
            "attribute: the model's forget NLL is already ≥ the calibration NLL {goal:.4}; nothing to calibrate"
        )));
    }
    // start where the step has unit norm
    let mut lo = 0.0;
    let mut hi = 1.0 / norm;
    let mut tries = 0;
    while nll_at(hi)? < goal {
        lo = hi;
        hi *= 2.0;
        tries += 1;
        if tries > 60 {
            return Err(Error::InvalidArgument(format!(
                "attribute: no scale of the step raises the forget NLL to {goal:.4}"
            )));
        }
    }
    for _ in 0..30 {
        let mid = if lo == 0.0 {
            hi / 2.0
        } else {
            (lo * hi).sqrt()
        };
        if nll_at(mid)? < goal {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi / lo.max(f64::MIN_POSITIVE) < 1.0 + 1e-4 {
            break;
        }
    }
    Ok(0.5 * (lo + hi))
}

/// Per item: answer tokens, Σ KL(model ‖ oracle), Σ NLL of the model and of the oracle.
fn item_stats(
    model: &Decoder,
    opts: &ForwardOptions,
    oracle: &Decoder,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<ItemStats>> {
    let mut out = Vec::with_capacity(examples.len());
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    for chunk in refs.chunks(batch_size) {
        let batch = collate(chunk, pad_id, &model.device)?;
        let input = crate::model::ModelInput::new(&batch.input_ids, Some(&batch.attention_mask));
        let zm = model.forward(&input, opts)?.to_dtype(DType::F32)?;
        let zo = oracle
            .forward(&input, &ForwardOptions::base_model())?
            .to_dtype(DType::F32)?;
        let t = zm.dim(1)?;
        let lp = log_softmax_last_dim(&zm.narrow(1, 0, t - 1)?)?;
        let lq = log_softmax_last_dim(&zo.narrow(1, 0, t - 1)?)?;
        let kl = (lp.exp()? * (&lp - &lq)?)?
            .sum(D::Minus1)?
            .to_vec2::<f32>()?;
        let (nll_m, mask) = shifted_token_nll(&zm, &batch.labels)?;
        let (nll_o, _) = shifted_token_nll(&zo, &batch.labels)?;
        let mask = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let nll_m = nll_m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let nll_o = nll_o.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for r in 0..chunk.len() {
            let mut s = ItemStats::default();
            for j in 0..t - 1 {
                if mask[r][j] > 0.0 {
                    s.tokens += 1;
                    s.kl_to_oracle += kl[r][j] as f64;
                    s.nll += nll_m[r][j] as f64;
                    s.oracle_nll += nll_o[r][j] as f64;
                }
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// Mean over answer tokens of KL(p̄ ‖ oracle), p̄ the mean of the `models`' next-token
/// distributions.
fn mixture_kl(
    models: &[Decoder],
    oracle: &Decoder,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    let (mut kl_sum, mut tokens) = (0.0, 0usize);
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    for chunk in refs.chunks(batch_size) {
        let batch = collate(chunk, pad_id, &oracle.device)?;
        let input = crate::model::ModelInput::new(&batch.input_ids, Some(&batch.attention_mask));
        // log Σ_k p_k, accumulated in log space: a probability that underflows in f32 would
        // give 0 · log 0 = NaN in the KL
        let mut log_sum: Option<Tensor> = None;
        for m in models {
            let lp = log_softmax_last_dim(
                &m.forward(&input, &ForwardOptions::base_model())?
                    .to_dtype(DType::F32)?,
            )?;
            log_sum = Some(match log_sum {
                Some(acc) => {
                    let high = acc.maximum(&lp)?;
                    let gap = (&acc - &lp)?.abs()?.neg()?;
                    (high + (gap.exp()? + 1.0)?.log()?)?
                }
                None => lp,
            });
        }
        let Some(log_sum) = log_sum else {
            return Err(Error::InvalidArgument("no reference model".into()));
        };
        let lp = (log_sum - (models.len() as f64).ln())?;
        let lq = log_softmax_last_dim(
            &oracle
                .forward(&input, &ForwardOptions::base_model())?
                .to_dtype(DType::F32)?,
        )?;
        let kl = (lp.exp()? * (&lp - &lq)?)?
            .sum(D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // the positions that predict an answer token, as rows of the flattened [B·T]
        for row in crate::methods::answer_positions(&batch.labels)?.rows {
            kl_sum += kl[row as usize] as f64;
            tokens += 1;
        }
    }
    Ok(kl_sum / tokens.max(1) as f64)
}

fn split_report(
    split: &str,
    target: &[ItemStats],
    shadow: &[ItemStats],
    kl_references_oracle: Option<f64>,
) -> SplitReport {
    let tokens: usize = target.iter().map(|s| s.tokens).sum();
    let per_token =
        |v: &[ItemStats]| v.iter().map(|s| s.kl_to_oracle).sum::<f64>() / tokens.max(1) as f64;
    let mean = |x: f64, s: &ItemStats| x / s.tokens.max(1) as f64;
    let predicted: Vec<f64> = shadow
        .iter()
        .zip(target)
        .map(|(s, t)| mean(s.nll, s) - mean(t.nll, t))
        .collect();
    let real: Vec<f64> = target
        .iter()
        .map(|t| mean(t.oracle_nll, t) - mean(t.nll, t))
        .collect();
    SplitReport {
        split: split.into(),
        items: target.len(),
        tokens,
        kl_target_oracle: per_token(target),
        kl_shadow_oracle: per_token(shadow),
        loss_change_correlation: pearson(&predicted, &real),
        kl_references_oracle,
    }
}

/// Pearson correlation; None when either side has no variance.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

fn markdown(r: &AttributeReport) -> String {
    let mut s = format!(
        "# Attribution-estimated retrained model\n\nmodel `{}`, forget `{}`\n\n",
        r.model, r.forget
    );
    if let Some(i) = &r.influence {
        s.push_str(&format!(
            "influence subspace: rank {} on {} modules ({} parameters); curvature `{}` from {} \
             retain items; λ = {} × mean eigenvalue {:.3e} = {:.3e}\n\n",
            i.subspace_rank,
            i.modules,
            i.parameters,
            i.curvature,
            i.curvature_samples,
            i.damping,
            i.mean_eigenvalue,
            i.lambda
        ));
    }
    if let Some(m) = &r.simulated {
        s.push_str(&format!(
            "simulated oracle: the model fine-tuned on the retain data alone, {} steps (lr {:e}, \
             batch {}); its change as a rank-{} adapter on {} modules, ‖Δ‖ = {:.3}{}; not carried: \
             ‖Δ‖ = {:.3} over {} norm weights and biases\n\n",
            m.steps,
            m.train.lr,
            m.train.batch_size,
            m.adapter.rank,
            m.adapter.modules,
            m.adapter.carried_norm,
            if m.adapter.truncated_norm > 0.0 {
                format!(
                    " (cut to rank {}: ‖Δ − Δ_k‖ = {:.3} left out)",
                    m.adapter.rank, m.adapter.truncated_norm
                )
            } else {
                String::new()
            },
            m.adapter.dropped_norm,
            m.adapter.dropped.len()
        ));
    }
    s.push_str("| estimator | scale m per step | forget NLL before → after | solves |\n|---|---|---|---|\n");
    for e in &r.estimators {
        s.push_str(&format!(
            "| {} | {} | {:.3} → {:.3} | {} |\n",
            e.estimator,
            e.scales
                .iter()
                .map(|m| format!("{m:.3e}"))
                .collect::<Vec<_>>()
                .join(", "),
            e.forget_nll_before,
            e.forget_nll_after,
            e.solves
                .iter()
                .map(|v| format!("{} it, residual {:.1e}", v.iterations, v.relative_residual))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if r.estimators.iter().any(|e| !e.splits.is_empty()) {
        s.push_str("\nPer-token KL to the oracle (lower is closer) and the correlation of per-item loss changes:\n\n");
        s.push_str("| estimator | split | KL(target‖oracle) | KL(shadow‖oracle) | ratio | loss-change corr |\n|---|---|---|---|---|---|\n");
        for e in &r.estimators {
            for sp in &e.splits {
                s.push_str(&format!(
                    "| {} | {} | {:.4} | {:.4} | {:.2} | {} |\n",
                    e.estimator,
                    sp.split,
                    sp.kl_target_oracle,
                    sp.kl_shadow_oracle,
                    sp.kl_shadow_oracle / sp.kl_target_oracle.max(f64::MIN_POSITIVE),
                    sp.loss_change_correlation
                        .map_or("–".into(), |c| format!("{c:.3}"))
                ));
            }
        }
        if let Some(e) = r.estimators.first() {
            if e.splits.iter().any(|sp| sp.kl_references_oracle.is_some()) {
                s.push_str("\nRetraining itself, for scale: KL(mean of the report.references models ‖ oracle) per split — what models retrained without the forget set get without the oracle's own seed:\n\n| split | KL(references‖oracle) | ratio to KL(target‖oracle) |\n|---|---|---|\n");
                for sp in &e.splits {
                    if let Some(k) = sp.kl_references_oracle {
                        s.push_str(&format!(
                            "| {} | {k:.4} | {:.2} |\n",
                            sp.split,
                            k / sp.kl_target_oracle.max(f64::MIN_POSITIVE)
                        ));
                    }
                }
            }
        }
        if let Some(c) = &r.closest {
            s.push_str(&format!(
                "\nClosest to the oracle on the first split: **{c}**.\n"
            ));
        }
    }
    s
}
