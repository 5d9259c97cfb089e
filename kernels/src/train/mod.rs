//! Training on the GPU: the model's training pass (forward keeping activations, next-token
//! cross-entropy, the balance losses, backward of every layer) on device buffers with f32 master
//! weights and gradients, and the optimizer step around it.
//!
//! - [`pass`]: [`CudaTrainModel`]: the parameters on the device (f32 masters, bf16 working copies
//!   in bf16 mode), one forward + backward over a micro-batch (gradients accumulate on the
//!   device), downloads into a core `Model` for checkpoints and for tests against the CPU oracle
//!   (`dsv3_core::model::Model::train_pass`).
//! - [`fp8`]: `TrainOptions::precision == Fp8`: the decoder's linear layers in DeepSeek-V3's
//!   FP8 recipe (1x128 activation tiles, 128x128 weight blocks, 128x1-along-tokens Wgrad
//!   operands, f32 promotion every 128 K), as core's `Precision::Fp8`.
//! - [`trainer`]: [`CudaTrainer`]: core `Trainer`'s step on the device (gradient accumulation
//!   over micro-batches, global-norm clipping, AdamW, the auxiliary-loss-free bias update,
//!   router statistics), used by `dsv3 train --device cuda`.
mod block;
mod flash;
pub mod fp8;
pub mod layout;
pub mod mm;
mod mtp;
pub mod pass;
pub mod trainer;

pub use pass::{CudaTrainModel, DParam, TrainOptions};
pub use trainer::CudaTrainer;
