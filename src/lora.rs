//! LoRA adapters in PEFT's format: which modules they target, how they are initialised, and
//! reading/writing `adapter_config.json` + `adapter_model.safetensors` exactly as PEFT does.
use crate::error::{Error, Result};
use crate::model::decoder::{Decoder, LoraWeights};
use crate::model::weights::{write_atomic, write_safetensors, OwnedView, SafetensorsFile};
use crate::rng::Rng;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Which modules get an adapter, with PEFT's matching rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of module names, \"all-linear\", or a regular expression string"
)]
pub enum TargetModules {
    /// a list of module names: a module matches when its path equals a name or ends with `.name`;
    /// the single entry "all-linear" means every linear layer except the output head
    Names(Vec<String>),
    /// a regular expression that must match the whole module path
    Regex(String),
}

impl TargetModules {
    pub fn matches(&self, module_path: &str) -> Result<bool> {
        match self {
            TargetModules::Names(names) => Ok(names.iter().any(|n| {
                n == "all-linear" || module_path == n || module_path.ends_with(&format!(".{n}"))
            })),
            TargetModules::Regex(re) => {
                let anchored = format!("^(?:{re})$");
                let r = regex::Regex::new(&anchored).map_err(|e| {
                    Error::InvalidArgument(format!("target_modules regex '{re}': {e}"))
                })?;
                Ok(r.is_match(module_path))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// restrict to these decoder layers (PEFT `layers_to_transform`)
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

impl LoraConfig {
    pub fn scale_for_rank(&self, r: usize) -> f64 {
        if self.use_rslora {
            self.alpha / (r as f64).sqrt()
        } else {
            self.alpha / r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument("LoRA rank r must be ≥ 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidArgument("LoRA alpha must be finite".into()));
        }
        Ok(())
    }

    pub fn targets(&self, module_path: &str) -> Result<bool> {
        if let Some(layers) = &self.layers {
            match layer_index(module_path) {
                Some(i) if layers.contains(&i) => {}
                _ => return Ok(false),
            }
        }
        self.target_modules.matches(module_path)
    }
}

/// `model.layers.3.self_attn.q_proj` → 3
fn layer_index(module_path: &str) -> Option<usize> {
    let parts: Vec<&str> = module_path.split('.').collect();
    parts
        .windows(2)
        .find(|w| matches!(w[0], "layers" | "h") && w[1].parse::<usize>().is_ok())
        .and_then(|w| w[1].parse().ok())
}

/// PEFT's name of a LoRA weight in `adapter_model.safetensors`.
pub fn peft_name(module_path: &str, which: char) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// Add freshly initialised adapters as PEFT does: A ~ U(±1/√in) (kaiming-uniform with a=√5),
/// B = 0, so the adapted model starts equal to the base model. Returns how many modules got one.
pub fn attach_lora(model: &mut Decoder, cfg: &LoraConfig, rng: &mut Rng) -> Result<usize> {
    cfg.validate()?;
    if let Some(layers) = &cfg.layers {
        let n = model.layers.len();
        if layers.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA layers is an empty list: name layers, or leave the key out for all".into(),
            ));
        }
        if let Some(bad) = layers.iter().find(|&&i| i >= n) {
            return Err(Error::InvalidArgument(format!(
                "LoRA layers names layer {bad}, but the model has {n} (0 to {})",
                n.saturating_sub(1)
            )));
        }
    }
    let mut count = 0;
    let available: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.short_name().to_string())
        .collect();
    for lin in model.linears_mut() {
        if !cfg.targets(&lin.name)? {
            continue;
        }
        let (out, inp) = (lin.out_features(), lin.in_features());
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| rng.uniform(-bound, bound) as f32)
            .collect();
        let dev = lin.weight.device().clone();
        lin.lora = Some(LoraWeights {
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &dev)?)?,
            b: Var::from_tensor(&Tensor::zeros((out, cfg.r), DType::F32, &dev)?)?,
            scale: cfg.scale_for_rank(cfg.r),
            dropout: cfg.dropout,
        });
        count += 1;
    }
    if count == 0 {
        let mut names = available;
        names.sort();
        names.dedup();
        return Err(Error::InvalidArgument(format!(
            "LoRA target_modules {:?} match no module of this model; available: {}",
            cfg.target_modules,
            names.join(", ")
        )));
    }
    Ok(count)
}

/// Remove every adapter.
pub fn detach_lora(model: &mut Decoder) {
    for lin in model.linears_mut() {
        lin.lora = None;
    }
    model.lm_head.lora = None;
    model.embed_lora = None;
}

/// PEFT's name of an embedding adapter tensor (`lora_embedding_A` / `_B`, no `.weight`: they
/// are plain parameters in PEFT).
pub fn peft_embedding_name(module_path: &str, which: char) -> String {
    format!("base_model.model.{module_path}.lora_embedding_{which}")
}

/// The adapter tensors under their PEFT names in model order (embedding, the layers' linear
/// modules, the output head; A then B per module). Training attaches adapters to the layers
/// only; a loaded adapter may also carry the embedding and the head.
pub fn lora_vars(model: &Decoder) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    if let Some(l) = &model.embed_lora {
        out.push((peft_embedding_name(&model.embed_name, 'A'), l.a.clone()));
        out.push((peft_embedding_name(&model.embed_name, 'B'), l.b.clone()));
    }
    for lin in model.linears_with_head() {
        if let Some(l) = &lin.lora {
            out.push((peft_name(&lin.name, 'A'), l.a.clone()));
            out.push((peft_name(&lin.name, 'B'), l.b.clone()));
        }
    }
    out
}

/// Read a PEFT adapter directory and attach it to `model`. Returns the adapter's config.
/// Adapters on the layers' linear modules, the output head (`lm_head`, also when it is tied to
/// the embedding: PEFT then adds the delta to the head's output only) and the token embedding
/// (`lora_embedding_A/B`) are read.
pub fn load_adapter(model: &mut Decoder, dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.exists() {
        return Err(Error::adapter(
            &cfg_path,
            "missing: an adapter directory needs adapter_config.json",
        ));
    }
    let file_cfg = PeftConfigFile::read(&cfg_path)?;
    let cfg = file_cfg.cfg.clone();
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (only adapter_model.bin was found; pickle files are not read — convert it with PEFT's save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        return Err(Error::adapter(&st_path, format!("missing{hint}")));
    }
    let file = SafetensorsFile::open(&st_path)?;
    // Accept names with or without PEFT's adapter name ("default") inserted.
    let normalise = |n: &str| {
        n.replace(".lora_A.default.weight", ".lora_A.weight")
            .replace(".lora_B.default.weight", ".lora_B.weight")
            .replace(".lora_embedding_A.default", ".lora_embedding_A")
            .replace(".lora_embedding_B.default", ".lora_embedding_B")
    };
    let mut by_name = std::collections::HashMap::new();
    for n in file.names() {
        // PEFT saves the embedding and head base weights next to their adapters
        // (save_embedding_layers, for resized vocabularies): accepted when they are the model's
        if let Some(module) = n
            .strip_prefix("base_model.model.")
            .and_then(|m| m.strip_suffix(".base_layer.weight"))
        {
            check_saved_base_weight(model, module, &read_f32(&file, n, &st_path)?, &st_path)?;
            continue;
        }
        by_name.insert(normalise(n), n.clone());
    }
    let mut known: Vec<String> = Vec::new();
    let mut used = 0usize;
    let embed_name = model.embed_name.clone();
    let (vocab, hidden) = model.embed.dims2()?;
    // the embedding: A [r, vocab], B [hidden, r]
    let (a_name, b_name) = (
        peft_embedding_name(&embed_name, 'A'),
        peft_embedding_name(&embed_name, 'B'),
    );
    known.extend([a_name.clone(), b_name.clone()]);
    if let Some((a, b)) = read_pair(&file, &by_name, &a_name, &b_name, &embed_name, &st_path)? {
        let (ra, va) = a.dims2()?;
        let (hb, rb) = b.dims2()?;
        if va != vocab || hb != hidden || ra != rb {
            return Err(Error::adapter(
                &st_path,
                format!(
                    "embedding '{embed_name}': lora_embedding_A is {:?} and lora_embedding_B is {:?}, but the embedding is {vocab} × {hidden} (expected A [r, {vocab}] and B [{hidden}, r])",
                    a.dims(),
                    b.dims()
                ),
            ));
        }
        file_cfg.check_module(&embed_name, &a, &b, &st_path)?;
        let dev = model.embed.device().clone();
        model.embed_lora = Some(LoraWeights::from_tensors(
            &a.to_device(&dev)?,
            &b.to_device(&dev)?,
            cfg.scale_for_rank(ra),
            0.0,
        )?);
        used += 2;
    }
    for lin in model.linears_with_head_mut() {
        let a_name = peft_name(&lin.name, 'A');
        let b_name = peft_name(&lin.name, 'B');
        known.extend([a_name.clone(), b_name.clone()]);
        let Some((a, b)) = read_pair(&file, &by_name, &a_name, &b_name, &lin.name, &st_path)?
        else {
            continue;
        };
        let (ra, ina) = a.dims2()?;
        let (outb, rb) = b.dims2()?;
        if ina != lin.in_features() || outb != lin.out_features() || ra != rb {
            return Err(Error::adapter(
                &st_path,
                format!(
                    "module '{}': lora_A is {:?} and lora_B is {:?}, but the base layer is {} → {} (expected A [r, {}] and B [{}, r])",
                    lin.name,
                    a.dims(),
                    b.dims(),
                    lin.in_features(),
                    lin.out_features(),
                    lin.in_features(),
                    lin.out_features()
                ),
            ));
        }
        file_cfg.check_module(&lin.name, &a, &b, &st_path)?;
        let dev = lin.weight.device().clone();
        lin.lora = Some(LoraWeights::from_tensors(
            &a.to_device(&dev)?,
            &b.to_device(&dev)?,
            cfg.scale_for_rank(ra),
            cfg.dropout,
        )?);
        used += 2;
    }
    let total = by_name.len();
    if used != total {
        let unknown: Vec<&String> = by_name
            .keys()
            .filter(|n| !known.contains(n))
            .take(5)
            .collect();
        return Err(Error::adapter(
            &st_path,
            format!(
                "{} tensors name modules the base model does not have, e.g. {:?}",
                total - used,
                unknown
            ),
        ));
    }
    if used == 0 {
        return Err(Error::adapter(&st_path, "contains no LoRA weights"));
    }
    Ok(cfg)
}

/// A base weight PEFT stored in the adapter file must equal the model's own (we do not swap base
/// weights: a resized vocabulary would need a different base model).
fn check_saved_base_weight(
    model: &Decoder,
    module: &str,
    saved: &Tensor,
    st_path: &Path,
) -> Result<()> {
    let own = if module == model.embed_name {
        Some(model.embed.clone())
    } else if module == model.lm_head.name {
        Some(model.lm_head.weight.clone())
    } else {
        model
            .linears()
            .into_iter()
            .find(|l| l.name == module)
            .map(|l| l.weight.clone())
    };
    let Some(own) = own else {
        return Err(Error::adapter(
            st_path,
            format!("carries a base weight for '{module}', which the base model does not have"),
        ));
    };
    // compared in the model's dtype: a bf16 model loaded from the f32 weights PEFT saved holds
    // them rounded the same way
    let saved = saved
        .to_device(own.device())?
        .to_dtype(own.dtype())?
        .to_dtype(DType::F32)?;
    let own = own.to_dtype(DType::F32)?;
    let same =
        own.dims() == saved.dims() && (own - &saved)?.abs()?.max_all()?.to_scalar::<f32>()? <= 1e-6;
    if !same {
        return Err(Error::adapter(
            st_path,
            format!(
                "carries its own base weight for '{module}' ({:?}) that differs from the base model's: the adapter was made for another base (e.g. a resized vocabulary)",
                saved.dims()
            ),
        ));
    }
    Ok(())
}

/// Both tensors of one module's adapter, none, or an error when only one is there.
fn read_pair(
    file: &SafetensorsFile,
    by_name: &std::collections::HashMap<String, String>,
    a_name: &str,
    b_name: &str,
    module: &str,
    st_path: &Path,
) -> Result<Option<(Tensor, Tensor)>> {
    let kind = if a_name.contains(".lora_embedding_") {
        "lora_embedding_A / lora_embedding_B"
    } else {
        "lora_A / lora_B"
    };
    match (by_name.get(a_name), by_name.get(b_name)) {
        (None, None) => Ok(None),
        (Some(ak), Some(bk)) => Ok(Some((
            read_f32(file, ak, st_path)?,
            read_f32(file, bk, st_path)?,
        ))),
        _ => Err(Error::adapter(
            st_path,
            format!("module '{module}' has only one of {kind}"),
        )),
    }
}

fn read_f32(file: &SafetensorsFile, name: &str, path: &Path) -> Result<Tensor> {
    let info = file.info(name).ok_or_else(|| Error::MissingWeight {
        name: name.into(),
        path: path.into(),
    })?;
    let bytes = file.bytes(name).ok_or_else(|| Error::Safetensors {
        path: path.into(),
        msg: format!("data of '{name}' lies outside the file"),
    })?;
    if info.shape.len() != 2 {
        return Err(Error::adapter(
            path,
            format!("'{name}' must be a matrix, has shape {:?}", info.shape),
        ));
    }
    Ok(
        crate::model::weights::bytes_to_tensor(info.dtype, &info.shape, bytes, path, name)?
            .to_dtype(DType::F32)?,
    )
}

/// An adapter_config.json as read: our config, and what the adapter's tensors must agree with.
pub struct PeftConfigFile {
    pub cfg: LoraConfig,
    path: PathBuf,
    /// a non-empty rank_pattern: each module has its own rank, which PEFT scales by alpha / its
    /// rank as [`LoraConfig::scale_for_rank`] does
    per_module_ranks: bool,
}

impl PeftConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let raw: Value = crate::error::read_json(path)?;
        let cfg = config_from_peft(&raw, path)?;
        let per_module_ranks = raw
            .get("rank_pattern")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty());
        Ok(PeftConfigFile {
            cfg,
            path: path.to_path_buf(),
            per_module_ranks,
        })
    }

    /// A module's weights in `st_path` (A [rank, ·], B [·, rank]) against the config, as PEFT
    /// would check them when it loads them: rank r unless a rank_pattern gives ranks, and a
    /// layer that layers_to_transform selects. They must be finite too: a NaN adapter (a
    /// diverged run's) would show only later, as a NaN loss with no file named.
    pub fn check_module(&self, module: &str, a: &Tensor, b: &Tensor, st_path: &Path) -> Result<()> {
        if !crate::model::ops::all_finite(&[a.clone(), b.clone()])? {
            return Err(Error::adapter(
                st_path,
                format!("module '{module}': its LoRA A or B holds NaN or infinite values"),
            ));
        }
        let rank = a.dims()[0];
        if !self.per_module_ranks && rank != self.cfg.r {
            return Err(Error::adapter(
                st_path,
                format!(
                    "module '{module}' has rank {rank} but {} says r = {} (and has no rank_pattern)",
                    self.path.display(),
                    self.cfg.r
                ),
            ));
        }
        if let (Some(layers), Some(i)) = (&self.cfg.layers, layer_index(module)) {
            if !layers.contains(&i) {
                return Err(Error::adapter(
                    st_path,
                    format!(
                        "has weights for '{module}', in layer {i}, which layers_to_transform {layers:?} in {} leaves out",
                        self.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Parse PEFT's adapter_config.json into our config, rejecting what we cannot honour. A field
/// of the wrong JSON type is an error, not its default: a `"lora_alpha": "16"` read as PEFT's
/// default 8 would silently halve the adapter. `null` is PEFT's "not set".
pub fn config_from_peft(raw: &Value, path: &Path) -> Result<LoraConfig> {
    let obj = raw
        .as_object()
        .ok_or_else(|| Error::adapter(path, "must be a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let wrong = |k: &str, what: &str, v: &Value| {
        Error::adapter(path, format!("'{k}' must be {what}, not {v}"))
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| wrong(k, "a number", v)),
        }
    };
    let boolean = |k: &str| -> Result<bool> {
        match get(k) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| wrong(k, "true or false", v)),
        }
    };
    let string = |k: &str| -> Result<Option<&str>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| wrong(k, "a string", v)),
        }
    };
    match string("peft_type")? {
        Some("LORA") => {}
        Some(other) => {
            return Err(Error::adapter(
                path,
                format!("peft_type '{other}' is not supported (only LORA)"),
            ))
        }
        None => {
            return Err(Error::adapter(
                path,
                "missing 'peft_type' (PEFT writes \"LORA\")",
            ))
        }
    }
    if boolean("use_dora")? {
        return Err(Error::adapter(
            path,
            "DoRA adapters (use_dora = true) are not supported",
        ));
    }
    if let Some(b) = string("bias")? {
        if b != "none" {
            return Err(Error::adapter(
                path,
                format!("bias = '{b}' is not supported (only 'none')"),
            ));
        }
    }
    if get("modules_to_save").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(Error::adapter(path, "modules_to_save is not supported"));
    }
    for pattern in ["alpha_pattern", "rank_pattern"] {
        match get(pattern) {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(Value::Object(_)) if pattern == "rank_pattern" => {}
            Some(Value::Object(_)) => {
                return Err(Error::adapter(path, format!("{pattern} is not supported")))
            }
            Some(v) => return Err(wrong(pattern, "an object", v)),
        }
    }
    let r = match get("r") {
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| wrong("r", "a positive integer", v))? as usize,
        None => return Err(Error::adapter(path, "missing 'r'")),
    };
    // PEFT's default
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)?;
    let strings = |k: &str, a: &[Value]| -> Result<Vec<String>> {
        a.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong(k, "a list of strings", &Value::Array(a.to_vec())))
            })
            .collect()
    };
    let target_modules = match get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => {
            TargetModules::Names(vec!["all-linear".into()])
        }
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::Names(strings("target_modules", a)?),
        Some(v) => return Err(wrong("target_modules", "a string or a list of strings", v)),
        None => return Err(Error::adapter(path, "missing 'target_modules'")),
    };
    let layer = |v: &Value| {
        v.as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| wrong("layers_to_transform", "a layer index or a list of them", v))
    };
    let layers = match get("layers_to_transform") {
        None => None,
        Some(Value::Array(a)) => Some(a.iter().map(layer).collect::<Result<Vec<_>>>()?),
        Some(v) => Some(vec![layer(v)?]),
    };
    let cfg = LoraConfig {
        r,
        alpha,
        use_rslora: boolean("use_rslora")?,
        dropout,
        target_modules,
        layers,
    };
    cfg.validate()
        .map_err(|e| Error::adapter(path, e.to_string()))?;
    Ok(cfg)
}

/// adapter_config.json as PEFT writes it.
pub fn config_to_peft(cfg: &LoraConfig, model: &Decoder, base_model_name: Option<&str>) -> Value {
    let target = match &cfg.target_modules {
        TargetModules::Names(n) if n.len() == 1 && n[0] == "all-linear" => json!("all-linear"),
        TargetModules::Names(n) => json!(n),
        TargetModules::Regex(r) => json!(r),
    };
    let fan_in_fan_out = model.linears().iter().any(|l| l.lora.is_some() && l.conv1d);
    // modules whose rank is not r (a shadow adapter cut per module): PEFT reads their rank
    // from rank_pattern, full module paths matching as patterns
    let mut rank_pattern = serde_json::Map::new();
    let embedding = model
        .embed_lora
        .as_ref()
        .map(|l| (model.embed_name.clone(), l));
    let linears = model.linears_with_head();
    let modules = linears
        .iter()
        .filter_map(|lin| lin.lora.as_ref().map(|l| (lin.name.clone(), l)))
        .chain(embedding);
    for (name, lora) in modules {
        let rank = lora.a.as_tensor().dims()[0];
        if rank != cfg.r {
            rank_pattern.insert(name, json!(rank));
        }
    }
    json!({
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": cfg.layers,
        "layers_pattern": null,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "revision": null,
        "target_modules": target,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": cfg.use_rslora,
    })
}

/// Write the model's adapters as a PEFT adapter directory (files written atomically).
pub fn save_adapter(
    model: &Decoder,
    cfg: &LoraConfig,
    dir: &Path,
    base_model_name: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::new();
    for (name, var) in lora_vars(model) {
        tensors.push((
            name,
            OwnedView::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?,
        ));
    }
    if tensors.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has no LoRA adapters to save".into(),
        ));
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let cfg_json = config_to_peft(cfg, model, base_model_name);
    let text = serde_json::to_string_pretty(&cfg_json)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}
