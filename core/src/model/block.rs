//! The decoder layer: `h += Attn(norm(h)); h += FFN(norm(h))`, FFN dense or MoE.
use crate::config::Config;
use crate::error::Result;
use crate::infer::cache::LayerCache;
use crate::model::linear::Fp8Mode;
use crate::model::mla::{AttnForm, Mla};
use crate::model::mlp::Mlp;
use crate::model::moe::Moe;
use crate::model::Batch;
use crate::ops::norm::rmsnorm;
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
