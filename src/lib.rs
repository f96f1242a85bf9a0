//! `unlearn`: remove knowledge from transformer language models with LoRA unlearning.
//!
//! The crate is layered: `model` (a differentiable decoder that reads Hugging Face checkpoints,
//! knows nothing of training), `lora` (PEFT-format adapters), `merge`, `tokenizer` (tokenizer and
//! chat template), `score` (per-record NLL).
pub mod attribute;
pub mod bench;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod lora;
pub mod merge;
pub mod methods;
pub mod metrics;
pub mod model;
pub mod parity;
pub mod recipe;
pub mod rng;
pub mod score;
pub mod synth;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
