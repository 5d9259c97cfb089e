//! One decoder layer of the GPU training pass, forward (keeping activations) and backward, as
//! core's `Block::forward_train` / `Block::backward`: MLA in its naive form over whole sequences
//! (explicit causal probabilities per sequence and head; in bf16 mode the flash kernels instead,
//! `train/flash.rs`), the dense SwiGLU MLP, and DeepSeekMoE
//! (router, grouped expert GEMMs over the dispatch plan, shared experts, balance losses).
use super::layout::{ArenaLayout, BatchLayout};
use super::mm::{copy, dims, f32_of, f32_of_mut, rd, wr, ActView, Groups, Mm, Rd, View, Wr};
use crate::device::Device;
use crate::ops::gemm::Layout::{NN, NT, TN};
use crate::ops::moe::{self, Plan, RouteCfg};
use crate::ops::moe_train::{self, Spans};
use crate::ops::rope::RopeLayout;
use crate::ops::{elementwise, gather, norm, rope, train as tk};
use crate::tensor::{download, empty, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::config::{Config, LORA_NORM_EPS};
use dsv3_core::model::block::{Block, Ffn};
use dsv3_core::model::mla::QProj;
use dsv3_core::{Error, Result};

/// A linear layer's place in the arenas: weight `[out, inp]`, optional bias `[out]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinW {
    pub w: usize,
    pub bias: Option<usize>,
    pub out: usize,
    pub inp: usize,
}

impl LinW {
    pub(crate) fn of(lay: &ArenaLayout, prefix: &str, out: usize, inp: usize) -> Result<LinW> {
        let bname = format!("{prefix}.bias");
        Ok(LinW {
            w: lay.off(&format!("{prefix}.weight"), out * inp)?,
            bias: if lay.has(&bname) { Some(lay.off(&bname, out)?) } else { None },
            out,
            inp,
        })
    }
}

pub(crate) enum QW {
    Lora { a: LinW, norm: usize, b: LinW },
    Plain(LinW),
}

pub(crate) struct MlaW {
    q: QW,
    kv_a: LinW,
    kv_norm: usize,
    kv_b: LinW,
    o: LinW,
}

/// A SwiGLU MLP: gate / up `[inter, D]`, down `[D, inter]`; `stride` between experts (grouped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpW {
    gate: usize,
    up: usize,
    down: usize,
    inter: usize,
    stride: usize,
}

pub(crate) struct MoeW {
    router: usize,
    experts: MlpW,
    n_experts: usize,
    shared: Option<MlpW>,
    pub cfg: RouteCfg,
    /// Index into the model's router biases.
    pub bias: Option<usize>,
}

pub(crate) enum FfnW {
    Dense(MlpW),
    Moe(MoeW),
}

/// One decoder layer's tensors in the arenas.
pub(crate) struct LayerW {
    input_norm: usize,
    attn: MlaW,
    post_norm: usize,
    pub ffn: FfnW,
}

impl LayerW {
    /// The layer `model.layers.{i}` (`block` its CPU form, for the structure); `n_bias` counts
    /// the router biases found so far.
    pub fn of(lay: &ArenaLayout, cfg: &Config, i: usize, block: &Block, n_bias: &mut usize) -> Result<LayerW> {
        let p = format!("model.layers.{i}");
        let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
        let (dn, dr, dv, c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let dq = dn + dr;
        let a = format!("{p}.self_attn");
        let q = match &block.attn.q {
            QProj::Lora { a: qa, .. } => {
                let rq = qa.out_dim;
                QW::Lora {
                    a: LinW::of(lay, &format!("{a}.q_a_proj"), rq, d)?,
                    norm: lay.off(&format!("{a}.q_a_layernorm.weight"), rq)?,
                    b: LinW::of(lay, &format!("{a}.q_b_proj"), h * dq, rq)?,
                }
            }
            QProj::Plain(_) => QW::Plain(LinW::of(lay, &format!("{a}.q_proj"), h * dq, d)?),
        };
        let attn = MlaW {
            q,
            kv_a: LinW::of(lay, &format!("{a}.kv_a_proj_with_mqa"), c + dr, d)?,
            kv_norm: lay.off(&format!("{a}.kv_a_layernorm.weight"), c)?,
            kv_b: LinW::of(lay, &format!("{a}.kv_b_proj"), h * (dn + dv), c)?,
            o: LinW::of(lay, &format!("{a}.o_proj"), d, h * dv)?,
        };
        let mlp = |prefix: &str, inter: usize| -> Result<MlpW> {
            let gate = LinW::of(lay, &format!("{prefix}.gate_proj"), inter, d)?;
            let up = LinW::of(lay, &format!("{prefix}.up_proj"), inter, d)?;
            let down = LinW::of(lay, &format!("{prefix}.down_proj"), d, inter)?;
            if gate.bias.is_some() || up.bias.is_some() || down.bias.is_some() {
                return Err(Error::Unsupported("GPU training: MLP biases".into()));
            }
            Ok(MlpW { gate: gate.w, up: up.w, down: down.w, inter, stride: 0 })
        };
        let ffn = match &block.ffn {
            Ffn::Dense(m) => FfnW::Dense(mlp(&format!("{p}.mlp"), m.gate.out_dim)?),
            Ffn::Moe(m) => {
                let e = m.experts.len();
                let inter = m.experts.first().map_or(0, |x| x.gate.out_dim);
                if e == 0 || m.experts.iter().any(|x| x.gate.out_dim != inter) {
                    return Err(Error::Unsupported("GPU training: experts of different widths".into()));
                }
                if m.experts.iter().any(|x| x.gate.bias.is_some() || x.up.bias.is_some() || x.down.bias.is_some()) {
                    return Err(Error::Unsupported("GPU training: expert biases".into()));
                }
                let mp = format!("{p}.mlp");
                let (gate, st) = lay.expert_stride(&mp, "gate_proj.weight", e, inter * d)?;
                let (up, st_u) = lay.expert_stride(&mp, "up_proj.weight", e, inter * d)?;
                let (down, st_d) = lay.expert_stride(&mp, "down_proj.weight", e, inter * d)?;
                if st != st_u || st != st_d {
                    return Err(Error::Input("GPU training: expert tensors are not evenly spaced".into()));
                }
                let r = &m.router;
                if r.n_experts != e || r.top_k > crate::ops::moe::MOE_KMAX || e > crate::ops::moe::MOE_EMAX {
                    return Err(Error::Unsupported(format!(
                        "GPU training: {e} experts, top-{} (at most {} and {})",
                        r.top_k,
                        crate::ops::moe::MOE_EMAX,
                        crate::ops::moe::MOE_KMAX
                    )));
                }
                let bias = r.bias.as_ref().map(|_| {
                    *n_bias += 1;
                    *n_bias - 1
                });
                FfnW::Moe(MoeW {
                    router: lay.off(&format!("{mp}.gate.weight"), e * d)?,
                    experts: MlpW { gate, up, down, inter, stride: st },
                    n_experts: e,
                    shared: match &m.shared {
                        Some(s) => Some(mlp(&format!("{mp}.shared_experts"), s.gate.out_dim)?),
                        None => None,
                    },
                    cfg: RouteCfg::of(r),
                    bias,
                })
            }
        };
        Ok(LayerW {
            input_norm: lay.off(&format!("{p}.input_layernorm.weight"), d)?,
            attn,
            post_norm: lay.off(&format!("{p}.post_attention_layernorm.weight"), d)?,
            ffn,
        })
    }
}

/// Model dimensions the layers use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dimsm {
    pub d: usize,
    pub h: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
    pub c: usize,
    pub scale: f32,
    pub eps: f32,
}

impl Dimsm {
    pub fn of(cfg: &Config) -> Dimsm {
        Dimsm {
            d: cfg.hidden_size,
            h: cfg.num_attention_heads,
            dn: cfg.qk_nope_head_dim,
            dr: cfg.qk_rope_head_dim,
            dv: cfg.v_head_dim,
            c: cfg.kv_lora_rank,
            scale: dsv3_core::ops::rope::softmax_scale(cfg),
            eps: cfg.rms_norm_eps,
        }
    }
    fn dq(&self) -> usize {
        self.dn + self.dr
    }
    fn w(&self) -> usize {
        self.h * (self.dn + self.dv)
    }
}

/// What one pass shares across layers.
pub(crate) struct Cx<'a> {
    pub dev: &'a Device,
    pub mm: &'a Mm,
    pub dt: DType,
    /// f32 masters (norm weights, biases).
    pub master: &'a CudaSlice<f32>,
    /// The GEMM weight operand: the bf16 working copies (bf16 mode) or the masters (f32).
    pub wb: &'a Act,
    /// `[≥ N·K]` ones in the activation dtype (bias rows and bias gradients).
    pub ones: &'a Act,
    pub b: &'a BatchLayout,
    pub pos: &'a CudaSlice<i32>,
    pub inv_freq: &'a CudaSlice<f32>,
    pub attention_factor: f32,
    pub dm: Dimsm,
    pub biases: &'a [CudaSlice<f32>],
    /// Sequence spans and one span of all rows (balance losses).
    pub seq_spans: &'a Spans,
    pub all_span: &'a Spans,
    pub seq_alpha: f32,
    pub aux_alpha: f32,
    pub scale: f32,
    /// The FP8 copies of the FP8 linears (`TrainOptions::precision == Fp8`; `train/fp8.rs`).
    pub fp8: Option<&'a super::fp8::Fp8Weights>,
}

/// A layer's saved activations.
pub(crate) struct Saved {
    x: Act,
    h1: Act,
    qa: Option<Act>,
    qan: Option<Act>,
    q: Act,
    ckv: Act,
    cn: Act,
    kv: Act,
    /// The causal probabilities (f32), or with flash attention the log-sum-exp `[N, H]`.
    p: Act,
    pb: Option<Act>,
    attn: Act,
    mid: Act,
    h2: Act,
    ffn: FfnSaved,
}

struct MlpSaved {
    gu: Act,
    a: Act,
}

struct MoeSaved {
    logits: Act,
    idx: CudaSlice<i32>,
    w: CudaSlice<f32>,
    plan: Plan,
    /// The plan's row offsets and FP8 Wgrad segments (`moe_train::plan_token_order`).
    t128: CudaSlice<i32>,
    host_ro: Option<Vec<i32>>,
    xe: Act,
    e: MlpSaved,
    ye: Act,
    shared: Option<MlpSaved>,
}

enum FfnSaved {
    Dense(MlpSaved),
    Moe(Box<MoeSaved>),
}

/// What a MoE layer's backward reports: its balance-loss terms still on the device
/// (`(row terms, spans)` per active loss) for one download at the end of the pass.
pub(crate) type BalanceTerms = Vec<(CudaSlice<f32>, usize)>;

impl Cx<'_> {
    fn act(&self, n: usize) -> Result<Act> {
        Act::empty(self.dev, self.dt, n)
    }

    fn f32_view(&self, off: usize, len: usize) -> Result<View<f32>> {
        View::of(self.dev, self.master, off, len)
    }

    fn wt(&self, off: usize, ld: usize) -> Rd<'_> {
        rd(self.wb, off, ld)
    }

    /// `y (+)= x·Wᵀ + b` for `m` rows.
    pub(crate) fn lin(&self, x: Rd, m: usize, l: &LinW, y: Wr, acc: bool) -> Result<()> {
        let d = dims(m, l.out, l.inp).acc(acc);
        if self.fp8_slot(l.w).is_some() {
            return match l.bias {
                Some(b) => self.fp8_lin_bias(x, d, l.w, l.inp, b, y),
                None => self.wmm(NT, d, x, l.w, l.inp, y),
            };
        }
        match (l.bias, self.dt) {
            (None, _) => self.mm.run(self.dev, NT, d, x, self.wt(l.w, l.inp), y, None),
            (Some(b), DType::Bf16) => {
                let bv = self.f32_view(b, l.out)?;
                self.mm.run(self.dev, NT, d, x, self.wt(l.w, l.inp), y, Some(&bv))
            }
            (Some(b), DType::F32) => {
                let (buf, off, ld) = (y.buf, y.off, y.ld);
                self.mm.run(self.dev, NT, d, x, self.wt(l.w, l.inp), Wr { buf: &mut *buf, off, ld, st: 0 }, None)?;
                let bv = ActView::f32(self.dev, self.master, b, l.out)?;
                self.mm.add_bias(self.dev, self.ones, &bv, m, l.out, Wr { buf, off, ld, st: 0 })
            }
        }
    }

    /// Backward of [`Cx::lin`]: `dW += dyᵀ·x`, `db += Σ dy`, `dx (+)= dy·W`.
    pub(crate) fn lin_bwd(&self, x: Rd, dy: Rd, m: usize, l: &LinW, g: &mut Act, dx: Option<(Wr, bool)>) -> Result<()> {
        self.wgrad(dims(l.out, l.inp, m).acc(true), dy, x, wr(g, l.w, l.inp))?;
        if let Some(b) = l.bias {
            self.mm.run(self.dev, TN, dims(l.out, 1, m).acc(true), dy, rd(self.ones, 0, 1), wr(g, b, 1), None)?;
        }
        if let Some((dx, acc)) = dx {
            self.wmm(NN, dims(m, l.inp, l.out).acc(acc), dy, l.w, l.inp, dx)?;
        }
        Ok(())
    }

    /// `y = rmsnorm(x)` over `rows` rows of `d` (strides `ldx`, `ldy`).
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        x: &mut Act,
        ldx: usize,
        y: &mut Act,
        ldy: usize,
        w: usize,
        d: usize,
        eps: f32,
        rows: usize,
    ) -> Result<()> {
        let wv = self.f32_view(w, d)?;
        norm::rmsnorm(self.dev, x, 0, ldx, Some((y, 0, ldy)), &wv, d, eps, rows)
    }

    /// Backward of [`Cx::norm`]: writes `dx`, adds into the weight's gradient.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        x: &Act,
        ldx: usize,
        dy: &Act,
        lddy: usize,
        dx: &mut Act,
        lddx: usize,
        w: usize,
        d: usize,
        eps: f32,
        g: &mut Act,
    ) -> Result<()> {
        let wv = self.f32_view(w, d)?;
        let mut gv = View::of(self.dev, f32_of(g)?, w, d)?;
        tk::rmsnorm_backward(self.dev, x, ldx, &wv, dy, lddy, dx, lddx, &mut gv, d, eps, self.b.n)
    }

    /// One layer forward from `x` (`[N, D]`, kept): returns its activations and the output.
    pub fn layer_fwd(&self, l: &LayerW, mut x: Act) -> Result<(Saved, Act)> {
        let (n, d, eps) = (self.b.n, self.dm.d, self.dm.eps);
        let mut h1 = self.act(n * d)?;
        self.norm(&mut x, d, &mut h1, d, l.input_norm, d, eps, n)?;
        let mut mid = self.act(n * d)?;
        copy(self.dev, &x, &mut mid, n * d)?;
        let at = self.mla_fwd(&l.attn, &h1, &mut mid)?;
        let mut h2 = self.act(n * d)?;
        self.norm(&mut mid, d, &mut h2, d, l.post_norm, d, eps, n)?;
        let mut out = self.act(n * d)?;
        copy(self.dev, &mid, &mut out, n * d)?;
        let ffn = match &l.ffn {
            FfnW::Dense(m) => FfnSaved::Dense(self.mlp_fwd(m, rd(&h2, 0, d), n, wr(&mut out, 0, d), true)?),
            FfnW::Moe(m) => FfnSaved::Moe(Box::new(self.moe_fwd(m, &h2, &mut out)?)),
        };
        let (qa, qan, q, ckv, cn, kv, p, pb, attn) = at;
        Ok((Saved { x, h1, qa, qan, q, ckv, cn, kv, p, pb, attn, mid, h2, ffn }, out))
    }

    /// One layer backward: `dres` is the gradient of the layer's output on entry and of its
    /// input on return. Balance-loss terms are appended to `bal`.
    pub fn layer_bwd(&self, l: &LayerW, s: &Saved, dres: &mut Act, g: &mut Act, bal: &mut BalanceTerms) -> Result<()> {
        let (n, d, eps) = (self.b.n, self.dm.d, self.dm.eps);
        let mut dh = self.act(n * d)?;
        match (&l.ffn, &s.ffn) {
            (FfnW::Dense(m), FfnSaved::Dense(sv)) => {
                self.mlp_bwd(m, rd(&s.h2, 0, d), n, sv, rd(dres, 0, d), g, wr(&mut dh, 0, d), false)?
            }
            (FfnW::Moe(m), FfnSaved::Moe(sv)) => self.moe_bwd(m, &s.h2, sv, dres, g, &mut dh, bal)?,
            _ => return Err(Error::Input("GPU training: layer structure mismatch".into())),
        }
        let mut dn = self.act(n * d)?;
        self.norm_bwd(&s.mid, d, &dh, d, &mut dn, d, l.post_norm, d, eps, g)?;
        elementwise::add(self.dev, dres, &dn, n * d)?;
        self.mla_bwd(&l.attn, s, dres, g, &mut dh)?;
        self.norm_bwd(&s.x, d, &dh, d, &mut dn, d, l.input_norm, d, eps, g)?;
        elementwise::add(self.dev, dres, &dn, n * d)
    }

    fn rope_q(&self) -> RopeLayout {
        let Dimsm { h, dn, dr, .. } = self.dm;
        let dq = self.dm.dq();
        RopeLayout { rows: self.b.n, ld_row: h * dq, heads: h, ld_head: dq, offset: dn, half: dr / 2 }
    }

    fn rope_k(&self) -> RopeLayout {
        let Dimsm { dr, c, .. } = self.dm;
        RopeLayout { rows: self.b.n, ld_row: c + dr, heads: 1, ld_head: c + dr, offset: c, half: dr / 2 }
    }

    /// MLA forward from `h1`: adds `o_proj(attention)` into `mid`.
    #[allow(clippy::type_complexity)]
    fn mla_fwd(
        &self,
        a: &MlaW,
        h1: &Act,
        mid: &mut Act,
    ) -> Result<(Option<Act>, Option<Act>, Act, Act, Act, Act, Act, Option<Act>, Act)> {
        let Dimsm { d, h, dn, dr, dv, c, scale, .. } = self.dm;
        let (n, dq, w) = (self.b.n, self.dm.dq(), self.dm.w());
        let mut q = self.act(n * h * dq)?;
        let (qa, qan) = match &a.q {
            QW::Lora { a: la, norm: nw, b: lb } => {
                let rq = la.out;
                let mut qa = self.act(n * rq)?;
                self.lin(rd(h1, 0, d), n, la, wr(&mut qa, 0, rq), false)?;
                let mut qan = self.act(n * rq)?;
                self.norm(&mut qa, rq, &mut qan, rq, *nw, rq, LORA_NORM_EPS, n)?;
                self.lin(rd(&qan, 0, rq), n, lb, wr(&mut q, 0, h * dq), false)?;
                (Some(qa), Some(qan))
            }
            QW::Plain(l) => {
                self.lin(rd(h1, 0, d), n, l, wr(&mut q, 0, h * dq), false)?;
                (None, None)
            }
        };
        let mut ckv = self.act(n * (c + dr))?;
        self.lin(rd(h1, 0, d), n, &a.kv_a, wr(&mut ckv, 0, c + dr), false)?;
        rope::rope(self.dev, &mut q, self.rope_q(), self.pos, self.inv_freq, self.attention_factor)?;
        rope::rope(self.dev, &mut ckv, self.rope_k(), self.pos, self.inv_freq, self.attention_factor)?;
        let mut cn = self.act(n * c)?;
        self.norm(&mut ckv, c + dr, &mut cn, c, a.kv_norm, c, LORA_NORM_EPS, n)?;
        let mut kv = self.act(n * w)?;
        self.lin(rd(&cn, 0, c), n, &a.kv_b, wr(&mut kv, 0, w), false)?;
        if self.flash_attn() {
            // flash attention (train/flash.rs): `p` keeps the log-sum-exp [N, H], no probabilities
            let mut attn = self.act(n * h * dv)?;
            let lse = self.flash_attn_fwd(&q, &kv, &ckv, &mut attn)?;
            self.lin(rd(&attn, 0, h * dv), n, &a.o, wr(mid, 0, d), true)?;
            return Ok((qa, qan, q, ckv, cn, kv, lse, None, attn));
        }
        // scores S = q_nope·k_noneᵀ + q_pe·k_peᵀ per (sequence, head), then the causal softmax
        let mut p = Act::empty(self.dev, DType::F32, self.b.p_total)?;
        for r in &self.b.runs {
            let (l, sq) = (r.len, r.seqs);
            let bd = |m, nn, k| dims(m, nn, k).batch(sq);
            for hh in 0..h {
                let po = r.p_off + hh * sq * l * l;
                let qo = r.row0 * h * dq + hh * dq;
                let qs = Rd { buf: &q, off: qo, ld: h * dq, st: l * h * dq };
                let kn = Rd { buf: &kv, off: r.row0 * w + hh * (dn + dv), ld: w, st: l * w };
                self.mm.run(self.dev, NT, bd(l, l, dn), qs, kn, Wr { buf: &mut p, off: po, ld: l, st: l * l }, None)?;
                let qp = Rd { off: qo + dn, ..qs };
                let kp = Rd { buf: &ckv, off: r.row0 * (c + dr) + c, ld: c + dr, st: l * (c + dr) };
                let dd = bd(l, l, dr).acc(true);
                self.mm.run(self.dev, NT, dd, qp, kp, Wr { buf: &mut p, off: po, ld: l, st: l * l }, None)?;
            }
            let len = h * sq * l * l;
            let mut pv = View::of(self.dev, f32_of(&p)?, r.p_off, len)?;
            tk::attn_softmax_causal(self.dev, &mut pv, h * sq, l, l, l * l, scale)?;
        }
        let pb = match self.dt {
            DType::Bf16 => {
                let mut pb = self.act(self.b.p_total)?;
                elementwise::cast(self.dev, &p, &mut pb, self.b.p_total)?;
                Some(pb)
            }
            DType::F32 => None,
        };
        // O = P·V per (sequence, head)
        let mut attn = self.act(n * h * dv)?;
        {
            let pa = pb.as_ref().unwrap_or(&p);
            for r in &self.b.runs {
                let (l, sq) = (r.len, r.seqs);
                for hh in 0..h {
                    let ps = Rd { buf: pa, off: r.p_off + hh * sq * l * l, ld: l, st: l * l };
                    let vs = Rd { buf: &kv, off: r.row0 * w + hh * (dn + dv) + dn, ld: w, st: l * w };
                    let os = Wr { buf: &mut attn, off: r.row0 * h * dv + hh * dv, ld: h * dv, st: l * h * dv };
                    self.mm.run(self.dev, NN, dims(l, dv, l).batch(sq), ps, vs, os, None)?;
                }
            }
        }
        self.lin(rd(&attn, 0, h * dv), n, &a.o, wr(mid, 0, d), true)?;
        Ok((qa, qan, q, ckv, cn, kv, p, pb, attn))
    }

    /// MLA backward: from `dmid` (the gradient of the attention output) writes `dh1`.
    fn mla_bwd(&self, a: &MlaW, s: &Saved, dmid: &Act, g: &mut Act, dh1: &mut Act) -> Result<()> {
        let Dimsm { d, h, dr, dv, c, .. } = self.dm;
        let (n, dq, w) = (self.b.n, self.dm.dq(), self.dm.w());
        let mut dattn = self.act(n * h * dv)?;
        self.lin_bwd(rd(&s.attn, 0, h * dv), rd(dmid, 0, d), n, &a.o, g, Some((wr(&mut dattn, 0, h * dv), false)))?;
        let (mut dq_, dkv, mut dckv) = if self.flash_attn() {
            self.flash_attn_bwd(&s.q, &s.kv, &s.ckv, &s.attn, &s.p, &dattn)?
        } else {
            self.explicit_attn_bwd(s, &dattn)?
        };
        // kv_b, kv_a_layernorm, RoPE of the shared key and of the queries
        let mut dcn = self.act(n * c)?;
        self.lin_bwd(rd(&s.cn, 0, c), rd(&dkv, 0, w), n, &a.kv_b, g, Some((wr(&mut dcn, 0, c), false)))?;
        self.norm_bwd(&s.ckv, c + dr, &dcn, c, &mut dckv, c + dr, a.kv_norm, c, LORA_NORM_EPS, g)?;
        crate::ops::rope::rope_backward(
            self.dev,
            &mut dckv,
            self.rope_k(),
            self.pos,
            self.inv_freq,
            self.attention_factor,
        )?;
        crate::ops::rope::rope_backward(
            self.dev,
            &mut dq_,
            self.rope_q(),
            self.pos,
            self.inv_freq,
            self.attention_factor,
        )?;
        self.lin_bwd(rd(&s.h1, 0, d), rd(&dckv, 0, c + dr), n, &a.kv_a, g, Some((wr(dh1, 0, d), false)))?;
        match (&a.q, &s.qa, &s.qan) {
            (QW::Lora { a: la, norm: nw, b: lb }, Some(qa), Some(qan)) => {
                let rq = la.out;
                let mut dqan = self.act(n * rq)?;
                self.lin_bwd(rd(qan, 0, rq), rd(&dq_, 0, h * dq), n, lb, g, Some((wr(&mut dqan, 0, rq), false)))?;
                let mut dqa = self.act(n * rq)?;
                self.norm_bwd(qa, rq, &dqan, rq, &mut dqa, rq, *nw, rq, LORA_NORM_EPS, g)?;
                self.lin_bwd(rd(&s.h1, 0, d), rd(&dqa, 0, rq), n, la, g, Some((wr(dh1, 0, d), true)))
            }
            (QW::Plain(l), _, _) => {
                self.lin_bwd(rd(&s.h1, 0, d), rd(&dq_, 0, h * dq), n, l, g, Some((wr(dh1, 0, d), true)))
            }
            _ => Err(Error::Input("GPU training: query path mismatch".into())),
        }
    }

    /// The explicit attention backward (the f32 oracle's path): from `dattn` returns `(dq, dkv,
    /// dckv)` as [`Cx::flash_attn_bwd`], through the saved probabilities.
    fn explicit_attn_bwd(&self, s: &Saved, dattn: &Act) -> Result<(Act, Act, Act)> {
        let Dimsm { h, dn, dr, dv, c, scale, .. } = self.dm;
        let (n, dq, w) = (self.b.n, self.dm.dq(), self.dm.w());
        let mut dp = Act::empty(self.dev, DType::F32, self.b.p_total)?;
        let mut dkv = self.act(n * w)?;
        let pa = s.pb.as_ref().unwrap_or(&s.p);
        for r in &self.b.runs {
            let (l, sq) = (r.len, r.seqs);
            for hh in 0..h {
                let po = r.p_off + hh * sq * l * l;
                let dos = Rd { buf: dattn, off: r.row0 * h * dv + hh * dv, ld: h * dv, st: l * h * dv };
                let vs = Rd { buf: &s.kv, off: r.row0 * w + hh * (dn + dv) + dn, ld: w, st: l * w };
                // dP = dO·Vᵀ, dV = Pᵀ·dO
                let dps = Wr { buf: &mut dp, off: po, ld: l, st: l * l };
                self.mm.run(self.dev, NT, dims(l, l, dv).batch(sq), dos, vs, dps, None)?;
                let ps = Rd { buf: pa, off: po, ld: l, st: l * l };
                let dvs = Wr { buf: &mut dkv, off: r.row0 * w + hh * (dn + dv) + dn, ld: w, st: l * w };
                self.mm.run(self.dev, TN, dims(l, dv, l).batch(sq), ps, dos, dvs, None)?;
            }
            let len = h * sq * l * l;
            let pv = View::of(self.dev, f32_of(&s.p)?, r.p_off, len)?;
            let mut dpv = View::of(self.dev, f32_of(&dp)?, r.p_off, len)?;
            tk::attn_softmax_backward(self.dev, &pv, &mut dpv, h * sq, l, l, l * l, scale)?;
        }
        let dsb = match self.dt {
            DType::Bf16 => {
                let mut b = self.act(self.b.p_total)?;
                elementwise::cast(self.dev, &dp, &mut b, self.b.p_total)?;
                Some(b)
            }
            DType::F32 => None,
        };
        let ds = dsb.as_ref().unwrap_or(&dp);
        let mut dq_ = self.act(n * h * dq)?;
        let mut dckv = self.act(n * (c + dr))?;
        for r in &self.b.runs {
            let (l, sq) = (r.len, r.seqs);
            for hh in 0..h {
                let dss = Rd { buf: ds, off: r.p_off + hh * sq * l * l, ld: l, st: l * l };
                let kn = Rd { buf: &s.kv, off: r.row0 * w + hh * (dn + dv), ld: w, st: l * w };
                let kp = Rd { buf: &s.ckv, off: r.row0 * (c + dr) + c, ld: c + dr, st: l * (c + dr) };
                let qo = r.row0 * h * dq + hh * dq;
                let qn = Rd { buf: &s.q, off: qo, ld: h * dq, st: l * h * dq };
                let qp = Rd { off: qo + dn, ..qn };
                // dQ = dS·K, dK = dSᵀ·Q (the rope key is shared: summed over heads)
                let c1 = Wr { buf: &mut dq_, off: qo, ld: h * dq, st: l * h * dq };
                self.mm.run(self.dev, NN, dims(l, dn, l).batch(sq), dss, kn, c1, None)?;
                let c2 = Wr { buf: &mut dq_, off: qo + dn, ld: h * dq, st: l * h * dq };
                self.mm.run(self.dev, NN, dims(l, dr, l).batch(sq), dss, kp, c2, None)?;
                let c3 = Wr { buf: &mut dkv, off: r.row0 * w + hh * (dn + dv), ld: w, st: l * w };
                self.mm.run(self.dev, TN, dims(l, dn, l).batch(sq), dss, qn, c3, None)?;
                let c4 = Wr { buf: &mut dckv, off: r.row0 * (c + dr) + c, ld: c + dr, st: l * (c + dr) };
                self.mm.run(self.dev, TN, dims(l, dr, l).batch(sq).acc(hh > 0), dss, qp, c4, None)?;
            }
        }
        Ok((dq_, dkv, dckv))
    }

    /// SwiGLU MLP forward over `m` rows of `x`: `out (+)= down(silu(gate(x))·up(x))`.
    fn mlp_fwd(&self, w: &MlpW, x: Rd, m: usize, out: Wr, acc: bool) -> Result<MlpSaved> {
        let (d, i) = (self.dm.d, w.inter);
        let mut gu = self.act(m * 2 * i)?;
        self.wmm(NT, dims(m, i, d), x, w.gate, d, wr(&mut gu, 0, 2 * i))?;
        self.wmm(NT, dims(m, i, d), x, w.up, d, wr(&mut gu, i, 2 * i))?;
        let mut a = self.act(m * i)?;
        elementwise::swiglu(self.dev, &gu, 2 * i, &mut a, i, i, m)?;
        self.wmm(NT, dims(m, d, i).acc(acc), rd(&a, 0, i), w.down, i, out)?;
        Ok(MlpSaved { gu, a })
    }

    /// Backward of [`Cx::mlp_fwd`]: gradients into `g`, `dx (+)= ...`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_bwd(&self, w: &MlpW, x: Rd, m: usize, s: &MlpSaved, dy: Rd, g: &mut Act, dx: Wr, acc: bool) -> Result<()> {
        let (d, i) = (self.dm.d, w.inter);
        let mut da = self.act(m * i)?;
        self.wmm(NN, dims(m, i, d), dy, w.down, i, wr(&mut da, 0, i))?;
        self.wgrad(dims(d, i, m).acc(true), dy, rd(&s.a, 0, i), wr(g, w.down, i))?;
        let mut dgu = self.act(m * 2 * i)?;
        tk::swiglu_backward(self.dev, &s.gu, 2 * i, &da, i, &mut dgu, 2 * i, i, m)?;
        let (dxb, dxo, dxl) = (dx.buf, dx.off, dx.ld);
        let dgr = rd(&dgu, 0, 2 * i);
        let dur = rd(&dgu, i, 2 * i);
        self.wmm(NN, dims(m, d, i).acc(acc), dgr, w.gate, d, wr(&mut *dxb, dxo, dxl))?;
        self.wmm(NN, dims(m, d, i).acc(true), dur, w.up, d, wr(dxb, dxo, dxl))?;
        self.wgrad(dims(i, d, m).acc(true), dgr, x, wr(g, w.gate, d))?;
        self.wgrad(dims(i, d, m).acc(true), dur, x, wr(g, w.up, d))
    }

    /// MoE forward from `h2`: adds the shared and routed experts' outputs into `out`.
    fn moe_fwd(&self, m: &MoeW, h2: &Act, out: &mut Act) -> Result<MoeSaved> {
        let (n, d) = (self.b.n, self.dm.d);
        let (e, k, i) = (m.n_experts, m.cfg.top_k, m.experts.inter);
        let nk = n * k;
        let mut logits = Act::empty(self.dev, DType::F32, n * e)?;
        self.mm.run(self.dev, NT, dims(n, e, d), rd(h2, 0, d), self.wt(m.router, d), wr(&mut logits, 0, e), None)?;
        let mut idx = empty::<i32>(self.dev, nk)?;
        let mut w = empty::<f32>(self.dev, nk)?;
        let bias = m.bias.map(|b| &self.biases[b]);
        moe::route(self.dev, f32_of(&logits)?, n, bias, &m.cfg, &mut idx, &mut w)?;
        // each expert's rows in token order (core's dispatch order: a fixed order for the Wgrad
        // sums, the FP8 Wgrad's 128-token tiles as core's), built on the device
        let mut plan = Plan::new(self.dev, e, nk)?;
        let mut t128 = empty::<i32>(self.dev, 2 * e + 2)?;
        moe_train::plan_token_order(self.dev, &idx, n, k, e, &mut plan, &mut t128)?;
        // f32 mode's cuBLAS products loop over the experts on the host; bf16 mode keeps the
        // experts on the grouped mma kernels (one launch, device offsets, no sync) also where its
        // dense products run on cuBLAS: one cuBLAS call per expert and product would cost more in
        // launches than it saves at these per-expert sizes (88M: ~1k rows x 512 x 256); the FP8
        // expert products read the device offsets and `t128`
        let host_ro = if self.dt == DType::F32 { Some(download(self.dev, &plan.row_offsets)?) } else { None };
        let mut xe = self.act(nk * d)?;
        gather::gather_rows(self.dev, h2, n, d, &plan.src_row, nk, d, &mut xe, d)?;
        let gr = Groups {
            row_offsets: &plan.row_offsets,
            tile_offsets: &plan.tile_offsets,
            max_tiles: Plan::max_tiles(nk, e),
            host: host_ro.as_deref(),
            t128: Some(&t128),
            groups: e,
        };
        let (ex, st) = (&m.experts, m.experts.stride);
        let mut gu = self.act(nk * 2 * i)?;
        let dd = dims(nk, i, d);
        self.gwmm(NT, dd, rd(&xe, 0, d), ex.gate, d, st, wr(&mut gu, 0, 2 * i), &gr)?;
        self.gwmm(NT, dd, rd(&xe, 0, d), ex.up, d, st, wr(&mut gu, i, 2 * i), &gr)?;
        let mut a = self.act(nk * i)?;
        elementwise::swiglu(self.dev, &gu, 2 * i, &mut a, i, i, nk)?;
        let mut ye = self.act(nk * d)?;
        self.gwmm(NT, dims(nk, d, i), rd(&a, 0, i), ex.down, i, st, wr(&mut ye, 0, d), &gr)?;
        let (shared, sh) = match &m.shared {
            Some(sw) => {
                let mut sh = self.act(n * d)?;
                let sv = self.mlp_fwd(sw, rd(h2, 0, d), n, wr(&mut sh, 0, d), false)?;
                (Some(sv), Some(sh))
            }
            None => (None, None),
        };
        moe::combine(self.dev, &ye, &plan, &idx, &w, sh.as_ref(), out, n, k, d)?;
        Ok(MoeSaved { logits, idx, w, plan, t128, host_ro, xe, e: MlpSaved { gu, a }, ye, shared })
    }

    /// MoE backward: from `dy` (the layer output's gradient) writes `dh2`.
    #[allow(clippy::too_many_arguments)]
    fn moe_bwd(
        &self,
        m: &MoeW,
        h2: &Act,
        s: &MoeSaved,
        dy: &Act,
        g: &mut Act,
        dh2: &mut Act,
        bal: &mut BalanceTerms,
    ) -> Result<()> {
        let (n, d) = (self.b.n, self.dm.d);
        let (e, k, i) = (m.n_experts, m.cfg.top_k, m.experts.inter);
        let nk = n * k;
        if let (Some(sw), Some(sv)) = (&m.shared, &s.shared) {
            self.mlp_bwd(sw, rd(h2, 0, d), n, sv, rd(dy, 0, d), g, wr(dh2, 0, d), false)?;
        }
        let mut dye = self.act(nk * d)?;
        let mut dw = empty::<f32>(self.dev, nk)?;
        moe_train::combine_backward(self.dev, dy, &s.ye, &s.plan, &s.w, &mut dye, &mut dw, n, k, d)?;
        let gr = Groups {
            row_offsets: &s.plan.row_offsets,
            tile_offsets: &s.plan.tile_offsets,
            max_tiles: Plan::max_tiles(nk, e),
            host: s.host_ro.as_deref(),
            t128: Some(&s.t128),
            groups: e,
        };
        let (ex, st) = (&m.experts, m.experts.stride);
        fn gst(g: &mut Act, off: usize, ld: usize, st: usize) -> Wr<'_> {
            Wr { buf: g, off, ld, st }
        }
        let mut dae = self.act(nk * i)?;
        self.gwmm(NN, dims(nk, i, d), rd(&dye, 0, d), ex.down, i, st, wr(&mut dae, 0, i), &gr)?;
        let dwd = dims(d, i, nk).acc(true);
        self.gwgrad(dwd, rd(&dye, 0, d), rd(&s.e.a, 0, i), gst(g, ex.down, i, st), &gr)?;
        let mut dgu = self.act(nk * 2 * i)?;
        tk::swiglu_backward(self.dev, &s.e.gu, 2 * i, &dae, i, &mut dgu, 2 * i, i, nk)?;
        let mut dxe = self.act(nk * d)?;
        let (dgr, dur) = (rd(&dgu, 0, 2 * i), rd(&dgu, i, 2 * i));
        self.gwmm(NN, dims(nk, d, i), dgr, ex.gate, d, st, wr(&mut dxe, 0, d), &gr)?;
        self.gwmm(NN, dims(nk, d, i).acc(true), dur, ex.up, d, st, wr(&mut dxe, 0, d), &gr)?;
        let dwg = dims(i, d, nk).acc(true);
        self.gwgrad(dwg, dgr, rd(&s.xe, 0, d), gst(g, ex.gate, d, st), &gr)?;
        self.gwgrad(dwg, dur, rd(&s.xe, 0, d), gst(g, ex.up, d, st), &gr)?;
        moe_train::dispatch_backward(self.dev, &dxe, &s.plan, dh2, n, k, d, m.shared.is_some())?;
        // through the routing weights and the balance losses into the router logits
        let logits = f32_of(&s.logits)?;
        let mut dl = Act::empty(self.dev, DType::F32, n * e)?;
        moe_train::router_backward(self.dev, logits, &s.idx, &dw, &m.cfg, n, f32_of_mut(&mut dl)?)?;
        for (spans, alpha) in [(self.seq_spans, self.seq_alpha), (self.all_span, self.aux_alpha)] {
            if let Some(t) = moe_train::balance_terms(
                self.dev,
                logits,
                &s.idx,
                &m.cfg,
                spans,
                alpha,
                self.scale,
                f32_of_mut(&mut dl)?,
            )? {
                bal.push(t);
            }
        }
        let dlb = match self.dt {
            DType::Bf16 => {
                let mut b = self.act(n * e)?;
                elementwise::cast(self.dev, &dl, &mut b, n * e)?;
                Some(b)
            }
            DType::F32 => None,
        };
        let dla = dlb.as_ref().unwrap_or(&dl);
        self.mm.run(self.dev, TN, dims(e, d, n).acc(true), rd(dla, 0, e), rd(h2, 0, d), wr(g, m.router, d), None)?;
        self.mm.run(self.dev, NN, dims(n, d, e).acc(true), rd(dla, 0, e), self.wt(m.router, d), wr(dh2, 0, d), None)
    }
}

/// Tokens routed to each expert of a saved MoE layer (`[E]` on the device).
pub(crate) fn loads(dev: &Device, s: &Saved, e: usize, k: usize, n: usize) -> Result<Option<CudaSlice<i32>>> {
    match &s.ffn {
        FfnSaved::Moe(m) => Ok(Some(moe_train::expert_loads(dev, &m.idx, n, e, k)?)),
        FfnSaved::Dense(_) => Ok(None),
    }
}
