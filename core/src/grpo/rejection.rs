//! Rejection sampling for SFT / distillation (R1 §2.3.3): sample several completions per prompt,
//! keep those a reward function scores at or above a threshold (e.g. accuracy = 1), drop exact
//! duplicates within a prompt, and hand the survivors to the SFT path as (prompt, completion)
//! pairs — loss on the completion only ([`crate::train::data::Dataset::Sft`]).
use crate::error::{ierr, Result};
use crate::grpo::reward::Reward;
use crate::grpo::trainer::{sample_completions, GrpoTrainConfig, Prompt};
use crate::model::Model;
use alloc::string::String;
use alloc::vec::Vec;

/// Settings of a rejection-sampling pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectionConfig {
    /// Sampling: `num_generations` per prompt, temperature (`loss.temperature`), top-p/k, the
    /// length cap and stop tokens.
    pub sampling: GrpoTrainConfig,
    /// Keep a completion when the weighted reward sum is >= this.
    pub threshold: f32,
    /// Keep at most this many distinct completions per prompt (0 = all that pass).
    pub max_per_prompt: usize,
    /// Keep only completions that ended with a stop token (not cut at the length cap).
    pub require_stop: bool,
    pub seed: u64,
}

/// A kept sample: which prompt, the completion tokens and text, and its reward.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub prompt: usize,
    pub completion: Vec<u32>,
    pub text: String,
    pub reward: f32,
}

/// Samples from `model` and keeps what `rewards` accepts (see the module docs). Prompts are
/// processed `batch` at a time (one batched generation each).
pub fn rejection_sample(
    model: &Model,
    prompts: &[Prompt],
    rewards: &[(&dyn Reward, f32)],
    decode: &dyn Fn(&[u32]) -> String,
    cfg: &RejectionConfig,
    batch: usize,
) -> Result<Vec<Kept>> {
    if rewards.is_empty() {
        return Err(ierr("rejection sampling needs at least one reward function"));
    }
    let t = cfg.sampling.loss.temperature;
    if !(t.is_finite() && t > 0.0) || cfg.sampling.num_generations == 0 {
        return Err(ierr("rejection sampling needs a positive temperature and at least one sample per prompt"));
    }
    let g = cfg.sampling.num_generations;
    let mut kept = Vec::new();
    for (c, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let seed = cfg.seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let samples = sample_completions(model, chunk, &cfg.sampling, seed)?;
        for (pi, p) in chunk.iter().enumerate() {
            let first = kept.len();
            for (toks, stopped) in &samples[pi * g..(pi + 1) * g] {
                if cfg.require_stop && !stopped {
                    continue;
                }
                if cfg.max_per_prompt > 0 && kept.len() - first >= cfg.max_per_prompt {
                    break;
                }
                if kept[first..].iter().any(|k: &Kept| k.completion == *toks) {
                    continue;
                }
                let text = decode(toks);
                let scores: Vec<f32> = rewards
                    .iter()
                    .filter_map(|(r, w)| r.score(&p.text, &text, p.answer.as_deref()).map(|s| s * w))
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let reward: f32 = scores.iter().sum();
                if reward >= cfg.threshold {
                    kept.push(Kept { prompt: c * batch.max(1) + pi, completion: toks.clone(), text, reward });
                }
            }
        }
    }
    Ok(kept)
}
