//! AdamW with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`:
//! `θ ← θ·(1 − lr·wd)`, then `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `θ ← θ − lr·(m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + eps)`.
use crate::model::Model;
use alloc::string::String;
use alloc::vec::Vec;

/// AdamW hyper-parameters and state (moments in f32, in [`Model::visit`] order).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken.
    pub t: u64,
    /// First and second moments, one per trainable tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// The tensor names the moments belong to (checked on every step).
    pub names: Vec<String>,
    /// Keep the moments in bf16 (rounded after every update), as DeepSeek-V3 does.
    pub bf16_moments: bool,
}

impl AdamW {
    /// DeepSeek-V3's settings: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    pub fn deepseek_v3() -> AdamW {
        AdamW::new(0.9, 0.95, 1e-8, 0.1)
    }

    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: Vec::new(),
            v: Vec::new(),
            names: Vec::new(),
            bf16_moments: false,
        }
    }

    /// Whether a tensor gets weight decay: matrices (and embeddings), not norms or biases.
    pub fn decays(name: &str) -> bool {
        name.ends_with(".weight") && !name.contains("norm")
    }

    /// One update of `model` with gradients `grad` (same structure) at learning rate `lr`.
    pub fn step(&mut self, model: &mut Model, grad: &mut Model, lr: f32) {
        let mut grads: Vec<&[f32]> = Vec::new();
        // collect gradient slices in visit order (the borrow ends with this block)
        let mut gcopy: Vec<Vec<f32>> = Vec::new();
        grad.visit(&mut |_, g| gcopy.push(g.to_vec()));
        grads.extend(gcopy.iter().map(|g| &g[..]));
        if self.m.is_empty() {
            model.visit(&mut |n, p| {
                self.names.push(String::from(n));
                self.m.push(alloc::vec![0.0; p.len()]);
                self.v.push(alloc::vec![0.0; p.len()]);
            });
        }
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - libm::powf(b1, self.t as f32);
        let bc2 = 1.0 - libm::powf(b2, self.t as f32);
        let mut i = 0;
        let (m_all, v_all, names, eps, wd) = (&mut self.m, &mut self.v, &self.names, self.eps, self.weight_decay);
        let bf = self.bf16_moments;
        let round = |x: f32| if bf { half::bf16::from_f32(x).to_f32() } else { x };
        model.visit(&mut |n, p| {
            assert_eq!(names[i], n, "optimizer state belongs to another model");
            let (m, v, g) = (&mut m_all[i], &mut v_all[i], grads[i]);
            let decay = if Self::decays(n) { 1.0 - lr * wd } else { 1.0 };
            for j in 0..p.len() {
                m[j] = round(b1 * m[j] + (1.0 - b1) * g[j]);
                v[j] = round(b2 * v[j] + (1.0 - b2) * g[j] * g[j]);
                let mh = m[j] / bc1;
                let vh = v[j] / bc2;
                p[j] = p[j] * decay - lr * mh / (libm::sqrtf(vh) + eps);
            }
            i += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn first_step_moves_each_weight_by_lr() {
        // with bias correction the first Adam step is lr·sign(g) (up to eps)
        let m = 0.3f32;
        let g = -2.0f32;
        let (b1, b2) = (0.9f32, 0.95f32);
        let mh = ((1.0 - b1) * g) / (1.0 - b1);
        let vh = ((1.0 - b2) * g * g) / (1.0 - b2);
        let upd = m - 0.01 * mh / (vh.sqrt() + 1e-8);
        assert!((upd - (m + 0.01)).abs() < 1e-6);
        assert!(AdamW::decays("model.layers.0.mlp.gate_proj.weight"));
        assert!(!AdamW::decays("model.layers.0.input_layernorm.weight"));
        assert!(!AdamW::decays("model.layers.0.self_attn.o_proj.bias"));
    }
}
