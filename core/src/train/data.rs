//! Training data: a token stream (pretraining: random windows) or prompt/completion examples
//! (SFT / distillation: the loss counts completion tokens only), drawn with a seeded RNG whose
//! state is saved in checkpoints so a resumed run sees the same batches.
use crate::error::{ierr, Result};
use crate::rng::Rng;
use crate::train::trainer::MicroBatch;
use alloc::format;
use alloc::vec::Vec;

/// What a [`Loader`] draws from.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// One long token stream (documents joined with EOS); batches are random windows.
    Stream(Vec<u32>),
    /// `(prompt, completion)` token pairs; each sequence is `prompt ‖ completion` (truncated).
    Sft(Vec<(Vec<u32>, Vec<u32>)>),
}

impl Dataset {
    /// Tokens from little-endian `u16` (`width` 2) or `u32` (`width` 4) bytes.
    pub fn tokens_from_bytes(bytes: &[u8], width: usize) -> Result<Vec<u32>> {
        if !(width == 2 || width == 4) || !bytes.len().is_multiple_of(width) {
            return Err(ierr(format!(
                "a token file of {width}-byte ids must have a length divisible by {width}, got {}",
                bytes.len()
            )));
        }
        Ok(match width {
            2 => bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            _ => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
    }

    /// Checks every token is below `vocab` and that there is something to train on.
    pub fn validate(&self, vocab: usize, seq_len: usize) -> Result<()> {
        let bad = |t: u32| (t as usize) >= vocab;
        match self {
            Dataset::Stream(t) => {
                if t.len() < seq_len.max(2) {
                    return Err(ierr(format!("the data has {} tokens, fewer than one sequence of {seq_len}", t.len())));
                }
                if let Some(x) = t.iter().find(|&&x| bad(x)) {
                    return Err(ierr(format!("token {x} in the data is outside the vocabulary ({vocab})")));
                }
            }
            Dataset::Sft(ex) => {
                if ex.is_empty() {
                    return Err(ierr("no SFT examples"));
                }
                for (i, (p, c)) in ex.iter().enumerate() {
                    if p.is_empty() || c.is_empty() {
                        return Err(ierr(format!("example {i}: prompt and completion must both have tokens")));
                    }
                    if let Some(x) = p.iter().chain(c).find(|&&x| bad(x)) {
                        return Err(ierr(format!("example {i}: token {x} is outside the vocabulary ({vocab})")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Draws micro-batches of `batch` sequences of at most `seq_len` tokens.
#[derive(Debug, Clone)]
pub struct Loader {
    pub data: Dataset,
    pub seq_len: usize,
    pub batch: usize,
    pub rng: Rng,
}

impl Loader {
    pub fn new(data: Dataset, seq_len: usize, batch: usize, seed: u64) -> Loader {
        Loader { data, seq_len: seq_len.max(2), batch: batch.max(1), rng: Rng::new(seed) }
    }

    /// The next micro-batch.
    pub fn next_batch(&mut self) -> MicroBatch {
        match &self.data {
            Dataset::Stream(t) => {
                let span = t.len().saturating_sub(self.seq_len) as u64 + 1;
                let seqs = (0..self.batch)
                    .map(|_| {
                        let s = self.rng.below(span) as usize;
                        t[s..(s + self.seq_len).min(t.len())].to_vec()
                    })
                    .collect();
                MicroBatch { seqs, mask: None }
            }
            Dataset::Sft(ex) => {
                let mut seqs = Vec::with_capacity(self.batch);
                let mut mask = Vec::new();
                for _ in 0..self.batch {
                    let (p, c) = &ex[self.rng.below(ex.len() as u64) as usize];
                    let (s, m) = sft_sequence(p, c, self.seq_len);
                    seqs.push(s);
                    mask.extend(m);
                }
                MicroBatch { seqs, mask: Some(mask) }
            }
        }
    }
}

/// `prompt ‖ completion` truncated to `max_len`, and the mask of its predicted positions
/// (position i predicts token i+1; it counts when token i+1 belongs to the completion).
pub fn sft_sequence(prompt: &[u32], completion: &[u32], max_len: usize) -> (Vec<u32>, Vec<f32>) {
    let mut s: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    s.truncate(max_len.max(2));
    let mask = (1..s.len()).map(|j| if j >= prompt.len() { 1.0 } else { 0.0 }).collect();
    (s, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sft_mask_marks_completion_targets() {
        let (s, m) = sft_sequence(&[1, 2, 3], &[7, 8], 10);
        assert_eq!(s, [1, 2, 3, 7, 8]);
        assert_eq!(m, [0.0, 0.0, 1.0, 1.0]);
        let (s, m) = sft_sequence(&[1, 2, 3], &[7, 8], 4);
        assert_eq!((s.len(), m), (4, alloc::vec![0.0, 0.0, 1.0]));
    }
    #[test]
    fn loader_is_reproducible_from_its_state() {
        let mut a = Loader::new(Dataset::Stream((0..100).collect()), 8, 3, 5);
        a.next_batch();
        let mut b = a.clone();
        b.rng = Rng::from_state(a.rng.state());
        assert_eq!(a.next_batch().seqs, b.next_batch().seqs);
        assert!(Dataset::tokens_from_bytes(&[1, 0, 2], 2).is_err());
        assert_eq!(Dataset::tokens_from_bytes(&[1, 0, 2, 0], 2).unwrap(), [1, 2]);
        assert!(Dataset::Stream(alloc::vec![1, 2, 300]).validate(259, 2).is_err());
    }
}
