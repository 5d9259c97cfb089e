//! Multi-head Latent Attention (MLA), naive and absorbed forms over one latent KV cache.
//!
//! Per token the cache holds the normalized latent `c` (`[C]`) and the rotated shared rope key
//! `k_pe` (`[dr]`): `C + dr` values per layer (576 for V3).
//! - Naive (what HF computes): expand `kv = c · W_kvbᵀ` to per-head `k_nope`, `v` for all cached
//!   tokens, then standard attention on `[k_nope ‖ k_pe]`.
//! - Absorbed (DeepSeek's `attn_impl="absorb"`): fold `W_UK` into the query
//!   (`q̃_h = q_nope_h · W_UK_h`, `[C]`), score against `c` directly, attend over `c`, and apply
//!   `W_UV` after: `O_h = W_UV_h · Σ_t P_t c_t`. Same result; the cache is read once.
use crate::config::{Config, LORA_NORM_EPS};
use crate::error::Result;
use crate::infer::cache::LayerCache;
use crate::model::linear::{Fp8Mode, Linear};
use crate::model::Batch;
use crate::ops::gemm::{matmul_strided, matmul_t};
use crate::ops::norm::{rmsnorm, rmsnorm_backward, rmsnorm_inplace};
use crate::ops::rope::Rope;
use crate::ops::softmax::{softmax_backward_inplace, softmax_inplace};
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Query rows per causal block of the training attention: a block of rows only multiplies the
/// keys up to its last row, which skips ~3/8 of the S x S products at S = 256.
const ATTN_ROW_BLOCK: usize = 64;

/// Which MLA formulation computes attention (both give the same result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnForm {
    /// Expand the latent into per-head keys and values (HF transformers).
    Naive,
    /// Absorb `W_UK` / `W_UV` into the query and output (DeepSeek inference; the default).
    #[default]
    Absorbed,
}

/// The query path: LoRA (`q_a_proj` → norm → `q_b_proj`) or a plain `q_proj`.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum QProj {
    Lora { a: Linear, norm: Vec<f32>, b: Linear },
    Plain(Linear),
}

/// One MLA layer's weights.
#[derive(Clone)]
pub struct Mla {
    pub q: QProj,
    /// `kv_a_proj_with_mqa`: `[C + dr, D]`; rows `[0, C)` give the latent, `[C, C+dr)` `k_pe`.
    pub kv_a: Linear,
    /// `kv_a_layernorm` weight `[C]` (eps 1e-6 always).
    pub kv_norm: Vec<f32>,
    /// `kv_b_proj`: `[H·(dn+dv), C]`, head-major, `k_nope` rows then `v` rows per head.
    pub kv_b: Linear,
    /// `o_proj`: `[D, H·dv]`.
    pub o: Linear,
    /// Absorbed-form weights: `W_UK_hᵀ` as `[H, C, dn]`.
    pub w_uk_t: Vec<f32>,
    /// Absorbed-form weights: `W_UV_h` as `[H, dv, C]`.
    pub w_uv: Vec<f32>,
    dims: Dims,
}

#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    dn: usize,
    dr: usize,
    dv: usize,
    c: usize,
    scale: f32,
}

impl Dims {
    fn dq(&self) -> usize {
        self.dn + self.dr
    }
}

impl Mla {
    /// Loads `{prefix}.*` (e.g. `model.layers.3.self_attn`).
    pub fn load(store: &mut TensorStore, prefix: &str, cfg: &Config, mode: Fp8Mode) -> Result<Mla> {
        let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
        let (dn, dr, dv, c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let dq = dn + dr;
        let blk = cfg.quantization.map(|q| q.block);
        let bias = cfg.attention_bias;
        let q = match cfg.q_lora_rank {
            Some(rq) => QProj::Lora {
                a: Linear::load(store, &format!("{prefix}.q_a_proj"), rq, d, bias, blk, mode)?,
                norm: store.take_f32(&format!("{prefix}.q_a_layernorm.weight"), &[rq])?,
                b: Linear::load(store, &format!("{prefix}.q_b_proj"), h * dq, rq, false, blk, mode)?,
            },
            None => QProj::Plain(Linear::load(store, &format!("{prefix}.q_proj"), h * dq, d, false, blk, mode)?),
        };
        let kv_a = Linear::load(store, &format!("{prefix}.kv_a_proj_with_mqa"), c + dr, d, bias, blk, mode)?;
        let kv_norm = store.take_f32(&format!("{prefix}.kv_a_layernorm.weight"), &[c])?;
        let kv_b = Linear::load(store, &format!("{prefix}.kv_b_proj"), h * (dn + dv), c, false, blk, mode)?;
        let o = Linear::load(store, &format!("{prefix}.o_proj"), d, h * dv, bias, blk, mode)?;
        let dims = Dims { h, dn, dr, dv, c, scale: crate::ops::rope::softmax_scale(cfg) };
        Ok(Mla::with_absorbed(q, kv_a, kv_norm, kv_b, o, dims))
    }

    fn with_absorbed(q: QProj, kv_a: Linear, kv_norm: Vec<f32>, kv_b: Linear, o: Linear, dims: Dims) -> Mla {
        let Dims { h, dn, dv, c, .. } = dims;
        let w = kv_b.dense();
        let mut w_uk_t = vec![0f32; h * c * dn];
        let mut w_uv = vec![0f32; h * dv * c];
        for hh in 0..h {
            let base = hh * (dn + dv) * c;
            for i in 0..dn {
                for j in 0..c {
                    w_uk_t[hh * c * dn + j * dn + i] = w[base + i * c + j];
                }
            }
            w_uv[hh * dv * c..(hh + 1) * dv * c].copy_from_slice(&w[base + dn * c..base + (dn + dv) * c]);
        }
        Mla { q, kv_a, kv_norm, kv_b, o, w_uk_t, w_uv, dims }
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        let q = match &self.q {
            QProj::Lora { a, norm, b } => a.params() + norm.len() + b.params(),
            QProj::Plain(l) => l.params(),
        };
        q + self.kv_a.params() + self.kv_norm.len() + self.kv_b.params() + self.o.params()
    }

    /// Attention over `x` (`[N, D]`, already normed). Appends each sequence's new latents to
    /// its cache (`caches[i]` belongs to `batch.seqs[i]`), attends causally over the whole
    /// cache, and writes `out` (`[N, D]`).
    pub fn forward(&self, x: &[f32], batch: &Batch, caches: &mut [&mut LayerCache], form: AttnForm, out: &mut [f32]) {
        let Dims { h, dn, dr, dv, c, .. } = self.dims;
        let dq = self.dims.dq();
        let n = batch.pos.len();
        // 1. queries [N, H·dq]
        let mut q = vec![0f32; n * h * dq];
        match &self.q {
            QProj::Lora { a, norm, b } => {
                let mut qa = vec![0f32; n * a.out_dim];
                a.forward(x, n, &mut qa);
                rmsnorm_inplace(&mut qa, norm, LORA_NORM_EPS);
                b.forward(&qa, n, &mut q);
            }
            QProj::Plain(l) => l.forward(x, n, &mut q),
        }
        // 2. compressed kv [N, C+dr]: normalize the latent, rotate k_pe
        let mut ckv = vec![0f32; n * (c + dr)];
        self.kv_a.forward(x, n, &mut ckv);
        let mut tmp = vec![0f32; dr];
        let half = dr / 2;
        for (i, row) in ckv.chunks_exact_mut(c + dr).enumerate() {
            let (lat, pe) = row.split_at_mut(c);
            rmsnorm_inplace(lat, &self.kv_norm, LORA_NORM_EPS);
            let (cs, sn) = (&batch.cos[i * half..(i + 1) * half], &batch.sin[i * half..(i + 1) * half]);
            Rope::apply(pe, cs, sn, &mut tmp);
            for hh in 0..h {
                let qpe = &mut q[i * h * dq + hh * dq + dn..i * h * dq + (hh + 1) * dq];
                Rope::apply(qpe, cs, sn, &mut tmp);
            }
        }
        // 3. append to the caches; query s of a sequence sees cache entries <= base + s
        let bases: Vec<usize> = caches.iter().map(|c| c.len).collect();
        for (s, r) in batch.seqs.iter().enumerate() {
            caches[s].append(&ckv[r.start * (c + dr)..r.end * (c + dr)], c, dr);
        }
        // 4. attention per (sequence, head)
        let mut attn = vec![0f32; n * h * dv];
        let tasks: Vec<(usize, usize)> = (0..batch.seqs.len()).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
        let caches_ro: Vec<&LayerCache> = caches.iter().map(|c| &**c).collect();
        // Naive form: expand k_nope and v of every cached token, [T, H·(dn+dv)] per sequence.
        let expanded: Vec<Vec<f32>> = match form {
            AttnForm::Naive => caches_ro
                .iter()
                .map(|cache| {
                    let mut kv = vec![0f32; cache.len * h * (dn + dv)];
                    self.kv_b.forward(&cache.kv, cache.len, &mut kv);
                    kv
                })
                .collect(),
            AttnForm::Absorbed => Vec::new(),
        };
        let run = |&(s, hh): &(usize, usize)| -> Vec<f32> {
            let r = &batch.seqs[s];
            let p0 = bases[s];
            let qs = &q[r.start * h * dq..r.end * h * dq];
            match form {
                AttnForm::Naive => self.head_naive(qs, hh, p0, caches_ro[s], &expanded[s]),
                AttnForm::Absorbed => self.head_absorbed(qs, hh, p0, caches_ro[s]),
            }
        };
        let work: usize = batch.seqs.iter().zip(&caches_ro).map(|(r, c)| r.len() * c.len).sum::<usize>() * h * c;
        let results = crate::ops::par_map(&tasks, work, run);
        for (&(s, hh), o) in tasks.iter().zip(&results) {
            let r = &batch.seqs[s];
            for (i, orow) in o.chunks_exact(dv).enumerate() {
                let dst = (r.start + i) * h * dv + hh * dv;
                attn[dst..dst + dv].copy_from_slice(orow);
            }
        }
        // 5. output projection
        self.o.forward(&attn, n, out);
    }

    /// Scores `[S, T]` from the nope part already in `scores` plus `q_pe · k_pe`, scaled,
    /// causally masked (query s sees cache entries `t <= p0 + s`) and softmaxed.
    fn finish_scores(&self, scores: &mut [f32], qh: &[f32], hh: usize, p0: usize, cache: &LayerCache) {
        let Dims { h, dn, dr, scale, .. } = self.dims;
        let dq = self.dims.dq();
        let (s_len, t_len) = (qh.len() / (h * dq), cache.len);
        matmul_t(s_len, t_len, dr, &qh[hh * dq + dn..], h * dq, &cache.pe, dr, scores, t_len, true);
        for (s, row) in scores.chunks_exact_mut(t_len).enumerate() {
            for (t, v) in row.iter_mut().enumerate() {
                *v = if t <= p0 + s { *v * scale } else { f32::NEG_INFINITY };
            }
            softmax_inplace(row);
        }
    }

    /// Naive form for one head: `qh` is `[S, H·dq]`, `kv` the expanded `[T, H·(dn+dv)]`;
    /// returns `[S, dv]`.
    fn head_naive(&self, qh: &[f32], hh: usize, p0: usize, cache: &LayerCache, kv: &[f32]) -> Vec<f32> {
        let Dims { h, dn, dv, .. } = self.dims;
        let dq = self.dims.dq();
        let (s_len, t_len) = (qh.len() / (h * dq), cache.len);
        let w = h * (dn + dv);
        let mut scores = vec![0f32; s_len * t_len];
        matmul_t(s_len, t_len, dn, &qh[hh * dq..], h * dq, &kv[hh * (dn + dv)..], w, &mut scores, t_len, false);
        self.finish_scores(&mut scores, qh, hh, p0, cache);
        let mut o = vec![0f32; s_len * dv];
        for (orow, prow) in o.chunks_exact_mut(dv).zip(scores.chunks_exact(t_len)) {
            for (t, &p) in prow.iter().enumerate() {
                if p != 0.0 {
                    let v0 = t * w + hh * (dn + dv) + dn;
                    for (ov, &vv) in orow.iter_mut().zip(&kv[v0..v0 + dv]) {
                        *ov += p * vv;
                    }
                }
            }
        }
        o
    }

    /// Absorbed form for one head: `qh` is `[S, H·dq]`; returns `[S, dv]`.
    fn head_absorbed(&self, qh: &[f32], hh: usize, p0: usize, cache: &LayerCache) -> Vec<f32> {
        let Dims { h, dn, dv, c, .. } = self.dims;
        let dq = self.dims.dq();
        let (s_len, t_len) = (qh.len() / (h * dq), cache.len);
        // q̃ = q_nope · W_UK: [S, C]
        let mut qt = vec![0f32; s_len * c];
        matmul_t(
            s_len,
            c,
            dn,
            &qh[hh * dq..],
            h * dq,
            &self.w_uk_t[hh * c * dn..(hh + 1) * c * dn],
            dn,
            &mut qt,
            c,
            false,
        );
        let mut scores = vec![0f32; s_len * t_len];
        matmul_t(s_len, t_len, c, &qt, c, &cache.kv, c, &mut scores, t_len, false);
        self.finish_scores(&mut scores, qh, hh, p0, cache);
        // ō = P · c: [S, C]
        let mut ob = vec![0f32; s_len * c];
        for (orow, prow) in ob.chunks_exact_mut(c).zip(scores.chunks_exact(t_len)) {
            for (t, &p) in prow.iter().enumerate() {
                if p != 0.0 {
                    for (ov, &cv) in orow.iter_mut().zip(&cache.kv[t * c..(t + 1) * c]) {
                        *ov += p * cv;
                    }
                }
            }
        }
        // O = ō · W_UVᵀ: [S, dv]
        let mut o = vec![0f32; s_len * dv];
        matmul_t(s_len, dv, c, &ob, c, &self.w_uv[hh * dv * c..(hh + 1) * dv * c], c, &mut o, dv, false);
        o
    }
}

/// Activations MLA keeps for its backward (naive form over whole sequences).
#[derive(Clone, Default)]
pub struct MlaSaved {
    /// `[N, Rq]` q_a output before / after its norm (LoRA query only).
    pub qa: Vec<f32>,
    pub qan: Vec<f32>,
    /// `[N, H·dq]` queries after RoPE.
    pub q: Vec<f32>,
    /// `[N, C]` latent before / after kv_a_layernorm.
    pub lat: Vec<f32>,
    pub cn: Vec<f32>,
    /// `[N, dr]` rotated rope keys.
    pub kpe: Vec<f32>,
    /// `[N, H·(dn+dv)]` expanded keys and values.
    pub kv: Vec<f32>,
    /// Softmax probabilities `[S, S]` per (sequence, head), sequence-major.
    pub probs: Vec<Vec<f32>>,
    /// `[N, H·dv]` attention output before o_proj.
    pub attn: Vec<f32>,
}

impl Mla {
    /// Training forward over whole sequences (`batch.seqs`, causal within each, positions from
    /// `batch`), naive form. Returns `out` `[N, D]` and the saved activations.
    pub fn forward_train(&self, x: &[f32], batch: &Batch, out: &mut [f32]) -> MlaSaved {
        let Dims { h, dn, dr, dv, c, scale } = self.dims;
        let dq = self.dims.dq();
        let n = batch.pos.len();
        let w = h * (dn + dv);
        let mut sv = MlaSaved { q: vec![0f32; n * h * dq], ..Default::default() };
        match &self.q {
            QProj::Lora { a, norm, b } => {
                sv.qa = vec![0f32; n * a.out_dim];
                a.forward(x, n, &mut sv.qa);
                sv.qan = vec![0f32; sv.qa.len()];
                rmsnorm(&sv.qa, norm, LORA_NORM_EPS, &mut sv.qan);
                b.forward(&sv.qan, n, &mut sv.q);
            }
            QProj::Plain(l) => l.forward(x, n, &mut sv.q),
        }
        let mut ckv = vec![0f32; n * (c + dr)];
        self.kv_a.forward(x, n, &mut ckv);
        sv.lat = vec![0f32; n * c];
        sv.kpe = vec![0f32; n * dr];
        let half = dr / 2;
        let mut tmp = vec![0f32; dr];
        for i in 0..n {
            sv.lat[i * c..(i + 1) * c].copy_from_slice(&ckv[i * (c + dr)..i * (c + dr) + c]);
            let pe = &mut sv.kpe[i * dr..(i + 1) * dr];
            pe.copy_from_slice(&ckv[i * (c + dr) + c..(i + 1) * (c + dr)]);
            let (cs, sn) = (&batch.cos[i * half..(i + 1) * half], &batch.sin[i * half..(i + 1) * half]);
            Rope::apply(pe, cs, sn, &mut tmp);
            for hh in 0..h {
                Rope::apply(&mut sv.q[i * h * dq + hh * dq + dn..i * h * dq + (hh + 1) * dq], cs, sn, &mut tmp);
            }
        }
        sv.cn = vec![0f32; n * c];
        rmsnorm(&sv.lat, &self.kv_norm, LORA_NORM_EPS, &mut sv.cn);
        sv.kv = vec![0f32; n * w];
        self.kv_b.forward(&sv.cn, n, &mut sv.kv);
        sv.attn = vec![0f32; n * h * dv];
        // one task per (sequence, head): probabilities [S, S] and output [S, dv]
        let tasks: Vec<(usize, usize)> = (0..batch.seqs.len()).flat_map(|q| (0..h).map(move |hh| (q, hh))).collect();
        let work: usize = batch.seqs.iter().map(|r| r.len() * r.len()).sum::<usize>() * h * (dq + dv);
        let (q_all, kv_all, kpe_all) = (&sv.q, &sv.kv, &sv.kpe);
        let results = crate::ops::par_map(&tasks, work, |&(qi, hh)| {
            let r = &batch.seqs[qi];
            let sl = r.len();
            let q0 = r.start * h * dq + hh * dq;
            let k0 = r.start * w + hh * (dn + dv);
            // causal: row block [i0, i1) only needs keys [0, i1); the rest of p stays 0
            let mut p = vec![0f32; sl * sl];
            let mut o = vec![0f32; sl * dv];
            for i0 in (0..sl).step_by(ATTN_ROW_BLOCK) {
                let i1 = (i0 + ATTN_ROW_BLOCK).min(sl);
                let (qb, pb) = (q0 + i0 * h * dq, &mut p[i0 * sl..]);
                matmul_t(i1 - i0, i1, dn, &q_all[qb..], h * dq, &kv_all[k0..], w, pb, sl, false);
                matmul_t(i1 - i0, i1, dr, &q_all[qb + dn..], h * dq, &kpe_all[r.start * dr..], dr, pb, sl, true);
                for (i, row) in (i0..i1).zip(pb.chunks_exact_mut(sl)) {
                    row[..=i].iter_mut().for_each(|v| *v *= scale);
                    softmax_inplace(&mut row[..=i]);
                    row[i + 1..i1].fill(0.0);
                }
                let (pb, ob) = (&p[i0 * sl..], &mut o[i0 * dv..]);
                matmul_strided(i1 - i0, dv, i1, pb, sl, 1, &kv_all[k0 + dn..], w, 1, ob, dv, false);
            }
            (p, o)
        });
        for (&(qi, hh), (p, o)) in tasks.iter().zip(results) {
            let r = &batch.seqs[qi];
            for (i, orow) in o.chunks_exact(dv).enumerate() {
                let dst = (r.start + i) * h * dv + hh * dv;
                sv.attn[dst..dst + dv].copy_from_slice(orow);
            }
            sv.probs.push(p);
        }
        self.o.forward(&sv.attn, n, out);
        sv
    }

    /// Backward of [`Mla::forward_train`]: accumulates parameter gradients into `grad` and
    /// writes `dx` `[N, D]`.
    pub fn backward(&self, x: &[f32], batch: &Batch, sv: &MlaSaved, dout: &[f32], grad: &mut Mla, dx: &mut [f32]) {
        let Dims { h, dn, dr, dv, c, scale } = self.dims;
        let dq = self.dims.dq();
        let n = batch.pos.len();
        let w = h * (dn + dv);
        let mut dattn = vec![0f32; n * h * dv];
        self.o.backward(&sv.attn, n, dout, &mut grad.o, Some(&mut dattn), false);
        let mut dqv = vec![0f32; n * h * dq];
        let mut dkv = vec![0f32; n * w];
        let mut dkpe = vec![0f32; n * dr];
        // one task per (sequence, head): dQ [S, dq], dK_nope|dV [S, dn+dv], dk_pe [S, dr]
        let tasks: Vec<(usize, usize)> = (0..batch.seqs.len()).flat_map(|q| (0..h).map(move |hh| (q, hh))).collect();
        let work: usize = batch.seqs.iter().map(|r| r.len() * r.len()).sum::<usize>() * h * 2 * (dq + dv);
        let dattn = &dattn;
        let results = crate::ops::par_map(&tasks, work, |&(qi, hh)| {
            let r = &batch.seqs[qi];
            let sl = r.len();
            let p = &sv.probs[qi * h + hh];
            let q0 = r.start * h * dq + hh * dq;
            let k0 = r.start * w + hh * (dn + dv);
            let o0 = r.start * h * dv + hh * dv;
            let (mut dqh, mut dkvh, mut dpe) = (vec![0f32; sl * dq], vec![0f32; sl * (dn + dv)], vec![0f32; sl * dr]);
            // dP = dO·Vᵀ, dV = Pᵀ·dO
            // causal blocks, as in the forward: P and dS are 0 above the diagonal, so query rows
            // [i0, i1) see keys [0, i1) and key rows [t0, t1) are seen by queries [t0, sl)
            let mut dp = vec![0f32; sl * sl];
            let (bs, ld) = (ATTN_ROW_BLOCK, h * dq);
            for i0 in (0..sl).step_by(bs) {
                let i1 = (i0 + bs).min(sl);
                let (ob, db) = (&dattn[o0 + i0 * h * dv..], &mut dp[i0 * sl..]);
                matmul_t(i1 - i0, i1, dv, ob, h * dv, &sv.kv[k0 + dn..], w, db, sl, false);
                for (i, (prow, drow)) in (i0..i1).zip(p[i0 * sl..].chunks_exact(sl).zip(db.chunks_exact_mut(sl))) {
                    softmax_backward_inplace(&prow[..=i], &mut drow[..=i]);
                    drow[..=i].iter_mut().for_each(|v| *v *= scale);
                    drow[i + 1..i1].fill(0.0);
                }
                // dQ = dS·K (the rope key is shared by all heads: its gradient is summed below)
                let (dsb, dqb) = (&dp[i0 * sl..], &mut dqh[i0 * dq..]);
                matmul_strided(i1 - i0, dn, i1, dsb, sl, 1, &sv.kv[k0..], w, 1, dqb, dq, false);
                let kpe = &sv.kpe[r.start * dr..];
                matmul_strided(i1 - i0, dr, i1, dsb, sl, 1, kpe, dr, 1, &mut dqb[dn..], dq, false);
            }
            for t0 in (0..sl).step_by(bs) {
                let t1 = (t0 + bs).min(sl);
                let (m, kk, c0) = (t1 - t0, sl - t0, t0 * sl + t0);
                // dV = Pᵀ·dO, dK = dSᵀ·Q
                let (dob, dkb) = (&dattn[o0 + t0 * h * dv..], &mut dkvh[t0 * (dn + dv)..]);
                matmul_strided(m, dv, kk, &p[c0..], 1, sl, dob, h * dv, 1, &mut dkb[dn..], dn + dv, false);
                let qb = q0 + t0 * ld;
                matmul_strided(m, dn, kk, &dp[c0..], 1, sl, &sv.q[qb..], ld, 1, dkb, dn + dv, false);
                let pb = &mut dpe[t0 * dr..];
                matmul_strided(m, dr, kk, &dp[c0..], 1, sl, &sv.q[qb + dn..], ld, 1, pb, dr, false);
            }
            (dqh, dkvh, dpe)
        });
        for (&(qi, hh), (dqh, dkvh, dpe)) in tasks.iter().zip(results) {
            let r = &batch.seqs[qi];
            for i in 0..r.len() {
                let row = r.start + i;
                dqv[row * h * dq + hh * dq..row * h * dq + (hh + 1) * dq].copy_from_slice(&dqh[i * dq..(i + 1) * dq]);
                dkv[row * w + hh * (dn + dv)..row * w + (hh + 1) * (dn + dv)]
                    .copy_from_slice(&dkvh[i * (dn + dv)..(i + 1) * (dn + dv)]);
                for (a, b) in dkpe[row * dr..(row + 1) * dr].iter_mut().zip(&dpe[i * dr..(i + 1) * dr]) {
                    *a += b;
                }
            }
        }
        // kv_b, kv_a_layernorm, RoPE of the shared key, kv_a
        let mut dcn = vec![0f32; n * c];
        self.kv_b.backward(&sv.cn, n, &dkv, &mut grad.kv_b, Some(&mut dcn), false);
        let mut dlat = vec![0f32; n * c];
        rmsnorm_backward(&sv.lat, &self.kv_norm, LORA_NORM_EPS, &dcn, &mut dlat, &mut grad.kv_norm);
        let half = dr / 2;
        let mut tmp = vec![0f32; dr];
        let mut dckv = vec![0f32; n * (c + dr)];
        for i in 0..n {
            let (cs, sn) = (&batch.cos[i * half..(i + 1) * half], &batch.sin[i * half..(i + 1) * half]);
            dckv[i * (c + dr)..i * (c + dr) + c].copy_from_slice(&dlat[i * c..(i + 1) * c]);
            let dpe = &mut dckv[i * (c + dr) + c..(i + 1) * (c + dr)];
            dpe.copy_from_slice(&dkpe[i * dr..(i + 1) * dr]);
            Rope::apply_backward(dpe, cs, sn, &mut tmp);
            for hh in 0..h {
                Rope::apply_backward(&mut dqv[i * h * dq + hh * dq + dn..i * h * dq + (hh + 1) * dq], cs, sn, &mut tmp);
            }
        }
        self.kv_a.backward(x, n, &dckv, &mut grad.kv_a, Some(dx), false);
        // the query path
        match (&self.q, &mut grad.q) {
            (QProj::Lora { a, norm, b }, QProj::Lora { a: ga, norm: gn, b: gb }) => {
                let mut dqan = vec![0f32; sv.qan.len()];
                b.backward(&sv.qan, n, &dqv, gb, Some(&mut dqan), false);
                let mut dqa = vec![0f32; sv.qa.len()];
                rmsnorm_backward(&sv.qa, norm, LORA_NORM_EPS, &dqan, &mut dqa, gn);
                a.backward(x, n, &dqa, ga, Some(dx), true);
            }
            (QProj::Plain(l), QProj::Plain(gl)) => l.backward(x, n, &dqv, gl, Some(dx), true),
            _ => unreachable!("grad has the model's structure"),
        }
    }

    /// Visits `{prefix}.{q_a_proj,q_a_layernorm,q_b_proj | q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}`.
    pub fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut [f32])) {
        match &mut self.q {
            QProj::Lora { a, norm, b } => {
                a.visit(&format!("{prefix}.q_a_proj"), f);
                f(&format!("{prefix}.q_a_layernorm.weight"), norm);
                b.visit(&format!("{prefix}.q_b_proj"), f);
            }
            QProj::Plain(l) => l.visit(&format!("{prefix}.q_proj"), f),
        }
        self.kv_a.visit(&format!("{prefix}.kv_a_proj_with_mqa"), f);
        f(&format!("{prefix}.kv_a_layernorm.weight"), &mut self.kv_norm);
        self.kv_b.visit(&format!("{prefix}.kv_b_proj"), f);
        self.o.visit(&format!("{prefix}.o_proj"), f);
    }

    /// Converts FP8 weights to f32.
    pub fn make_f32(&mut self) {
        match &mut self.q {
            QProj::Lora { a, b, .. } => {
                a.make_f32();
                b.make_f32();
            }
            QProj::Plain(l) => l.make_f32(),
        }
        self.kv_a.make_f32();
        self.kv_b.make_f32();
        self.o.make_f32();
    }

    /// Recomputes the absorbed-form weights from `kv_b` (after a training step).
    pub fn refresh_absorbed(&mut self) {
        let q = self.q.clone();
        let m = Mla::with_absorbed(
            q,
            self.kv_a.clone(),
            self.kv_norm.clone(),
            self.kv_b.clone(),
            self.o.clone(),
            self.dims,
        );
        self.w_uk_t = m.w_uk_t;
        self.w_uv = m.w_uv;
    }
}
