//! GRPO through the model: per-token log-probs of rollout tokens (logits at position t−1
//! divided by the sampling temperature, then log-softmax), TRL's loss, and the gradient of every
//! parameter (accumulated into a gradient model, as [`Model::train_pass`] does).
use crate::error::{ierr, Result};
use crate::grpo::loss::{advantages, grpo_loss, GrpoConfig, GrpoOutput};
use crate::model::moe::Balance;
use crate::model::Model;
use crate::ops::softmax::logsumexp;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// A batch of rollouts: `N` rows of `T` tokens (prompt + completion, right-padded).
pub struct Rollouts<'a> {
    pub ids: &'a [Vec<u32>],
    /// `[N, T]`: 1 where token t is a completion token whose log-prob counts (column 0 is never
    /// counted: nothing predicts it).
    pub mask: &'a [f32],
    pub rewards: &'a [f32],
    pub group_size: usize,
    /// `[N, T]` log-probs at sampling time (None: on-policy, ratio 1).
    pub old_logps: Option<&'a [f32]>,
    /// `[N, T]` log-probs of the frozen reference (None: the policy itself, KL 0).
    pub ref_logps: Option<&'a [f32]>,
}

/// Checks the rollouts' shapes and the temperature; returns `(N, T)`.
pub(crate) fn check(r: &Rollouts, cfg: &GrpoConfig) -> Result<(usize, usize)> {
    let n = r.ids.len();
    let t = r.ids.first().map_or(0, |x| x.len());
    if n == 0 || t < 2 || r.ids.iter().any(|x| x.len() != t) {
        return Err(ierr("rollouts need N >= 1 rows of the same length T >= 2"));
    }
    if r.mask.len() != n * t || r.rewards.len() != n {
        return Err(ierr(format!("rollouts of [{n}, {t}] need a [{n}, {t}] mask and {n} rewards")));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return Err(ierr(format!("temperature must be positive, got {}", cfg.temperature)));
    }
    Ok((n, t))
}

/// The column-0-free loss mask (nothing predicts a row's first token).
pub(crate) fn loss_mask(mask: &[f32], t: usize) -> Vec<f32> {
    mask.iter().enumerate().map(|(k, &m)| if k % t == 0 { 0.0 } else { m }).collect()
}

/// The loss over the whole batch from its policy log-probs `[N, T]`: advantages, the
/// column-0-free mask, TRL's loss (a non-finite loss is an error). Returns the loss and the
/// advantages.
pub(crate) fn batch_loss(r: &Rollouts, logp: &[f32], cfg: &GrpoConfig) -> Result<(GrpoOutput, Vec<f32>)> {
    let t = r.ids[0].len();
    let adv = advantages(r.rewards, r.group_size, cfg.scale_rewards, cfg.std_eps)?;
    let out = grpo_loss(logp, r.old_logps, r.ref_logps, &loss_mask(r.mask, t), &adv, cfg)?;
    if !out.loss.is_finite() {
        return Err(crate::Error::NonFinite(format!("GRPO loss is {}", out.loss)));
    }
    Ok((out, adv))
}

impl Model {
    /// The GRPO loss of `r` under `cfg` and its gradient into `grad`. Returns the loss output and
    /// the advantages.
    pub fn grpo_pass(&self, r: &Rollouts, cfg: &GrpoConfig, grad: &mut Model) -> Result<(GrpoOutput, Vec<f32>)> {
        check(r, cfg)?;
        let sc = self.score_rollouts(r.ids, r.mask, cfg.temperature)?;
        let (out, adv) = batch_loss(r, &sc.logp, cfg)?;
        self.backward_scored(sc, r.ids, &out.dlogp, cfg.temperature, grad);
        Ok((out, adv))
    }

    /// Per-token log-probs `[N, T]` of rollout tokens under this model (logits at t−1 divided
    /// by `temperature`, then log-softmax), computed where `mask` (`[N, T]`) is non-zero and 0
    /// elsewhere; column 0 never counts. The same arithmetic as [`Model::grpo_pass`], so a policy
    /// scoring its own rollouts gives importance ratios of exactly 1.
    pub fn rollout_logps(&self, ids: &[Vec<u32>], mask: &[f32], temperature: f32) -> Result<Vec<f32>> {
        let n = ids.len();
        let t = ids.first().map_or(0, |x| x.len());
        if n == 0 || t < 2 || ids.iter().any(|x| x.len() != t) || mask.len() != n * t {
            return Err(ierr("rollouts need N >= 1 rows of the same length T >= 2 and an [N, T] mask"));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(ierr(format!("temperature must be positive, got {temperature}")));
        }
        Ok(self.score_rollouts(ids, mask, temperature)?.logp)
    }

    /// The training forward over the rollouts and the tempered logits / log-probs of the counted
    /// tokens.
    pub(crate) fn score_rollouts(&self, ids: &[Vec<u32>], mask: &[f32], temperature: f32) -> Result<Scored> {
        let n = ids.len();
        let t = ids[0].len();
        let seqs: Vec<&[u32]> = ids.iter().map(|x| &x[..]).collect();
        let (hidden, trace) = self.train_forward(&seqs)?;
        let d = self.cfg.hidden_size;
        // counted positions: token (row, col) predicted from hidden row (row·T + col − 1)
        let pos: Vec<(usize, usize)> =
            (0..n).flat_map(|i| (1..t).map(move |c| (i, c))).filter(|&(i, c)| mask[i * t + c] != 0.0).collect();
        let rows: Vec<f32> = pos
            .iter()
            .flat_map(|&(i, c)| hidden.normed[(i * t + c - 1) * d..(i * t + c) * d].iter().copied())
            .collect();
        let mut z = self.logits(&rows);
        let v = self.cfg.vocab_size;
        let inv_t = 1.0 / temperature;
        z.iter_mut().for_each(|x| *x *= inv_t);
        let mut logp = vec![0f32; n * t];
        for (k, &(i, c)) in pos.iter().enumerate() {
            let zr = &z[k * v..(k + 1) * v];
            logp[i * t + c] = zr[ids[i][c] as usize] - logsumexp(zr);
        }
        Ok(Scored { hidden, trace, pos, rows, z, logp })
    }

    /// The backward of a scored batch: `dlogp` (`[N, T]`, d loss / d log-prob of each token)
    /// through the tempered log-softmax, the head and the model, accumulated into `grad`.
    pub(crate) fn backward_scored(
        &self,
        sc: Scored,
        ids: &[Vec<u32>],
        dlogp: &[f32],
        temperature: f32,
        grad: &mut Model,
    ) {
        let Scored { hidden, trace, pos, rows, z, .. } = sc;
        let t = ids[0].len();
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let inv_t = 1.0 / temperature;
        // d logp / d z = (onehot − softmax(z/T)) / T
        let mut dz = vec![0f32; z.len()];
        for (k, &(i, c)) in pos.iter().enumerate() {
            let g = dlogp[i * t + c];
            if g == 0.0 {
                continue;
            }
            let zr = &z[k * v..(k + 1) * v];
            let lse = logsumexp(zr);
            for (dv, &zv) in dz[k * v..(k + 1) * v].iter_mut().zip(zr) {
                *dv = -g * crate::ops::fastmath::exp(zv - lse) * inv_t;
            }
            dz[k * v + ids[i][c] as usize] += g * inv_t;
        }
        let mut drows = vec![0f32; rows.len()];
        self.lm_head.backward(&rows, pos.len(), &dz, &mut grad.lm_head, Some(&mut drows), false);
        let mut dnormed = vec![0f32; hidden.normed.len()];
        for (k, &(i, c)) in pos.iter().enumerate() {
            dnormed[(i * t + c - 1) * d..(i * t + c) * d].copy_from_slice(&drows[k * d..(k + 1) * d]);
        }
        let bal = Balance { seqs: trace.batch.seqs.clone(), scale: 1.0, ..Default::default() };
        self.train_backward(&hidden, &trace, &dnormed, grad, &bal);
        self.fold_tied_head_grad(grad);
    }
}

/// What [`Model::score_rollouts`] computes: the training forward, the counted (row, col)
/// positions, their post-norm hidden rows `[P, D]`, tempered logits `[P, V]` and log-probs `[N, T]`.
pub(crate) struct Scored {
    hidden: crate::model::train::Hidden,
    trace: crate::model::train::Trace,
    pos: Vec<(usize, usize)>,
    rows: Vec<f32>,
    z: Vec<f32>,
    pub(crate) logp: Vec<f32>,
}
