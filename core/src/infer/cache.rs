//! The latent KV cache: per layer, per token, the normalized latent `c` (`[C]`) and the
//! rotated rope key `k_pe` (`[dr]`) — `C + dr` values (576 for V3), whichever MLA form runs.
use alloc::vec::Vec;

/// One layer's cache for one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// `[len, C]` latents.
    pub kv: Vec<f32>,
    /// `[len, dr]` rotated rope keys.
    pub pe: Vec<f32>,
    /// Cached tokens.
    pub len: usize,
}

impl LayerCache {
    /// Appends rows of `[C + dr]` values (latent then rope key).
    pub fn append(&mut self, rows: &[f32], c: usize, dr: usize) {
        for r in rows.chunks_exact(c + dr) {
            self.kv.extend_from_slice(&r[..c]);
            self.pe.extend_from_slice(&r[c..]);
            self.len += 1;
        }
    }
    /// Keeps the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let c = self.kv.len() / self.len;
            let dr = self.pe.len() / self.len;
            self.kv.truncate(len * c);
            self.pe.truncate(len * dr);
            self.len = len;
        }
    }
    /// Drops every token.
    pub fn clear(&mut self) {
        self.kv.clear();
        self.pe.clear();
        self.len = 0;
    }
}

/// A whole sequence's cache: one [`LayerCache`] per main layer, plus one per MTP module.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    pub layers: Vec<LayerCache>,
    pub mtp: Vec<LayerCache>,
}

impl SeqCache {
    /// An empty cache for `n_layers` layers and `n_mtp` MTP modules.
    pub fn new(n_layers: usize, n_mtp: usize) -> SeqCache {
        SeqCache {
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
            mtp: (0..n_mtp).map(|_| LayerCache::default()).collect(),
        }
    }
    /// Tokens cached in the main model.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps the first `len` tokens in every layer.
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().chain(self.mtp.iter_mut()).for_each(|l| l.truncate(len));
    }
    /// Drops every token.
    pub fn clear(&mut self) {
        self.layers.iter_mut().chain(self.mtp.iter_mut()).for_each(LayerCache::clear);
    }
    /// f32 values held.
    pub fn values(&self) -> usize {
        self.layers.iter().chain(&self.mtp).map(|l| l.kv.len() + l.pe.len()).sum()
    }
}
