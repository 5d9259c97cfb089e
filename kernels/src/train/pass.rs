//! [`CudaTrainModel`]: the model's training pass on the GPU (see the module map in `train/mod.rs`).
//!
//! INTERFACE SKELETON: the bodies below are placeholders that return an error until the pass
//! is implemented; the public API is the contract `trainer.rs` builds on.
use crate::device::Device;
use crate::tensor::DType;
use cudarc::driver::CudaSlice;
use dsv3_core::model::train::{PassOptions, PassOutput};
use dsv3_core::model::Model;
use dsv3_core::{Error, Result};
use std::sync::Arc;

/// How the pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainOptions {
    /// `F32`: f32 activations and GEMMs (the CPU oracle's math, to ~1e-4); `Bf16`: bf16
    /// activations and tensor-core GEMMs over bf16 copies of the f32 masters.
    pub dtype: DType,
}

/// One trainable tensor on the device, in `Model::visit` order with its checkpoint name.
pub struct DParam {
    pub name: String,
    /// f32 master weights.
    pub w: CudaSlice<f32>,
    /// f32 gradient (accumulated by [`CudaTrainModel::pass`], zeroed by the caller).
    pub g: CudaSlice<f32>,
    /// Whether AdamW decays it (`dsv3_core::train::AdamW::decays`).
    pub decays: bool,
}

/// The model on the device for training.
pub struct CudaTrainModel {
    pub dev: Arc<Device>,
    pub cfg: dsv3_core::Config,
    /// Every trainable tensor, in `Model::visit` order.
    pub params: Vec<DParam>,
    /// The router correction bias `[E]` of each MoE layer that has one, in layer order (main
    /// layers only), updated by the auxiliary-loss-free rule.
    pub biases: Vec<CudaSlice<f32>>,
    pub opts: TrainOptions,
}

impl CudaTrainModel {
    /// Uploads `model` (made trainable: f32 weights, see `Model::make_trainable`).
    pub fn new(dev: Arc<Device>, model: &Model, opts: TrainOptions) -> Result<CudaTrainModel> {
        let _ = (dev, model, opts);
        Err(Error::Unsupported("GPU training pass: not implemented yet".into()))
    }

    /// One forward + backward over `seqs` with `opts`' loss terms: gradients (times
    /// `opts.scale`) accumulate into `params[i].g`. Same semantics and outputs as
    /// `Model::train_pass` (loss, balance loss, MTP loss, per-layer expert loads, positions).
    pub fn pass(&mut self, seqs: &[&[u32]], opts: &PassOptions) -> Result<PassOutput> {
        let _ = (seqs, opts);
        Err(Error::Unsupported("GPU training pass: not implemented yet".into()))
    }

    /// After the masters changed (optimizer step, bias update): refreshes whatever is derived
    /// from them (bf16 working copies).
    pub fn refresh(&mut self) -> Result<()> {
        Err(Error::Unsupported("GPU training pass: not implemented yet".into()))
    }

    /// Copies the masters and router biases into `model` (same structure, trainable).
    pub fn download(&self, model: &mut Model) -> Result<()> {
        let _ = model;
        Err(Error::Unsupported("GPU training pass: not implemented yet".into()))
    }

    /// Copies the gradients into `grad` (a `Model::zeros_like` of the same structure).
    pub fn download_grads(&self, grad: &mut Model) -> Result<()> {
        let _ = grad;
        Err(Error::Unsupported("GPU training pass: not implemented yet".into()))
    }
}
