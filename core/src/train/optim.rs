//! AdamW with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`:
//! `θ ← θ·(1 − lr·wd)`, then `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `θ ← θ − lr·(m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + eps)`.
use crate::model::train::{TensorView, PIECE};
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
        self.step_scaled(model, grad, lr, None);
    }

    /// [`AdamW::step`] with the gradients first multiplied by `gscale` when given (gradient
    /// clipping), in the same pass; the scaled gradients are written back to `grad`. Per element
    /// the arithmetic is exactly `g *= gscale` followed by [`AdamW::step`]'s. Tensors are split
    /// into pieces updated in parallel on the rayon pool under `std`.
    pub fn step_scaled(&mut self, model: &mut Model, grad: &mut Model, lr: f32, gscale: Option<f32>) {
        let gv = grad.tensor_views();
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
        let pv = model.tensor_views();
        assert!(pv.len() == self.names.len() && gv.len() == pv.len(), "optimizer state belongs to another model");
        let mut pieces: Vec<[TensorView; 4]> = Vec::new();
        let mut decays: Vec<f32> = Vec::new();
        for (i, ((n, p), (_, g))) in pv.iter().zip(&gv).enumerate() {
            assert_eq!(self.names[i], *n, "optimizer state belongs to another model");
            assert!(p.len == g.len && self.m[i].len() == p.len, "optimizer state belongs to another model");
            let decay = if Self::decays(n) { 1.0 - lr * self.weight_decay } else { 1.0 };
            let m = TensorView { ptr: self.m[i].as_mut_ptr(), len: p.len };
            let v = TensorView { ptr: self.v[i].as_mut_ptr(), len: p.len };
            for piece in p.pieces(PIECE).zip(g.pieces(PIECE)).zip(m.pieces(PIECE).zip(v.pieces(PIECE))) {
                let ((p, g), (m, v)) = piece;
                pieces.push([p, g, m, v]);
                decays.push(decay);
            }
        }
        let c = Consts { b1, b2, bc1, bc2, lr, eps: self.eps, bf16: self.bf16_moments, gscale };
        let idx: Vec<usize> = (0..pieces.len()).collect();
        crate::ops::par_map(&idx, usize::MAX, |&k| {
            let [p, g, m, v] = pieces[k];
            // SAFETY: parameters, gradients and moments are distinct allocations borrowed mutably
            // by this call, and the pieces of one tensor are disjoint.
            unsafe { update(p.slice(), g.slice(), m.slice(), v.slice(), decays[k], &c) }
        });
    }
}

/// The scalars of one AdamW step.
struct Consts {
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    lr: f32,
    eps: f32,
    bf16: bool,
    gscale: Option<f32>,
}

/// AdamW on one piece: `g *= gscale`, moments, then the decayed, bias-corrected update.
fn update(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], decay: f32, c: &Consts) {
    if let Some(f) = c.gscale {
        g.iter_mut().for_each(|x| *x *= f);
    }
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        if !c.bf16 && std::is_x86_feature_detected!("avx") {
            // SAFETY: AVX detected; the four slices have the same length.
            return unsafe { avx::update(p, g, m, v, decay, c) };
        }
    }
    let (b1, b2, bc1, bc2, lr, eps) = (c.b1, c.b2, c.bc1, c.bc2, c.lr, c.eps);
    let bf = c.bf16;
    let round = |x: f32| if bf { half::bf16::from_f32(x).to_f32() } else { x };
    for (((p, &g), m), v) in p.iter_mut().zip(g.iter()).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = round(b1 * *m + (1.0 - b1) * g);
        *v = round(b2 * *v + (1.0 - b2) * g * g);
        let mh = *m / bc1;
        let vh = *v / bc2;
        *p = *p * decay - lr * mh / (libm::sqrtf(vh) + eps);
    }
}

/// The f32-moment update, 8 lanes at a time, with the scalar path's operations in its order
/// (IEEE mul/add/div/sqrt, no FMA), so results are bit for bit the same.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod avx {
    use super::Consts;
    use core::arch::x86_64::*;

    #[target_feature(enable = "avx")]
    pub(super) unsafe fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: f32, c: &Consts) {
        let n = p.len();
        assert!(g.len() == n && m.len() == n && v.len() == n);
        let s = _mm256_set1_ps;
        let (b1, b2, ob1, ob2) = (s(c.b1), s(c.b2), s(1.0 - c.b1), s(1.0 - c.b2));
        let (bc1, bc2, lr, eps, dec) = (s(c.bc1), s(c.bc2), s(c.lr), s(c.eps), s(decay));
        let n8 = n & !7;
        let mut j = 0;
        while j < n8 {
            let gv = _mm256_loadu_ps(g.as_ptr().add(j));
            let mv = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m.as_ptr().add(j))), _mm256_mul_ps(ob1, gv));
            let vv = _mm256_add_ps(
                _mm256_mul_ps(b2, _mm256_loadu_ps(v.as_ptr().add(j))),
                _mm256_mul_ps(_mm256_mul_ps(ob2, gv), gv),
            );
            _mm256_storeu_ps(m.as_mut_ptr().add(j), mv);
            _mm256_storeu_ps(v.as_mut_ptr().add(j), vv);
            let mh = _mm256_div_ps(mv, bc1);
            let vh = _mm256_div_ps(vv, bc2);
            let upd = _mm256_div_ps(_mm256_mul_ps(lr, mh), _mm256_add_ps(_mm256_sqrt_ps(vh), eps));
            let pp = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p.as_ptr().add(j)), dec), upd);
            _mm256_storeu_ps(p.as_mut_ptr().add(j), pp);
            j += 8;
        }
        for j in n8..n {
            let gj = g[j];
            m[j] = c.b1 * m[j] + (1.0 - c.b1) * gj;
            v[j] = c.b2 * v[j] + (1.0 - c.b2) * gj * gj;
            let mh = m[j] / c.bc1;
            let vh = v[j] / c.bc2;
            p[j] = p[j] * decay - c.lr * mh / (libm::sqrtf(vh) + c.eps);
        }
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
