//! The library's error type. Every variant that concerns a file names it, so a user can act on
//! the message without a backtrace.
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error(
        "{path}: unknown model_type '{model_type}'; supported: {}",
        crate::model::config::SUPPORTED_MODEL_TYPES.join(", ")
    )]
    UnknownArchitecture { path: PathBuf, model_type: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("weight '{name}' is missing from the checkpoint {path}")]
    MissingWeight { name: String, path: PathBuf },

    #[error("weight '{name}' in {path} has shape {got:?}, expected {expected:?}")]
    WeightShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error(
        "weight '{name}' in {path} holds a NaN or infinite value (element {index}): the \
         checkpoint is damaged, or was saved from a run that diverged"
    )]
    NonFiniteWeight {
        name: String,
        path: PathBuf,
        index: usize,
    },

    #[error("{path}: invalid adapter: {msg}")]
    Adapter { path: PathBuf, msg: String },

    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("{path}: chat template: {msg}")]
    Template { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },

    /// Hugging Face hub access (download, cache, offline mode, authentication)
    #[error("{0}")]
    Hub(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn adapter(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Adapter {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Read a JSON file into a value, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
