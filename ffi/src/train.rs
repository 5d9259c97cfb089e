//! Training: trainers from a model or a preset, steps on token batches (plain, or SFT with a loss
//! mask), metrics, expert loads, checkpoints.
use crate::model::dsv3_model;
use crate::status::*;
use dsv3_core::model::linear::Precision;
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::train::trainer::MicroBatch;
use dsv3_core::train::{AdamW, LrSchedule, StepMetrics, TrainConfig, Trainer};
use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

/// A trainer (opaque): f32 master weights, gradients, AdamW state. One thread at a time.
pub struct dsv3_trainer {
    inner: Trainer,
    last: Option<StepMetrics>,
}

/// Training settings. Initialize with dsv3_train_params_default().
#[repr(C)]
pub struct dsv3_train_params {
    /// sizeof(dsv3_train_params).
    pub struct_size: usize,
    pub lr: f32,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f32,
    pub warmup_steps: u64,
    /// Steps the schedule spans (cosine and v3).
    pub total_steps: u64,
    /// 0 = constant, 1 = warmup + cosine, 2 = DeepSeek-V3's step schedule.
    pub schedule: i32,
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 = off.
    pub clip_norm: f32,
    /// Auxiliary-loss-free bias update speed γ; 0 = off.
    pub bias_update_speed: f32,
    /// Complementary sequence-wise balance loss α.
    pub seq_aux_alpha: f32,
    /// Conventional auxiliary balance loss weight; 0 = off.
    pub aux_loss_alpha: f32,
    /// MTP loss weight (used when the model has MTP modules).
    pub mtp_lambda: f32,
    /// GEMM precision of the decoder's linear layers: 0 = f32, 1 = bf16, 2 = fp8.
    pub precision: i32,
    /// 1 = keep AdamW moments in bf16.
    pub bf16_moments: i32,
    /// Seed of the random initialization (dsv3_trainer_new_preset).
    pub seed: u64,
}

/// Fills `params` with the defaults: lr 1e-3 warmup (20) + cosine over 1000 steps to 1e-4,
/// AdamW wd 0.1, clip 1.0, bias update 0.001, sequence-wise α 1e-4, MTP λ 0.3, f32.
#[no_mangle]
pub unsafe extern "C" fn dsv3_train_params_default(params: *mut dsv3_train_params) -> dsv3_status {
    guard("dsv3_train_params_default", || {
        *nonnull_mut(params, "params")? = dsv3_train_params {
            struct_size: std::mem::size_of::<dsv3_train_params>(),
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
            total_steps: 1000,
            schedule: 1,
            weight_decay: 0.1,
            clip_norm: 1.0,
            bias_update_speed: 0.001,
            seq_aux_alpha: 1e-4,
            aux_loss_alpha: 0.0,
            mtp_lambda: 0.3,
            precision: 0,
            bf16_moments: 0,
            seed: 0,
        };
        Ok(())
    })
}

pub(crate) fn config(p: *const dsv3_train_params) -> Result<(TrainConfig, AdamW, u64), Fail> {
    let mut d = std::mem::MaybeUninit::<dsv3_train_params>::uninit();
    // SAFETY: the default writes every field.
    let def = unsafe {
        dsv3_train_params_default(d.as_mut_ptr());
        d.assume_init()
    };
    let p = match unsafe { p.as_ref() } {
        Some(p) => {
            check_size(p.struct_size, std::mem::size_of::<dsv3_train_params>(), "dsv3_train_params")?;
            p
        }
        None => &def,
    };
    if !(p.lr.is_finite() && p.lr > 0.0) {
        return Err(invalid(format!("lr must be positive, got {}", p.lr)));
    }
    let schedule = match p.schedule {
        0 => LrSchedule::Constant { lr: p.lr },
        1 => LrSchedule::WarmupCosine { lr: p.lr, min_lr: p.min_lr, warmup: p.warmup_steps, total: p.total_steps },
        2 => LrSchedule::DeepSeekV3 { lr: p.lr, warmup: p.warmup_steps, total: p.total_steps },
        s => return Err(invalid(format!("schedule must be 0, 1 or 2, got {s}"))),
    };
    let precision = match p.precision {
        0 => Precision::F32,
        1 => Precision::Bf16,
        2 => Precision::Fp8,
        v => return Err(invalid(format!("precision must be 0 (f32), 1 (bf16) or 2 (fp8), got {v}"))),
    };
    let cfg = TrainConfig {
        schedule,
        clip_norm: (p.clip_norm > 0.0).then_some(p.clip_norm),
        bias_update_speed: p.bias_update_speed,
        seq_aux_alpha: p.seq_aux_alpha,
        aux_loss_alpha: p.aux_loss_alpha,
        mtp_lambda: p.mtp_lambda,
        precision,
    };
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, p.weight_decay);
    opt.bf16_moments = match p.bf16_moments {
        0 => false,
        1 => true,
        v => return Err(invalid(format!("bf16_moments must be 0 or 1, got {v}"))),
    };
    Ok((cfg, opt, p.seed))
}

fn boxed(t: Trainer, out: *mut *mut dsv3_trainer) -> Result<(), Fail> {
    *nonnull_mut(out, "out")? = Box::into_raw(Box::new(dsv3_trainer { inner: t, last: None }));
    Ok(())
}

/// A trainer starting from `model`'s weights (copied: the model handle is unaffected).
/// `params` may be NULL for the defaults.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_new(
    model: *const dsv3_model,
    params: *const dsv3_train_params,
    out: *mut *mut dsv3_trainer,
) -> dsv3_status {
    guard("dsv3_trainer_new", || {
        let m = (*nonnull(model, "model")?.inner).clone();
        let (cfg, opt, _) = config(params)?;
        boxed(Trainer::new(m, opt, cfg), out)
    })
}

/// A trainer for a fresh, randomly initialized model of a preset ("tiny", "bench-4m",
/// "bench-88m"), seeded with params.seed.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_new_preset(
    preset: *const c_char,
    params: *const dsv3_train_params,
    out: *mut *mut dsv3_trainer,
) -> dsv3_status {
    guard("dsv3_trainer_new_preset", || {
        let name = cstr(preset, "preset")?;
        let (cfg, opt, seed) = config(params)?;
        let c = dsv3_core::presets::preset(name)?;
        let mut store = dsv3_core::weights::TensorStore::new();
        store.add_bytes(
            dsv3_core::weights::write::to_bytes(&dsv3_core::weights::init::random_checkpoint(&c, seed, 0.02))?,
            "<init>",
        )?;
        let m = Model::from_store(c, store, LoadOptions::default())?;
        boxed(Trainer::new(m, opt, cfg), out)
    })
}

/// Frees a trainer. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_free(trainer: *mut dsv3_trainer) {
    free_handle(trainer)
}

/// What one training step reports.
#[repr(C)]
#[derive(Default)]
pub struct dsv3_step_metrics {
    /// Set to sizeof(dsv3_step_metrics) before calling.
    pub struct_size: usize,
    /// The step's index (0-based).
    pub step: u64,
    /// Mean next-token cross-entropy over the counted positions.
    pub loss: f32,
    pub balance_loss: f32,
    pub mtp_loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Largest (max load / mean load) over the MoE layers; 1 = balanced.
    pub max_over_mean_load: f32,
}

fn step(
    t: &mut dsv3_trainer,
    ids: *const i32,
    mask: Option<*const f32>,
    batch: usize,
    seq_len: usize,
    metrics: *mut dsv3_step_metrics,
) -> Result<(), Fail> {
    if batch == 0 || seq_len < 2 {
        return Err(invalid(format!("need batch >= 1 and seq_len >= 2, got {batch} x {seq_len}")));
    }
    let v = t.inner.model.cfg.vocab_size;
    let n = batch
        .checked_mul(seq_len)
        .filter(|&n| n <= 1 << 32)
        .ok_or_else(|| invalid(format!("batch {batch} x seq_len {seq_len} is too large")))?;
    let ids = slice(ids, n, "ids")?;
    let seqs: Vec<Vec<u32>> = ids
        .chunks(seq_len)
        .map(|r| {
            r.iter()
                .map(|&x| {
                    if x < 0 || x as usize >= v {
                        Err(invalid(format!("token id {x} is outside [0, {v})")))
                    } else {
                        Ok(x as u32)
                    }
                })
                .collect()
        })
        .collect::<Result<_, _>>()?;
    let mask = match mask {
        Some(m) => {
            let m = slice(m, batch * (seq_len - 1), "loss_mask")?;
            if m.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(invalid("loss_mask values must be finite and >= 0"));
            }
            Some(m.to_vec())
        }
        None => None,
    };
    if let Some(out) = unsafe { metrics.as_ref() } {
        check_size(out.struct_size, std::mem::size_of::<dsv3_step_metrics>(), "dsv3_step_metrics")?;
    }
    let t0 = std::time::Instant::now();
    let m = t.inner.train_step(&[MicroBatch { seqs, mask }])?;
    let dt = t0.elapsed().as_secs_f64();
    if let Some(out) = unsafe { metrics.as_mut() } {
        *out = dsv3_step_metrics {
            struct_size: out.struct_size,
            step: m.step,
            loss: m.loss,
            balance_loss: m.balance_loss,
            mtp_loss: m.mtp_loss,
            grad_norm: m.grad_norm,
            lr: m.lr,
            tokens: m.tokens as u64,
            tokens_per_s: m.tokens as f64 / dt.max(1e-9),
            max_over_mean_load: m.max_over_mean.iter().copied().fold(0.0, f32::max),
        };
    }
    t.last = Some(m);
    Ok(())
}

/// One optimizer step on `batch` sequences of `seq_len` token ids (row-major `[batch, seq_len]`),
/// next-token loss on every position. `metrics` may be NULL. On failure the weights are unchanged.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_step(
    trainer: *mut dsv3_trainer,
    ids: *const i32,
    batch: usize,
    seq_len: usize,
    metrics: *mut dsv3_step_metrics,
) -> dsv3_status {
    guard("dsv3_trainer_step", || step(nonnull_mut(trainer, "trainer")?, ids, None, batch, seq_len, metrics))
}

/// Like dsv3_trainer_step with a loss mask `[batch, seq_len - 1]`: position t (predicting token
/// t+1) counts with weight loss_mask[t] (1 = completion token, 0 = prompt) — SFT / distillation.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_step_sft(
    trainer: *mut dsv3_trainer,
    ids: *const i32,
    loss_mask: *const f32,
    batch: usize,
    seq_len: usize,
    metrics: *mut dsv3_step_metrics,
) -> dsv3_status {
    guard("dsv3_trainer_step_sft", || {
        step(nonnull_mut(trainer, "trainer")?, ids, Some(loss_mask), batch, seq_len, metrics)
    })
}

/// Tokens routed to each expert of MoE layer `moe_layer` (0 = the first MoE layer) in the last
/// step, into `out` (`cap` entries; `*needed` gets the number of experts).
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_expert_load(
    trainer: *const dsv3_trainer,
    moe_layer: usize,
    out: *mut u32,
    cap: usize,
    needed: *mut usize,
) -> dsv3_status {
    guard("dsv3_trainer_expert_load", || {
        let t = nonnull(trainer, "trainer")?;
        let last = t.last.as_ref().ok_or_else(|| invalid("no step has run yet"))?;
        let l = last.expert_load.get(moe_layer).ok_or_else(|| {
            invalid(format!("moe_layer {moe_layer} out of range ({} MoE layers)", last.expert_load.len()))
        })?;
        fill(l, out, cap, needed, "expert loads")
    })
}

/// Writes a checkpoint directory (HF-format model + optimizer + trainer state), atomically: a
/// failure leaves a previous checkpoint at `dir` intact.
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_save(trainer: *mut dsv3_trainer, dir: *const c_char) -> dsv3_status {
    guard("dsv3_trainer_save", || {
        let t = nonnull_mut(trainer, "trainer")?;
        let d = cstr(dir, "dir")?;
        Ok(dsv3_core::train::checkpoint::save(
            &mut t.inner,
            Path::new(d),
            serde_json::Value::Null,
            dsv3_core::train::checkpoint::Fault::None,
        )?)
    })
}

/// Resumes a checkpoint written by dsv3_trainer_save (or `dsv3 train`) with `params` (may be NULL).
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_load(
    dir: *const c_char,
    params: *const dsv3_train_params,
    out: *mut *mut dsv3_trainer,
) -> dsv3_status {
    guard("dsv3_trainer_load", || {
        let d = cstr(dir, "dir")?;
        let (cfg, _, _) = config(params)?;
        let (t, _) = dsv3_core::train::checkpoint::load(Path::new(d), cfg)?;
        boxed(t, out)
    })
}

/// A model handle with the trainer's current weights (a snapshot, for inference).
#[no_mangle]
pub unsafe extern "C" fn dsv3_trainer_model(trainer: *const dsv3_trainer, out: *mut *mut dsv3_model) -> dsv3_status {
    guard("dsv3_trainer_model", || {
        let t = nonnull(trainer, "trainer")?;
        let out = nonnull_mut(out, "out")?;
        let mut m = t.inner.model.clone();
        m.set_precision(Precision::F32);
        *out = Box::into_raw(Box::new(dsv3_model { inner: Arc::new(m), dir: Default::default(), cuda: None }));
        Ok(())
    })
}
