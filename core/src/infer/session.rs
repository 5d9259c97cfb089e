//! [`Session`]: a model plus one latent KV cache per sequence slot.
use crate::error::{ierr, Result};
use crate::infer::cache::SeqCache;
use crate::model::Model;
use alloc::format;
use alloc::vec::Vec;
use core::ops::Deref;

/// An inference session over `slots` sequences. Each call appends new tokens to the named
/// slots and returns logits; the caches persist between calls. `M` is how the session holds the
/// model: `&Model` in Rust code, `Arc<Model>` across the C ABI.
pub struct Session<M: Deref<Target = Model>> {
    model: M,
    caches: Vec<SeqCache>,
}

impl<M: Deref<Target = Model>> Session<M> {
    /// A session with `slots` empty sequences.
    pub fn new(model: M, slots: usize) -> Session<M> {
        let caches = (0..slots).map(|_| model.new_cache()).collect();
        Session { model, caches }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Number of sequence slots.
    pub fn slots(&self) -> usize {
        self.caches.len()
    }

    /// Tokens cached for slot `s`.
    pub fn len(&self, s: usize) -> usize {
        self.caches.get(s).map_or(0, SeqCache::len)
    }

    /// Whether slot `s` is empty.
    pub fn is_empty(&self, s: usize) -> bool {
        self.len(s) == 0
    }

    /// Bytes of f32 cache held across all slots.
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(|c| c.values() * 4).sum()
    }

    /// Empties slot `s`.
    pub fn reset(&mut self, s: usize) -> Result<()> {
        self.slot(s)?.clear();
        Ok(())
    }

    /// Keeps the first `len` tokens of slot `s` (to rewind, e.g. after a rejected draft).
    pub fn truncate(&mut self, s: usize, len: usize) -> Result<()> {
        let c = self.slot(s)?;
        if len > c.len() {
            return Err(ierr(format!("cannot truncate slot {s} to {len}: it holds {} tokens", c.len())));
        }
        c.truncate(len);
        Ok(())
    }

    /// Makes slot `dst` a copy of slot `src` (its cached prefix), e.g. to sample several
    /// continuations of one prompt prefilled once.
    pub fn fork(&mut self, src: usize, dst: usize) -> Result<()> {
        let c = self.slot(src)?.clone();
        *self.slot(dst)? = c;
        Ok(())
    }

    fn slot(&mut self, s: usize) -> Result<&mut SeqCache> {
        let n = self.caches.len();
        self.caches.get_mut(s).ok_or_else(|| ierr(format!("slot {s} out of range (session has {n})")))
    }

    /// Feeds `(slot, new tokens)` pairs in one batched forward; returns the logits of the
    /// **last** new token of each pair, `[pairs, V]`. Slots must be distinct; empty token
    /// lists are rejected. On error no cache is changed.
    pub fn step(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<f32>> {
        let (h, batch) = self.forward(inputs)?;
        let d = self.model.cfg.hidden_size;
        let mut last = Vec::with_capacity(inputs.len() * d);
        for r in &batch.seqs {
            last.extend_from_slice(&h[(r.end - 1) * d..r.end * d]);
        }
        Ok(self.model.logits(&last))
    }

    /// Like [`Session::step`] but returns the logits of every new token, `[Σ len, V]`.
    pub fn step_all(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<f32>> {
        let (h, _) = self.forward(inputs)?;
        Ok(self.model.logits(&h))
    }

    fn forward(&mut self, inputs: &[(usize, &[u32])]) -> Result<(Vec<f32>, crate::model::Batch)> {
        let n = self.caches.len();
        let mut seen = alloc::vec![false; n];
        for &(s, t) in inputs {
            if s >= n {
                return Err(ierr(format!("slot {s} out of range (session has {n})")));
            }
            if seen[s] {
                return Err(ierr(format!("slot {s} appears twice in one step")));
            }
            if t.is_empty() {
                return Err(ierr(format!("no tokens given for slot {s}")));
            }
            seen[s] = true;
        }
        let toks: Vec<&[u32]> = inputs.iter().map(|p| p.1).collect();
        // disjoint &mut borrows of the chosen slots, in input order
        let mut ptrs: Vec<Option<&mut SeqCache>> = self.caches.iter_mut().map(Some).collect();
        let mut refs: Vec<&mut SeqCache> =
            inputs.iter().map(|&(s, _)| ptrs[s].take().expect("slots are distinct")).collect();
        self.model.forward_hidden(&toks, &mut refs)
    }
}
