//! FP8 as DeepSeek-V3 trains with it, emulated exactly on CPU.
//!
//! - [`format`]: E4M3 / E5M2 encode (round-to-nearest-even, saturating) and decode, UE8M0 scales.
//! - [`quant`]: fine-grained quantization — 1x128 tiles per token for activations and activation
//!   gradients, 128x128 blocks for weights, 128x1 (along tokens) for the Wgrad operands;
//!   `scale = max(amax, 1e-4) / 448` over zero-padded tiles; block dequantization of checkpoints.
//! - [`gemm`]: the FP8 GEMM: products of FP8 values summed in f32 per 128-wide K group, then
//!   scaled and promoted into an f32 accumulator (DeepGEMM); and an emulation of Hopper's ~14-bit
//!   accumulator without promotion, to show why promotion matters.
pub mod format;
pub mod gemm;
pub mod quant;

pub use format::{Fp8Format, E4M3_LUT};
pub use quant::{QTensor, Role, ScaleLayout};
