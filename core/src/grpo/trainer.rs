//! The GRPO training loop (TRL GRPOTrainer's, single process): sample G completions per prompt
//! from the policy in one batched generation, score them with reward functions, turn rewards
//! into group-relative advantages, then take μ optimizer steps over the batch with the log-probs
//! stored at sampling time as the "old" policy (ratio 1 on the first step, as TRL), the k3 KL to
//! a frozen reference (β > 0), and the reference reset to the policy every K optimizer steps.
//!
//! One step = [`GrpoTrainer::sample`] (generation + rewards, no gradients) then
//! [`GrpoTrainer::learn`] (μ optimizer steps). They are separate so a caller can time sampling
//! and learning, or score completions itself (host reward callbacks).
use crate::error::{ierr, Result};
use crate::grpo::loss::{GrpoConfig, LossType};
use crate::grpo::pass::Rollouts;
use crate::grpo::reward::Reward;
use crate::infer::{generate_grouped, SamplingParams};
use crate::model::Model;
use crate::train::{AdamW, TrainConfig, Trainer};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// GRPO loop settings (TRL's names where they exist).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoTrainConfig {
    /// The loss: ε's, β, loss type, reward scaling, and the sampling temperature (logits are
    /// divided by it for both sampling and log-probs).
    pub loss: GrpoConfig,
    /// G: completions sampled per prompt (TRL `num_generations`, 8).
    pub num_generations: usize,
    /// Longest completion, in tokens (TRL `max_completion_length`, 256); also dr_grpo's
    /// normaliser unless `loss.max_completion_length` says otherwise.
    pub max_completion_length: usize,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// A completion ends after one of these (EOS); it is part of the completion and its loss.
    pub stop_tokens: Vec<u32>,
    /// μ: optimizer steps per generation batch (TRL `num_iterations`, 1).
    pub num_iterations: usize,
    /// Reset the reference to the policy every K optimizer steps (TRL `sync_ref_model` with
    /// `ref_model_sync_steps`); None = frozen for the whole run.
    pub ref_sync_steps: Option<u64>,
    /// Reference ← α·policy + (1−α)·reference at a sync (TRL `ref_model_mixup_alpha`; 1 = reset).
    pub ref_mixup_alpha: f32,
    /// Token filling rows shorter than the batch's longest (never counted).
    pub pad_token: u32,
    /// Seeds the sampler (mixed with the step number).
    pub seed: u64,
}

impl Default for GrpoTrainConfig {
    fn default() -> Self {
        GrpoTrainConfig {
            loss: GrpoConfig { temperature: 1.0, ..Default::default() },
            num_generations: 8,
            max_completion_length: 256,
            top_p: 1.0,
            top_k: 0,
            stop_tokens: Vec::new(),
            num_iterations: 1,
            ref_sync_steps: None,
            ref_mixup_alpha: 1.0,
            pad_token: 0,
            seed: 0,
        }
    }
}

/// A prompt: its tokens, its text (what reward functions see) and its reference answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
    pub answer: Option<String>,
}

/// One generation batch: `N = prompts × G` rows, groups contiguous.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutBatch {
    /// `[N][T]` prompt + completion, right-padded to the longest row.
    pub ids: Vec<Vec<u32>>,
    /// `[N, T]`: 1 on completion tokens.
    pub mask: Vec<f32>,
    /// `[N]`: the weighted sum of the reward functions that apply (NaN when none does).
    pub rewards: Vec<f32>,
    /// `[F][N]`: each reward function's unweighted score (NaN = does not apply).
    pub per_function: Vec<Vec<f32>>,
    /// Reward function names, as in `per_function`.
    pub function_names: Vec<String>,
    /// `[N]`: the sampled completion tokens and their decoded text.
    pub completions: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    /// `[N]`: which prompt each row answers.
    pub prompt_index: Vec<usize>,
    /// `[N]`: whether the completion ended with a stop token (else it hit the length cap).
    pub terminated: Vec<bool>,
    pub group_size: usize,
    /// `[N, T]` log-probs under the policy that sampled (stored when μ > 1).
    pub old_logps: Option<Vec<f32>>,
}

impl RolloutBatch {
    /// Completion tokens generated in all.
    pub fn completion_tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
    }
}

/// Mean and (Bessel-corrected) std of one reward function over the batch, NaNs skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardStat {
    pub name: String,
    pub mean: f32,
    pub std: f32,
}

/// What one GRPO step reports (TRL's logged metrics).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpoMetrics {
    /// Generation batches done before this one.
    pub step: u64,
    /// Loss averaged over the μ optimizer steps.
    pub loss: f32,
    /// Mean and std of the total reward over the batch (TRL `reward`, `reward_std`).
    pub reward: f32,
    pub reward_std: f32,
    pub rewards: Vec<RewardStat>,
    /// Fraction of groups whose rewards are all equal (no learning signal).
    pub frac_reward_zero_std: f32,
    /// Token mean of the k3 KL to the reference (0 when β = 0).
    pub kl: f32,
    /// Fractions of completion tokens clipped below (A < 0), above (A > 0), and either.
    pub clip_ratio_low: f32,
    pub clip_ratio_high: f32,
    pub clip_ratio_region: f32,
    pub completion_length_mean: f32,
    pub completion_length_min: usize,
    pub completion_length_max: usize,
    /// Fraction of completions cut at the length cap (no stop token).
    pub clipped_ratio: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub completion_tokens: usize,
}

/// The GRPO trainer: the policy's [`Trainer`] (AdamW, clipping, schedule), the reference model
/// when β > 0, and the loop settings.
pub struct GrpoTrainer {
    pub trainer: Trainer,
    pub cfg: GrpoTrainConfig,
    /// The frozen reference (present when β > 0).
    pub reference: Option<Model>,
    /// Generation batches done.
    pub step: u64,
    /// Gradient buffers of the data-parallel shards of the learning pass.
    shard_grads: Vec<Model>,
}

impl GrpoTrainer {
    /// Checks the settings; the reference starts as a copy of `model`.
    pub fn new(model: Model, opt: AdamW, train: TrainConfig, cfg: GrpoTrainConfig) -> Result<GrpoTrainer> {
        GrpoTrainer::from_trainer(Trainer::new(model, opt, train), cfg)
    }

    /// Continues from a supervised [`Trainer`] (R1's cold start, then RL): its model and its
    /// optimizer state (AdamW moments) carry over; set `trainer.cfg` (e.g. a new learning-rate
    /// schedule) and `trainer.step` as the RL stage needs before calling.
    pub fn from_trainer(trainer: Trainer, cfg: GrpoTrainConfig) -> Result<GrpoTrainer> {
        if cfg.num_generations < 2 {
            return Err(ierr(format!("GRPO needs at least 2 generations per prompt, got {}", cfg.num_generations)));
        }
        if cfg.num_iterations == 0 || cfg.max_completion_length == 0 {
            return Err(ierr("num_iterations and max_completion_length must be at least 1"));
        }
        let t = cfg.loss.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(ierr(format!("GRPO samples: temperature must be positive, got {t}")));
        }
        if !(0.0..=1.0).contains(&cfg.ref_mixup_alpha) || cfg.ref_sync_steps == Some(0) {
            return Err(ierr("ref_mixup_alpha must be in [0, 1] and ref_sync_steps at least 1"));
        }
        if cfg.pad_token as usize >= trainer.model.cfg.vocab_size {
            return Err(ierr(format!("pad token {} is outside the vocabulary", cfg.pad_token)));
        }
        let reference = (cfg.loss.beta != 0.0).then(|| trainer.model.clone());
        Ok(GrpoTrainer { trainer, cfg, reference, step: 0, shard_grads: Vec::new() })
    }

    /// The policy.
    pub fn model(&self) -> &Model {
        &self.trainer.model
    }

    /// Samples G completions for each prompt in one batched generation and scores them with
    /// `rewards` (function, weight); `decode` turns completion tokens into the text rewards see.
    pub fn sample(
        &self,
        prompts: &[Prompt],
        rewards: &[(&dyn Reward, f32)],
        decode: &dyn Fn(&[u32]) -> String,
    ) -> Result<RolloutBatch> {
        let seed = self.cfg.seed ^ (self.step.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let completions = sample_completions(self.model(), prompts, &self.cfg, seed)?;
        let mut b = self.score(prompts, completions, rewards, decode)?;
        if self.cfg.num_iterations > 1 {
            b.old_logps = Some(self.model().rollout_logps(&b.ids, &b.mask, self.cfg.loss.temperature)?);
        }
        Ok(b)
    }

    /// Builds a batch from given completions (`[prompts × G]`, groups contiguous; each may end
    /// with a stop token) and scores it.
    pub fn score(
        &self,
        prompts: &[Prompt],
        completions: Vec<(Vec<u32>, bool)>,
        rewards: &[(&dyn Reward, f32)],
        decode: &dyn Fn(&[u32]) -> String,
    ) -> Result<RolloutBatch> {
        let g = self.cfg.num_generations;
        if completions.len() != prompts.len() * g {
            return Err(ierr(format!("{} completions for {} prompts × {g}", completions.len(), prompts.len())));
        }
        if rewards.is_empty() {
            return Err(ierr("GRPO needs at least one reward function"));
        }
        let n = completions.len();
        let t = (0..n).map(|i| prompts[i / g].ids.len() + completions[i].0.len()).max().unwrap_or(0).max(2);
        let mut b = RolloutBatch {
            group_size: g,
            function_names: rewards.iter().map(|(r, _)| String::from(r.name())).collect(),
            per_function: vec![Vec::with_capacity(n); rewards.len()],
            ..Default::default()
        };
        b.mask = vec![0f32; n * t];
        for (i, (c, stopped)) in completions.into_iter().enumerate() {
            let p = &prompts[i / g];
            let mut row = p.ids.clone();
            row.extend_from_slice(&c);
            b.mask[i * t + p.ids.len()..i * t + row.len()].fill(1.0);
            row.resize(t, self.cfg.pad_token);
            let text = decode(&c);
            let mut total: Option<f32> = None;
            for (f, (r, w)) in rewards.iter().enumerate() {
                let s = r.score(&p.text, &text, p.answer.as_deref());
                b.per_function[f].push(s.unwrap_or(f32::NAN));
                if let Some(s) = s {
                    if !s.is_finite() {
                        return Err(crate::Error::NonFinite(format!("reward '{}' returned {s}", r.name())));
                    }
                    total = Some(total.unwrap_or(0.0) + w * s);
                }
            }
            b.rewards.push(total.unwrap_or(f32::NAN));
            b.ids.push(row);
            b.completions.push(c);
            b.texts.push(text);
            b.prompt_index.push(i / g);
            b.terminated.push(stopped);
        }
        Ok(b)
    }

    /// μ optimizer steps on `batch` (from [`GrpoTrainer::sample`] of this policy), then the
    /// reference sync when due. Returns the step's metrics.
    pub fn learn(&mut self, batch: &RolloutBatch) -> Result<GrpoMetrics> {
        let loss_cfg = self.loss_config();
        let ref_logps = self.reference_logps(batch)?;
        let mut m = batch_metrics(batch, self.step);
        let mu = self.cfg.num_iterations;
        for _ in 0..mu {
            let out = self.grads(batch, ref_logps.as_deref(), &loss_cfg)?;
            let (gn, lr) = self.trainer.apply_gradients(&[])?;
            let k = mu as f32;
            m.loss += out.loss / k;
            m.kl += out.kl / k;
            m.clip_ratio_low += out.clip_low / k;
            m.clip_ratio_high += out.clip_high / k;
            m.clip_ratio_region += (out.clip_low + out.clip_high) / k;
            m.grad_norm += gn / k;
            m.lr = lr;
            self.sync_reference();
        }
        self.step += 1;
        Ok(m)
    }

    /// The loss settings of a step (dr_grpo's normaliser defaults to the completion cap, as TRL).
    fn loss_config(&self) -> GrpoConfig {
        let mut c = self.cfg.loss.clone();
        if c.loss_type == LossType::DrGrpo && c.max_completion_length.is_none() {
            c.max_completion_length = Some(self.cfg.max_completion_length);
        }
        c
    }

    /// The reference model's log-probs of `batch` (None without a reference, β = 0).
    fn reference_logps(&self, batch: &RolloutBatch) -> Result<Option<Vec<f32>>> {
        match &self.reference {
            Some(r) => Ok(Some(r.rollout_logps(&batch.ids, &batch.mask, self.cfg.loss.temperature)?)),
            None => Ok(None),
        }
    }

    /// The loss of `batch` under the current policy and its gradient, left in
    /// `self.trainer.grad` (no optimizer step) — what one of [`GrpoTrainer::learn`]'s μ steps
    /// computes.
    pub fn gradients(&mut self, batch: &RolloutBatch) -> Result<crate::grpo::GrpoOutput> {
        let cfg = self.loss_config();
        let ref_logps = self.reference_logps(batch)?;
        self.grads(batch, ref_logps.as_deref(), &cfg)
    }

    fn grads(
        &mut self,
        batch: &RolloutBatch,
        ref_logps: Option<&[f32]>,
        cfg: &GrpoConfig,
    ) -> Result<crate::grpo::GrpoOutput> {
        self.trainer.grad.visit(&mut |_, g| g.fill(0.0));
        let r = Rollouts {
            ids: &batch.ids,
            mask: &batch.mask,
            rewards: &batch.rewards,
            group_size: batch.group_size,
            old_logps: batch.old_logps.as_deref(),
            ref_logps,
        };
        self.pass(&r, cfg)
    }

    /// Loss and gradients of `r` into `self.trainer.grad` (zeroed by the caller). With several
    /// worker threads the rows are split into contiguous shards: each shard's forward runs in
    /// parallel, the loss is computed once over the whole batch (its normalisers are global), and
    /// each shard's backward runs in parallel into its own buffer; the buffers are summed in
    /// shard order. Same result as one [`Model::grpo_pass`] up to f32 summation order.
    fn pass(&mut self, r: &Rollouts, cfg: &GrpoConfig) -> Result<crate::grpo::GrpoOutput> {
        let (n, t) = crate::grpo::pass::check(r, cfg)?;
        let k = crate::ops::threads().min(n).max(1);
        if k == 1 {
            return Ok(self.trainer.model.grpo_pass(r, cfg, &mut self.trainer.grad)?.0);
        }
        let per = n.div_ceil(k);
        let shards: Vec<(usize, usize)> = (0..n).step_by(per).map(|s| (s, (s + per).min(n))).collect();
        let model = &self.trainer.model;
        let score =
            |&(a, b): &(usize, usize)| model.score_rollouts(&r.ids[a..b], &r.mask[a * t..b * t], cfg.temperature);
        let scored: Vec<crate::grpo::pass::Scored> =
            crate::ops::par_map(&shards, usize::MAX, score).into_iter().collect::<Result<_>>()?;
        let logp: Vec<f32> = scored.iter().flat_map(|s| s.logp.iter().copied()).collect();
        let (out, _) = crate::grpo::pass::batch_loss(r, &logp, cfg)?;
        while self.shard_grads.len() < shards.len() {
            self.shard_grads.push(self.trainer.model.zeros_like());
        }
        let bufs = &mut self.shard_grads[..shards.len()];
        bufs.iter_mut().for_each(|g| g.visit(&mut |_, x| x.fill(0.0)));
        let jobs: Vec<_> = scored.into_iter().zip(shards.iter()).zip(bufs.iter_mut()).collect();
        let model = &self.trainer.model;
        let run = |((sc, &(a, b)), g): ((crate::grpo::pass::Scored, &(usize, usize)), &mut Model)| {
            model.backward_scored(sc, &r.ids[a..b], &out.dlogp[a * t..b * t], cfg.temperature, g)
        };
        #[cfg(feature = "std")]
        {
            use rayon::prelude::*;
            jobs.into_par_iter().for_each(run);
        }
        #[cfg(not(feature = "std"))]
        jobs.into_iter().for_each(run);
        for b in self.shard_grads[..shards.len()].iter_mut() {
            self.trainer.grad.add_from(b);
        }
        Ok(out)
    }

    /// One GRPO step: [`GrpoTrainer::sample`] then [`GrpoTrainer::learn`].
    pub fn step(
        &mut self,
        prompts: &[Prompt],
        rewards: &[(&dyn Reward, f32)],
        decode: &dyn Fn(&[u32]) -> String,
    ) -> Result<(GrpoMetrics, RolloutBatch)> {
        let b = self.sample(prompts, rewards, decode)?;
        Ok((self.learn(&b)?, b))
    }

    /// Reference ← α·policy + (1−α)·reference when the optimizer step count is a multiple of K.
    fn sync_reference(&mut self) {
        let (Some(k), Some(old)) = (self.cfg.ref_sync_steps, self.reference.as_mut()) else { return };
        if !self.trainer.step.is_multiple_of(k) {
            return;
        }
        let a = self.cfg.ref_mixup_alpha;
        let mut new = self.trainer.model.clone();
        if a < 1.0 {
            let mut prev: Vec<f32> = Vec::new();
            old.visit(&mut |_, t| prev.extend_from_slice(t));
            let mut i = 0;
            new.visit(&mut |_, t| {
                for v in t.iter_mut() {
                    *v = a * *v + (1.0 - a) * prev[i];
                    i += 1;
                }
            });
            new.layers.iter_mut().for_each(|b| b.attn.refresh_absorbed());
        }
        *old = new;
    }
}

/// G completions per prompt (groups contiguous) with the loop's sampling settings: (tokens,
/// ended with a stop token). Each prompt is prefilled once for its G samples.
pub fn sample_completions(
    model: &Model,
    prompts: &[Prompt],
    cfg: &GrpoTrainConfig,
    seed: u64,
) -> Result<Vec<(Vec<u32>, bool)>> {
    if prompts.is_empty() {
        return Err(ierr("a GRPO step needs at least one prompt"));
    }
    let rows: Vec<&[u32]> = prompts.iter().map(|p| &p.ids[..]).collect();
    let params = SamplingParams {
        temperature: cfg.loss.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        seed,
        max_new_tokens: cfg.max_completion_length,
        stop_tokens: cfg.stop_tokens.clone(),
    };
    // each prompt prefilled once, its cache shared by its G samples
    let out = generate_grouped(model, &rows, cfg.num_generations, &params, |_| true)?;
    Ok(out.tokens.into_iter().zip(out.stopped).collect())
}

/// Reward and length statistics of a batch (the loss terms are filled in by `learn`).
fn batch_metrics(b: &RolloutBatch, step: u64) -> GrpoMetrics {
    let stats = |v: &[f32]| -> (f32, f32) {
        let x: Vec<f64> = v.iter().filter(|x| !x.is_nan()).map(|&x| x as f64).collect();
        if x.is_empty() {
            return (f32::NAN, f32::NAN);
        }
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = if x.len() > 1 {
            x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (x.len() - 1) as f64
        } else {
            0.0
        };
        (mean as f32, libm::sqrt(var) as f32)
    };
    let g = b.group_size.max(1);
    let groups: Vec<(f32, f32)> = b.rewards.chunks(g).map(stats).collect();
    let lens: Vec<usize> = b.completions.iter().map(Vec::len).collect();
    let n = lens.len().max(1) as f32;
    GrpoMetrics {
        step,
        reward: stats(&b.rewards).0,
        reward_std: stats(&b.rewards).1,
        rewards: b
            .function_names
            .iter()
            .zip(&b.per_function)
            .map(|(name, v)| {
                let (mean, std) = stats(v);
                RewardStat { name: name.clone(), mean, std }
            })
            .collect(),
        frac_reward_zero_std: groups.iter().filter(|s| s.1 == 0.0).count() as f32 / groups.len().max(1) as f32,
        completion_length_mean: lens.iter().sum::<usize>() as f32 / n,
        completion_length_min: lens.iter().copied().min().unwrap_or(0),
        completion_length_max: lens.iter().copied().max().unwrap_or(0),
        clipped_ratio: b.terminated.iter().filter(|t| !**t).count() as f32 / n,
        completion_tokens: b.completion_tokens(),
        ..Default::default()
    }
}
