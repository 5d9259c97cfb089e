//! [`CudaTrainModel`]: the model's training pass on the GPU (see the module map in `train/mod.rs`).
//!
//! The pass mirrors `dsv3_core::model::Model::train_pass` (the CPU f32 oracle) layer for layer:
//! embedding, per layer `h += MLA(norm(h)); h += FFN(norm(h))` with MLA in its naive form over
//! whole sequences (explicit causal probabilities per sequence and head, batched GEMMs per head
//! over runs of equal-length sequences), the final norm, logits and cross-entropy only at
//! positions with a next token, then every backward in reverse order (see `train/block.rs`).
//!
//! Parameters live in one f32 arena of masters and one of gradients (every tensor at an aligned
//! offset, in `Model::visit` order; [`super::layout::ArenaLayout`]); [`DParam`]'s `w` and `g`
//! are views into them. bf16 mode keeps a bf16 copy of the masters for the tensor-core GEMMs
//! ([`CudaTrainModel::refresh`] recasts it in one launch).
//!
//! Host round trips: none inside the pass in bf16 mode (the losses, balance-loss terms and
//! expert loads are downloaded once at the end); f32 mode also downloads each MoE layer's
//! dispatch offsets (its grouped products loop over the experts through cuBLAS).
//!
//! The MTP loss (`mtp_lambda > 0` on a model with MTP modules loaded) runs after the main head and
//! before the main backward, as core's `mtp_pass` (`train/mtp.rs`); the MTP blocks' router
//! biases stay as loaded (only the main layers' biases are in [`CudaTrainModel::biases`]).
use super::block::{loads, BalanceTerms, Cx, Dimsm, FfnW, LayerW};
use super::fp8::{fp8_linears, Fp8Layout, Fp8Weights};
use super::layout::{ArenaLayout, BatchLayout};
use super::mm::{dims, f32_of, rd, wr, ActView, Mm, View};
use super::mtp::{mtp_pass, MtpIn, MtpW};
use crate::device::{cuda_err, Device};
use crate::ops::gemm::Layout::{NN, NT, TN};
use crate::ops::moe_train::Spans;
use crate::ops::{elementwise, gather, norm, train as tk};
use crate::tensor::{download, download_all, upload, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::model::block::Ffn;
use dsv3_core::model::linear::Precision;
use dsv3_core::model::train::{PassOptions, PassOutput};
use dsv3_core::model::Model;
use dsv3_core::{Error, Result};
use std::sync::Arc;

/// How the pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainOptions {
    /// `F32`: f32 activations and GEMMs (the CPU oracle's math, to ~1e-4); `Bf16`: bf16
    /// activations and tensor-core GEMMs over bf16 copies of the f32 masters.
    pub dtype: DType,
    /// GEMM precision of the decoder's linear layers (the set core's `Model::set_precision`
    /// sets): `F32` runs them in the dtype's GEMMs; `Fp8` in DeepSeek-V3's FP8 recipe as core's
    /// `Precision::Fp8` (`train/fp8.rs`), the other GEMMs staying in the dtype's. `Bf16` is
    /// refused (the bf16 dtype is the GPU's bf16 mode).
    pub precision: Precision,
}

impl TrainOptions {
    /// `dtype` with the dtype's GEMMs everywhere.
    pub fn new(dtype: DType) -> TrainOptions {
        TrainOptions { dtype, precision: Precision::F32 }
    }
}

/// One trainable tensor on the device, in `Model::visit` order with its checkpoint name.
///
/// `w` and `g` are views into the model's arenas ([`CudaTrainModel::masters`],
/// [`CudaTrainModel::grads`]): write into them in place (kernels, `memcpy_htod`), never replace
/// or drop them on their own (the model releases them).
pub struct DParam {
    pub name: String,
    /// f32 master weights.
    pub w: CudaSlice<f32>,
    /// f32 gradient (accumulated by [`CudaTrainModel::pass`], zeroed by the caller).
    pub g: CudaSlice<f32>,
    /// Whether AdamW decays it (`dsv3_core::train::AdamW::decays`).
    pub decays: bool,
}

/// The model on the device for training.
pub struct CudaTrainModel {
    pub dev: Arc<Device>,
    pub cfg: dsv3_core::Config,
    /// Every trainable tensor, in `Model::visit` order.
    pub params: Vec<DParam>,
    /// The router correction bias `[E]` of each MoE layer that has one, in layer order (main
    /// layers only), updated by the auxiliary-loss-free rule.
    pub biases: Vec<CudaSlice<f32>>,
    pub opts: TrainOptions,
    layout: ArenaLayout,
    master: Act,
    grad: Act,
    /// bf16 working copy of `master` (bf16 mode).
    wbf: Option<Act>,
    mm: Mm,
    layers: Vec<LayerW>,
    dm: Dimsm,
    embed: usize,
    norm: usize,
    head: usize,
    inv_freq: CudaSlice<f32>,
    attention_factor: f32,
    /// The MTP modules and their blocks' router biases (not updated by the trainer).
    mtp: Vec<MtpW>,
    mtp_biases: Vec<CudaSlice<f32>>,
    /// FP8 precision: the FP8 linears' quantized copies (refreshed from the masters).
    fp8: Option<Fp8Weights>,
}

impl Drop for CudaTrainModel {
    fn drop(&mut self) {
        // the params are views into the arenas: release the handles without freeing
        for p in self.params.drain(..) {
            p.w.leak();
            p.g.leak();
        }
    }
}

/// The output head over the predicted rows of a layout: logits, softmax cross-entropy, the
/// head's weight gradient and the hidden states' gradient.
pub(crate) struct Head<'a> {
    pub dev: &'a Device,
    pub mm: &'a Mm,
    pub dt: DType,
    pub wb: &'a Act,
    pub head: usize,
    pub vocab: usize,
    pub d: usize,
}

impl Head<'_> {
    /// For `normed` (`[n, D]`, rows of `b`): logits at `b`'s predicted rows, cross-entropy
    /// against its targets (row weights `mask`, gradient `(softmax − onehot)·mask/denom`), the
    /// head gradient into `grad`. Returns (gradient of `normed` `[n, D]`, zero at rows without a
    /// target; the per-row losses `[P]`).
    pub fn ce(
        &self,
        normed: &Act,
        b: &BatchLayout,
        mask: Option<&CudaSlice<f32>>,
        denom: f32,
        grad: &mut Act,
    ) -> Result<(Act, CudaSlice<f32>)> {
        let Head { dev, mm, dt, wb, head, vocab: v, d } = *self;
        let (n, p) = (b.n, b.predicted());
        let trows = upload(dev, &b.target_rows)?;
        let targets = upload(dev, &b.targets)?;
        let inv = upload(dev, &b.inv)?;
        let mut hp = Act::empty(dev, dt, p * d)?;
        gather::gather_rows(dev, normed, n, d, &trows, p, d, &mut hp, d)?;
        // logits in the pass's dtype (bf16 mode: bf16, as HF's bf16 lm_head; the cross-entropy
        // computes in f32 from them): the step's largest tensor, [tokens, vocab]
        let mut logits = Act::empty(dev, dt, p * v)?;
        mm.run(dev, NT, dims(p, v, d), rd(&hp, 0, d), rd(wb, head, d), wr(&mut logits, 0, v), None)?;
        let mut dz = Act::empty(dev, dt, p * v)?;
        let mut row_loss = crate::tensor::empty::<f32>(dev, p)?;
        tk::cross_entropy(dev, &logits, v, &targets, mask, denom, &mut dz, v, &mut row_loss, v, p)?;
        drop(logits);
        // dX = dZ·W (rows of the predicted positions; row p stays zero), dW += dZᵀ·X
        let mut dhp = Act::zeros(dev, dt, (p + 1) * d)?;
        mm.run(dev, NN, dims(p, d, v), rd(&dz, 0, v), rd(wb, head, d), wr(&mut dhp, 0, d), None)?;
        mm.run(dev, TN, dims(v, d, p).acc(true), rd(&dz, 0, v), rd(&hp, 0, d), wr(grad, head, d), None)?;
        let mut dnormed = Act::empty(dev, dt, n * d)?;
        gather::gather_rows(dev, &dhp, p + 1, d, &inv, n, d, &mut dnormed, d)?;
        Ok((dnormed, row_loss))
    }
}

/// An owning-looking handle on `[off, off + len)` of `s` (released with `leak`, never freed).
fn alias(dev: &Device, s: &CudaSlice<f32>, off: usize, len: usize) -> Result<CudaSlice<f32>> {
    Ok(View::of(dev, s, off, len)?.take())
}

impl CudaTrainModel {
    /// Uploads `model` (made trainable: f32 weights, see `Model::make_trainable`).
    pub fn new(dev: Arc<Device>, model: &Model, opts: TrainOptions) -> Result<CudaTrainModel> {
        let cfg = model.cfg.clone();
        let dm = Dimsm::of(&cfg);
        if opts.precision == Precision::Bf16 {
            return Err(Error::Unsupported(
                "GPU training: linear precision bf16 is the bf16 dtype's GEMMs (TrainOptions::dtype); use F32 or Fp8"
                    .into(),
            ));
        }
        if dm.dr == 0 || !dm.dr.is_multiple_of(2) || dm.dr / 2 > 128 {
            return Err(Error::Unsupported(format!("GPU training: qk_rope_head_dim {} (even, <= 256)", dm.dr)));
        }
        let (lay, host) = ArenaLayout::of(model)?;
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed = lay.off("model.embed_tokens.weight", v * d)?;
        let norm = lay.off("model.norm.weight", d)?;
        let head = if cfg.tie_word_embeddings { embed } else { lay.off("lm_head.weight", v * d)? };
        if lay.has("lm_head.bias") {
            return Err(Error::Unsupported("GPU training: an lm_head bias".into()));
        }
        let mut n_bias = 0;
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut biases = Vec::new();
        for (i, b) in model.layers.iter().enumerate() {
            layers.push(LayerW::of(&lay, &cfg, i, b, &mut n_bias)?);
            if let Ffn::Moe(m) = &b.ffn {
                if let Some(bias) = &m.router.bias {
                    biases.push(upload(&dev, bias)?);
                }
            }
        }
        let mut n_mtp_bias = 0;
        let mut mtp = Vec::with_capacity(model.mtp.len());
        let mut mtp_biases = Vec::new();
        for (k, m) in model.mtp.iter().enumerate() {
            mtp.push(MtpW::of(&lay, &cfg, k, m, &mut n_mtp_bias)?);
            if let Ffn::Moe(moe) = &m.block.ffn {
                if let Some(bias) = &moe.router.bias {
                    mtp_biases.push(upload(&dev, bias)?);
                }
            }
        }
        let master_s = upload(&dev, &host)?;
        let grad_s = crate::tensor::zeros::<f32>(&dev, lay.total)?;
        let mm = Mm::new(&dev, opts.dtype)?;
        let fp8 = match opts.precision {
            Precision::Fp8 => Some(Fp8Weights::new(&dev, Fp8Layout::new(&lay, &fp8_linears(model))?)?),
            _ => None,
        };
        let inv_freq = upload(&dev, &model.rope.inv_freq)?;
        // the parameter views last, after every fallible step: dropped on an error path they
        // would free (parts of) the arenas (only `CudaTrainModel`'s Drop releases them)
        let mut params = Vec::with_capacity(lay.slots.len());
        for s in &lay.slots {
            params.push(DParam {
                name: s.name.clone(),
                w: alias(&dev, &master_s, s.off, s.len)?,
                g: alias(&dev, &grad_s, s.off, s.len)?,
                decays: s.decays,
            });
        }
        let mut m = CudaTrainModel {
            dev: dev.clone(),
            cfg,
            params,
            biases,
            opts,
            layout: lay,
            master: Act::F32(master_s),
            grad: Act::F32(grad_s),
            wbf: None,
            mm,
            layers,
            dm,
            embed,
            norm,
            head,
            inv_freq,
            attention_factor: model.rope.attention_factor,
            mtp,
            mtp_biases,
            fp8,
        };
        if opts.dtype == DType::Bf16 {
            m.wbf = Some(Act::empty(&dev, DType::Bf16, m.layout.total)?);
        }
        m.refresh()?;
        Ok(m)
    }

    /// The f32 master arena (every tensor at its [`DParam`]'s place; padding between them zero).
    pub fn masters(&self) -> &CudaSlice<f32> {
        f32_of(&self.master).expect("f32 arena")
    }

    /// The f32 gradient arena (same layout as [`CudaTrainModel::masters`]): one buffer for
    /// global-norm reductions.
    pub fn grads(&self) -> &CudaSlice<f32> {
        f32_of(&self.grad).expect("f32 arena")
    }

    /// The arenas' layout (each tensor's offset and length).
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }

    /// Zeroes every gradient (one memset over the gradient arena).
    pub fn zero_grads(&mut self) -> Result<()> {
        let g = super::mm::f32_of_mut(&mut self.grad)?;
        self.dev.stream.memset_zeros(g).map_err(|e| cuda_err("zeroing the gradients", e))
    }

    /// One forward + backward over `seqs` with `opts`' loss terms: gradients (times
    /// `opts.scale`) accumulate into `params[i].g`. Same semantics and outputs as
    /// `Model::train_pass` (loss, balance loss, MTP loss, per-layer expert loads, positions).
    /// A non-finite loss is an `Error::NonFinite`, found after the backward ran: the gradients
    /// are then polluted (zero them before the next step).
    pub fn pass(&mut self, seqs: &[&[u32]], opts: &PassOptions) -> Result<PassOutput> {
        let dev = &*self.dev;
        let (v, d, eps) = (self.cfg.vocab_size, self.dm.d, self.dm.eps);
        let dt = self.opts.dtype;
        let b = BatchLayout::new(seqs, self.dm.h, v)?;
        let (n, p) = (b.n, b.predicted());
        if let Some(m) = &opts.mask {
            if m.len() != p {
                return Err(Error::Input(format!("mask of {} values for {p} predicted positions", m.len())));
            }
        }
        let tokens = upload(dev, &b.tokens)?;
        let pos = upload(dev, &b.pos)?;
        let mask = match &opts.mask {
            Some(m) => Some(upload(dev, m)?),
            None => None,
        };
        let max_k = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FfnW::Moe(m) => m.cfg.top_k,
                FfnW::Dense(_) => 1,
            })
            .max()
            .unwrap_or(1);
        let ones = Act::from_f32(dev, dt, &vec![1.0f32; n * max_k])?;
        let seq_spans = Spans::new(dev, &b.lens)?;
        let all_span = Spans::new(dev, &[n])?;
        let master = f32_of(&self.master)?;
        let wb = self.wbf.as_ref().unwrap_or(&self.master);
        let cx = Cx {
            dev,
            mm: &self.mm,
            dt,
            master,
            wb,
            ones: &ones,
            b: &b,
            pos: &pos,
            inv_freq: &self.inv_freq,
            attention_factor: self.attention_factor,
            dm: self.dm,
            biases: &self.biases,
            seq_spans: &seq_spans,
            all_span: &all_span,
            seq_alpha: opts.seq_alpha,
            aux_alpha: opts.aux_alpha,
            scale: opts.scale,
            fp8: self.fp8.as_ref(),
        };
        // forward
        let mut x = Act::empty(dev, dt, n * d)?;
        {
            let table = ActView::of(dev, wb, self.embed, v * d)?;
            gather::gather_rows(dev, &table, v, d, &tokens, n, d, &mut x, d)?;
        }
        let mut saved = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (s, next) = cx.layer_fwd(l, x)?;
            saved.push(s);
            x = next;
        }
        let mut normed = Act::empty(dev, dt, n * d)?;
        {
            let wv = View::of(dev, master, self.norm, d)?;
            norm::rmsnorm(dev, &mut x, 0, d, Some((&mut normed, 0, d)), &wv, d, eps, n)?;
        }
        // cross-entropy; its gradient scaled by opts.scale through the denominator
        let counted: f32 = opts.mask.as_ref().map_or(p as f32, |m| m.iter().sum());
        let denom = if counted == 0.0 { 0.0 } else { counted / opts.scale };
        let hd = Head { dev, mm: &self.mm, dt, wb, head: self.head, vocab: v, d };
        let (mut dnormed, row_loss) = hd.ce(&normed, &b, mask.as_ref(), denom, &mut self.grad)?;
        let mtp_out = if opts.mtp_lambda > 0.0 && !self.mtp.is_empty() {
            let inp = MtpIn {
                dev,
                mm: &self.mm,
                dt,
                master,
                wb,
                ones: &ones,
                inv_freq: &self.inv_freq,
                attention_factor: self.attention_factor,
                dm: self.dm,
                biases: &self.mtp_biases,
                embed: self.embed,
                head: self.head,
                vocab: v,
                seqs,
                normed: &normed,
                n_main: n,
                lambda: opts.mtp_lambda,
                scale: opts.scale,
                seq_alpha: opts.seq_alpha,
                aux_alpha: opts.aux_alpha,
                fp8: self.fp8.as_ref(),
            };
            Some(mtp_pass(&inp, &self.mtp, &mut self.grad, &mut dnormed)?)
        } else {
            None
        };
        drop(normed);
        let mut dres = Act::empty(dev, dt, n * d)?;
        {
            let wv = View::of(dev, master, self.norm, d)?;
            let mut gv = View::of(dev, f32_of(&self.grad)?, self.norm, d)?;
            tk::rmsnorm_backward(dev, &x, d, &wv, &dnormed, d, &mut dres, d, &mut gv, d, eps, n)?;
        }
        drop((dnormed, x));
        // backward through the layers; balance terms kept per layer (reverse order)
        let mut bal: Vec<BalanceTerms> = Vec::new();
        let mut load_bufs = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let FfnW::Moe(m) = &l.ffn {
                if let Some(lb) = loads(dev, &saved[i], m.cfg.n_experts, m.cfg.top_k, n)? {
                    load_bufs.push(lb);
                }
            }
        }
        for (i, l) in self.layers.iter().enumerate().rev() {
            let mut t = BalanceTerms::new();
            let s = saved.pop().ok_or_else(|| Error::Input("GPU training: saved layers".into()))?;
            debug_assert_eq!(saved.len(), i);
            cx.layer_bwd(l, &s, &mut dres, &mut self.grad, &mut t)?;
            bal.push(t);
        }
        {
            let mut gv = View::of(dev, f32_of(&self.grad)?, self.embed, v * d)?;
            tk::embedding_backward(dev, &tk::EmbedRows::new(dev, &b.tokens, v)?, &dres, d, &mut gv, v, d)?;
        }
        // the scalars, downloaded together (one wait for the stream): the row losses, the MTP
        // depths' row losses and balance terms, the layers' balance terms, then the loads
        let mtp_ce: &[(CudaSlice<f32>, usize, f32)] = mtp_out.as_ref().map_or(&[], |mo| &mo.ce);
        let mtp_bal: &[BalanceTerms] = mtp_out.as_ref().map_or(&[], |mo| &mo.bal);
        let mut f32_bufs: Vec<&CudaSlice<f32>> = vec![&row_loss];
        f32_bufs.extend(mtp_ce.iter().map(|(rl, _, _)| rl));
        for terms in mtp_bal.iter().chain(&bal) {
            f32_bufs.extend(terms.iter().map(|(buf, _)| buf));
        }
        let mut host = download_all(dev, &f32_bufs)?.into_iter();
        let mut next = || host.next().ok_or_else(|| Error::Input("GPU training: downloaded scalars".into()));
        let rl = next()?;
        let mut loss = 0f64;
        for &t in &rl {
            loss += t as f64;
        }
        let ce_loss = if counted == 0.0 { 0.0 } else { (loss / counted as f64) as f32 };
        let mut mtp_loss = 0f32;
        // deepest depth first, as core adds them
        for (_, count, w) in mtp_ce {
            let t = next()?;
            let ce = (t.iter().fold(0f64, |a, &b| a + b as f64) / *count as f64) as f32;
            mtp_loss += w * ce;
        }
        let mut sum_terms = |terms: &BalanceTerms| -> Result<f32> {
            let mut layer = 0f32;
            for (_, groups) in terms {
                let t = next()?;
                layer += t.iter().fold(0f32, |a, &b| a + b) / *groups as f32;
            }
            Ok(layer)
        };
        let mut mtp_bal_loss = 0f32;
        for terms in mtp_bal {
            mtp_bal_loss += sum_terms(terms)?;
        }
        let mut balance_loss = 0f32;
        for terms in &bal {
            balance_loss += sum_terms(terms)?;
        }
        let load_refs: Vec<&CudaSlice<i32>> = load_bufs.iter().collect();
        let out_loads: Vec<Vec<u32>> = download_all(dev, &load_refs)?
            .into_iter()
            .map(|l| l.into_iter().map(|c| c.max(0) as u32).collect())
            .collect();
        if !ce_loss.is_finite() {
            return Err(Error::NonFinite(format!("loss is {ce_loss}")));
        }
        balance_loss += mtp_bal_loss;
        Ok(PassOutput { ce_loss, balance_loss, mtp_loss, loads: out_loads, predicted: p })
    }

    /// After the masters changed (optimizer step, bias update): refreshes whatever is derived
    /// from them (bf16 working copies: one cast over the arena; FP8 precision: the FP8 linears
    /// re-quantized from the f32 masters in 128x128 blocks, W and Wᵀ, as core's `requantize`).
    pub fn refresh(&mut self) -> Result<()> {
        if let Some(w) = &mut self.wbf {
            elementwise::cast(&self.dev, &self.master, w, self.layout.total)?;
        }
        self.refresh_fp8()
    }

    /// [`CudaTrainModel::refresh`] without the bf16 cast, for an update that wrote the working
    /// copy itself (the trainer's AdamW).
    pub fn refresh_fp8(&mut self) -> Result<()> {
        if let Some(f) = &mut self.fp8 {
            f.refresh(&self.dev, f32_of(&self.master)?)?;
        }
        Ok(())
    }

    /// The bf16 working copy of the masters (bf16 mode; same layout), `None` in f32 mode.
    pub fn working_bf16(&self) -> Option<&CudaSlice<half::bf16>> {
        match &self.wbf {
            Some(Act::Bf16(w)) => Some(w),
            _ => None,
        }
    }

    /// Device bytes of the FP8 linears' quantized copies (0 unless FP8 precision).
    pub fn fp8_bytes(&self) -> usize {
        self.fp8.as_ref().map_or(0, |f| f.layout.bytes())
    }

    /// Copies the masters and router biases into `model` (same structure, trainable), and
    /// refreshes what the CPU model derives from them (MLA's absorbed weights, a tied head).
    pub fn download(&self, model: &mut Model) -> Result<()> {
        let host = download(&self.dev, self.masters())?;
        self.fill(model, &host)?;
        let mut bi = 0;
        for l in &mut model.layers {
            if let Ffn::Moe(m) = &mut l.ffn {
                if let Some(b) = &mut m.router.bias {
                    let v = download(&self.dev, self.biases.get(bi).ok_or_else(|| Error::Input("bias count".into()))?)?;
                    if v.len() != b.len() {
                        return Err(Error::Input("router bias length".into()));
                    }
                    b.copy_from_slice(&v);
                    bi += 1;
                }
            }
        }
        for l in &mut model.layers {
            l.attn.refresh_absorbed();
        }
        for m in &mut model.mtp {
            m.block.attn.refresh_absorbed();
        }
        if model.cfg.tie_word_embeddings {
            if let dsv3_core::model::linear::Weight::F32(w) = &mut model.lm_head.weight {
                if w.len() == model.embed.len() {
                    w.copy_from_slice(&model.embed);
                }
            }
        }
        model.requantize();
        Ok(())
    }

    /// Copies the gradients into `grad` (a `Model::zeros_like` of the same structure).
    pub fn download_grads(&self, grad: &mut Model) -> Result<()> {
        let host = download(&self.dev, self.grads())?;
        self.fill(grad, &host)
    }

    /// Writes arena contents `host` into `model`'s trainable tensors (by name, every one).
    fn fill(&self, model: &mut Model, host: &[f32]) -> Result<()> {
        let mut err: Option<Error> = None;
        let mut seen = 0;
        model.visit(&mut |name, t| {
            if err.is_some() {
                return;
            }
            match self.layout.get(name) {
                Ok(s) if s.len == t.len() && s.off + s.len <= host.len() => {
                    t.copy_from_slice(&host[s.off..s.off + s.len]);
                    seen += 1;
                }
                Ok(s) => {
                    err = Some(Error::Input(format!("'{name}': {} values here, {} on the device", t.len(), s.len)))
                }
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if seen != self.layout.slots.len() {
            return Err(Error::Input(format!(
                "the model has {seen} trainable tensors, the device {}",
                self.layout.slots.len()
            )));
        }
        Ok(())
    }
}
