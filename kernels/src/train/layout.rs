//! Host bookkeeping of the GPU training pass (no device needed, unit-tested on CPU): where each
//! trainable tensor lives in the parameter arenas ([`ArenaLayout`]) and how a micro-batch's
//! sequences map to rows, targets and attention batches ([`BatchLayout`]).
use dsv3_core::model::Model;
use dsv3_core::{Error, Result};
use std::collections::HashMap;

/// Every tensor starts at a multiple of this many elements in the arenas (256 bytes of f32, 128 of
/// bf16: every operand base is 16-byte aligned for the GEMMs' vector loads).
pub const ALIGN: usize = 64;

/// One trainable tensor's place in the arenas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub off: usize,
    pub len: usize,
    pub decays: bool,
}

/// The trainable tensors of a model in [`Model::visit`] order, each at an aligned offset of one
/// contiguous arena (masters, gradients and bf16 working copies share this layout). With the
/// visit order, expert `e`'s tensors of one MoE layer sit at a uniform stride from expert 0's,
/// which the grouped GEMMs use.
#[derive(Debug, Clone, Default)]
pub struct ArenaLayout {
    pub slots: Vec<Slot>,
    /// Elements of the arena (padding included).
    pub total: usize,
    index: HashMap<String, usize>,
}

impl ArenaLayout {
    /// The layout of `model`'s trainable tensors and the arena's host contents (padding zero).
    /// Needs f32 weights ([`Model::make_trainable`]): an FP8 weight is not visited, and is an error.
    pub fn of(model: &Model) -> Result<(ArenaLayout, Vec<f32>)> {
        let mut m = model.clone();
        let mut lay = ArenaLayout::default();
        let mut host: Vec<f32> = Vec::new();
        m.visit(&mut |name, t| {
            let off = host.len();
            host.extend_from_slice(t);
            host.resize(off + t.len().next_multiple_of(ALIGN), 0.0);
            lay.index.insert(name.to_string(), lay.slots.len());
            lay.slots.push(Slot {
                name: name.to_string(),
                off,
                len: t.len(),
                decays: dsv3_core::train::AdamW::decays(name),
            });
        });
        lay.total = host.len().max(ALIGN);
        host.resize(lay.total, 0.0);
        Ok((lay, host))
    }

    /// The slot named `name`.
    pub fn get(&self, name: &str) -> Result<&Slot> {
        self.index.get(name).map(|&i| &self.slots[i]).ok_or_else(|| {
            Error::Unsupported(format!(
                "GPU training: tensor '{name}' is not trainable in this model (an FP8 weight? call Model::make_trainable)"
            ))
        })
    }

    /// Offset of `name`, checking its length.
    pub fn off(&self, name: &str, len: usize) -> Result<usize> {
        let s = self.get(name)?;
        if s.len != len {
            return Err(Error::Input(format!("GPU training: '{name}' has {} values, expected {len}", s.len)));
        }
        Ok(s.off)
    }

    /// Whether `name` is a trainable tensor.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The offset of `{prefix}.experts.0.{suffix}` and the uniform stride to expert `e`'s
    /// (an error if the experts are not evenly spaced).
    pub fn expert_stride(&self, prefix: &str, suffix: &str, experts: usize, len: usize) -> Result<(usize, usize)> {
        let o0 = self.off(&format!("{prefix}.experts.0.{suffix}"), len)?;
        if experts == 1 {
            return Ok((o0, 0));
        }
        let o1 = self.off(&format!("{prefix}.experts.1.{suffix}"), len)?;
        let st = o1 - o0;
        for e in 2..experts {
            let oe = self.off(&format!("{prefix}.experts.{e}.{suffix}"), len)?;
            if oe != o0 + e * st {
                return Err(Error::Input(format!("GPU training: experts of {prefix} are not evenly spaced")));
            }
        }
        Ok((o0, st))
    }
}

/// For `rows` rows of the previous depth, the index of the row of this depth fed by each (the
/// inverse of `prev`), or `prev.len()` (a zero row) where none is.
pub fn inverse(prev: &[i32], rows: usize) -> Vec<i32> {
    let mut inv = vec![prev.len() as i32; rows];
    for (j, &r) in prev.iter().enumerate() {
        inv[r as usize] = j as i32;
    }
    inv
}

/// Consecutive sequences of one length (their rows contiguous): one attention batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// First row.
    pub row0: usize,
    /// Tokens per sequence.
    pub len: usize,
    /// Sequences.
    pub seqs: usize,
    /// Offset of this run's probabilities in a layer's buffer: `[heads][seqs][len][len]`.
    pub p_off: usize,
}

/// How the sequences of a pass map to rows (as core's `train_pass`: all rows of all sequences in
/// order; a target for every position with a next token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    /// Rows (tokens) in all.
    pub n: usize,
    /// Tokens of each sequence.
    pub lens: Vec<usize>,
    /// `[N]` token ids.
    pub tokens: Vec<i32>,
    /// `[N]` position of each row in its sequence.
    pub pos: Vec<i32>,
    /// `[P]` the row of each predicted position, in order.
    pub target_rows: Vec<i32>,
    /// `[P]` its target token.
    pub targets: Vec<i32>,
    /// `[N]` for each row, its index in the targets, or `P` (no next token: a zero gradient row).
    pub inv: Vec<i32>,
    /// Attention batches.
    pub runs: Vec<Run>,
    /// Elements of one layer's attention probabilities (`Σ heads·seqs·len²`).
    pub p_total: usize,
}

impl BatchLayout {
    /// The layout of `seqs` for a model with `heads` attention heads and `vocab` tokens.
    pub fn new(seqs: &[&[u32]], heads: usize, vocab: usize) -> Result<BatchLayout> {
        let mut b = BatchLayout::default();
        for s in seqs {
            if let Some(t) = s.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::Input(format!("token id {t} is out of range (vocab_size {vocab})")));
            }
            let row0 = b.n;
            for (i, &t) in s.iter().enumerate() {
                b.tokens.push(t as i32);
                b.pos.push(i as i32);
                if i + 1 < s.len() {
                    b.target_rows.push((row0 + i) as i32);
                    b.targets.push(s[i + 1] as i32);
                }
            }
            b.n += s.len();
            b.lens.push(s.len());
            if s.is_empty() {
                continue;
            }
            match b.runs.last_mut() {
                Some(r) if r.len == s.len() && r.row0 + r.seqs * r.len == row0 => r.seqs += 1,
                _ => b.runs.push(Run { row0, len: s.len(), seqs: 1, p_off: 0 }),
            }
        }
        if b.targets.is_empty() {
            return Err(Error::Input("every sequence has fewer than 2 tokens: nothing to predict".into()));
        }
        b.finish(heads)?;
        Ok(b)
    }

    /// The rows of MTP depth `k` (core's `mtp_pass`): for each sequence of length T the rows
    /// i = 0..T−k, input token t_{i+k} at position k+i, target t_{i+k+1} where it exists. Also
    /// returns, for each row, the row of the previous depth feeding it (main rows for k = 1).
    pub fn mtp_level(seqs: &[&[u32]], k: usize, heads: usize) -> Result<(BatchLayout, Vec<i32>)> {
        if k == 0 {
            return Err(Error::Input("MTP depth 0".into()));
        }
        let mut b = BatchLayout::default();
        let mut prev = Vec::new();
        let (mut main_off, mut prev_off) = (0usize, 0usize);
        for s in seqs {
            let t = s.len();
            let nr = t.saturating_sub(k);
            let row0 = b.n;
            for i in 0..nr {
                prev.push((if k == 1 { main_off + i } else { prev_off + i }) as i32);
                b.tokens.push(s[i + k] as i32);
                b.pos.push((k + i) as i32);
                if i + k + 1 < t {
                    b.target_rows.push((row0 + i) as i32);
                    b.targets.push(s[i + k + 1] as i32);
                }
            }
            b.n += nr;
            b.lens.push(nr);
            if nr > 0 {
                match b.runs.last_mut() {
                    Some(r) if r.len == nr && r.row0 + r.seqs * r.len == row0 => r.seqs += 1,
                    _ => b.runs.push(Run { row0, len: nr, seqs: 1, p_off: 0 }),
                }
            }
            main_off += t;
            prev_off += t.saturating_sub(k - 1);
        }
        b.finish(heads)?;
        Ok((b, prev))
    }

    /// The inverse map of targets and the probabilities' offsets.
    fn finish(&mut self, heads: usize) -> Result<()> {
        if i32::try_from(self.n + 1).is_err() {
            return Err(Error::Input(format!("{} tokens in one pass: too many", self.n)));
        }
        let p = self.targets.len();
        self.inv = vec![p as i32; self.n];
        for (i, &r) in self.target_rows.iter().enumerate() {
            self.inv[r as usize] = i as i32;
        }
        for r in &mut self.runs {
            r.p_off = self.p_total;
            self.p_total += heads * r.seqs * r.len * r.len;
        }
        Ok(())
    }

    /// Predicted positions.
    pub fn predicted(&self) -> usize {
        self.targets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_targets_and_runs_of_ragged_sequences() {
        let s: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5, 6], vec![7], vec![], vec![8, 9], vec![1, 2]];
        let refs: Vec<&[u32]> = s.iter().map(|v| &v[..]).collect();
        let b = BatchLayout::new(&refs, 2, 10).unwrap();
        assert_eq!(b.n, 11);
        assert_eq!(b.pos, vec![0, 1, 2, 0, 1, 2, 0, 0, 1, 0, 1]);
        assert_eq!(b.target_rows, vec![0, 1, 3, 4, 7, 9]);
        assert_eq!(b.targets, vec![2, 3, 5, 6, 9, 2]);
        assert_eq!(b.inv, vec![0, 1, 6, 2, 3, 6, 6, 4, 6, 5, 6]);
        assert_eq!(
            b.runs,
            vec![
                Run { row0: 0, len: 3, seqs: 2, p_off: 0 },
                Run { row0: 6, len: 1, seqs: 1, p_off: 36 },
                Run { row0: 7, len: 2, seqs: 2, p_off: 38 },
            ]
        );
        assert_eq!(b.p_total, 38 + 16);
        assert!(BatchLayout::new(&[&[1u32][..], &[][..]], 2, 10).is_err());
        assert!(BatchLayout::new(&[&[1u32, 10][..]], 2, 10).is_err());
    }

    #[test]
    fn mtp_levels_follow_core() {
        let s: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![5, 6], vec![7, 8, 9]];
        let refs: Vec<&[u32]> = s.iter().map(|v| &v[..]).collect();
        let (l1, p1) = BatchLayout::mtp_level(&refs, 1, 1).unwrap();
        assert_eq!(l1.tokens, vec![2, 3, 4, 6, 8, 9]);
        assert_eq!(l1.pos, vec![1, 2, 3, 1, 1, 2]);
        assert_eq!(l1.lens, vec![3, 1, 2]);
        assert_eq!(p1, vec![0, 1, 2, 4, 6, 7]);
        assert_eq!(l1.target_rows, vec![0, 1, 4]);
        assert_eq!(l1.targets, vec![3, 4, 9]);
        assert_eq!(inverse(&p1, 9), vec![0, 1, 2, 6, 3, 6, 4, 5, 6]);
        let (l2, p2) = BatchLayout::mtp_level(&refs, 2, 1).unwrap();
        assert_eq!(l2.tokens, vec![3, 4, 9]);
        assert_eq!(l2.pos, vec![2, 3, 2]);
        assert_eq!(l2.lens, vec![2, 0, 1]);
        // rows of depth 1: sequence 0 at 0..3, sequence 1 at 3, sequence 2 at 4..6
        assert_eq!(p2, vec![0, 1, 4]);
        assert_eq!(l2.targets, vec![4]);
        assert_eq!(l2.target_rows, vec![0]);
        assert_eq!(
            l2.runs,
            vec![Run { row0: 0, len: 2, seqs: 1, p_off: 0 }, Run { row0: 2, len: 1, seqs: 1, p_off: 4 }]
        );
    }

    #[test]
    fn arena_follows_visit_order_aligned_with_evenly_spaced_experts() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v3_group");
        let Ok(mut model) = Model::load(&root, Default::default()) else {
            eprintln!("SKIP arena layout test: fixture v3_group not found");
            return;
        };
        model.make_trainable();
        let (lay, host) = ArenaLayout::of(&model).unwrap();
        let mut names = Vec::new();
        let mut vals: Vec<Vec<f32>> = Vec::new();
        model.clone().visit(&mut |n, t| {
            names.push(n.to_string());
            vals.push(t.to_vec());
        });
        assert_eq!(lay.slots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(), names);
        for (s, v) in lay.slots.iter().zip(&vals) {
            assert_eq!(s.off % ALIGN, 0);
            assert_eq!(&host[s.off..s.off + s.len], &v[..], "{}", s.name);
            assert_eq!(s.decays, dsv3_core::train::AdamW::decays(&s.name));
        }
        let (d, i, e) = (model.cfg.hidden_size, model.cfg.moe_intermediate_size, model.cfg.n_routed_experts);
        let (g0, st) = lay.expert_stride("model.layers.1.mlp", "gate_proj.weight", e, i * d).unwrap();
        let (u0, st2) = lay.expert_stride("model.layers.1.mlp", "up_proj.weight", e, i * d).unwrap();
        assert_eq!(st, st2);
        assert!(u0 > g0 && st >= 3 * i * d);
        assert!(lay.off("model.layers.1.mlp.gate_proj.weight", 1).is_err());
    }
}
