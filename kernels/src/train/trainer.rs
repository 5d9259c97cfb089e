//! [`CudaTrainer`]: core `Trainer`'s optimizer step on the GPU (see `train/mod.rs`).
//!
//! One step, as `dsv3_core::train::Trainer::train_step`: the gradients are zeroed, each
//! micro-batch runs one [`CudaTrainModel::pass`] with `scale = counted / total` (its share of the
//! step's counted positions; one pass per micro-batch: the batch-wise auxiliary loss sees the
//! whole micro-batch, as one device), then [`CudaTrainer::apply_gradients`]: the global gradient
//! norm (f64 sums of squares over the gradient arena on the device, one `f64` downloaded), an
//! error without touching the weights when it is not finite, clipping (`g ← g·clip/norm` over the
//! arena when the norm exceeds `clip`), AdamW at `cfg.schedule.at(step)` through
//! `ops::train::adamw` (bias corrections computed as core's `AdamW::step` does, so f32 runs agree)
//! in one launch per run of consecutive tensors with the same weight decay (`DParam::decays`), the
//! auxiliary-loss-free bias update from the step's loads (`ops::moe_train::bias_update`, core's
//! `update_biases` rule), [`CudaTrainModel::refresh`], `step += 1`.
//!
//! The optimizer state lives on the device (f32 or bf16 moments as `AdamW::bf16_moments`);
//! [`CudaTrainer::to_core`] copies weights, router biases, moments and step counts into a core
//! `Trainer` (for `dsv3_core::train::checkpoint::save`), and [`CudaTrainer::new`] uploads a
//! resumed core trainer's moments.
use super::{CudaTrainModel, TrainOptions};
use crate::device::{cuda_err, Device};
use crate::ops::moe_train::bias_update;
use crate::ops::optim::{sum_f64, sumsq_blocks, sumsq_partials};
use crate::ops::train::{adamw, AdamStep, Moments, DECAY_CHUNK};
use crate::tensor::DType;
use crate::train::mm::View;
use cudarc::driver::CudaSlice;
use dsv3_core::model::block::Ffn;
use dsv3_core::model::train::PassOptions;
use dsv3_core::model::Model;
use dsv3_core::train::{AdamW, MicroBatch, StepMetrics, TrainConfig, Trainer};
use dsv3_core::{Error, Result};
use half::bf16;
use std::sync::Arc;

/// Core `Trainer` on the device.
pub struct CudaTrainer {
    pub model: CudaTrainModel,
    /// Hyper-parameters and the step count `t` (the moments live on the device: `m`, `v` stay
    /// empty here; [`CudaTrainer::to_core`] downloads them).
    pub opt: AdamW,
    pub cfg: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// AdamW over the arenas: every tensor in one launch (a per-64-element mask says which are
    /// decayed; padding between tensors is zero in masters, gradients and moments and stays
    /// zero), with the moments (none for a model without parameters). Until 2026-11-24 one
    /// launch per maximal run of tensors with the same decay: 67 a step on bench-88m's structure.
    adam: Option<OptRun>,
    /// For each `model.biases[j]`: the index of its MoE layer among the main MoE layers (the
    /// order of a pass's `loads`).
    bias_layer: Vec<usize>,
    /// The gradient norm's partial sums (one per chunk of the gradient arena) and their total.
    partial: CudaSlice<f64>,
    sumsq: CudaSlice<f64>,
}

/// Consecutive tensors `slots` (indices into `model.params`) at arena range `[off, off + len)`:
/// one AdamW launch over views of the masters and gradients, with moments laid out as that range.
struct OptRun {
    slots: std::ops::Range<usize>,
    off: usize,
    len: usize,
    /// One byte per 64 elements of the range: 1 where the tensor is decayed.
    decay_mask: CudaSlice<u8>,
    w: View<f32>,
    g: View<f32>,
    moments: Moments,
    /// The bf16 working copy of the range (bf16 mode): AdamW writes it, no cast pass after.
    wcopy: Option<View<bf16>>,
}

/// The AdamW decay mask of consecutive arena tensors `slots` (from `slots[0].off` to the end of
/// the last): one byte per [`DECAY_CHUNK`] elements, 1 where the tensor there (its padding
/// included) is decayed (`AdamW::decays`), else 0. Tensors start at multiples of `ALIGN` (a
/// multiple of the chunk), so no chunk holds two.
pub fn decay_mask(slots: &[super::layout::Slot]) -> Vec<u8> {
    const _: () = assert!(super::layout::ALIGN.is_multiple_of(DECAY_CHUNK));
    let Some(first) = slots.first() else { return Vec::new() };
    let last = &slots[slots.len() - 1];
    let mut mask = vec![0u8; (last.off + last.len - first.off).div_ceil(DECAY_CHUNK)];
    for sl in slots {
        let c0 = (sl.off - first.off) / DECAY_CHUNK;
        mask[c0..c0 + sl.len.div_ceil(DECAY_CHUNK)].fill(sl.decays as u8);
    }
    mask
}

/// The scalars of one AdamW update of a tensor, computed exactly as
/// `dsv3_core::train::AdamW::step` does at its step `t` (already incremented) and learning rate
/// `lr`: `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t` with `libm::powf`, `decay = 1 − lr·wd` for decayed
/// tensors, else 1.
pub fn adam_scalars(opt: &AdamW, t: u64, lr: f32, decays: bool) -> AdamStep {
    let (b1, b2) = (opt.beta1, opt.beta2);
    AdamStep {
        lr,
        beta1: b1,
        beta2: b2,
        eps: opt.eps,
        decay: if decays { 1.0 - lr * opt.weight_decay } else { 1.0 },
        bc1: 1.0 - libm::powf(b1, t as f32),
        bc2: 1.0 - libm::powf(b2, t as f32),
        grad_scale: 1.0,
    }
}

/// The clip factor core applies to every gradient (`clip / norm` when the norm exceeds `clip`).
pub fn clip_factor(clip: Option<f32>, grad_norm: f32) -> Option<f32> {
    match clip {
        Some(c) if grad_norm > c => Some(c / grad_norm),
        _ => None,
    }
}

/// Per MoE layer: max load / mean load (`Trainer::finish_step`).
pub fn max_over_mean(loads: &[Vec<u32>]) -> Vec<f32> {
    loads
        .iter()
        .map(|l| {
            let mean = l.iter().sum::<u32>() as f32 / l.len().max(1) as f32;
            l.iter().copied().max().unwrap_or(0) as f32 / mean.max(1e-9)
        })
        .collect()
}

/// For each main MoE layer with a router correction bias, in layer order: its index among the
/// main MoE layers.
pub fn bias_layers(model: &Model) -> Vec<usize> {
    model
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(m.router.bias.is_some()),
            _ => None,
        })
        .enumerate()
        .filter_map(|(i, has)| has.then_some(i))
        .collect()
}

impl CudaTrainer {
    /// Uploads core trainer `tr` (its model, made trainable by `Trainer::new`, the AdamW
    /// hyper-parameters and moments of a resumed run, the step count) to `dev`; `dtype` as
    /// [`TrainOptions`]. `tr.cfg.precision`: `F32` (the dtype's GEMMs) or `Fp8` (the decoder's
    /// linears in DeepSeek-V3's FP8 recipe, as core's; `TrainOptions::precision`); `Bf16` is the
    /// CPU's bf16 emulation and is refused (use `dtype` bf16).
    pub fn new(dev: Arc<Device>, tr: &Trainer, dtype: DType) -> Result<CudaTrainer> {
        use dsv3_core::model::linear::Precision;
        if tr.cfg.precision == Precision::Bf16 {
            return Err(Error::Input(
                "GPU training computes in its --dtype; the CPU's bf16 GEMM precision does not apply (use f32 or fp8)"
                    .into(),
            ));
        }
        let opts = TrainOptions { dtype, precision: tr.cfg.precision };
        let model = CudaTrainModel::new(dev.clone(), &tr.model, opts)?;
        let bias_layer = bias_layers(&tr.model);
        if bias_layer.len() != model.biases.len() {
            return Err(Error::Input(format!(
                "GPU training: {} router biases on the device, {} MoE layers with one in the model",
                model.biases.len(),
                bias_layer.len()
            )));
        }
        let mut opt = tr.opt.clone();
        let resumed = !opt.m.is_empty();
        if resumed {
            let ok =
                opt.names.len() == model.params.len()
                    && opt.m.len() == model.params.len()
                    && opt.v.len() == model.params.len()
                    && model.params.iter().enumerate().all(|(i, p)| {
                        opt.names[i] == p.name && opt.m[i].len() == p.w.len() && opt.v[i].len() == p.w.len()
                    });
            if !ok {
                return Err(Error::Input("optimizer state belongs to another model".into()));
            }
        }
        let s = &dev.stream;
        let slots = &model.layout().slots;
        if slots.len() != model.params.len() || slots.iter().zip(&model.params).any(|(a, p)| a.name != p.name) {
            return Err(Error::Input("GPU training: the arena layout does not list the parameters".into()));
        }
        let mut adam = None;
        // every tensor in one run (one AdamW launch), the decayed ones marked per 64 elements
        if !slots.is_empty() {
            let (first, end) = (0, slots.len());
            let off = slots[first].off;
            let len = slots[end - 1].off + slots[end - 1].len - off;
            // a resumed run's moments laid out as the arena range (padding zero)
            let host = |all: &[Vec<f32>]| {
                let mut h = vec![0f32; len];
                for k in first..end {
                    let o = slots[k].off - off;
                    h[o..o + slots[k].len].copy_from_slice(&all[k]);
                }
                h
            };
            let up = |v: Vec<f32>| s.clone_htod(&v).map_err(|e| cuda_err("upload", e));
            let up16 = |v: Vec<f32>| {
                // core keeps bf16 moments rounded in f32 vectors: the conversion is exact
                let b: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
                s.clone_htod(&b).map_err(|e| cuda_err("upload", e))
            };
            let zeros = || s.alloc_zeros::<f32>(len).map_err(|e| cuda_err("alloc", e));
            let zeros16 = || s.alloc_zeros::<bf16>(len).map_err(|e| cuda_err("alloc", e));
            let moments = match (opt.bf16_moments, resumed) {
                (false, false) => Moments::F32 { m: zeros()?, v: zeros()? },
                (false, true) => Moments::F32 { m: up(host(&opt.m))?, v: up(host(&opt.v))? },
                (true, false) => Moments::Bf16 { m: zeros16()?, v: zeros16()? },
                (true, true) => Moments::Bf16 { m: up16(host(&opt.m))?, v: up16(host(&opt.v))? },
            };
            let mask = decay_mask(&slots[first..end]);
            adam = Some(OptRun {
                slots: first..end,
                off,
                len,
                decay_mask: s.clone_htod(&mask).map_err(|e| cuda_err("upload", e))?,
                w: View::of(&dev, model.masters(), off, len)?,
                g: View::of(&dev, model.grads(), off, len)?,
                moments,
                wcopy: model.working_bf16().map(|w| View::of(&dev, w, off, len)).transpose()?,
            });
        }
        opt.names = model.params.iter().map(|p| p.name.clone()).collect();
        opt.m = Vec::new();
        opt.v = Vec::new();
        let partial =
            s.alloc_zeros::<f64>(sumsq_blocks(model.grads().len()).max(1)).map_err(|e| cuda_err("alloc", e))?;
        let sumsq = s.alloc_zeros::<f64>(1).map_err(|e| cuda_err("alloc", e))?;
        Ok(CudaTrainer { model, opt, cfg: tr.cfg.clone(), step: tr.step, adam, bias_layer, partial, sumsq })
    }

    /// A fresh trainer: `Trainer::new(model, opt, cfg)` uploaded with [`CudaTrainer::new`].
    pub fn from_model(dev: Arc<Device>, model: Model, opt: AdamW, cfg: TrainConfig, dtype: DType) -> Result<Self> {
        CudaTrainer::new(dev, &Trainer::new(model, opt, cfg), dtype)
    }

    pub fn dev(&self) -> &Arc<Device> {
        &self.model.dev
    }

    /// Zeroes every gradient (one memset over the gradient arena).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.model.zero_grads()
    }

    /// One optimizer step over `micro` (`Trainer::train_step` on the device).
    pub fn train_step(&mut self, micro: &[MicroBatch]) -> Result<StepMetrics> {
        let total: f32 = micro.iter().map(MicroBatch::counted).sum();
        if micro.is_empty() || total == 0.0 {
            return Err(Error::Input("a training step needs at least one position to predict".into()));
        }
        self.zero_grads()?;
        let mut m = StepMetrics { step: self.step, ..Default::default() };
        let (mut loss, mut bal, mut mtp) = (0f64, 0f64, 0f64);
        for mb in micro {
            let w = mb.counted() / total;
            if w == 0.0 {
                continue;
            }
            let predicted: usize = mb.seqs.iter().map(|s| s.len().saturating_sub(1)).sum();
            if let Some(mask) = &mb.mask {
                if mask.len() != predicted {
                    return Err(Error::Input(format!(
                        "mask has {} entries, the batch predicts {predicted} positions",
                        mask.len()
                    )));
                }
            }
            let opts = PassOptions {
                scale: w,
                seq_alpha: self.cfg.seq_aux_alpha,
                aux_alpha: self.cfg.aux_loss_alpha,
                mask: mb.mask.clone(),
                mtp_lambda: self.cfg.mtp_lambda,
            };
            let seqs: Vec<&[u32]> = mb.seqs.iter().map(|s| &s[..]).collect();
            let out = self.model.pass(&seqs, &opts)?;
            loss += (out.ce_loss * w) as f64;
            bal += (out.balance_loss * w) as f64;
            mtp += (out.mtp_loss * w) as f64;
            m.tokens += mb.seqs.iter().map(|s| s.len()).sum::<usize>();
            m.predicted += out.predicted;
            if m.expert_load.is_empty() {
                m.expert_load = out.loads;
            } else {
                for (a, b) in m.expert_load.iter_mut().zip(&out.loads) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        m.loss = loss as f32;
        m.balance_loss = bal as f32;
        m.mtp_loss = mtp as f32;
        let (grad_norm, lr) = self.apply_gradients(&m.expert_load)?;
        m.grad_norm = grad_norm;
        m.lr = lr;
        m.max_over_mean = max_over_mean(&m.expert_load);
        Ok(m)
    }

    /// The global norm of the accumulated gradients: f64 sums of squares over the gradient
    /// arena (every tensor; the padding between them is zero), one fixed-order reduction, one
    /// `f64` downloaded (waits for the stream).
    pub fn grad_norm(&mut self) -> Result<f32> {
        let dev = self.model.dev.clone();
        let g = self.model.grads();
        let n = g.len();
        sumsq_partials(&dev, g, n, &mut self.partial, 0)?;
        sum_f64(&dev, &self.partial, sumsq_blocks(n), &mut self.sumsq)?;
        let mut sq = [0f64];
        dev.stream.memcpy_dtoh(&self.sumsq, &mut sq).map_err(|e| cuda_err("download", e))?;
        dev.sync()?;
        Ok(sq[0].sqrt() as f32)
    }

    /// `Trainer::apply_gradients` on the device: clipping, AdamW, the bias update from `loads`
    /// (tokens per expert per main MoE layer; empty = no update), refresh, `step += 1`. Returns
    /// (gradient norm before clipping, learning rate). A non-finite norm is an error and leaves
    /// the weights, moments and step untouched.
    pub fn apply_gradients(&mut self, loads: &[Vec<u32>]) -> Result<(f32, f32)> {
        let grad_norm = self.grad_norm()?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!("gradient norm is {grad_norm} at step {}", self.step)));
        }
        // checked and uploaded before anything changes, while the stream is idle (after the
        // norm's download): a bad `loads` leaves the trainer as it was, and the upload does
        // not wait for the AdamW launches
        let bias_loads = self.bias_loads(loads)?;
        let dev = self.model.dev.clone();
        let lr = self.cfg.schedule.at(self.step);
        self.opt.t += 1;
        let mut copied = false;
        if let Some(r) = self.adam.as_mut() {
            // the clip factor applied as AdamW reads the gradients, the bf16 working copy written
            // in the same pass (the arena's padding, outside the range or zero, never changes)
            let grad_scale = clip_factor(self.cfg.clip_norm, grad_norm).unwrap_or(1.0);
            let s = AdamStep { grad_scale, ..adam_scalars(&self.opt, self.opt.t, lr, true) };
            let copy = r.wcopy.as_deref_mut();
            copied = copy.is_some();
            adamw(&dev, &mut r.w, &r.g, &mut r.moments, r.len, &s, Some(&r.decay_mask), copy)?;
        }
        // auxiliary-loss-free balancing (`Trainer::update_biases`): b_i += γ·sign(mean − load_i)
        for (j, load) in bias_loads {
            let bias = &mut self.model.biases[j];
            let e = bias.len();
            bias_update(&dev, &load, e, self.cfg.bias_update_speed, bias)?;
        }
        if copied {
            self.model.refresh_fp8()?;
        } else {
            self.model.refresh()?;
        }
        self.step += 1;
        Ok((grad_norm, lr))
    }

    /// The loads of each MoE layer with a bias (index into `model.biases`, loads `[E]` on the
    /// device); none when the bias update is off (γ = 0) or `loads` is empty, as core's
    /// `update_biases` (which zips the MoE layers with `loads`).
    fn bias_loads(&self, loads: &[Vec<u32>]) -> Result<Vec<(usize, CudaSlice<i32>)>> {
        let mut out = Vec::new();
        if self.cfg.bias_update_speed == 0.0 {
            return Ok(out);
        }
        let dev = &self.model.dev;
        for (j, (bias, &li)) in self.model.biases.iter().zip(&self.bias_layer).enumerate() {
            let Some(load) = loads.get(li) else { continue };
            if load.is_empty() || bias.len() != load.len() {
                return Err(Error::Input(format!(
                    "bias update: {} loads for a bias of {} experts",
                    load.len(),
                    bias.len()
                )));
            }
            let l: Vec<i32> = load.iter().map(|&x| i32::try_from(x).unwrap_or(i32::MAX)).collect();
            out.push((j, dev.stream.clone_htod(&l).map_err(|e| cuda_err("upload", e))?));
        }
        Ok(out)
    }

    /// Copies the weights, router biases, AdamW state (names, moments, `t`) and step into core
    /// trainer `tr` (same model structure), ready for `dsv3_core::train::checkpoint::save`.
    pub fn to_core(&self, tr: &mut Trainer) -> Result<()> {
        self.model.download(&mut tr.model)?;
        tr.model.layers.iter_mut().for_each(|b| b.attn.refresh_absorbed());
        tr.model.requantize();
        let s = &self.model.dev.stream;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        let slots = &self.model.layout().slots;
        if let Some(r) = &self.adam {
            let (a, b) = match &r.moments {
                Moments::F32 { m: a, v: b } => (
                    s.clone_dtoh(a).map_err(|e| cuda_err("download", e))?,
                    s.clone_dtoh(b).map_err(|e| cuda_err("download", e))?,
                ),
                Moments::Bf16 { m: a, v: b } => {
                    let f = |x: Vec<bf16>| x.into_iter().map(bf16::to_f32).collect::<Vec<f32>>();
                    (
                        f(s.clone_dtoh(a).map_err(|e| cuda_err("download", e))?),
                        f(s.clone_dtoh(b).map_err(|e| cuda_err("download", e))?),
                    )
                }
            };
            for k in r.slots.clone() {
                let o = slots[k].off - r.off;
                m.push(a[o..o + slots[k].len].to_vec());
                v.push(b[o..o + slots[k].len].to_vec());
            }
        }
        self.model.dev.sync()?;
        let mut opt = self.opt.clone();
        opt.m = m;
        opt.v = v;
        tr.opt = opt;
        tr.cfg = self.cfg.clone();
        tr.step = self.step;
        Ok(())
    }
}
