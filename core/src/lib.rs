//! dsv3-core: the DeepSeek-V3 / V2 model on CPU, `#![no_std]` + alloc.
//!
//! Module map:
//! - [`config`]: HF `config.json` parsing and validation.
//! - [`weights`]: safetensors parsing (single file and sharded), dtypes, the tensor store that
//!   loading draws from, random init, writing.
//! - [`fp8`]: FP8 formats, fine-grained quantization, and the FP8 GEMM emulated exactly.
//! - [`grpo`]: GRPO advantages and TRL's exact loss, through the model.
//! - [`pipeline`]: pipeline schedules (1F1B, ZB-H1, DualPipe, DualPipeV), their simulator and
//!   the executor that trains a model split into stages.
//! - [`ops`]: the CPU f32 kernels (GEMM, RMSNorm, RoPE/YaRN, softmax, SwiGLU) — the oracle.
//! - [`model`]: the model: [`model::Linear`], MLA ([`model::mla`]), dense MLP and MoE
//!   ([`model::moe`]), decoder block, MTP module, and [`model::Model`] with its forward pass.
//! - [`infer`]: the latent KV cache, sessions (batched prefill + decode), sampling, generation.
//! - [`train`]: AdamW, schedules, the trainer (accumulation, clipping, bias updates).
//! - [`tokenizer`]: the built-in byte-level tokenizer (HF `tokenizer.json` lives in the cli/ffi).
//! - [`presets`]: named configurations (`tiny`, `bench-4m`, `bench-88m`).
//! - [`rng`]: a seeded, platform-independent RNG.
//!
//! Feature `std` (default) adds files, memory-mapping and threads (rayon).
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod config;
pub mod error;
pub mod fp8;
pub mod grpo;
pub mod infer;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod presets;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use model::Model;
