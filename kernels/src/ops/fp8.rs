//! DeepSeek's FP8 training recipe on the device: quantization (`kernels/cuda/fp8quant.cu`, bit for
//! bit as `dsv3_core::fp8::quant`) and the promoted FP8 GEMM (`kernels/cuda/fp8gemm.cu`: wgmma on
//! sm_90a, pipelined where the operands allow it, a SIMT fallback elsewhere) in its three forms — Fprop/Dgrad (A 1x128 x B 128x128),
//! Wgrad (1x128 x 1x128 along tokens, f32 accumulate) and grouped-contiguous (MoE experts).
use super::fp8_tma::launch_tma;
pub use super::fp8_tma::tma_fits;
use super::gemm::Grouped;
use super::{dim, grid_y, int, launch, launch_smem, split_yz, KArg};
use crate::device::Device;
use crate::ptx::Arch;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};
use std::sync::OnceLock;

/// Rows per tile of the FP8 GEMMs (the grouped mode's tile unit: the same as `moe_plan`'s).
pub const FP8_BM: usize = 64;

/// Where a quantize kernel writes: E4M3 codes (row `r` at `q[r·ld..]`) and f32 scales, the scale of
/// (row `r`, 128-wide group `b`) at `scale[r·s_rs + b·s_cs]`.
pub struct Fp8Out<'a> {
    pub q: &'a mut CudaSlice<u8>,
    pub ld: usize,
    pub scale: &'a mut CudaSlice<f32>,
    pub s_rs: usize,
    pub s_cs: usize,
}

impl<'a> Fp8Out<'a> {
    /// Codes `[rows, cols]` (contiguous) and the CPU's `[rows, ceil(cols/128)]` scales.
    pub fn dense(q: &'a mut CudaSlice<u8>, scale: &'a mut CudaSlice<f32>, cols: usize) -> Fp8Out<'a> {
        Fp8Out { q, ld: cols, scale, s_rs: cols.div_ceil(128), s_cs: 1 }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) -> Result<()> {
        let groups = cols.div_ceil(128);
        let need_s = (rows - 1) * self.s_rs + (groups - 1) * self.s_cs + 1;
        if self.ld < cols || self.q.len() < (rows - 1) * self.ld + cols || self.scale.len() < need_s {
            return Err(Error::Input(format!(
                "{what}: [{rows}, {cols}] needs codes with ld >= {cols} ({} codes, ld {}) and {need_s} scales ({})",
                self.q.len(),
                self.ld,
                self.scale.len()
            )));
        }
        Ok(())
    }
}

impl Fp8Out<'_> {
    /// The quantize kernels' leading arguments: the input and its row stride, then this output
    /// (codes, their row stride, scales, the scales' strides).
    fn lead_args(&self, dev: &Device, x: &Act, ldx: usize) -> Result<Vec<KArg>> {
        Ok(vec![
            KArg::Ptr(x.ptr(dev, 0)?),
            KArg::I64(ldx as i64),
            KArg::Ptr(dptr(dev, self.q, 0)?),
            KArg::I64(self.ld as i64),
            KArg::Ptr(dptr(dev, self.scale, 0)?),
            KArg::I64(self.s_rs as i64),
            KArg::I64(self.s_cs as i64),
        ])
    }
}

fn quant_kernel(x: &Act, f32_name: &'static str, bf16_name: &'static str) -> &'static str {
    match x.dtype() {
        DType::F32 => f32_name,
        DType::Bf16 => bf16_name,
    }
}

/// `DSV3_FP8_QUANT=v1` (read once): [`quant_1x128`] runs `quant_1x128_*` (a 128-thread block per
/// 128-column group, the form measured on the H100) instead of `quant_1x128w_*` (a warp per group,
/// bit for bit the same output; bit for bit core's on the H100, kernels/tests/fp8.rs, not yet timed).
fn quant_v1() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_is(&V, "DSV3_FP8_QUANT", "v1")
}

/// Per-token 1x128 quantization of `x` `[rows, cols]` (row stride `ldx`): activations and
/// activation gradients (`pow2`: power-of-two scales). A warp per 128-column group
/// (`quant_1x128w_*`: vector loads and 4-byte code stores where rows are 4-element aligned, the
/// amax by shuffles), blocks of 8 warps, at most 8 blocks per SM walking the groups grid-stride.
pub fn quant_1x128(dev: &Device, x: &Act, ldx: usize, rows: usize, cols: usize, out: Fp8Out, pow2: bool) -> Result<()> {
    quant_1x128_form(dev, x, ldx, rows, cols, out, pow2, !quant_v1())
}

/// [`quant_1x128`] with the kernel chosen by the caller (`warp`: `quant_1x128w_*`, else the
/// block-per-group `quant_1x128_*`; the same output bit for bit): for benchmarks and tests.
#[allow(clippy::too_many_arguments)]
pub fn quant_1x128_form(
    dev: &Device,
    x: &Act,
    ldx: usize,
    rows: usize,
    cols: usize,
    out: Fp8Out,
    pow2: bool,
    warp: bool,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    x.check((rows - 1) * ldx + cols, "quant_1x128 x")?;
    if ldx < cols {
        return Err(Error::Input(format!("quant_1x128: ldx {ldx} < cols {cols}")));
    }
    out.check(rows, cols, "quant_1x128")?;
    let mut args = out.lead_args(dev, x, ldx)?;
    args.extend([KArg::I32(int(rows, "rows")?), KArg::I32(int(cols, "cols")?), KArg::I32(pow2 as i32)]);
    if !warp {
        let k = quant_kernel(x, "quant_1x128_f32", "quant_1x128_bf16");
        let grid = (dim(cols.div_ceil(128), "quant cols")?, grid_y(rows, "quant rows")?, 1);
        return launch(dev, "fp8quant", k, grid, 128, &args);
    }
    let k = quant_kernel(x, "quant_1x128w_f32", "quant_1x128w_bf16");
    let blocks = (rows * cols.div_ceil(128)).div_ceil(8).min(dev.sms.max(1) * 8);
    launch(dev, "fp8quant", k, (dim(blocks, "quant groups")?, 1, 1), 256, &args)
}

/// 128x1 quantization along the rows (tokens) of `x` `[rows, cols]`, written transposed: `out` gets
/// codes `[cols, rows]` (`out.ld >= rows`) and 1x128 scales along the new K (= tokens), scale of
/// (column c, token block b) at `scale[c·s_rs + b·s_cs]`: the Wgrad operands (X and dY), as
/// `quantize_values(.., Tile128x1, ..).transposed()`.
pub fn quant_t128(dev: &Device, x: &Act, ldx: usize, rows: usize, cols: usize, out: Fp8Out, pow2: bool) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    x.check((rows - 1) * ldx + cols, "quant_t128 x")?;
    if ldx < cols {
        return Err(Error::Input(format!("quant_t128: ldx {ldx} < cols {cols}")));
    }
    out.check(cols, rows, "quant_t128 (transposed output)")?;
    let k = quant_kernel(x, "quant_t128_f32", "quant_t128_bf16");
    let mut args = out.lead_args(dev, x, ldx)?;
    args.extend([KArg::I32(int(rows, "rows")?), KArg::I32(int(cols, "cols")?), KArg::I32(pow2 as i32)]);
    launch(
        dev,
        "fp8quant",
        k,
        (dim(cols.div_ceil(32), "quant cols")?, grid_y(rows.div_ceil(128), "quant rows")?, 1),
        256,
        &args,
    )
}

/// Outputs of [`quant_block128`]: codes `[rows, cols]` and scales `[ceil(rows/128), ceil(cols/128)]`;
/// optionally also the transpose (codes `[cols, rows]`, scales `[ceil(cols/128), ceil(rows/128)]`),
/// the Dgrad operand `Wᵀ`.
pub struct Fp8BlockOut<'a> {
    pub q: &'a mut CudaSlice<u8>,
    pub scale: &'a mut CudaSlice<f32>,
    pub transposed: Option<(&'a mut CudaSlice<u8>, &'a mut CudaSlice<f32>)>,
}

/// 128x128 block quantization of a weight `x` `[rows, cols]` (row stride `ldx`), f32 master
/// weights or bf16 (re-quantized after every optimizer step). Refuse it for activation gradients
/// (V3 App. B.2): that is the caller's role check, as in `dsv3_core::fp8::quant::quantize`.
pub fn quant_block128(
    dev: &Device,
    x: &Act,
    ldx: usize,
    rows: usize,
    cols: usize,
    out: Fp8BlockOut,
    pow2: bool,
) -> Result<()> {
    quant_block128_batch(dev, x, ldx, rows, cols, 1, 0, out, pow2)
}

/// [`quant_block128`] of `batch` weights in one launch (the experts of a grouped weight): matrix
/// `z` is `x[z·bx + r·ldx + c]`; its outputs are packed one after the other in `out` (codes at
/// `z·rows·cols`, scales at `z·ceil(rows/128)·ceil(cols/128)`, the same for the transpose), so
/// `out` holds `batch` times [`quant_block128`]'s outputs. Bit-identical to `batch` separate calls.
#[allow(clippy::too_many_arguments)]
pub fn quant_block128_batch(
    dev: &Device,
    x: &Act,
    ldx: usize,
    rows: usize,
    cols: usize,
    batch: usize,
    bx: usize,
    out: Fp8BlockOut,
    pow2: bool,
) -> Result<()> {
    if rows == 0 || cols == 0 || batch == 0 {
        return Ok(());
    }
    x.check((batch - 1) * bx + (rows - 1) * ldx + cols, "quant_block128 x")?;
    let ns = rows.div_ceil(128) * cols.div_ceil(128);
    if ldx < cols || out.q.len() < batch * rows * cols || out.scale.len() < batch * ns {
        return Err(Error::Input(format!(
            "quant_block128: {batch} x [{rows}, {cols}] (ldx {ldx}) needs {} codes, {} scales",
            batch * rows * cols,
            batch * ns
        )));
    }
    let (qt, st) = match &out.transposed {
        Some((q, s)) => {
            if q.len() < batch * rows * cols || s.len() < batch * ns {
                return Err(Error::Input("quant_block128: transposed outputs too small".into()));
            }
            (dptr(dev, q, 0)?, dptr(dev, s, 0)?)
        }
        None => (0, 0),
    };
    let k = quant_kernel(x, "quant_block128_f32", "quant_block128_bf16");
    let args = [
        KArg::Ptr(x.ptr(dev, 0)?),
        KArg::I64(ldx as i64),
        KArg::Ptr(dptr(dev, out.q, 0)?),
        KArg::Ptr(dptr(dev, out.scale, 0)?),
        KArg::Ptr(qt),
        KArg::Ptr(st),
        KArg::I32(int(rows, "rows")?),
        KArg::I32(int(cols, "cols")?),
        KArg::I32(pow2 as i32),
        KArg::I64(bx as i64),
    ];
    launch(
        dev,
        "fp8quant",
        k,
        (dim(cols.div_ceil(128), "quant cols")?, dim(rows.div_ceil(128), "quant rows")?, dim(batch, "quant batch")?),
        256,
        &args,
    )
}

/// The FP8 GEMM kernels' argument block (`kernels/cuda/fp8gemm.cu`, same field order and sizes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8GemmArgs {
    pub a: u64,
    pub b: u64,
    pub d: u64,
    pub sa: u64,
    pub sb: u64,
    pub row_offsets: u64,
    pub tile_offsets: u64,
    pub stride_b: i64,
    pub stride_sb: i64,
    pub sa_rs: i64,
    pub sa_ks: i64,
    pub sb_rs: i64,
    pub sb_ks: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldd: i32,
    pub groups: i32,
    pub accumulate: i32,
    pub b_block: i32,
    pub pad: i32,
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for Fp8GemmArgs {}

/// An FP8 GEMM operand: E4M3 codes (row `r` at `q[r·ld..]`, K contiguous) and f32 scales: the scale
/// of (row `r`, K group `kb`) at `scale[r·s_rs + kb·s_ks]`, or for 128x128 blocks of (row block
/// `r/128`, `kb`) at `scale[(r/128)·s_rs + kb·s_ks]`.
pub struct Fp8Operand<'a> {
    pub q: &'a CudaSlice<u8>,
    pub ld: usize,
    pub scale: &'a CudaSlice<f32>,
    pub s_rs: usize,
    pub s_ks: usize,
}

/// How B is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BScales {
    /// 128x128 blocks (weights: Fprop, Dgrad).
    Block128,
    /// One scale per row of B per 128 K (Wgrad: 1x128 along tokens).
    Tile1x128,
}

/// Which kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Kernel {
    /// sm_90a: `fp8_gemm_tma_*` where TMA's alignment holds ([`tma_fits`]), else
    /// `fp8_gemm_wgmma2_*` where its alignment holds ([`wgmma2_fits`]), else `fp8_gemm_wgmma_*`;
    /// SIMT elsewhere. `DSV3_FP8_KERNEL=v2` keeps sm_90a off the TMA kernel (wgmma2, else v1),
    /// `=v1` on `fp8_gemm_wgmma_*`, `=simt` forces the SIMT kernel.
    Auto,
    /// `fp8_gemm_wgmma_*` (sm_90a only): one warpgroup per 64x128 tile, synchronous per 128-K group
    /// (the first form; verified on an H100).
    Wgmma,
    /// `fp8_gemm_wgmma2_*` (sm_90a only): 2 warpgroups per 128x128 tile fed by a 4-stage cp.async
    /// ring. Correct on the H100 (kernels/tests/fp8.rs, 2026-11-24), not yet timed.
    Wgmma2,
    /// `fp8_gemm_tma_*` (sm_90a only): TMA + mbarrier ring, a producer warp and 2 consumer
    /// warpgroups, persistent ([`super::fp8_tma`]). Correct on the H100 (kernels/tests/fp8.rs,
    /// 2026-11-24), not yet timed. A bf16 D it writes (no accumulate, no split-K, 16-byte
    /// aligned rows) leaves by TMA stores from a staging buffer ([`super::fp8_tma::store_by_tma`]),
    /// and split-K's partials are summed inside the kernel (not yet run on a GPU).
    Tma,
    /// `fp8_gemm_tma_*` without its epilogue fusions: D stored from registers instead of by TMA
    /// stores, split-K partials summed by the separate `fp8_splitk_reduce_*` launch instead of
    /// inside the GEMM (`DSV3_FP8_KERNEL=tma-plain` makes Auto pick it).
    TmaPlain,
    /// `fp8_gemm_simt_*` (any GPU).
    Simt,
}

/// Dynamic shared memory of `fp8_gemm_wgmma2_*`: 4 stages of A (128 x 128) and two B tiles (128 x 128).
pub const FP8_WGMMA2_SMEM: u32 = 4 * (128 * 128 + 2 * 128 * 128);

/// Whether `fp8_gemm_wgmma2_*` can run `g`: 16-byte cp.async of every 16-byte chunk of A and B
/// (k, the leading dimensions, the grouped weight stride and the base addresses multiples of 16).
pub fn wgmma2_fits(g: &Fp8Gemm, a_ptr: u64, b_ptr: u64) -> bool {
    g.k.is_multiple_of(16)
        && g.a.ld.is_multiple_of(16)
        && g.b.ld.is_multiple_of(16)
        && (g.groups == 1 || g.stride_b.is_multiple_of(16))
        && a_ptr.is_multiple_of(16)
        && b_ptr.is_multiple_of(16)
}

/// `DSV3_FP8_KERNEL`: `v1` (sm_90a keeps `fp8_gemm_wgmma_*`), `simt`, or unset / anything else (Auto).
fn forced_kernel() -> Option<Fp8Kernel> {
    static V: OnceLock<Option<Fp8Kernel>> = OnceLock::new();
    *V.get_or_init(|| match std::env::var("DSV3_FP8_KERNEL").as_deref() {
        Ok("v1") | Ok("wgmma") => Some(Fp8Kernel::Wgmma),
        Ok("v2") | Ok("wgmma2") => Some(Fp8Kernel::Wgmma2),
        Ok("tma") => Some(Fp8Kernel::Tma),
        Ok("tma-plain") => Some(Fp8Kernel::TmaPlain),
        Ok("simt") => Some(Fp8Kernel::Simt),
        _ => None,
    })
}

/// Whether `Fp8Kernel::Auto` may run the TMA kernels on `dev` (sm_90a, and `DSV3_FP8_KERNEL`
/// not forcing another kernel): the K-grouped expert Wgrad ([`super::fp8_tma::fp8_gemm_kgrouped`])
/// asks before it replaces its per-expert GEMMs.
pub fn tma_allowed(dev: &Device) -> bool {
    dev.arch == Arch::Sm90a && matches!(forced_kernel(), None | Some(Fp8Kernel::Tma | Fp8Kernel::TmaPlain))
}

/// One FP8 GEMM `D[m, n] (+)= Σ_kb sa·sb·Σ A[m, k]·B[n, k]`. Grouped (MoE, `grouped: Some`): `m`
/// is the total rows, group g's B is `b.q` at `g·stride_b` with scales at `g·stride_sb`.
pub struct Fp8Gemm<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Fp8Operand<'a>,
    pub b: Fp8Operand<'a>,
    pub b_scales: BScales,
    /// Row stride of D.
    pub ldd: usize,
    /// Add into D instead of overwriting it (Wgrad accumulation).
    pub accumulate: bool,
    pub groups: usize,
    pub stride_b: usize,
    pub stride_sb: usize,
    pub grouped: Option<Grouped<'a>>,
}

fn need_scales(rows: usize, s_rs: usize, kgroups: usize, s_ks: usize) -> usize {
    (rows - 1) * s_rs + (kgroups - 1) * s_ks + 1
}

/// Runs `g` into `d` (bf16 or f32) with kernel `which`.
pub fn fp8_gemm(dev: &Device, g: &Fp8Gemm, d: &mut Act, which: Fp8Kernel) -> Result<()> {
    let (m, n) = (g.m, g.n);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let args = gemm_args(dev, g, d)?;
    // 64-row tiles (grouped: the plan's bound), spread over grid y and z (tile_yz() in the kernels)
    let tiles = match &g.grouped {
        Some(gr) => gr.max_tiles.max(1),
        None => m.div_ceil(FP8_BM),
    };
    let (a_ptr, b_ptr) = (args.a, args.b);
    let fits2 = wgmma2_fits(g, a_ptr, b_ptr);
    let fits_tma = tma_fits(g, a_ptr, b_ptr);
    let sm90 = dev.arch == Arch::Sm90a;
    let chosen = match which {
        Fp8Kernel::Auto => match forced_kernel() {
            Some(Fp8Kernel::Simt) => Fp8Kernel::Simt,
            Some(Fp8Kernel::Wgmma) if sm90 => Fp8Kernel::Wgmma,
            Some(Fp8Kernel::Wgmma2) if sm90 && fits2 => Fp8Kernel::Wgmma2,
            Some(Fp8Kernel::Wgmma2) if sm90 => Fp8Kernel::Wgmma,
            Some(Fp8Kernel::TmaPlain) if sm90 && fits_tma => Fp8Kernel::TmaPlain,
            _ if sm90 && fits_tma => Fp8Kernel::Tma,
            _ if sm90 && fits2 => Fp8Kernel::Wgmma2,
            _ if sm90 => Fp8Kernel::Wgmma,
            _ => Fp8Kernel::Simt,
        },
        Fp8Kernel::Wgmma | Fp8Kernel::Wgmma2 | Fp8Kernel::Tma | Fp8Kernel::TmaPlain => {
            if !sm90 {
                return Err(Error::Unsupported("fp8_gemm: the wgmma kernels need sm_90a (H100/H200)".into()));
            }
            if which == Fp8Kernel::Wgmma2 && !fits2 {
                return Err(Error::Input(
                    "fp8_gemm: fp8_gemm_wgmma2 needs k, lda, ldb, stride_b and the operand addresses multiples of 16"
                        .into(),
                ));
            }
            if matches!(which, Fp8Kernel::Tma | Fp8Kernel::TmaPlain) && !fits_tma {
                return Err(Error::Input(
                    "fp8_gemm: fp8_gemm_tma needs lda, ldb, stride_b and the operand addresses multiples of 16".into(),
                ));
            }
            which
        }
        Fp8Kernel::Simt => Fp8Kernel::Simt,
    };
    let kernel = match (chosen, d.dtype()) {
        (Fp8Kernel::Tma | Fp8Kernel::TmaPlain, DType::Bf16) => "fp8_gemm_tma_bf16",
        (Fp8Kernel::Tma | Fp8Kernel::TmaPlain, DType::F32) => "fp8_gemm_tma_f32",
        (Fp8Kernel::Wgmma2, DType::Bf16) => "fp8_gemm_wgmma2_bf16",
        (Fp8Kernel::Wgmma2, DType::F32) => "fp8_gemm_wgmma2_f32",
        (Fp8Kernel::Wgmma, DType::Bf16) => "fp8_gemm_wgmma_bf16",
        (Fp8Kernel::Wgmma, DType::F32) => "fp8_gemm_wgmma_f32",
        (_, DType::Bf16) => "fp8_gemm_simt_bf16",
        (_, DType::F32) => "fp8_gemm_simt_f32",
    };
    match chosen {
        // persistent: min(block tiles, SMs) blocks walk the 128 x 128 block tiles
        Fp8Kernel::Tma => launch_tma(dev, kernel, d.dtype(), g, args, tiles, true),
        Fp8Kernel::TmaPlain => launch_tma(dev, kernel, d.dtype(), g, args, tiles, false),
        // 128-row blocks: warpgroup w takes 64-row tile 2·tile_yz() + w
        Fp8Kernel::Wgmma2 => {
            let (gy, gz) = split_yz(tiles.div_ceil(2));
            let grid = (dim(n.div_ceil(128), "fp8_gemm n")?, dim(gy, "fp8_gemm m")?, dim(gz, "fp8_gemm m")?);
            launch_smem(dev, "fp8gemm", kernel, grid, 256, FP8_WGMMA2_SMEM, &[KArg::Fp8Gemm(args)])
        }
        _ => {
            let (bn, block) = if chosen == Fp8Kernel::Wgmma { (128, 128) } else { (64, 256) };
            let (gy, gz) = split_yz(tiles);
            let grid = (dim(n.div_ceil(bn), "fp8_gemm n")?, dim(gy, "fp8_gemm m")?, dim(gz, "fp8_gemm m")?);
            launch(dev, "fp8gemm", kernel, grid, block, &[KArg::Fp8Gemm(args)])
        }
    }
}

/// `g`'s operands and D checked against its shapes, and the kernels' argument block for it
/// (`g.m`, `g.n` > 0).
pub(crate) fn gemm_args(dev: &Device, g: &Fp8Gemm, d: &Act) -> Result<Fp8GemmArgs> {
    let (m, n, k) = (g.m, g.n, g.k);
    if k == 0 || g.a.ld < k || g.b.ld < k || g.ldd < n || g.groups == 0 {
        return Err(Error::Input(format!(
            "fp8_gemm: k {k}, lda {}, ldb {} (>= k), ldd {} (>= n {n}), groups {}",
            g.a.ld, g.b.ld, g.ldd, g.groups
        )));
    }
    let kg = k.div_ceil(128);
    let b_rows = match g.b_scales {
        BScales::Block128 => n.div_ceil(128),
        BScales::Tile1x128 => n,
    };
    let gl = g.groups - 1;
    if g.a.q.len() < (m - 1) * g.a.ld + k
        || g.a.scale.len() < need_scales(m, g.a.s_rs, kg, g.a.s_ks)
        || g.b.q.len() < gl * g.stride_b + (n - 1) * g.b.ld + k
        || g.b.scale.len() < gl * g.stride_sb + need_scales(b_rows, g.b.s_rs, kg, g.b.s_ks)
    {
        return Err(Error::Input(format!("fp8_gemm: operand buffers too small for [{m}, {k}] x [{n}, {k}]")));
    }
    d.check((m - 1) * g.ldd + n, "fp8_gemm D")?;
    let (ro, to) = match &g.grouped {
        Some(gr) => {
            if gr.row_offsets.len() < g.groups + 1 || gr.tile_offsets.len() < g.groups + 1 {
                return Err(Error::Input("fp8_gemm: grouped call needs [groups + 1] offsets".into()));
            }
            (dptr(dev, gr.row_offsets, 0)?, dptr(dev, gr.tile_offsets, 0)?)
        }
        None => (0, 0),
    };
    Ok(Fp8GemmArgs {
        a: dptr(dev, g.a.q, 0)?,
        b: dptr(dev, g.b.q, 0)?,
        d: d.ptr(dev, 0)?,
        sa: dptr(dev, g.a.scale, 0)?,
        sb: dptr(dev, g.b.scale, 0)?,
        row_offsets: ro,
        tile_offsets: to,
        stride_b: g.stride_b as i64,
        stride_sb: g.stride_sb as i64,
        sa_rs: g.a.s_rs as i64,
        sa_ks: g.a.s_ks as i64,
        sb_rs: g.b.s_rs as i64,
        sb_ks: g.b.s_ks as i64,
        m: int(m, "m")?,
        n: int(n, "n")?,
        k: int(k, "k")?,
        lda: int(g.a.ld, "lda")?,
        ldb: int(g.b.ld, "ldb")?,
        ldd: int(g.ldd, "ldd")?,
        groups: int(g.groups, "groups")?,
        accumulate: g.accumulate as i32,
        b_block: (g.b_scales == BScales::Block128) as i32,
        pad: 0,
    })
}

/// Token-column segments of [`quant_t128_groups`] for the host row offsets `ro` `[G + 1]`: group
/// `e`'s `n_e = ro[e+1] − ro[e]` tokens at columns `[seg[e], seg[e] + n_e)`, `seg[e + 1] = seg[e] +
/// n_e` rounded up to 128 (so every segment starts on a 128-token block); `seg[G]` is the output's
/// token columns. `ro` must be non-decreasing from `ro[0] >= 0`.
pub fn t128_segments(ro: &[i32]) -> Result<Vec<usize>> {
    if ro.is_empty() || ro[0] < 0 || ro.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::Input(format!("quant_t128_groups: row offsets must be non-decreasing from >= 0: {ro:?}")));
    }
    let mut seg = vec![0usize; ro.len()];
    for e in 1..ro.len() {
        seg[e] = seg[e - 1] + ((ro[e] - ro[e - 1]) as usize).next_multiple_of(128);
    }
    Ok(seg)
}

/// [`quant_t128`] of `G = ro.len() − 1` row groups (the experts of a MoE layer) in one launch:
/// group `e`'s rows `[ro[e], ro[e+1])` of `x` (row stride `ldx`; `ro` the host's offsets) written
/// transposed into one output of `seg[G]` token columns ([`t128_segments`], `out.ld >= seg[G]`):
/// its codes at columns `[seg[e], seg[e] + n_e)`, zero codes in the segment's padding up to
/// `seg[e+1]`, its 1x128 scales at token blocks `seg[e]/128..` (column c, block b at
/// `scale[c·s_rs + b·s_cs]`). Read from column `seg[e]` (codes, row stride `out.ld`) and block
/// `seg[e]/128` (scales), group `e`'s segment is bit for bit [`quant_t128`] of its rows alone.
/// Uploads the `2G + 2` offsets per call. Bit for bit `quant_t128` per expert on the H100
/// (kernels/tests/fp8.rs, 2026-11-24).
pub fn quant_t128_groups(
    dev: &Device,
    x: &Act,
    ldx: usize,
    ro: &[i32],
    cols: usize,
    out: Fp8Out,
    pow2: bool,
) -> Result<()> {
    let seg = t128_segments(ro)?;
    let (g, total) = (ro.len() - 1, seg[ro.len() - 1]);
    if total == 0 || cols == 0 {
        return Ok(());
    }
    let mut table = ro.to_vec();
    for &s in &seg {
        table.push(int(s, "quant_t128_groups segment")?);
    }
    let table = crate::tensor::upload(dev, &table)?;
    quant_t128_groups_table(dev, x, ldx, &table, g, ro[g] as usize, total, cols, out, pow2)
}

/// [`quant_t128_groups`] from the table `t128` on the device (`[2G + 2]`: the row offsets, then
/// the segments, as `ops::moe_train::plan_token_order` writes it; nothing read back): `rows`
/// bounds the offsets (x holds `rows` rows) and `total` the segments (`out` holds `total` token
/// columns); the launch covers `total / 128` token blocks, those past the table's last segment
/// exit.
#[allow(clippy::too_many_arguments)]
pub fn quant_t128_groups_table(
    dev: &Device,
    x: &Act,
    ldx: usize,
    t128: &cudarc::driver::CudaSlice<i32>,
    groups: usize,
    rows: usize,
    total: usize,
    cols: usize,
    out: Fp8Out,
    pow2: bool,
) -> Result<()> {
    if total == 0 || cols == 0 || rows == 0 {
        return Ok(());
    }
    if groups == 0 || t128.len() < 2 * groups + 2 || !total.is_multiple_of(128) {
        return Err(Error::Input(format!(
            "quant_t128_groups: {groups} groups, a table of {} (2G + 2), {total} token columns (a multiple of 128)",
            t128.len()
        )));
    }
    x.check((rows - 1) * ldx + cols, "quant_t128_groups x")?;
    if ldx < cols {
        return Err(Error::Input(format!("quant_t128_groups: ldx {ldx} < cols {cols}")));
    }
    out.check(cols, total, "quant_t128_groups (transposed output)")?;
    let k = quant_kernel(x, "quant_t128_groups_f32", "quant_t128_groups_bf16");
    let mut args = out.lead_args(dev, x, ldx)?;
    args.extend([
        KArg::Ptr(dptr(dev, t128, 0)?),
        KArg::I32(int(groups, "groups")?),
        KArg::I32(int(cols, "cols")?),
        KArg::I32(pow2 as i32),
    ]);
    let grid = (dim(cols.div_ceil(32), "quant cols")?, grid_y(total / 128, "quant token blocks")?, 1);
    launch(dev, "fp8quant", k, grid, 256, &args)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fp8_gemm_args_match_the_cuda_struct_layout() {
        // 7 pointers, 6 i64, 10 ints
        assert_eq!(std::mem::size_of::<super::Fp8GemmArgs>(), 7 * 8 + 6 * 8 + 10 * 4);
        assert_eq!(std::mem::offset_of!(super::Fp8GemmArgs, stride_b), 56);
        assert_eq!(std::mem::offset_of!(super::Fp8GemmArgs, m), 104);
        assert_eq!(std::mem::offset_of!(super::Fp8GemmArgs, pad), 140);
    }
}
