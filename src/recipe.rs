//! Run recipes: TOML files that fully describe an unlearning run.
//!
//! Unknown keys and wrong types are errors naming the key and the file. `--set a.b=value`
//! overrides any field before validation; the resolved recipe is written to the output dir so a
//! run can be repeated exactly.
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, TargetModules};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub data: DataSection,
    pub method: MethodSection,
    #[serde(default)]
    pub train: TrainSection,
    /// evaluation before, during and after the run (optional)
    #[serde(default)]
    pub eval: Option<EvalSection>,
    pub output: OutputSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// suite name (tofu, perplexity, mcq) or a suite TOML file
    pub suite: String,
    /// `SPLIT=PATH` entries (paths may be local or hf://datasets/…)
    pub data: Vec<String>,
    /// retain model for forget quality / privleak (evaluated once, then reused)
    #[serde(default)]
    pub retain_model: Option<String>,
    /// an earlier EVAL.json of the retain model instead
    #[serde(default)]
    pub retain_log: Option<String>,
    /// evaluate every N optimizer steps (0: only before and after training)
    #[serde(default)]
    pub every: usize,
    /// also evaluate the starting model (adapter off) as step 0
    #[serde(default = "yes")]
    pub before: bool,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// only the first N items of each split
    #[serde(default)]
    pub limit: Option<usize>,
    /// pick the best evaluated checkpoint by this summary key (higher is better)…
    #[serde(default)]
    pub select: Option<String>,
    /// …among those whose `floor_key` is at least `floor`
    #[serde(default)]
    pub floor_key: Option<String>,
    #[serde(default)]
    pub floor: Option<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// local checkpoint directory (or hub id where the hub resolver is available)
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub rslora: bool,
    /// module names (`["q_proj", "v_proj"]`), `"all-linear"`, or a regex string
    #[serde(default = "default_targets")]
    pub target_modules: toml::Value,
    /// restrict adapters to these decoder layers
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> toml::Value {
    toml::Value::String("all-linear".into())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL/JSON file of forget items (`question`/`answer` or `text`)
    pub forget: String,
    /// JSONL/JSON file of retain items, or a list of files used as one set (optional for
    /// methods without a retain term)
    #[serde(default)]
    pub retain: Option<Paths>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// system message before each question (open-unlearning: "You are a helpful assistant."
    /// for Llama-3.x); also used by the run's evaluation
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// `date_string` for the chat template (open-unlearning: "10 Apr 2025" for Llama-3.x)
    #[serde(default)]
    pub date_string: Option<String>,
}

/// One path or a list of paths: `"a.jsonl"` or `["a.jsonl", "b.jsonl"]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged, expecting = "a file path or a list of file paths")]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

impl Paths {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Paths::One(p) => vec![p.clone()],
            Paths::Many(v) => v.clone(),
        }
    }

    fn map(self, f: impl Fn(&str) -> String) -> Self {
        match self {
            Paths::One(p) => Paths::One(f(&p)),
            Paths::Many(v) => Paths::Many(v.iter().map(|p| f(p)).collect()),
        }
    }
}

fn default_max_length() -> usize {
    256
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MethodSection {
    /// gradascent, graddiff, npo, simnpo, … (see `unlearn methods`)
    pub name: String,
    /// every other key: the method's own parameters, validated by the method
    #[serde(flatten)]
    pub params: toml::Table,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub seed: u64,
    /// passes over the forget set (ignored when `steps` is set)
    pub epochs: usize,
    /// optimizer steps; overrides `epochs`
    pub steps: Option<usize>,
    /// forget items per micro-batch (each paired with as many retain items)
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// AdamW decoupled weight decay (explicit: candle's default 0.01 is not used)
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// global gradient-norm clipping; 0 disables
    pub max_grad_norm: f64,
    /// write a resumable checkpoint every N steps (0: only at the end)
    pub checkpoint_every: usize,
    /// keep only the N most recent checkpoints, plus the best evaluated one (0: keep every one)
    pub keep_checkpoints: usize,
    /// print a log line every N steps when not on a terminal
    pub log_every: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            seed: 0,
            epochs: 1,
            steps: None,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            checkpoint_every: 0,
            keep_checkpoints: 0,
            log_every: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: String,
    /// also write the merged model to `<dir>/merged`
    #[serde(default)]
    pub merge: bool,
}

impl DataSection {
    pub fn prompt_style(&self) -> crate::tokenizer::PromptStyle {
        crate::tokenizer::PromptStyle {
            system_prompt: self.system_prompt.clone(),
            date_string: self.date_string.clone(),
        }
    }
}

impl Recipe {
    /// Read a recipe, apply `key.path=value` overrides, validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let recipe: Recipe = parse_toml(path, overrides)?;
        recipe.validate(path)?;
        let recipe = recipe.resolve_paths(path);
        // the method's own keys, checked now rather than after the model has loaded, and
        // named with the file they are in
        crate::methods::build(&recipe.method.name, &recipe.method.params).map_err(|e| {
            let msg = match e {
                Error::InvalidArgument(msg) => msg,
                other => other.to_string(),
            };
            Error::config(path, format!("[method] {msg}"))
        })?;
        Ok(recipe)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        check_output_dir(path, &self.output.dir)?;
        self.train.validate(path)?;
        self.lora.validate(path)?;
        if self.data.max_length < 2 {
            return bad("data.max_length must be ≥ 2".into());
        }
        if self
            .data
            .retain
            .as_ref()
            .is_some_and(|r| r.to_vec().is_empty())
        {
            return bad("data.retain is an empty list: name a file or leave the key out".into());
        }
        if let Some(e) = &self.eval {
            if e.data.is_empty() {
                return bad("eval.data must name at least one split (SPLIT=PATH)".into());
            }
            if e.retain_model.is_some() && e.retain_log.is_some() {
                return bad("give eval.retain_model or eval.retain_log, not both".into());
            }
            if e.floor_key.is_some() != e.floor.is_some() {
                return bad("eval.floor_key and eval.floor go together".into());
            }
        }
        Ok(())
    }

    /// Relative data/model/output paths are taken relative to the working directory when they
    /// exist there, else relative to the recipe file (so recipes work from anywhere).
    fn resolve_paths(mut self, recipe_path: &Path) -> Self {
        let fix = |p: &str| resolve_path(p, recipe_path);
        self.model.path = fix(&self.model.path);
        if let Some(e) = &mut self.eval {
            e.data = e
                .data
                .iter()
                .map(|d| match d.split_once('=') {
                    Some((k, v)) => format!("{k}={}", fix(v)),
                    None => d.clone(),
                })
                .collect();
            e.retain_model = e.retain_model.as_deref().map(fix);
            e.retain_log = e.retain_log.as_deref().map(fix);
            if e.suite.ends_with(".toml") {
                e.suite = fix(&e.suite);
            }
        }
        self.data.forget = fix(&self.data.forget);
        self.data.retain = self.data.retain.take().map(|r| r.map(fix));
        // method parameters that name files (oracle's teacher, idkdpo's answers, dmm's
        // "shadow:DIR" / "oracle:DIR" target)
        for key in ["teacher", "idk_file"] {
            if let Some(toml::Value::String(p)) = self.method.params.get_mut(key) {
                *p = fix(p);
            }
        }
        if let Some(toml::Value::String(spec)) = self.method.params.get_mut("target") {
            if let Some((kind, p)) = spec.split_once(':') {
                if matches!(kind, "shadow" | "oracle") {
                    *spec = format!("{kind}:{}", fix(p));
                }
            }
        }
        self
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        self.lora.to_config()
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the recipe: {e}")))
    }
}

/// Read a TOML recipe, apply `key.path=value` overrides and deserialize (unknown keys and wrong
/// types are errors naming the file).
fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut value: toml::Value =
        toml::from_str(&text).map_err(|e| Error::config(path, format!("invalid TOML: {e}")))?;
    for o in overrides {
        apply_override(&mut value, o).map_err(|m| Error::config(path, m))?;
    }
    value.clone().try_into().map_err(|e: toml::de::Error| {
        // a Value carries no positions: parse the text again for the line and the key at
        // fault (the file itself, or the recipe as the --set overrides made it)
        let located = if overrides.is_empty() {
            toml::from_str::<T>(&text).err().map(|e| e.to_string())
        } else {
            toml::to_string(&value)
                .ok()
                .and_then(|t| toml::from_str::<T>(&t).err())
                .map(|e| format!("{e}(in the recipe with the --set overrides applied)"))
        };
        Error::config(
            path,
            located
                .unwrap_or_else(|| e.message().to_string())
                .trim_end()
                .to_string(),
        )
    })
}

/// A relative path as given when it exists from the working directory, else relative to the
/// recipe file when it exists there, else unchanged.
fn resolve_path(p: &str, recipe_path: &Path) -> String {
    let base = recipe_path.parent().unwrap_or(Path::new("."));
    let pb = PathBuf::from(p);
    if pb.is_absolute() || pb.exists() {
        return p.to_string();
    }
    let alt = base.join(&pb);
    if alt.exists() {
        alt.display().to_string()
    } else {
        p.to_string()
    }
}

impl TrainSection {
    fn validate(&self, path: &Path) -> Result<()> {
        let t = self;
        let bad = |m: String| Err(Error::config(path, m));
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad(format!("train.lr must be > 0, got {}", t.lr));
        }
        if t.batch_size == 0 || t.grad_accum == 0 {
            return bad("train.batch_size and train.grad_accum must be ≥ 1".into());
        }
        if t.steps.is_none() && t.epochs == 0 {
            return bad("train.epochs must be ≥ 1 (or set train.steps)".into());
        }
        if t.steps == Some(0) {
            return bad("train.steps must be ≥ 1".into());
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 || t.eps <= 0.0 {
            return bad(
                "train.weight_decay and train.max_grad_norm must be ≥ 0, train.eps > 0".into(),
            );
        }
        if !(0.0..1.0).contains(&t.betas[0]) || !(0.0..1.0).contains(&t.betas[1]) {
            return bad("train.betas must be in [0, 1)".into());
        }
        Ok(())
    }
}

impl LoraSection {
    fn validate(&self, path: &Path) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config(path, "lora.r must be ≥ 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(path, "lora.dropout must be in [0, 1)"));
        }
        self.to_config()
            .map_err(|e| Error::config(path, e.to_string()))?;
        Ok(())
    }

    pub fn to_config(&self) -> Result<LoraConfig> {
        let target_modules = match &self.target_modules {
            toml::Value::String(s) if s == "all-linear" => TargetModules::Names(vec!["all-linear".into()]),
            toml::Value::String(s) => TargetModules::Regex(s.clone()),
            toml::Value::Array(a) => TargetModules::Names(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| Error::InvalidArgument("lora.target_modules entries must be strings".into()))
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "lora.target_modules must be a list of names, \"all-linear\" or a regex string, got {other}"
                )))
            }
        };
        let cfg = LoraConfig {
            r: self.r,
            alpha: self.alpha,
            use_rslora: self.rslora,
            dropout: self.dropout,
            target_modules,
            layers: self.layers.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A recipe for `unlearn train`: supervised training (next-token loss on the answers of QA items
/// and on every token of text items) of a whole model or a LoRA adapter, from a checkpoint or
/// from seeded random weights. Used to build target, retain and oracle models.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub model: InitSection,
    /// train a LoRA adapter (merged into the output model) instead of every weight
    #[serde(default)]
    pub lora: Option<LoraSection>,
    pub data: TrainDataSection,
    #[serde(default)]
    pub train: TrainSection,
    pub output: TrainOutputSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    /// start from this checkpoint (local directory or hub id)…
    #[serde(default)]
    pub path: Option<String>,
    /// …or from seeded random weights for this config.json
    #[serde(default)]
    pub config: Option<String>,
    /// directory with tokenizer.json and tokenizer_config.json (with `config`)
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// standard deviation of the random init (transformers' `initializer_range`)
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

fn default_init_std() -> f64 {
    0.02
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainDataSection {
    /// JSONL/JSON files of `question`/`answer` or `text` items, trained on together
    pub train: Vec<String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub date_string: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainOutputSection {
    /// run directory: recipe, metrics.jsonl, checkpoints
    pub dir: String,
    /// where the trained model directory goes (default `<dir>/model`)
    #[serde(default)]
    pub model: Option<String>,
}

impl TrainRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut recipe: TrainRecipe = parse_toml(path, overrides)?;
        let bad = |m: &str| Err(Error::config(path, m));
        match (&recipe.model.path, &recipe.model.config) {
            (Some(_), Some(_)) => return bad("give model.path or model.config, not both"),
            (None, None) => return bad(
                "give model.path (a checkpoint) or model.config (a config.json for random init)",
            ),
            (None, Some(_)) if recipe.model.tokenizer.is_none() => {
                return bad("model.config needs model.tokenizer (a directory with tokenizer.json)")
            }
            _ => {}
        }
        if !(recipe.model.init_std > 0.0 && recipe.model.init_std.is_finite()) {
            return bad("model.init_std must be > 0");
        }
        if recipe.data.train.is_empty() {
            return bad("data.train must name at least one file");
        }
        if recipe.data.max_length < 2 {
            return bad("data.max_length must be ≥ 2");
        }
        check_output_dir(path, &recipe.output.dir)?;
        recipe.train.validate(path)?;
        if let Some(l) = &recipe.lora {
            l.validate(path)?;
        }
        let fix = |p: &str| resolve_path(p, path);
        recipe.model.path = recipe.model.path.as_deref().map(fix);
        recipe.model.config = recipe.model.config.as_deref().map(fix);
        recipe.model.tokenizer = recipe.model.tokenizer.as_deref().map(fix);
        recipe.data.train = recipe.data.train.iter().map(|p| fix(p)).collect();
        Ok(recipe)
    }

    pub fn prompt_style(&self) -> crate::tokenizer::PromptStyle {
        crate::tokenizer::PromptStyle {
            system_prompt: self.data.system_prompt.clone(),
            date_string: self.data.date_string.clone(),
        }
    }

    pub fn model_out(&self) -> PathBuf {
        match &self.output.model {
            Some(p) => PathBuf::from(p),
            None => Path::new(&self.output.dir).join("model"),
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the recipe: {e}")))
    }
}

/// `train.lr=1e-4`, `lora.target_modules=["q_proj","v_proj"]`, `method.beta=0.2`: the value is
/// parsed as TOML, falling back to a plain string.
fn apply_override(root: &mut toml::Value, spec: &str) -> std::result::Result<(), String> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| format!("override '{spec}' must look like key.path=value"))?;
    let key = key.trim();
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("override key '{key}' is malformed"));
    }
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        let table = node.as_table_mut().ok_or_else(|| {
            format!(
                "override '{key}': '{}' is not a table",
                parts[..i].join(".")
            )
        })?;
        if i == parts.len() - 1 {
            table.insert(part.to_string(), parsed);
            return Ok(());
        }
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Ok(())
}

/// An empty output.dir would put a run's outputs in the working directory, and a run clears
/// the outputs of an earlier one there.
fn check_output_dir(path: &Path, dir: &str) -> Result<()> {
    if dir.trim().is_empty() {
        return Err(Error::config(
            path,
            "output.dir is empty: name the directory the run writes to",
        ));
    }
    Ok(())
}

/// Deserialize a method's parameters, naming unknown keys.
pub fn method_params<T: serde::de::DeserializeOwned>(
    method: &str,
    params: &toml::Table,
) -> Result<T> {
    // TOML has nan and inf; no method parameter means them (a NaN gamma showed only as a NaN
    // loss at step 1)
    fn non_finite(v: &toml::Value) -> bool {
        match v {
            toml::Value::Float(f) => !f.is_finite(),
            toml::Value::Array(a) => a.iter().any(non_finite),
            toml::Value::Table(t) => t.values().any(non_finite),
            _ => false,
        }
    }
    if let Some((key, value)) = params.iter().find(|(_, v)| non_finite(v)) {
        return Err(Error::InvalidArgument(format!(
            "method '{method}': {key} = {value} is not a finite number"
        )));
    }
    toml::Value::Table(params.clone())
        .try_into()
        .map_err(|e: toml::de::Error| {
            Error::InvalidArgument(format!("method '{method}': {}", e.message()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIC: &str = r#"
[model]
path = "m"
[lora]
r = 4
target_modules = ["q_proj"]
[data]
forget = "f.jsonl"
retain = "r.jsonl"
[method]
name = "npo"
beta = 0.1
[train]
seed = 3
epochs = 2
batch_size = 2
grad_accum = 1
lr = 1e-4
weight_decay = 0.0
betas = [0.9, 0.999]
eps = 1e-8
schedule = "linear"
warmup_steps = 1
max_grad_norm = 1.0
checkpoint_every = 0
log_every = 1
[output]
dir = "out"
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn loads_overrides_and_round_trips() {
        let (_d, p) = write(BASIC);
        let r = Recipe::load(
            &p,
            &[
                "train.lr=3e-4".into(),
                "method.beta=0.5".into(),
                "lora.target_modules=\"all-linear\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.lr, 3e-4);
        assert_eq!(r.method.params["beta"].as_float(), Some(0.5));
        assert_eq!(
            r.lora_config().unwrap().target_modules,
            TargetModules::Names(vec!["all-linear".into()])
        );
        let again: Recipe = toml::from_str(&r.to_toml().unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn retain_takes_one_file_or_a_list() {
        let (d, p) = write(BASIC);
        std::fs::write(d.path().join("r2.jsonl"), "").unwrap();
        let r = Recipe::load(&p, &[]).unwrap();
        assert_eq!(r.data.retain.unwrap().to_vec(), vec!["r.jsonl".to_string()]);
        let r = Recipe::load(&p, &["data.retain=[\"r.jsonl\", \"r2.jsonl\"]".into()]).unwrap();
        // an existing file resolves against the recipe's directory
        let files = r.data.retain.clone().unwrap().to_vec();
        assert_eq!(files[0], "r.jsonl");
        assert_eq!(files[1], d.path().join("r2.jsonl").display().to_string());
        let again: Recipe = toml::from_str(&r.to_toml().unwrap()).unwrap();
        assert_eq!(again, r);
        let e = Recipe::load(&p, &["data.retain=[]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.retain"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let (_d, p) = write(&BASIC.replace("epochs = 2", "epochs = 2\nepoch = 3"));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("epoch"), "{e}");
        // a value of the wrong type: the line, the key and what was expected
        let (_d, p) = write(&BASIC.replace("lr = 1e-4", "lr = \"fast\""));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("r.toml")
                && e.contains("line 18")
                && e.contains("lr = \"fast\"")
                && e.contains("expected f64"),
            "{e}"
        );
        let (_d, p) = write(BASIC);
        let e = Recipe::load(&p, &["data.retain=5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("retain = 5") && e.contains("a file path or a list of file paths"),
            "{e}"
        );
        let (_d, p) = write(BASIC);
        let e = Recipe::load(&p, &["train.lr=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.lr"), "{e}");
        let e = Recipe::load(&p, &["lora.r=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r"), "{e}");
        let e = Recipe::load(&p, &["nonsense".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.path=value"), "{e}");
        let e = Recipe::load(&p, &["output.bogus=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        // a method's own keys: checked at load, with the file named
        let e = Recipe::load(&p, &["method.betta=0.2".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("[method]") && e.contains("betta"),
            "{e}"
        );
        let e = Recipe::load(&p, &["method.beta=nan".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("beta = nan is not a finite number"),
            "{e}"
        );
        let e = Recipe::load(&p, &["output.dir=\"\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("output.dir is empty"),
            "{e}"
        );
        let e = Recipe::load(&p, &["method.name=\"nosuch\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("unknown method 'nosuch'"),
            "{e}"
        );
    }
}

/// An `unlearn attribute` recipe: estimate the model retrained without the forget set (a
/// "shadow" LoRA adapter) by one influence step. See `src/attribute/mod.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeRecipe {
    pub model: ModelSection,
    #[serde(default)]
    pub subspace: SubspaceSection,
    pub data: AttributeDataSection,
    #[serde(default)]
    pub attribute: AttributeSection,
    /// how well the shadow predicts a real retrained oracle (optional)
    #[serde(default)]
    pub report: Option<AttributeReportSection>,
    /// the simulated oracle's fine-tuning on data.retain (the `[train]` keys of `unlearn
    /// train`); needed when attribute.estimator or attribute.compare names "simulated"
    #[serde(default)]
    pub simulate: Option<TrainSection>,
    pub output: AttributeOutputSection,
}

/// The LoRA-shaped parameter subspace the influence step lives in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubspaceSection {
    /// rank r: each targeted module contributes out_features × r parameters (its B)
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_targets")]
    pub target_modules: toml::Value,
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

impl Default for SubspaceSection {
    fn default() -> Self {
        SubspaceSection {
            r: default_r(),
            target_modules: default_targets(),
            layers: None,
        }
    }
}

impl SubspaceSection {
    /// The shadow adapter's LoRA config: alpha = r, so PEFT's scale is 1 and ΔW = B·A.
    pub fn to_config(&self) -> Result<LoraConfig> {
        LoraSection {
            r: self.r,
            alpha: self.r as f64,
            dropout: 0.0,
            rslora: false,
            target_modules: self.target_modules.clone(),
            layers: self.layers.clone(),
        }
        .to_config()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeDataSection {
    /// the items to remove
    pub forget: String,
    /// the training data the retrained model would have seen: its curvature C is estimated on it
    pub retain: Paths,
    /// items the model never saw (e.g. holdout people): `scale = "auto"` makes the shadow's mean
    /// forget NLL equal the model's mean NLL on them
    #[serde(default)]
    pub calibrate: Option<String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub date_string: Option<String>,
}

impl AttributeDataSection {
    pub fn prompt_style(&self) -> crate::tokenizer::PromptStyle {
        crate::tokenizer::PromptStyle {
            system_prompt: self.system_prompt.clone(),
            date_string: self.date_string.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeSection {
    /// how (C + λI)⁻¹ is applied: cg (full curvature, conjugate gradients), diagonal, identity
    #[serde(default = "default_estimator")]
    pub estimator: crate::attribute::influence::Estimator,
    /// further estimators to fit and report next to the main one (only the main one is saved)
    #[serde(default)]
    pub compare: Vec<crate::attribute::influence::Estimator>,
    /// per-example vectors of C: "logits" (random projections of the logit Jacobian: the
    /// Gauss-Newton matrix of the logit-MSE matching loss, JᵀJ), "fisher" (gradients of labels
    /// sampled from the model) or "empirical" (the gold labels' gradients)
    #[serde(default = "default_curvature")]
    pub curvature: String,
    /// retain items whose per-example gradients estimate C (C is rescaled to the whole set)
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// λ relative to the mean eigenvalue trace(C)/P
    #[serde(default = "default_damping")]
    pub damping: f64,
    #[serde(default = "default_cg_iters")]
    pub cg_iters: usize,
    #[serde(default = "default_cg_tol")]
    pub cg_tol: f64,
    /// influence steps, each re-linearised where the last ended (1 = the plain influence step)
    #[serde(default = "default_attr_steps")]
    pub steps: usize,
    /// the multiplier m of the step: a number, or "auto" (calibrated on data.calibrate; with
    /// several steps, each raises the forget NLL by an equal ratio)
    #[serde(default = "default_scale")]
    pub scale: toml::Value,
    #[serde(default)]
    pub seed: u64,
    /// rows per forward pass when scoring
    #[serde(default = "default_attr_batch")]
    pub batch_size: usize,
    /// the simulated shadow's LoRA rank: each module's change cut to its best rank-k
    /// approximation (randomized SVD), the report saying how much was cut. Unset: the change
    /// is stored exactly, at full rank (an adapter about the model's own size)
    #[serde(default)]
    pub shadow_rank: Option<usize>,
}

fn default_estimator() -> crate::attribute::influence::Estimator {
    crate::attribute::influence::Estimator::Cg
}
fn default_curvature() -> String {
    "logits".into()
}
fn default_samples() -> usize {
    512
}
fn default_damping() -> f64 {
    0.1
}
fn default_cg_iters() -> usize {
    100
}
fn default_cg_tol() -> f64 {
    1e-4
}
fn default_scale() -> toml::Value {
    toml::Value::String("auto".into())
}
fn default_attr_steps() -> usize {
    1
}
fn default_attr_batch() -> usize {
    32
}

impl Default for AttributeSection {
    fn default() -> Self {
        AttributeSection {
            estimator: default_estimator(),
            compare: vec![],
            curvature: default_curvature(),
            samples: default_samples(),
            damping: default_damping(),
            cg_iters: default_cg_iters(),
            cg_tol: default_cg_tol(),
            steps: default_attr_steps(),
            scale: default_scale(),
            seed: 0,
            batch_size: default_attr_batch(),
            shadow_rank: None,
        }
    }
}

/// The step's multiplier m.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepScale {
    Fixed(f64),
    /// calibrated on `data.calibrate`
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeReportSection {
    /// a model really retrained without the forget set
    pub oracle: String,
    /// `SPLIT=PATH` entries to compare on (e.g. forget, retain, holdout)
    pub data: Vec<String>,
    /// other models retrained without the forget set (other seeds): the report adds the KL of
    /// their mean distribution to the oracle, what retraining itself gets without the oracle's
    /// own seed — the floor a prediction can be judged against
    #[serde(default)]
    pub references: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeOutputSection {
    /// run directory: recipe.toml, shadow/ (PEFT adapter), report.json, report.md
    pub dir: String,
}

impl AttributeRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut recipe: AttributeRecipe = parse_toml(path, overrides)?;
        check_output_dir(path, &recipe.output.dir)?;
        let bad = |m: String| Err(Error::config(path, m));
        let a = &recipe.attribute;
        if recipe.subspace.r == 0 {
            return bad("subspace.r must be ≥ 1".into());
        }
        if a.samples == 0 || a.batch_size == 0 || a.steps == 0 {
            return bad(
                "attribute.samples, attribute.steps and attribute.batch_size must be ≥ 1".into(),
            );
        }
        if !(a.damping > 0.0 && a.damping.is_finite()) {
            return bad(format!("attribute.damping must be > 0, got {}", a.damping));
        }
        if a.cg_tol.is_nan() || a.cg_tol <= 0.0 || a.cg_iters == 0 {
            return bad("attribute.cg_iters must be ≥ 1 and attribute.cg_tol > 0".into());
        }
        if !matches!(a.curvature.as_str(), "logits" | "fisher" | "empirical") {
            return bad(format!(
                "attribute.curvature must be \"logits\", \"fisher\" or \"empirical\", got \"{}\"",
                a.curvature
            ));
        }
        let influence = std::iter::once(&a.estimator)
            .chain(&a.compare)
            .any(|e| *e != crate::attribute::influence::Estimator::Simulated);
        let scale = recipe.step_scale().map_err(|m| Error::config(path, m))?;
        if influence && scale == StepScale::Auto && recipe.data.calibrate.is_none() {
            return bad(
                "attribute.scale = \"auto\" needs data.calibrate (items the model never saw, e.g. holdout people)"
                    .into(),
            );
        }
        if recipe.data.max_length < 2 {
            return bad("data.max_length must be ≥ 2".into());
        }
        let simulated = std::iter::once(&a.estimator)
            .chain(&a.compare)
            .any(|e| *e == crate::attribute::influence::Estimator::Simulated);
        match &recipe.simulate {
            Some(t) => t.validate(path)?,
            None if simulated => {
                return bad(
                    "the \"simulated\" estimator needs a [simulate] section: how to fine-tune the model on data.retain (epochs, lr, batch_size, … as in [train] of `unlearn train`)"
                        .into(),
                )
            }
            None => {}
        }
        match a.shadow_rank {
            Some(0) => return bad("attribute.shadow_rank must be ≥ 1".into()),
            Some(_) if !simulated => {
                return bad(
                    "attribute.shadow_rank applies to the \"simulated\" estimator, which neither attribute.estimator nor attribute.compare names"
                        .into(),
                )
            }
            _ => {}
        }
        if let Some(r) = &recipe.report {
            if r.data.is_empty() {
                return bad("report.data must name at least one SPLIT=PATH".into());
            }
            if let Some(d) = r.data.iter().find(|d| !d.contains('=')) {
                return bad(format!("report.data entry '{d}' must look like SPLIT=PATH"));
            }
        }
        recipe
            .subspace
            .to_config()
            .map_err(|e| Error::config(path, e.to_string()))?;
        let fix = |p: &str| resolve_path(p, path);
        recipe.model.path = fix(&recipe.model.path);
        recipe.data.forget = fix(&recipe.data.forget);
        recipe.data.retain = recipe.data.retain.clone().map(fix);
        recipe.data.calibrate = recipe.data.calibrate.as_deref().map(fix);
        if let Some(r) = &mut recipe.report {
            r.oracle = fix(&r.oracle);
            r.references = r.references.iter().map(|p| fix(p)).collect();
            r.data = r
                .data
                .iter()
                .map(|d| match d.split_once('=') {
                    Some((k, v)) => format!("{k}={}", fix(v)),
                    None => d.clone(),
                })
                .collect();
        }
        Ok(recipe)
    }

    pub fn step_scale(&self) -> std::result::Result<StepScale, String> {
        match &self.attribute.scale {
            toml::Value::String(s) if s == "auto" => Ok(StepScale::Auto),
            toml::Value::Float(f) if *f > 0.0 && f.is_finite() => Ok(StepScale::Fixed(*f)),
            toml::Value::Integer(i) if *i > 0 => Ok(StepScale::Fixed(*i as f64)),
            other => Err(format!(
                "attribute.scale must be \"auto\" or a number > 0, got {other}"
            )),
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the recipe: {e}")))
    }
}
