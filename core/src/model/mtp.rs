//! Multi-Token Prediction module (`num_nextn_predict_layers`, stored at layer index L + k).
//!
//! At position i, drafting token t_{i+2}: `u = eh_proj · [enorm(Emb(t_{i+1})) ‖ hnorm(h_i)]`
//! (embedding first), `u' = Block(u)` (causal, its own cache, positions of t_{i+1}), and
//! `logits = lm_head(RMSNorm(u'; shared_head.norm))`. `h_i` is the main model's final hidden
//! state after `model.norm`. Embedding and head are shared with the main model.
use crate::config::Config;
use crate::error::Result;
use crate::infer::cache::LayerCache;
use crate::model::block::{Block, BlockSaved};
use crate::model::linear::{Fp8Mode, Linear};
use crate::model::mla::AttnForm;
use crate::model::moe::Balance;
use crate::model::Batch;
use crate::ops::norm::{rmsnorm, rmsnorm_backward};
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// One MTP module.
#[derive(Clone)]
pub struct Mtp {
    pub enorm: Vec<f32>,
    pub hnorm: Vec<f32>,
    /// `[D, 2D]`.
    pub eh_proj: Linear,
    pub block: Block,
    /// `shared_head.norm.weight` `[D]`.
    pub head_norm: Vec<f32>,
    pub eps: f32,
}

impl Mtp {
    /// Loads `model.layers.{idx}.*`. The checkpoint's copies of the embedding and head
    /// (`embed_tokens.weight`, `shared_head.head.weight`) are shared with the main model and
    /// only shape-checked.
    pub fn load(store: &mut TensorStore, idx: usize, cfg: &Config, mode: Fp8Mode) -> Result<Mtp> {
        let p = format!("model.layers.{idx}");
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        for copy in ["embed_tokens.weight", "shared_head.head.weight"] {
            let name = format!("{p}.{copy}");
            if store.contains(&name) {
                store.take(&name)?.expect_shape(&[v, d])?;
            }
        }
        Ok(Mtp {
            enorm: store.take_f32(&format!("{p}.enorm.weight"), &[d])?,
            hnorm: store.take_f32(&format!("{p}.hnorm.weight"), &[d])?,
            eh_proj: Linear::load(store, &format!("{p}.eh_proj"), d, 2 * d, false, None, mode)?,
            block: Block::load(store, idx, cfg, mode)?,
            head_norm: store.take_f32(&format!("{p}.shared_head.norm.weight"), &[d])?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Number of parameters (without the shared embedding and head).
    pub fn params(&self) -> usize {
        self.enorm.len() + self.hnorm.len() + self.eh_proj.params() + self.block.params() + self.head_norm.len()
    }

    /// `emb` (`[N, D]`: embeddings of t_{i+1}) and `hidden` (`[N, D]`: main post-norm h_i)
    /// → the normed MTP hidden state `[N, D]` (feed it to the main `lm_head`).
    pub fn forward(
        &self,
        emb: &[f32],
        hidden: &[f32],
        batch: &Batch,
        caches: &mut [&mut LayerCache],
        form: AttnForm,
    ) -> Vec<f32> {
        let d = self.enorm.len();
        let n = batch.pos.len();
        let mut cat = vec![0f32; n * 2 * d];
        for i in 0..n {
            let row = &mut cat[i * 2 * d..(i + 1) * 2 * d];
            let (a, b) = row.split_at_mut(d);
            rmsnorm(&emb[i * d..(i + 1) * d], &self.enorm, self.eps, a);
            rmsnorm(&hidden[i * d..(i + 1) * d], &self.hnorm, self.eps, b);
        }
        let mut u = vec![0f32; n * d];
        self.eh_proj.forward(&cat, n, &mut u);
        self.block.forward(&mut u, batch, caches, form);
        let mut out = vec![0f32; n * d];
        rmsnorm(&u, &self.head_norm, self.eps, &mut out);
        out
    }
}

impl Mtp {
    /// Visits the module's trainable tensors under `model.layers.{idx}`.
    pub fn visit(&mut self, idx: usize, f: &mut dyn FnMut(&str, &mut [f32])) {
        let p = format!("model.layers.{idx}");
        f(&format!("{p}.enorm.weight"), &mut self.enorm);
        f(&format!("{p}.hnorm.weight"), &mut self.hnorm);
        self.eh_proj.visit(&format!("{p}.eh_proj"), f);
        self.block.visit(&p, f);
        f(&format!("{p}.shared_head.norm.weight"), &mut self.head_norm);
    }
}

/// Activations an [`Mtp`] module keeps for its backward.
pub struct MtpSaved {
    /// `[n, D]` embeddings of the input tokens and the incoming hidden rows.
    pub emb: Vec<f32>,
    pub hin: Vec<f32>,
    /// `[n, 2D]` `[enorm(emb) ‖ hnorm(hin)]`.
    pub cat: Vec<f32>,
    pub block: BlockSaved,
    /// `[n, D]` block output (the next depth's input) and its `shared_head.norm`.
    pub out: Vec<f32>,
    pub normed: Vec<f32>,
}

impl Mtp {
    /// Training forward over whole (shortened) sequences in `batch`.
    pub fn forward_train(&self, emb: Vec<f32>, hin: Vec<f32>, batch: &Batch) -> MtpSaved {
        let d = self.enorm.len();
        let n = batch.pos.len();
        let mut cat = vec![0f32; n * 2 * d];
        for i in 0..n {
            let (a, b) = cat[i * 2 * d..(i + 1) * 2 * d].split_at_mut(d);
            rmsnorm(&emb[i * d..(i + 1) * d], &self.enorm, self.eps, a);
            rmsnorm(&hin[i * d..(i + 1) * d], &self.hnorm, self.eps, b);
        }
        let mut out = vec![0f32; n * d];
        self.eh_proj.forward(&cat, n, &mut out);
        let block = self.block.forward_train(&mut out, batch);
        let mut normed = vec![0f32; n * d];
        rmsnorm(&out, &self.head_norm, self.eps, &mut normed);
        MtpSaved { emb, hin, cat, block, out, normed }
    }

    /// Backward: `dnormed` is the gradient of the head-normed output, `dout` (in/out) that of the
    /// block output from the next depth. Returns `(d emb, d hin)`, both `[n, D]`; parameter
    /// gradients go to `grad`. Also returns the block's balance loss.
    pub fn backward(
        &self,
        batch: &Batch,
        s: &MtpSaved,
        dnormed: &[f32],
        dout: &mut [f32],
        grad: &mut Mtp,
        bal: &Balance,
    ) -> (Vec<f32>, Vec<f32>, f32) {
        let d = self.enorm.len();
        let n = batch.pos.len();
        let mut t = vec![0f32; n * d];
        rmsnorm_backward(&s.out, &self.head_norm, self.eps, dnormed, &mut t, &mut grad.head_norm);
        dout.iter_mut().zip(&t).for_each(|(a, b)| *a += b);
        let bal_loss = self.block.backward(batch, &s.block, dout, &mut grad.block, bal);
        let mut dcat = vec![0f32; n * 2 * d];
        self.eh_proj.backward(&s.cat, n, dout, &mut grad.eh_proj, Some(&mut dcat), false);
        let (mut demb, mut dhin) = (vec![0f32; n * d], vec![0f32; n * d]);
        let (mut den, mut dhn) = (vec![0f32; n * d], vec![0f32; n * d]);
        for i in 0..n {
            den[i * d..(i + 1) * d].copy_from_slice(&dcat[i * 2 * d..i * 2 * d + d]);
            dhn[i * d..(i + 1) * d].copy_from_slice(&dcat[i * 2 * d + d..(i + 1) * 2 * d]);
        }
        rmsnorm_backward(&s.emb, &self.enorm, self.eps, &den, &mut demb, &mut grad.enorm);
        rmsnorm_backward(&s.hin, &self.hnorm, self.eps, &dhn, &mut dhin, &mut grad.hnorm);
        (demb, dhin, bal_loss)
    }
}
