//! Merge a PEFT LoRA adapter into its base checkpoint: W' = W + scale·B·A, computed in f32 and
//! cast back, written as a checkpoint directory transformers loads as usual.
//!
//! This works on the files, not on a loaded model, so it needs memory for one shard at a time
//! and keeps every tensor name, dtype and the config exactly as the base has them.
use crate::error::{Error, Result};
use crate::lora::PeftConfigFile;
use crate::model::config::{ArchConfig, Family};
use crate::model::weights::{
    tmp_path, write_atomic, write_safetensors, OwnedView, SafetensorsFile, WeightStore,
};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Files copied next to the merged weights when the base has them.
pub const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Shards larger than this are split, as transformers' `save_pretrained` does (default 5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

pub struct MergeOptions {
    /// output dtype; None keeps each tensor's stored dtype
    pub dtype: Option<DType>,
    pub max_shard_bytes: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

#[derive(Debug)]
pub struct MergeReport {
    pub merged_modules: usize,
    pub tensors: usize,
    pub shards: usize,
    pub total_bytes: usize,
}

struct LoraPair {
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// base stored as [in, out] (GPT-2 Conv1D): the delta is added transposed
    conv1d: bool,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype '{other}' (use f32, bf16 or f16)"
        ))),
    }
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let cfg_path = model_dir.join("config.json");
    if !cfg_path.exists() {
        return Err(Error::config(
            &cfg_path,
            "missing: a model directory needs config.json",
        ));
    }
    let arch = ArchConfig::from_file(&cfg_path)?;
    let store = WeightStore::open_dir(model_dir)?;
    // A base that does not match its own config would merge into a checkpoint nobody can load.
    crate::model::Decoder::validate_store(&arch, &store)?;
    let lora = read_adapter(adapter_dir, &store, arch.family)?;

    if out_dir.exists() && !out_dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--out {} is a file; give a new or empty directory",
            out_dir.display()
        )));
    }
    if out_dir.exists()
        && std::fs::read_dir(out_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::InvalidArgument(format!(
            "output directory {} already exists and is not empty",
            out_dir.display()
        )));
    }
    // Everything is written into a temporary sibling directory and renamed at the end, so an
    // interrupted merge never leaves a directory that looks like a checkpoint.
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = tmp_path(out_dir);
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = write_merged(&store, &lora, &staging, opts, model_dir, &cfg_path);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out_dir.exists() {
        std::fs::remove_dir(out_dir).map_err(|e| Error::io(out_dir, e))?;
    }
    std::fs::rename(&staging, out_dir).map_err(|e| Error::io(out_dir, e))?;
    Ok(report)
}

fn write_merged(
    store: &WeightStore,
    lora: &BTreeMap<String, LoraPair>,
    staging: &Path,
    opts: &MergeOptions,
    model_dir: &Path,
    cfg_path: &Path,
) -> Result<MergeReport> {
    let names = store.names();
    // Plan shards by output size, in name order.
    let out_size = |name: &str| -> Result<usize> {
        let (dt, shape, bytes, _) = store.raw(name)?;
        let n: usize = shape.iter().product();
        Ok(match (opts.dtype, is_float(dt)) {
            (Some(d), true) => n * d.size_in_bytes(),
            _ => bytes.len(),
        })
    };
    let mut shards: Vec<Vec<String>> = vec![vec![]];
    let mut current = 0usize;
    let mut total = 0usize;
    for n in &names {
        let s = out_size(n)?;
        if current > 0 && current + s > opts.max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += s;
        total += s;
        if let Some(last) = shards.last_mut() {
            last.push(n.clone());
        }
    }
    let n_shards = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut merged = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        };
        let mut views = Vec::with_capacity(shard.len());
        for name in shard {
            let (dt, _, _, _) = store.raw(name)?;
            // a NaN base weight would make a merged model that loads and computes NaN
            store.ensure_finite(name)?;
            let stored = store.tensor_raw(name)?;
            let target_dtype = match (opts.dtype, is_float(dt)) {
                (Some(d), true) => d,
                _ => stored.dtype(),
            };
            let t = match lora.get(name) {
                Some(pair) => {
                    merged += 1;
                    let delta = (pair.b.matmul(&pair.a)? * pair.scale)?;
                    let w = stored.to_dtype(DType::F32)?;
                    let delta = if pair.conv1d { delta.t()? } else { delta };
                    (w + delta)?.to_dtype(target_dtype)?
                }
                None => stored.to_dtype(target_dtype)?,
            };
            views.push((name.clone(), OwnedView::from_tensor(&t)?));
            weight_map.insert(name.clone(), file.clone());
        }
        write_safetensors(&staging.join(&file), &views)?;
    }
    if n_shards > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        write_atomic(
            &staging.join("model.safetensors.index.json"),
            text.as_bytes(),
        )?;
    }
    // config.json: unchanged, except the dtype when the user asked for another one.
    let mut config: serde_json::Value = crate::error::read_json(cfg_path)?;
    if let (Some(d), Some(obj)) = (opts.dtype, config.as_object_mut()) {
        let key = if obj.contains_key("torch_dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        obj.insert(
            key.into(),
            serde_json::Value::String(torch_dtype_name(d).into()),
        );
    }
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&staging.join("config.json"), text.as_bytes())?;
    for f in COPIED_FILES {
        let src = model_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, staging.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    if merged != lora.len() {
        return Err(Error::InvalidArgument(format!(
            "merged {merged} of {} adapted modules",
            lora.len()
        )));
    }
    Ok(MergeReport {
        merged_modules: merged,
        tensors: names.len(),
        shards: n_shards,
        total_bytes: total,
    })
}

fn is_float(dt: safetensors::Dtype) -> bool {
    use safetensors::Dtype as D;
    matches!(dt, D::F32 | D::F16 | D::BF16 | D::F64)
}

/// Read the adapter and key its A/B pairs by the base weight they modify, checking shapes.
fn read_adapter(
    adapter_dir: &Path,
    store: &WeightStore,
    family: Family,
) -> Result<BTreeMap<String, LoraPair>> {
    let cfg_path = adapter_dir.join("adapter_config.json");
    if !cfg_path.exists() {
        return Err(Error::adapter(
            &cfg_path,
            "missing: an adapter directory needs adapter_config.json",
        ));
    }
    let file_cfg = PeftConfigFile::read(&cfg_path)?;
    let cfg = &file_cfg.cfg;
    let st_path: PathBuf = adapter_dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        return Err(Error::adapter(&st_path, "missing"));
    }
    let file = SafetensorsFile::open(&st_path)?;
    let mut modules: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for n in file.names() {
        let norm = n.replace(".default.weight", ".weight");
        let (module, is_a) = if let Some(m) = norm.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = norm.strip_suffix(".lora_B.weight") {
            (m, false)
        } else if norm.contains(".lora_embedding_") {
            // an embedding adapter changes the input side of a possibly tied matrix; merged into
            // one tensor it would change the output head too
            return Err(Error::adapter(
                &st_path,
                format!(
                    "'{n}' belongs to an adapter on the token embedding, which `merge` does not merge (a shadow adapter from `unlearn attribute` is a DMM target, used unmerged)"
                ),
            ));
        } else if norm.ends_with(".base_layer.weight") {
            // PEFT stores these beside embedding adapters (save_embedding_layers)
            return Err(Error::adapter(
                &st_path,
                format!(
                    "'{n}' is a base weight stored in the adapter (PEFT's save_embedding_layers, written beside adapters on the embedding or head); `merge` merges LoRA A/B weights only"
                ),
            ));
        } else {
            return Err(Error::adapter(
                &st_path,
                format!("unexpected tensor '{n}' (not a LoRA A/B weight)"),
            ));
        };
        let module = module
            .strip_prefix("base_model.model.")
            .unwrap_or(module)
            .to_string();
        let e = modules.entry(module).or_default();
        if is_a {
            e.0 = Some(n.clone());
        } else {
            e.1 = Some(n.clone());
        }
    }
    if modules.is_empty() {
        return Err(Error::adapter(&st_path, "contains no LoRA weights"));
    }
    let mut out = BTreeMap::new();
    for (module, (a_name, b_name)) in modules {
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(Error::adapter(
                &st_path,
                format!("module '{module}' has only one of lora_A / lora_B"),
            ));
        };
        // GPT-2 checkpoints may store names without the `transformer.` prefix.
        let candidates = [
            format!("{module}.weight"),
            format!(
                "{}.weight",
                module.strip_prefix("transformer.").unwrap_or(&module)
            ),
        ];
        let Some(base_name) = candidates.iter().find(|c| store.contains(c)).cloned() else {
            return Err(Error::adapter(
                &st_path,
                format!(
                    "targets '{module}', which the base model {} does not have",
                    store.origin.display()
                ),
            ));
        };
        let load =
            |n: &str| -> Result<Tensor> {
                let info = file
                    .info(n)
                    .ok_or_else(|| Error::adapter(&st_path, format!("'{n}' missing")))?;
                let bytes = file.bytes(n).ok_or_else(|| {
                    Error::adapter(&st_path, format!("data of '{n}' lies outside the file"))
                })?;
                Ok(crate::model::weights::bytes_to_tensor(
                    info.dtype,
                    &info.shape,
                    bytes,
                    &st_path,
                    n,
                )?
                .to_dtype(DType::F32)?)
            };
        let a = load(&a_name)?;
        let b = load(&b_name)?;
        let (_, base_shape, _, _) = store.raw(&base_name)?;
        let conv1d = family == Family::Gpt2;
        let (out_f, in_f) = match (base_shape.as_slice(), conv1d) {
            ([i, o], true) => (*o, *i),
            ([o, i], false) => (*o, *i),
            _ => {
                return Err(Error::adapter(
                    &st_path,
                    format!("base weight '{base_name}' is not a matrix"),
                ))
            }
        };
        let (ra, ia) = a.dims2()?;
        let (ob, rb) = b.dims2()?;
        if ia != in_f || ob != out_f || ra != rb {
            return Err(Error::adapter(
                &st_path,
                format!(
                    "module '{module}': lora_A {:?} and lora_B {:?} do not fit the base weight {:?} ({in_f} → {out_f})",
                    a.dims(),
                    b.dims(),
                    base_shape
                ),
            ));
        }
        file_cfg.check_module(&module, &a, &b, &st_path)?;
        out.insert(
            base_name,
            LoraPair {
                a,
                b,
                scale: cfg.scale_for_rank(ra),
                conv1d,
            },
        );
    }
    Ok(out)
}
