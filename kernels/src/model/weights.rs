//! The model's weights on the device, converted from a loaded CPU [`dsv3_core::Model`]:
//! bf16 (or f32 in the f32 mode), FP8 checkpoint weights kept as E4M3 + 128x128 scales when
//! asked (bf16 mode only), gate and up projections fused into one `[2I, D]` matrix, routed
//! experts stacked `[E, ...]` for the grouped GEMM, MLA's absorbed `W_UK`/`W_UV` per head.
use crate::device::Device;
use crate::ops::moe::RouteCfg;
use crate::tensor::{upload, Act, DType, DWeight};
use cudarc::driver::CudaSlice;
use dsv3_core::model::block::{Block, Ffn};
use dsv3_core::model::linear::{Linear, Weight};
use dsv3_core::model::mla::{Mla, QProj};
use dsv3_core::model::mlp::Mlp;
use dsv3_core::{Error, Result};

/// A linear layer: weight `[out, in]` and optional f32 bias.
pub struct DLinear {
    pub w: DWeight,
    pub bias: Option<CudaSlice<f32>>,
}

/// A SwiGLU MLP (or `groups` stacked experts): `gate_up` `[groups, 2I, D]`, `down` `[groups, D, I]`.
pub struct DMlp {
    pub gate_up: DWeight,
    pub down: DWeight,
    pub inter: usize,
}

/// The query projection. With a LoRA, `q_a_proj` and `kv_a_proj_with_mqa` read the same input
/// and are stored as one matrix (`fused_kv`: rows `[rank, rank + C + dr)` are `kv_a`), so one GEMM
/// computes both; the fusion is skipped when only one of them stays FP8.
#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum DQ {
    Lora { a: DLinear, rank: usize, fused_kv: bool, norm: CudaSlice<f32>, b: DLinear },
    Plain(DLinear),
}

/// One MLA layer: projections, `kv_a_layernorm`, absorbed `W_UK` (`[H, C, dn]`) and `W_UV`
/// (`[H, dv, C]`), `o_proj`.
pub struct DMla {
    pub q: DQ,
    /// `None` when fused into the query LoRA's first matrix.
    pub kv_a: Option<DLinear>,
    pub kv_norm: CudaSlice<f32>,
    pub w_uk: DWeight,
    pub w_uv: DWeight,
    /// `kv_b_proj` `[H·(dn+dv), C]` (k_nope then v rows per head; FP8 kept as FP8) for the flash
    /// prefill path, which decompresses the cached latents; bf16 mode only (`None` in f32 mode).
    pub kv_b: Option<DLinear>,
    pub o: DLinear,
    /// The query's last projection and `o_proj` with `W_UK` / `W_UV` multiplied in, for the
    /// absorbed (decode) path of small models: see [`DAbsorbed`].
    pub absorbed: Option<DAbsorbed>,
}

/// MLA's absorbed projections with the per-head absorption matrices folded into the weights
/// (DeepSeek-V2 §2.1.2's "absorb W_UK into W_Q and W_UV into W_O"): decode then runs the query
/// projection straight to `q̃` and `o_proj` straight from the attention's latent output `ō`, two
/// GEMM launches fewer per layer. Kept only where the folded matrices are small (at most
/// [`ABSORB_MAX_RATIO`] times the bytes of those they replace: the ~88M bench model; never
/// DeepSeek-V3's or V2's sizes, where `H·C` is far wider than `H·dv`) and dense.
pub struct DAbsorbed {
    /// `[H·C + H·dr, q_in]`: rows `h·C + c` are `Σ_j W_UKᵀ[h, c, j] · W_q[h·dq + j, :]` (the
    /// absorbed query of head h), then `H·C + h·dr + r` the rope rows `W_q[h·dq + dn + r, :]`.
    /// `W_q` is `q_b_proj` (LoRA) or `q_proj`; a bias is carried through the same map.
    pub q: DLinear,
    /// `[D, H·C]`: `Σ_v W_o[:, h·dv + v] · W_UV[h, v, c]` at column `h·C + c`; `o_proj`'s bias.
    pub o: DLinear,
}

/// The most the folded matrices of [`DAbsorbed`] may weigh, relative to the matrices they replace.
pub const ABSORB_MAX_RATIO: usize = 2;

/// `DSV3_ABSORB=0` keeps decode on the separate `W_UK` / `W_UV` products (A/B; read once).
pub fn absorb_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV3_ABSORB").map_or(true, |v| v.trim() != "0"))
}

/// The [`DAbsorbed`] of `a` when it is enabled, small enough and dense (f32 products on the
/// host, rounded once to the storage dtype).
fn absorbed(
    dev: &Device,
    a: &Mla,
    wq: &Linear,
    dims: (usize, usize, usize, usize),
    dr: usize,
    st: Storage,
) -> Result<Option<DAbsorbed>> {
    let (h, c, dn, dv) = dims;
    let (dq, qin, d) = (dn + dr, wq.in_dim, a.o.out_dim);
    // dense only; widths in whole 16-byte groups (the MLA kernels' loads of q̃ and the rope part)
    let aligned = c.is_multiple_of(8) && dr.is_multiple_of(8);
    if !absorb_enabled() || !aligned || fp8_parts(wq, st).is_some() || fp8_parts(&a.o, st).is_some() {
        return Ok(None);
    }
    if wq.out_dim != h * dq || a.o.in_dim != h * dv || a.w_uk_t.len() != h * c * dn || a.w_uv.len() != h * dv * c {
        return Err(Error::Input("MLA: projection shapes do not match the absorbed matrices".into()));
    }
    let folded = h * (c + dr) * qin + d * h * c;
    let replaced = h * dq * qin + h * c * dn + d * h * dv + h * dv * c;
    if folded > ABSORB_MAX_RATIO * replaced {
        return Ok(None);
    }
    let w = wq.dense();
    let fold_q = |src: &[f32], cols: usize| -> Vec<f32> {
        // src [H·dq, cols] -> [H·C + H·dr, cols]
        let mut out = vec![0f32; h * (c + dr) * cols];
        let (folded, rope) = out.split_at_mut(h * c * cols);
        par_rows(folded, cols, |i, o| {
            let (hh, cc) = (i / c, i % c);
            let mut acc = vec![0f64; cols];
            for j in 0..dn {
                let u = a.w_uk_t[(hh * c + cc) * dn + j] as f64;
                let row = &src[(hh * dq + j) * cols..][..cols];
                acc.iter_mut().zip(row).for_each(|(v, &x)| *v += u * x as f64);
            }
            o.iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
        });
        for (i, o) in rope.chunks_exact_mut(cols).enumerate() {
            let (hh, r) = (i / dr, i % dr);
            o.copy_from_slice(&src[(hh * dq + dn + r) * cols..][..cols]);
        }
        out
    };
    let qw = fold_q(&w, qin);
    let qb = wq.bias.as_ref().map(|b| fold_q(b, 1));
    let wo = a.o.dense();
    let mut ow = vec![0f32; d * h * c];
    par_rows(&mut ow, h * c, |row, o| {
        let mut acc = vec![0f64; c];
        for hh in 0..h {
            acc.iter_mut().for_each(|v| *v = 0.0);
            for v in 0..dv {
                let x = wo[row * h * dv + hh * dv + v] as f64;
                let uv = &a.w_uv[(hh * dv + v) * c..][..c];
                acc.iter_mut().zip(uv).for_each(|(s, &u)| *s += x * u as f64);
            }
            o[hh * c..][..c].iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
        }
    });
    Ok(Some(DAbsorbed {
        q: DLinear {
            w: DWeight::from_f32(dev, st.dtype, 1, h * (c + dr), qin, &qw)?,
            bias: qb.map(|b| upload(dev, &b)).transpose()?,
        },
        o: DLinear {
            w: DWeight::from_f32(dev, st.dtype, 1, d, h * c, &ow)?,
            bias: a.o.bias.as_ref().map(|b| upload(dev, b)).transpose()?,
        },
    }))
}

/// `f(i, row)` for every `row_len`-wide row `i` of `out`, the rows split in contiguous runs over
/// the machine's threads (the host folds of [`absorbed`]; each row is computed the same way
/// whatever the split, so the result does not depend on the thread count).
fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, rows.max(1));
    let per = rows.div_ceil(threads);
    std::thread::scope(|sc| {
        for (k, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            sc.spawn(move || {
                for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
                    f(k * per + i, row);
                }
            });
        }
    });
}

#[allow(clippy::large_enum_variant)] // one per layer
pub enum DFfn {
    Dense(DMlp),
    Moe {
        /// `[E, D]` f32 (the router runs in f32, as DeepSeek-V3 does).
        router: DWeight,
        bias: Option<CudaSlice<f32>>,
        cfg: RouteCfg,
        experts: DMlp,
        shared: Option<DMlp>,
    },
}

pub struct DBlock {
    pub input_norm: CudaSlice<f32>,
    pub attn: DMla,
    pub post_norm: CudaSlice<f32>,
    pub ffn: DFfn,
}

/// How weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    pub dtype: DType,
    /// Keep FP8 checkpoint weights as E4M3 + scales (bf16 mode, 128x128 blocks only).
    pub keep_fp8: bool,
}

/// FP8 codes and scales of `l` when they can stay FP8 on the device.
fn fp8_parts(l: &Linear, st: Storage) -> Option<(&[u8], &[f32])> {
    match &l.weight {
        Weight::Fp8 { q, scale, block } if st.keep_fp8 && st.dtype == DType::Bf16 && *block == [128, 128] => {
            Some((q.bytes(), scale))
        }
        _ => None,
    }
}

/// `q_a` and `kv_a` stacked into one `[rank + C + dr, D]` layer, when both stay dense or both stay
/// FP8 with whole 128-row blocks; `None` otherwise.
fn fused_qkv_a(dev: &Device, qa: &Linear, kva: &Linear, st: Storage) -> Result<Option<DLinear>> {
    if qa.in_dim != kva.in_dim {
        return Ok(None);
    }
    let (rows, d) = (qa.out_dim + kva.out_dim, qa.in_dim);
    let w = match (fp8_parts(qa, st), fp8_parts(kva, st)) {
        (Some((q1, s1)), Some((q2, s2))) if qa.out_dim.is_multiple_of(128) => {
            DWeight::from_fp8(dev, 1, rows, d, &[q1, q2].concat(), &[s1, s2].concat())?
        }
        (None, None) => DWeight::from_f32(dev, st.dtype, 1, rows, d, &[qa.dense(), kva.dense()].concat())?,
        _ => return Ok(None),
    };
    let bias = match (&qa.bias, &kva.bias) {
        (None, None) => None,
        (b1, b2) => {
            let mut b = b1.clone().unwrap_or_else(|| vec![0.0; qa.out_dim]);
            b.extend(b2.clone().unwrap_or_else(|| vec![0.0; kva.out_dim]));
            Some(upload(dev, &b)?)
        }
    };
    Ok(Some(DLinear { w, bias }))
}

pub fn linear(dev: &Device, l: &Linear, st: Storage) -> Result<DLinear> {
    let w = match fp8_parts(l, st) {
        Some((q, s)) => DWeight::from_fp8(dev, 1, l.out_dim, l.in_dim, q, s)?,
        None => DWeight::from_f32(dev, st.dtype, 1, l.out_dim, l.in_dim, &l.dense())?,
    };
    let bias = l.bias.as_ref().map(|b| upload(dev, b)).transpose()?;
    Ok(DLinear { w, bias })
}

/// Stacks `mlps` (`E` experts, or one) into one [`DMlp`].
pub fn mlps(dev: &Device, mlps: &[&Mlp], st: Storage) -> Result<DMlp> {
    let first = mlps.first().ok_or_else(|| Error::Input("no MLP to upload".into()))?;
    let (i, d) = (first.gate.out_dim, first.gate.in_dim);
    let g = mlps.len();
    // FP8 stays FP8 only when every matrix is FP8 and the gate|up stack keeps whole 128-row blocks
    let fp8 = i % 128 == 0 && mlps.iter().all(|m| [&m.gate, &m.up, &m.down].iter().all(|l| fp8_parts(l, st).is_some()));
    if fp8 {
        let (mut q, mut s, mut qd, mut sd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for m in mlps {
            for l in [&m.gate, &m.up] {
                let (lq, ls) = fp8_parts(l, st).expect("checked above");
                q.extend_from_slice(lq);
                s.extend_from_slice(ls);
            }
            let (lq, ls) = fp8_parts(&m.down, st).expect("checked above");
            qd.extend_from_slice(lq);
            sd.extend_from_slice(ls);
        }
        return Ok(DMlp {
            gate_up: DWeight::from_fp8(dev, g, 2 * i, d, &q, &s)?,
            down: DWeight::from_fp8(dev, g, d, i, &qd, &sd)?,
            inter: i,
        });
    }
    let mut gu = Vec::with_capacity(g * 2 * i * d);
    let mut dn = Vec::with_capacity(g * d * i);
    for m in mlps {
        gu.extend(m.gate.dense());
        gu.extend(m.up.dense());
        dn.extend(m.down.dense());
    }
    Ok(DMlp {
        gate_up: DWeight::from_f32(dev, st.dtype, g, 2 * i, d, &gu)?,
        down: DWeight::from_f32(dev, st.dtype, g, d, i, &dn)?,
        inter: i,
    })
}

/// Uploads one decoder layer. `h`, `c`, `dn`, `dv` are the MLA dims of the config, `dr` its rope
/// dim.
pub fn block(dev: &Device, b: &Block, dims: (usize, usize, usize, usize), dr: usize, st: Storage) -> Result<DBlock> {
    let (h, c, dn, dv) = dims;
    let a = &b.attn;
    let wq = match &a.q {
        QProj::Lora { b, .. } => b,
        QProj::Plain(l) => l,
    };
    let absorbed = absorbed(dev, a, wq, dims, dr, st)?;
    let (q, kv_a) = match &a.q {
        QProj::Lora { a: qa, norm, b } => {
            let fused = fused_qkv_a(dev, qa, &a.kv_a, st)?;
            let fused_kv = fused.is_some();
            let kv_a = if fused_kv { None } else { Some(linear(dev, &a.kv_a, st)?) };
            let a = match fused {
                Some(f) => f,
                None => linear(dev, qa, st)?,
            };
            (DQ::Lora { a, rank: qa.out_dim, fused_kv, norm: upload(dev, norm)?, b: linear(dev, b, st)? }, kv_a)
        }
        QProj::Plain(l) => (DQ::Plain(linear(dev, l, st)?), Some(linear(dev, &a.kv_a, st)?)),
    };
    let attn = DMla {
        q,
        kv_a,
        kv_norm: upload(dev, &a.kv_norm)?,
        w_uk: DWeight::from_f32(dev, st.dtype, h, c, dn, &a.w_uk_t)?,
        w_uv: DWeight::from_f32(dev, st.dtype, h, dv, c, &a.w_uv)?,
        kv_b: if st.dtype == DType::Bf16 { Some(linear(dev, &a.kv_b, st)?) } else { None },
        o: linear(dev, &a.o, st)?,
        absorbed,
    };
    let ffn = match &b.ffn {
        Ffn::Dense(m) => DFfn::Dense(mlps(dev, &[m], st)?),
        Ffn::Moe(m) => {
            let r = &m.router;
            let experts: Vec<&Mlp> = m.experts.iter().collect();
            DFfn::Moe {
                router: DWeight::from_f32(dev, DType::F32, 1, r.n_experts, r.dim, &r.weight)?,
                bias: r.bias.as_ref().map(|v| upload(dev, v)).transpose()?,
                cfg: RouteCfg::of(r),
                experts: mlps(dev, &experts, st)?,
                shared: m.shared.as_ref().map(|s| mlps(dev, &[s], st)).transpose()?,
            }
        }
    };
    Ok(DBlock { input_norm: upload(dev, &b.input_norm)?, attn, post_norm: upload(dev, &b.post_norm)?, ffn })
}

/// The embedding table `[V, D]` in the activation dtype.
pub fn embedding(dev: &Device, e: &[f32], dtype: DType) -> Result<Act> {
    Act::from_f32(dev, dtype, e)
}

#[cfg(test)]
mod tests {
    use super::par_rows;

    #[test]
    fn par_rows_visits_every_row_once_with_its_index() {
        // row counts below, at and above any thread count, and ragged splits
        for (rows, len) in [(1, 3), (5, 1), (7, 4), (64, 2), (1001, 3)] {
            let mut out = vec![-1f32; rows * len];
            par_rows(&mut out, len, |i, row| {
                assert_eq!(row.len(), len);
                for (j, v) in row.iter_mut().enumerate() {
                    assert_eq!(*v, -1.0, "row {i} visited twice");
                    *v = (i * len + j) as f32;
                }
            });
            let want: Vec<f32> = (0..rows * len).map(|x| x as f32).collect();
            assert_eq!(out, want, "{rows} rows of {len}");
        }
        let mut none: Vec<f32> = Vec::new();
        par_rows(&mut none, 4, |_, _| panic!("no rows"));
        par_rows(&mut [1.0, 2.0], 0, |_, _| panic!("empty rows"));
    }
}
