//! GRPO (DeepSeekMath, arXiv 2402.03300) with TRL GRPOTrainer's exact loss: group-relative
//! advantages, the per-token clipped surrogate with ε_low / ε_high, the k3 KL to a reference
//! (β), and the aggregations grpo / bnpo / dr_grpo / dapo.
//!
//! - [`loss`]: advantages and the loss over per-token log-probs, with its gradient
//!   `d loss / d logp` — the part that is pure arithmetic (tested on grpo.md's worked example).
//! - `Model::grpo_pass` (in `model/train.rs`'s sibling [`pass`]): log-probs of the rollout tokens
//!   from the policy (logits divided by the sampling temperature), the loss, and its gradient
//!   through the whole model.
//! - [`reward`]: rule rewards (accuracy with `\\boxed{}` / `<answer>` extraction, R1 format,
//!   language consistency, exact match) behind a [`reward::Reward`] trait.
//! - [`trainer`]: the loop — G samples per prompt, rewards, μ optimizer steps with stored old
//!   log-probs, the reference model and its periodic reset, TRL's metrics.
//! - [`rejection`]: rejection sampling (keep the completions a reward marks correct) to build
//!   SFT data, as R1 distilled its students.
pub mod loss;
pub mod pass;
pub mod rejection;
pub mod reward;
pub mod trainer;

pub use loss::{advantages, grpo_loss, GrpoConfig, GrpoOutput, LossType, ScaleRewards};
pub use trainer::{GrpoMetrics, GrpoTrainConfig, GrpoTrainer, Prompt, RolloutBatch};
