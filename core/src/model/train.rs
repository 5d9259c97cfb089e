//! The model's training pass: forward over whole sequences keeping activations, next-token
//! cross-entropy, and the backward of every layer in reverse order. Gradients live in a
//! [`Model`] of the same shape ([`Model::zeros_like`]); parameters are named as in the checkpoint
//! ([`Model::visit`]).
use crate::error::{ierr, Result};
use crate::model::block::{BlockSaved, Ffn, FfnSaved};
use crate::model::moe::Balance;
use crate::model::{Batch, Linear, Model};
use crate::ops::loss::cross_entropy;
use crate::ops::norm::{rmsnorm, rmsnorm_backward};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// A raw view of one trainable tensor (see [`Model::tensor_views`]).
#[derive(Clone, Copy, Debug)]
pub struct TensorView {
    pub ptr: *mut f32,
    pub len: usize,
}

// SAFETY: a view is only dereferenced (`TensorView::slice`) by code that holds the owning model
// mutably and hands disjoint views to different threads.
unsafe impl Send for TensorView {}
unsafe impl Sync for TensorView {}

/// Elements per piece when tensor-wide element-wise work is split over threads.
pub const PIECE: usize = 1 << 15;

impl TensorView {
    /// The viewed elements.
    ///
    /// # Safety
    /// The owning tensor must be alive and not otherwise borrowed while the slice is used.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self) -> &mut [f32] {
        core::slice::from_raw_parts_mut(self.ptr, self.len)
    }

    /// Consecutive sub-views of at most `n` elements.
    pub fn pieces(self, n: usize) -> impl Iterator<Item = TensorView> {
        (0..self.len.div_ceil(n))
            // SAFETY: offsets stay inside the viewed tensor.
            .map(move |i| TensorView { ptr: unsafe { self.ptr.add(i * n) }, len: n.min(self.len - i * n) })
    }
}

impl Model {
    /// Sets the GEMM precision of every linear layer inside the decoder layers and MTP blocks
    /// (attention projections, dense MLPs, experts, shared experts). The embedding, lm_head,
    /// router, norms, attention core and MTP's eh_proj stay in f32, as DeepSeek-V3 trains.
    pub fn set_precision(&mut self, p: crate::model::linear::Precision) {
        self.for_each_decoder_linear(&mut |l| {
            l.precision = p;
            l.requantize();
        });
    }

    /// Refreshes the cached FP8 weights of the FP8 layers (after an optimizer step).
    pub fn requantize(&mut self) {
        self.for_each_decoder_linear(&mut |l| {
            if l.precision == crate::model::linear::Precision::Fp8 {
                l.requantize()
            }
        });
    }

    /// Every linear layer inside the decoder layers and MTP blocks (not eh_proj, lm_head).
    fn for_each_decoder_linear(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        use crate::model::block::{Block, Ffn};
        use crate::model::mla::QProj;
        let mut set = |b: &mut Block| {
            let a = &mut b.attn;
            match &mut a.q {
                QProj::Lora { a, b, .. } => {
                    f(a);
                    f(b);
                }
                QProj::Plain(l) => f(l),
            }
            for l in [&mut a.kv_a, &mut a.kv_b, &mut a.o] {
                f(l);
            }
            let mut mlp = |m: &mut crate::model::mlp::Mlp| {
                f(&mut m.gate);
                f(&mut m.up);
                f(&mut m.down);
            };
            match &mut b.ffn {
                Ffn::Dense(m) => mlp(m),
                Ffn::Moe(m) => {
                    m.experts.iter_mut().for_each(&mut mlp);
                    if let Some(s) = &mut m.shared {
                        mlp(s);
                    }
                }
            }
        };
        self.layers.iter_mut().for_each(&mut set);
        self.mtp.iter_mut().for_each(|m| set(&mut m.block));
    }

    /// Converts every FP8 weight to f32 (training keeps f32 master weights).
    pub fn make_trainable(&mut self) {
        self.layers.iter_mut().for_each(|b| b.make_f32());
        for m in &mut self.mtp {
            m.eh_proj.make_f32();
            m.block.make_f32();
        }
    }

    /// Visits every trainable tensor with its checkpoint name, in a fixed order: embedding,
    /// layers, final norm, lm_head (unless tied), MTP modules. FP8 weights are skipped (see
    /// [`Model::make_trainable`]); the router correction biases are not trainable.
    pub fn visit(&mut self, f: &mut dyn FnMut(&str, &mut [f32])) {
        f("model.embed_tokens.weight", &mut self.embed);
        for (i, b) in self.layers.iter_mut().enumerate() {
            b.visit(&format!("model.layers.{i}"), f);
        }
        f("model.norm.weight", &mut self.norm);
        if !self.cfg.tie_word_embeddings {
            self.lm_head.visit("lm_head", f);
        }
        let l = self.cfg.num_hidden_layers;
        for (k, m) in self.mtp.iter_mut().enumerate() {
            m.visit(l + k, f);
        }
    }

    /// A model of the same structure with every trainable tensor zero (a gradient buffer).
    pub fn zeros_like(&self) -> Model {
        let mut g = self.clone();
        g.make_trainable();
        g.visit(&mut |_, t| t.fill(0.0));
        g.lm_head.visit("lm_head", &mut |_, t| t.fill(0.0));
        g
    }

    /// Adds `other`'s trainable tensors into `self` (same structure), e.g. to reduce
    /// per-thread gradient buffers.
    pub fn add_from(&mut self, other: &mut Model) {
        let (mine, theirs) = (self.tensor_views(), other.tensor_views());
        assert_eq!(mine.len(), theirs.len(), "add_from: models of different structure");
        let pieces: Vec<(TensorView, TensorView)> = mine
            .iter()
            .zip(&theirs)
            .flat_map(|((_, a), (_, b))| {
                assert_eq!(a.len, b.len, "add_from: tensors of different sizes");
                a.pieces(PIECE).zip(b.pieces(PIECE))
            })
            .collect();
        crate::ops::par_map(&pieces, usize::MAX, |(a, b)| {
            // SAFETY: the views come from two distinct models borrowed mutably for this call;
            // pieces are disjoint.
            let (a, b) = unsafe { (a.slice(), b.slice()) };
            a.iter_mut().zip(b.iter()).for_each(|(x, y)| *x += *y);
        });
    }

    /// Raw views of the trainable tensors in [`Model::visit`] order, with their names, so that
    /// several models' tensors can be walked together (and in parallel). The views stay valid
    /// while `self` is neither moved, dropped nor reshaped; each names a distinct tensor.
    pub fn tensor_views(&mut self) -> Vec<(String, TensorView)> {
        let mut v = Vec::new();
        self.visit(&mut |n, t| v.push((String::from(n), TensorView { ptr: t.as_mut_ptr(), len: t.len() })));
        v
    }

    /// With tied embeddings, moves the head's gradient (accumulated in `grad.lm_head` by a pass)
    /// into the embedding's and clears it, so the next pass into the same buffer does not add it
    /// again (`visit`, and so every zeroing, skips the tied head). No-op when untied.
    pub fn fold_tied_head_grad(&self, grad: &mut Model) {
        if self.cfg.tie_word_embeddings {
            let gl = grad.lm_head.dense();
            grad.embed.iter_mut().zip(&gl).for_each(|(a, b)| *a += b);
            grad.lm_head.visit("lm_head", &mut |_, t| t.fill(0.0));
        }
    }

    /// With tied embeddings, makes the head's weights the embedding's again (after the
    /// optimizer changed the embedding; the head is a copy, see [`Model::logits`]). No-op when
    /// untied.
    pub fn sync_tied_head(&mut self) {
        if self.cfg.tie_word_embeddings {
            let e = self.embed.clone();
            let mut done = false;
            self.lm_head.visit("lm_head", &mut |n, t| {
                if n.ends_with(".weight") && t.len() == e.len() {
                    t.copy_from_slice(&e);
                    done = true;
                }
            });
            if !done {
                let (v, d) = (self.cfg.vocab_size, self.cfg.hidden_size);
                self.lm_head = Linear::from_f32(v, d, e, None);
            }
        }
    }

    /// Names of the main model's trainable tensors (no MTP), in [`Model::visit`] order.
    pub fn main_param_names(&mut self) -> Vec<String> {
        let prefixes: Vec<String> =
            (0..self.mtp.len()).map(|k| format!("model.layers.{}.", self.cfg.num_hidden_layers + k)).collect();
        let mut names = Vec::new();
        self.visit(&mut |n, _| {
            if !prefixes.iter().any(|p| n.starts_with(p.as_str())) {
                names.push(String::from(n));
            }
        });
        names
    }

    /// Mean next-token cross-entropy over all `Σ (T_i − 1)` positions of `seqs`, and its
    /// gradient accumulated into `grad` (from [`Model::zeros_like`]). The model's weights must
    /// be f32 ([`Model::make_trainable`]).
    pub fn loss_and_grads(&self, seqs: &[&[u32]], grad: &mut Model) -> Result<f32> {
        Ok(self.train_pass(seqs, grad, &PassOptions::default())?.ce_loss)
    }

    /// One forward + backward over `seqs` with the options' loss terms; gradients (times
    /// `opts.scale`) accumulate into `grad`.
    pub fn train_pass(&self, seqs: &[&[u32]], grad: &mut Model, opts: &PassOptions) -> Result<PassOutput> {
        let targets: Vec<(usize, u32)> = {
            let mut t = Vec::new();
            let mut off = 0;
            for s in seqs {
                for i in 0..s.len().saturating_sub(1) {
                    t.push((off + i, s[i + 1]));
                }
                off += s.len();
            }
            t
        };
        if targets.is_empty() {
            return Err(ierr("every sequence has fewer than 2 tokens: nothing to predict"));
        }
        let (hidden, trace) = self.train_forward(seqs)?;
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        // logits only where there is a target
        let rows: Vec<f32> =
            targets.iter().flat_map(|&(r, _)| hidden.normed[r * d..(r + 1) * d].iter().copied()).collect();
        let logits = self.logits(&rows);
        let tgt: Vec<u32> = targets.iter().map(|t| t.1).collect();
        let mut dlogits = vec![0f32; logits.len()];
        let loss = cross_entropy(&logits, &tgt, opts.mask.as_deref(), None, &mut dlogits);
        dlogits.iter_mut().for_each(|g| *g *= opts.scale);
        if !loss.is_finite() {
            return Err(crate::Error::NonFinite(format!("loss is {loss}")));
        }
        let mut drows = vec![0f32; rows.len()];
        self.lm_head.backward(&rows, targets.len(), &dlogits, &mut grad.lm_head, Some(&mut drows), false);
        let mut dnormed = vec![0f32; hidden.normed.len()];
        for (i, &(r, _)) in targets.iter().enumerate() {
            dnormed[r * d..(r + 1) * d].copy_from_slice(&drows[i * d..(i + 1) * d]);
        }
        let bal = Balance {
            seqs: trace.batch.seqs.clone(),
            seq_alpha: opts.seq_alpha,
            aux_alpha: opts.aux_alpha,
            scale: opts.scale,
        };
        let (mtp_loss, mtp_bal) = if opts.mtp_lambda > 0.0 && !self.mtp.is_empty() {
            self.mtp_pass(seqs, &hidden.normed, opts, grad, &mut dnormed)?
        } else {
            (0.0, 0.0)
        };
        let balance_loss = self.train_backward(&hidden, &trace, &dnormed, grad, &bal) + mtp_bal;
        self.fold_tied_head_grad(grad);
        let _ = v;
        let loads = trace
            .saved
            .iter()
            .zip(&self.layers)
            .filter_map(|(s, l)| match (&s.ffn, &l.ffn) {
                (FfnSaved::Moe(ms), Ffn::Moe(m)) => Some(m.router.loads(&ms.routes)),
                _ => None,
            })
            .collect();
        Ok(PassOutput { ce_loss: loss, balance_loss, mtp_loss, loads, predicted: targets.len() })
    }

    /// The Multi-Token Prediction loss `λ/D·Σ_k CE_k` (module k predicts t_{i+k+1} from module
    /// k−1's output — the main post-norm hidden state for k = 1 — and the embedding of
    /// t_{i+k}), with its backward: gradients go to the MTP modules, the shared embedding and
    /// head, and `dnormed` (the main model's post-norm hidden states). Returns (MTP loss
    /// (weighted), balance loss of the MTP blocks).
    fn mtp_pass(
        &self,
        seqs: &[&[u32]],
        normed: &[f32],
        opts: &PassOptions,
        grad: &mut Model,
        dnormed: &mut [f32],
    ) -> Result<(f32, f32)> {
        let d = self.cfg.hidden_size;
        let depth = self.mtp.len();
        let mut levels: Vec<MtpLevel> = Vec::new();
        for k in 1..=depth {
            // rows (s, i) for i in 0..T_s−k, fed by row `prev` of the previous level
            let mut lv = MtpLevel::default();
            let mut spans = Vec::new();
            let mut main_off = 0;
            let mut prev_off = 0;
            for s in seqs {
                let t = s.len();
                let n = t.saturating_sub(k);
                for i in 0..n {
                    lv.prev.push(if k == 1 { main_off + i } else { prev_off + i });
                    lv.tokens.push(s[i + k]);
                    if i + k + 1 < t {
                        lv.targets.push((lv.tokens.len() - 1, s[i + k + 1]));
                    }
                }
                spans.push((k, n));
                main_off += t;
                prev_off += t.saturating_sub(k - 1);
            }
            lv.batch = Batch::new(&self.rope, &spans);
            let hin: Vec<f32> = lv
                .prev
                .iter()
                .flat_map(|&r| {
                    if k == 1 {
                        &normed[r * d..(r + 1) * d]
                    } else {
                        &levels[k - 2].saved.as_ref().unwrap().out[r * d..(r + 1) * d]
                    }
                })
                .copied()
                .collect();
            let emb = self.embed_tokens(&lv.tokens);
            lv.saved = Some(self.mtp[k - 1].forward_train(emb, hin, &lv.batch));
            levels.push(lv);
        }
        let (mut total, mut bal_total) = (0f32, 0f32);
        let mut dnext: Option<(Vec<f32>, Vec<usize>)> = None; // d hin of level k+1, by its rows
        for k in (1..=depth).rev() {
            let lv = &levels[k - 1];
            let sv = lv.saved.as_ref().unwrap();
            let n = lv.tokens.len();
            let mut dnorm = vec![0f32; n * d];
            if !lv.targets.is_empty() {
                let rows: Vec<f32> =
                    lv.targets.iter().flat_map(|&(r, _)| sv.normed[r * d..(r + 1) * d].iter().copied()).collect();
                let logits = self.logits(&rows);
                let tgt: Vec<u32> = lv.targets.iter().map(|t| t.1).collect();
                let mut dl = vec![0f32; logits.len()];
                let ce = cross_entropy(&logits, &tgt, None, None, &mut dl);
                let w = opts.mtp_lambda / depth as f32;
                total += w * ce;
                dl.iter_mut().for_each(|g| *g *= w * opts.scale);
                let mut drows = vec![0f32; rows.len()];
                self.lm_head.backward(&rows, lv.targets.len(), &dl, &mut grad.lm_head, Some(&mut drows), false);
                for (i, &(r, _)) in lv.targets.iter().enumerate() {
                    dnorm[r * d..(r + 1) * d].copy_from_slice(&drows[i * d..(i + 1) * d]);
                }
            }
            let mut dout = vec![0f32; n * d];
            if let Some((dh, prev)) = dnext.take() {
                for (i, &r) in prev.iter().enumerate() {
                    dout[r * d..(r + 1) * d].iter_mut().zip(&dh[i * d..(i + 1) * d]).for_each(|(a, b)| *a += b);
                }
            }
            let bal = Balance {
                seqs: lv.batch.seqs.clone(),
                seq_alpha: opts.seq_alpha,
                aux_alpha: opts.aux_alpha,
                scale: opts.scale,
            };
            let (demb, dhin, bl) =
                self.mtp[k - 1].backward(&lv.batch, sv, &dnorm, &mut dout, &mut grad.mtp[k - 1], &bal);
            bal_total += bl;
            for (row, &t) in demb.chunks_exact(d).zip(&lv.tokens) {
                grad.embed[t as usize * d..(t as usize + 1) * d].iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            if k == 1 {
                for (i, &r) in lv.prev.iter().enumerate() {
                    dnormed[r * d..(r + 1) * d].iter_mut().zip(&dhin[i * d..(i + 1) * d]).for_each(|(a, b)| *a += b);
                }
            } else {
                dnext = Some((dhin, lv.prev.clone()));
            }
        }
        Ok((total, bal_total))
    }

    /// Forward over whole sequences keeping what the backward needs.
    pub fn train_forward(&self, seqs: &[&[u32]]) -> Result<(Hidden, Trace)> {
        for s in seqs {
            self.check_tokens(s)?;
        }
        let spans: Vec<(usize, usize)> = seqs.iter().map(|s| (0, s.len())).collect();
        let batch = Batch::new(&self.rope, &spans);
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let mut x = self.embed_tokens(&tokens);
        let saved: Vec<BlockSaved> = self.layers.iter().map(|l| l.forward_train(&mut x, &batch)).collect();
        let mut normed = vec![0f32; x.len()];
        rmsnorm(&x, &self.norm, self.cfg.rms_norm_eps, &mut normed);
        Ok((Hidden { last: x, normed }, Trace { batch, tokens, saved }))
    }

    /// Backward from the gradient of the post-norm hidden states `[N, D]` down to the embedding.
    /// Returns the balance loss summed over MoE layers.
    pub fn train_backward(
        &self,
        hidden: &Hidden,
        trace: &Trace,
        dnormed: &[f32],
        grad: &mut Model,
        bal: &Balance,
    ) -> f32 {
        let d = self.cfg.hidden_size;
        let mut dx = vec![0f32; dnormed.len()];
        rmsnorm_backward(&hidden.last, &self.norm, self.cfg.rms_norm_eps, dnormed, &mut dx, &mut grad.norm);
        let mut bal_loss = 0.0;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            bal_loss += layer.backward(&trace.batch, &trace.saved[l], &mut dx, &mut grad.layers[l], bal);
        }
        for (row, &t) in dx.chunks_exact(d).zip(&trace.tokens) {
            let g = &mut grad.embed[t as usize * d..(t as usize + 1) * d];
            g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        bal_loss
    }
}

/// The last residual stream `[N, D]` and its final norm (`model.norm`) output.
pub struct Hidden {
    pub last: Vec<f32>,
    pub normed: Vec<f32>,
}

/// What a training forward keeps: rows, tokens and every layer's activations.
pub struct Trace {
    pub batch: Batch,
    pub tokens: Vec<u32>,
    pub saved: Vec<BlockSaved>,
}

/// One MTP depth's rows during a training pass.
#[derive(Default)]
struct MtpLevel {
    /// Row of the previous level (main rows for depth 1) feeding each row.
    prev: Vec<usize>,
    /// Input token (t_{i+k}) of each row.
    tokens: Vec<u32>,
    /// (row, target t_{i+k+1}) where a target exists.
    targets: Vec<(usize, u32)>,
    batch: Batch,
    saved: Option<crate::model::mtp::MtpSaved>,
}

/// Loss terms and scaling of a training pass.
#[derive(Debug, Clone, PartialEq)]
pub struct PassOptions {
    /// Multiplies every gradient (e.g. a micro-batch's share of the step's tokens).
    pub scale: f32,
    /// Complementary sequence-wise balance loss weight α (V3: 0.0001).
    pub seq_alpha: f32,
    /// Conventional batch-wise auxiliary balance loss weight (0 = off).
    pub aux_alpha: f32,
    /// Per predicted position (`Σ (T_i − 1)` rows, in order): 1 counts in the loss, 0 does not
    /// (SFT: only completion tokens). `None`: all count.
    pub mask: Option<Vec<f32>>,
    /// MTP loss weight λ (V3: 0.3, then 0.1); 0 = off. Needs loaded MTP modules.
    pub mtp_lambda: f32,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions { scale: 1.0, seq_alpha: 0.0, aux_alpha: 0.0, mask: None, mtp_lambda: 0.0 }
    }
}

/// What a training pass reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PassOutput {
    /// Mean next-token cross-entropy over the counted positions.
    pub ce_loss: f32,
    /// Balance losses summed over MoE layers (already weighted by α).
    pub balance_loss: f32,
    /// The MTP loss `λ/D·Σ_k CE_k` (0 when off).
    pub mtp_loss: f32,
    /// Tokens routed to each expert, per MoE layer.
    pub loads: Vec<Vec<u32>>,
    /// Positions with a next token.
    pub predicted: usize,
}
