//! The decoder layer: `h += Attn(norm(h)); h += FFN(norm(h))`, FFN dense or MoE.
use crate::config::Config;
use crate::error::Result;
use crate::infer::cache::LayerCache;
use crate::model::linear::Fp8Mode;
use crate::model::mla::{AttnForm, Mla, MlaSaved};
use crate::model::mlp::{Mlp, MlpSaved};
use crate::model::moe::{Balance, Moe, MoeSaved};
use crate::model::Batch;
use crate::ops::norm::{rmsnorm, rmsnorm_backward};
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;

/// The feed-forward part of a layer.
#[derive(Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// One decoder layer.
#[derive(Clone)]
pub struct Block {
    pub input_norm: alloc::vec::Vec<f32>,
    pub attn: Mla,
    pub post_norm: alloc::vec::Vec<f32>,
    pub ffn: Ffn,
    pub eps: f32,
}

impl Block {
    /// Loads `model.layers.{idx}.*` (MoE or dense by `first_k_dense_replace`).
    pub fn load(store: &mut TensorStore, idx: usize, cfg: &Config, mode: Fp8Mode) -> Result<Block> {
        let p = format!("model.layers.{idx}");
        let d = cfg.hidden_size;
        let input_norm = store.take_f32(&format!("{p}.input_layernorm.weight"), &[d])?;
        let attn = Mla::load(store, &format!("{p}.self_attn"), cfg, mode)?;
        let post_norm = store.take_f32(&format!("{p}.post_attention_layernorm.weight"), &[d])?;
        let ffn = if cfg.is_moe_layer(idx) {
            Ffn::Moe(Moe::load(store, &format!("{p}.mlp"), cfg, mode)?)
        } else {
            let blk = cfg.quantization.map(|q| q.block);
            Ffn::Dense(Mlp::load(store, &format!("{p}.mlp"), d, cfg.intermediate_size, blk, mode)?)
        };
        Ok(Block { input_norm, attn, post_norm, ffn, eps: cfg.rms_norm_eps })
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        let f = match &self.ffn {
            Ffn::Dense(m) => m.params(),
            Ffn::Moe(m) => m.params(),
        };
        self.input_norm.len() + self.attn.params() + self.post_norm.len() + f
    }

    /// Parameters one token uses.
    pub fn active_params(&self) -> usize {
        let f = match &self.ffn {
            Ffn::Dense(m) => m.params(),
            Ffn::Moe(m) => m.active_params(),
        };
        self.input_norm.len() + self.attn.params() + self.post_norm.len() + f
    }

    /// Runs the layer on `x` (`[N, D]`) in place.
    pub fn forward(&self, x: &mut [f32], batch: &Batch, caches: &mut [&mut LayerCache], form: AttnForm) {
        let n = batch.pos.len();
        let mut h = vec![0f32; x.len()];
        let mut o = vec![0f32; x.len()];
        rmsnorm(x, &self.input_norm, self.eps, &mut h);
        self.attn.forward(&h, batch, caches, form, &mut o);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        rmsnorm(x, &self.post_norm, self.eps, &mut h);
        match &self.ffn {
            Ffn::Dense(m) => m.forward(&h, n, &mut o),
            Ffn::Moe(m) => {
                m.forward(&h, n, &mut o);
            }
        }
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
    }
}

/// The feed-forward activations of a layer.
#[derive(Clone)]
pub enum FfnSaved {
    Dense(MlpSaved),
    Moe(MoeSaved),
}

/// Activations a [`Block`] keeps for its backward.
#[derive(Clone)]
pub struct BlockSaved {
    /// Layer input, normed input, mid-layer residual and its norm: all `[N, D]`.
    pub x: alloc::vec::Vec<f32>,
    pub h1: alloc::vec::Vec<f32>,
    pub mid: alloc::vec::Vec<f32>,
    pub h2: alloc::vec::Vec<f32>,
    pub attn: MlaSaved,
    pub ffn: FfnSaved,
}

impl Block {
    /// Training forward over whole sequences, in place on `x` (`[N, D]`).
    pub fn forward_train(&self, x: &mut [f32], batch: &Batch) -> BlockSaved {
        let n = batch.pos.len();
        let x_in = x.to_vec();
        let mut h1 = vec![0f32; x.len()];
        let mut o = vec![0f32; x.len()];
        rmsnorm(x, &self.input_norm, self.eps, &mut h1);
        let attn = self.attn.forward_train(&h1, batch, &mut o);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        let mid = x.to_vec();
        let mut h2 = vec![0f32; x.len()];
        rmsnorm(x, &self.post_norm, self.eps, &mut h2);
        let ffn = match &self.ffn {
            Ffn::Dense(m) => FfnSaved::Dense(m.forward_train(&h2, n, &mut o)),
            Ffn::Moe(m) => FfnSaved::Moe(m.forward_train(&h2, n, &mut o)),
        };
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        BlockSaved { x: x_in, h1, mid, h2, attn, ffn }
    }

    /// Backward: `d` is the gradient of the layer output on entry and of its input on return.
    /// Returns the layer's balance loss (0 for dense layers).
    pub fn backward(&self, batch: &Batch, s: &BlockSaved, d: &mut [f32], grad: &mut Block, bal: &Balance) -> f32 {
        let n = batch.pos.len();
        let mut dh = vec![0f32; d.len()];
        let bal_loss = match (&self.ffn, &s.ffn, &mut grad.ffn) {
            (Ffn::Dense(m), FfnSaved::Dense(sv), Ffn::Dense(g)) => {
                m.backward(&s.h2, n, sv, d, g, &mut dh);
                0.0
            }
            (Ffn::Moe(m), FfnSaved::Moe(sv), Ffn::Moe(g)) => m.backward(&s.h2, n, sv, d, g, &mut dh, bal),
            _ => unreachable!("grad has the model's structure"),
        };
        let mut dn = vec![0f32; d.len()];
        rmsnorm_backward(&s.mid, &self.post_norm, self.eps, &dh, &mut dn, &mut grad.post_norm);
        for (a, b) in d.iter_mut().zip(&dn) {
            *a += b;
        }
        self.attn.backward(&s.h1, batch, &s.attn, d, &mut grad.attn, &mut dh);
        rmsnorm_backward(&s.x, &self.input_norm, self.eps, &dh, &mut dn, &mut grad.input_norm);
        for (a, b) in d.iter_mut().zip(&dn) {
            *a += b;
        }
        bal_loss
    }

    /// Visits the layer's trainable tensors under `prefix` (`model.layers.{i}`).
    pub fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut [f32])) {
        f(&format!("{prefix}.input_layernorm.weight"), &mut self.input_norm);
        self.attn.visit(&format!("{prefix}.self_attn"), f);
        f(&format!("{prefix}.post_attention_layernorm.weight"), &mut self.post_norm);
        match &mut self.ffn {
            Ffn::Dense(m) => m.visit(&format!("{prefix}.mlp"), f),
            Ffn::Moe(m) => m.visit(&format!("{prefix}.mlp"), f),
        }
    }

    /// Converts FP8 weights to f32.
    pub fn make_f32(&mut self) {
        self.attn.make_f32();
        match &mut self.ffn {
            Ffn::Dense(m) => m.make_f32(),
            Ffn::Moe(m) => m.make_f32(),
        }
    }
}
