//! Advantages and the GRPO loss over per-token log-probs, as TRL computes them
//! (`_calculate_rewards` advantage block and `_compute_loss`; shared/spec/grpo.md §2.4–2.5).
use crate::error::{ierr, Result};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// How rewards are scaled into advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleRewards {
    /// Divide by each group's std (Bessel-corrected) + eps (TRL's default).
    #[default]
    Group,
    /// Divide by the std of the whole batch (the mean stays per group).
    Batch,
    /// No division (Dr. GRPO).
    None,
}

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossType {
    /// Per-sequence token mean, then the mean over sequences (DeepSeekMath eq. 3).
    Grpo,
    /// Token mean over the batch.
    Bnpo,
    /// Sum over tokens / (N · max_completion_length) (Dr. GRPO).
    DrGrpo,
    /// Token mean over the whole generation batch (TRL's default; single process: = bnpo).
    #[default]
    Dapo,
}

impl LossType {
    /// From TRL's names.
    pub fn parse(s: &str) -> Result<LossType> {
        Ok(match s {
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            "dapo" => LossType::Dapo,
            o => return Err(ierr(format!("loss type must be grpo, bnpo, dr_grpo or dapo, got '{o}'"))),
        })
    }
}

/// GRPO hyper-parameters (TRL's names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// Lower clip ε (TRL `epsilon`, 0.2).
    pub epsilon_low: f32,
    /// Upper clip (TRL `epsilon_high`, defaults to `epsilon`; DAPO uses 0.28).
    pub epsilon_high: f32,
    /// KL weight β (TRL default 0.0).
    pub beta: f32,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    /// Added to the std in the advantage denominator (TRL: 1e-4).
    pub std_eps: f32,
    /// Importance ratio per sequence (GSPO) instead of per token.
    pub sequence_level: bool,
    /// dr_grpo's constant normaliser L (None: the most completion tokens in any row).
    pub max_completion_length: Option<usize>,
    /// Sampling temperature: logits are divided by it before log-softmax.
    pub temperature: f32,
    /// TRL's `use_bias_correction_kl` (on by default since TRL 1.10; off in grpo.md and 1.9):
    /// the KL term becomes `β·w·kl` with the (token-level) importance ratio w.
    pub kl_bias_correction: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            std_eps: 1e-4,
            sequence_level: false,
            max_completion_length: None,
            temperature: 1.0,
            kl_bias_correction: false,
        }
    }
}

/// Group-relative advantages of `rewards` (`[N]`, groups of `group_size` contiguous rows):
/// `(r − mean_group) / (std + eps)` with the configured std; NaN rewards give advantage 0.
pub fn advantages(rewards: &[f32], group_size: usize, scale: ScaleRewards, eps: f32) -> Result<Vec<f32>> {
    if group_size < 2 || !rewards.len().is_multiple_of(group_size) {
        return Err(ierr(format!(
            "{} rewards do not split into groups of {group_size} (need >= 2 per group)",
            rewards.len()
        )));
    }
    let nanmean = |v: &[f32]| {
        let (s, n) = v.iter().filter(|x| !x.is_nan()).fold((0f64, 0usize), |(s, n), &x| (s + x as f64, n + 1));
        if n == 0 {
            f64::NAN
        } else {
            s / n as f64
        }
    };
    let nanstd = |v: &[f32]| {
        let m = nanmean(v);
        let xs: Vec<f64> = v.iter().filter(|x| !x.is_nan()).map(|&x| x as f64).collect();
        if xs.len() < 2 {
            return f64::NAN;
        }
        libm::sqrt(xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64)
    };
    let batch_std = nanstd(rewards);
    let mut out = vec![0f32; rewards.len()];
    for (g, grp) in rewards.chunks(group_size).enumerate() {
        let m = nanmean(grp);
        let sd = match scale {
            ScaleRewards::Group => nanstd(grp),
            ScaleRewards::Batch => batch_std,
            ScaleRewards::None => 0.0,
        };
        for (i, &r) in grp.iter().enumerate() {
            let a = match scale {
                ScaleRewards::None => r as f64 - m,
                _ => (r as f64 - m) / (sd + eps as f64),
            };
            out[g * group_size + i] = if a.is_nan() { 0.0 } else { a as f32 };
        }
    }
    Ok(out)
}

/// The loss, its gradient, and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoOutput {
    pub loss: f32,
    /// `d loss / d logp`, `[N, T]` (0 where the mask is 0).
    pub dlogp: Vec<f32>,
    /// Token mean of the k3 KL (0 when β = 0).
    pub kl: f32,
    /// Fractions of counted tokens clipped at 1+ε_high with A > 0, and at 1−ε_low with A < 0.
    pub clip_high: f32,
    pub clip_low: f32,
}

#[allow(clippy::needless_range_loop)] // rows and flat token indices side by side
/// TRL's GRPO loss over `[N, T]` per-token log-probs. `old` / `reference`: `None` means the
/// detached policy log-probs (ratio 1 / KL 0). `mask`: 1 where a token counts.
pub fn grpo_loss(
    logp: &[f32],
    old: Option<&[f32]>,
    reference: Option<&[f32]>,
    mask: &[f32],
    adv: &[f32],
    cfg: &GrpoConfig,
) -> Result<GrpoOutput> {
    let n = adv.len();
    if n == 0 || !logp.len().is_multiple_of(n) || mask.len() != logp.len() {
        return Err(ierr(format!("grpo_loss: {} log-probs, {} mask values for {n} sequences", logp.len(), mask.len())));
    }
    let t = logp.len() / n;
    for (name, v) in [("old_logps", old), ("ref_logps", reference)] {
        if v.is_some_and(|v| v.len() != logp.len()) {
            return Err(ierr(format!("{name} has the wrong shape")));
        }
    }
    let old = |i: usize| old.map_or(logp[i], |o| o[i]);
    let ref_ = |i: usize| reference.map_or(logp[i], |r| r[i]);
    let row_sum = |r: usize| mask[r * t..(r + 1) * t].iter().sum::<f32>();
    let total: f32 = mask.iter().sum();
    let l_max =
        cfg.max_completion_length.unwrap_or_else(|| (0..n).map(|r| row_sum(r) as usize).max().unwrap_or(1)).max(1);
    // per-token loss and d ℓ / d logp
    let (mut ell, mut dell) = (vec![0f32; n * t], vec![0f32; n * t]);
    let (mut kl_sum, mut hi, mut lo) = (0f64, 0f32, 0f32);
    for r in 0..n {
        let a = adv[r];
        // sequence-level ratio (GSPO): w_i = exp(Σ M·Δ / max(Σ M, 1)), shared by the row
        let seq_delta = if cfg.sequence_level {
            let m = row_sum(r).max(1.0);
            Some((r * t..(r + 1) * t).map(|i| mask[i] * (logp[i] - old(i))).sum::<f32>() / m)
        } else {
            None
        };
        for i in r * t..(r + 1) * t {
            if mask[i] == 0.0 {
                continue;
            }
            let w = libm::expf(seq_delta.unwrap_or(logp[i] - old(i)));
            let wc = w.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
            let (u, c) = (w * a, wc * a);
            // −min(w·A, clip(w)·A); the gradient flows through w only when the unclipped branch is the min
            let unclipped = u <= c;
            ell[i] = -u.min(c);
            let dw = if unclipped { -a } else { 0.0 };
            if !unclipped {
                if a > 0.0 {
                    hi += mask[i];
                } else {
                    lo += mask[i];
                }
            }
            // d w / d logp: w for token-level; for sequence-level w depends on the row's mean Δ
            dell[i] = if cfg.sequence_level { 0.0 } else { dw * w };
            if cfg.sequence_level && unclipped {
                // accumulate the shared gradient later
                dell[i] = dw * w / row_sum(r).max(1.0);
            }
            if cfg.beta != 0.0 {
                let x = ref_(i) - logp[i];
                let kl = libm::expf(x) - x - 1.0;
                kl_sum += (mask[i] * kl) as f64;
                // d/dlogp [e^(ref−logp) − (ref−logp) − 1] = −e^x + 1
                let dkl = 1.0 - libm::expf(x);
                if cfg.kl_bias_correction && !cfg.sequence_level {
                    // β·w·kl, w = e^(logp − old) (with its gradient, as TRL)
                    ell[i] += cfg.beta * w * kl;
                    dell[i] += cfg.beta * w * (kl + dkl);
                } else {
                    ell[i] += cfg.beta * kl;
                    dell[i] += cfg.beta * dkl;
                }
            }
        }
        if cfg.sequence_level {
            // every counted token of the row gets the sum of the row's ratio gradients (Σ over tokens of
            // d(ℓ_j)/d w · d w / d logp_i with d w / d logp_i = w·M_i/Σ M)
            let s: f32 = (r * t..(r + 1) * t)
                .filter(|&i| mask[i] != 0.0)
                .map(|i| {
                    let x = ref_(i) - logp[i];
                    dell[i] - if cfg.beta != 0.0 { cfg.beta * (1.0 - libm::expf(x)) } else { 0.0 }
                })
                .sum();
            for i in r * t..(r + 1) * t {
                if mask[i] != 0.0 {
                    let x = ref_(i) - logp[i];
                    let kl_part = if cfg.beta != 0.0 { cfg.beta * (1.0 - libm::expf(x)) } else { 0.0 };
                    dell[i] = s + kl_part;
                }
            }
        }
    }
    // aggregation: loss = Σ_i c_i · M_i·ℓ_i, so d loss / d logp_i = c_i · M_i · dℓ_i
    let coef: Vec<f32> = (0..n)
        .map(|r| match cfg.loss_type {
            LossType::Grpo => 1.0 / (row_sum(r).max(1.0) * n as f32),
            LossType::Bnpo | LossType::Dapo => 1.0 / total.max(1.0),
            LossType::DrGrpo => 1.0 / (n * l_max) as f32,
        })
        .collect();
    let mut loss = 0f64;
    let mut dlogp = vec![0f32; n * t];
    for r in 0..n {
        for i in r * t..(r + 1) * t {
            loss += (coef[r] * mask[i] * ell[i]) as f64;
            dlogp[i] = coef[r] * mask[i] * dell[i];
        }
    }
    let counted = total.max(1.0);
    Ok(GrpoOutput {
        loss: loss as f32,
        dlogp,
        kl: (kl_sum / counted as f64) as f32,
        clip_high: hi / counted,
        clip_low: lo / counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (mask, logp, old, ref, rewards)
    type Example = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    /// shared/spec/grpo.md §2.10: one prompt, G = 4, T = 4.
    fn example() -> Example {
        let mask = [[1., 1., 1., 1.], [1., 1., 0., 0.], [1., 1., 1., 0.], [1., 0., 0., 0.]];
        let logp = [[-0.5, -1.0, -0.2, -2.0], [-0.3, -0.9, 0.0, 0.0], [-1.2, -0.4, -0.7, 0.0], [-0.1, 0.0, 0.0, 0.0]];
        let dold = [[0.1, -0.3, 0.0, 0.25], [-0.05, 0.2, 0.0, 0.0], [0.3, 0.0, -0.1, 0.0], [0.0; 4]];
        let dref = [[0.2, 0.1, -0.1, 0.05], [0.0, -0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.0], [-0.3, 0.0, 0.0, 0.0]];
        let flat = |a: [[f32; 4]; 4]| a.iter().flatten().copied().collect::<Vec<f32>>();
        let (m, l) = (flat(mask), flat(logp));
        let old: Vec<f32> = l.iter().zip(flat(dold)).map(|(a, b)| a + b).collect();
        let reff: Vec<f32> = l.iter().zip(flat(dref)).map(|(a, b)| a + b).collect();
        (m, l, old, reff, vec![1.0, 0.0, 0.5, 0.0])
    }

    #[test]
    fn worked_example_from_the_spec() {
        let (mask, logp, old, reff, r) = example();
        let a = advantages(&r, 4, ScaleRewards::Group, 1e-4).unwrap();
        for (x, y) in a.iter().zip([1.305_31, -0.783_186, 0.261_062, -0.783_186]) {
            assert!((x - y).abs() < 1e-5, "{a:?}");
        }
        let cfg = |lt| GrpoConfig { beta: 0.04, loss_type: lt, max_completion_length: Some(4), ..Default::default() };
        let run = |lt| grpo_loss(&logp, Some(&old), Some(&reff), &mask, &a, &cfg(lt)).unwrap();
        let close = |x: f32, y: f32| (x - y).abs() <= 1e-6 + 1e-5 * y.abs();
        assert!(close(run(LossType::Grpo).loss, 0.00075220), "{}", run(LossType::Grpo).loss);
        assert!(close(run(LossType::Bnpo).loss, -0.35602757));
        assert!(close(run(LossType::Dapo).loss, -0.35602757));
        assert!(close(run(LossType::DrGrpo).loss, -0.22251723));
        let d = run(LossType::Dapo);
        assert!(
            close(d.kl, 0.0107744) && close(d.clip_high, 0.1) && d.clip_low == 0.0,
            "{} {} {}",
            d.kl,
            d.clip_high,
            d.clip_low
        );
        // per-token dℓ/dlogp of row 0 = dapo gradient × N (N = 10 tokens)
        for (x, y) in d.dlogp[..4].iter().zip([-1.189949, -0.004207, -1.301503, -1.018627]) {
            assert!(close(x * 10.0, y), "{:?}", &d.dlogp[..4]);
        }
        // grpo: the same per-token gradient divided by |o_i|·G
        let g = run(LossType::Grpo);
        assert!(close(g.dlogp[0] * 16.0, -1.189949));
        // TRL >= 1.10's default (KL bias correction): grpo.json records 0.00073130 for this example
        let kbc = GrpoConfig { beta: 0.04, loss_type: LossType::Grpo, kl_bias_correction: true, ..Default::default() };
        let l = grpo_loss(&logp, Some(&old), Some(&reff), &mask, &a, &kbc).unwrap().loss;
        assert!(close(l, 0.00073130), "{l}");
        // on-policy, β = 0
        let on = |lt| {
            grpo_loss(
                &logp,
                None,
                None,
                &mask,
                &a,
                &GrpoConfig { loss_type: lt, max_completion_length: Some(4), ..Default::default() },
            )
            .unwrap()
            .loss
        };
        assert!(on(LossType::Grpo).abs() < 1e-6);
        assert!(close(on(LossType::Dapo), -0.36548673));
        assert!(close(on(LossType::DrGrpo), -0.22842921));
    }

    #[test]
    fn finite_differences_of_the_loss() {
        let (mask, logp, old, reff, r) = example();
        let a = advantages(&r, 4, ScaleRewards::Group, 1e-4).unwrap();
        for seq in [false, true] {
            for lt in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo] {
                let cfg = GrpoConfig {
                    beta: 0.04,
                    loss_type: lt,
                    sequence_level: seq,
                    epsilon_high: 0.28,
                    ..Default::default()
                };
                let g = grpo_loss(&logp, Some(&old), Some(&reff), &mask, &a, &cfg).unwrap();
                for i in 0..16 {
                    let mut p = logp.clone();
                    let h = 1e-3;
                    p[i] += h;
                    let up = grpo_loss(&p, Some(&old), Some(&reff), &mask, &a, &cfg).unwrap().loss;
                    p[i] -= 2.0 * h;
                    let dn = grpo_loss(&p, Some(&old), Some(&reff), &mask, &a, &cfg).unwrap().loss;
                    let fd = (up - dn) / (2.0 * h);
                    assert!((fd - g.dlogp[i]).abs() < 2e-3, "{lt:?} seq={seq} token {i}: fd {fd} vs {}", g.dlogp[i]);
                }
            }
        }
    }
}
