//! dsv3-kernels: the CUDA backend. PTX compiled from `kernels/cuda/*.cu` (committed under
//! `kernels/ptx/`, embedded here) is loaded through cudarc at run time: a user needs an NVIDIA
//! driver, not a toolkit, and the crate builds on machines with no CUDA at all.
//!
//! - [`device`]: open a GPU (a clear error, never a panic, without a driver or GPU).
//! - [`ptx`]: the embedded PTX per architecture (sm_90a, sm_80).
//! - [`tensor`]: device buffers — activations ([`tensor::Act`], f32 or bf16) and GEMM weights.
//! - [`ops`]: host-side launchers, one file per kernel family.
//! - [`model`]: [`model::CudaModel`], the model on device (prefill and batched decode over a
//!   device latent cache).
//! - [`train`]: training on the device ([`train::CudaTrainModel`]'s pass, [`train::CudaTrainer`]'s
//!   optimizer step; `dsv3 train --device cuda`).
//! - [`nccl`] (feature `nccl`, default): the pipeline `Transport` over NCCL point-to-point.
//! - [`profile`]: GPU time by kernel (`Device::profile_begin` / `profile_end`).
//! - [`bench`]: kernel benchmarks against cuBLAS and the device-copy ceiling (`examples/kernel_bench.rs`).
pub mod bench;
pub mod device;
pub mod model;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ops;
pub mod profile;
pub mod ptx;
pub mod tensor;
pub mod train;

pub use device::{device_count, driver_present, Device};
pub use tensor::{Act, DType, DWeight};
