//! The Multi-Token Prediction loss of the GPU training pass, as core's `Model::mtp_pass`: module
//! k predicts t_{i+k+1} from the previous depth's output (the main post-norm hidden state for
//! k = 1) and the embedding of t_{i+k}, through `[enorm(emb) ‖ hnorm(hin)]·eh_projᵀ`, one
//! decoder block and `shared_head.norm`, with the main model's head; loss `λ/D·Σ_k CE_k`.
use super::block::{BalanceTerms, Cx, Dimsm, LayerW, LinW};
use super::layout::{inverse, ArenaLayout, BatchLayout};
use super::mm::{rd, wr, ActView, Mm, View};
use crate::device::Device;
use crate::ops::moe_train::Spans;
use crate::ops::{elementwise, gather, norm, train as tk};
use crate::tensor::{upload, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::model::mtp::Mtp;
use dsv3_core::{Config, Result};

/// One MTP module's tensors in the arenas.
pub(crate) struct MtpW {
    enorm: usize,
    hnorm: usize,
    eh: LinW,
    block: LayerW,
    head_norm: usize,
}

impl MtpW {
    /// Module `k` (`model.layers.{L + k}`); its router biases are counted in `n_bias`.
    pub fn of(lay: &ArenaLayout, cfg: &Config, k: usize, m: &Mtp, n_bias: &mut usize) -> Result<MtpW> {
        let idx = cfg.num_hidden_layers + k;
        let p = format!("model.layers.{idx}");
        let d = cfg.hidden_size;
        Ok(MtpW {
            enorm: lay.off(&format!("{p}.enorm.weight"), d)?,
            hnorm: lay.off(&format!("{p}.hnorm.weight"), d)?,
            eh: LinW::of(lay, &format!("{p}.eh_proj"), d, 2 * d)?,
            block: LayerW::of(lay, cfg, idx, &m.block, n_bias)?,
            head_norm: lay.off(&format!("{p}.shared_head.norm.weight"), d)?,
        })
    }
}

/// What the MTP pass reads.
pub(crate) struct MtpIn<'a> {
    pub dev: &'a Device,
    pub mm: &'a Mm,
    pub dt: DType,
    pub master: &'a CudaSlice<f32>,
    pub wb: &'a Act,
    pub ones: &'a Act,
    pub inv_freq: &'a CudaSlice<f32>,
    pub attention_factor: f32,
    pub dm: Dimsm,
    /// The MTP blocks' router biases.
    pub biases: &'a [CudaSlice<f32>],
    pub embed: usize,
    pub head: usize,
    pub vocab: usize,
    pub seqs: &'a [&'a [u32]],
    /// The main model's post-norm hidden states `[N, D]`.
    pub normed: &'a Act,
    pub n_main: usize,
    pub lambda: f32,
    pub scale: f32,
    pub seq_alpha: f32,
    pub aux_alpha: f32,
    /// The FP8 copies (FP8 precision): the MTP blocks' linears are FP8 as the decoder's.
    pub fp8: Option<&'a super::fp8::Fp8Weights>,
}

/// The MTP pass's results, still on the device: per depth (deepest first) the head's per-row
/// losses with their count and weight, and the blocks' balance-loss terms.
pub(crate) struct MtpOut {
    pub ce: Vec<(CudaSlice<f32>, usize, f32)>,
    pub bal: Vec<BalanceTerms>,
}

struct Level {
    b: BatchLayout,
    prev: Vec<i32>,
    pos: CudaSlice<i32>,
    seq_spans: Spans,
    all_span: Spans,
    emb: Act,
    hin: Act,
    cat: Act,
    saved: super::block::Saved,
    out: Act,
    normed: Act,
}

/// The layers' context for one depth's rows.
fn cx_of<'a>(
    inp: &'a MtpIn<'_>,
    b: &'a BatchLayout,
    pos: &'a CudaSlice<i32>,
    seq_spans: &'a Spans,
    all_span: &'a Spans,
) -> Cx<'a> {
    Cx {
        dev: inp.dev,
        mm: inp.mm,
        dt: inp.dt,
        master: inp.master,
        wb: inp.wb,
        ones: inp.ones,
        b,
        pos,
        inv_freq: inp.inv_freq,
        attention_factor: inp.attention_factor,
        dm: inp.dm,
        biases: inp.biases,
        seq_spans,
        all_span,
        seq_alpha: inp.seq_alpha,
        aux_alpha: inp.aux_alpha,
        scale: inp.scale,
        fp8: inp.fp8,
    }
}

/// Forward and backward of every MTP depth: parameter gradients into `grad`, the main hidden
/// states' gradient added into `dnormed` (`[N, D]`).
pub(crate) fn mtp_pass(inp: &MtpIn, mods: &[MtpW], grad: &mut Act, dnormed: &mut Act) -> Result<MtpOut> {
    let (dev, dt) = (inp.dev, inp.dt);
    let (d, v, eps) = (inp.dm.d, inp.vocab, inp.dm.eps);
    let depth = mods.len();
    let mut levels: Vec<Level> = Vec::new();
    for (k, m) in mods.iter().enumerate().map(|(i, m)| (i + 1, m)) {
        let (b, prev) = BatchLayout::mtp_level(inp.seqs, k, inp.dm.h)?;
        let n = b.n;
        if n == 0 {
            break; // deeper levels are empty too
        }
        let tokens = upload(dev, &b.tokens)?;
        let pos = upload(dev, &b.pos)?;
        let prev_d = upload(dev, &prev)?;
        let seq_spans = Spans::new(dev, &b.lens)?;
        let all_span = Spans::new(dev, &[n])?;
        let mut emb = Act::empty(dev, dt, n * d)?;
        {
            let table = ActView::of(dev, inp.wb, inp.embed, v * d)?;
            gather::gather_rows(dev, &table, v, d, &tokens, n, d, &mut emb, d)?;
        }
        let mut hin = Act::empty(dev, dt, n * d)?;
        match levels.last() {
            None => gather::gather_rows(dev, inp.normed, inp.n_main, d, &prev_d, n, d, &mut hin, d)?,
            Some(p) => gather::gather_rows(dev, &p.out, p.b.n, d, &prev_d, n, d, &mut hin, d)?,
        }
        let mut cat = Act::empty(dev, dt, n * 2 * d)?;
        {
            let ew = View::of(dev, inp.master, m.enorm, d)?;
            norm::rmsnorm(dev, &mut emb, 0, d, Some((&mut cat, 0, 2 * d)), &ew, d, eps, n)?;
            let hw = View::of(dev, inp.master, m.hnorm, d)?;
            norm::rmsnorm(dev, &mut hin, 0, d, Some((&mut cat, d, 2 * d)), &hw, d, eps, n)?;
        }
        let cx = cx_of(inp, &b, &pos, &seq_spans, &all_span);
        let mut u = Act::empty(dev, dt, n * d)?;
        cx.lin(rd(&cat, 0, 2 * d), n, &m.eh, wr(&mut u, 0, d), false)?;
        let (saved, mut out) = cx.layer_fwd(&m.block, u)?;
        let mut normed = Act::empty(dev, dt, n * d)?;
        {
            let hw = View::of(dev, inp.master, m.head_norm, d)?;
            norm::rmsnorm(dev, &mut out, 0, d, Some((&mut normed, 0, d)), &hw, d, eps, n)?;
        }
        levels.push(Level { b, prev, pos, seq_spans, all_span, emb, hin, cat, saved, out, normed });
    }
    let mut res = MtpOut { ce: Vec::new(), bal: Vec::new() };
    let w = inp.lambda / depth as f32;
    // d hin of the next deeper level, `[(n + 1), D]` with a zero last row
    let mut dnext: Option<Act> = None;
    for k in (1..=levels.len()).rev() {
        let lv = &levels[k - 1];
        let m = &mods[k - 1];
        let n = lv.b.n;
        let p = lv.b.predicted();
        let cx = cx_of(inp, &lv.b, &lv.pos, &lv.seq_spans, &lv.all_span);
        let dnorm = if p > 0 {
            let denom = p as f32 / (w * inp.scale);
            let hh = super::pass::Head { dev, mm: inp.mm, dt, wb: inp.wb, head: inp.head, vocab: v, d };
            let (dn, rl) = hh.ce(&lv.normed, &lv.b, None, denom, grad)?;
            res.ce.push((rl, p, w));
            dn
        } else {
            Act::zeros(dev, dt, n * d)?
        };
        let mut dout = match dnext.take() {
            Some(dh) => {
                let next = &levels[k];
                let inv = upload(dev, &inverse(&next.prev, n))?;
                let mut o = Act::empty(dev, dt, n * d)?;
                gather::gather_rows(dev, &dh, next.b.n + 1, d, &inv, n, d, &mut o, d)?;
                o
            }
            None => Act::zeros(dev, dt, n * d)?,
        };
        {
            let mut t = Act::empty(dev, dt, n * d)?;
            let hw = View::of(dev, inp.master, m.head_norm, d)?;
            let mut gv = View::of(dev, super::mm::f32_of(grad)?, m.head_norm, d)?;
            tk::rmsnorm_backward(dev, &lv.out, d, &hw, &dnorm, d, &mut t, d, &mut gv, d, eps, n)?;
            elementwise::add(dev, &mut dout, &t, n * d)?;
        }
        let mut terms = BalanceTerms::new();
        cx.layer_bwd(&m.block, &lv.saved, &mut dout, grad, &mut terms)?;
        res.bal.push(terms);
        let mut dcat = Act::empty(dev, dt, n * 2 * d)?;
        cx.lin_bwd(rd(&lv.cat, 0, 2 * d), rd(&dout, 0, d), n, &m.eh, grad, Some((wr(&mut dcat, 0, 2 * d), false)))?;
        let mut demb = Act::empty(dev, dt, n * d)?;
        let mut dhin = Act::zeros(dev, dt, (n + 1) * d)?;
        {
            let ew = View::of(dev, inp.master, m.enorm, d)?;
            let mut gv = View::of(dev, super::mm::f32_of(grad)?, m.enorm, d)?;
            tk::rmsnorm_backward(dev, &lv.emb, d, &ew, &dcat, 2 * d, &mut demb, d, &mut gv, d, eps, n)?;
            let hw = View::of(dev, inp.master, m.hnorm, d)?;
            let mut gv = View::of(dev, super::mm::f32_of(grad)?, m.hnorm, d)?;
            let dh = ActView::of(dev, &dcat, d, n * 2 * d - d)?;
            tk::rmsnorm_backward(dev, &lv.hin, d, &hw, &dh, 2 * d, &mut dhin, d, &mut gv, d, eps, n)?;
        }
        {
            let mut gv = View::of(dev, super::mm::f32_of(grad)?, inp.embed, v * d)?;
            tk::embedding_backward(dev, &tk::EmbedRows::new(dev, &lv.b.tokens, v)?, &demb, d, &mut gv, v, d)?;
        }
        if k == 1 {
            let inv = upload(dev, &inverse(&lv.prev, inp.n_main))?;
            let mut o = Act::empty(dev, dt, inp.n_main * d)?;
            gather::gather_rows(dev, &dhin, n + 1, d, &inv, inp.n_main, d, &mut o, d)?;
            elementwise::add(dev, dnormed, &o, inp.n_main * d)?;
        } else {
            dnext = Some(dhin);
        }
    }
    Ok(res)
}
