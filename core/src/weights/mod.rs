//! Checkpoint weights: safetensors files (single or sharded), dtypes, FP8 block scales.
//!
//! - [`store`]: [`TensorStore`], the named tensors of a checkpoint, zero-copy over the file bytes;
//!   loading takes tensors out of it by name and checks dtype and shape.
//! - [`file`] (std): opening a model directory (config.json + safetensors, memory-mapped).
//! - [`write`]: writing safetensors files (atomic under std).
#[cfg(feature = "std")]
pub mod file;
pub mod init;
pub mod store;
pub mod write;

pub use store::{Blob, DType, RawTensor, TensorStore};
