//! [`Trainer`]: one optimizer step = gradient accumulation over micro-batches, global-norm
//! clipping, AdamW, and DeepSeek-V3's auxiliary-loss-free bias update
//! (`b_i += γ·sign(mean load − load_i)` per MoE layer after every step).
use crate::error::{ierr, Result};
use crate::model::block::Ffn;
use crate::model::train::{PassOptions, PassOutput};
use crate::model::Model;
use crate::train::optim::AdamW;
use crate::train::schedule::LrSchedule;
use alloc::vec::Vec;

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this (None = off). V3: 1.0.
    pub clip_norm: Option<f32>,
    /// Bias update speed γ of auxiliary-loss-free balancing (0 = off). V3: 0.001.
    pub bias_update_speed: f32,
    /// Complementary sequence-wise balance loss α. V3: 0.0001.
    pub seq_aux_alpha: f32,
    /// Conventional batch-wise auxiliary balance loss weight (0 = off), to compare against.
    pub aux_loss_alpha: f32,
    /// MTP loss weight λ (V3: 0.3 for most of training, then 0.1); used when the model has MTP
    /// modules.
    pub mtp_lambda: f32,
    /// GEMM precision of the decoder's linear layers (f32 master weights in every case).
    pub precision: crate::model::linear::Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            schedule: LrSchedule::Constant { lr: 1e-3 },
            clip_norm: Some(1.0),
            bias_update_speed: 0.001,
            seq_aux_alpha: 0.0001,
            aux_loss_alpha: 0.0,
            mtp_lambda: 0.3,
            precision: crate::model::linear::Precision::F32,
        }
    }
}

/// What one step reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean next-token cross-entropy over the step's counted positions.
    pub loss: f32,
    /// Balance losses (weighted) summed over MoE layers, averaged over micro-batches.
    pub balance_loss: f32,
    /// The MTP loss `λ/D·Σ_k CE_k` (0 without MTP modules).
    pub mtp_loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Tokens in the step's sequences and positions that were predicted.
    pub tokens: usize,
    pub predicted: usize,
    /// Tokens routed to each expert, per MoE layer.
    pub expert_load: Vec<Vec<u32>>,
    /// Per MoE layer: max load / mean load (1 = perfectly balanced).
    pub max_over_mean: Vec<f32>,
}

/// A micro-batch: token sequences and, for SFT, a per-position loss mask.
#[derive(Debug, Clone, Default)]
pub struct MicroBatch {
    pub seqs: Vec<Vec<u32>>,
    /// One weight per predicted position (`Σ (T_i − 1)`), 1 = counts; None = all count.
    pub mask: Option<Vec<f32>>,
}

impl MicroBatch {
    /// Positions that count in the loss.
    pub fn counted(&self) -> f32 {
        match &self.mask {
            Some(m) => m.iter().sum(),
            None => self.seqs.iter().map(|s| s.len().saturating_sub(1)).sum::<usize>() as f32,
        }
    }
}

/// Owns the model, its gradient buffer and the optimizer.
pub struct Trainer {
    pub model: Model,
    pub grad: Model,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    pub step: u64,
    /// Gradient buffers of the data-parallel shards (one per worker thread beyond the first).
    shard_grads: Vec<Model>,
}

impl Trainer {
    /// Makes `model` trainable (FP8 weights become f32 master weights).
    pub fn new(mut model: Model, opt: AdamW, cfg: TrainConfig) -> Trainer {
        model.make_trainable();
        model.set_precision(cfg.precision);
        let grad = model.zeros_like();
        Trainer { model, grad, opt, cfg, step: 0, shard_grads: Vec::new() }
    }

    /// One optimizer step over `micro` (gradients accumulated, each micro-batch weighted by its
    /// share of counted positions, so the step equals one pass over their union).
    pub fn train_step(&mut self, micro: &[MicroBatch]) -> Result<StepMetrics> {
        let total: f32 = micro.iter().map(MicroBatch::counted).sum();
        if micro.is_empty() || total == 0.0 {
            return Err(ierr("a training step needs at least one position to predict"));
        }
        self.grad.visit(&mut |_, g| g.fill(0.0));
        let mut m = StepMetrics { step: self.step, ..Default::default() };
        let (mut loss, mut bal, mut mtp) = (0f64, 0f64, 0f64);
        for mb in micro {
            let w = mb.counted() / total;
            if w == 0.0 {
                continue;
            }
            let out = self.pass(mb, w)?;
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
        self.finish_step(&mut m)?;
        Ok(m)
    }

    /// Applies the accumulated gradients ([`Trainer::apply_gradients`] with `m.expert_load`) and
    /// fills `m`'s gradient norm, learning rate and max/mean expert loads.
    pub fn finish_step(&mut self, m: &mut StepMetrics) -> Result<()> {
        let (grad_norm, lr) = self.apply_gradients(&m.expert_load)?;
        m.grad_norm = grad_norm;
        m.lr = lr;
        m.max_over_mean = m
            .expert_load
            .iter()
            .map(|l| {
                let mean = l.iter().sum::<u32>() as f32 / l.len().max(1) as f32;
                l.iter().copied().max().unwrap_or(0) as f32 / mean.max(1e-9)
            })
            .collect();
        Ok(())
    }

    /// Finishes an optimizer step over the gradients accumulated in `self.grad`: global-norm
    /// clipping, AdamW at the scheduled learning rate, the auxiliary-loss-free bias update from
    /// `loads` (tokens per expert per MoE layer; empty = no update), and `step += 1`. Returns
    /// (gradient norm before clipping, learning rate). A non-finite norm is an error and leaves
    /// the weights untouched.
    pub fn apply_gradients(&mut self, loads: &[Vec<u32>]) -> Result<(f32, f32)> {
        let grad_norm = grad_norm(&mut self.grad);
        if !grad_norm.is_finite() {
            return Err(crate::Error::NonFinite(alloc::format!("gradient norm is {grad_norm} at step {}", self.step)));
        }
        let clip = self.cfg.clip_norm.filter(|&c| grad_norm > c).map(|c| c / grad_norm);
        let lr = self.cfg.schedule.at(self.step);
        // clipping (g *= c/‖g‖) happens inside the optimizer's pass
        self.opt.step_scaled(&mut self.model, &mut self.grad, lr, clip);
        self.update_biases(loads);
        self.model.sync_tied_head();
        self.model.layers.iter_mut().for_each(|b| b.attn.refresh_absorbed());
        self.model.requantize();
        self.step += 1;
        Ok((grad_norm, lr))
    }

    /// Forward + backward of one micro-batch (gradients × `w` added to `self.grad`). Its
    /// sequences are split into contiguous shards, one per worker thread, each with its own
    /// gradient buffer; the buffers are then summed in shard order (deterministic for a given
    /// thread count). The batch-wise auxiliary loss is computed per shard, as per device in
    /// data-parallel training.
    fn pass(&mut self, mb: &MicroBatch, w: f32) -> Result<PassOutput> {
        let threads = crate::ops::threads().min(mb.seqs.len()).max(1);
        let counted = mb.counted();
        // shard boundaries by sequence, with each shard's slice of the mask
        let per = mb.seqs.len().div_ceil(threads);
        let mut shards: Vec<Shard> = Vec::new();
        let mut mask_off = 0;
        for chunk in mb.seqs.chunks(per) {
            let n_pred: usize = chunk.iter().map(|s| s.len().saturating_sub(1)).sum();
            let mask = mb.mask.as_ref().map(|m| m[mask_off..mask_off + n_pred].to_vec());
            mask_off += n_pred;
            shards.push((chunk.iter().map(|s| &s[..]).collect(), mask));
        }
        if mb.mask.as_ref().is_some_and(|m| m.len() != mask_off) {
            return Err(ierr(alloc::format!(
                "mask has {} entries, the batch predicts {mask_off} positions",
                mb.mask.as_ref().map_or(0, |m| m.len())
            )));
        }
        let mk = |seqs: &[&[u32]], mask: &Option<Vec<f32>>| -> PassOptions {
            let shard_counted = match mask {
                Some(m) => m.iter().sum(),
                None => seqs.iter().map(|s| s.len().saturating_sub(1)).sum::<usize>() as f32,
            };
            PassOptions {
                scale: w * shard_counted / counted,
                seq_alpha: self.cfg.seq_aux_alpha,
                aux_alpha: self.cfg.aux_loss_alpha,
                mask: mask.clone(),
                mtp_lambda: self.cfg.mtp_lambda,
            }
        };
        if shards.len() == 1 {
            let o = mk(&shards[0].0, &shards[0].1);
            return self.model.train_pass(&shards[0].0, &mut self.grad, &o);
        }
        while self.shard_grads.len() + 1 < shards.len() {
            self.shard_grads.push(self.model.zeros_like());
        }
        // the first shard accumulates straight into the step's gradient (passes add to theirs),
        // the others into zeroed buffers that are added to it afterwards
        let model = &self.model;
        let run = |i: usize, (seqs, mask): &Shard, g: &mut Model| {
            if i > 0 {
                g.visit(&mut |_, t| t.fill(0.0));
            }
            model.train_pass(seqs, g, &mk(seqs, mask))
        };
        let mut bufs: Vec<&mut Model> = Vec::with_capacity(shards.len());
        bufs.push(&mut self.grad);
        bufs.extend(self.shard_grads[..shards.len() - 1].iter_mut());
        let outs = run_shards(&shards, &mut bufs, &run).into_iter().collect::<Result<Vec<_>>>()?;
        drop(bufs);
        for b in self.shard_grads[..shards.len() - 1].iter_mut() {
            self.grad.add_from(b);
        }
        // combine: losses weighted by each shard's share of counted positions
        let mut total = PassOutput { ce_loss: 0.0, balance_loss: 0.0, mtp_loss: 0.0, loads: Vec::new(), predicted: 0 };
        for ((seqs, mask), o) in shards.iter().zip(&outs) {
            let share = mk(seqs, mask).scale / w;
            total.ce_loss += o.ce_loss * share;
            total.balance_loss += o.balance_loss * share;
            total.mtp_loss += o.mtp_loss * share;
            total.predicted += o.predicted;
            if total.loads.is_empty() {
                total.loads = o.loads.clone();
            } else {
                for (a, b) in total.loads.iter_mut().zip(&o.loads) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        Ok(total)
    }

    /// Auxiliary-loss-free balancing: `b_i += γ·sign(mean load − load_i)` in each MoE layer.
    fn update_biases(&mut self, loads: &[Vec<u32>]) {
        let gamma = self.cfg.bias_update_speed;
        if gamma == 0.0 {
            return;
        }
        let moe = self.model.layers.iter_mut().filter_map(|l| match &mut l.ffn {
            Ffn::Moe(m) => Some(m),
            _ => None,
        });
        for (m, load) in moe.zip(loads) {
            let Some(bias) = &mut m.router.bias else { continue };
            let mean = load.iter().sum::<u32>() as f32 / load.len() as f32;
            for (b, &l) in bias.iter_mut().zip(load) {
                let diff = mean - l as f32;
                *b += gamma
                    * if diff > 0.0 {
                        1.0
                    } else if diff < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
            }
        }
    }
}

/// The global L2 norm of `grad`'s trainable tensors (f64 sums per piece, added in order, so
/// the result does not depend on the thread count).
pub fn grad_norm(grad: &mut Model) -> f32 {
    use crate::model::train::PIECE;
    let pieces: Vec<_> = grad.tensor_views().into_iter().flat_map(|(_, t)| t.pieces(PIECE)).collect();
    let sums = crate::ops::par_map(&pieces, usize::MAX, |t| {
        // SAFETY: `grad` is borrowed mutably for this call and only read here.
        let t = unsafe { t.slice() };
        t.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()
    });
    libm::sqrt(sums.iter().sum::<f64>()) as f32
}

/// A data-parallel shard of a micro-batch: its sequences and its slice of the loss mask.
type Shard<'a> = (Vec<&'a [u32]>, Option<Vec<f32>>);

/// Runs `run` on each shard (with its index) and its buffer: in parallel under `std`, in order
/// otherwise.
fn run_shards<S: Sync, F>(shards: &[S], bufs: &mut [&mut Model], run: &F) -> Vec<Result<PassOutput>>
where
    F: Fn(usize, &S, &mut Model) -> Result<PassOutput> + Sync,
{
    #[cfg(feature = "std")]
    {
        use rayon::prelude::*;
        shards.par_iter().zip(bufs.par_iter_mut()).enumerate().map(|(i, (s, g))| run(i, s, g)).collect()
    }
    #[cfg(not(feature = "std"))]
    {
        shards.iter().zip(bufs.iter_mut()).enumerate().map(|(i, (s, g))| run(i, s, g)).collect()
    }
}

/// Splits `seqs` into micro-batches of at most `per` sequences.
pub fn micro_batches(seqs: Vec<Vec<u32>>, per: usize) -> Vec<MicroBatch> {
    let per = per.max(1);
    let mut out = Vec::new();
    let mut it = seqs.into_iter().peekable();
    while it.peek().is_some() {
        out.push(MicroBatch { seqs: it.by_ref().take(per).collect(), mask: None });
    }
    out
}
