//! Absorbed MLA attention over the latent cache (`kernels/cuda/mla.cu`) and the cache append.
//!
//! The cache of one layer is `[slots, max_len, C + dr]` (normalized latent ‖ rotated rope key per
//! token, 576 values for V3); a sequence owns a slot. Each query row `r` attends to the first
//! `row_len[r]` entries of slot `row_slot[r]` (causal prefill: `row_len = position + 1`).
//!
//! Two decode kernels: the SIMT one (`mla_decode_{f32,bf16}`, any shape, `MLA_HB` heads per
//! block) and, for bf16 at DeepSeek-like shapes, the tensor-core one (`mla_decode_mma_*`:
//! mma.sync/ldmatrix/cp.async, 16 or 32 heads per block, see `kernels/cuda/mla.cu`).
//! [`mla_kernel`] says which one [`mla_decode`] runs and [`mla_splits`] how many splits along
//! the cache to ask for; `DSV3_MLA_SIMPLE=1` forces the SIMT kernel and `DSV3_MLA_MMA=<name>`
//! (one of [`MMA_VARIANTS`]) a tensor-core variant (both read once per process).
use super::gemm::{gemm_epilogue, runs_epilogue, Epilogue, GemmShape};
use super::{allow_dynamic_smem, dim, int, launch, launch_smem, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType, DWeight};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};
use std::sync::OnceLock;

/// Heads per block (`MLA_HB`), the largest latent and rope widths the kernel takes.
pub const MLA_HB: usize = 8;
pub const MLA_CMAX: usize = 512;
pub const MLA_RMAX: usize = 128;

/// The kernels' argument block (`struct MlaArgs` in `kernels/cuda/mla.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MlaArgs {
    pub qt: u64,
    pub qpe: u64,
    pub cache: u64,
    pub out: u64,
    pub row_slot: u64,
    pub row_len: u64,
    pub part_o: u64,
    pub part_ml: u64,
    pub slot_stride: i64,
    pub n: i32,
    pub h: i32,
    pub c: i32,
    pub dr: i32,
    pub ld_qt: i32,
    pub ld_qpe: i32,
    pub hs_qpe: i32,
    pub ld_out: i32,
    pub splits: i32,
    pub split_len: i32,
    pub scale: f32,
    pub max_len: i32,
    /// Tensor-core kernels, several splits: the fused merge's counters (one per CTA column, zero
    /// between launches; [`MlaWork::counters`]), or 0 for the separate `mla_combine` launch.
    pub counters: u64,
}

// SAFETY: plain integers and floats, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for MlaArgs {}

/// One attention call: `n` query rows, `h` heads, latent width `c`, rope width `dr`.
pub struct MlaCall<'a> {
    pub n: usize,
    pub h: usize,
    pub c: usize,
    pub dr: usize,
    /// Absorbed queries `[n, h, c]` (row stride `ld_qt`).
    pub qt: &'a Act,
    pub ld_qt: usize,
    /// Rope queries: head `hh` of row `r` at `qpe_off + r·ld_qpe + hh·hs_qpe` (`[dr]`).
    pub qpe: &'a Act,
    pub qpe_off: usize,
    pub ld_qpe: usize,
    pub hs_qpe: usize,
    /// `[slots, max_len, c + dr]`.
    pub cache: &'a Act,
    pub slots: usize,
    pub max_len: usize,
    /// `[n]` slot of each row (must be `< slots`; the caller builds these) and visible entries.
    pub row_slot: &'a CudaSlice<i32>,
    pub row_len: &'a CudaSlice<i32>,
    /// Softmax scale.
    pub scale: f32,
    /// Splits along the cache (flash-decoding; [`mla_splits`] suggests a count); > 1 needs `work`.
    pub splits: usize,
}

/// Scratch for split attention: `[splits, n, h, c]` and `[splits, n, h, 2]` f32.
pub struct MlaWork {
    pub part_o: CudaSlice<f32>,
    pub part_ml: CudaSlice<f32>,
    /// The fused merge's arrival counters (`DSV3_MLA_COMBINE=fused`): `n·h` zeros (at least one
    /// per CTA column of any variant); every launch leaves them zero again.
    pub counters: CudaSlice<i32>,
}

impl MlaWork {
    /// Scratch for up to `splits` splits of `n` rows, `h` heads, width `c`.
    pub fn new(dev: &Device, splits: usize, n: usize, h: usize, c: usize) -> Result<MlaWork> {
        // unwritten: every split writes its (max, sum) for every row and head, and its partial
        // output wherever the sum is non-zero (the combine reads nothing else)
        Ok(MlaWork {
            part_o: crate::tensor::empty(dev, splits * n * h * c)?,
            part_ml: crate::tensor::empty(dev, splits * n * h * 2)?,
            counters: crate::tensor::zeros(dev, n * h)?,
        })
    }
}

/// Threads per block of the tensor-core kernels (`MMA_THREADS`; the 8-warp depth-split variants
/// twice that: [`MmaVariant::threads`]).
pub const MMA_THREADS: u32 = 128;
/// The most splits [`mla_splits`] suggests.
pub const MAX_SPLITS: usize = 64;

/// A tensor-core variant of the bf16 decode kernel: `mla_decode_mma<m_tiles, tile, stages>`, or
/// with `depth_split` `mla_decode_mmad<tile, stages>` (16 heads; S split over the warps along the
/// depth, Q's fragments in registers instead of re-read from shared memory every tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaVariant {
    /// Short name (`DSV3_MLA_MMA` picks a variant by it).
    pub name: &'static str,
    pub kernel: &'static str,
    /// 16-head tiles per block: a block serves `16·m_tiles` heads of one query row.
    pub m_tiles: usize,
    /// Cache rows per shared-memory tile, and tiles in flight (cp.async stages).
    pub tile: usize,
    pub stages: usize,
    /// `mla_decode_mmad` (m_tiles 1).
    pub depth_split: bool,
    /// Warps per block (4; 8 for the `d1w8*` depth-split variants).
    pub warps: usize,
}

/// Every tensor-core variant (all in `KERNELS`). Shared memory at C 512, dr 64: m1t32 92 KiB
/// (every sm_80+ GPU, the 99 KiB ones included; two blocks per SM on H100), m1s4 (m1t32 with 4
/// stages) 164 KiB and m1t64 165 KiB (H100), m2t32 112 KiB (A100; two blocks per SM on H100),
/// m2t64 186 KiB (H100); the depth-split d1t32 91 KiB (two blocks per SM on H100), d1s3 (3
/// stages) 127 KiB, d1t64 164 KiB; with 8 warps d1w8 93 KiB (two blocks per SM), d1w8s3 129 KiB.
pub const MMA_VARIANTS: &[MmaVariant] = &[
    MmaVariant::mma("m1t32", "mla_decode_mma_bf16", 1, 32, 2),
    MmaVariant::mma("m1s4", "mla_decode_mma_m1s4_bf16", 1, 32, 4),
    MmaVariant::mma("m1t64", "mla_decode_mma_m1t64_bf16", 1, 64, 2),
    MmaVariant::mma("m2t32", "mla_decode_mma_m2t32_bf16", 2, 32, 2),
    MmaVariant::mma("m2t64", "mla_decode_mma_m2t64_bf16", 2, 64, 2),
    MmaVariant::depth("d1t32", "mla_decode_mmad_t32_bf16", 32, 2),
    MmaVariant::depth("d1s3", "mla_decode_mmad_s3_bf16", 32, 3),
    MmaVariant::depth("d1t64", "mla_decode_mmad_t64_bf16", 64, 2),
    MmaVariant { warps: 8, ..MmaVariant::depth("d1w8", "mla_decode_mmad_w8_bf16", 32, 2) },
    MmaVariant { warps: 8, ..MmaVariant::depth("d1w8s3", "mla_decode_mmad_w8s3_bf16", 32, 3) },
];

impl MmaVariant {
    const fn mma(name: &'static str, kernel: &'static str, m_tiles: usize, tile: usize, stages: usize) -> Self {
        MmaVariant { name, kernel, m_tiles, tile, stages, depth_split: false, warps: 4 }
    }
    const fn depth(name: &'static str, kernel: &'static str, tile: usize, stages: usize) -> Self {
        MmaVariant { name, kernel, m_tiles: 1, tile, stages, depth_split: true, warps: 4 }
    }

    /// Heads per block.
    pub fn heads(&self) -> usize {
        16 * self.m_tiles
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        32 * self.warps as u32
    }

    /// Dynamic shared memory in bytes (the layout in `kernels/cuda/mla.cu`): Q `[M][RS]`, the
    /// cache ring `[stages][tile][RS]` and P `[M][tile + 8]` in bf16, two `[4][M]` f32 arrays;
    /// `M` = heads per block, `RS` = `C + dr` rounded up to 64. Depth-split: Q shares its space
    /// with the S partials `[warps][M][tile + 8]` f32 (rounded up to 128 bytes), and three `[M]`
    /// f32 arrays instead of the two `[4][M]`.
    pub fn smem_bytes(&self, c: usize, dr: usize) -> usize {
        let rs = (c + dr).div_ceil(64) * 64;
        let m = self.heads();
        let ring_p = 2 * (self.stages * self.tile * rs + m * (self.tile + 8));
        if self.depth_split {
            (2 * m * rs).max(4 * self.warps * m * (self.tile + 8)).div_ceil(128) * 128 + ring_p + 4 * 3 * m
        } else {
            2 * m * rs + ring_p + 4 * 8 * m
        }
    }

    /// The shapes the tensor-core kernels take (bf16 only): C a multiple of 64 up to 512, dr a
    /// multiple of 32 up to 128.
    pub fn takes(c: usize, dr: usize) -> bool {
        c > 0 && c.is_multiple_of(64) && c <= MLA_CMAX && dr.is_multiple_of(32) && dr <= MLA_RMAX
    }

    /// Blocks of this variant resident per SM at these shapes (the driver's occupancy
    /// calculator); 1 when it cannot say.
    pub fn blocks_per_sm(&self, dev: &Device, c: usize, dr: usize) -> usize {
        let smem = self.smem_bytes(c, dr);
        let Ok(f) = dev.function("mla", self.kernel) else { return 1 };
        if allow_dynamic_smem(&f, smem as u32).is_err() {
            return 1;
        }
        f.occupancy_max_active_blocks_per_multiprocessor(self.threads(), smem, None).map_or(1, |b| (b as usize).max(1))
    }
}

/// The decode kernel a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlaKernel {
    /// `mla_decode_{f32,bf16}`: SIMT, any shape, [`MLA_HB`] heads per block.
    Simple,
    /// A tensor-core variant (bf16 only).
    Mma(MmaVariant),
}

impl MlaKernel {
    /// Heads served by one block (a query row's cache is read `ceil(h / this)` times).
    pub fn heads_per_block(&self) -> usize {
        match self {
            MlaKernel::Simple => MLA_HB,
            MlaKernel::Mma(v) => v.heads(),
        }
    }

    /// `"simple"` or the variant's name.
    pub fn name(&self) -> &'static str {
        match self {
            MlaKernel::Simple => "simple",
            MlaKernel::Mma(v) => v.name,
        }
    }
}

/// `DSV3_MLA_COMBINE=fused` (read once): the tensor-core kernels merge their splits themselves
/// (the last CTA of each row and head block, `mma_fused_combine` in mla.cu; the same arithmetic as
/// `mla_combine`) instead of a separate `mla_combine` launch: one launch fewer per layer and
/// decode step. Correct on the H100 (k_mla_moe and k_model under it, 2026-11-24), not yet timed;
/// off by default until measured.
pub fn fused_combine() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    super::env_is(&V, "DSV3_MLA_COMBINE", "fused")
}

/// `DSV3_MLA_SIMPLE=1` (read once): always the SIMT kernel.
fn env_simple() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV3_MLA_SIMPLE").is_ok_and(|v| v == "1"))
}

/// `DSV3_MLA_MMA=<variant name>` (read once): that tensor-core variant when it can run.
fn env_variant() -> Option<&'static MmaVariant> {
    static V: OnceLock<Option<&'static MmaVariant>> = OnceLock::new();
    *V.get_or_init(|| {
        let name = std::env::var("DSV3_MLA_MMA").ok()?;
        let v = MMA_VARIANTS.iter().find(|v| v.name == name);
        if v.is_none() {
            let names: Vec<_> = MMA_VARIANTS.iter().map(|v| v.name).collect();
            eprintln!("DSV3_MLA_MMA={name}: no such variant (one of {names:?}); ignored");
        }
        v
    })
}

/// The most dynamic shared memory a block may opt into on `dev` (0 if the driver cannot say).
fn max_smem_optin(dev: &Device) -> usize {
    dev.ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |v| v.max(0) as usize)
}

/// Whether tensor-core variant `v` can run on `dev` at these shapes (shared memory included).
pub fn mma_fits(dev: &Device, v: &MmaVariant, c: usize, dr: usize) -> bool {
    fits_smem(v, c, dr, max_smem_optin(dev))
}

/// Whether `v` takes these shapes within `smem` bytes of shared memory per block.
fn fits_smem(v: &MmaVariant, c: usize, dr: usize, smem: usize) -> bool {
    MmaVariant::takes(c, dr) && v.smem_bytes(c, dr) <= smem
}

/// The kernel [`mla_decode`] runs for `dt` and these shapes: f32, odd shapes and
/// `DSV3_MLA_SIMPLE=1` take the SIMT kernel; bf16 with C % 64 == 0 (<= 512) and dr % 32 == 0
/// (<= 128) a tensor-core variant (every supported GPU is sm_80+, which has mma.sync, ldmatrix
/// and cp.async): 16 heads per block for h <= 16, else 32, the largest tile the GPU's shared
/// memory takes. `DSV3_MLA_MMA` overrides the variant where it fits.
pub fn mla_kernel(dev: &Device, dt: DType, h: usize, c: usize, dr: usize) -> MlaKernel {
    if dt != DType::Bf16 || env_simple() || !MmaVariant::takes(c, dr) {
        return MlaKernel::Simple;
    }
    if let Some(v) = env_variant().filter(|v| mma_fits(dev, v, c, dr)) {
        return MlaKernel::Mma(*v);
    }
    default_variant(max_smem_optin(dev), h, c, dr).map_or(MlaKernel::Simple, MlaKernel::Mma)
}

/// [`mla_kernel`]'s choice without the switches, on a GPU offering `smem` bytes of shared memory
/// per block: the first of its order of preference that fits.
fn default_variant(smem: usize, h: usize, c: usize, dr: usize) -> Option<MmaVariant> {
    // h <= 16: the depth-split 8-warp kernel, measured at 84.5% of the copy ceiling on the H100
    // (FlashMLA's b128 len4096 h16 shape; m1t32 65%, d1t32 75%: kernel_bench, docs/PERF.md)
    let order: &[&str] = if h <= 16 { &["d1w8", "m1t32", "m1t64"] } else { &["m2t64", "m2t32", "m1t32"] };
    order
        .iter()
        .filter_map(|name| MMA_VARIANTS.iter().find(|v| v.name == *name))
        .find(|v| fits_smem(v, c, dr, smem))
        .copied()
}

/// Splits along the cache to pass in [`MlaCall::splits`] (and size [`MlaWork`] for) when
/// [`mla_decode`] attends `n` rows of `h` heads to at most `max_visible` entries each: the kernel
/// it will run ([`mla_kernel`]), its blocks per SM, waves over the SMs and the combine's extra
/// traffic. A pure function of the shapes and the GPU (graph-capture safe).
/// `DSV3_MLA_SPLITS=<s>` (read once) overrides the choice (measurements).
pub fn mla_splits(dev: &Device, dt: DType, n: usize, h: usize, c: usize, dr: usize, max_visible: usize) -> usize {
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("DSV3_MLA_SPLITS").ok().and_then(|v| v.parse().ok()).filter(|&s| (1..=MAX_SPLITS).contains(&s))
    });
    forced.unwrap_or_else(|| mla_splits_for(dev, mla_kernel(dev, dt, h, c, dr), n, h, c, dr, max_visible))
}

/// [`mla_splits`] for a given kernel.
pub fn mla_splits_for(
    dev: &Device,
    k: MlaKernel,
    n: usize,
    h: usize,
    c: usize,
    dr: usize,
    max_visible: usize,
) -> usize {
    let blocks = (n * h.div_ceil(k.heads_per_block())).max(1);
    let v = match k {
        // the SIMT kernel: two blocks per SM, splits of at least 256 entries
        MlaKernel::Simple => return (2 * dev.sms).div_ceil(blocks).clamp(1, max_visible.div_ceil(256).max(1)),
        MlaKernel::Mma(v) => v,
    };
    let slots = (dev.sms * v.blocks_per_sm(dev, c, dr)).max(1);
    let tiles = max_visible.div_ceil(v.tile).max(1);
    // time ~ waves x (tiles per split + ~1 tile of per-block overhead: Q, pipeline fill,
    // epilogue) + the combine's partial outputs (write + read, f32) in tile loads per slot
    let tile_bytes = (v.tile * (c + dr) * 2) as f64;
    let mut best = (f64::INFINITY, 1);
    for s in 1..=tiles.min(MAX_SPLITS) {
        let waves = (blocks * s).div_ceil(slots);
        let combine = if s > 1 { (s * n * h * c * 8) as f64 / (slots as f64 * tile_bytes) } else { 0.0 };
        let cost = (waves * (tiles.div_ceil(s) + 1)) as f64 + combine;
        if cost < best.0 - 1e-9 {
            best = (cost, s);
        }
    }
    best.1
}

/// `out[r, hh, :c] = Σ_t softmax_t(s) · c_t` (the attention-weighted latent, before `W_UV`);
/// `out` `[n, h, c]` with row stride `ld_out`. Runs [`mla_kernel`]'s choice.
pub fn mla_decode(dev: &Device, p: &MlaCall, out: &mut Act, ld_out: usize, work: Option<&mut MlaWork>) -> Result<()> {
    let mut k = mla_kernel(dev, p.cache.dtype(), p.h, p.c, p.dr);
    if !ld_out.is_multiple_of(2) || p.qt.dtype() != p.cache.dtype() || out.dtype() != p.cache.dtype() {
        k = MlaKernel::Simple; // bf16 pairs are stored as 4-byte words; dtype errors reported there
    }
    mla_decode_with(dev, k, p, out, ld_out, work)
}

/// [`mla_decode`] with the kernel chosen by the caller (A/B comparisons, tests); a tensor-core
/// variant that cannot run these shapes on this GPU is an error.
pub fn mla_decode_with(
    dev: &Device,
    kernel: MlaKernel,
    p: &MlaCall,
    out: &mut Act,
    ld_out: usize,
    work: Option<&mut MlaWork>,
) -> Result<()> {
    let MlaCall { n, h, c, dr, .. } = *p;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let dt = p.cache.dtype();
    if p.qt.dtype() != dt || p.qpe.dtype() != dt || out.dtype() != dt {
        return Err(Error::Input("mla_decode: queries, cache and output must share a dtype".into()));
    }
    if c == 0 || c > MLA_CMAX || dr > MLA_RMAX || p.splits == 0 {
        return Err(Error::Input(format!(
            "mla_decode: C {c} (1..={MLA_CMAX}), dr {dr} (<= {MLA_RMAX}), splits {}",
            p.splits
        )));
    }
    if p.ld_qt < h * c || ld_out < h * c || p.row_slot.len() < n || p.row_len.len() < n || p.max_len == 0 {
        return Err(Error::Input("mla_decode: strides or row arrays too small".into()));
    }
    p.qt.check((n - 1) * p.ld_qt + h * c, "mla qt")?;
    p.qpe.check(p.qpe_off + (n - 1) * p.ld_qpe + (h - 1) * p.hs_qpe + dr, "mla qpe")?;
    p.cache.check(p.slots * p.max_len * (c + dr), "mla cache")?;
    out.check((n - 1) * ld_out + h * c, "mla out")?;
    let split_len = p.max_len.div_ceil(p.splits);
    let (po, pm, cnt) = match (&work, p.splits) {
        (_, 1) => (0, 0, 0),
        (Some(w), s) if w.part_o.len() >= s * n * h * c && w.part_ml.len() >= s * n * h * 2 => {
            // the merge inside the tensor-core kernel: counters for its n·ceil(h / heads) CTA columns
            let fused = match kernel {
                MlaKernel::Mma(v) => fused_combine() && w.counters.len() >= n * h.div_ceil(v.heads()),
                MlaKernel::Simple => false,
            };
            let cnt = if fused { dptr(dev, &w.counters, 0)? } else { 0 };
            (dptr(dev, &w.part_o, 0)?, dptr(dev, &w.part_ml, 0)?, cnt)
        }
        _ => return Err(Error::Input(format!("mla_decode: {} splits need scratch (MlaWork) that large", p.splits))),
    };
    let args = MlaArgs {
        qt: p.qt.ptr(dev, 0)?,
        qpe: p.qpe.ptr(dev, p.qpe_off)?,
        cache: p.cache.ptr(dev, 0)?,
        out: out.ptr(dev, 0)?,
        row_slot: dptr(dev, p.row_slot, 0)?,
        row_len: dptr(dev, p.row_len, 0)?,
        part_o: po,
        part_ml: pm,
        slot_stride: (p.max_len * (c + dr)) as i64,
        n: int(n, "n")?,
        h: int(h, "h")?,
        c: int(c, "c")?,
        dr: int(dr, "dr")?,
        ld_qt: int(p.ld_qt, "ld_qt")?,
        ld_qpe: int(p.ld_qpe, "ld_qpe")?,
        hs_qpe: int(p.hs_qpe, "hs_qpe")?,
        ld_out: int(ld_out, "ld_out")?,
        splits: int(p.splits, "splits")?,
        split_len: int(split_len, "split_len")?,
        scale: p.scale,
        max_len: int(p.max_len, "max_len")?,
        counters: cnt,
    };
    let (kd, kc) = match dt {
        DType::F32 => ("mla_decode_f32", "mla_combine_f32"),
        DType::Bf16 => ("mla_decode_bf16", "mla_combine_bf16"),
    };
    match kernel {
        MlaKernel::Simple => {
            let grid = (dim(n, "mla rows")?, dim(h.div_ceil(MLA_HB), "mla heads")?, dim(p.splits, "mla splits")?);
            launch(dev, "mla", kd, grid, 256, &[KArg::Mla(args)])?;
        }
        MlaKernel::Mma(v) => {
            if dt != DType::Bf16 || !MmaVariant::takes(c, dr) || !ld_out.is_multiple_of(2) {
                return Err(Error::Input(format!(
                    "mla_decode: the tensor-core kernel takes bf16, C % 64 == 0 (<= {MLA_CMAX}), dr % 32 == 0 \
                     (<= {MLA_RMAX}) and an even ld_out; got {dt:?}, C {c}, dr {dr}, ld_out {ld_out}"
                )));
            }
            let smem = v.smem_bytes(c, dr);
            let optin = max_smem_optin(dev);
            if smem > optin {
                return Err(Error::Unsupported(format!(
                    "mla_decode: {} needs {smem} B of shared memory, the GPU allows {optin}",
                    v.kernel
                )));
            }
            if !args.cache.is_multiple_of(16) || !args.out.is_multiple_of(4) {
                return Err(Error::Input("mla_decode: cache or output misaligned for the tensor-core kernel".into()));
            }
            // blockIdx.x = row * head_blocks + head_block: a row's blocks are launched together
            let grid = (dim(n * h.div_ceil(v.heads()), "mla rows x head blocks")?, dim(p.splits, "mla splits")?, 1);
            launch_smem(dev, "mla", v.kernel, grid, v.threads(), smem as u32, &[KArg::Mla(args)])?;
        }
    }
    if p.splits > 1 && args.counters == 0 {
        launch(dev, "mla", kc, (dim(n, "mla rows")?, dim(h, "mla heads")?, 1), 256, &[KArg::Mla(args)])?;
    }
    Ok(())
}

/// One step's queries and new latents before attention (`mla_prep_*`, one launch): for each of
/// the `n` rows, normalize the latent `ckv[r, :c]` with `kv_norm` (RMSNorm, `eps`), rotate its
/// `k_pe = ckv[r, c:c+dr]`, write both to `cache[slot[r], pos[r]]` (`[slots, max_len, c + dr]`;
/// rows whose position is outside the slot are skipped), and rotate the `h` query heads' rope
/// parts in place (`q` row stride `ld_q`, head stride `hs_q`, rope part at `q_off`). The same
/// values as `norm::rmsnorm` + `rope::rope` (twice) + [`cache_append`].
pub struct Prep<'a> {
    pub n: usize,
    pub c: usize,
    pub dr: usize,
    pub h: usize,
    /// Row r's latent ‖ k_pe (unnormalized and unrotated) at `ckv_off + r·ld_ckv`.
    pub ckv: &'a Act,
    pub ckv_off: usize,
    pub ld_ckv: usize,
    pub kv_norm: &'a CudaSlice<f32>,
    pub eps: f32,
    pub ld_q: usize,
    pub hs_q: usize,
    pub q_off: usize,
    pub pos: &'a CudaSlice<i32>,
    pub slot: &'a CudaSlice<i32>,
    pub inv_freq: &'a CudaSlice<f32>,
    pub attention_factor: f32,
    pub max_len: usize,
}

/// Runs [`Prep`] on `q` and `cache`.
pub fn mla_prep(dev: &Device, p: &Prep, q: &mut Act, cache: &mut Act) -> Result<()> {
    let Prep { n, c, dr, h, .. } = *p;
    if n == 0 {
        return Ok(());
    }
    check_prep(p, q, cache)?;
    let w = c + dr;
    let k = match p.ckv.dtype() {
        DType::F32 => "mla_prep_f32",
        DType::Bf16 => "mla_prep_bf16",
    };
    launch(
        dev,
        "mla",
        k,
        (dim(n, "mla_prep rows")?, dim(1 + h, "mla_prep heads")?, 1),
        256,
        &[
            KArg::Ptr(p.ckv.ptr(dev, p.ckv_off)?),
            KArg::I32(int(p.ld_ckv, "ld_ckv")?),
            KArg::Ptr(dptr(dev, p.kv_norm, 0)?),
            KArg::F32(p.eps),
            KArg::Ptr(q.ptr(dev, 0)?),
            KArg::I32(int(p.ld_q, "ld_q")?),
            KArg::I32(int(p.hs_q, "hs_q")?),
            KArg::I32(int(p.q_off, "q_off")?),
            KArg::Ptr(dptr(dev, p.pos, 0)?),
            KArg::Ptr(dptr(dev, p.inv_freq, 0)?),
            KArg::F32(p.attention_factor),
            KArg::Ptr(cache.ptr(dev, 0)?),
            KArg::I64((p.max_len * w) as i64),
            KArg::Ptr(dptr(dev, p.slot, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(c, "c")?),
            KArg::I32(int(dr, "dr")?),
        ],
    )
}

/// `DSV3_MLA_PREP=separate` (read once): decode runs the query projection's last GEMM and
/// [`mla_prep`] as two launches instead of [`gemm_prep`] (for comparisons).
pub fn fused_prep() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    !super::env_is(&V, "DSV3_MLA_PREP", "separate")
}

/// The argument block of the query GEMM with [`Prep`] fused in (`MlaPrepArgs` in
/// kernels/cuda/mla_prep.cuh, same field order and sizes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepArgs {
    pub ckv: u64,
    pub cache: u64,
    pub kv_norm: u64,
    pub pos: u64,
    pub slot: u64,
    pub inv_freq: u64,
    pub slot_stride: i64,
    pub eps: f32,
    pub attn_factor: f32,
    pub ld_ckv: i32,
    pub c: i32,
    pub dr: i32,
    pub h: i32,
    pub hs_q: i32,
    pub q_off: i32,
    /// The GEMM's column tiles (set by the launcher; the blocks past them do the latents).
    pub col_tiles: i32,
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for PrepArgs {}

/// Whether [`gemm_prep`] takes the query GEMM `a · wᵀ -> q` of shape `s` with `p`: the GEMM
/// in the 8-row skinny kernels (a decode step's few rows; the folded q-LoRA norm allowed), C
/// `[n, ld_q]` with `ld_q == n`, the heads' rope parts starting at even columns.
pub fn gemm_prep_runs(dev: &Device, dt: DType, w: &DWeight, s: &GemmShape, p: &Prep) -> bool {
    s.m == p.n
        && s.ldc == p.ld_q
        && p.q_off.is_multiple_of(2)
        && p.hs_q.is_multiple_of(2)
        && runs_epilogue(dev, dt, w, dt, s, &Epilogue::MlaPrep(PrepArgs::default()))
}

/// The query projection's last GEMM `q = a · wᵀ` (shape `s`, as [`gemm`](super::gemm::gemm)) and
/// [`mla_prep`] in one launch (`gemm_skinny_prep_*`): the GEMM rotates the heads' rope parts in
/// its epilogue, and extra blocks normalize, rotate and append the rows' latents, with
/// `mla_prep`'s arithmetic (bit for bit the two launches). `q` is `p`'s query buffer. Only where
/// [`gemm_prep_runs`] (an error otherwise).
pub fn gemm_prep(
    dev: &Device,
    a: &Act,
    w: &DWeight,
    s: &GemmShape,
    p: &Prep,
    q: &mut Act,
    cache: &mut Act,
) -> Result<()> {
    if p.n == 0 {
        return Ok(());
    }
    if !gemm_prep_runs(dev, q.dtype(), w, s, p) {
        return Err(Error::Input(format!(
            "mla gemm_prep: the query GEMM must run in the 8-row skinny kernels with {} rows, ldc == ld_q and even \
             rope offsets (got m {}, ldc {}, ld_q {}, q_off {}, hs_q {})",
            p.n, s.m, s.ldc, p.ld_q, p.q_off, p.hs_q
        )));
    }
    // the heads' rope parts must lie in the GEMM's columns (ld_q == ldc == n: gemm_prep_runs)
    if (p.h - 1) * p.hs_q + p.q_off + p.dr > w.n {
        return Err(Error::Input(format!(
            "mla gemm_prep: {} heads' rope parts (stride {}, offset {}) in q rows of {} for {} output columns",
            p.h, p.hs_q, p.q_off, p.ld_q, w.n
        )));
    }
    check_prep(p, q, cache)?;
    let args = PrepArgs {
        ckv: p.ckv.ptr(dev, p.ckv_off)?,
        cache: cache.ptr(dev, 0)?,
        kv_norm: dptr(dev, p.kv_norm, 0)?,
        pos: dptr(dev, p.pos, 0)?,
        slot: dptr(dev, p.slot, 0)?,
        inv_freq: dptr(dev, p.inv_freq, 0)?,
        slot_stride: (p.max_len * (p.c + p.dr)) as i64,
        eps: p.eps,
        attn_factor: p.attention_factor,
        ld_ckv: int(p.ld_ckv, "ld_ckv")?,
        c: int(p.c, "c")?,
        dr: int(p.dr, "dr")?,
        h: int(p.h, "heads")?,
        hs_q: int(p.hs_q, "hs_q")?,
        q_off: int(p.q_off, "q_off")?,
        col_tiles: 0,
    };
    gemm_epilogue(dev, a, w, q, s, Epilogue::MlaPrep(args))
}

/// The shapes, strides and buffers [`mla_prep`] and [`gemm_prep`] take.
fn check_prep(p: &Prep, q: &Act, cache: &Act) -> Result<()> {
    let Prep { n, c, dr, h, .. } = *p;
    let dt = p.ckv.dtype();
    if q.dtype() != dt || cache.dtype() != dt {
        return Err(Error::Input("mla_prep: ckv, q and the cache must share a dtype".into()));
    }
    if c == 0 || c > 512 || dr == 0 || !dr.is_multiple_of(2) || dr > 512 || h == 0 {
        return Err(Error::Input(format!("mla_prep: C {c} (1..=512), even dr {dr} (<= 512), {h} heads")));
    }
    let w = c + dr;
    if p.ld_ckv < w || p.kv_norm.len() < c || p.inv_freq.len() < dr / 2 || p.pos.len() < n || p.slot.len() < n {
        return Err(Error::Input("mla_prep: strides, norm weight, frequencies or row arrays too small".into()));
    }
    // the heads' rope slices [h·hs_q + q_off, + dr) and the rows must not overlap
    if (h > 1 && p.hs_q < dr) || (n > 1 && p.ld_q < (h - 1) * p.hs_q + p.q_off + dr) {
        return Err(Error::Input("mla_prep: query heads or rows overlap".into()));
    }
    p.ckv.check(p.ckv_off + (n - 1) * p.ld_ckv + w, "mla_prep ckv")?;
    q.check((n - 1) * p.ld_q + (h - 1) * p.hs_q + p.q_off + dr, "mla_prep q")?;
    if !cache.len().is_multiple_of((p.max_len * w).max(1)) || cache.is_empty() {
        return Err(Error::Input(format!("mla_prep: the cache is not [slots, {}, {w}]", p.max_len)));
    }
    Ok(())
}

/// Appends `n` rows of `w = C + dr` values (`src` `[n, ld_src]`) to the cache
/// (`[slots, max_len, w]`): row i goes to slot `slot[i]`, position `pos[i]` (callers check both).
#[allow(clippy::too_many_arguments)]
pub fn cache_append(
    dev: &Device,
    src: &Act,
    ld_src: usize,
    cache: &mut Act,
    max_len: usize,
    slot: &CudaSlice<i32>,
    pos: &CudaSlice<i32>,
    n: usize,
    w: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if src.dtype() != cache.dtype() || ld_src < w || slot.len() < n || pos.len() < n {
        return Err(Error::Input("cache_append: dtype, stride or row arrays".into()));
    }
    src.check((n - 1) * ld_src + w, "cache_append src")?;
    let k = match src.dtype() {
        DType::F32 => "cache_append_f32",
        DType::Bf16 => "cache_append_bf16",
    };
    launch(
        dev,
        "mla",
        k,
        (dim(n, "cache_append")?, 1, 1),
        256,
        &[
            KArg::Ptr(src.ptr(dev, 0)?),
            KArg::I32(int(ld_src, "ld_src")?),
            KArg::Ptr(cache.ptr(dev, 0)?),
            KArg::I64((max_len * w) as i64),
            KArg::Ptr(dptr(dev, slot, 0)?),
            KArg::Ptr(dptr(dev, pos, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(w, "w")?),
        ],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_mla_kernel_is_the_measured_fastest_that_fits() {
        use super::default_variant;
        let h100 = 227 * 1024;
        // the H100 (2026-11-24): d1w8 for <= 16 heads (84.5% of copy), m2t64 for many
        for h in [1, 8, 16] {
            assert_eq!(default_variant(h100, h, 512, 64).unwrap().name, "d1w8", "h {h}");
        }
        assert_eq!(default_variant(h100, 128, 512, 64).unwrap().name, "m2t64");
        // a 99 KiB GPU still runs d1w8 (93 KiB); whatever is picked fits the shared memory
        assert_eq!(default_variant(99 * 1024, 16, 512, 64).unwrap().name, "d1w8");
        for smem in [48 * 1024, 99 * 1024, h100] {
            for h in [16, 128] {
                if let Some(v) = default_variant(smem, h, 512, 64) {
                    assert!(v.smem_bytes(512, 64) <= smem, "{} at {smem}", v.name);
                }
            }
        }
        // shapes the tensor-core kernels do not take: none (the SIMT kernel)
        assert!(default_variant(h100, 16, 500, 64).is_none());
    }

    #[test]
    fn mla_args_match_the_cuda_struct_layout() {
        assert_eq!(std::mem::size_of::<super::MlaArgs>(), 8 * 8 + 8 + 12 * 4 + 8);
        assert_eq!(std::mem::offset_of!(super::MlaArgs, n), 72);
        assert_eq!(std::mem::offset_of!(super::MlaArgs, scale), 112);
        assert_eq!(std::mem::offset_of!(super::MlaArgs, counters), 120);
        // MlaPrepArgs (mla_prep.cuh): 6 pointers, a long long, 2 floats, 7 ints, padded to 8
        assert_eq!(std::mem::offset_of!(super::PrepArgs, slot_stride), 48);
        assert_eq!(std::mem::offset_of!(super::PrepArgs, ld_ckv), 64);
        assert_eq!(std::mem::offset_of!(super::PrepArgs, col_tiles), 88);
        assert_eq!(std::mem::size_of::<super::PrepArgs>(), 96);
    }

    #[test]
    fn mma_variants_are_launchable_and_sized_like_the_kernel() {
        use super::{MmaVariant, MMA_VARIANTS};
        for v in MMA_VARIANTS {
            assert!(crate::ops::KERNELS.contains(&("mla", v.kernel)), "{} not in KERNELS", v.kernel);
            assert!(MMA_VARIANTS.iter().filter(|u| u.name == v.name).count() == 1);
        }
        // V3's shapes: m1t32 (the 16-head default before d1w8) fits the 99 KiB opt-in of sm_86/89/120 GPUs
        let m1t32 = MMA_VARIANTS.iter().find(|v| v.name == "m1t32").unwrap();
        assert_eq!(m1t32.kernel, "mla_decode_mma_bf16");
        assert_eq!(m1t32.smem_bytes(512, 64), 93952);
        assert!(m1t32.smem_bytes(512, 64) <= 99 * 1024);
        // rows padded to 64 elements: C 128 + dr 32 -> 192
        assert_eq!(m1t32.smem_bytes(128, 32), 2 * (16 * 192 + 2 * 32 * 192 + 16 * 40) + 4 * 8 * 16);
        // depth-split at V3's shapes: Q (18 KiB) holds the S partials (10 KiB); two blocks per SM
        let d1t32 = MMA_VARIANTS.iter().find(|v| v.name == "d1t32").unwrap();
        assert!(d1t32.depth_split && d1t32.heads() == 16);
        assert_eq!(d1t32.smem_bytes(512, 64), 18432 + 2 * (2 * 32 * 576 + 16 * 40) + 4 * 3 * 16);
        assert!(2 * d1t32.smem_bytes(512, 64) <= 227 * 1024);
        // 8 warps: the S partials (8·16·40·4 = 20480 bytes) outgrow Q
        let d1w8 = MMA_VARIANTS.iter().find(|v| v.name == "d1w8").unwrap();
        assert_eq!((d1w8.threads(), d1t32.threads()), (256, 128));
        assert_eq!(d1w8.smem_bytes(512, 64), 20480 + 2 * (2 * 32 * 576 + 16 * 40) + 4 * 3 * 16);
        assert!(2 * d1w8.smem_bytes(512, 64) <= 227 * 1024);
        // small depth: the S partials are the larger part of the union (16·16·40 = 10240 bytes)
        assert_eq!(d1t32.smem_bytes(64, 0), 10240 + 2 * (2 * 32 * 64 + 16 * 40) + 4 * 3 * 16);
        assert!(MmaVariant::takes(512, 64) && MmaVariant::takes(128, 32) && MmaVariant::takes(64, 0));
        assert!(!MmaVariant::takes(96, 32) && !MmaVariant::takes(512, 16) && !MmaVariant::takes(576, 64));
    }
}
