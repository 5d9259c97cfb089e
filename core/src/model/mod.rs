//! The DeepSeek-V3/V2 model: weights and the forward pass on CPU in f32.
//!
//! - [`linear`]: `Linear` over f32 or FP8-with-block-scales weights.
//! - [`mla`]: Multi-head Latent Attention (naive and absorbed forms).
//! - [`mlp`], [`moe`]: SwiGLU MLP; router + routed/shared experts.
//! - [`block`]: the decoder layer. [`mtp`]: the Multi-Token Prediction module.
//!
//! Shapes: `N` rows = all new tokens of a batch of sequences, `D` = hidden size, `V` = vocab.
pub mod block;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod mtp;
pub mod train;

use crate::config::Config;
use crate::error::{ierr, Result};
use crate::infer::cache::{LayerCache, SeqCache};
use crate::ops::norm::rmsnorm_inplace;
use crate::ops::rope::Rope;
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use block::Block;
use core::ops::Range;
pub use linear::{Fp8Mode, Linear};
pub use mla::AttnForm;
use mtp::Mtp;

/// Options for building a [`Model`] from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep FP8 weights as FP8 (default) or dequantize them at load.
    pub fp8: Fp8Mode,
    /// Load the MTP modules when the checkpoint has them (default true).
    pub load_mtp: bool,
    /// MLA formulation used by the forward pass (default absorbed).
    pub attn: AttnForm,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { fp8: Fp8Mode::Keep, load_mtp: true, attn: AttnForm::Absorbed }
    }
}

/// The rows of one forward call: which rows belong to which sequence, their positions, and
/// the RoPE cos/sin for each row.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Rows `[start, end)` of each sequence, in order and contiguous.
    pub seqs: Vec<Range<usize>>,
    /// `[N]` absolute position of each row.
    pub pos: Vec<usize>,
    /// `[N, dr/2]` cosines (times the YaRN attention factor).
    pub cos: Vec<f32>,
    /// `[N, dr/2]` sines.
    pub sin: Vec<f32>,
}

impl Batch {
    /// Rows for sequences given as `(first position, number of new tokens)`.
    pub fn new(rope: &Rope, spans: &[(usize, usize)]) -> Batch {
        let half = rope.dim / 2;
        let mut seqs = Vec::with_capacity(spans.len());
        let mut pos = Vec::new();
        for &(p0, len) in spans {
            seqs.push(pos.len()..pos.len() + len);
            pos.extend(p0..p0 + len);
        }
        let mut cos = vec![0f32; pos.len() * half];
        let mut sin = vec![0f32; pos.len() * half];
        for (i, &p) in pos.iter().enumerate() {
            rope.cos_sin(p, &mut cos[i * half..(i + 1) * half], &mut sin[i * half..(i + 1) * half]);
        }
        Batch { seqs, pos, cos, sin }
    }
    /// Total rows.
    pub fn rows(&self) -> usize {
        self.pos.len()
    }
}

/// A loaded model.
#[derive(Clone)]
pub struct Model {
    pub cfg: Config,
    /// `[V, D]`.
    pub embed: Vec<f32>,
    pub layers: Vec<Block>,
    /// `model.norm.weight` `[D]`.
    pub norm: Vec<f32>,
    /// `[V, D]`.
    pub lm_head: Linear,
    pub mtp: Vec<Mtp>,
    pub rope: Rope,
    /// MLA formulation used by [`Model::forward_hidden`].
    pub attn: AttnForm,
}

impl core::fmt::Debug for Model {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Model")
            .field("model_type", &self.cfg.model_type)
            .field("layers", &self.layers.len())
            .field("mtp", &self.mtp.len())
            .field("params", &self.params())
            .field("attn", &self.attn)
            .finish()
    }
}

impl Model {
    /// A randomly initialized model of `cfg` (normal(0, `std`) weights, unit norms, as
    /// [`crate::weights::init::random_checkpoint`] writes them).
    pub fn random(cfg: Config, seed: u64, std: f32) -> Result<Model> {
        let tensors = crate::weights::init::random_checkpoint(&cfg, seed, std);
        let mut store = TensorStore::new();
        store.add_bytes(crate::weights::write::to_bytes(&tensors)?, "<random init>")?;
        Model::from_store(cfg, store, LoadOptions::default())
    }

    /// Builds the model from a checkpoint's tensors. Every tensor must be used: a missing,
    /// extra, mis-shaped or non-finite tensor is an error naming it.
    pub fn from_store(cfg: Config, store: TensorStore, opts: LoadOptions) -> Result<Model> {
        Self::from_store_with_progress(cfg, store, opts, &mut |_, _| true)
    }

    /// [`Model::from_store`] calling `progress(done, total)` after each layer; returning false
    /// cancels the load ([`crate::Error::Cancelled`]).
    pub fn from_store_with_progress(
        cfg: Config,
        mut store: TensorStore,
        opts: LoadOptions,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Model> {
        let (v, d, l) = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers);
        let total = l + 2;
        let cancelled = || crate::Error::Cancelled("model load stopped by the progress callback".into());
        if !progress(0, total) {
            return Err(cancelled());
        }
        let embed = store.take_f32("model.embed_tokens.weight", &[v, d])?;
        let mut layers = Vec::with_capacity(l);
        for i in 0..l {
            layers.push(Block::load(&mut store, i, &cfg, opts.fp8)?);
            if !progress(i + 1, total) {
                return Err(cancelled());
            }
        }
        let norm = store.take_f32("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
            Linear::from_f32(v, d, embed.clone(), None)
        } else {
            Linear::from_f32(v, d, store.take_f32("lm_head.weight", &[v, d])?, None)
        };
        let mut mtp = Vec::new();
        for k in 0..cfg.num_nextn_predict_layers {
            let idx = l + k;
            let present = store.contains(&format!("model.layers.{idx}.eh_proj.weight"));
            if opts.load_mtp && present {
                mtp.push(Mtp::load(&mut store, idx, &cfg, opts.fp8)?);
            } else {
                // not loaded (or absent): drop its tensors so they are not "unexpected"
                let prefix = format!("model.layers.{idx}.");
                let names: Vec<alloc::string::String> =
                    store.names().filter(|n| n.starts_with(&prefix)).map(Into::into).collect();
                for n in names {
                    let _ = store.take(&n);
                }
            }
        }
        store.expect_empty()?;
        let rope = Rope::new(&cfg);
        if !progress(total, total) {
            return Err(cancelled());
        }
        Ok(Model { cfg, embed, layers, norm, lm_head, mtp, rope, attn: opts.attn })
    }

    /// Loads `dir/config.json` and its safetensors (memory-mapped).
    #[cfg(feature = "std")]
    pub fn load(dir: &std::path::Path, opts: LoadOptions) -> Result<Model> {
        let cfg = crate::weights::file::read_config(dir)?;
        let store = crate::weights::file::open_store(dir)?;
        Model::from_store(cfg, store, opts)
    }

    /// Total parameters (main model, plus MTP modules without their shared embedding/head).
    pub fn params(&self) -> usize {
        self.embed.len()
            + self.layers.iter().map(Block::params).sum::<usize>()
            + self.norm.len()
            + if self.cfg.tie_word_embeddings { 0 } else { self.lm_head.params() }
            + self.mtp.iter().map(Mtp::params).sum::<usize>()
    }

    /// Parameters used per token by the main model (embedding row lookups excluded, head included).
    pub fn active_params(&self) -> usize {
        self.layers.iter().map(Block::active_params).sum::<usize>() + self.norm.len() + self.lm_head.params()
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.weight_bytes();
        let mut b = (self.embed.len() + self.norm.len()) * 4 + lin(&self.lm_head);
        let mut block = |bl: &Block| {
            let mut s = (bl.input_norm.len() + bl.post_norm.len()) * 4;
            let a = &bl.attn;
            s += match &a.q {
                mla::QProj::Lora { a, norm, b } => lin(a) + lin(b) + norm.len() * 4,
                mla::QProj::Plain(l) => lin(l),
            };
            s += lin(&a.kv_a) + lin(&a.kv_b) + lin(&a.o) + a.kv_norm.len() * 4 + (a.w_uk_t.len() + a.w_uv.len()) * 4;
            let mlp = |m: &mlp::Mlp| lin(&m.gate) + lin(&m.up) + lin(&m.down);
            s += match &bl.ffn {
                block::Ffn::Dense(m) => mlp(m),
                block::Ffn::Moe(m) => {
                    m.router.weight.len() * 4
                        + m.experts.iter().map(mlp).sum::<usize>()
                        + m.shared.as_ref().map_or(0, mlp)
                }
            };
            b += s;
        };
        self.layers.iter().for_each(&mut block);
        self.mtp.iter().for_each(|m| block(&m.block));
        b
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.layers.len(), self.mtp.len())
    }

    /// Checks that every id is a valid token.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(t) => Err(ierr(format!("token id {t} is out of range (vocab_size {})", self.cfg.vocab_size))),
            None => Ok(()),
        }
    }

    /// Embedding rows for `tokens`: `[N, D]`.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.cfg.hidden_size;
        let mut x = vec![0f32; tokens.len() * d];
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            row.copy_from_slice(&self.embed[t as usize * d..(t as usize + 1) * d]);
        }
        x
    }

    /// Runs new tokens of several sequences through the main model. `inputs[i]` are the new
    /// tokens of the sequence whose cache is `caches[i]`; they are appended to it. Returns the
    /// final hidden states after `model.norm`, `[N, D]`, rows in input order.
    pub fn forward_hidden(&self, inputs: &[&[u32]], caches: &mut [&mut SeqCache]) -> Result<(Vec<f32>, Batch)> {
        if inputs.len() != caches.len() {
            return Err(ierr(format!("{} inputs but {} caches", inputs.len(), caches.len())));
        }
        for (t, c) in inputs.iter().zip(caches.iter()) {
            self.check_tokens(t)?;
            if c.layers.len() != self.layers.len() {
                return Err(ierr("a cache was made for a different model"));
            }
        }
        let spans: Vec<(usize, usize)> = inputs.iter().zip(caches.iter()).map(|(t, c)| (c.len(), t.len())).collect();
        let batch = Batch::new(&self.rope, &spans);
        let tokens: Vec<u32> = inputs.iter().flat_map(|t| t.iter().copied()).collect();
        let mut x = self.embed_tokens(&tokens);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut lc: Vec<&mut LayerCache> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            layer.forward(&mut x, &batch, &mut lc, self.attn);
        }
        rmsnorm_inplace(&mut x, &self.norm, self.cfg.rms_norm_eps);
        Ok((x, batch))
    }

    /// Logits `[rows, V]` for hidden states `[rows, D]` (post-norm).
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let rows = hidden.len() / self.cfg.hidden_size;
        let mut out = vec![0f32; rows * self.cfg.vocab_size];
        self.lm_head.forward(hidden, rows, &mut out);
        out
    }

    /// The full uncached forward of whole sequences: logits `[Σ T_i, V]`, rows in order.
    pub fn forward(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let mut caches: Vec<SeqCache> = seqs.iter().map(|_| self.new_cache()).collect();
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let (h, _) = self.forward_hidden(seqs, &mut refs)?;
        Ok(self.logits(&h))
    }

    /// MTP module `k` over whole sequences (uncached): for each sequence of length T, the logits
    /// `[T-1, V]` drafting t_{i+2} at positions i = 0..T-2, from the main post-norm hidden states
    /// `hidden` (`[Σ T_i, D]`, as [`Model::forward_hidden`] returns) and tokens t_{i+1}.
    pub fn mtp_logits(&self, k: usize, seqs: &[&[u32]], hidden: &[f32]) -> Result<Vec<f32>> {
        let m = self.mtp.get(k).ok_or_else(|| ierr(format!("the model has no MTP module {k} loaded")))?;
        let d = self.cfg.hidden_size;
        let mut next = Vec::new();
        let mut hrows = Vec::new();
        let mut spans = Vec::new();
        let mut off = 0;
        for s in seqs {
            let t = s.len();
            if t >= 2 {
                next.extend_from_slice(&s[1..]);
                hrows.extend_from_slice(&hidden[off * d..(off + t - 1) * d]);
                spans.push((1, t - 1));
            }
            off += t;
        }
        if hidden.len() != off * d {
            return Err(ierr("hidden states do not match the sequences"));
        }
        let batch = Batch::new(&self.rope, &spans);
        let emb = self.embed_tokens(&next);
        let mut caches: Vec<LayerCache> = spans.iter().map(|_| LayerCache::default()).collect();
        // positions start at 1: HF rotates the MTP block with the position of t_{i+1}
        let mut refs: Vec<&mut LayerCache> = caches.iter_mut().collect();
        let h = m.forward(&emb, &hrows, &batch, &mut refs, self.attn);
        Ok(self.logits(&h))
    }
}
