//! Flash attention for training (`kernels/cuda/attn_train.cu`): FlashAttention-2's forward that
//! also saves the log-sum-exp, and its backward (dQ, dK, dV) without materializing the
//! probabilities, bf16 on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async rings).
//!
//! The MHA form of MLA as [`super::attn`] takes it ([`FlashCall`]): per head `h`,
//! `K_h[t] = [k_h[t] (dn) ‖ kpe[t] (dr, shared by every head)]`, `V_h[t] = v_h[t] (dv)`; each
//! [`Segment`] is one sequence's query rows, row `i` at position `p0 + i` seeing keys `0..=p0 + i`
//! (in training `p0 = 0` and the query, key and rope rows coincide).
//!
//! The backward is deterministic (bit-reproducible run to run): a preprocess kernel computes
//! `D = rowsum(dO ∘ O)`, one kernel per 64-key tile accumulates dK and dV over the query tiles
//! that see it, a second per 64-query tile accumulates dQ over the key tiles, and the rope part of
//! dK (one shared key per row) is summed over the heads in a fixed order from an f32 per-head
//! scratch. No atomics; the price is computing `S` and `dP` in both kernels.
use super::attn::{tile_table, FlashCall, Segment};
use super::{dim, int, launch_smem, KArg};
use crate::device::Device;
use crate::tensor::{dptr, empty, upload, Act, DType};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};

/// The kernels' argument block (`struct FlashTrainArgs` in `kernels/cuda/attn_train.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FlashTrainArgs {
    pub q: u64,
    pub k: u64,
    pub kpe: u64,
    pub v: u64,
    pub o: u64,
    pub dout: u64,
    pub lse: u64,
    pub dd: u64,
    pub gq: u64,
    pub gk: u64,
    pub gkpe_part: u64,
    pub gkpe: u64,
    pub gv: u64,
    pub segs: u64,
    pub tiles: u64,
    pub ld_q: i32,
    pub hs_q: i32,
    pub ld_k: i32,
    pub hs_k: i32,
    pub ld_kpe: i32,
    pub ld_v: i32,
    pub hs_v: i32,
    pub ld_o: i32,
    pub hs_o: i32,
    pub ld_do: i32,
    pub hs_do: i32,
    pub ld_dq: i32,
    pub hs_dq: i32,
    pub ld_dk: i32,
    pub hs_dk: i32,
    pub ld_dkpe: i32,
    pub ld_dv: i32,
    pub hs_dv: i32,
    pub h: i32,
    pub dn: i32,
    pub dr: i32,
    pub dv: i32,
    pub ntiles: i32,
    pub scale: f32,
}

// SAFETY: plain integers and floats, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for FlashTrainArgs {}

/// Threads per block (`FT_THREADS`).
pub const FT_THREADS: u32 = 128;
/// Query rows per forward / dQ block, keys per dK/dV block.
pub const FT_ROWS: usize = 64;

/// A kernel set `k<dk_max>v<dv_max>`: the forward, dK/dV and dQ kernels for `dn + dr <= dk_max`
/// and `dv <= dv_max` (both rounded up to 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashTrainVariant {
    pub name: &'static str,
    pub fwd: &'static str,
    pub dkdv: &'static str,
    pub dq: &'static str,
    pub dk_max: usize,
    pub dv_max: usize,
    /// Keys per shared-memory tile of the forward.
    pub fwd_tile: usize,
    /// Query rows per shared-memory tile of the dK/dV kernel.
    pub dkdv_tile: usize,
    /// Keys per shared-memory tile of the dQ kernel.
    pub dq_tile: usize,
}

/// Ring stages of every kernel.
const STAGES: usize = 2;

/// Every variant (all in `KERNELS`). Registers (ptxas 13.0, sm_90a / sm_80, no spills): k64v64
/// fwd 125/120, dK/dV 219/220, dQ 167/166; k128v128 fwd 160/162, dK/dV 232/233, dQ 215/218;
/// k192v128 fwd 160/162, dK/dV 243/243, dQ 190/194; preprocess and reduce 32.
pub const FLASH_TRAIN_VARIANTS: &[FlashTrainVariant] = &[
    FlashTrainVariant {
        name: "k64v64",
        fwd: "flash_fwd_train_bf16_k64v64",
        dkdv: "flash_bwd_dkdv_bf16_k64v64",
        dq: "flash_bwd_dq_bf16_k64v64",
        dk_max: 64,
        dv_max: 64,
        fwd_tile: 64,
        dkdv_tile: 64,
        dq_tile: 64,
    },
    FlashTrainVariant {
        name: "k128v128",
        fwd: "flash_fwd_train_bf16_k128v128",
        dkdv: "flash_bwd_dkdv_bf16_k128v128",
        dq: "flash_bwd_dq_bf16_k128v128",
        dk_max: 128,
        dv_max: 128,
        fwd_tile: 64,
        dkdv_tile: 32,
        dq_tile: 64,
    },
    FlashTrainVariant {
        name: "k192v128",
        fwd: "flash_fwd_train_bf16_k192v128",
        dkdv: "flash_bwd_dkdv_bf16_k192v128",
        dq: "flash_bwd_dq_bf16_k192v128",
        dk_max: 192,
        dv_max: 128,
        fwd_tile: 64,
        dkdv_tile: 32,
        dq_tile: 32,
    },
];

/// A shared-memory row of `d` bf16 values: `d` rounded up to 16, then to 64 (128 bytes).
fn row(d: usize) -> usize {
    (d.div_ceil(16) * 16).div_ceil(64) * 64
}

impl FlashTrainVariant {
    /// Whether the variant computes head dims `dn`, `dr`, `dv`: multiples of 8, `dn + dr` in
    /// `1..=dk_max`, `dv` in `1..=dv_max`.
    pub fn takes(&self, dn: usize, dr: usize, dv: usize) -> bool {
        [dn, dr, dv].iter().all(|d| d.is_multiple_of(8))
            && (1..=self.dk_max).contains(&(dn + dr))
            && (1..=self.dv_max).contains(&dv)
    }

    /// Dynamic shared memory of the forward: Q `[64][RSK]`, the K/V ring `[2][tile][RSK + RSV]`.
    pub fn smem_fwd(&self, dk: usize, dv: usize) -> usize {
        2 * (FT_ROWS * row(dk) + STAGES * self.fwd_tile * (row(dk) + row(dv)))
    }

    /// Of the dK/dV kernel: K, V `[64][RSK + RSV]`, the Q/dO ring `[2][tile][RSK + RSV]`, then
    /// lse and D `[2][tile]` f32.
    pub fn smem_dkdv(&self, dk: usize, dv: usize) -> usize {
        2 * (FT_ROWS * (row(dk) + row(dv)) + STAGES * self.dkdv_tile * (row(dk) + row(dv)))
            + 8 * STAGES * self.dkdv_tile
    }

    /// Of the dQ kernel: Q, dO `[64][RSK + RSV]`, the K/V ring `[2][tile][RSK + RSV]`.
    pub fn smem_dq(&self, dk: usize, dv: usize) -> usize {
        2 * (FT_ROWS * (row(dk) + row(dv)) + STAGES * self.dq_tile * (row(dk) + row(dv)))
    }
}

/// The variant for head dims `dn`, `dr`, `dv` (the smallest that takes them), `None` when none
/// does (`dn + dr > 192`, `dv > 128`, or not multiples of 8).
pub fn flash_train_variant(dn: usize, dr: usize, dv: usize) -> Option<&'static FlashTrainVariant> {
    FLASH_TRAIN_VARIANTS.iter().find(|v| v.takes(dn, dr, dv))
}

/// Whether the training flash kernels run head dims `dn`, `dr`, `dv` on `dev` (shared memory
/// included).
pub fn flash_train_fits(dev: &Device, dn: usize, dr: usize, dv: usize) -> bool {
    flash_train_variant(dn, dr, dv).is_some_and(|v| {
        let (dk, optin) = (dn + dr, max_smem_optin(dev));
        v.smem_fwd(dk, dv).max(v.smem_dkdv(dk, dv)).max(v.smem_dq(dk, dv)) <= optin
    })
}

fn max_smem_optin(dev: &Device) -> usize {
    dev.ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |v| v.max(0) as usize)
}

/// The dK/dV blocks' `(segment, first key)` pairs, 64 keys each, most query rows first.
pub fn key_tile_table(segs: &[Segment]) -> Vec<i32> {
    let mut t: Vec<(usize, usize, usize)> = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        for k0 in (0..s.keys()).step_by(FT_ROWS) {
            t.push((s.nq - k0.saturating_sub(s.p0), i, k0));
        }
    }
    t.sort_by_key(|x| std::cmp::Reverse(x.0));
    t.iter().flat_map(|&(_, i, k0)| [i as i32, k0 as i32]).collect()
}

/// A bf16 operand read per (row, head): element `(row, head)` at `off + row·ld + head·hs`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub buf: &'a Act,
    pub off: usize,
    pub ld: usize,
    pub hs: usize,
}

/// A bf16 operand written per (row, head), as [`Strided`].
pub struct StridedMut<'a> {
    pub buf: &'a mut Act,
    pub off: usize,
    pub ld: usize,
    pub hs: usize,
}

/// The backward's outputs (all written, never accumulated, bf16), each at `off + row·ld +
/// head·hs` like its input: `dq` `[.., h, dn + dr]` at the query rows; dK's nope part `[.., h,
/// dn]` at `dk_off` and dV `[.., h, dv]` at `dv_off`, both in `dkv` (the pass keeps them
/// interleaved per head, as `kv_b_proj`'s output) at the key rows; the rope key's gradient
/// `[.., dr]` (summed over the heads) in `dkpe` at `dkpe_off + pe_row·ld_dkpe` (`None` iff
/// `dr == 0`).
pub struct FlashGrads<'a> {
    pub dq: StridedMut<'a>,
    pub dkv: &'a mut Act,
    pub dk_off: usize,
    pub ld_dk: usize,
    pub hs_dk: usize,
    pub dv_off: usize,
    pub ld_dv: usize,
    pub hs_dv: usize,
    pub dkpe: Option<(&'a mut Act, usize, usize)>,
}

/// The checks shared by the forward and the backward: dtypes, dims, alignment, row ranges of
/// q/k/kpe/v; returns the variant and the segments with rows.
fn check_inputs(c: &FlashCall, what: &str) -> Result<(FlashTrainVariant, Vec<Segment>)> {
    let FlashCall { h, dn, dr, dv, .. } = *c;
    let dk = dn + dr;
    let var = *flash_train_variant(dn, dr, dv).ok_or_else(|| {
        Error::Input(format!(
            "{what}: head dims dn {dn} + dr {dr} (<= 192), dv {dv} (<= 128), multiples of 8 are not supported"
        ))
    })?;
    if [c.q, c.k, c.kpe, c.v].iter().any(|a| a.dtype() != DType::Bf16) {
        return Err(Error::Input(format!("{what}: bf16 operands only")));
    }
    let mut sixteen = vec![c.q_off, c.ld_q, c.hs_q, c.k_off, c.ld_k, c.hs_k, c.v_off, c.ld_v, c.hs_v];
    if dr > 0 {
        sixteen.extend([c.kpe_off, c.ld_kpe]);
    }
    if !sixteen.iter().all(|x| x.is_multiple_of(8)) {
        return Err(Error::Input(format!("{what}: offsets and strides of q, k, kpe, v must be multiples of 8")));
    }
    if h > 1 && (c.hs_q < dk || c.hs_k < dn || c.hs_v < dv) {
        return Err(Error::Input(format!("{what}: heads overlap")));
    }
    let segs: Vec<Segment> = c.segs.iter().copied().filter(|s| s.nq > 0).collect();
    for s in &segs {
        let (qr, kr, pr) = (s.q_row0 + s.nq - 1, s.k_row0 + s.keys() - 1, s.pe_row0 + s.keys() - 1);
        if [qr, kr, pr].iter().any(|&r| r >= i32::MAX as usize) {
            return Err(Error::Input(format!("{what}: row index past 32 bits")));
        }
        c.q.check(c.q_off + qr * c.ld_q + (h - 1) * c.hs_q + dk, "flash train q")?;
        c.k.check(c.k_off + kr * c.ld_k + (h - 1) * c.hs_k + dn, "flash train k")?;
        c.v.check(c.v_off + kr * c.ld_v + (h - 1) * c.hs_v + dv, "flash train v")?;
        if dr > 0 {
            c.kpe.check(c.kpe_off + pr * c.ld_kpe + dr, "flash train kpe")?;
        }
    }
    // query rows (outputs, lse, D) and key rows (dK, dV, the rope scratch) written once
    disjoint(segs.iter().map(|s| (s.q_row0, s.nq)), what, "query")?;
    Ok((var, segs))
}

/// Errors unless the row ranges `(first, count)` are pairwise disjoint.
fn disjoint(r: impl Iterator<Item = (usize, usize)>, what: &str, kind: &str) -> Result<()> {
    let mut v: Vec<(usize, usize)> = r.collect();
    v.sort_unstable();
    if v.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(Error::Input(format!("{what}: the segments' {kind} rows overlap")));
    }
    Ok(())
}

/// Errors unless a per-(row, head) operand of `d` values over `h` heads is well formed: its
/// heads and rows do not overlap (when written) and its last element of `rows` lies in `buf`.
#[allow(clippy::too_many_arguments)]
fn check_rows(
    buf: &Act,
    off: usize,
    ld: usize,
    hs: usize,
    h: usize,
    d: usize,
    last_row: usize,
    what: &str,
) -> Result<()> {
    if buf.dtype() != DType::Bf16 {
        return Err(Error::Input(format!("{what}: bf16 only")));
    }
    if h > 1 && hs < d {
        return Err(Error::Input(format!("{what}: heads overlap")));
    }
    if last_row > 0 && ld < (h - 1) * hs + d {
        return Err(Error::Input(format!("{what}: rows overlap")));
    }
    buf.check(off + last_row * ld + (h - 1) * hs + d, what)
}

fn seg_table(segs: &[Segment]) -> Vec<i32> {
    segs.iter().flat_map(|s| [s.q_row0, s.nq, s.p0, s.k_row0, s.pe_row0].map(|x| x as i32)).collect()
}

fn base_args(dev: &Device, c: &FlashCall, segs: u64) -> Result<FlashTrainArgs> {
    Ok(FlashTrainArgs {
        q: c.q.ptr(dev, c.q_off)?,
        k: c.k.ptr(dev, c.k_off)?,
        kpe: if c.dr > 0 { c.kpe.ptr(dev, c.kpe_off)? } else { c.k.ptr(dev, c.k_off)? },
        v: c.v.ptr(dev, c.v_off)?,
        segs,
        ld_q: int(c.ld_q, "ld_q")?,
        hs_q: int(c.hs_q, "hs_q")?,
        ld_k: int(c.ld_k, "ld_k")?,
        hs_k: int(c.hs_k, "hs_k")?,
        ld_kpe: int(c.ld_kpe, "ld_kpe")?,
        ld_v: int(c.ld_v, "ld_v")?,
        hs_v: int(c.hs_v, "hs_v")?,
        h: int(c.h, "h")?,
        dn: int(c.dn, "dn")?,
        dr: int(c.dr, "dr")?,
        dv: int(c.dv, "dv")?,
        scale: c.scale,
        ..Default::default()
    })
}

fn check_smem(dev: &Device, smem: usize, kernel: &str) -> Result<u32> {
    let optin = max_smem_optin(dev);
    if smem > optin {
        return Err(Error::Unsupported(format!("{kernel} needs {smem} B of shared memory, the GPU allows {optin}")));
    }
    Ok(smem as u32)
}

/// Training forward: `out[row, head, :dv] = softmax(scale·Q·Kᵀ, causal)·V` (bf16, element
/// `(row, head)` at `o_off + row·ld_o + head·hs_o`) and `lse[row·h + head] = log Σ_t
/// exp(scale·q·k_t)` (f32 `[rows][h]`, natural log) for every query row of every segment. Other
/// rows are not written.
#[allow(clippy::too_many_arguments)]
pub fn flash_train_forward(
    dev: &Device,
    c: &FlashCall,
    out: &mut Act,
    o_off: usize,
    ld_o: usize,
    hs_o: usize,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    const W: &str = "flash train forward";
    if c.h == 0 || c.segs.iter().all(|s| s.nq == 0) {
        return Ok(());
    }
    let (var, segs) = check_inputs(c, W)?;
    let h = c.h;
    if ![o_off, ld_o, hs_o].iter().all(|x| x.is_multiple_of(2)) {
        return Err(Error::Input(format!("{W}: offset and strides of out must be even")));
    }
    let last_q = segs.iter().map(|s| s.q_row0 + s.nq - 1).max().unwrap_or(0);
    check_rows(out, o_off, ld_o, hs_o, h, c.dv, last_q, "flash train out")?;
    if lse.len() < (last_q + 1) * h {
        return Err(Error::Input(format!("{W}: lse holds {} values, needs {}", lse.len(), (last_q + 1) * h)));
    }
    let smem = check_smem(dev, var.smem_fwd(c.dn + c.dr, c.dv), var.fwd)?;
    let tiles = tile_table(&segs, FT_ROWS);
    let ntiles = tiles.len() / 2;
    let (seg_d, tiles_d) = (upload(dev, &seg_table(&segs))?, upload(dev, &tiles)?);
    let mut a = base_args(dev, c, dptr(dev, &seg_d, 0)?)?;
    a.o = out.ptr(dev, o_off)?;
    a.lse = dptr(dev, lse, 0)?;
    a.tiles = dptr(dev, &tiles_d, 0)?;
    a.ld_o = int(ld_o, "ld_o")?;
    a.hs_o = int(hs_o, "hs_o")?;
    a.ntiles = int(ntiles, "tiles")?;
    if [a.q, a.k, a.kpe, a.v].iter().any(|p| !p.is_multiple_of(16)) || !a.o.is_multiple_of(4) {
        return Err(Error::Input(format!("{W}: operands misaligned")));
    }
    let grid = (dim(ntiles, "flash train tiles")?, dim(h, "flash train heads")?, 1);
    launch_smem(dev, "attn_train", var.fwd, grid, FT_THREADS, smem, &[KArg::AttnTrain(a)])
}

/// Training backward of [`flash_train_forward`]: from its output `o` and log-sum-exp `lse` and
/// the output's gradient `dout` (`[.., h, dv]` at the query rows, offset and strides multiples of
/// 8), writes [`FlashGrads`]: `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q` (the rope part summed over
/// heads), `dV = Pᵀ·dO` with `P = exp(scale·Q·Kᵀ − lse)` (causal) and `dS = P ∘ (dO·Vᵀ − D)`,
/// `D = rowsum(dO ∘ O)`. Key rows (and rope rows) of different segments must not overlap.
/// Deterministic; uses two f32 scratch buffers (D, `[rows][h]`, and the per-head rope
/// gradient, `[pe rows][h][dr]`).
pub fn flash_train_backward(
    dev: &Device,
    c: &FlashCall,
    o: Strided,
    dout: Strided,
    lse: &CudaSlice<f32>,
    g: FlashGrads,
) -> Result<()> {
    const W: &str = "flash train backward";
    if c.h == 0 || c.segs.iter().all(|s| s.nq == 0) {
        return Ok(());
    }
    let (var, segs) = check_inputs(c, W)?;
    let FlashCall { h, dn, dr, dv, .. } = *c;
    let dk = dn + dr;
    disjoint(segs.iter().map(|s| (s.k_row0, s.keys())), W, "key")?;
    disjoint(segs.iter().map(|s| (s.pe_row0, s.keys())), W, "rope key")?;
    let last_q = segs.iter().map(|s| s.q_row0 + s.nq - 1).max().unwrap_or(0);
    let last_k = segs.iter().map(|s| s.k_row0 + s.keys() - 1).max().unwrap_or(0);
    let last_pe = segs.iter().map(|s| s.pe_row0 + s.keys() - 1).max().unwrap_or(0);
    if ![dout.off, dout.ld, dout.hs].iter().all(|x| x.is_multiple_of(8)) {
        return Err(Error::Input(format!("{W}: offset and strides of dout must be multiples of 8")));
    }
    let even = [o.off, o.ld, o.hs, g.dq.off, g.dq.ld, g.dq.hs, g.dk_off, g.ld_dk, g.hs_dk, g.dv_off, g.ld_dv, g.hs_dv];
    if !even.iter().all(|x| x.is_multiple_of(2)) {
        return Err(Error::Input(format!("{W}: offsets and strides of o, dq, dk, dv must be even")));
    }
    // o and dout are read (rows may alias), the gradients written
    if o.buf.dtype() != DType::Bf16 || dout.buf.dtype() != DType::Bf16 {
        return Err(Error::Input(format!("{W}: bf16 o and dout only")));
    }
    for (x, what) in [(&o, "flash train o"), (&dout, "flash train dout")] {
        if h > 1 && x.hs < dv {
            return Err(Error::Input(format!("{what}: heads overlap")));
        }
        x.buf.check(x.off + last_q * x.ld + (h - 1) * x.hs + dv, what)?;
    }
    check_rows(g.dq.buf, g.dq.off, g.dq.ld, g.dq.hs, h, dk, last_q, "flash train dq")?;
    check_rows(g.dkv, g.dk_off, g.ld_dk, g.hs_dk, h, dn.max(1), last_k, "flash train dk")?;
    check_rows(g.dkv, g.dv_off, g.ld_dv, g.hs_dv, h, dv, last_k, "flash train dv")?;
    // dK and dV share a buffer: their first row's first head must not meet (the caller keeps
    // the two apart in every row and head, as the pass's interleaved [dk_h ‖ dv_h] layout does)
    if dn > 0 && g.dk_off < g.dv_off + dv && g.dv_off < g.dk_off + dn {
        return Err(Error::Input(format!("{W}: dk and dv overlap")));
    }
    if lse.len() < (last_q + 1) * h {
        return Err(Error::Input(format!("{W}: lse holds {} values, needs {}", lse.len(), (last_q + 1) * h)));
    }
    let (gkpe, gkpe_off, ld_dkpe) = match (g.dkpe, dr) {
        (Some((b, off, ld)), dr) if dr > 0 => {
            if b.dtype() != DType::Bf16 {
                return Err(Error::Input(format!("{W}: bf16 dkpe only")));
            }
            if last_pe > 0 && ld < dr {
                return Err(Error::Input(format!("{W}: dkpe rows overlap")));
            }
            b.check(off + last_pe * ld + dr, "flash train dkpe")?;
            (Some(b), off, ld)
        }
        (None, 0) => (None, 0, 0),
        _ => return Err(Error::Input(format!("{W}: dkpe must be given iff dr > 0"))),
    };
    let smem_dkdv = check_smem(dev, var.smem_dkdv(dk, dv), var.dkdv)?;
    let smem_dq = check_smem(dev, var.smem_dq(dk, dv), var.dq)?;

    let qtiles = tile_table(&segs, FT_ROWS);
    let ktiles = key_tile_table(&segs);
    let (nq_t, nk_t) = (qtiles.len() / 2, ktiles.len() / 2);
    let seg_d = upload(dev, &seg_table(&segs))?;
    let (qt_d, kt_d) = (upload(dev, &qtiles)?, upload(dev, &ktiles)?);
    let dd: CudaSlice<f32> = empty(dev, (last_q + 1) * h)?;
    let part: CudaSlice<f32> = empty(dev, ((last_pe + 1) * h * dr).max(1))?;
    let mut a = base_args(dev, c, dptr(dev, &seg_d, 0)?)?;
    a.o = o.buf.ptr(dev, o.off)?;
    a.dout = dout.buf.ptr(dev, dout.off)?;
    a.lse = dptr(dev, lse, 0)?;
    a.dd = dptr(dev, &dd, 0)?;
    a.gq = g.dq.buf.ptr(dev, g.dq.off)?;
    a.gk = g.dkv.ptr(dev, g.dk_off)?;
    a.gv = g.dkv.ptr(dev, g.dv_off)?;
    a.gkpe_part = dptr(dev, &part, 0)?;
    a.gkpe = match gkpe {
        Some(b) => b.ptr(dev, gkpe_off)?,
        None => a.gk,
    };
    a.ld_o = int(o.ld, "ld_o")?;
    a.hs_o = int(o.hs, "hs_o")?;
    a.ld_do = int(dout.ld, "ld_do")?;
    a.hs_do = int(dout.hs, "hs_do")?;
    a.ld_dq = int(g.dq.ld, "ld_dq")?;
    a.hs_dq = int(g.dq.hs, "hs_dq")?;
    a.ld_dk = int(g.ld_dk, "ld_dk")?;
    a.hs_dk = int(g.hs_dk, "hs_dk")?;
    a.ld_dkpe = int(ld_dkpe, "ld_dkpe")?;
    a.ld_dv = int(g.ld_dv, "ld_dv")?;
    a.hs_dv = int(g.hs_dv, "hs_dv")?;
    let sixteen = [a.q, a.k, a.kpe, a.v, a.dout];
    let four = [a.o, a.gq, a.gk, a.gv];
    if sixteen.iter().any(|p| !p.is_multiple_of(16)) || four.iter().any(|p| !p.is_multiple_of(4)) {
        return Err(Error::Input(format!("{W}: operands misaligned")));
    }
    let heads = dim(h, "flash train heads")?;
    let aq = FlashTrainArgs { tiles: dptr(dev, &qt_d, 0)?, ntiles: int(nq_t, "tiles")?, ..a };
    let ak = FlashTrainArgs { tiles: dptr(dev, &kt_d, 0)?, ntiles: int(nk_t, "tiles")?, ..a };
    let (gq, gk) = ((dim(nq_t, "flash train tiles")?, heads, 1), (dim(nk_t, "flash train key tiles")?, heads, 1));
    launch_smem(dev, "attn_train", "flash_bwd_preprocess", gq, FT_THREADS, 0, &[KArg::AttnTrain(aq)])?;
    launch_smem(dev, "attn_train", var.dkdv, gk, FT_THREADS, smem_dkdv, &[KArg::AttnTrain(ak)])?;
    launch_smem(dev, "attn_train", var.dq, gq, FT_THREADS, smem_dq, &[KArg::AttnTrain(aq)])?;
    if dr > 0 {
        let g1 = (gk.0, 1, 1);
        launch_smem(dev, "attn_train", "flash_bwd_dkpe_reduce", g1, FT_THREADS, 0, &[KArg::AttnTrain(ak)])?;
    }
    Ok(())
    // the tables and scratch are freed when this returns: cudarc frees on the stream, after the kernels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_train_args_match_the_cuda_struct_layout() {
        // 15 pointers, 23 ints, a float
        assert_eq!(std::mem::size_of::<FlashTrainArgs>(), 15 * 8 + 23 * 4 + 4);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, tiles), 14 * 8);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, ld_q), 120);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, hs_dv), 120 + 17 * 4);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, h), 120 + 18 * 4);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, ntiles), 120 + 22 * 4);
        assert_eq!(std::mem::offset_of!(FlashTrainArgs, scale), 120 + 23 * 4);
    }

    #[test]
    fn variants_are_launchable_and_sized_like_the_kernels() {
        for v in FLASH_TRAIN_VARIANTS {
            for k in [v.fwd, v.dkdv, v.dq] {
                assert!(crate::ops::KERNELS.contains(&("attn_train", k)), "{k} not in KERNELS");
                assert!(k.ends_with(v.name));
            }
        }
        for k in ["flash_bwd_preprocess", "flash_bwd_dkpe_reduce"] {
            assert!(crate::ops::KERNELS.contains(&("attn_train", k)));
        }
        // V3 (dk 192, dv 128) -> k192v128; 88M (96, 64) -> k128v128; tiny presets -> k64v64
        assert_eq!(flash_train_variant(128, 64, 128).unwrap().name, "k192v128");
        assert_eq!(flash_train_variant(64, 32, 64).unwrap().name, "k128v128");
        assert_eq!(flash_train_variant(16, 8, 16).unwrap().name, "k64v64");
        assert_eq!(flash_train_variant(8, 8, 8).unwrap().name, "k64v64");
        assert!(flash_train_variant(192, 8, 128).is_none() && flash_train_variant(128, 64, 136).is_none());
        assert!(flash_train_variant(12, 4, 16).is_none());
        let v = flash_train_variant(128, 64, 128).unwrap();
        assert_eq!(v.smem_fwd(192, 128), 2 * (64 * 192 + 2 * 64 * 320));
        assert_eq!(v.smem_dkdv(192, 128), 2 * (64 * 320 + 2 * 32 * 320) + 8 * 2 * 32);
        assert_eq!(v.smem_dq(192, 128), 2 * (64 * 320 + 2 * 32 * 320));
        // within sm_80's 163 KiB opt-in at every variant's largest dims
        for v in FLASH_TRAIN_VARIANTS {
            let m =
                v.smem_fwd(v.dk_max, v.dv_max).max(v.smem_dkdv(v.dk_max, v.dv_max)).max(v.smem_dq(v.dk_max, v.dv_max));
            assert!(m <= 163 * 1024, "{}: {m}", v.name);
        }
    }

    #[test]
    fn key_tiles_cover_every_key_once_most_work_first() {
        let segs = [
            Segment { q_row0: 0, nq: 130, p0: 0, k_row0: 0, pe_row0: 0 },
            Segment { q_row0: 130, nq: 5, p0: 70, k_row0: 130, pe_row0: 130 },
        ];
        // seg 0: keys 0 (130 rows), 64 (66), 128 (2); seg 1: keys 0 (5), 64 (5 - 0 = 5)
        assert_eq!(key_tile_table(&segs), vec![0, 0, 0, 64, 1, 0, 1, 64, 0, 128]);
        assert!(disjoint([(0, 5), (5, 3)].into_iter(), "t", "key").is_ok());
        assert!(disjoint([(5, 3), (0, 6)].into_iter(), "t", "key").is_err());
    }
}
