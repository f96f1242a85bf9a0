//! `unlearn train`: supervised next-token training of a whole model or a LoRA adapter, from a
//! checkpoint or from seeded random weights. It builds the models unlearning is measured
//! against (targets, retain models, oracles) with the same step loop, checkpoints, resume and
//! progress as `unlearn run`.
use crate::error::{Error, Result};
use crate::lora::{attach_lora, lora_vars, save_adapter};
use crate::methods::{logits, mean_nll, Ctx, LossOutput, Method};
use crate::model::config::ArchConfig;
use crate::model::weights::{remove_dir_if_exists, replace_dir, tmp_path, write_atomic};
use crate::model::Decoder;
use crate::recipe::TrainRecipe;
use crate::rng::Rng;
use crate::tokenizer::ChatTokenizer;
use crate::train::batch::{Dataset, PairedBatch};
use crate::train::trainer::{
    drive, model_path, write_model_dir, RunOptions, RunSummary, Session, Trainable,
};
use std::path::{Path, PathBuf};

/// The objective of `unlearn train`: mean NLL over the labelled tokens of a batch (answer + EOS
/// for QA items, every token for text items), as transformers' `outputs.loss`.
pub struct Supervised;

impl Method for Supervised {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn needs_retain(&self) -> bool {
        false
    }

    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let logits = logits(ctx, &batch.forget)?;
        Ok(LossOutput {
            loss: mean_nll(&logits, &batch.forget)?,
            logs: vec![],
        })
    }
}

/// Run a training recipe; the trained model directory is written to `recipe.model_out()`.
pub fn train(recipe: &TrainRecipe, opts: &RunOptions) -> Result<RunSummary> {
    let t = &recipe.train;
    let out_dir = PathBuf::from(&recipe.output.dir);
    let (start_dir, config_path, tokenizer_dir) = match (&recipe.model.path, &recipe.model.config) {
        (Some(path), _) => {
            let dir = model_path(path)?;
            let tok = recipe
                .model
                .tokenizer
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.clone());
            (Some(dir.clone()), dir.join("config.json"), tok)
        }
        (None, Some(config)) => (
            None,
            PathBuf::from(config),
            PathBuf::from(recipe.model.tokenizer.as_deref().unwrap_or(".")),
        ),
        (None, None) => {
            return Err(Error::InvalidArgument(
                "the recipe needs model.path or model.config".into(),
            ))
        }
    };
    if !config_path.is_file() {
        return Err(Error::config(
            &config_path,
            "missing: the model needs a config.json",
        ));
    }
    let arch = ArchConfig::from_file(&config_path)?;
    let config_json = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let tok = ChatTokenizer::from_dir(&tokenizer_dir)?.with_prompt_style(recipe.prompt_style());
    if tok.vocab_size() > arch.vocab_size {
        return Err(Error::config(
            &config_path,
            format!(
                "vocab_size is {} but the tokenizer in {} has {} tokens",
                arch.vocab_size,
                tokenizer_dir.display(),
                tok.vocab_size()
            ),
        ));
    }

    let (model, params, trainable) = match &recipe.lora {
        None => {
            let (model, params) = Decoder::trainable(
                arch,
                start_dir.as_deref(),
                (t.seed, recipe.model.init_std),
                // full-parameter training keeps f32 weights and optimizer state on every device
                candle_core::DType::F32,
                &opts.device,
            )?;
            let trainable = Trainable::Full {
                config_json: config_json.clone(),
                tokenizer_dir: tokenizer_dir.clone(),
            };
            (model, params, trainable)
        }
        Some(section) => {
            let dir = start_dir.as_deref().ok_or_else(|| {
                Error::InvalidArgument(
                    "LoRA training ([lora]) needs a checkpoint to adapt: set model.path".into(),
                )
            })?;
            let mut model =
                Decoder::load(dir, crate::device::base_dtype(&opts.device), &opts.device)?;
            let cfg = section.to_config()?;
            attach_lora(&mut model, &cfg, &mut Rng::new(t.seed).fork("lora-init"))?;
            let params = lora_vars(&model);
            let base = recipe.model.path.clone().unwrap_or_default();
            (model, params, Trainable::Lora { cfg, base })
        }
    };

    // every file is non-empty (read_examples) and the recipe names at least one
    let data = Dataset::load_all(&recipe.data.train, &tok, recipe.data.max_length)?;

    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    write_atomic(&out_dir.join("recipe.toml"), recipe.to_toml()?.as_bytes())?;
    let mut session = Session {
        model,
        params,
        trainable,
        method: Box::new(Supervised),
        tok: &tok,
        primary: data,
        retain: None,
        evaluator: None,
        train: t,
        out_dir: out_dir.clone(),
    };
    let end = drive(&mut session, opts)?;
    if !end.interrupted {
        let model_out = recipe.model_out();
        match &session.trainable {
            Trainable::Full {
                config_json,
                tokenizer_dir,
            } => write_model_dir(&model_out, config_json, tokenizer_dir, &session.params)?,
            Trainable::Lora { cfg, base } => {
                let adapter = out_dir.join("adapter");
                save_adapter(&session.model, cfg, &adapter, Some(base))?;
                let base_dir = start_dir.as_deref().unwrap_or(Path::new("."));
                // merge into a staging name first: the previous model stays until this one is whole
                let staging = tmp_path(&model_out);
                remove_dir_if_exists(&staging)?;
                crate::merge::merge(base_dir, &adapter, &staging, &Default::default())?;
                replace_dir(&staging, &model_out)?;
            }
        }
        tracing::info!("wrote the trained model to {}", model_out.display());
    }
    Ok(RunSummary {
        out_dir,
        steps: end.steps,
        interrupted: end.interrupted,
        last_logs: end.last_logs,
    })
}
