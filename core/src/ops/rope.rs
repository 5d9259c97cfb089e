//! Rotary position embedding on the `qk_rope_head_dim` dims, with YaRN.
//!
//! Follows HF transformers (`_compute_default_rope_parameters`, `_compute_yarn_parameters`):
//! `inv_freq` in f32, `angle = f32(pos) · inv_freq` as an f32 product, `cos/sin · attention_factor`.
//! Rotation takes the checkpoint's interleaved pairs `(x[2i], x[2i+1])` and writes the result
//! de-interleaved (all real parts, then all imaginary parts), as HF's `rope_interleave=True` path
//! does. q and k get the same permutation, so `q·k` equals DeepSeek's complex form.
use crate::config::{Config, RopeScaling};
use alloc::vec::Vec;

/// YaRN magnitude term `m(s, k) = 0.1·k·ln(s) + 1` (1 when s ≤ 1).
pub fn yarn_mscale(scale: f64, k: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * k * libm::log(scale) + 1.0
    }
}

/// RoPE tables for one model: `dim` rotated dims, `dim/2` frequencies.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[dim/2]` inverse frequencies (f32, as HF computes them).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's `attention_factor`; 1 for plain RoPE).
    pub attention_factor: f32,
    pub dim: usize,
}

impl Rope {
    /// Builds the tables from a config's `rope_theta`, `rope_scaling` and `qk_rope_head_dim`.
    pub fn new(cfg: &Config) -> Rope {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // pos_freqs[i] = base^(2i/dim), exponent in f32, result rounded to f32.
        let pos_freqs: Vec<f32> =
            (0..half).map(|i| libm::pow(base, ((2 * i) as f32 / dim as f32) as f64) as f32).collect();
        match cfg.rope_scaling {
            RopeScaling::None => {
                Rope { inv_freq: pos_freqs.iter().map(|&p| 1.0 / p).collect(), attention_factor: 1.0, dim }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: lo,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
            } => {
                let corr =
                    |r: f64| (dim as f64 * libm::log(lo / (r * 2.0 * core::f64::consts::PI))) / (2.0 * libm::log(base));
                let low = libm::floor(corr(beta_fast)).max(0.0);
                let mut high = libm::ceil(corr(beta_slow)).min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let (low, high) = (low as f32, high as f32);
                let fs = factor as f32;
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrap_factor = 1.0 - ramp;
                        let interp = 1.0 / (fs * p);
                        let extrap = 1.0 / p;
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect();
                let attention_factor = if mscale != 0.0 && mscale_all_dim != 0.0 {
                    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                } else {
                    yarn_mscale(factor, 1.0)
                };
                Rope { inv_freq, attention_factor: attention_factor as f32, dim }
            }
        }
    }

    /// Writes `cos` and `sin` (each `[dim/2]`) for position `pos`.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (p * f) as f64;
            *c = libm::cos(a) as f32 * self.attention_factor;
            *s = libm::sin(a) as f32 * self.attention_factor;
        }
    }

    /// Rotates `x` (`[dim]`, interleaved pairs) in place; the result is de-interleaved.
    /// `cos`/`sin` come from [`Rope::cos_sin`]; `tmp` is scratch of length `dim`.
    pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32], tmp: &mut [f32]) {
        let h = cos.len();
        debug_assert!(x.len() == 2 * h && tmp.len() >= 2 * h);
        tmp[..2 * h].copy_from_slice(x);
        for i in 0..h {
            let (e, o) = (tmp[2 * i], tmp[2 * i + 1]);
            x[i] = e * cos[i] - o * sin[i];
            x[h + i] = o * cos[i] + e * sin[i];
        }
    }

    /// Backward of [`Rope::apply`]: `dx = Rᵀ·dout` (dout de-interleaved, dx interleaved), in place.
    pub fn apply_backward(d: &mut [f32], cos: &[f32], sin: &[f32], tmp: &mut [f32]) {
        let h = cos.len();
        tmp[..2 * h].copy_from_slice(d);
        for i in 0..h {
            let (dre, dim) = (tmp[i], tmp[h + i]);
            d[2 * i] = dre * cos[i] + dim * sin[i];
            d[2 * i + 1] = dim * cos[i] - dre * sin[i];
        }
    }
}

/// The attention softmax scale: `dq^-0.5`, times `m(factor, mscale_all_dim)²` under YaRN
/// when `mscale_all_dim` is non-zero (HF `yarn_apply_mscale`).
pub fn softmax_scale(cfg: &Config) -> f32 {
    let mut s = 1.0 / libm::sqrt(cfg.qk_head_dim() as f64);
    if let RopeScaling::Yarn { factor, mscale_all_dim, .. } = cfg.rope_scaling {
        if mscale_all_dim != 0.0 {
            let m = yarn_mscale(factor, mscale_all_dim);
            s *= m * m;
        }
    }
    s as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_like(scaling: RopeScaling) -> Config {
        let text = r#"{"model_type":"deepseek_v3","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":1,"q_lora_rank":null,"kv_lora_rank":4,"qk_nope_head_dim":128,
            "qk_rope_head_dim":64,"v_head_dim":4,"intermediate_size":8}"#;
        let mut c = Config::from_json_str(text, "test").unwrap();
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn v3_yarn_constants_from_the_spec() {
        let yarn = RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        };
        let c = v3_like(yarn);
        assert!((softmax_scale(&c) - 0.135_233_78).abs() < 1e-7, "{}", softmax_scale(&c));
        let r = Rope::new(&c);
        assert_eq!(r.attention_factor, 1.0);
        // low = 10, high = 23: dims below 10 keep the base frequency, above 23 are divided by 40.
        let base: Vec<f32> = (0..32).map(|i| 1.0 / (10000f64.powf(2.0 * i as f64 / 64.0) as f32)).collect();
        assert!((r.inv_freq[5] - base[5]).abs() <= 1e-7 * base[5]);
        assert!((r.inv_freq[30] - base[30] / 40.0).abs() <= 1e-6 * base[30]);
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity_up_to_layout() {
        let c = v3_like(RopeScaling::None);
        let r = Rope::new(&c);
        let (mut cs, mut sn) = ([0f32; 32], [0f32; 32]);
        r.cos_sin(0, &mut cs, &mut sn);
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 2.0).collect();
        let orig = x.clone();
        let mut tmp = [0f32; 64];
        Rope::apply(&mut x, &cs, &sn, &mut tmp);
        for i in 0..32 {
            assert_eq!(x[i], orig[2 * i]);
            assert_eq!(x[32 + i], orig[2 * i + 1]);
        }
        r.cos_sin(1234, &mut cs, &mut sn);
        let mut y = orig.clone();
        Rope::apply(&mut y, &cs, &sn, &mut tmp);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3 * n0);
    }
}
