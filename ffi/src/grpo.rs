//! GRPO from C: a GRPO trainer over a model, built-in rule rewards and rewards computed by the
//! host (a callback with user data, called once per completion), steps on text prompts with
//! reference answers, TRL's metrics, the last batch's completions, checkpoints.
use crate::model::dsv3_model;
use crate::status::*;
use crate::tokenizer::dsv3_tokenizer;
use dsv3_core::grpo::reward::{builtin, Reward, BUILTIN_NAMES};
use dsv3_core::grpo::{GrpoConfig, GrpoMetrics, GrpoTrainConfig, GrpoTrainer, LossType, Prompt, ScaleRewards};
use dsv3_core::model::linear::Precision;
use dsv3_core::train::Trainer;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::Arc;

/// A reward computed by the host for one completion: `prompt` and `completion` are the texts,
/// `answer` the prompt's reference answer or NULL. Return the reward, or NaN when it does not
/// apply (skipped in the weighted sum, as TRL's None). Return +/-infinity to abort the step (e.g.
/// the host's scorer failed): dsv3_grpo_step then fails with DSV3_ERR_NON_FINITE before any
/// optimizer step, leaving the weights unchanged. The strings live until the call returns. Rewards
/// are called one after another, on the thread that called dsv3_grpo_step.
pub type dsv3_reward_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        prompt: *const c_char,
        completion: *const c_char,
        answer: *const c_char,
    ) -> f32,
>;

struct HostReward {
    name: String,
    f: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, *const c_char) -> f32,
    user: *mut c_void,
}

impl Reward for HostReward {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32> {
        let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
        let (p, comp) = (c(prompt), c(completion));
        let a = answer.map(c);
        // SAFETY: the host registered f with this user data (header contract).
        let r = unsafe {
            (self.f)(self.user, p.as_ptr(), comp.as_ptr(), a.as_ref().map_or(std::ptr::null(), |a| a.as_ptr()))
        };
        (!r.is_nan()).then_some(r)
    }
}

/// A GRPO trainer (opaque): the policy, its optimizer, the reference model (β > 0), the reward
/// functions, and the last batch. One thread at a time.
pub struct dsv3_grpo {
    inner: GrpoTrainer,
    rewards: Vec<(Box<dyn Reward>, f32)>,
    last: Option<(GrpoMetrics, Vec<String>, Vec<f32>)>,
}

/// GRPO settings (TRL's names). Initialize with dsv3_grpo_params_default().
#[repr(C)]
pub struct dsv3_grpo_params {
    /// sizeof(dsv3_grpo_params).
    pub struct_size: usize,
    /// Completions per prompt (G, >= 2).
    pub num_generations: u32,
    pub max_completion_length: u32,
    /// Sampling temperature (> 0); log-probs use the same.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    /// μ: optimizer steps per generation batch.
    pub num_iterations: u32,
    /// KL weight β (0 = no reference model).
    pub beta: f32,
    pub epsilon: f32,
    pub epsilon_high: f32,
    /// 0 = grpo, 1 = bnpo, 2 = dr_grpo, 3 = dapo.
    pub loss_type: i32,
    /// 0 = group, 1 = batch, 2 = none.
    pub scale_rewards: i32,
    /// 1 = sequence-level importance ratio (GSPO).
    pub sequence_level: i32,
    /// Reset the reference to the policy every this many optimizer steps (0 = never).
    pub ref_sync_steps: u64,
    pub ref_mixup_alpha: f32,
    pub seed: u64,
}

/// Fills `params` with TRL's defaults: G 8, 256 tokens, temperature 1, top-p 1, μ 1, β 0,
/// ε 0.2 / 0.2, dapo, group scaling, token level, no reference reset.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_params_default(params: *mut dsv3_grpo_params) -> dsv3_status {
    guard("dsv3_grpo_params_default", || {
        *nonnull_mut(params, "params")? = dsv3_grpo_params {
            struct_size: std::mem::size_of::<dsv3_grpo_params>(),
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            num_iterations: 1,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: 0.2,
            loss_type: 3,
            scale_rewards: 0,
            sequence_level: 0,
            ref_sync_steps: 0,
            ref_mixup_alpha: 1.0,
            seed: 0,
        };
        Ok(())
    })
}

/// The loop settings of `params` (NULL: the defaults); completions stop at `eos`.
fn grpo_config(params: *const dsv3_grpo_params, eos: &[u32]) -> Result<GrpoTrainConfig, Fail> {
    let mut def = std::mem::MaybeUninit::<dsv3_grpo_params>::uninit();
    // SAFETY: the default writes every field; `params` is NULL or valid (header contract).
    let def = unsafe {
        dsv3_grpo_params_default(def.as_mut_ptr());
        def.assume_init()
    };
    let p = unsafe { params.as_ref() }.unwrap_or(&def);
    check_size(p.struct_size, std::mem::size_of::<dsv3_grpo_params>(), "dsv3_grpo_params")?;
    let loss = GrpoConfig {
        epsilon_low: p.epsilon,
        epsilon_high: p.epsilon_high,
        beta: p.beta,
        loss_type: match p.loss_type {
            0 => LossType::Grpo,
            1 => LossType::Bnpo,
            2 => LossType::DrGrpo,
            3 => LossType::Dapo,
            v => return Err(invalid(format!("loss_type must be 0..=3, got {v}"))),
        },
        scale_rewards: match p.scale_rewards {
            0 => ScaleRewards::Group,
            1 => ScaleRewards::Batch,
            2 => ScaleRewards::None,
            v => return Err(invalid(format!("scale_rewards must be 0, 1 or 2, got {v}"))),
        },
        sequence_level: match p.sequence_level {
            0 => false,
            1 => true,
            v => return Err(invalid(format!("sequence_level must be 0 or 1, got {v}"))),
        },
        temperature: p.temperature,
        ..Default::default()
    };
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(invalid(format!("top_p must be in (0, 1], got {}", p.top_p)));
    }
    Ok(GrpoTrainConfig {
        loss,
        num_generations: p.num_generations as usize,
        max_completion_length: p.max_completion_length as usize,
        top_p: p.top_p,
        top_k: p.top_k as usize,
        stop_tokens: eos.to_vec(),
        num_iterations: p.num_iterations as usize,
        ref_sync_steps: (p.ref_sync_steps > 0).then_some(p.ref_sync_steps),
        ref_mixup_alpha: p.ref_mixup_alpha,
        pad_token: eos.first().copied().unwrap_or(0),
        seed: p.seed,
    })
}

/// A GRPO trainer starting from `model`'s weights (copied). `train` (optimizer, learning-rate
/// schedule, clipping; may be NULL for dsv3_train_params_default's; its bias_update_speed is
/// ignored — router biases stay fixed during RL — and so is its seed: sampling uses params.seed)
/// and `params` (NULL for dsv3_grpo_params_default's). Completions stop at the model's EOS (see
/// dsv3_grpo_set_stop_tokens). Add at least one reward before stepping.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_new(
    model: *const dsv3_model,
    train: *const crate::train::dsv3_train_params,
    params: *const dsv3_grpo_params,
    out: *mut *mut dsv3_grpo,
) -> dsv3_status {
    guard("dsv3_grpo_new", || {
        let m = (*nonnull(model, "model")?.inner).clone();
        let out = nonnull_mut(out, "out")?;
        let (mut cfg, opt, _) = crate::train::config(train)?;
        cfg.bias_update_speed = 0.0;
        let eos = m.cfg.eos_token_ids.clone();
        let g = GrpoTrainer::from_trainer(Trainer::new(m, opt, cfg), grpo_config(params, &eos)?)?;
        *out = Box::into_raw(Box::new(dsv3_grpo { inner: g, rewards: Vec::new(), last: None }));
        Ok(())
    })
}

/// Frees a GRPO trainer. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_free(grpo: *mut dsv3_grpo) {
    free_handle(grpo)
}

/// Adds a reward function with `weight`. With `callback` NULL, `name` picks a built-in: "accuracy"
/// (`\boxed{}` / `<answer>` vs the reference), "exact" (the completion's first line vs the
/// reference), "format" (R1's `<think>…</think><answer>…</answer>`), "language" (English
/// reasoning), "language-zh". With `callback` set, the host computes it (`user_data` is passed back on
/// every call; it must stay valid while the trainer steps) and `name` labels its metrics.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_add_reward(
    grpo: *mut dsv3_grpo,
    name: *const c_char,
    weight: f32,
    callback: dsv3_reward_fn,
    user_data: *mut c_void,
) -> dsv3_status {
    guard("dsv3_grpo_add_reward", || {
        let g = nonnull_mut(grpo, "grpo")?;
        let name = cstr(name, "name")?;
        if !weight.is_finite() {
            return Err(invalid(format!("weight of '{name}' must be finite")));
        }
        if g.rewards.iter().any(|(r, _)| r.name() == name) {
            return Err(invalid(format!("a reward named '{name}' is already added (names label the metrics)")));
        }
        let r: Box<dyn Reward> = match callback {
            Some(f) => Box::new(HostReward { name: name.to_string(), f, user: user_data }),
            None => builtin(name)
                .ok_or_else(|| invalid(format!("no built-in reward '{name}' ({BUILTIN_NAMES}); pass a callback")))?,
        };
        g.rewards.push((r, weight));
        Ok(())
    })
}

/// Completions end after any of these tokens (replacing the default, the model's EOS).
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_set_stop_tokens(grpo: *mut dsv3_grpo, tokens: *const u32, n: usize) -> dsv3_status {
    guard("dsv3_grpo_set_stop_tokens", || {
        let g = nonnull_mut(grpo, "grpo")?;
        let t = if n == 0 { &[][..] } else { slice(tokens, n, "tokens")? };
        let v = g.inner.model().cfg.vocab_size;
        if let Some(x) = t.iter().find(|&&x| x as usize >= v) {
            return Err(invalid(format!("stop token {x} is outside [0, {v})")));
        }
        g.inner.cfg.stop_tokens = t.to_vec();
        Ok(())
    })
}

/// What one GRPO step reports (TRL's metrics).
#[repr(C)]
#[derive(Default)]
pub struct dsv3_grpo_metrics {
    /// Set to sizeof(dsv3_grpo_metrics) before calling.
    pub struct_size: usize,
    /// The step's index (0-based).
    pub step: u64,
    /// Loss averaged over the μ optimizer steps.
    pub loss: f32,
    /// Mean and std of the weighted reward over the batch.
    pub reward: f32,
    pub reward_std: f32,
    /// Share of groups whose rewards are all equal (no learning signal).
    pub frac_reward_zero_std: f32,
    pub kl: f32,
    pub clip_ratio_low: f32,
    pub clip_ratio_high: f32,
    pub clip_ratio_region: f32,
    pub completion_length_mean: f32,
    pub completion_length_max: u64,
    /// Share of completions cut at max_completion_length.
    pub clipped_ratio: f32,
    pub grad_norm: f32,
    pub lr: f32,
    /// Completion tokens sampled.
    pub completion_tokens: u64,
    /// Wall time of sampling (generation + rewards) and of learning (the μ optimizer steps).
    pub sampling_s: f64,
    pub learning_s: f64,
}

/// One GRPO step: samples G completions for each of the `n` prompts (texts, tokenized with
/// `tokenizer` — NULL for a byte-level model), scores them with the rewards, and takes μ
/// optimizer steps. `answers` may be NULL, or hold NULL entries, for prompts without a reference.
/// `metrics` may be NULL. On failure the weights are unchanged unless an optimizer step had
/// already run (μ > 1).
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_step(
    grpo: *mut dsv3_grpo,
    tokenizer: *const dsv3_tokenizer,
    prompts: *const *const c_char,
    answers: *const *const c_char,
    n: usize,
    metrics: *mut dsv3_grpo_metrics,
) -> dsv3_status {
    guard("dsv3_grpo_step", || {
        let g = nonnull_mut(grpo, "grpo")?;
        if g.rewards.is_empty() {
            return Err(invalid("add a reward with dsv3_grpo_add_reward first"));
        }
        if n == 0 {
            return Err(invalid("n must be at least 1"));
        }
        if let Some(m) = metrics.as_ref() {
            check_size(m.struct_size, std::mem::size_of::<dsv3_grpo_metrics>(), "dsv3_grpo_metrics")?;
        }
        let v = g.inner.model().cfg.vocab_size;
        let byte = crate::tokenizer::Tok::Byte(dsv3_core::tokenizer::ByteTokenizer);
        let tok = match tokenizer.as_ref() {
            Some(t) => &t.inner,
            None if v == dsv3_core::tokenizer::ByteTokenizer::VOCAB => &byte,
            None => return Err(invalid("tokenizer is NULL and the model's vocabulary is not byte-level")),
        };
        let texts = slice(prompts, n, "prompts")?;
        let ans = if answers.is_null() { None } else { Some(slice(answers, n, "answers")?) };
        let mut ps = Vec::with_capacity(n);
        for i in 0..n {
            let text = cstr(texts[i], "prompts[i]")?;
            let answer = match ans.map(|a| a[i]) {
                Some(p) if !p.is_null() => Some(CStr::from_ptr(p).to_string_lossy().into_owned()),
                _ => None,
            };
            let ids = tok.encode(text)?;
            if ids.is_empty() || ids.iter().any(|&t| t as usize >= v) {
                return Err(invalid(format!("prompt {i} is empty or has tokens outside the vocabulary")));
            }
            ps.push(Prompt { ids, text: text.to_string(), answer });
        }
        let rw: Vec<(&dyn Reward, f32)> = g.rewards.iter().map(|(r, w)| (r.as_ref(), *w)).collect();
        let decode = |t: &[u32]| tok.decode(t).unwrap_or_default();
        let t0 = std::time::Instant::now();
        let batch = g.inner.sample(&ps, &rw, &decode)?;
        let t1 = std::time::Instant::now();
        let m = g.inner.learn(&batch)?;
        let (ds, dl) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
        if let Some(out) = metrics.as_mut() {
            *out = dsv3_grpo_metrics {
                struct_size: out.struct_size,
                step: m.step,
                loss: m.loss,
                reward: m.reward,
                reward_std: m.reward_std,
                frac_reward_zero_std: m.frac_reward_zero_std,
                kl: m.kl,
                clip_ratio_low: m.clip_ratio_low,
                clip_ratio_high: m.clip_ratio_high,
                clip_ratio_region: m.clip_ratio_region,
                completion_length_mean: m.completion_length_mean,
                completion_length_max: m.completion_length_max as u64,
                clipped_ratio: m.clipped_ratio,
                grad_norm: m.grad_norm,
                lr: m.lr,
                completion_tokens: m.completion_tokens as u64,
                sampling_s: ds,
                learning_s: dl,
            };
        }
        g.last = Some((m, batch.texts, batch.rewards));
        Ok(())
    })
}

/// Mean and std (NaN: never applied) of reward function `index` (in the order added) over the
/// last step's completions.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_reward_stats(
    grpo: *const dsv3_grpo,
    index: usize,
    mean: *mut f32,
    std: *mut f32,
) -> dsv3_status {
    guard("dsv3_grpo_reward_stats", || {
        let g = nonnull(grpo, "grpo")?;
        let (m, _, _) = g.last.as_ref().ok_or_else(|| invalid("no step has run yet"))?;
        let r = m.rewards.get(index).ok_or_else(|| invalid(format!("reward {index} of {}", m.rewards.len())))?;
        *nonnull_mut(mean, "mean")? = r.mean;
        *nonnull_mut(std, "std")? = r.std;
        Ok(())
    })
}

/// Completion `i` of the last step (prompt i / G, sample i % G) as text (buffer protocol: `out`
/// of `cap` bytes gets the NUL-terminated text, `*needed` its size with the NUL) and its
/// weighted reward (`reward` may be NULL; NaN when no function applied).
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_completion(
    grpo: *const dsv3_grpo,
    i: usize,
    out: *mut c_char,
    cap: usize,
    needed: *mut usize,
    reward: *mut f32,
) -> dsv3_status {
    guard("dsv3_grpo_completion", || {
        let g = nonnull(grpo, "grpo")?;
        let (_, texts, rewards) = g.last.as_ref().ok_or_else(|| invalid("no step has run yet"))?;
        let t = texts.get(i).ok_or_else(|| invalid(format!("completion {i} of {}", texts.len())))?;
        if let Some(r) = reward.as_mut() {
            *r = rewards[i];
        }
        fill_str(t, out, cap, needed, "completion")
    })
}

/// The number of completions of the last step (prompts × num_generations) into `*n`.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_num_completions(grpo: *const dsv3_grpo, n: *mut usize) -> dsv3_status {
    guard("dsv3_grpo_num_completions", || {
        let g = nonnull(grpo, "grpo")?;
        let (_, texts, _) = g.last.as_ref().ok_or_else(|| invalid("no step has run yet"))?;
        *nonnull_mut(n, "n")? = texts.len();
        Ok(())
    })
}

/// Resumes a checkpoint written by dsv3_grpo_save (the policy, its optimizer state and the GRPO
/// step count) with `train` and `params` (each may be NULL for the defaults). `reference` is the
/// frozen reference model for β > 0 (copied; NULL: the loaded policy). Rewards are not saved: add
/// them again.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_load(
    dir: *const c_char,
    reference: *const dsv3_model,
    train: *const crate::train::dsv3_train_params,
    params: *const dsv3_grpo_params,
    out: *mut *mut dsv3_grpo,
) -> dsv3_status {
    guard("dsv3_grpo_load", || {
        let d = cstr(dir, "dir")?;
        let out = nonnull_mut(out, "out")?;
        let (mut cfg, _, _) = crate::train::config(train)?;
        cfg.bias_update_speed = 0.0;
        let (t, state) = dsv3_core::train::checkpoint::load(Path::new(d), cfg)?;
        let eos = t.model.cfg.eos_token_ids.clone();
        let mut g = GrpoTrainer::from_trainer(t, grpo_config(params, &eos)?)?;
        g.step = state.get("grpo_step").and_then(|v| v.as_u64()).unwrap_or(0);
        if let (Some(r), true) = (reference.as_ref(), g.reference.is_some()) {
            let m = (*r.inner).clone();
            if m.cfg.vocab_size != g.model().cfg.vocab_size || m.params() != g.model().params() {
                return Err(invalid("the reference model's shape differs from the checkpoint's"));
            }
            g.reference = Some(m);
        }
        *out = Box::into_raw(Box::new(dsv3_grpo { inner: g, rewards: Vec::new(), last: None }));
        Ok(())
    })
}

/// A model handle with the policy's current weights (a snapshot, for inference).
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_model(grpo: *const dsv3_grpo, out: *mut *mut dsv3_model) -> dsv3_status {
    guard("dsv3_grpo_model", || {
        let g = nonnull(grpo, "grpo")?;
        let out = nonnull_mut(out, "out")?;
        let mut m = g.inner.model().clone();
        m.set_precision(Precision::F32);
        *out = Box::into_raw(Box::new(dsv3_model { inner: Arc::new(m), dir: Default::default(), cuda: None }));
        Ok(())
    })
}

/// Writes the policy as a checkpoint directory (model + optimizer + state), atomically.
#[no_mangle]
pub unsafe extern "C" fn dsv3_grpo_save(grpo: *mut dsv3_grpo, dir: *const c_char) -> dsv3_status {
    guard("dsv3_grpo_save", || {
        let g = nonnull_mut(grpo, "grpo")?;
        let d = cstr(dir, "dir")?;
        let st = serde_json::json!({ "grpo_step": g.inner.step });
        Ok(dsv3_core::train::checkpoint::save(
            &mut g.inner.trainer,
            Path::new(d),
            st,
            dsv3_core::train::checkpoint::Fault::None,
        )?)
    })
}
