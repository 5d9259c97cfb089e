//! Learning-rate schedules.
use core::f32::consts::PI;

/// A learning-rate schedule over steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant {
        lr: f32,
    },
    /// Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `total` steps.
    WarmupCosine {
        lr: f32,
        min_lr: f32,
        warmup: u64,
        total: u64,
    },
    /// DeepSeek-V3's shape (report §4.2), by fractions of `total` steps: linear warmup, constant
    /// `lr` until `decay_start`, cosine decay to `lr·0.1` by `decay_end`, then two constant tails
    /// (`lr·0.1`, then `lr·0.0333`, V3's 2.2e-4 → 2.2e-5 → 7.3e-6).
    DeepSeekV3 {
        lr: f32,
        warmup: u64,
        total: u64,
    },
}

impl LrSchedule {
    /// Learning rate at `step` (0-based).
    pub fn at(&self, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine { lr, min_lr, warmup, total } => {
                if step < warmup {
                    return lr * (step + 1) as f32 / warmup as f32;
                }
                let span = total.saturating_sub(warmup).max(1);
                let p = ((step - warmup) as f32 / span as f32).min(1.0);
                min_lr + 0.5 * (lr - min_lr) * (1.0 + libm::cosf(PI * p))
            }
            LrSchedule::DeepSeekV3 { lr, warmup, total } => {
                if step < warmup {
                    return lr * (step + 1) as f32 / warmup as f32;
                }
                // V3 token budget 14.8T: constant to 10T, cosine to 14.3T, 2.2e-5 to 14.633T, then 7.3e-6.
                let f = step as f32 / total.max(1) as f32;
                let (c_end, d_end, t1_end) = (10.0 / 14.8, 14.3 / 14.8, 14.633 / 14.8);
                let low = lr * 0.1;
                if f < c_end {
                    lr
                } else if f < d_end {
                    let p = (f - c_end) / (d_end - c_end);
                    low + 0.5 * (lr - low) * (1.0 + libm::cosf(PI * p))
                } else if f < t1_end {
                    low
                } else {
                    lr * (7.3 / 220.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule::*;
    #[test]
    fn shapes() {
        let s = WarmupCosine { lr: 1.0, min_lr: 0.1, warmup: 10, total: 110 };
        assert!((s.at(0) - 0.1).abs() < 1e-6 && (s.at(9) - 1.0).abs() < 1e-6);
        assert!((s.at(60) - 0.55).abs() < 1e-5);
        assert!((s.at(500) - 0.1).abs() < 1e-6);
        let v = DeepSeekV3 { lr: 2.2e-4, warmup: 10, total: 1480 };
        assert!((v.at(500) - 2.2e-4).abs() < 1e-9);
        assert!((v.at(1440) - 2.2e-5).abs() < 1e-9);
        assert!((v.at(1479) - 7.3e-6).abs() < 1e-8);
    }
}
