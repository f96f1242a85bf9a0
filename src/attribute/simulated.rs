//! The simulated-oracle estimator (`attribute.estimator = "simulated"`): predict the model
//! retrained without the forget set by fine-tuning the target on the retain data alone for a
//! few epochs (all weights, the `[simulate]` training settings), then store the change as a
//! shadow adapter in PEFT's format, so DMM reads it exactly like the influence step's.
//!
//! Full fine-tuning moves every weight, and much of what it does to the predictions lives in
//! the token embedding (on the bundled benchmark the linear layers' change alone gets 82% of
//! the target's forget KL to the oracle, with the embedding's 48%; sessions' notes in README).
//! So the adapter carries the change exactly, at full rank:
//!
//! - each linear module of the layers: ΔW (out × in) = B·A with A = [I; 0], B = [ΔW | 0] when
//!   in ≤ out, else A = [ΔW; 0], B = [I | 0];
//! - the token embedding as PEFT's embedding LoRA (delta = (B·A)ᵀ): B = [I | 0] (hidden × r),
//!   A = [ΔEᵀ; 0] (r × vocab);
//! - the output head as a linear module. With tied embeddings the head is the embedding
//!   matrix, so it gets the same ΔE: PEFT then adds it once on each side. (Merging such an
//!   adapter into a tied checkpoint would need untying; `unlearn merge` refuses it. A shadow is
//!   a target for DMM, not a model to ship.)
//!
//! r is the largest min(in, out), with zero padding elsewhere, and alpha = r (scale 1), so one
//! `r` serves every module. Norm weights and biases have no place in a LoRA adapter: their
//! change is dropped and the report says how large it was.
//!
//! With `attribute.shadow_rank = k` below that, a module whose min(in, out) exceeds k gets its
//! best rank-k approximation instead ([`crate::attribute::lowrank`]), the others stay exact
//! (zero-padded to k), and the report gives ‖Δ − Δ_k‖ over all modules.
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, TargetModules};
use crate::model::decoder::LoraWeights;
use crate::model::Decoder;
use crate::recipe::{AttributeRecipe, InitSection, TrainDataSection, TrainOutputSection};
use crate::recipe::{TrainRecipe, TrainSection};
use crate::train::trainer::RunOptions;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What the simulated oracle was and what its adapter leaves out (report.json).
#[derive(Debug, Clone, Serialize)]
pub struct SimulatedInfo {
    /// optimizer steps of the fine-tuning
    pub steps: usize,
    pub train: TrainSection,
    #[serde(flatten)]
    pub adapter: Drops,
}

/// Fine-tune the recipe's model on `data.retain` with the `[simulate]` settings, all weights,
/// in the run directory `work` (metrics.jsonl, recipe.toml); returns the trained model's
/// directory and the number of steps.
pub fn fine_tune(
    recipe: &AttributeRecipe,
    train: &TrainSection,
    work: &Path,
    device: &Device,
    progress: bool,
) -> Result<(PathBuf, usize)> {
    crate::model::weights::remove_dir_if_exists(work)?;
    let model_out = work.join("model");
    let tr = TrainRecipe {
        model: InitSection {
            path: Some(recipe.model.path.clone()),
            config: None,
            tokenizer: None,
            init_std: 0.02,
        },
        lora: None,
        data: TrainDataSection {
            train: recipe.data.retain.to_vec(),
            max_length: recipe.data.max_length,
            system_prompt: recipe.data.system_prompt.clone(),
            date_string: recipe.data.date_string.clone(),
        },
        train: train.clone(),
        output: TrainOutputSection {
            dir: work.to_string_lossy().into_owned(),
            model: Some(model_out.to_string_lossy().into_owned()),
        },
    };
    let opts = RunOptions {
        device: device.clone(),
        progress,
        ..Default::default()
    };
    let summary = crate::train::supervised::train(&tr, &opts)?;
    // the final checkpoint holds the optimizer state (about 3× the model); only the model is used
    crate::model::weights::remove_dir_if_exists(&work.join("checkpoints"))?;
    Ok((model_out, summary.steps))
}

/// A copy of `base` whose adapter turns it into `tuned` (up to the dropped norm weights and
/// biases, and with `rank`, each module's change cut to rank `rank`), with the adapter's
/// config. Both models must have the same architecture. `rng` draws the randomized SVD's test
/// matrices.
pub fn shadow_adapter(
    base: &Decoder,
    tuned: &Decoder,
    rank: Option<usize>,
    rng: &mut crate::rng::Rng,
) -> Result<(Decoder, LoraConfig, Drops)> {
    if base.cfg.family != tuned.cfg.family
        || base.linears().len() != tuned.linears().len()
        || base.embed.dims() != tuned.embed.dims()
    {
        return Err(Error::InvalidArgument(format!(
            "simulated oracle {}: its architecture differs from the model's {}",
            tuned.dir.display(),
            base.dir.display()
        )));
    }
    let (vocab, hidden) = base.embed.dims2()?;
    let mut pairs: Vec<(String, Tensor, Tensor)> = Vec::new();
    for (b, t) in base
        .linears_with_head()
        .into_iter()
        .zip(tuned.linears_with_head())
    {
        if b.conv1d {
            return Err(Error::InvalidArgument(format!(
                "attribute: {} is a Conv1D (GPT-2) weight; the simulated shadow supports linear layers only",
                b.name
            )));
        }
        if b.name != t.name || b.weight.dims() != t.weight.dims() {
            return Err(Error::InvalidArgument(format!(
                "simulated oracle: module {} does not match {} {:?} vs {:?}",
                t.name,
                b.name,
                t.weight.dims(),
                b.weight.dims()
            )));
        }
        pairs.push((b.name.clone(), b.weight.clone(), t.weight.clone()));
    }
    let full_rank = pairs
        .iter()
        .map(|(_, w, _)| w.dims()[0].min(w.dims()[1]))
        .chain([vocab.min(hidden)])
        .max()
        .unwrap_or(1);
    let rank = rank.map_or(full_rank, |k| k.min(full_rank));
    let dev = base.embed.device().clone();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let mut shadow = base.clone();
    crate::lora::detach_lora(&mut shadow);
    // ‖Δ_k‖² carried and ‖Δ − Δ_k‖² cut, summed over modules
    let (mut carried_sq, mut truncated_sq) = (0.0f64, 0.0f64);
    let mut factor_at_rank = |delta: &Tensor, count: bool| -> Result<(Tensor, Tensor)> {
        let (out, inp) = delta.dims2()?;
        let exact = out.min(inp) <= rank;
        let (a, b) = if exact {
            factor(delta, rank, &dev)?
        } else {
            super::lowrank::low_rank(delta, rank, rng)?
        };
        if count && exact {
            carried_sq += squared_norm(delta)?;
        } else if count {
            // B has orthonormal columns, so ‖Δ_k‖ = ‖B·A‖ = ‖A‖; the residual directly (not
            // ‖Δ‖² − ‖A‖², which cancels to f32 rounding when little is cut)
            carried_sq += squared_norm(&a)?;
            truncated_sq += squared_norm(&(delta - b.matmul(&a)?)?)?;
        }
        Ok((a, b))
    };
    let mut factors = std::collections::HashMap::new();
    for (name, wb, wt) in &pairs {
        let delta = (f32(wt)? - f32(wb)?)?;
        factors.insert(name.clone(), factor_at_rank(&delta, true)?);
    }
    for lin in shadow.linears_with_head_mut() {
        let (a, b) = factors.remove(&lin.name).ok_or_else(|| {
            Error::InvalidArgument(format!("simulated oracle: no delta for {}", lin.name))
        })?;
        lin.lora = Some(LoraWeights::from_tensors(&a, &b, 1.0, 0.0)?);
    }
    // embedding: (B·A)ᵀ = ΔE → B·A = ΔEᵀ [hidden, vocab]; hidden ≤ vocab, so B = [I | 0]
    let delta_e = (f32(&tuned.embed)? - f32(&base.embed)?)?;
    // tied, the head's delta above is this ΔE: counted once
    let (a_t, b_t) = factor_at_rank(&delta_e.t()?.contiguous()?, !base.cfg.tie_word_embeddings)?;
    shadow.embed_lora = Some(LoraWeights::from_tensors(&a_t, &b_t, 1.0, 0.0)?);
    let modules = pairs.len() + 1;
    let mut names: Vec<String> = base
        .linears()
        .iter()
        .map(|l| l.short_name().to_string())
        .collect();
    names.sort();
    names.dedup();
    names.push(base.lm_head.short_name().into());
    names.push(
        base.embed_name
            .rsplit('.')
            .next()
            .unwrap_or("embed_tokens")
            .into(),
    );
    let cfg = LoraConfig {
        r: rank,
        alpha: rank as f64,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(names),
        layers: None,
    };
    let drops = dropped_changes(base, tuned)?;
    Ok((
        shadow,
        cfg,
        Drops {
            modules,
            rank,
            carried_norm: carried_sq.sqrt(),
            truncated_norm: truncated_sq.sqrt(),
            ..drops
        },
    ))
}

/// What [`shadow_adapter`] carried and dropped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drops {
    /// modules the adapter carries (linear modules, the head, the embedding)
    pub modules: usize,
    /// the adapter's rank (largest min(in, out), or attribute.shadow_rank); alpha = rank
    pub rank: usize,
    /// ‖Δθ‖ over the carried weights (of the rank-k approximations, when cut)
    pub carried_norm: f64,
    /// ‖Δθ − Δθ_k‖ over the carried weights: what the rank cut left out (0 at full rank)
    pub truncated_norm: f64,
    /// ‖Δθ‖ over the weights the adapter cannot carry (norm weights, biases)
    pub dropped_norm: f64,
    /// names of those weights that changed
    pub dropped: Vec<String>,
}

/// ‖t‖², summed in `t`'s dtype.
fn squared_norm(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Δ = B·A exactly with A [r, in], B [out, r] (zero-padded to rank r ≥ min(out, in)).
fn factor(delta: &Tensor, rank: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (out, inp) = delta.dims2()?;
    let k = out.min(inp);
    if rank < k {
        return Err(Error::InvalidArgument(format!(
            "simulated shadow: rank {rank} below min({out}, {inp})"
        )));
    }
    let eye = Tensor::eye(k, DType::F32, dev)?;
    let (a, b) = if inp <= out {
        // A = [I_in; 0] [r, in], B = [Δ | 0] [out, r]
        (
            pad_rows(&eye, rank)?,
            pad_rows(&delta.t()?.contiguous()?, rank)?
                .t()?
                .contiguous()?,
        )
    } else {
        // A = [Δ; 0] [r, in], B = [I_out | 0] [out, r]
        (
            pad_rows(delta, rank)?,
            pad_rows(&eye, rank)?.t()?.contiguous()?,
        )
    };
    Ok((a, b))
}

/// `x` [n, m] with zero rows appended to `rows` rows.
fn pad_rows(x: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, m) = x.dims2()?;
    if n == rows {
        return Ok(x.clone());
    }
    let zeros = Tensor::zeros((rows - n, m), DType::F32, x.device())?;
    Ok(Tensor::cat(&[x, &zeros], 0)?)
}

/// The change of every checkpoint tensor the adapter does not carry (norm weights, biases),
/// read from the two model directories.
fn dropped_changes(base: &Decoder, tuned: &Decoder) -> Result<Drops> {
    use crate::model::weights::WeightStore;
    let mut carried: std::collections::HashSet<String> = base
        .linears()
        .iter()
        .map(|l| format!("{}.weight", l.name))
        .collect();
    carried.insert(format!("{}.weight", base.embed_name));
    carried.insert(format!("{}.weight", base.lm_head.name));
    let bs = WeightStore::open_dir(&base.dir)?;
    let ts = WeightStore::open_dir(&tuned.dir)?;
    let mut sq = 0.0f64;
    let mut names = Vec::new();
    for name in bs.names() {
        if carried.contains(&name) || !ts.contains(&name) {
            continue;
        }
        let b = bs.tensor_raw(&name)?.to_dtype(DType::F64)?;
        let t = ts.tensor_raw(&name)?.to_dtype(DType::F64)?;
        if b.dims() != t.dims() {
            continue;
        }
        let d = squared_norm(&(t - b)?)?;
        if d > 0.0 {
            sq += d;
            names.push(name);
        }
    }
    names.sort();
    Ok(Drops {
        dropped_norm: sq.sqrt(),
        dropped: names,
        ..Default::default()
    })
}
