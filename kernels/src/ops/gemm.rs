//! GEMMs `C = A · Wᵀ` (`kernels/cuda/gemm.cu`): f32 SIMT, bf16 tensor cores, FP8 weights with
//! 128x128 block scales promoted per 128-wide K block. Batched over `grid.z` with strides, or
//! grouped by rows (MoE experts: group g owns rows `[row_offsets[g], row_offsets[g+1])` and
//! weight matrix g). The skinny (few-row) kernels also fuse what sits around a GEMM on the decode
//! path: gathered A rows ([`GemmShape::a_rows`]), an RMSNorm of A ([`GemmShape::norm`]) and the
//! SwiGLU of a gate|up product ([`GemmShape::swiglu`]).
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType, DWeight, WeightBuf};
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};

/// Rows per block tile (the grouped mode's tile unit; `moe_plan` counts tiles of this size).
pub const GEMM_BM: usize = 64;
/// Columns per block tile.
pub const GEMM_BN: usize = 64;

/// The kernels' argument block (`kernels/cuda/gemm.cuh`, same field order and sizes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GemmArgs {
    pub a: u64,
    pub w: u64,
    pub c: u64,
    pub bias: u64,
    pub scale: u64,
    pub row_offsets: u64,
    pub tile_offsets: u64,
    pub stride_a: i64,
    pub stride_w: i64,
    pub stride_c: i64,
    pub stride_scale: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldw: i32,
    pub ldc: i32,
    pub groups: i32,
    pub accumulate: i32,
    pub scale_ld: i32,
    pub pad: i32,
    /// `[m]` A row indices (0: none), rows of A they may name `a_rows_m`.
    pub a_rows: u64,
    /// `[k]` RMSNorm weight folded into A (0: none), and its epsilon.
    pub norm_w: u64,
    pub norm_eps: f32,
    pub a_rows_m: i32,
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for GemmArgs {}

/// Rows grouped by weight matrix (MoE experts), as `moe_plan` writes them: `row_offsets` and
/// `tile_offsets` `[groups + 1]` on the device; `max_tiles` an upper bound on
/// `tile_offsets[groups]` (the grid size; extra blocks exit).
pub struct Grouped<'a> {
    pub row_offsets: &'a CudaSlice<i32>,
    pub tile_offsets: &'a CudaSlice<i32>,
    pub max_tiles: usize,
}

/// The shape of one GEMM call. Batched (`grouped: None`): `batch` products, operand `b` being
/// A at `a_off + b·stride_a` (`[m, k]`, row stride `lda`), weight matrix `b` of the [`DWeight`]
/// (which must have `batch` groups, or 1 to share it), C at `c_off + b·stride_c` (`[m, n]`,
/// stride `ldc`). Grouped: `m` is the total rows; A and C rows are global; `batch` must be 1.
pub struct GemmShape<'a> {
    pub m: usize,
    pub a_off: usize,
    pub lda: usize,
    pub stride_a: usize,
    pub c_off: usize,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
    /// `[n]` f32 added to every row.
    pub bias: Option<&'a CudaSlice<f32>>,
    pub grouped: Option<Grouped<'a>>,
    /// `[m]` row indices: A row `r` is read from row `a_rows[r]` of A (a gathered operand without
    /// the copy; batched: within each batch's A). An index outside A (by its buffer's length)
    /// makes that C row NaN. Skinny kernels only.
    pub a_rows: Option<&'a CudaSlice<i32>>,
    /// `(weight [k], eps)`: the A rows are RMS-normalized first, `x · rsqrt(mean(x²) + eps) · w`
    /// (statistics in f32 over the k columns; the normalized rows are never rounded to A's
    /// dtype). Skinny kernels only.
    pub norm: Option<(&'a CudaSlice<f32>, f32)>,
    /// SwiGLU epilogue: W is a gate|up stack `[2I, k]` (per group), C is `[m, I]` with
    /// `C[r, j] = silu(g) · u` for `g = A_r · W[j]`, `u = A_r · W[I + j]` (+ bias `[2I]`), the same
    /// f32 math as `gemm` into `[m, 2I]` followed by `elementwise::swiglu`. Not with `accumulate`.
    /// Skinny kernels only.
    pub swiglu: bool,
}

impl<'a> GemmShape<'a> {
    /// A plain `[m, k] · [n, k]ᵀ -> [m, n]` with contiguous rows.
    pub fn plain(m: usize, k: usize, n: usize) -> GemmShape<'a> {
        GemmShape {
            m,
            a_off: 0,
            lda: k,
            stride_a: 0,
            c_off: 0,
            ldc: n,
            stride_c: 0,
            batch: 1,
            accumulate: false,
            bias: None,
            grouped: None,
            a_rows: None,
            norm: None,
            swiglu: false,
        }
    }

    /// Whether the call uses a fused form (gathered rows, folded norm, SwiGLU): skinny kernels only.
    pub fn fused(&self) -> bool {
        self.a_rows.is_some() || self.norm.is_some() || self.swiglu
    }
}

/// The kernel for (A dtype, weight storage, C dtype).
fn kernel_for(a: DType, w: &WeightBuf, c: DType) -> Result<&'static str> {
    Ok(match (a, w, c) {
        (DType::F32, WeightBuf::F32(_), DType::F32) => "gemm_f32",
        (DType::Bf16, WeightBuf::Bf16(_), DType::Bf16) => "gemm_bf16_bf16",
        (DType::Bf16, WeightBuf::Bf16(_), DType::F32) => "gemm_bf16_f32",
        (DType::Bf16, WeightBuf::Fp8 { .. }, DType::Bf16) => "gemm_fp8_bf16",
        (DType::Bf16, WeightBuf::Fp8 { .. }, DType::F32) => "gemm_fp8_f32",
        // skinny kernels only (the router in bf16 mode); the tiled path refuses it below
        (DType::Bf16, WeightBuf::F32(_), DType::F32) => "gemm_bf16a_f32w",
        _ => {
            return Err(Error::Input(format!(
                "gemm: no kernel for A {a:?} x {} weights -> C {c:?} (f32 mode: all f32; bf16 mode: bf16 A)",
                match w {
                    WeightBuf::F32(_) => "f32",
                    WeightBuf::Bf16(_) => "bf16",
                    WeightBuf::Fp8 { .. } => "fp8",
                }
            )))
        }
    })
}

/// Which GEMM kernel family runs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// Skinny for few rows (see [`SKINNY_MAX_M`]) when the strides allow it, else tiled.
    Auto,
    /// The 64x64 tiled kernels.
    Tiled,
    /// The skinny kernels at any row count (an error when K or the strides are not multiples of 8).
    Skinny,
    /// The one-row skinny kernels (32 columns per warp; an error unless `m == 1`, not grouped).
    SkinnyRow,
}

/// `C (+)= A · Wᵀ (+ bias)` over the shape `s`; see [`GemmShape`].
pub fn gemm(dev: &Device, a: &Act, w: &DWeight, c: &mut Act, s: &GemmShape) -> Result<()> {
    gemm_via(dev, a, w, c, s, GemmPath::Auto)
}

/// Whether [`gemm_via`] runs this call (fused forms included) in the skinny kernels on `path`;
/// for a call with a fused form, whether it is accepted at all (buffer lengths aside). The
/// session decides its fusions with it.
pub fn runs_skinny(dev: &Device, a: DType, w: &DWeight, c: DType, s: &GemmShape, path: GemmPath) -> bool {
    matches!(choose(dev, a, w, c, s, path), Ok(Some(ch)) if ch.skinny)
}

/// The kernel and launch geometry of a call.
struct Choice {
    kernel: &'static str,
    grid: (usize, usize, usize),
    block: u32,
    skinny: bool,
}

/// Picks the kernel for a call and checks what does not need the operand buffers; `None` for
/// an empty call.
fn choose(dev: &Device, a: DType, w: &DWeight, c: DType, s: &GemmShape, path: GemmPath) -> Result<Option<Choice>> {
    let (n_w, k) = (w.n, w.k);
    if s.swiglu && !n_w.is_multiple_of(2) {
        return Err(Error::Input(format!("gemm: SwiGLU needs a gate|up weight of 2I rows (got {n_w})")));
    }
    // output columns: the weight rows, or I of a gate|up stack
    let n = if s.swiglu { n_w / 2 } else { n_w };
    if s.m == 0 || n == 0 {
        return Ok(None);
    }
    let kernel = kernel_for(a, &w.buf, c)?;
    if k == 0 || s.lda < k || s.ldc < n {
        return Err(Error::Input(format!("gemm: k {k}, lda {} (>= k), ldc {} (>= n {n})", s.lda, s.ldc)));
    }
    if let Some(b) = s.bias {
        if b.len() < n_w {
            return Err(Error::Input(format!("gemm: bias of {} for {n_w} weight rows", b.len())));
        }
    }
    if s.swiglu && s.accumulate {
        return Err(Error::Input("gemm: SwiGLU overwrites its output (no accumulate)".into()));
    }
    if let Some(r) = s.a_rows {
        if r.len() < s.m {
            return Err(Error::Input(format!("gemm: {} row indices for {} rows", r.len(), s.m)));
        }
    }
    if let Some((nw, _)) = s.norm {
        if nw.len() < k {
            return Err(Error::Input(format!("gemm: norm weight of {} for k {k}", nw.len())));
        }
    }
    let (groups, grid_y, grid_z) = match &s.grouped {
        Some(g) => {
            if s.batch != 1 || g.row_offsets.len() < w.groups + 1 || g.tile_offsets.len() < w.groups + 1 {
                return Err(Error::Input("gemm: grouped call needs batch 1 and [groups + 1] offsets".into()));
            }
            (w.groups, g.max_tiles.max(1), 1)
        }
        None => {
            if s.batch == 0 || (w.groups != 1 && w.groups != s.batch) {
                return Err(Error::Input(format!("gemm: batch {} with {} weight matrices", s.batch, w.groups)));
            }
            (1, s.m.div_ceil(GEMM_BM), s.batch)
        }
    };
    let skinny = match path {
        GemmPath::Auto => skinny_kernel(kernel, s, k, true).filter(|_| {
            // up to 64 rows the skinny kernels still win while the tiled grid cannot fill the
            // GPU (measured on an H100: 32 x 512 x 512 in 13 µs vs 73 µs); with enough tiles
            // (32 x 32000 x 512: 60 µs tiled, 145 µs skinny) the tensor cores win. Counted over
            // the weight rows, so a SwiGLU call goes where its unfused gate|up GEMM would.
            s.m <= 8 || s.grouped.is_some() || n_w.div_ceil(GEMM_BN) * s.m.div_ceil(GEMM_BM) * s.batch < dev.sms
        }),
        GemmPath::Tiled => None,
        GemmPath::Skinny | GemmPath::SkinnyRow => Some(skinny_kernel(kernel, s, k, false).ok_or_else(|| {
            Error::Input(format!(
                "gemm: the skinny kernels need K, lda and offsets divisible by 8 (k {k}, lda {})",
                s.lda
            ))
        })?),
    };
    let Some(sk) = skinny else {
        if kernel == "gemm_bf16a_f32w" {
            return Err(Error::Input(format!(
                "gemm: bf16 activations x f32 weights only run in the skinny kernels (<= {SKINNY_MAX_M} rows, K % 8 == 0; \
                 got {} rows, k {k}): cast the activations to f32",
                s.m
            )));
        }
        if s.fused() {
            return Err(Error::Input(format!(
                "gemm: gathered rows, a folded norm and SwiGLU run only in the skinny kernels (<= {SKINNY_MAX_M} rows, \
                 {SKINNY_MAX_M_GROUPED} grouped, K and lda % 8 == 0; got {} rows, k {k}, lda {})",
                s.m, s.lda
            )));
        }
        let block = if kernel == "gemm_f32" { 256 } else { 128 };
        return Ok(Some(Choice { kernel, grid: (n.div_ceil(GEMM_BN), grid_y, grid_z), block, skinny: false }));
    };
    let sk = if s.swiglu {
        skinny_swiglu_name(sk).ok_or_else(|| {
            Error::Input(format!(
                "gemm: no SwiGLU kernel for A {a:?} -> C {c:?} with these weights (C in the activation dtype: \
                 f32 x f32, bf16 x bf16 or FP8)"
            ))
        })?
    } else {
        sk
    };
    // one row against many columns: the 1-row form (32 weight rows per warp)
    let row = match (path, skinny_row_name(sk)) {
        (GemmPath::SkinnyRow, Some(k1)) if s.m == 1 && s.grouped.is_none() => Some(k1),
        (GemmPath::SkinnyRow, _) => {
            return Err(Error::Input(format!(
                "gemm: the one-row kernels take m == 1, ungrouped, bf16 or FP8 weights (m {})",
                s.m
            )))
        }
        (GemmPath::Auto, Some(k1))
            if s.m == 1 && s.grouped.is_none() && n_w * s.batch >= SKINNY_ROW_MIN_COLS && k <= SKINNY_ROW_MAX_K =>
        {
            Some(k1)
        }
        _ => None,
    };
    // output columns per block: 4 warps of 32 (1-row) or 4 (8-row) weight rows, half as many
    // outputs with SwiGLU (each pairs a gate and an up row)
    let per_block = |weight_rows: usize| if s.swiglu { weight_rows / 2 } else { weight_rows };
    if let Some(k1) = row {
        return Ok(Some(Choice {
            kernel: k1,
            grid: (n.div_ceil(per_block(4 * 32)), 1, grid_z),
            block: 128,
            skinny: true,
        }));
    }
    // one block per 8-row tile: grouped, z walks the tiles of a group (at most all m rows)
    let tiles = s.m.div_ceil(8);
    let (gy, gz) = if s.grouped.is_some() { (groups, tiles) } else { (tiles, grid_z) };
    Ok(Some(Choice { kernel: sk, grid: (n.div_ceil(per_block(SKINNY_COLS)), gy, gz), block: 128, skinny: true }))
}

/// [`gemm`] through a chosen kernel family (tests and benchmarks compare them).
pub fn gemm_via(dev: &Device, a: &Act, w: &DWeight, c: &mut Act, s: &GemmShape, path: GemmPath) -> Result<()> {
    let Some(ch) = choose(dev, a.dtype(), w, c.dtype(), s, path)? else { return Ok(()) };
    let (n_w, k) = (w.n, w.k);
    let n = if s.swiglu { n_w / 2 } else { n_w };
    let last = s.batch - 1;
    // the first row of the last batch's A: with gathered rows, the indices may name any row the
    // buffer holds from there (a_rows_m of them; others read row 0 and write NaN)
    let a_first = s.a_off + last * s.stride_a + k;
    let a_rows_m = match s.a_rows {
        Some(_) => {
            a.check(a_first, "gemm A")?;
            ((a.len() - a_first) / s.lda + 1).min(i32::MAX as usize)
        }
        None => {
            a.check(a_first + (s.m - 1) * s.lda, "gemm A")?;
            0
        }
    };
    c.check(s.c_off + last * s.stride_c + (s.m - 1) * s.ldc + n, "gemm C")?;
    let share_w = s.grouped.is_none() && w.groups == 1;
    let stride_w = if share_w { 0 } else { (n_w * k) as i64 };
    let sl = k.div_ceil(128);
    let (wp, scale, stride_scale) = match &w.buf {
        WeightBuf::F32(b) => (dptr(dev, b, 0)?, 0, 0),
        WeightBuf::Bf16(b) => (dptr(dev, b, 0)?, 0, 0),
        WeightBuf::Fp8 { q, scale } => {
            let ss = if share_w { 0 } else { (n_w.div_ceil(128) * sl) as i64 };
            (dptr(dev, q, 0)?, dptr(dev, scale, 0)?, ss)
        }
    };
    let (ro, to) = match &s.grouped {
        Some(g) => (dptr(dev, g.row_offsets, 0)?, dptr(dev, g.tile_offsets, 0)?),
        None => (0, 0),
    };
    let args = GemmArgs {
        a: a.ptr(dev, s.a_off)?,
        w: wp,
        c: c.ptr(dev, s.c_off)?,
        bias: match s.bias {
            Some(b) => dptr(dev, b, 0)?,
            None => 0,
        },
        scale,
        row_offsets: ro,
        tile_offsets: to,
        stride_a: s.stride_a as i64,
        stride_w,
        stride_c: s.stride_c as i64,
        stride_scale,
        m: int(s.m, "m")?,
        n: int(n, "n")?,
        k: int(k, "k")?,
        lda: int(s.lda, "lda")?,
        ldw: int(k, "ldw")?,
        ldc: int(s.ldc, "ldc")?,
        groups: int(if s.grouped.is_some() { w.groups } else { 1 }, "groups")?,
        accumulate: s.accumulate as i32,
        scale_ld: int(sl, "scale_ld")?,
        pad: 0,
        a_rows: match s.a_rows {
            Some(r) => dptr(dev, r, 0)?,
            None => 0,
        },
        norm_w: match s.norm {
            Some((nw, _)) => dptr(dev, nw, 0)?,
            None => 0,
        },
        norm_eps: s.norm.map_or(0.0, |(_, eps)| eps),
        a_rows_m: a_rows_m as i32,
    };
    let (gx, gy, gz) = ch.grid;
    let grid = (dim(gx, "gemm n")?, dim(gy, "gemm rows")?, dim(gz, "gemm batch")?);
    launch(dev, "gemm", ch.kernel, grid, ch.block, &[KArg::Gemm(args)])
}

/// Output columns per block of the skinny kernels (4 warps x 4 columns).
const SKINNY_COLS: usize = 16;
/// One-row calls with at least this many output columns (over the batch) take the 1-row kernels
/// (32 blocks of 128 columns or more: enough to keep the GPU's memory system busy).
pub const SKINNY_ROW_MIN_COLS: usize = 4096;
/// ... and K up to this (a warp walks its 32 columns one after another: on an H100 1 x 32000 x 512
/// takes 11 µs this way and 32 µs in 8-row tiles, but 1 x 4096 x 7168 60 µs against 36 µs).
pub const SKINNY_ROW_MAX_K: usize = 2048;

/// The 1-row form of an 8-row skinny kernel (`gemm_skinny_x` -> `gemm_skinny1_x`); none for f32
/// weights.
fn skinny_row_name(sk: &str) -> Option<&'static str> {
    Some(match sk {
        "gemm_skinny_bf16_bf16" => "gemm_skinny1_bf16_bf16",
        "gemm_skinny_bf16_f32" => "gemm_skinny1_bf16_f32",
        "gemm_skinny_fp8_bf16" => "gemm_skinny1_fp8_bf16",
        "gemm_skinny_fp8_f32" => "gemm_skinny1_fp8_f32",
        "gemm_skinny_swiglu_bf16" => "gemm_skinny1_swiglu_bf16",
        "gemm_skinny_swiglu_fp8" => "gemm_skinny1_swiglu_fp8",
        _ => return None,
    })
}

/// The SwiGLU form of an 8-row skinny kernel: C in the activation dtype only (f32 mode: f32;
/// bf16 mode: bf16, bf16 or FP8 weights).
fn skinny_swiglu_name(sk: &str) -> Option<&'static str> {
    Some(match sk {
        "gemm_skinny_f32" => "gemm_skinny_swiglu_f32",
        "gemm_skinny_bf16_bf16" => "gemm_skinny_swiglu_bf16",
        "gemm_skinny_fp8_bf16" => "gemm_skinny_swiglu_fp8",
        _ => return None,
    })
}
/// Largest row count (all groups together when grouped) sent to the skinny kernels.
pub const SKINNY_MAX_M: usize = 64;
pub const SKINNY_MAX_M_GROUPED: usize = 256;

/// The skinny (few-row, memory-bound) kernel for this call, if it qualifies: few rows, and K,
/// the row strides and offsets multiples of 8 (16-byte vector loads). `DSV3_GEMM_SKINNY=0`
/// turns them off (for comparisons).
/// With `auto`, only for few rows and unless turned off.
fn skinny_kernel(tiled: &str, s: &GemmShape, k: usize, auto: bool) -> Option<&'static str> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let max_m = if s.grouped.is_some() { SKINNY_MAX_M_GROUPED } else { SKINNY_MAX_M };
    if auto && (s.m > max_m || !*ON.get_or_init(|| std::env::var("DSV3_GEMM_SKINNY").map_or(true, |v| v != "0"))) {
        return None;
    }
    if ![k, s.lda, s.a_off, s.stride_a].iter().all(|v| v.is_multiple_of(8)) {
        return None;
    }
    Some(match tiled {
        "gemm_f32" => "gemm_skinny_f32",
        "gemm_bf16_bf16" => "gemm_skinny_bf16_bf16",
        "gemm_bf16_f32" => "gemm_skinny_bf16_f32",
        "gemm_fp8_bf16" => "gemm_skinny_fp8_bf16",
        "gemm_fp8_f32" => "gemm_skinny_fp8_f32",
        "gemm_bf16a_f32w" => "gemm_skinny_bf16_f32w",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn gemm_args_match_the_cuda_struct_layout() {
        // 7 pointers, 4 i64 strides, 10 ints, then 2 pointers, a float and an int: offsets as
        // nvcc lays out struct GemmArgs
        assert_eq!(std::mem::size_of::<super::GemmArgs>(), 7 * 8 + 4 * 8 + 10 * 4 + 2 * 8 + 2 * 4);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, stride_a), 56);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, m), 88);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, pad), 124);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, a_rows), 128);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, norm_w), 136);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, norm_eps), 144);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, a_rows_m), 148);
    }

    #[test]
    fn every_skinny_form_has_its_kernel() {
        for sk in ["gemm_skinny_f32", "gemm_skinny_bf16_bf16", "gemm_skinny_fp8_bf16"] {
            let sw = super::skinny_swiglu_name(sk).unwrap();
            assert!(crate::ops::KERNELS.contains(&("gemm", sw)), "{sw} not in KERNELS");
            if let Some(row) = super::skinny_row_name(sw) {
                assert!(crate::ops::KERNELS.contains(&("gemm", row)), "{row} not in KERNELS");
            }
        }
    }
}
