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
//!   language consistency) behind a [`reward::Reward`] trait.
pub mod loss;
pub mod pass;
pub mod reward;

pub use loss::{advantages, grpo_loss, GrpoConfig, GrpoOutput, LossType, ScaleRewards};
