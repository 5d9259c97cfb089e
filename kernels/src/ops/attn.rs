//! Flash attention for prefill (`kernels/cuda/attn.cu`): causal, query-tiled, bf16 on tensor
//! cores (mma.sync m16n8k16, ldmatrix, cp.async ring, FlashAttention-2's online softmax).
//!
//! MHA form of MLA: per head `h`, `K_h[t] = [k_h[t] (dn) ‖ kpe[t] (dr, shared by all heads)]`
//! and `V_h[t] = v_h[t] (dv)`. In the session `k_h`/`v_h` come from decompressing the slot's
//! cached latents with `kv_b_proj` and `kpe` is read from the latent cache itself.
//!
//! A call covers several [`Segment`]s, each the new query rows of one sequence: row `i` of a
//! segment sits at position `p0 + i` and sees keys `0..=p0 + i` of its sequence (chunked prefill
//! over a cached prefix: `p0 > 0`). Each CTA serves `64·m` query rows of one segment and one head
//! and loads each K/V tile once for all of them.
use super::{dim, int, launch_smem, max_smem_optin, KArg};
use crate::device::Device;
use crate::tensor::{dptr, upload, Act, DType};
use cudarc::driver::DeviceRepr;
use dsv3_core::{Error, Result};
use std::sync::OnceLock;

/// The kernels' argument block (`struct AttnArgs` in `kernels/cuda/attn.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnArgs {
    pub q: u64,
    pub k: u64,
    pub kpe: u64,
    pub v: u64,
    pub out: u64,
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
    pub h: i32,
    pub dn: i32,
    pub dr: i32,
    pub dv: i32,
    pub ntiles: i32,
    pub scale: f32,
}

// SAFETY: plain integers and floats, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for AttnArgs {}

/// Threads per block (`ATTN_THREADS`).
pub const ATTN_THREADS: u32 = 128;
/// The largest `dn + dr` and `dv` the kernels take.
pub const ATTN_DMAX: usize = 256;

/// A kernel variant: `attn_fwd<m_tiles, dv_max, tile, stages>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnVariant {
    pub name: &'static str,
    pub kernel: &'static str,
    /// 64-row query tiles per block (each warp owns `16·m_tiles` rows).
    pub m_tiles: usize,
    /// The largest `dv` (rounded up to 16) it takes.
    pub dv_max: usize,
    /// Keys per shared-memory tile, tiles in flight.
    pub tile: usize,
    pub stages: usize,
}

/// Every variant (all in `KERNELS`). Registers (ptxas, sm_90a, no spills): m1d64 121, m1d128
/// 166, m1d256 218, m2d64 232, m2d128 244, m2d64s3 232, m2d128s3 244.
pub const ATTN_VARIANTS: &[AttnVariant] = &[
    AttnVariant { name: "m1d64", kernel: "attn_fwd_m1d64", m_tiles: 1, dv_max: 64, tile: 64, stages: 2 },
    AttnVariant { name: "m1d128", kernel: "attn_fwd_m1d128", m_tiles: 1, dv_max: 128, tile: 64, stages: 2 },
    AttnVariant { name: "m1d256", kernel: "attn_fwd_m1d256", m_tiles: 1, dv_max: 256, tile: 32, stages: 2 },
    AttnVariant { name: "m2d64", kernel: "attn_fwd_m2d64", m_tiles: 2, dv_max: 64, tile: 64, stages: 2 },
    AttnVariant { name: "m2d128", kernel: "attn_fwd_m2d128", m_tiles: 2, dv_max: 128, tile: 32, stages: 2 },
    AttnVariant { name: "m2d64s3", kernel: "attn_fwd_m2d64s3", m_tiles: 2, dv_max: 64, tile: 64, stages: 3 },
    AttnVariant { name: "m2d128s3", kernel: "attn_fwd_m2d128s3", m_tiles: 2, dv_max: 128, tile: 32, stages: 3 },
];

/// The variants [`flash_variant`] chooses among by default (the three-stage ones only through
/// `DSV3_FLASH_VARIANT` until a GPU measurement says otherwise).
const DEFAULT_VARIANTS: &[&str] = &["m1d64", "m1d128", "m1d256", "m2d64", "m2d128"];

/// `DSV3_FLASH_VARIANT=<name>` (read once): that variant wherever it takes the call.
fn env_variant() -> Option<&'static AttnVariant> {
    static V: OnceLock<Option<&'static AttnVariant>> = OnceLock::new();
    *V.get_or_init(|| {
        let name = std::env::var("DSV3_FLASH_VARIANT").ok()?;
        let v = ATTN_VARIANTS.iter().find(|v| v.name == name);
        if v.is_none() {
            let names: Vec<_> = ATTN_VARIANTS.iter().map(|v| v.name).collect();
            eprintln!("DSV3_FLASH_VARIANT={name}: no such variant (one of {names:?}); ignored");
        }
        v
    })
}

impl AttnVariant {
    /// Query rows per block.
    pub fn rows(&self) -> usize {
        64 * self.m_tiles
    }

    /// Dynamic shared memory in bytes (the layout in `kernels/cuda/attn.cu`): Q `[rows][RSK]`,
    /// the K ring `[stages][tile][RSK]` and the V ring `[stages][tile][RSV]` in bf16, `RSK` /
    /// `RSV` = `dk` / `dv` rounded up to 16, then to 64.
    pub fn smem_bytes(&self, dk: usize, dv: usize) -> usize {
        let rsk = dk.div_ceil(16) * 16;
        let rsv = dv.div_ceil(16) * 16;
        let (rsk, rsv) = (rsk.div_ceil(64) * 64, rsv.div_ceil(64) * 64);
        2 * (self.rows() * rsk + self.stages * self.tile * (rsk + rsv))
    }

    /// Whether this variant computes head dims `dn`, `dr`, `dv` (see [`flash_takes`]).
    pub fn takes(&self, dn: usize, dr: usize, dv: usize) -> bool {
        flash_takes(dn, dr, dv) && dv.div_ceil(16) * 16 <= self.dv_max
    }

    /// Blocks of `h` heads over these segments.
    pub fn blocks(&self, segs: &[Segment], h: usize) -> usize {
        segs.iter().map(|s| s.nq.div_ceil(self.rows())).sum::<usize>() * h
    }
}

/// The head dims the kernels take: `dn`, `dr`, `dv` multiples of 8, `dn + dr` and `dv` in
/// `1..=256` (padded to 16 inside the kernel).
pub fn flash_takes(dn: usize, dr: usize, dv: usize) -> bool {
    [dn, dr, dv].iter().all(|d| d.is_multiple_of(8))
        && (1..=ATTN_DMAX).contains(&(dn + dr))
        && (1..=ATTN_DMAX).contains(&dv)
}

/// The new query rows of one sequence and where its keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First query (and output) row.
    pub q_row0: usize,
    /// Query rows; row `i` sits at position `p0 + i`.
    pub nq: usize,
    /// Keys before the first query (the cached prefix).
    pub p0: usize,
    /// Row of key 0 in `k`/`v`, and in `kpe`.
    pub k_row0: usize,
    pub pe_row0: usize,
}

impl Segment {
    /// (query, key) pairs attended: `Σ_i (p0 + i + 1)`.
    pub fn pairs(&self) -> usize {
        self.nq * self.p0 + self.nq * (self.nq + 1) / 2
    }

    /// Keys the segment reads (`p0 + nq`).
    pub fn keys(&self) -> usize {
        self.p0 + self.nq
    }
}

/// One flash attention call over `segs`, `h` heads of dims `dn + dr` (queries, keys) and `dv`.
/// Element `(row, head)` of each operand starts at `off + row·ld + head·hs` (`kpe` has no head
/// stride: one rope key per row for all heads). Every operand bf16.
pub struct FlashCall<'a> {
    pub h: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
    /// `[.., h, dn + dr]` (nope ‖ rope).
    pub q: &'a Act,
    pub q_off: usize,
    pub ld_q: usize,
    pub hs_q: usize,
    /// `[.., h, dn]`.
    pub k: &'a Act,
    pub k_off: usize,
    pub ld_k: usize,
    pub hs_k: usize,
    /// `[.., dr]` (ignored when `dr == 0`).
    pub kpe: &'a Act,
    pub kpe_off: usize,
    pub ld_kpe: usize,
    /// `[.., h, dv]`.
    pub v: &'a Act,
    pub v_off: usize,
    pub ld_v: usize,
    pub hs_v: usize,
    pub scale: f32,
    pub segs: &'a [Segment],
}

impl FlashCall<'_> {
    /// FLOPs of the attention proper: `2·(dk + dv)` per (query, key) pair and head.
    pub fn flops(&self) -> f64 {
        let pairs: usize = self.segs.iter().map(Segment::pairs).sum();
        2.0 * (pairs * self.h * (self.dn + self.dr + self.dv)) as f64
    }
}

/// Whether variant `v` runs head dims `dn`, `dr`, `dv` on `dev` (its shared memory included).
pub fn flash_fits(dev: &Device, v: &AttnVariant, dn: usize, dr: usize, dv: usize) -> bool {
    v.takes(dn, dr, dv) && v.smem_bytes(dn + dr, dv) <= max_smem_optin(dev)
}

/// The variant [`flash_attention`] runs for this call on `dev`, `None` when none takes its dims
/// (or fits the GPU's shared memory): the smallest `dv_max` that holds `dv`; 128 query rows per
/// block when that still gives two blocks per SM, else 64. `DSV3_FLASH_VARIANT` overrides it
/// where that variant takes the call.
pub fn flash_variant(dev: &Device, c: &FlashCall) -> Option<AttnVariant> {
    let dk = c.dn + c.dr;
    let optin = max_smem_optin(dev);
    let fits = |v: &&AttnVariant| v.takes(c.dn, c.dr, c.dv) && v.smem_bytes(dk, c.dv) <= optin;
    if let Some(v) = env_variant().filter(fits) {
        return Some(*v);
    }
    let defaults = || ATTN_VARIANTS.iter().filter(|v| DEFAULT_VARIANTS.contains(&v.name)).filter(fits);
    let dv_max = defaults().map(|v| v.dv_max).min()?;
    let mut cands: Vec<&AttnVariant> = defaults().filter(|v| v.dv_max == dv_max).collect();
    cands.sort_by_key(|v| std::cmp::Reverse(v.m_tiles));
    cands.iter().find(|v| v.m_tiles == 1 || v.blocks(c.segs, c.h) >= 2 * dev.sms).or(cands.last()).map(|v| **v)
}

/// `out[row, head, :dv] = softmax(Q·Kᵀ·scale, causal) · V` for every query row of every segment
/// (`out` bf16, element `(row, head)` at `o_off + row·ld_o + head·hs_o`). Other rows are not
/// written. Runs [`flash_variant`]'s choice.
pub fn flash_attention(
    dev: &Device,
    c: &FlashCall,
    out: &mut Act,
    o_off: usize,
    ld_o: usize,
    hs_o: usize,
) -> Result<()> {
    let v = flash_variant(dev, c).ok_or_else(|| {
        Error::Unsupported(format!(
            "flash attention: no kernel for dk {} + {}, dv {} on this GPU (multiples of 8, <= {ATTN_DMAX})",
            c.dn, c.dr, c.dv
        ))
    })?;
    flash_attention_with(dev, &v, c, out, o_off, ld_o, hs_o)
}

/// The blocks' `(segment, first row)` pairs, longest (most keys) first so that the tail of the
/// grid is short blocks.
pub fn tile_table(segs: &[Segment], rows: usize) -> Vec<i32> {
    let mut t: Vec<(usize, usize, usize)> = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        for q0 in (0..s.nq).step_by(rows) {
            t.push((s.p0 + (q0 + rows).min(s.nq), i, q0));
        }
    }
    t.sort_by_key(|x| std::cmp::Reverse(x.0)); // stable: segment order among equals
    t.iter().flat_map(|&(_, i, q0)| [i as i32, q0 as i32]).collect()
}

/// [`flash_attention`] with the variant chosen by the caller (tests, benchmarks).
pub fn flash_attention_with(
    dev: &Device,
    var: &AttnVariant,
    c: &FlashCall,
    out: &mut Act,
    o_off: usize,
    ld_o: usize,
    hs_o: usize,
) -> Result<()> {
    let FlashCall { h, dn, dr, dv, .. } = *c;
    let segs: Vec<Segment> = c.segs.iter().copied().filter(|s| s.nq > 0).collect();
    if segs.is_empty() || h == 0 {
        return Ok(());
    }
    let dk = dn + dr;
    if [c.q, c.k, c.kpe, c.v, &*out].iter().any(|a| a.dtype() != DType::Bf16) {
        return Err(Error::Input("flash attention: bf16 operands only".into()));
    }
    if !var.takes(dn, dr, dv) {
        return Err(Error::Input(format!(
            "flash attention: {} takes dn, dr, dv multiples of 8, dn + dr <= {ATTN_DMAX}, dv <= {} (got {dn}, {dr}, {dv})",
            var.kernel, var.dv_max
        )));
    }
    // 16-byte cp.async sources, 4-byte bf16x2 stores
    let mut sixteen = vec![c.q_off, c.ld_q, c.hs_q, c.k_off, c.ld_k, c.hs_k, c.v_off, c.ld_v, c.hs_v];
    if dr > 0 {
        sixteen.extend([c.kpe_off, c.ld_kpe]);
    }
    let aligned = sixteen.iter().all(|x| x.is_multiple_of(8));
    if !aligned || ![o_off, ld_o, hs_o].iter().all(|x| x.is_multiple_of(2)) {
        return Err(Error::Input(
            "flash attention: offsets and strides of q, k, kpe, v must be multiples of 8, of out even".into(),
        ));
    }
    if h > 1 && (c.hs_q < dk || c.hs_k < dn || c.hs_v < dv || hs_o < dv) {
        return Err(Error::Input("flash attention: heads overlap".into()));
    }
    // every row the kernel touches lies inside its buffer
    for s in &segs {
        let (qr, kr, pr) = (s.q_row0 + s.nq - 1, s.k_row0 + s.keys() - 1, s.pe_row0 + s.keys() - 1);
        if [qr, kr, pr].iter().any(|&r| r >= i32::MAX as usize) {
            return Err(Error::Input("flash attention: row index past 32 bits".into()));
        }
        if c.ld_q < (h - 1) * c.hs_q + dk && s.nq > 1 {
            return Err(Error::Input("flash attention: query rows overlap".into()));
        }
        c.q.check(c.q_off + qr * c.ld_q + (h - 1) * c.hs_q + dk, "flash q")?;
        c.k.check(c.k_off + kr * c.ld_k + (h - 1) * c.hs_k + dn, "flash k")?;
        c.v.check(c.v_off + kr * c.ld_v + (h - 1) * c.hs_v + dv, "flash v")?;
        if dr > 0 {
            c.kpe.check(c.kpe_off + pr * c.ld_kpe + dr, "flash kpe")?;
        }
        out.check(o_off + qr * ld_o + (h - 1) * hs_o + dv, "flash out")?;
    }
    let smem = var.smem_bytes(dk, dv);
    let optin = max_smem_optin(dev);
    if smem > optin {
        return Err(Error::Unsupported(format!(
            "flash attention: {} needs {smem} B of shared memory, the GPU allows {optin}",
            var.kernel
        )));
    }
    let seg_tab: Vec<i32> =
        segs.iter().flat_map(|s| [s.q_row0, s.nq, s.p0, s.k_row0, s.pe_row0].map(|x| x as i32)).collect();
    let tiles = tile_table(&segs, var.rows());
    let ntiles = tiles.len() / 2;
    let (seg_d, tiles_d) = (upload(dev, &seg_tab)?, upload(dev, &tiles)?);
    let args = AttnArgs {
        q: c.q.ptr(dev, c.q_off)?,
        k: c.k.ptr(dev, c.k_off)?,
        kpe: if dr > 0 { c.kpe.ptr(dev, c.kpe_off)? } else { c.k.ptr(dev, c.k_off)? },
        v: c.v.ptr(dev, c.v_off)?,
        out: out.ptr(dev, o_off)?,
        segs: dptr(dev, &seg_d, 0)?,
        tiles: dptr(dev, &tiles_d, 0)?,
        ld_q: int(c.ld_q, "ld_q")?,
        hs_q: int(c.hs_q, "hs_q")?,
        ld_k: int(c.ld_k, "ld_k")?,
        hs_k: int(c.hs_k, "hs_k")?,
        ld_kpe: int(c.ld_kpe, "ld_kpe")?,
        ld_v: int(c.ld_v, "ld_v")?,
        hs_v: int(c.hs_v, "hs_v")?,
        ld_o: int(ld_o, "ld_o")?,
        hs_o: int(hs_o, "hs_o")?,
        h: int(h, "h")?,
        dn: int(dn, "dn")?,
        dr: int(dr, "dr")?,
        dv: int(dv, "dv")?,
        ntiles: int(ntiles, "tiles")?,
        scale: c.scale,
    };
    if [args.q, args.k, args.kpe, args.v].iter().any(|p| !p.is_multiple_of(16)) || !args.out.is_multiple_of(4) {
        return Err(Error::Input("flash attention: operands misaligned".into()));
    }
    launch_smem(
        dev,
        "attn",
        var.kernel,
        (dim(ntiles, "flash tiles")?, dim(h, "flash heads")?, 1),
        ATTN_THREADS,
        smem as u32,
        &[KArg::Attn(args)],
    )
    // the tables are freed when this returns: cudarc frees on the stream, after the kernel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attn_args_match_the_cuda_struct_layout() {
        assert_eq!(std::mem::size_of::<AttnArgs>(), 7 * 8 + 15 * 4 + 4);
        assert_eq!(std::mem::offset_of!(AttnArgs, ld_q), 56);
        assert_eq!(std::mem::offset_of!(AttnArgs, ntiles), 56 + 13 * 4);
        assert_eq!(std::mem::offset_of!(AttnArgs, scale), 56 + 14 * 4);
    }

    #[test]
    fn variants_are_launchable_and_sized_like_the_kernel() {
        for v in ATTN_VARIANTS {
            assert!(crate::ops::KERNELS.contains(&("attn", v.kernel)), "{} not in KERNELS", v.kernel);
            assert_eq!(v.kernel, format!("attn_fwd_{}", v.name));
        }
        assert!(DEFAULT_VARIANTS.iter().all(|n| ATTN_VARIANTS.iter().any(|v| v.name == *n)));
        let m2d128 = ATTN_VARIANTS.iter().find(|v| v.name == "m2d128").unwrap();
        // V3: dk 192, dv 128: Q 128x192, 2 stages of 32 keys x (192 + 128)
        assert_eq!(m2d128.smem_bytes(192, 128), 2 * (128 * 192 + 2 * 32 * 320));
        // 88M: dk 96 -> rows of 128, dv 64
        let m1d64 = ATTN_VARIANTS.iter().find(|v| v.name == "m1d64").unwrap();
        assert_eq!(m1d64.smem_bytes(96, 64), 2 * (64 * 128 + 2 * 64 * 192));
        // every variant fits the 99 KiB opt-in at V3's dims or takes larger dv only
        assert!(ATTN_VARIANTS.iter().filter(|v| v.takes(128, 64, 128)).all(|v| v.smem_bytes(192, 128) <= 163 * 1024));
        assert!(
            flash_takes(64, 32, 64) && flash_takes(128, 64, 128) && flash_takes(16, 8, 16) && flash_takes(40, 0, 8)
        );
        assert!(!flash_takes(12, 4, 16) && !flash_takes(192, 72, 128) && !flash_takes(64, 32, 264));
    }

    #[test]
    fn tiles_cover_every_row_once_longest_first() {
        let segs = [
            Segment { q_row0: 0, nq: 130, p0: 0, k_row0: 0, pe_row0: 0 },
            Segment { q_row0: 130, nq: 5, p0: 500, k_row0: 130, pe_row0: 1000 },
        ];
        let t = tile_table(&segs, 64);
        assert_eq!(t, vec![1, 0, 0, 128, 0, 64, 0, 0]);
        assert_eq!(segs[0].pairs(), 130 * 131 / 2);
        assert_eq!(segs[1].pairs(), 5 * 500 + 15);
    }
}
