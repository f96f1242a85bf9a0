//! Tokenizer and chat template, matching transformers' `PreTrainedTokenizerFast` behaviour.
//!
//! A model directory holds `tokenizer.json` (the Hugging Face `tokenizers` serialisation),
//! optionally `tokenizer_config.json` (special tokens, chat template) and optionally
//! `chat_template.jinja` (the chat template as a separate file, written by transformers 4.43+).
//!
//! Chat templates are rendered with minijinja, configured like the Jinja2 sandbox that
//! transformers uses: `trim_blocks` and `lstrip_blocks` on, no autoescaping, the
//! `raise_exception` and `strftime_now` globals, transformers' `tojson` filter (no HTML escaping,
//! Python `json.dumps` formatting), Python's rendering of `None`/`True`/`False`, the common Python
//! `str`/`dict`/`list` methods (`strip`, `startswith`, `split`, `items`, `get`, ...), and the
//! `{% generation %}` tag that transformers' assistant tracker adds.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{from_args, Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// English month names (strftime `%B`; the bundled benchmark's birth months).
pub(crate) const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the tokenizer configuration in a model directory.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Name of the stand-alone chat template file in a model directory.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Directory of additional named chat templates (`<name>.jinja`) in a model directory.
pub const CHAT_TEMPLATE_DIR: &str = "additional_chat_templates";

/// Label value for positions that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Template name inside the minijinja environment. It has no `.html` suffix, so no autoescaping.
const TEMPLATE_NAME: &str = "chat_template";

/// The special-token attributes transformers passes to chat templates (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One chat message, as passed to a chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedExample {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] (-100) where no loss is taken.
    pub labels: Vec<i64>,
}

impl EncodedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of positions that carry a loss (label != -100).
    pub fn num_labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
    /// Keep only the first `max_len` tokens when `max_len` is `Some`.
    pub fn truncate(&mut self, max_len: Option<usize>) {
        if let Some(n) = max_len {
            self.input_ids.truncate(n);
            self.labels.truncate(n);
        }
    }
}

/// Special token strings from `tokenizer_config.json`, in [`SPECIAL_TOKEN_NAMES`] order.
#[derive(Debug, Clone, Default)]
struct SpecialTokens([Option<String>; 7]);

impl SpecialTokens {
    fn get(&self, name: &str) -> Option<&str> {
        SPECIAL_TOKEN_NAMES
            .iter()
            .position(|&n| n == name)
            .and_then(|i| self.0[i].as_deref())
    }
}

/// A chat template, compiled once at load time. Compilation errors are kept and reported when
/// the template is used, so that a model whose template minijinja cannot parse still loads
/// (as in transformers, which compiles lazily).
#[derive(Debug, Clone)]
struct ChatTemplate {
    /// The file the template came from (tokenizer_config.json or chat_template.jinja).
    path: PathBuf,
    source: Option<String>,
    compiled: std::result::Result<Arc<Environment<'static>>, String>,
}

/// A Hugging Face fast tokenizer plus its chat template and special tokens.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    dir: PathBuf,
    tokenizer_path: PathBuf,
    config_path: PathBuf,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    template: Option<ChatTemplate>,
    clean_up_tokenization_spaces: bool,
    prompt_style: PromptStyle,
}

/// How question prompts are built beyond the model's own template: open-unlearning prompts
/// Llama-3.x with the system prompt "You are a helpful assistant." and the template variable
/// `date_string` = "10 Apr 2025"; both are off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptStyle {
    /// a system message placed before the question (chat templates only)
    pub system_prompt: Option<String>,
    /// passed to the chat template as `date_string`
    pub date_string: Option<String>,
}

impl ChatTokenizer {
    /// Load `tokenizer.json` and `tokenizer_config.json` (optional) from a model directory, plus
    /// `chat_template.jinja` / `additional_chat_templates/*.jinja` when present (they take
    /// priority over the template in `tokenizer_config.json`, as in transformers).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let bytes = match std::fs::read(&tokenizer_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Tokenizer {
                    path: tokenizer_path,
                    msg: format!(
                        "file is missing; the model directory {} must contain a Hugging Face {TOKENIZER_FILE}",
                        dir.display()
                    ),
                })
            }
            Err(e) => return Err(Error::io(&tokenizer_path, e)),
        };
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
                path: tokenizer_path.clone(),
                msg: format!("cannot parse {TOKENIZER_FILE}: {e}"),
            })?;
        // transformers resets truncation and padding on every call unless asked for them, so any
        // settings stored in tokenizer.json never apply to plain `encode`.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: tokenizer_path.clone(),
                msg: format!("cannot disable truncation: {e}"),
            })?;
        tokenizer.with_padding(None);

        let config: Option<serde_json::Value> = if config_path.is_file() {
            Some(crate::error::read_json(&config_path)?)
        } else {
            None
        };
        let config_obj = match &config {
            None => None,
            Some(serde_json::Value::Object(map)) => Some(map),
            Some(_) => {
                return Err(Error::Tokenizer {
                    path: config_path,
                    msg: "expected a JSON object".into(),
                })
            }
        };

        let mut special = SpecialTokens::default();
        if let Some(map) = config_obj {
            for (i, name) in SPECIAL_TOKEN_NAMES.iter().enumerate() {
                special.0[i] = match map.get(*name) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(o)) => match o.get("content") {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        _ => {
                            return Err(Error::Tokenizer {
                                path: config_path,
                                msg: format!("{name} is an object without a string 'content'"),
                            })
                        }
                    },
                    Some(other) => {
                        return Err(Error::Tokenizer {
                            path: config_path,
                            msg: format!(
                                "{name} must be a string or an AddedToken object, got {other}"
                            ),
                        })
                    }
                };
            }
        }
        let id_of = |name: &str| special.get(name).and_then(|t| tokenizer.token_to_id(t));
        let bos_id = id_of("bos_token");
        let eos_id = id_of("eos_token");
        let pad_id = id_of("pad_token");
        let unk_id = id_of("unk_token");

        let clean_up_tokenization_spaces = config_obj
            .and_then(|m| m.get("clean_up_tokenization_spaces"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let force_bpe_cleanup = config_obj
            .and_then(|m| {
                m.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
            })
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        // transformers 5 skips the clean-up for BPE models unless forced.
        let is_bpe = matches!(
            tokenizer.get_model(),
            tokenizers::models::ModelWrapper::BPE(_)
        );
        let clean_up_tokenization_spaces =
            clean_up_tokenization_spaces && (!is_bpe || force_bpe_cleanup);

        let template = load_template(dir, &config_path, config_obj)?;

        Ok(ChatTokenizer {
            tokenizer,
            dir: dir.to_path_buf(),
            tokenizer_path,
            config_path,
            special,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            template,
            clean_up_tokenization_spaces,
            prompt_style: PromptStyle::default(),
        })
    }

    /// Use a system prompt and/or template date for question prompts.
    pub fn with_prompt_style(mut self, style: PromptStyle) -> Self {
        self.prompt_style = style;
        self
    }

    pub fn prompt_style(&self) -> &PromptStyle {
        &self.prompt_style
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
    /// The model directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Path of `tokenizer.json`.
    pub fn tokenizer_path(&self) -> &Path {
        &self.tokenizer_path
    }
    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Tokenize `text`. With `add_special_tokens` the tokenizer's post-processor runs (e.g. adds BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.tok_err(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Detokenize `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(format!("cannot decode ids: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.get("bos_token")
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.special.get("eos_token")
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.special.get("pad_token")
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.special.get("unk_token")
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_id
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }
    /// The chat template source, when the model has one (and it has a default).
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().and_then(|t| t.source.as_deref())
    }

    /// Render the chat template like transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.template.as_ref().ok_or_else(|| Error::Template {
            path: self.config_path.clone(),
            msg: "the model has no chat template".into(),
        })?;
        let template_err = |msg: String| Error::Template {
            path: tpl.path.clone(),
            msg,
        };
        let env = tpl.compiled.as_ref().map_err(|m| template_err(m.clone()))?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(describe_jinja_error(&e)))?;

        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageObject {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
            .collect();
        ctx.insert("messages", Value::from(msgs));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(tok) = self.special.get(name) {
                ctx.insert(name, Value::from(tok));
            }
        }
        if let Some(date) = &self.prompt_style.date_string {
            ctx.insert("date_string", Value::from(date.as_str()));
        }
        template
            .render(ctx)
            .map_err(|e| template_err(describe_jinja_error(&e)))
    }

    /// The prompt for a question: the chat template with one user message and
    /// `add_generation_prompt=true`, or `"Question: {q}\nAnswer: "` when there is no template.
    pub fn question_prompt(&self, question: &str) -> Result<String> {
        if self.has_chat_template() {
            let mut messages = Vec::new();
            if let Some(system) = &self.prompt_style.system_prompt {
                messages.push(ChatMessage::system(system.as_str()));
            }
            messages.push(ChatMessage::user(question));
            self.apply_chat_template(&messages, true)
        } else {
            Ok(format!("Question: {question}\nAnswer: "))
        }
    }

    /// Token ids of [`Self::question_prompt`]. A chat-template prompt already carries its BOS, so
    /// it is tokenized without special tokens; the fallback prompt is tokenized with them.
    pub fn encode_prompt(&self, question: &str) -> Result<Vec<u32>> {
        let prompt = self.question_prompt(question)?;
        self.encode(&prompt, !self.has_chat_template())
    }

    /// A question/answer example: prompt tokens (labels -100), then answer tokens and EOS
    /// (labels = ids). Prompt and answer are tokenized separately so that the boundary is exact.
    /// Truncated to `max_len` tokens (keeping the start) when `Some`.
    pub fn encode_qa(
        &self,
        question: &str,
        answer: &str,
        max_len: Option<usize>,
    ) -> Result<EncodedExample> {
        let eos = self.require_eos()?;
        let prompt_ids = self.encode_prompt(question)?;
        let answer_ids = self.encode(answer, false)?;
        let mut input_ids = Vec::with_capacity(prompt_ids.len() + answer_ids.len() + 1);
        let mut labels = Vec::with_capacity(input_ids.capacity());
        input_ids.extend_from_slice(&prompt_ids);
        labels.resize(prompt_ids.len(), IGNORE_INDEX);
        for &id in answer_ids.iter().chain(std::iter::once(&eos)) {
            input_ids.push(id);
            labels.push(i64::from(id));
        }
        let mut ex = EncodedExample { input_ids, labels };
        ex.truncate(max_len);
        Ok(ex)
    }

    /// A raw text example: loss on every token (labels = ids), with special tokens added by the
    /// tokenizer's post-processor. Truncated to `max_len` tokens (keeping the start) when `Some`.
    pub fn encode_text(&self, text: &str, max_len: Option<usize>) -> Result<EncodedExample> {
        let input_ids = self.encode(text, true)?;
        let labels = input_ids.iter().map(|&id| i64::from(id)).collect();
        let mut ex = EncodedExample { input_ids, labels };
        ex.truncate(max_len);
        Ok(ex)
    }

    fn require_eos(&self) -> Result<u32> {
        if let Some(id) = self.eos_id {
            return Ok(id);
        }
        let msg = match self.eos_token() {
            Some(tok) => format!(
                "eos_token '{tok}' from {} is not in the vocabulary",
                self.config_path.display()
            ),
            None => format!(
                "the tokenizer has no EOS token (no eos_token in {})",
                self.config_path.display()
            ),
        };
        Err(self.tok_err(msg))
    }

    fn tok_err(&self, msg: String) -> Error {
        Error::Tokenizer {
            path: self.tokenizer_path.clone(),
            msg,
        }
    }
}

/// Find the chat template: `chat_template.jinja` and `additional_chat_templates/*.jinja` take
/// priority; otherwise `chat_template` in tokenizer_config.json (a string, or a list of
/// `{name, template}` from which the one named "default" is used).
fn load_template(
    dir: &Path,
    config_path: &Path,
    config: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Option<ChatTemplate>> {
    // name -> (source, path)
    let mut named: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    let file = dir.join(CHAT_TEMPLATE_FILE);
    if file.is_file() {
        let src = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        named.insert("default".into(), (src, file));
    }
    let extra_dir = dir.join(CHAT_TEMPLATE_DIR);
    if extra_dir.is_dir() {
        let entries = std::fs::read_dir(&extra_dir).map_err(|e| Error::io(&extra_dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&extra_dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("jinja") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let src = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            named.insert(name.to_string(), (src, path.clone()));
        }
    }
    if named.is_empty() {
        match config.and_then(|m| m.get("chat_template")) {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => {
                named.insert("default".into(), (s.clone(), config_path.to_path_buf()));
            }
            Some(serde_json::Value::Array(list)) => {
                for item in list {
                    let name = item.get("name").and_then(|v| v.as_str());
                    let tpl = item.get("template").and_then(|v| v.as_str());
                    match (name, tpl) {
                        (Some(n), Some(t)) => {
                            named.insert(n.to_string(), (t.to_string(), config_path.to_path_buf()));
                        }
                        _ => return Err(Error::Template {
                            path: config_path.to_path_buf(),
                            msg:
                                "chat_template list entries must have string 'name' and 'template'"
                                    .into(),
                        }),
                    }
                }
            }
            Some(other) => {
                return Err(Error::Template {
                    path: config_path.to_path_buf(),
                    msg: format!("chat_template must be a string or a list, got {other}"),
                })
            }
        }
    }
    Ok(Some(match named.remove("default") {
        Some((source, path)) => {
            let compiled = build_environment(&source)
                .map(Arc::new)
                .map_err(|e| format!("cannot compile: {}", describe_jinja_error(&e)));
            ChatTemplate {
                path,
                source: Some(source),
                compiled,
            }
        }
        None => {
            let names: Vec<&str> = named.keys().map(String::as_str).collect();
            let path = named
                .values()
                .next()
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| config_path.to_path_buf());
            ChatTemplate {
                path,
                source: None,
                compiled: Err(format!(
                    "the model has several chat templates ({}) and none is named 'default'",
                    names.join(", ")
                )),
            }
        }
    }))
}

/// transformers' `clean_up_tokenization` (WordPiece-era space removal before punctuation).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

// ---------------------------------------------------------------------------------------------
// Jinja environment
// ---------------------------------------------------------------------------------------------

fn describe_jinja_error(e: &minijinja::Error) -> String {
    use std::error::Error as _;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn build_environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_method);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, preprocess_template(source))?;
    Ok(env)
}

/// A chat message as the template sees it: a dict with `role` then `content` (in that order, so
/// `tojson` and `items()` match Python's insertion order).
#[derive(Debug)]
struct MessageObject {
    role: Value,
    content: Value,
}

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// transformers' `raise_exception(message)`.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers' `strftime_now(format)`. Time is UTC (Python uses the local time zone).
fn strftime_now(format: &str) -> String {
    let secs = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    strftime(format, secs)
}

/// Adapt a Jinja2 chat template to minijinja, leaving everything else untouched:
///
/// * transformers' `{% generation %}`/`{% endgeneration %}` tags (which only mark the
///   assistant's text) become an always-true `if` block, keeping whitespace control markers;
/// * a backslash-newline inside a string literal in a tag is removed, as Python's string-escape
///   rules (which Jinja2 follows) treat it as a line continuation (Mistral's templates use it).
///
/// Text outside tags, comments and `{% raw %}` blocks are copied verbatim.
fn preprocess_template(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find('{') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let close = match rest.as_bytes().get(1) {
            Some(b'{') => "}}",
            Some(b'%') => "%}",
            Some(b'#') => {
                // Comment: copy through "#}" (or to the end).
                let end = rest.find("#}").map_or(rest.len(), |e| e + 2);
                out.push_str(&rest[..end]);
                rest = &rest[end..];
                continue;
            }
            _ => {
                out.push('{');
                rest = &rest[1..];
                continue;
            }
        };
        let (body, consumed) = scan_tag(&rest[2..], close);
        if close == "%}" && tag_word(&body) == Some("raw") {
            // Copy the raw block verbatim through its {% endraw %}.
            let mut end = rest.len();
            let mut search = 2 + consumed;
            while let Some(p) = rest[search..].find("{%") {
                let start = search + p;
                let (inner, n) = scan_tag(&rest[start + 2..], "%}");
                if tag_word(&inner) == Some("endraw") {
                    end = start + 2 + n;
                    break;
                }
                search = start + 2;
            }
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        out.push_str(&rest[..2]);
        let body = if close == "%}" {
            match tag_word(&body) {
                Some("generation") => body.replacen("generation", "if true", 1),
                Some("endgeneration") => body.replacen("endgeneration", "endif", 1),
                _ => body,
            }
        } else {
            body
        };
        out.push_str(&body);
        rest = &rest[2 + consumed..];
    }
    out.push_str(rest);
    out
}

/// Scan a tag body up to its closing delimiter, skipping string literals. Returns the body
/// (with backslash-newline removed inside strings) plus the closing delimiter when found, and the
/// number of bytes consumed.
fn scan_tag(s: &str, close: &str) -> (String, usize) {
    let mut body = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(q) => {
                if c == '\\' {
                    match chars.peek().map(|&(_, n)| n) {
                        Some('\n') => {
                            chars.next();
                        }
                        Some('\r') if s[i + 1..].starts_with("\r\n") => {
                            chars.next();
                            chars.next();
                        }
                        Some(n) => {
                            chars.next();
                            body.push('\\');
                            body.push(n);
                        }
                        None => body.push('\\'),
                    }
                    continue;
                }
                if c == q {
                    quote = None;
                }
                body.push(c);
            }
            None => {
                if s[i..].starts_with(close) {
                    body.push_str(close);
                    return (body, i + close.len());
                }
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                body.push(c);
            }
        }
    }
    (body, s.len())
}

/// The statement keyword of a `{% ... %}` body such as `- generation -%}`, when the body consists
/// of that single word.
fn tag_word(body: &str) -> Option<&str> {
    let inner = body.strip_suffix("%}")?;
    let inner = inner.trim_start_matches(['-', '+']).trim_start();
    let inner = inner.trim_end().trim_end_matches(['-', '+']).trim_end();
    let is_word = !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    is_word.then_some(inner)
}

/// Render `{{ value }}` like Jinja2: `None`, `True`, `False`, Python float repr.
fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None")?,
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) => out.write_str(&python_float_repr(f))?,
            Err(_) => minijinja::escape_formatter(out, state, value)?,
        },
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// Python's `repr(float)`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let abs = f.abs();
    if abs == 0.0 || (1e-4..1e16).contains(&abs) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mant, exp)) => {
                let exp: i32 = exp.parse().unwrap_or(0);
                let sign = if exp < 0 { '-' } else { '+' };
                format!("{mant}e{sign}{:02}", exp.unsigned_abs())
            }
            None => s,
        }
    }
}

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// The Python `str`, `dict` and `list` methods that chat templates call.
fn python_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::String => match value.as_str() {
            Some(s) => string_method(s, method, args),
            None => Err(ErrorKind::UnknownMethod.into()),
        },
        ValueKind::Map => map_method(value, method, args),
        ValueKind::Seq | ValueKind::Iterable => seq_method(value, method, args),
        _ => Err(ErrorKind::UnknownMethod.into()),
    }
}

fn strip_chars<'a>(s: &'a str, chars: Option<&str>, start: bool, end: bool) -> &'a str {
    let set: Option<Vec<char>> = chars.map(|c| c.chars().collect());
    let is_strip = |c: char| match &set {
        Some(set) => set.contains(&c),
        None => c.is_whitespace(),
    };
    let mut out = s;
    if start {
        out = out.trim_start_matches(is_strip);
    }
    if end {
        out = out.trim_end_matches(is_strip);
    }
    out
}

/// `str.startswith` / `str.endswith` argument: a string or a tuple of strings.
fn affix_matches(
    s: &str,
    affix: &Value,
    test: fn(&str, &str) -> bool,
) -> std::result::Result<bool, minijinja::Error> {
    if let Some(a) = affix.as_str() {
        return Ok(test(s, a));
    }
    if matches!(affix.kind(), ValueKind::Seq | ValueKind::Iterable) {
        for item in affix.try_iter()? {
            let a = item.as_str().ok_or_else(|| {
                invalid("tuple for startswith/endswith must contain only strings")
            })?;
            if test(s, a) {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Err(invalid(format!(
        "startswith/endswith argument must be str or a tuple of str, not {}",
        affix.kind()
    )))
}

/// Python `str.split(sep=None, maxsplit=-1)`.
fn python_split(
    s: &str,
    sep: Option<&str>,
    maxsplit: i64,
) -> std::result::Result<Vec<Value>, minijinja::Error> {
    let limit = usize::try_from(maxsplit).ok();
    let mut parts = Vec::new();
    match sep {
        Some("") => return Err(invalid("empty separator")),
        Some(sep) => match limit {
            Some(n) => parts.extend(s.splitn(n + 1, sep).map(Value::from)),
            None => parts.extend(s.split(sep).map(Value::from)),
        },
        None => {
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if limit.is_some_and(|n| parts.len() >= n) {
                    parts.push(Value::from(rest));
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                parts.push(Value::from(&rest[..end]));
                rest = rest[end..].trim_start();
            }
        }
    }
    Ok(parts)
}

/// Python `str.splitlines(keepends=False)`.
fn python_splitlines(s: &str, keepends: bool) -> Vec<Value> {
    const BREAKS: &[char] = &[
        '\n', '\r', '\x0b', '\x0c', '\x1c', '\x1d', '\x1e', '\u{85}', '\u{2028}', '\u{2029}',
    ];
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(pos) = rest.find(BREAKS) {
        let brk_len = if rest[pos..].starts_with("\r\n") {
            2
        } else {
            rest[pos..].chars().next().map_or(1, char::len_utf8)
        };
        let end = if keepends { pos + brk_len } else { pos };
        out.push(Value::from(&rest[..end]));
        rest = &rest[pos + brk_len..];
    }
    if !rest.is_empty() {
        out.push(Value::from(rest));
    }
    out
}

fn python_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = c.is_alphabetic();
    }
    out
}

fn char_index(s: &str, byte_pos: Option<usize>) -> i64 {
    byte_pos.map_or(-1, |p| s[..p].chars().count() as i64)
}

fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let nonempty_all = |f: fn(char) -> bool| !s.is_empty() && s.chars().all(f);
    Ok(match method {
        "upper" => {
            let () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "lower" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "title" => {
            let () = from_args(args)?;
            Value::from(python_title(s))
        }
        "capitalize" => {
            let () = from_args(args)?;
            let mut chars = s.chars();
            let mut out = String::with_capacity(s.len());
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.extend(chars.flat_map(char::to_lowercase));
            }
            Value::from(out)
        }
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(strip_chars(
                s,
                chars,
                method != "rstrip",
                method != "lstrip",
            ))
        }
        "startswith" => {
            let (prefix,): (&Value,) = from_args(args)?;
            Value::from(affix_matches(s, prefix, |s, a| s.starts_with(a))?)
        }
        "endswith" => {
            let (suffix,): (&Value,) = from_args(args)?;
            Value::from(affix_matches(s, suffix, |s, a| s.ends_with(a))?)
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            match count.and_then(|c| usize::try_from(c).ok()) {
                Some(n) => Value::from(s.replacen(old, new, n)),
                None => Value::from(s.replace(old, new)),
            }
        }
        "split" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            Value::from(python_split(s, sep, maxsplit.unwrap_or(-1))?)
        }
        "splitlines" => {
            let (keepends,): (Option<bool>,) = from_args(args)?;
            Value::from(python_splitlines(s, keepends.unwrap_or(false)))
        }
        "count" => {
            let (sub,): (&str,) = from_args(args)?;
            Value::from(s.matches(sub).count())
        }
        "find" => {
            let (sub,): (&str,) = from_args(args)?;
            Value::from(char_index(s, s.find(sub)))
        }
        "rfind" => {
            let (sub,): (&str,) = from_args(args)?;
            Value::from(char_index(s, s.rfind(sub)))
        }
        "join" => {
            let (items,): (&Value,) = from_args(args)?;
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(s);
                }
                out.push_str(&item.to_string());
            }
            Value::from(out)
        }
        "isdigit" | "isnumeric" | "isdecimal" => {
            let () = from_args(args)?;
            Value::from(nonempty_all(char::is_numeric))
        }
        "isalpha" => {
            let () = from_args(args)?;
            Value::from(nonempty_all(char::is_alphabetic))
        }
        "isalnum" => {
            let () = from_args(args)?;
            Value::from(nonempty_all(char::is_alphanumeric))
        }
        "isspace" => {
            let () = from_args(args)?;
            Value::from(nonempty_all(char::is_whitespace))
        }
        "islower" => {
            let () = from_args(args)?;
            Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))
        }
        "isupper" => {
            let () = from_args(args)?;
            Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))
        }
        _ => return Err(ErrorKind::UnknownMethod.into()),
    })
}

fn map_method(
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let keys =
        || -> std::result::Result<Vec<Value>, minijinja::Error> { Ok(value.try_iter()?.collect()) };
    Ok(match method {
        "keys" => {
            let () = from_args(args)?;
            Value::from(keys()?)
        }
        "values" => {
            let () = from_args(args)?;
            let mut out = Vec::new();
            for k in keys()? {
                out.push(value.get_item(&k)?);
            }
            Value::from(out)
        }
        "items" => {
            let () = from_args(args)?;
            let mut out = Vec::new();
            for k in keys()? {
                let v = value.get_item(&k)?;
                out.push(Value::from(vec![k, v]));
            }
            Value::from(out)
        }
        "get" => {
            let (key, default): (&Value, Option<Value>) = from_args(args)?;
            let v = value.get_item(key)?;
            if v.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                v
            }
        }
        _ => return Err(ErrorKind::UnknownMethod.into()),
    })
}

fn seq_method(
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    Ok(match method {
        "count" => {
            let (what,): (&Value,) = from_args(args)?;
            Value::from(value.try_iter()?.filter(|x| x == what).count())
        }
        "index" => {
            let (what,): (&Value,) = from_args(args)?;
            match value.try_iter()?.position(|x| &x == what) {
                Some(i) => Value::from(i),
                None => return Err(invalid(format!("{what} is not in list"))),
            }
        }
        _ => return Err(ErrorKind::UnknownMethod.into()),
    })
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, without Jinja's HTML escaping.
fn tojson_filter(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_str(), v.as_i64()) {
            (Some(s), _) => Some(s.to_string()),
            (None, Some(n)) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            _ => return Err(invalid("tojson indent must be an int or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => return Err(invalid("tojson separators must be two strings")),
                },
                _ => return Err(invalid("tojson separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_scalar(value: &Value) -> std::result::Result<Option<String>, minijinja::Error> {
    Ok(Some(match value.kind() {
        ValueKind::None => "null".into(),
        ValueKind::Bool => if value.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number if value.is_integer() => value.to_string(),
        ValueKind::Number => {
            let f = f64::try_from(value.clone())?;
            if f.is_nan() {
                "NaN".into()
            } else if f.is_infinite() {
                if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
            } else {
                python_float_repr(f)
            }
        }
        _ => return Ok(None),
    }))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if let Some(s) = value.as_str() {
        write_json_string(out, s, style.ensure_ascii);
        return Ok(());
    }
    if let Some(s) = json_scalar(value)? {
        out.push_str(&s);
        return Ok(());
    }
    let (open, close, entries): (char, char, Vec<(Option<String>, Value)>) = match value.kind() {
        ValueKind::Seq | ValueKind::Iterable => {
            ('[', ']', value.try_iter()?.map(|v| (None, v)).collect())
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for k in value.try_iter()? {
                let v = value.get_item(&k)?;
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => json_scalar(&k)?.ok_or_else(|| {
                        invalid(format!(
                            "keys must be str, int, float, bool or None, not {}",
                            k.kind()
                        ))
                    })?,
                };
                entries.push((Some(key), v));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            ('{', '}', entries)
        }
        ValueKind::Undefined => {
            return Err(invalid("Object of type Undefined is not JSON serializable"))
        }
        kind => {
            return Err(invalid(format!(
                "Object of type {kind} is not JSON serializable"
            )))
        }
    };
    out.push(open);
    if entries.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline_indent = |d: usize| {
        style
            .indent
            .as_ref()
            .map(|ind| format!("\n{}", ind.repeat(d)))
    };
    let inner = newline_indent(depth + 1);
    if let Some(nl) = &inner {
        out.push_str(nl);
    }
    for (i, (key, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
            if let Some(nl) = &inner {
                out.push_str(nl);
            }
        }
        if let Some(k) = key {
            write_json_string(out, k, style.ensure_ascii);
            out.push_str(&style.key_sep);
        }
        write_json(out, v, style, depth + 1)?;
    }
    if let Some(nl) = newline_indent(depth) {
        out.push_str(&nl);
    }
    out.push(close);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// strftime
// ---------------------------------------------------------------------------------------------

/// (year, month 1-12, day 1-31) from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// A subset of C `strftime` (UTC) for a Unix timestamp: `%Y %y %m %d %e %H %I %M %S %p %j %a %A
/// %b %h %B %F %T %D %R %Z %z %%`, and glibc's `%-X` (no padding). Other directives are kept as is.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const CUM_DAYS: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let yday = CUM_DAYS[(month - 1) as usize] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTH_NAMES[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let s = match d {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'm' => num(i64::from(month), 2),
            'd' => num(i64::from(day), 2),
            'e' => {
                if no_pad {
                    day.to_string()
                } else {
                    format!("{day:2}")
                }
            }
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'j' => num(i64::from(yday), 3),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_string(),
            'a' => day_name[..3].to_string(),
            'A' => day_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'F' => format!("{year:04}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'R' => format!("{hour:02}:{minute:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings from Python:
    // datetime.datetime(2024,2,29,13,5,9,tzinfo=datetime.timezone.utc).strftime(f)
    #[test]
    fn strftime_matches_python() {
        let t = 1_709_211_909; // 2024-02-29 13:05:09 UTC
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %j %y %I %p %e", t),
            "Thursday February 060 24 01 PM 29"
        );
        assert_eq!(strftime("%a %h %%", t), "Thu Feb %");
        assert_eq!(strftime("%-d %-m %-I", t), "29 2 1");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a", -1),
            "1969-12-31 23:59:59 Wed"
        );
        assert_eq!(strftime("%F %T", 0), "1970-01-01 00:00:00");
    }

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(python_float_repr(2.5), "2.5");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(-0.0), "-0.0");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(123456.789), "123456.789");
    }

    #[test]
    fn template_preprocessing() {
        let p = preprocess_template;
        assert_eq!(
            p("a{% generation %}b{%- endgeneration -%}c{% if x %}{% endif %}"),
            "a{% if true %}b{%- endif -%}c{% if x %}{% endif %}"
        );
        assert_eq!(p("{%generation%}"), "{%if true%}");
        assert_eq!(p("{% generations %}"), "{% generations %}");
        assert_eq!(p("x {% y"), "x {% y");
        assert_eq!(p("{ a } {"), "{ a } {");
        // Backslash-newline in a string literal is a line continuation; elsewhere it is kept.
        assert_eq!(
            p("{% set s = \"a\\\nb\\\"\" %}x\\\ny{{ 'c\\\nd' }}"),
            "{% set s = \"ab\\\"\" %}x\\\ny{{ 'cd' }}"
        );
        // Closing delimiters inside strings do not end the tag.
        assert_eq!(
            p("{{- \"}}\" }}{% generation %}"),
            "{{- \"}}\" }}{% if true %}"
        );
        // Comments and raw blocks are copied verbatim.
        assert_eq!(
            p("{# '\\\n {% generation %} #}{% raw %}{% generation %}'\\\n'{% endraw %}{% generation %}"),
            "{# '\\\n {% generation %} #}{% raw %}{% generation %}'\\\n'{% endraw %}{% if true %}"
        );
    }

    #[test]
    fn python_split_matches_python() -> std::result::Result<(), minijinja::Error> {
        let s = |v: Vec<Value>| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(s(python_split("  a  b c ", None, -1)?), ["a", "b", "c"]);
        assert_eq!(s(python_split("  a  b c ", None, 1)?), ["a", "b c "]);
        assert_eq!(
            s(python_split("a,b,,c", Some(","), -1)?),
            ["a", "b", "", "c"]
        );
        assert_eq!(s(python_split("a,b,,c", Some(","), 1)?), ["a", "b,,c"]);
        assert!(python_split("", None, -1)?.is_empty());
        assert_eq!(
            s(python_splitlines("a\r\nb\n\nc", false)),
            ["a", "b", "", "c"]
        );
        assert_eq!(s(python_splitlines("a\nb\n", true)), ["a\n", "b\n"]);
        assert_eq!(python_title("they're bill's"), "They'Re Bill'S");
        Ok(())
    }
}
