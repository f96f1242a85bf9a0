//! The decoder stack: configuration, weights, differentiable ops and the generic decoder.
pub mod attention;
pub mod config;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_kernels;
pub mod decoder;
pub mod launch;
pub mod linear;
pub mod ops;
pub mod recompute;
pub mod weights;

pub use config::{ArchConfig, Family};
pub use decoder::{Decoder, ForwardOptions, ModelInput};
