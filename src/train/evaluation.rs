//! Evaluation during `unlearn run`: the recipe's `[eval]` suite on the starting model, every N
//! steps and at the end; results land in `evals/step-N/` and as `{"step", "eval": {…}}` lines in
//! metrics.jsonl; optionally the best checkpoint by a summary key, subject to a floor.
use crate::error::{Error, Result};
use crate::eval::{evaluate, write_outputs, DataArg, EvalRequest, Reference, Suite, EVAL_FILE};
use crate::recipe::EvalSection;
use candle_core::Device;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Beside the cached retain-model evaluation: what it was computed from.
pub const RETAIN_INPUTS_FILE: &str = "inputs.json";

/// Size and modification time of a file (null when it is not a local file: a hub spec).
fn file_stamp(path: &Path) -> Value {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => serde_json::json!({
            "bytes": m.len(),
            "modified_ns": m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string()),
        }),
        _ => Value::Null,
    }
}

pub struct RunEvaluator {
    section: EvalSection,
    suite: Suite,
    data: Vec<DataArg>,
    reference: Option<Reference>,
    model_dir: PathBuf,
    model_label: String,
    device: Device,
    root: PathBuf,
    /// best (step, value) so far by `section.select`
    pub best: Option<(usize, f64)>,
    prompt_style: crate::tokenizer::PromptStyle,
}

impl RunEvaluator {
    /// Resolve the suite and data; a retain model is evaluated once here and its log reused.
    pub fn new(
        section: &EvalSection,
        model_dir: &Path,
        model_label: &str,
        device: &Device,
        out_dir: &Path,
        prompt_style: crate::tokenizer::PromptStyle,
    ) -> Result<Self> {
        let suite = Suite::resolve(&section.suite)?;
        let data = section
            .data
            .iter()
            .map(|d| DataArg::parse(d))
            .collect::<Result<Vec<_>>>()?;
        // a missing data file is found now, before the run writes anything, not at its first
        // evaluation
        for arg in &data {
            if let Some(spec) = &arg.spec {
                crate::hub::resolve_file(spec).map_err(|e| match e {
                    Error::Io { path, source } => Error::Data {
                        path,
                        msg: format!("eval.data split '{}': {source}", arg.split),
                    },
                    other => other,
                })?;
            }
        }
        let root = out_dir.join("evals");
        let mut ev = RunEvaluator {
            section: section.clone(),
            suite,
            data,
            reference: section
                .retain_log
                .as_ref()
                .map(PathBuf::from)
                .map(Reference::Log),
            model_dir: model_dir.to_path_buf(),
            model_label: model_label.to_string(),
            device: device.clone(),
            root,
            best: None,
            prompt_style,
        };
        if let Some(spec) = &section.retain_model {
            let dir = crate::train::trainer::model_path(spec)?;
            let cache = ev.root.join("retain-model");
            let log = cache.join(EVAL_FILE);
            let inputs_file = cache.join(RETAIN_INPUTS_FILE);
            let inputs = ev.retain_inputs(spec, &dir);
            let cached = std::fs::read_to_string(&inputs_file)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok());
            if !log.exists() || cached.as_ref() != Some(&inputs) {
                if log.exists() {
                    tracing::info!(
                        "{}: the retain model, suite or data changed since it was written; evaluating the retain model again",
                        log.display()
                    );
                }
                // the old record goes first: a crash before the new one is written must not
                // leave a fresh EVAL.json under the old inputs
                if inputs_file.exists() {
                    std::fs::remove_file(&inputs_file).map_err(|e| Error::io(&inputs_file, e))?;
                }
                let out = evaluate(&ev.request(dir, spec.clone(), None, None))?;
                write_outputs(&cache, &out)?;
                crate::model::weights::write_atomic(
                    &inputs_file,
                    serde_json::to_string_pretty(&inputs)
                        .expect("JSON values serialise")
                        .as_bytes(),
                )?;
            }
            ev.reference = Some(Reference::Log(log));
        }
        Ok(ev)
    }

    /// What the cached retain-model evaluation is computed from: the model (its files' sizes
    /// and modification times), the suite, the data (likewise) and the settings that change
    /// results, the base weights' dtype among them. The cache is reused only when these are
    /// equal, so a changed split file or a retrained retain model is never scored against a
    /// stale reference.
    fn retain_inputs(&self, spec: &str, model_dir: &Path) -> Value {
        let mut model_files = Map::new();
        if let Ok(entries) = std::fs::read_dir(model_dir) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths.into_iter().filter(|p| p.is_file()) {
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                model_files.insert(name, file_stamp(&p));
            }
        }
        let data: Vec<Value> = self
            .data
            .iter()
            .map(|d| {
                serde_json::json!({
                    "split": d.split,
                    "spec": d.spec,
                    "file": d.spec.as_deref().map_or(Value::Null, |s| file_stamp(Path::new(s))),
                })
            })
            .collect();
        serde_json::json!({
            "model": spec,
            "model_files": model_files,
            "suite": self.section.suite,
            "suite_file": file_stamp(Path::new(&self.section.suite)),
            "data": data,
            "limit": self.section.limit,
            "max_new_tokens": self.section.max_new_tokens,
            "batch_size": self.section.batch_size,
            "prompt_style": format!("{:?}", self.prompt_style),
            // bf16 and f32 base weights score differently
            "base_dtype": format!("{:?}", crate::device::base_dtype(&self.device)),
        })
    }

    fn request(
        &self,
        model: PathBuf,
        label: String,
        adapter: Option<PathBuf>,
        reference: Option<Reference>,
    ) -> EvalRequest {
        EvalRequest {
            suite: self.suite.clone(),
            data: self.data.clone(),
            model,
            model_label: label,
            adapter,
            reference,
            batch_size: self.section.batch_size,
            max_new_tokens: self.section.max_new_tokens,
            limit: self.section.limit,
            device: self.device.clone(),
            progress: false,
            prompt_style: self.prompt_style.clone(),
        }
    }

    pub fn before(&self) -> bool {
        self.section.before
    }

    pub fn due(&self, step: usize, total: usize) -> bool {
        step == total || (self.section.every > 0 && step.is_multiple_of(self.section.every))
    }

    /// Evaluate the model (with `adapter`, or the base model) as of `step`.
    pub fn run(&mut self, step: usize, adapter: Option<&Path>) -> Result<Map<String, Value>> {
        let req = self.request(
            self.model_dir.clone(),
            self.model_label.clone(),
            adapter.map(Path::to_path_buf),
            self.reference.clone(),
        );
        let out = evaluate(&req)?;
        write_outputs(&self.root.join(format!("step-{step:06}")), &out)?;
        // a mistyped key would otherwise select nothing, silently
        for (what, key) in [
            ("eval.select", &self.section.select),
            ("eval.floor_key", &self.section.floor_key),
        ] {
            if let Some(key) = key.as_deref().filter(|k| !out.summary.contains_key(*k)) {
                let have: Vec<&str> = out.summary.keys().map(String::as_str).collect();
                return Err(Error::InvalidArgument(format!(
                    "{what} '{key}' is not a key of the evaluation's summary (it has: {})",
                    have.join(", ")
                )));
            }
        }
        self.consider(step, &out.summary);
        Ok(out.summary)
    }

    /// Track the best step by the selection key, among evaluations above the floor.
    pub fn consider(&mut self, step: usize, summary: &Map<String, Value>) {
        let Some(key) = &self.section.select else {
            return;
        };
        if let (Some(fk), Some(floor)) = (&self.section.floor_key, self.section.floor) {
            if summary
                .get(fk)
                .and_then(Value::as_f64)
                .is_none_or(|v| v < floor)
            {
                return;
            }
        }
        if let Some(v) = summary.get(key).and_then(Value::as_f64) {
            if self.best.is_none_or(|(_, b)| v > b) {
                self.best = Some((step, v));
            }
        }
    }

    /// Remove the evaluations of steps after `step` (`evals/step-NNNNNN`), as metrics.jsonl is
    /// truncated there: a fresh run into an old output directory, or a resume from an earlier
    /// checkpoint, must not leave another trajectory's results next to its own. A fresh run
    /// (`step` 0) removes step 0 too: it is evaluated again only when the suite asks for it.
    pub fn drop_evals_after(&self, step: usize) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let stale = name
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n > step || step == 0);
            if stale {
                crate::model::weights::remove_dir_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Re-read earlier evaluation lines of metrics.jsonl (after a resume).
    pub fn replay(&mut self, metrics_path: &Path) -> Result<()> {
        if !metrics_path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(metrics_path).map_err(|e| Error::io(metrics_path, e))?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let (Some(step), Some(Value::Object(summary))) = (v["step"].as_u64(), v.get("eval"))
            {
                self.consider(step as usize, summary);
            }
        }
        Ok(())
    }

    pub fn select_key(&self) -> Option<&str> {
        self.section.select.as_deref()
    }
}
