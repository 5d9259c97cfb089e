//! DeepSeek-V3's FP8 recipe in the GPU training pass (`TrainOptions::precision == Fp8`), as the
//! CPU oracle's `Linear` with `Precision::Fp8` (core/src/model/linear.rs) computes it:
//!
//! - Fprop `y = Q1x128(x) · Q128x128(W)ᵀ`: `x` quantized per token in 1x128 tiles
//!   (`quant_1x128`), W in 128x128 blocks; `fp8_gemm` with `BScales::Block128` (core:
//!   `low_precision_forward`, `quantize_values(x, .., Tile1x128)` and the cached `fp8_weights`).
//! - Dgrad `dx = Q1x128(dy) · Q128x128(W)`: `dy` per token in 1x128 tiles, B the transpose `Wᵀ`
//!   `[in, out]` of the same block-quantized weight (codes transposed, each block's scale
//!   unchanged: `quant_block128`'s transposed outputs; core reads `qw` through strides with
//!   `sb(b)[j] = qw.scales[b·kb + j/128]`). `dx +=` adds the finished product (core: a temporary
//!   then `dx += t`).
//! - Wgrad `dW += Q(dyᵀ) · Q(xᵀ)`: both operands quantized 128x1 along the tokens of this call
//!   (`quant_t128`: written transposed, codes `[cols, tokens]` with 1x128 scales along the new
//!   K = tokens, = core's `quantize_values(.., Tile128x1, ..)` read as `(·, 1, n)` strides), f32
//!   `fp8_gemm` with `BScales::Tile1x128` accumulating into the gradient arena.
//! - f32 promotion every 128 K (the kernels' and core's `promoted_gemm`), scales
//!   `max(amax, 1e-4)/448`, not rounded to powers of two (core's training `Linear` passes
//!   `ue8m0 = false`).
//!
//! Which linears: [`fp8_linears`], the same set as core's `Model::set_precision` (attention
//! projections, dense MLPs, routed and shared experts inside the decoder layers and the MTP
//! blocks; the embedding, lm_head, router, norms, attention core and `eh_proj` stay in the
//! dtype's GEMMs). Their FP8 copies ([`Fp8Weights`]: codes of W and Wᵀ, block scales) are
//! quantized from the f32 masters once per optimizer step by `CudaTrainModel::refresh` (core
//! re-quantizes after every step too).
//!
//! MoE experts: Fprop and Dgrad are single grouped-contiguous `fp8_gemm` calls over the dispatch
//! plan (rows per expert, 64-row tiles, expert weights at a uniform stride in the FP8 copies).
//! The pass builds that plan on the device in token order (`ops::moe_train::plan_token_order`:
//! each expert's rows in core's `per[e]` order, so the Wgrad's 128-token tiles hold the tokens
//! core's hold; no host round trip). Wgrad ([`fp8_expert_wgrad`]): its 128-token tiles start at
//! each expert's first row, as core's per-expert `Linear::backward`. dY and X are quantized once
//! each for all experts (`quant_t128_groups`: expert e's tokens transposed into a 128-aligned
//! segment of one buffer, zero padded, bit for bit `quant_t128` of its rows alone), then on sm_90a
//! one K-grouped `fp8_gemm_tma` launch multiplies every expert's segment into its gradient
//! (`fp8_gemm_kgrouped`: 3 launches per projection). In the pass both read the plan's segment
//! table on the device ([`ExpertRows::Device`]; the operands sized for the most the segments can
//! span, `(ceil(rows/128) + E)·128` tokens), so nothing is read back. Elsewhere (sm_80, or
//! `DSV3_FP8_KERNEL` forcing another kernel) the row offsets are downloaded (one round trip per
//! expert Wgrad) and one `fp8_gemm` per expert reads its segment through strides (codes from
//! column `seg[e]` with row stride `seg[E]`, scales from token block `seg[e]/128`; 2 + E
//! launches). The quantization is bit for bit right on the H100; the Wgrad through it hit a
//! misaligned store there (fixed, not yet re-run); `DSV3_FP8_WGRAD_BATCH=0` keeps the first form
//! (`quant_t128` twice per expert, each with its own buffers, then the GEMM: 3·E launches) with
//! the same operand bits (the products too while both run unsplit: the per-expert GEMMs over the
//! aligned segments admit `fp8_gemm_tma`'s split-K for experts with many tokens and few output
//! tiles, which sums the 128-token groups in another f32 order; the K-grouped launch never
//! splits).
//!
//! Activation quantization buffers are allocated per call (the pass allocates its activations
//! the same way).
use super::block::Cx;
use super::layout::ArenaLayout;
use super::mm::{dims, rd, ActView, Dims, Groups, Rd, View, Wr};
use crate::device::{cuda_err, Device};
use crate::ops::fp8::{
    fp8_gemm, quant_1x128, quant_block128_batch, quant_t128, quant_t128_groups, quant_t128_groups_table, t128_segments,
    tma_allowed, BScales, Fp8BlockOut, Fp8Gemm, Fp8Kernel, Fp8Operand, Fp8Out,
};
use crate::ops::fp8_tma::{fp8_gemm_kgrouped, KSegments};
use crate::ops::gemm::{Grouped, Layout, GEMM_BM};
use crate::ops::int;
use crate::tensor::{empty, upload, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::model::block::Ffn;
use dsv3_core::model::linear::Linear;
use dsv3_core::model::mla::QProj;
use dsv3_core::model::mlp::Mlp;
use dsv3_core::model::Model;
use dsv3_core::{Error, Result};
use std::collections::HashMap;
use std::sync::OnceLock;

const T: usize = 128;
// the grouped FP8 GEMM walks the dispatch plan's row tiles
const _: () = assert!(crate::ops::fp8::FP8_BM == GEMM_BM);

/// An FP8-eligible linear (or `groups` routed experts of one MoE layer): the weight's checkpoint
/// name (expert 0's for experts), its shape `[out, inp]`, and for experts the name parts that
/// `ArenaLayout::expert_stride` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Spec {
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub groups: usize,
    pub experts: Option<(String, String)>,
}

/// The linears core's `Model::set_precision` sets, walked the same way (decoder layers, then the
/// MTP modules' blocks): per block the query projection(s), `kv_a_proj_with_mqa`, `kv_b_proj`,
/// `o_proj`, and the dense MLP or the routed experts (grouped) and shared experts.
pub fn fp8_linears(model: &Model) -> Vec<Fp8Spec> {
    let mut out = Vec::new();
    let l = model.cfg.num_hidden_layers;
    let blocks = model.layers.iter().enumerate().chain(model.mtp.iter().enumerate().map(|(k, m)| (l + k, &m.block)));
    for (i, b) in blocks {
        let p = format!("model.layers.{i}");
        let mut one = |name: String, lin: &Linear| {
            out.push(Fp8Spec {
                name: format!("{name}.weight"),
                out: lin.out_dim,
                inp: lin.in_dim,
                groups: 1,
                experts: None,
            })
        };
        let a = format!("{p}.self_attn");
        match &b.attn.q {
            QProj::Lora { a: qa, b: qb, .. } => {
                one(format!("{a}.q_a_proj"), qa);
                one(format!("{a}.q_b_proj"), qb);
            }
            QProj::Plain(q) => one(format!("{a}.q_proj"), q),
        }
        one(format!("{a}.kv_a_proj_with_mqa"), &b.attn.kv_a);
        one(format!("{a}.kv_b_proj"), &b.attn.kv_b);
        one(format!("{a}.o_proj"), &b.attn.o);
        let mut mlp = |prefix: String, m: &Mlp| {
            one(format!("{prefix}.gate_proj"), &m.gate);
            one(format!("{prefix}.up_proj"), &m.up);
            one(format!("{prefix}.down_proj"), &m.down);
        };
        match &b.ffn {
            Ffn::Dense(m) => mlp(format!("{p}.mlp"), m),
            Ffn::Moe(m) => {
                if let Some(s) = &m.shared {
                    mlp(format!("{p}.mlp.shared_experts"), s);
                }
                if let Some(e0) = m.experts.first() {
                    for (suffix, lin) in [("gate_proj", &e0.gate), ("up_proj", &e0.up), ("down_proj", &e0.down)] {
                        out.push(Fp8Spec {
                            name: format!("{p}.mlp.experts.0.{suffix}.weight"),
                            out: lin.out_dim,
                            inp: lin.in_dim,
                            groups: m.experts.len(),
                            experts: Some((format!("{p}.mlp"), format!("{suffix}.weight"))),
                        });
                    }
                }
            }
        }
    }
    out
}

/// Where one FP8 linear's copies live: `src` its f32 master (expert g's at `src + g·src_stride`),
/// `q` the codes of W `[groups][out, inp]`, `qt` of Wᵀ `[groups][inp, out]`, `s` the block scales
/// `[groups][ceil(out/128), ceil(inp/128)]`, `st` those of Wᵀ `[groups][ceil(inp/128),
/// ceil(out/128)]` (offsets into [`Fp8Weights`]' code and scale buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Slot {
    pub src: usize,
    pub src_stride: usize,
    pub groups: usize,
    pub out: usize,
    pub inp: usize,
    pub q: usize,
    pub qt: usize,
    pub s: usize,
    pub st: usize,
}

impl Fp8Slot {
    /// Codes of one group's W.
    pub fn codes(&self) -> usize {
        self.out * self.inp
    }
    /// Block scales of one group's W.
    pub fn blocks(&self) -> usize {
        self.out.div_ceil(T) * self.inp.div_ceil(T)
    }
}

/// Byte alignment of every code block (the GEMMs' 16-byte vector loads) and scale alignment.
const CODE_ALIGN: usize = 256;
const SCALE_ALIGN: usize = 64;

/// The FP8 copies' layout (host bookkeeping; no device needed).
#[derive(Debug, Clone, Default)]
pub struct Fp8Layout {
    pub slots: Vec<Fp8Slot>,
    /// Bytes of codes, f32 scales.
    pub codes: usize,
    pub scales: usize,
    index: HashMap<usize, usize>,
}

impl Fp8Layout {
    /// Device bytes of the copies (codes and f32 scales).
    pub fn bytes(&self) -> usize {
        self.codes + 4 * self.scales
    }

    /// Places the FP8 copies of `specs` (masters found in `lay`).
    pub fn new(lay: &ArenaLayout, specs: &[Fp8Spec]) -> Result<Fp8Layout> {
        let mut l = Fp8Layout::default();
        for sp in specs {
            let len = sp.out * sp.inp;
            let (src, src_stride) = match &sp.experts {
                Some((prefix, suffix)) => lay.expert_stride(prefix, suffix, sp.groups, len)?,
                None => (lay.off(&sp.name, len)?, 0),
            };
            if sp.groups == 0 || len == 0 {
                return Err(Error::Input(format!("FP8 training: '{}' is empty", sp.name)));
            }
            let mut slot =
                Fp8Slot { src, src_stride, groups: sp.groups, out: sp.out, inp: sp.inp, q: 0, qt: 0, s: 0, st: 0 };
            let (nc, ns) = (sp.groups * slot.codes(), sp.groups * slot.blocks());
            slot.q = l.codes;
            slot.qt = slot.q + nc.next_multiple_of(CODE_ALIGN);
            l.codes = slot.qt + nc.next_multiple_of(CODE_ALIGN);
            slot.s = l.scales;
            slot.st = slot.s + ns.next_multiple_of(SCALE_ALIGN);
            l.scales = slot.st + ns.next_multiple_of(SCALE_ALIGN);
            if l.index.insert(src, l.slots.len()).is_some() {
                return Err(Error::Input(format!("FP8 training: '{}' listed twice", sp.name)));
            }
            l.slots.push(slot);
        }
        Ok(l)
    }

    /// The FP8 linear whose (first) master starts at arena offset `src`.
    pub fn get(&self, src: usize) -> Option<&Fp8Slot> {
        self.index.get(&src).map(|&i| &self.slots[i])
    }
}

/// The FP8 weights on the device: codes of W and Wᵀ and their block scales for every slot.
pub(crate) struct Fp8Weights {
    pub layout: Fp8Layout,
    codes: CudaSlice<u8>,
    scales: CudaSlice<f32>,
}

impl Fp8Weights {
    pub fn new(dev: &Device, layout: Fp8Layout) -> Result<Fp8Weights> {
        let codes = empty::<u8>(dev, layout.codes)?;
        let scales = empty::<f32>(dev, layout.scales)?;
        Ok(Fp8Weights { layout, codes, scales })
    }

    /// Quantizes every slot from the f32 masters (128x128 blocks, W and Wᵀ): after each change of
    /// the masters (core: `Model::requantize`).
    pub fn refresh(&mut self, dev: &Device, master: &CudaSlice<f32>) -> Result<()> {
        // one launch per slot: its groups (experts) are the launch's z (packed outputs at
        // g·codes / g·blocks, the slot's layout)
        for sl in &self.layout.slots {
            let (nc, nb, g) = (sl.codes(), sl.blocks(), sl.groups);
            if g == 0 {
                continue;
            }
            let x = ActView::f32(dev, master, sl.src, (g - 1) * sl.src_stride + nc)?;
            let mut q = View::of(dev, &self.codes, sl.q, g * nc)?;
            let mut s = View::of(dev, &self.scales, sl.s, g * nb)?;
            let mut qt = View::of(dev, &self.codes, sl.qt, g * nc)?;
            let mut st = View::of(dev, &self.scales, sl.st, g * nb)?;
            let out = Fp8BlockOut { q: &mut q, scale: &mut s, transposed: Some((&mut qt, &mut st)) };
            quant_block128_batch(dev, &x, sl.inp, sl.out, sl.inp, g, sl.src_stride, out, false)?;
        }
        Ok(())
    }

    /// B operand of Fprop (W `[out, inp]`, all groups) or Dgrad (Wᵀ `[inp, out]`).
    fn operand(&self, dev: &Device, sl: &Fp8Slot, transposed: bool) -> Result<(View<u8>, View<f32>, usize, usize)> {
        let (nc, nb) = (sl.groups * sl.codes(), sl.groups * sl.blocks());
        let (q, s, ld, s_rs) = if transposed {
            (sl.qt, sl.st, sl.out, sl.out.div_ceil(T))
        } else {
            (sl.q, sl.s, sl.inp, sl.inp.div_ceil(T))
        };
        Ok((View::of(dev, &self.codes, q, nc)?, View::of(dev, &self.scales, s, nb)?, ld, s_rs))
    }
}

/// A quantized activation operand: codes (row `r` at `q[r·ld..]`, K contiguous) and scales
/// (row `r`, K group `kb` at `s[r·s_rs + kb]`).
struct QOp {
    q: CudaSlice<u8>,
    s: CudaSlice<f32>,
    ld: usize,
    s_rs: usize,
}

impl QOp {
    fn operand(&self) -> Fp8Operand<'_> {
        Fp8Operand { q: &self.q, ld: self.ld, scale: &self.s, s_rs: self.s_rs, s_ks: 1 }
    }
}

/// `m` rows of `k` values of `x` quantized per token in 1x128 tiles (activations, activation
/// gradients).
fn quant_rows(dev: &Device, x: Rd, m: usize, k: usize) -> Result<QOp> {
    let xv = ActView::of(dev, x.buf, x.off, (m - 1) * x.ld + k)?;
    let kg = k.div_ceil(T);
    let mut q = empty::<u8>(dev, m * k)?;
    let mut s = empty::<f32>(dev, m * kg)?;
    quant_1x128(dev, &xv, x.ld, m, k, Fp8Out::dense(&mut q, &mut s, k), false)?;
    Ok(QOp { q, s, ld: k, s_rs: kg })
}

/// `m` tokens (rows) of `cols` values of `x` quantized 128x1 along the tokens, written transposed:
/// codes `[cols, m]`, scales `[cols, ceil(m/128)]` (a Wgrad operand with K = tokens).
fn quant_tokens(dev: &Device, x: Rd, m: usize, cols: usize) -> Result<QOp> {
    let xv = ActView::of(dev, x.buf, x.off, (m - 1) * x.ld + cols)?;
    let tg = m.div_ceil(T);
    let mut q = empty::<u8>(dev, cols * m)?;
    let mut s = empty::<f32>(dev, cols * tg)?;
    let out = Fp8Out { q: &mut q, ld: m, scale: &mut s, s_rs: tg, s_cs: 1 };
    quant_t128(dev, &xv, x.ld, m, cols, out, false)?;
    Ok(QOp { q, s, ld: m, s_rs: tg })
}

/// The `fp8_gemm` D operand: a view of `c` from `c.off` over `m` rows of `n` (row stride `c.ld`).
fn d_view(dev: &Device, c: &Wr, m: usize, n: usize) -> Result<ActView> {
    ActView::of(dev, c.buf, c.off, (m - 1) * c.ld + n)
}

impl Cx<'_> {
    /// The FP8 copies of the linear whose master starts at `w`, when the pass runs FP8 and it is
    /// an FP8 linear.
    pub(crate) fn fp8_slot(&self, w: usize) -> Option<(&Fp8Weights, &Fp8Slot)> {
        let f = self.fp8?;
        f.layout.get(w).map(|s| (f, s))
    }

    /// `C (+)= A·Wᵀ` (NT: `d.n` = out, `d.k` = inp) or `C (+)= A·W` (NN: `d.k` = out, `d.n` = inp)
    /// with the weight at master offset `w` (row stride `ldw`): FP8 for an FP8 linear, else the
    /// dtype's GEMM.
    pub(crate) fn wmm(&self, l: Layout, d: Dims, a: Rd, w: usize, ldw: usize, c: Wr) -> Result<()> {
        match self.fp8_slot(w) {
            Some((f, sl)) => self.fp8_mm(f, sl, l, d, a, ldw, c, None, 0),
            None => self.mm.run(self.dev, l, d, a, rd(self.wb, w, ldw), c, None),
        }
    }

    /// [`Cx::wmm`] grouped by expert (`g.groups` experts, weight `e` at `w + e·stride`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gwmm(
        &self,
        l: Layout,
        d: Dims,
        a: Rd,
        w: usize,
        ldw: usize,
        stride: usize,
        c: Wr,
        g: &Groups,
    ) -> Result<()> {
        match self.fp8_slot(w) {
            Some((f, sl)) => self.fp8_mm(f, sl, l, d, a, ldw, c, Some(g), stride),
            None => self.mm.grouped(self.dev, l, d, a, Rd { buf: self.wb, off: w, ld: ldw, st: stride }, c, g),
        }
    }

    /// Wgrad `dW (+)= dyᵀ·x` (`d.m` = out, `d.n` = inp, `d.k` = tokens) into the gradient `c`
    /// (arena offset `c.off` = the weight's master offset).
    pub(crate) fn wgrad(&self, d: Dims, dy: Rd, x: Rd, c: Wr) -> Result<()> {
        match self.fp8_slot(c.off) {
            Some((_, sl)) => {
                self.fp8_shape(sl, d.m, d.n, c.ld, None)?;
                fp8_wgrad(self.dev, d, dy, x, c)
            }
            None => self.mm.run(self.dev, Layout::TN, d, dy, x, c, None),
        }
    }

    /// [`Cx::wgrad`] grouped by expert: `d.k` all routed rows, expert `e`'s rows
    /// `[ro[e], ro[e+1])` into its gradient at `c.off + e·c.st` ([`fp8_expert_wgrad`]; batched
    /// unless `DSV3_FP8_WGRAD_BATCH=0`).
    pub(crate) fn gwgrad(&self, d: Dims, dy: Rd, x: Rd, c: Wr, g: &Groups) -> Result<()> {
        let Some((_, sl)) = self.fp8_slot(c.off) else {
            return self.mm.grouped(self.dev, Layout::TN, d, dy, x, c, g);
        };
        self.fp8_shape(sl, d.m, d.n, c.ld, Some((g.groups, c.st)))?;
        let rows = match (g.host, g.t128) {
            (Some(ro), _) if ro.len() > g.groups => ExpertRows::Host(&ro[..g.groups + 1]),
            (_, Some(t128)) => ExpertRows::Device { t128, groups: g.groups },
            _ => return Err(Error::Input("FP8 expert Wgrad: no row offsets for the experts".into())),
        };
        fp8_expert_wgrad(self.dev, d, dy, x, c, rows, wgrad_batched())
    }

    /// `y (+)= x·Wᵀ + b` of an FP8 linear with a bias: the FP8 product, then the bias in the
    /// dtype's path (core: `add_bias` after the FP8 GEMM).
    pub(crate) fn fp8_lin_bias(&self, x: Rd, d: Dims, w: usize, ldw: usize, b: usize, y: Wr) -> Result<()> {
        let (buf, off, ld) = (y.buf, y.off, y.ld);
        self.wmm(Layout::NT, d, x, w, ldw, Wr { buf: &mut *buf, off, ld, st: 0 })?;
        match self.dt {
            DType::F32 => {
                let bv = ActView::f32(self.dev, self.master, b, d.n)?;
                self.mm.add_bias(self.dev, self.ones, &bv, d.m, d.n, Wr { buf, off, ld, st: 0 })
            }
            // y += 1·0 + b: a rank-1 product with a zero row, the f32 bias in its epilogue (the
            // non-FP8 bf16 path's bias, unrounded)
            DType::Bf16 => {
                let zero = Act::zeros(self.dev, DType::Bf16, d.n)?;
                let bv = View::of(self.dev, self.master, b, d.n)?;
                let c = Wr { buf, off, ld, st: 0 };
                self.mm.run(
                    self.dev,
                    Layout::NN,
                    dims(d.m, d.n, 1).acc(true),
                    rd(self.ones, 0, 1),
                    rd(&zero, 0, d.n),
                    c,
                    Some(&bv),
                )
            }
        }
    }

    /// Checks a product's shape against the FP8 slot (`out`, `inp`, the weight's row stride, and
    /// for experts the group count and stride).
    fn fp8_shape(
        &self,
        sl: &Fp8Slot,
        out: usize,
        inp: usize,
        ld: usize,
        grouped: Option<(usize, usize)>,
    ) -> Result<()> {
        let ok_groups = match grouped {
            None => sl.groups == 1,
            Some((g, st)) => g == sl.groups && (g == 1 || st == sl.src_stride),
        };
        if out != sl.out || inp != sl.inp || ld != sl.inp || !ok_groups {
            return Err(Error::Input(format!(
                "FP8 linear at {}: a [{out}, {inp}] product (ld {ld}, groups {grouped:?}) on a [{}, {}] weight x {}",
                sl.src, sl.out, sl.inp, sl.groups
            )));
        }
        Ok(())
    }

    /// Fprop (NT) or Dgrad (NN) in FP8.
    #[allow(clippy::too_many_arguments)]
    fn fp8_mm(
        &self,
        f: &Fp8Weights,
        sl: &Fp8Slot,
        l: Layout,
        d: Dims,
        a: Rd,
        ldw: usize,
        c: Wr,
        g: Option<&Groups>,
        stride: usize,
    ) -> Result<()> {
        let dev = self.dev;
        if d.batch != 1 {
            return Err(Error::Input("FP8 linear: batched product".into()));
        }
        let (out, inp, transposed) = match l {
            Layout::NT => (d.n, d.k, false),
            Layout::NN => (d.k, d.n, true),
            Layout::TN => return Err(Error::Input("FP8 linear: Wgrad goes through Cx::wgrad".into())),
        };
        self.fp8_shape(sl, out, inp, ldw, g.map(|g| (g.groups, stride)))?;
        if d.m == 0 || d.n == 0 {
            return Ok(());
        }
        // A: activations (Fprop) or activation gradients (Dgrad), 1x128 per token
        let qa = quant_rows(dev, a, d.m, d.k)?;
        let (bq, bs, ldb, sb_rs) = f.operand(dev, sl, transposed)?;
        let grouped =
            g.map(|g| Grouped { row_offsets: g.row_offsets, tile_offsets: g.tile_offsets, max_tiles: g.max_tiles });
        let gm = Fp8Gemm {
            m: d.m,
            n: d.n,
            k: d.k,
            a: qa.operand(),
            b: Fp8Operand { q: &bq, ld: ldb, scale: &bs, s_rs: sb_rs, s_ks: 1 },
            b_scales: BScales::Block128,
            ldd: c.ld,
            accumulate: d.acc,
            groups: sl.groups,
            stride_b: sl.codes(),
            stride_sb: sl.blocks(),
            grouped,
        };
        let mut dv = d_view(dev, &c, d.m, d.n)?;
        fp8_gemm(dev, &gm, &mut dv, Fp8Kernel::Auto)
    }
}

/// `DSV3_FP8_WGRAD_BATCH=0`: the expert Wgrad quantizes per expert (the first form: two
/// `quant_t128` launches and allocations per expert) instead of once per operand for all experts.
fn wgrad_batched() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV3_FP8_WGRAD_BATCH").as_deref() != Ok("0"))
}

/// The f32 gradient view of `c` over `[out, inp]` for `fp8_gemm`.
fn wgrad_d(dev: &Device, c: &Wr, out: usize, inp: usize) -> Result<ActView> {
    let dv = d_view(dev, c, out, inp)?;
    if dv.dtype() != DType::F32 {
        return Err(Error::Input("FP8 Wgrad: the gradient must be f32".into()));
    }
    Ok(dv)
}

/// The Wgrad `fp8_gemm` `[out, inp]` over `t` tokens (both operands 1x128 along the tokens).
fn wgrad_gemm<'a>(
    out: usize,
    inp: usize,
    t: usize,
    a: Fp8Operand<'a>,
    b: Fp8Operand<'a>,
    c: &Wr,
    acc: bool,
) -> Fp8Gemm<'a> {
    Fp8Gemm {
        m: out,
        n: inp,
        k: t,
        a,
        b,
        b_scales: BScales::Tile1x128,
        ldd: c.ld,
        accumulate: acc,
        groups: 1,
        stride_b: 0,
        stride_sb: 0,
        grouped: None,
    }
}

/// Wgrad of one FP8 linear: `dW (+)= Q(dyᵀ)·Q(xᵀ)` over `d.k` tokens (`d.m` = out, `d.n` = inp)
/// into the f32 gradient `c` from `c.off`.
fn fp8_wgrad(dev: &Device, d: Dims, dy: Rd, x: Rd, c: Wr) -> Result<()> {
    let (out, inp, t) = (d.m, d.n, d.k);
    if t == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    let qa = quant_tokens(dev, dy, t, out)?;
    let qb = quant_tokens(dev, x, t, inp)?;
    let gm = wgrad_gemm(out, inp, t, qa.operand(), qb.operand(), &c, d.acc);
    let mut dv = wgrad_d(dev, &c, out, inp)?;
    fp8_gemm(dev, &gm, &mut dv, Fp8Kernel::Auto)
}

/// Where [`fp8_expert_wgrad`] finds each expert's rows.
#[derive(Clone, Copy)]
pub enum ExpertRows<'a> {
    /// The row offsets `[G + 1]` on the host.
    Host(&'a [i32]),
    /// `ops::moe_train::plan_token_order`'s `t128` table on the device (`[2G + 2]`: the row
    /// offsets, then the 128-aligned segments of the batched form): nothing read back where the
    /// batched form runs its K-grouped `fp8_gemm_tma` launch (the FP8 training pass on sm_90a);
    /// elsewhere the offsets are downloaded first (one round trip).
    Device { t128: &'a CudaSlice<i32>, groups: usize },
}

/// FP8 Wgrad of grouped weights (the routed experts of a MoE layer): `d.k` routed rows of `dy`
/// (`d.m` = out columns) and `x` (`d.n` = inp), expert `e`'s rows `[ro[e], ro[e+1])` (`rows`:
/// on the host, or the device table, [`ExpertRows`]; `G` experts), `dW_e (+)= Q(dy_eᵀ)·Q(x_eᵀ)` into the f32 gradient at
/// `c.off + e·c.st`; an expert without rows is untouched (core skips it). Each expert's 128-token
/// tiles start at its first row (core's per-expert `Linear::backward`).
///
/// `batched`: each operand quantized for all experts in one `quant_t128_groups` launch (expert
/// `e`'s tokens in a 128-aligned segment of one buffer, `t128_segments`), then one K-grouped
/// `fp8_gemm_tma` launch over all segments where [`tma_allowed`], else one `fp8_gemm` per expert
/// over views of its segment (codes from column `seg[e]` with row stride `seg[G]`, scales from
/// token block `seg[e]/128`): the GEMMs read bit for bit the operands of the per-expert form
/// (`!batched`: `quant_t128` per expert and operand; the products agree bit for bit unless the
/// batched form's aligned segments let `fp8_gemm_tma` split K, see the module doc).
/// The quantization checked on the H100; this function's GEMMs faulted there on a 4-byte aligned
/// gradient slice (`fp8_store2`, fixed 2026-11-24, not yet re-run on a GPU).
pub fn fp8_expert_wgrad(dev: &Device, d: Dims, dy: Rd, x: Rd, c: Wr, rows: ExpertRows, batched: bool) -> Result<()> {
    let ro = match rows {
        ExpertRows::Host(ro) => ro,
        ExpertRows::Device { t128, groups } if batched && tma_allowed(dev) => {
            return expert_wgrad_from_table(dev, d, dy, x, c, t128, groups);
        }
        ExpertRows::Device { t128, groups } => {
            if t128.len() < groups + 1 {
                return Err(Error::Input(format!("FP8 expert Wgrad: a table of {} for {groups} experts", t128.len())));
            }
            let host = dev
                .stream
                .clone_dtoh(&t128.slice(..groups + 1))
                .map_err(|e| cuda_err("downloading the expert rows", e))?;
            return fp8_expert_wgrad(dev, d, dy, x, c, ExpertRows::Host(&host), batched);
        }
    };
    let groups = ro.len().saturating_sub(1);
    for e in 0..groups {
        let (r0, r1) = (ro[e], ro[e + 1]);
        if r0 < 0 || r1 < r0 || r1 as usize > d.k {
            return Err(Error::Input(format!("FP8 expert Wgrad: bad group offsets {r0}..{r1} of {}", d.k)));
        }
    }
    let (out, inp) = (d.m, d.n);
    if !batched {
        for e in 0..groups {
            let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
            if r0 == r1 {
                continue; // core skips an expert without rows (its gradient untouched)
            }
            let dye = Rd { off: dy.off + r0 * dy.ld, st: 0, ..dy };
            let xe = Rd { off: x.off + r0 * x.ld, st: 0, ..x };
            let ce = Wr { buf: &mut *c.buf, off: c.off + e * c.st, ld: c.ld, st: 0 };
            fp8_wgrad(dev, Dims { k: r1 - r0, ..d }, dye, xe, ce)?;
        }
        return Ok(());
    }
    let seg = t128_segments(ro)?;
    let total = seg[groups];
    if total == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    let tb = total / T;
    let rows = ro[groups] as usize;
    if tma_allowed(dev) {
        // one launch for every expert: fp8_gemm_tma grouped along K over the segments, from the
        // table the training pass builds on the device
        let mut table = ro.to_vec();
        for &s in &seg {
            table.push(int(s, "FP8 Wgrad segment")?);
        }
        return expert_wgrad_from_table(dev, d, dy, x, c, &upload(dev, &table)?, groups);
    }
    // codes [cols, total] (expert e's tokens at columns seg[e]..), scales [cols, total/128]
    let quant = |v: Rd, cols: usize| -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
        let xv = ActView::of(dev, v.buf, v.off, (rows - 1) * v.ld + cols)?;
        let mut q = empty::<u8>(dev, cols * total)?;
        let mut s = empty::<f32>(dev, cols * tb)?;
        let o = Fp8Out { q: &mut q, ld: total, scale: &mut s, s_rs: tb, s_cs: 1 };
        quant_t128_groups(dev, &xv, v.ld, ro, cols, o, false)?;
        Ok((q, s))
    };
    let (aq, asc) = quant(dy, out)?;
    let (bq, bsc) = quant(x, inp)?;
    for e in 0..groups {
        let t = (ro[e + 1] - ro[e]) as usize;
        if t == 0 {
            continue; // core skips an expert without rows (its gradient untouched)
        }
        let (s0, b0, kg) = (seg[e], seg[e] / T, t.div_ceil(T));
        let (aqe, ase) =
            (View::of(dev, &aq, s0, (out - 1) * total + t)?, View::of(dev, &asc, b0, (out - 1) * tb + kg)?);
        let (bqe, bse) =
            (View::of(dev, &bq, s0, (inp - 1) * total + t)?, View::of(dev, &bsc, b0, (inp - 1) * tb + kg)?);
        let a = Fp8Operand { q: &aqe, ld: total, scale: &ase, s_rs: tb, s_ks: 1 };
        let b = Fp8Operand { q: &bqe, ld: total, scale: &bse, s_rs: tb, s_ks: 1 };
        let ce = Wr { buf: &mut *c.buf, off: c.off + e * c.st, ld: c.ld, st: 0 };
        let gm = wgrad_gemm(out, inp, t, a, b, &ce, d.acc);
        let mut dv = wgrad_d(dev, &ce, out, inp)?;
        fp8_gemm(dev, &gm, &mut dv, Fp8Kernel::Auto)?;
    }
    Ok(())
}

/// The batched K-grouped expert Wgrad of [`fp8_expert_wgrad`] from the device table `t128`
/// (`[2G + 2]`), nothing read back: the quantized operands hold `total = (ceil(d.k / 128) + G)·128`
/// token columns, at least the table's last segment (`Σ_e ceil(n_e / 128)·128 <= d.k + 127·G`),
/// of which the quantization fills and the GEMM reads the segments only.
fn expert_wgrad_from_table(
    dev: &Device,
    d: Dims,
    dy: Rd,
    x: Rd,
    c: Wr,
    t128: &CudaSlice<i32>,
    groups: usize,
) -> Result<()> {
    let (out, inp, rows) = (d.m, d.n, d.k);
    if groups == 0 || rows == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    let total = (rows.div_ceil(T) + groups) * T;
    let tb = total / T;
    let quant = |v: Rd, cols: usize| -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
        let xv = ActView::of(dev, v.buf, v.off, (rows - 1) * v.ld + cols)?;
        let mut q = empty::<u8>(dev, cols * total)?;
        let mut s = empty::<f32>(dev, cols * tb)?;
        let o = Fp8Out { q: &mut q, ld: total, scale: &mut s, s_rs: tb, s_cs: 1 };
        quant_t128_groups_table(dev, &xv, v.ld, t128, groups, rows, total, cols, o, false)?;
        Ok((q, s))
    };
    let (aq, asc) = quant(dy, out)?;
    let (bq, bsc) = quant(x, inp)?;
    let a = Fp8Operand { q: &aq, ld: total, scale: &asc, s_rs: tb, s_ks: 1 };
    let b = Fp8Operand { q: &bq, ld: total, scale: &bsc, s_rs: tb, s_ks: 1 };
    let gm = wgrad_gemm(out, inp, total, a, b, &c, d.acc);
    let mut dv = ActView::of(dev, c.buf, c.off, (groups - 1) * c.st + (out - 1) * c.ld + inp)?;
    if dv.dtype() != DType::F32 {
        return Err(Error::Input("FP8 Wgrad: the gradient must be f32".into()));
    }
    let segs = KSegments { dev: t128, off: groups + 1, groups };
    fp8_gemm_kgrouped(dev, &gm, &mut dv, segs, c.st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_core::fp8::gemm::fp8_gemm as cpu_fp8_gemm;
    use dsv3_core::fp8::quant::{quantize_unchecked, quantize_values, ScaleLayout};
    use dsv3_core::model::linear::Precision;
    use dsv3_core::model::LoadOptions;
    use dsv3_core::rng::Rng;
    use std::collections::BTreeSet;

    fn fixture(name: &str) -> Model {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let mut m = Model::load(&root.join(name), LoadOptions::default()).unwrap();
        m.make_trainable();
        m
    }

    /// A tiny-preset model with one MTP module (random weights).
    fn tiny_mtp() -> Model {
        let mut c = dsv3_core::presets::preset("tiny").unwrap();
        c.num_nextn_predict_layers = 1;
        let mut store = dsv3_core::weights::TensorStore::new();
        let t = dsv3_core::weights::init::random_checkpoint(&c, 4, 0.02);
        store.add_bytes(dsv3_core::weights::write::to_bytes(&t).unwrap(), "<init>").unwrap();
        let mut m = Model::from_store(c, store, LoadOptions::default()).unwrap();
        m.make_trainable();
        m
    }

    #[test]
    fn fp8_linears_are_the_projections_of_the_decoder_and_mtp_blocks() {
        // core's set_precision: every `*_proj*` weight inside model.layers.* (decoder layers and
        // MTP blocks) except MTP's eh_proj; never the router (`mlp.gate`), norms, embedding, head
        let mut models: Vec<(String, Model)> = ["v3_group", "v3_tiny", "v3_qnull", "v3_fp8", "v2_lite", "v2_group"]
            .iter()
            .map(|n| (n.to_string(), fixture(n)))
            .collect();
        models.push(("tiny_mtp".into(), tiny_mtp()));
        for (name, model) in &models {
            let (lay, _) = ArenaLayout::of(model).unwrap();
            let fl = Fp8Layout::new(&lay, &fp8_linears(model)).unwrap();
            let by_off: HashMap<usize, &str> = lay.slots.iter().map(|s| (s.off, s.name.as_str())).collect();
            let mut got = BTreeSet::new();
            for sl in &fl.slots {
                for g in 0..sl.groups {
                    let n = by_off[&(sl.src + g * sl.src_stride)];
                    assert_eq!(lay.get(n).unwrap().len, sl.out * sl.inp, "{name}: {n}");
                    assert!(got.insert(n.to_string()), "{name}: {n} twice");
                }
            }
            let want: BTreeSet<String> = lay
                .slots
                .iter()
                .map(|s| s.name.clone())
                .filter(|n| {
                    let module = n.strip_suffix(".weight").and_then(|p| p.rsplit('.').next()).unwrap_or("");
                    n.starts_with("model.layers.") && module.contains("_proj") && module != "eh_proj"
                })
                .collect();
            assert_eq!(got, want, "{name}");
            if name == "tiny_mtp" {
                assert!(got.iter().any(|n| n.starts_with(&format!("model.layers.{}.", model.cfg.num_hidden_layers))));
            }
            // the copies do not overlap and are aligned
            let mut code_ranges: Vec<(usize, usize)> = Vec::new();
            let mut scale_ranges: Vec<(usize, usize)> = Vec::new();
            for sl in &fl.slots {
                let (nc, ns) = (sl.groups * sl.codes(), sl.groups * sl.blocks());
                assert!(sl.q % CODE_ALIGN == 0 && sl.qt % CODE_ALIGN == 0);
                code_ranges.extend([(sl.q, sl.q + nc), (sl.qt, sl.qt + nc)]);
                scale_ranges.extend([(sl.s, sl.s + ns), (sl.st, sl.st + ns)]);
                assert_eq!(fl.get(sl.src), Some(sl));
            }
            for r in [&mut code_ranges, &mut scale_ranges] {
                r.sort();
                assert!(r.windows(2).all(|w| w[0].1 <= w[1].0), "{name}: overlapping FP8 copies");
            }
            assert!(code_ranges.last().unwrap().1 <= fl.codes && scale_ranges.last().unwrap().1 <= fl.scales);
        }
    }

    #[test]
    fn t128_segments_start_every_expert_on_a_128_token_block() {
        // the batched expert Wgrad's segments: counts rounded up to 128, empty experts zero-width
        let seg = t128_segments(&[0, 0, 5, 133, 133, 261, 262, 390]).unwrap();
        assert_eq!(seg, [0, 0, 128, 256, 256, 384, 512, 640]);
        assert_eq!(t128_segments(&[7, 7]).unwrap(), [0, 0]);
        assert_eq!(t128_segments(&[3, 131]).unwrap(), [0, 128]);
        assert!(t128_segments(&[]).is_err());
        assert!(t128_segments(&[-1, 4]).is_err());
        assert!(t128_segments(&[0, 9, 8]).is_err());
    }

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    fn assert_near(got: &[f32], want: &[f32], what: &str) {
        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * amax + 1e-5 * w.abs(), "{what}: {i}: {g} vs {w}");
        }
    }

    /// The operands the GPU pass builds (quant_1x128 of the activations, quant_block128's W and
    /// its transpose, quant_t128's transposed 128x1 Wgrad operands: each verified bit for bit
    /// against these core calls by kernels/tests/fp8.rs), multiplied by core's reference FP8
    /// GEMM, give core's FP8 `Linear` forward, Dgrad and Wgrad (to f32 summation order).
    #[test]
    fn the_gpu_operand_conventions_reproduce_cores_fp8_linear() {
        let mut rng = Rng::new(9);
        for (m, out, inp) in [(3usize, 5usize, 7usize), (130, 200, 129), (257, 64, 300)] {
            let w = randn(&mut rng, out * inp);
            let x = randn(&mut rng, m * inp);
            let dy = randn(&mut rng, m * out);
            let mut lin = Linear::from_f32(out, inp, w.clone(), None);
            lin.precision = Precision::Fp8;
            lin.requantize();
            let mut y = vec![0f32; m * out];
            lin.forward(&x, m, &mut y);
            let mut grad = Linear::from_f32(out, inp, vec![0.0; out * inp], None);
            let mut dx = vec![0f32; m * inp];
            lin.backward(&x, m, &dy, &mut grad, Some(&mut dx), false);
            let dsv3_core::model::linear::Weight::F32(gw) = &grad.weight else { unreachable!() };
            // Fprop: A = x 1x128, B = W 128x128 blocks
            let qx = quantize_unchecked(&x, m, inp, ScaleLayout::Tile1x128, false);
            let qw = quantize_unchecked(&w, out, inp, ScaleLayout::Block128, false);
            let mut yg = vec![0f32; m * out];
            cpu_fp8_gemm(&qx, &qw, &mut yg, false).unwrap();
            assert_near(&yg, &y, "fprop");
            // Dgrad: A = dy 1x128, B = Wᵀ (the block-quantized W transposed: blocks keep scales)
            let qdy = quantize_unchecked(&dy, m, out, ScaleLayout::Tile1x128, false);
            let qwt = qw.transposed();
            assert_eq!(qwt.layout, ScaleLayout::Block128);
            let (ob, kb) = (out.div_ceil(128), inp.div_ceil(128));
            for j in 0..inp {
                for b in 0..ob {
                    // the kernel reads Wᵀ's block scale at (j/128)·ob + b; core at b·kb + j/128
                    assert_eq!(qwt.scales[(j / 128) * ob + b], qw.scales[b * kb + j / 128]);
                }
            }
            let mut dxg = vec![0f32; m * inp];
            cpu_fp8_gemm(&qdy, &qwt, &mut dxg, false).unwrap();
            assert_near(&dxg, &dx, "dgrad");
            // Wgrad: A = dyᵀ, B = xᵀ, both 128x1 along tokens, transposed to 1x128 along K = tokens
            let qa = quantize_unchecked(&dy, m, out, ScaleLayout::Tile128x1, false).transposed();
            let qb = quantize_unchecked(&x, m, inp, ScaleLayout::Tile128x1, false).transposed();
            assert_eq!((qa.layout, qb.layout), (ScaleLayout::Tile1x128, ScaleLayout::Tile1x128));
            let mut gwg = vec![0f32; out * inp];
            cpu_fp8_gemm(&qa, &qb, &mut gwg, true).unwrap();
            assert_near(&gwg, gw, "wgrad");
            // and the same values core quantizes (the activation path's values, bit for bit)
            let qv = quantize_values(&x, m, inp, ScaleLayout::Tile1x128, false);
            assert_eq!(qv.scales, qx.scales);
        }
    }
}
