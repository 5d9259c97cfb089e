//! A pipeline stage: a contiguous range of decoder layers of a [`Model`]; the first stage also
//! embeds the tokens, the last also applies the final norm, the head and the cross-entropy.
//!
//! Each op does exactly what [`Model::train_pass`] does for its part of one micro-batch (same
//! functions, same inputs), so losses are bit-identical to serial training; gradients are
//! accumulated per stage in micro-batch order. The backward can leave the weight gradients of
//! every linear layer (attention projections, MLPs, experts, head) to a later W job
//! ([`Stage::backward`] with `zb`, [`Stage::weight`]); norms, the router and the embedding get
//! their (small) gradients in the backward itself.
use crate::error::{ierr, Error, Result};
use crate::model::block::{Block, BlockSaved, Ffn, FfnSaved};
use crate::model::linear::WgradJob;
use crate::model::mla::QProj;
use crate::model::moe::Balance;
use crate::model::{Batch, Linear, Model};
use crate::ops::loss::cross_entropy;
use crate::ops::norm::{rmsnorm, rmsnorm_backward};
use crate::train::MicroBatch;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// Splits `layers` decoder layers into `stages` contiguous ranges, as even as possible (the
/// first stages get the extra layers).
pub fn split_layers(layers: usize, stages: usize) -> Vec<Range<usize>> {
    let (q, r) = (layers / stages.max(1), layers % stages.max(1));
    let mut out = Vec::with_capacity(stages);
    let mut lo = 0;
    for s in 0..stages {
        let n = q + usize::from(s < r);
        out.push(lo..lo + n);
        lo += n;
    }
    out
}

/// Loss terms of a step (per micro-batch scale comes from its share of counted positions).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossOptions {
    /// Complementary sequence-wise balance loss weight α.
    pub seq_alpha: f32,
    /// Conventional batch-wise auxiliary balance loss weight.
    pub aux_alpha: f32,
}

/// One stage of a model.
#[derive(Clone, Copy)]
pub struct Stage<'m> {
    pub model: &'m Model,
    /// Position along the path (0 = embedding side) and the number of stages.
    pub index: usize,
    pub count: usize,
    /// Decoder layers `[lo, hi)`.
    pub layers: (usize, usize),
}

/// What a stage's forward keeps for its backward (one micro-batch).
pub struct Activation {
    batch: Batch,
    /// Token ids (first stage: for the embedding gradient).
    tokens: Vec<u32>,
    saved: Vec<BlockSaved>,
    /// Last stage: the residual stream before the final norm `[N, D]`, the normed rows that have
    /// a target `[R, D]`, their row indices and `dlogits` `[R, V]` (already scaled).
    last: Vec<f32>,
    rows: Vec<f32>,
    targets: Vec<usize>,
    dlogits: Vec<f32>,
    /// Micro-batch weight in the step.
    scale: f32,
}

/// Gradient buffers of one stage (one copy of it).
#[derive(Clone)]
pub struct StageGrad {
    pub layers: Vec<Block>,
    /// First stage: `[V, D]`; empty otherwise.
    pub embed: Vec<f32>,
    /// Last stage: `[D]` and the head; empty / None otherwise.
    pub norm: Vec<f32>,
    pub lm_head: Option<Linear>,
}

/// The deferred weight-gradient jobs of one backward: per linear layer of the stage (in
/// [`Stage::linears`] order), the jobs it queued.
pub type WeightJobs = Vec<Vec<WgradJob>>;

/// What a stage's forward returns besides its [`Activation`].
pub struct ForwardOut {
    /// The activation for the next stage `[N, D]` (None on the last stage).
    pub out: Option<Vec<f32>>,
    /// Last stage: the micro-batch's mean cross-entropy.
    pub loss: Option<f32>,
    /// Tokens routed to each expert, per MoE layer of the stage: (layer, loads).
    pub loads: Vec<(usize, Vec<u32>)>,
}

impl<'m> Stage<'m> {
    /// The stages of `model` for a path of `count` stages.
    pub fn all(model: &'m Model, count: usize) -> Vec<Stage<'m>> {
        split_layers(model.layers.len(), count)
            .into_iter()
            .enumerate()
            .map(|(index, r)| Stage { model, index, count, layers: (r.start, r.end) })
            .collect()
    }

    fn first(&self) -> bool {
        self.index == 0
    }

    fn last(&self) -> bool {
        self.index + 1 == self.count
    }

    /// Zero gradient buffers for this stage, cut from `zeros` ([`Model::zeros_like`]).
    pub fn zero_grad(&self, zeros: &Model) -> StageGrad {
        StageGrad {
            layers: zeros.layers[self.layers.0..self.layers.1].to_vec(),
            embed: if self.first() { zeros.embed.clone() } else { Vec::new() },
            norm: if self.last() { zeros.norm.clone() } else { Vec::new() },
            lm_head: self.last().then(|| zeros.lm_head.clone()),
        }
    }

    /// Forward of micro-batch `mb` (weight `scale` in the step): from its tokens on the first
    /// stage, else from `input` `[N, D]`. The last stage computes the loss and its gradient.
    pub fn forward(&self, mb: &MicroBatch, scale: f32, input: Option<Vec<f32>>) -> Result<(Activation, ForwardOut)> {
        let m = self.model;
        let seqs: Vec<&[u32]> = mb.seqs.iter().map(|s| &s[..]).collect();
        let spans: Vec<(usize, usize)> = seqs.iter().map(|s| (0, s.len())).collect();
        let batch = Batch::new(&m.rope, &spans);
        let n = batch.rows();
        let d = m.cfg.hidden_size;
        let tokens: Vec<u32> =
            if self.first() { seqs.iter().flat_map(|s| s.iter().copied()).collect() } else { vec![] };
        let mut x = if self.first() {
            for s in &seqs {
                m.check_tokens(s)?;
            }
            m.embed_tokens(&tokens)
        } else {
            let x = input.ok_or_else(|| ierr(format!("stage {}: no input activation", self.index)))?;
            if x.len() != n * d {
                return Err(ierr(format!("stage {}: input has {} values, expected [{n}, {d}]", self.index, x.len())));
            }
            x
        };
        let layers = &m.layers[self.layers.0..self.layers.1];
        let saved: Vec<BlockSaved> = layers.iter().map(|l| l.forward_train(&mut x, &batch)).collect();
        let loads = saved
            .iter()
            .zip(layers)
            .enumerate()
            .filter_map(|(i, (s, l))| match (&s.ffn, &l.ffn) {
                (FfnSaved::Moe(ms), Ffn::Moe(moe)) => Some((self.layers.0 + i, moe.router.loads(&ms.routes))),
                _ => None,
            })
            .collect();
        let mut act = Activation {
            batch,
            tokens,
            saved,
            last: Vec::new(),
            rows: Vec::new(),
            targets: Vec::new(),
            dlogits: Vec::new(),
            scale,
        };
        if !self.last() {
            return Ok((act, ForwardOut { out: Some(x), loss: None, loads }));
        }
        // the head and the loss, as Model::train_pass does
        let mut targets = Vec::new();
        let mut tgt = Vec::new();
        let mut off = 0;
        for s in &seqs {
            for i in 0..s.len().saturating_sub(1) {
                targets.push(off + i);
                tgt.push(s[i + 1]);
            }
            off += s.len();
        }
        if targets.is_empty() {
            return Err(ierr("every sequence has fewer than 2 tokens: nothing to predict"));
        }
        let mut normed = vec![0f32; x.len()];
        rmsnorm(&x, &m.norm, m.cfg.rms_norm_eps, &mut normed);
        let rows: Vec<f32> = targets.iter().flat_map(|&r| normed[r * d..(r + 1) * d].iter().copied()).collect();
        let logits = m.logits(&rows);
        let mut dlogits = vec![0f32; logits.len()];
        let loss = cross_entropy(&logits, &tgt, mb.mask.as_deref(), None, &mut dlogits);
        dlogits.iter_mut().for_each(|g| *g *= scale);
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!("loss is {loss}")));
        }
        act.last = x;
        act.rows = rows;
        act.targets = targets;
        act.dlogits = dlogits;
        Ok((act, ForwardOut { out: None, loss: Some(loss), loads }))
    }

    /// Backward of one micro-batch: `dout` is the gradient of the stage output `[N, D]` (None
    /// on the last stage, which starts from its loss). Gradients accumulate into `grad`; with
    /// `zb` the linear layers' weight gradients are returned as jobs instead (run them with
    /// [`Stage::weight`], in the same order as the backwards). Returns (the gradient of the
    /// stage input `[N, D]` — None on the first stage —, the jobs, the balance loss).
    pub fn backward(
        &self,
        act: Activation,
        dout: Option<Vec<f32>>,
        grad: &mut StageGrad,
        opts: &LossOptions,
        zb: bool,
    ) -> Result<(Option<Vec<f32>>, WeightJobs, f32)> {
        let m = self.model;
        let d = m.cfg.hidden_size;
        let n = act.batch.rows();
        if zb {
            for l in Self::linears_mut(grad) {
                l.deferred = Some(Vec::new());
            }
        }
        let mut dx = if self.last() {
            let head = grad.lm_head.as_mut().ok_or_else(|| ierr("last stage without a head gradient"))?;
            let mut drows = vec![0f32; act.rows.len()];
            m.lm_head.backward(&act.rows, act.targets.len(), &act.dlogits, head, Some(&mut drows), false);
            let mut dnormed = vec![0f32; n * d];
            for (i, &r) in act.targets.iter().enumerate() {
                dnormed[r * d..(r + 1) * d].copy_from_slice(&drows[i * d..(i + 1) * d]);
            }
            let mut dx = vec![0f32; n * d];
            rmsnorm_backward(&act.last, &m.norm, m.cfg.rms_norm_eps, &dnormed, &mut dx, &mut grad.norm);
            dx
        } else {
            let g = dout.ok_or_else(|| ierr(format!("stage {}: no output gradient", self.index)))?;
            if g.len() != n * d {
                return Err(ierr(format!(
                    "stage {}: gradient has {} values, expected [{n}, {d}]",
                    self.index,
                    g.len()
                )));
            }
            g
        };
        let bal = Balance {
            seqs: act.batch.seqs.clone(),
            seq_alpha: opts.seq_alpha,
            aux_alpha: opts.aux_alpha,
            scale: act.scale,
        };
        let mut bal_loss = 0.0;
        let layers = &m.layers[self.layers.0..self.layers.1];
        for (i, layer) in layers.iter().enumerate().rev() {
            bal_loss += layer.backward(&act.batch, &act.saved[i], &mut dx, &mut grad.layers[i], &bal);
        }
        let jobs = if zb {
            Self::linears_mut(grad).into_iter().map(|l| l.deferred.take().unwrap_or_default()).collect()
        } else {
            Vec::new()
        };
        if self.first() {
            for (row, &t) in dx.chunks_exact(d).zip(&act.tokens) {
                let g = &mut grad.embed[t as usize * d..(t as usize + 1) * d];
                g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            return Ok((None, jobs, bal_loss));
        }
        Ok((Some(dx), jobs, bal_loss))
    }

    /// Runs the weight-gradient jobs of one earlier input-grad-only backward into `grad`.
    pub fn weight(&self, jobs: &WeightJobs, grad: &mut StageGrad) -> Result<()> {
        let model_linears = self.linears();
        let grad_linears = Self::linears_mut(grad);
        if jobs.len() != model_linears.len() || grad_linears.len() != model_linears.len() {
            return Err(ierr(format!("stage {}: weight jobs do not match the stage's layers", self.index)));
        }
        for ((l, g), js) in model_linears.into_iter().zip(grad_linears).zip(jobs) {
            for j in js {
                l.weight_grad(j, g);
            }
        }
        Ok(())
    }

    /// The stage's linear layers in a fixed order: each layer's (q projections, kv_a, kv_b, o,
    /// MLP or experts then shared experts), then the head on the last stage.
    fn linears(&self) -> Vec<&'m Linear> {
        let mut v = Vec::new();
        for b in &self.model.layers[self.layers.0..self.layers.1] {
            block_linears(b, &mut v);
        }
        if self.last() {
            v.push(&self.model.lm_head);
        }
        v
    }

    /// [`Stage::linears`] of a gradient buffer.
    fn linears_mut(g: &mut StageGrad) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in g.layers.iter_mut() {
            block_linears_mut(b, &mut v);
        }
        if let Some(h) = g.lm_head.as_mut() {
            v.push(h);
        }
        v
    }
}

fn block_linears<'a>(b: &'a Block, v: &mut Vec<&'a Linear>) {
    match &b.attn.q {
        QProj::Lora { a, b, .. } => v.extend([a, b]),
        QProj::Plain(l) => v.push(l),
    }
    v.extend([&b.attn.kv_a, &b.attn.kv_b, &b.attn.o]);
    let mlp = |m: &'a crate::model::mlp::Mlp, v: &mut Vec<&'a Linear>| v.extend([&m.gate, &m.up, &m.down]);
    match &b.ffn {
        Ffn::Dense(m) => mlp(m, v),
        Ffn::Moe(m) => {
            m.experts.iter().for_each(|e| mlp(e, v));
            if let Some(s) = &m.shared {
                mlp(s, v);
            }
        }
    }
}

fn block_linears_mut<'a>(b: &'a mut Block, v: &mut Vec<&'a mut Linear>) {
    match &mut b.attn.q {
        QProj::Lora { a, b, .. } => v.extend([a, b]),
        QProj::Plain(l) => v.push(l),
    }
    v.extend([&mut b.attn.kv_a, &mut b.attn.kv_b, &mut b.attn.o]);
    let mlp = |m: &'a mut crate::model::mlp::Mlp, v: &mut Vec<&'a mut Linear>| {
        v.extend([&mut m.gate, &mut m.up, &mut m.down])
    };
    match &mut b.ffn {
        Ffn::Dense(m) => mlp(m, v),
        Ffn::Moe(m) => {
            m.experts.iter_mut().for_each(|e| mlp(e, v));
            if let Some(s) = &mut m.shared {
                mlp(s, v);
            }
        }
    }
}

/// Adds `src`'s trainable tensors into `dst` (same structure).
pub fn add_stage_grad(dst: &mut StageGrad, src: &mut StageGrad) {
    let add = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    for (a, b) in dst.layers.iter_mut().zip(src.layers.iter_mut()) {
        let mut flat: Vec<f32> = Vec::new();
        b.visit("", &mut |_, t| flat.extend_from_slice(t));
        let mut i = 0;
        a.visit("", &mut |_, t| {
            add(t, &flat[i..i + t.len()]);
            i += t.len();
        });
    }
    add(&mut dst.embed, &src.embed);
    add(&mut dst.norm, &src.norm);
    if let (Some(a), Some(b)) = (dst.lm_head.as_mut(), src.lm_head.as_mut()) {
        let mut flat: Vec<f32> = Vec::new();
        b.visit("", &mut |_, t| flat.extend_from_slice(t));
        let mut i = 0;
        a.visit("", &mut |_, t| {
            add(t, &flat[i..i + t.len()]);
            i += t.len();
        });
    }
}

/// Writes a stage's gradients into a full-model gradient buffer `grad` ([`Model::zeros_like`]).
pub fn store_stage_grad(stage: &Stage, g: StageGrad, grad: &mut Model) {
    let (lo, hi) = stage.layers;
    for (dst, src) in grad.layers[lo..hi].iter_mut().zip(g.layers) {
        *dst = src;
    }
    if !g.embed.is_empty() {
        grad.embed = g.embed;
    }
    if !g.norm.is_empty() {
        grad.norm = g.norm;
    }
    if let Some(h) = g.lm_head {
        grad.lm_head = h;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_split_evenly() {
        assert_eq!(split_layers(5, 2), vec![0..3, 3..5]);
        assert_eq!(split_layers(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(split_layers(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
    }
}
