//! GEMMs `C = A · Wᵀ` (`kernels/cuda/gemm.cu`): f32 SIMT, bf16 tensor cores (mma.sync with a
//! cp.async pipeline), FP8 weights with 128x128 block scales promoted per 128-wide K block.
//! Batched over `grid.z` with strides, or grouped by rows (MoE experts: group g owns rows
//! `[row_offsets[g], row_offsets[g+1])` and weight matrix g). The skinny (few-row) kernels also
//! fuse what sits around a GEMM on the decode path: gathered A rows ([`GemmShape::a_rows`]), an
//! RMSNorm of A ([`GemmShape::norm`]) and the SwiGLU of a gate|up product ([`GemmShape::swiglu`]).
//!
//! The backward products of training take the other operand layouts of the same bf16 kernel
//! ([`gemm_mat`], [`gemm_nn`], [`gemm_tn`], shapes in [`MatShape`]): NN `C = A · B` (`dX = dY · W`
//! with W as stored, `[out, in]`) and TN `C = Aᵀ · B` (`dW = dYᵀ · X`, usually accumulated into an
//! f32 gradient), plain, batched, or grouped by expert.
use super::{dim, int, launch_smem, split_yz, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType, DWeight, WeightBuf};
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};

/// Rows per block tile of grouped launches (the grouped mode's tile unit; `moe_plan` counts tiles
/// of this size), and of the f32 and FP8-weight kernels.
pub const GEMM_BM: usize = 64;
/// Columns per block tile of the f32 and FP8-weight kernels (the bf16 mma kernels: 128).
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
    /// mma kernels: [`FLAG_VEC`] | [`FLAG_F32C`].
    pub flags: i32,
    /// `[m]` A row indices (0: none), rows of A they may name `a_rows_m`.
    pub a_rows: u64,
    /// `[k]` RMSNorm weight folded into A (0: none), and its epsilon.
    pub norm_w: u64,
    pub norm_eps: f32,
    pub a_rows_m: i32,
}

/// `GemmArgs::flags`: every operand row and chunk is 16-byte aligned (cp.async loads).
const FLAG_VEC: i32 = 1;
/// `GemmArgs::flags`: C is f32 (else bf16).
pub(crate) const FLAG_F32C: i32 = 2;

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

/// The kernel family for (A dtype, weight storage, C dtype): a tiled kernel's name, except
/// `gemm_bf16_*`, which name the bf16 family (tiled: `gemm_mma_nt_*`; the skinny forms by name).
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
    /// Dynamic shared memory (the mma kernels), bytes.
    smem: u32,
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
            // the row tiles over grid y and z (tile_yz() in gemm.cuh): past 65535 tiles z takes the rest
            let (y, z) = split_yz(g.max_tiles.max(1));
            (w.groups, y, z)
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
        if kernel == "gemm_bf16_bf16" || kernel == "gemm_bf16_f32" {
            // the mma.sync kernel (NT); grouped rows in moe_plan's 64-row tiles
            let t = mma_tile(dev, s.m, n, grid_z, s.grouped.is_some(), None);
            let gy = if s.grouped.is_some() { grid_y } else { s.m.div_ceil(t.rows()) };
            return Ok(Some(Choice {
                kernel: mma_kernel(Layout::NT, t),
                grid: (n.div_ceil(t.cols()), gy, grid_z),
                block: MMA_THREADS,
                skinny: false,
                smem: t.smem(),
            }));
        }
        let block = if kernel == "gemm_f32" { 256 } else { 128 };
        return Ok(Some(Choice { kernel, grid: (n.div_ceil(GEMM_BN), grid_y, grid_z), block, skinny: false, smem: 0 }));
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
            smem: 0,
        }));
    }
    // one block per 8-row tile: grouped, z walks the tiles of a group (at most all m rows)
    let tiles = s.m.div_ceil(8);
    let (gy, gz) = if s.grouped.is_some() { (groups, tiles) } else { (tiles, grid_z) };
    Ok(Some(Choice {
        kernel: sk,
        grid: (n.div_ceil(per_block(SKINNY_COLS)), gy, gz),
        block: 128,
        skinny: true,
        smem: 0,
    }))
}

/// [`gemm`] through a chosen kernel family (tests and benchmarks compare them).
pub fn gemm_via(dev: &Device, a: &Act, w: &DWeight, c: &mut Act, s: &GemmShape, path: GemmPath) -> Result<()> {
    let Some((ch, args)) = prepare(dev, a, w, c, s, path)? else { return Ok(()) };
    let (gx, gy, gz) = ch.grid;
    let grid = (dim(gx, "gemm n")?, dim(gy, "gemm rows")?, dim(gz, "gemm batch")?);
    launch_smem(dev, "gemm", ch.kernel, grid, ch.block, ch.smem, &[KArg::Gemm(args)])
}

/// What a skinny GEMM does in the same launch besides its product (decode fusions; the kernels
/// `gemm_skinny_combine_*` and `gemm_skinny_prep_*`, gemm.cu).
pub(crate) enum Epilogue {
    /// The MoE combine after the routed experts' down GEMM ([`super::moe::down_combine`]): the
    /// arguments and the length of their counter buffer (one counter per 16 output columns).
    MoeCombine(super::moe::CombineArgs, usize),
    /// `mla_prep` around the query projection's last GEMM ([`super::mla::gemm_prep`]); the
    /// launcher fills in `col_tiles`.
    MlaPrep(super::mla::PrepArgs),
}

/// The fused form of an 8-row skinny kernel (C in the activation dtype).
fn skinny_epilogue_name(sk: &str, e: &Epilogue) -> Option<&'static str> {
    Some(match (sk, e) {
        ("gemm_skinny_f32", Epilogue::MoeCombine(..)) => "gemm_skinny_combine_f32",
        ("gemm_skinny_bf16_bf16", Epilogue::MoeCombine(..)) => "gemm_skinny_combine_bf16_bf16",
        ("gemm_skinny_fp8_bf16", Epilogue::MoeCombine(..)) => "gemm_skinny_combine_fp8_bf16",
        ("gemm_skinny_f32", Epilogue::MlaPrep(..)) => "gemm_skinny_prep_f32",
        ("gemm_skinny_bf16_bf16", Epilogue::MlaPrep(..)) => "gemm_skinny_prep_bf16_bf16",
        ("gemm_skinny_fp8_bf16", Epilogue::MlaPrep(..)) => "gemm_skinny_prep_fp8_bf16",
        _ => None?,
    })
}

/// Whether [`gemm_epilogue`] takes this call with `e`: the 8-row skinny kernels (few rows), C
/// rows exactly `n` wide, no accumulate; the MoE combine on grouped rows with no other fused
/// form, `mla_prep` on plain rows (one batch) with at most the folded norm.
pub(crate) fn runs_epilogue(dev: &Device, a: DType, w: &DWeight, c: DType, s: &GemmShape, e: &Epilogue) -> bool {
    let form = match e {
        Epilogue::MoeCombine(..) => s.grouped.is_some() && !s.fused(),
        Epilogue::MlaPrep(..) => s.grouped.is_none() && s.batch == 1 && s.a_rows.is_none() && !s.swiglu,
    };
    form && !s.accumulate
        && s.ldc == w.n
        && matches!(choose(dev, a, w, c, s, GemmPath::Auto),
                    Ok(Some(ch)) if ch.skinny && skinny_epilogue_name(ch.kernel, e).is_some())
}

/// A skinny GEMM with a fused epilogue `e` in the same launch (see [`Epilogue`]); an error
/// where [`runs_epilogue`] does not hold.
pub(crate) fn gemm_epilogue(dev: &Device, a: &Act, w: &DWeight, c: &mut Act, s: &GemmShape, e: Epilogue) -> Result<()> {
    if !runs_epilogue(dev, a.dtype(), w, c.dtype(), s, &e) {
        return Err(Error::Input(format!(
            "gemm: this fused form runs only in the 8-row skinny kernels (<= {SKINNY_MAX_M} rows, \
             {SKINNY_MAX_M_GROUPED} grouped, K % 8 == 0, no accumulate, ldc == n, C in the activation dtype; \
             got {} rows, k {}, ldc {})",
            s.m, w.k, s.ldc
        )));
    }
    let Some((ch, args)) = prepare(dev, a, w, c, s, GemmPath::Auto)? else { return Ok(()) };
    let kernel = skinny_epilogue_name(ch.kernel, &e).expect("runs_epilogue checked it");
    let (gx, gy, gz) = ch.grid;
    let (gx, extra) = match e {
        Epilogue::MoeCombine(q, counters) => {
            if counters < gx {
                return Err(Error::Input(format!("gemm: {counters} combine counters for {gx} column tiles")));
            }
            (gx, KArg::MoeCombine(q))
        }
        // 8 more blocks per row tile: one per row's latent
        Epilogue::MlaPrep(q) => {
            (gx + 8, KArg::MlaPrep(super::mla::PrepArgs { col_tiles: int(gx, "column tiles")?, ..q }))
        }
    };
    let grid = (dim(gx, "gemm n")?, dim(gy, "gemm rows")?, dim(gz, "gemm batch")?);
    launch_smem(dev, "gemm", kernel, grid, ch.block, 0, &[KArg::Gemm(args), extra])
}

/// The kernel choice and argument block of a call (`None`: empty), operand buffers checked.
fn prepare(
    dev: &Device,
    a: &Act,
    w: &DWeight,
    c: &mut Act,
    s: &GemmShape,
    path: GemmPath,
) -> Result<Option<(Choice, GemmArgs)>> {
    let Some(ch) = choose(dev, a.dtype(), w, c.dtype(), s, path)? else { return Ok(None) };
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
        // the mma kernels: W rows are k long, so A alone decides the 16-byte loads
        flags: if [k, s.lda, s.a_off, s.stride_a].iter().all(|v| v.is_multiple_of(8)) { FLAG_VEC } else { 0 }
            | if c.dtype() == DType::F32 { FLAG_F32C } else { 0 },
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
    Ok(Some((ch, args)))
}

// ---- the bf16 mma.sync kernels in every operand layout

/// Operand layouts of the bf16 tensor-core GEMM (`gemm_mma_*`), all row-major in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `C[m, n] = A[m, k] · B[n, k]ᵀ`: the forward `x · Wᵀ` (what [`gemm`] runs).
    NT,
    /// `C[m, n] = A[m, k] · B[k, n]`: `dX = dY · W` with W as stored (`[out, in]`: k = out,
    /// n = in).
    NN,
    /// `C[m, n] = A[k, m]ᵀ · B[k, n]`: `dW = dYᵀ · X` (A = dY `[tokens, out]`, B = X
    /// `[tokens, in]`, k = tokens), usually accumulated into an f32 gradient.
    TN,
}

/// Block tiles of the mma kernels (8 warps each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// 128 x 256 (warp tiles 64 x 64: the least shared-memory and L2 traffic per FLOP; one block
    /// per SM, 132 KiB of shared memory). Only when forced: slower than `Large` on the H100.
    Wide,
    /// 128 x 128 (warp tiles 64 x 32; two blocks per SM): large problems.
    Large,
    /// 64 x 128 (warp tiles 32 x 32): small problems (more blocks) and grouped rows (moe_plan's
    /// 64-row tiles).
    Small,
}

const MMA_THREADS: u32 = 256;
/// K slice and pipeline depth of the mma kernels (`GBK`, `GM_STAGES` in gemm.cu).
const MMA_BK: usize = 32;
const MMA_STAGES: usize = 4;

impl Tile {
    /// Rows per block.
    pub fn rows(self) -> usize {
        match self {
            Tile::Wide | Tile::Large => 128,
            Tile::Small => 64,
        }
    }
    /// Columns per block.
    pub fn cols(self) -> usize {
        match self {
            Tile::Wide => 256,
            Tile::Large | Tile::Small => 128,
        }
    }
    /// Dynamic shared memory (gemm.cu): the operand stages or the f32 epilogue tile, the larger.
    pub fn smem(self) -> u32 {
        let (bm, bn) = (self.rows(), self.cols());
        (MMA_STAGES * (bm + bn) * MMA_BK * 2).max(bm * (bn + 8) * 4) as u32
    }
    /// Blocks of this tile for `blocks` products of `m x n`.
    fn blocks(self, m: usize, n: usize, blocks: usize) -> usize {
        m.div_ceil(self.rows()) * n.div_ceil(self.cols()) * blocks
    }
}

/// The most dynamic shared memory a block may opt into on `dev` (0 if the driver cannot say).
fn max_smem_optin(dev: &Device) -> usize {
    use cudarc::driver::sys::CUdevice_attribute;
    dev.ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |v| v.max(0) as usize)
}

/// The tile for `blocks` products of `m x n`: 128x128 where its blocks fill every SM once, else
/// 64x128; grouped rows always 64-row tiles. The 128x256 tile only when forced: the H100 measured
/// it slower than 128x128 at every training shape (8192³ NT 228 vs 281 TFLOP/s, 4096x7168x2048
/// 219 vs 268, 2048x32000x512 188 vs 232; kernel_bench, docs/PERF.md). `force` picks one (still
/// subject to the shared memory the device offers).
fn mma_tile(dev: &Device, m: usize, n: usize, blocks: usize, grouped_rows: bool, force: Option<Tile>) -> Tile {
    tile_for(dev.sms, max_smem_optin(dev).max(48 * 1024), m, n, blocks, grouped_rows, force)
}

/// [`mma_tile`] on a GPU of `sms` SMs offering `smem` bytes of shared memory per block.
fn tile_for(
    sms: usize,
    smem: usize,
    m: usize,
    n: usize,
    blocks: usize,
    grouped_rows: bool,
    force: Option<Tile>,
) -> Tile {
    if grouped_rows {
        return Tile::Small;
    }
    let fits = |t: Tile| t.smem() as usize <= smem;
    let t = force.unwrap_or(if Tile::Large.blocks(m, n, blocks) >= sms { Tile::Large } else { Tile::Small });
    [t, Tile::Large, Tile::Small].into_iter().find(|&t| fits(t)).unwrap_or(Tile::Small)
}

fn mma_kernel(l: Layout, t: Tile) -> &'static str {
    match (l, t) {
        (Layout::NT, Tile::Wide) => "gemm_mma_nt_w",
        (Layout::NT, Tile::Large) => "gemm_mma_nt_l",
        (Layout::NT, Tile::Small) => "gemm_mma_nt_s",
        (Layout::NN, Tile::Wide) => "gemm_mma_nn_w",
        (Layout::NN, Tile::Large) => "gemm_mma_nn_l",
        (Layout::NN, Tile::Small) => "gemm_mma_nn_s",
        (Layout::TN, Tile::Wide) => "gemm_mma_tn_w",
        (Layout::TN, Tile::Large) => "gemm_mma_tn_l",
        (Layout::TN, Tile::Small) => "gemm_mma_tn_s",
    }
}

/// Operand B of [`gemm_mat`]: an activation buffer, or a bf16 weight's storage (all its groups,
/// `[groups, n, k]` contiguous; the [`MatShape`] says how it is read).
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    Act(&'a Act),
    Weight(&'a DWeight),
}

/// The shape of a [`gemm_mat`] call; offsets, strides and leading dimensions in elements.
///
/// - A: `[m, k]` (NT, NN) or `[k, m]` (TN), rows `lda` apart, starting at `a_off`.
/// - B: `[n, k]` (NT) or `[k, n]` (NN, TN), rows `ldb` apart, starting at `b_off`.
/// - C: `[m, n]`, rows `ldc` apart, starting at `c_off`; bf16 or f32 (the buffer's dtype).
///
/// Batched (`grouped: None`): `batch` products, product `b` at `+ b·stride_*` of each operand
/// (a stride of 0 shares that operand). Grouped (`batch` = the number of groups, offsets as
/// `moe_plan` writes them):
/// - NT, NN: by rows, as [`gemm`]: group g owns rows `[row_offsets[g], row_offsets[g+1])` of A
///   and C (`m` = all rows) and reads B at `b_off + g·stride_b` (expert g's weight);
///   `tile_offsets` counts [`GEMM_BM`]-row tiles, `max_tiles` bounds their total.
/// - TN: by K: group g sums over `k` in `[row_offsets[g], row_offsets[g+1])` (rows of A and B;
///   `k` = all rows) into C at `c_off + g·stride_c` (`dW_g = dY_gᵀ · X_g` for every expert in one
///   launch; an empty group gives zeros, or leaves C as it was with `accumulate`).
///   `tile_offsets` and `max_tiles` are unused.
///
/// The offsets are read on the device: they must be ascending and within `[0, m]` (rows) or
/// `[0, k]` (TN). Operands whose contiguous dimension, leading dimensions, offsets and strides are
/// all multiples of 8 are loaded 16 bytes at a time (cp.async); any other shape runs element by
/// element (correct, slower).
pub struct MatShape<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_off: usize,
    pub lda: usize,
    pub stride_a: usize,
    pub b_off: usize,
    pub ldb: usize,
    pub stride_b: usize,
    pub c_off: usize,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
    /// `[n]` f32 added to every row.
    pub bias: Option<&'a CudaSlice<f32>>,
    pub grouped: Option<Grouped<'a>>,
}

impl<'a> MatShape<'a> {
    /// One product with dense operands in `layout`: `lda`, `ldb`, `ldc` their row lengths.
    pub fn plain(layout: Layout, m: usize, n: usize, k: usize) -> MatShape<'a> {
        let (lda, ldb) = match layout {
            Layout::NT => (k, k),
            Layout::NN => (k, n),
            Layout::TN => (m, n),
        };
        MatShape {
            m,
            n,
            k,
            a_off: 0,
            lda,
            stride_a: 0,
            b_off: 0,
            ldb,
            stride_b: 0,
            c_off: 0,
            ldc: n,
            stride_c: 0,
            batch: 1,
            accumulate: false,
            bias: None,
            grouped: None,
        }
    }
}

/// `C (+)= A · B` (NN) on bf16 operands; see [`MatShape`].
pub fn gemm_nn(dev: &Device, a: &Act, b: Operand, c: &mut Act, s: &MatShape) -> Result<()> {
    gemm_mat(dev, Layout::NN, a, b, c, s)
}

/// `C (+)= Aᵀ · B` (TN) on bf16 operands; see [`MatShape`].
pub fn gemm_tn(dev: &Device, a: &Act, b: Operand, c: &mut Act, s: &MatShape) -> Result<()> {
    gemm_mat(dev, Layout::TN, a, b, c, s)
}

/// `C (+)= op(A) · op(B) (+ bias)` on the bf16 mma kernels in any [`Layout`]; see [`MatShape`].
/// A and B bf16, C bf16 or f32. (Few-row NT products are faster through [`gemm`], which picks the
/// skinny kernels for them.)
pub fn gemm_mat(dev: &Device, layout: Layout, a: &Act, b: Operand, c: &mut Act, s: &MatShape) -> Result<()> {
    gemm_mat_with(dev, layout, a, b, c, s, None)
}

/// [`gemm_mat`] with the block tile forced (`None`: chosen by grid fill; grouped NT/NN always
/// take [`Tile::Small`]). For comparisons.
pub fn gemm_mat_with(
    dev: &Device,
    layout: Layout,
    a: &Act,
    b: Operand,
    c: &mut Act,
    s: &MatShape,
    tile: Option<Tile>,
) -> Result<()> {
    let (m, n, k) = (s.m, s.n, s.k);
    if a.dtype() != DType::Bf16 {
        return Err(Error::Input(format!("gemm {layout:?}: A must be bf16 (got {:?})", a.dtype())));
    }
    let (b_ptr, b_len) = match b {
        Operand::Act(x) if x.dtype() == DType::Bf16 => (x.ptr(dev, 0)?, x.len()),
        Operand::Weight(DWeight { buf: WeightBuf::Bf16(w), .. }) => (dptr(dev, w, 0)?, w.len()),
        _ => return Err(Error::Input(format!("gemm {layout:?}: B must be bf16 (an activation or bf16 weights)"))),
    };
    if m == 0 || n == 0 || s.batch == 0 {
        return Ok(());
    }
    // stored operands: A [ra, ca], B [rb, cb]
    let (ra, ca) = if layout == Layout::TN { (k, m) } else { (m, k) };
    let (rb, cb) = if layout == Layout::NT { (n, k) } else { (k, n) };
    if s.lda < ca || s.ldb < cb || s.ldc < n {
        return Err(Error::Input(format!(
            "gemm {layout:?}: lda {} (>= {ca}), ldb {} (>= {cb}), ldc {} (>= n {n})",
            s.lda, s.ldb, s.ldc
        )));
    }
    if let Some(bias) = s.bias {
        if bias.len() < n {
            return Err(Error::Input(format!("gemm {layout:?}: bias of {} for n {n}", bias.len())));
        }
    }
    // the last batch index of each operand
    let last = s.batch - 1;
    let (la, lb, lc) = match (&s.grouped, layout) {
        (None, _) => (last, last, last),
        (Some(_), Layout::TN) => (0, 0, last),
        (Some(_), _) => (0, last, 0),
    };
    if let Some(g) = &s.grouped {
        let need_tiles = if layout == Layout::TN { 0 } else { s.batch + 1 };
        if g.row_offsets.len() < s.batch + 1 || g.tile_offsets.len() < need_tiles {
            return Err(Error::Input(format!("gemm {layout:?}: grouped call needs [groups + 1] offsets")));
        }
    }
    let extent = |off: usize, l: usize, stride: usize, rows: usize, ld: usize, cols: usize| {
        off + l * stride + (rows - 1) * ld + cols
    };
    if ra > 0 && rb > 0 {
        a.check(extent(s.a_off, la, s.stride_a, ra, s.lda, ca), "gemm A")?;
        let need = extent(s.b_off, lb, s.stride_b, rb, s.ldb, cb);
        if need > b_len {
            return Err(Error::Input(format!("gemm B: {need} elements needed, buffer holds {b_len}")));
        }
    }
    c.check(extent(s.c_off, lc, s.stride_c, m, s.ldc, n), "gemm C")?;
    // 16-byte cp.async where every row and chunk is aligned: the element counts, and the buffers'
    // own addresses (a view into an arena may start at any element)
    let vec = [ca, s.lda, s.a_off, s.stride_a, cb, s.ldb, s.b_off, s.stride_b].iter().all(|v| v.is_multiple_of(8))
        && a.ptr(dev, 0)?.is_multiple_of(16)
        && b_ptr.is_multiple_of(16);
    let grouped_rows = s.grouped.is_some() && layout != Layout::TN;
    let t = mma_tile(dev, m, n, if grouped_rows { 1 } else { s.batch }, grouped_rows, tile);
    let (gy, gz) = match &s.grouped {
        // the row tiles over grid y and z (tile_yz() in gemm.cuh): past 65535 tiles z takes the rest
        Some(g) if grouped_rows => split_yz(g.max_tiles.max(1)),
        _ => (m.div_ceil(t.rows()), s.batch),
    };
    let (ro, to) = match &s.grouped {
        Some(g) => {
            let ro = dptr(dev, g.row_offsets, 0)?;
            (ro, if layout == Layout::TN { ro } else { dptr(dev, g.tile_offsets, 0)? })
        }
        None => (0, 0),
    };
    let args = GemmArgs {
        a: a.ptr(dev, s.a_off.min(a.len()))?,
        w: b_ptr + (s.b_off.min(b_len) * 2) as u64,
        c: c.ptr(dev, s.c_off)?,
        bias: match s.bias {
            Some(b) => dptr(dev, b, 0)?,
            None => 0,
        },
        scale: 0,
        row_offsets: ro,
        tile_offsets: to,
        stride_a: s.stride_a as i64,
        stride_w: s.stride_b as i64,
        stride_c: s.stride_c as i64,
        stride_scale: 0,
        m: int(m, "m")?,
        n: int(n, "n")?,
        k: int(k, "k")?,
        lda: int(s.lda, "lda")?,
        ldw: int(s.ldb, "ldb")?,
        ldc: int(s.ldc, "ldc")?,
        groups: int(if s.grouped.is_some() { s.batch } else { 1 }, "groups")?,
        accumulate: s.accumulate as i32,
        scale_ld: 0,
        flags: if vec { FLAG_VEC } else { 0 } | if c.dtype() == DType::F32 { FLAG_F32C } else { 0 },
        a_rows: 0,
        norm_w: 0,
        norm_eps: 0.0,
        a_rows_m: 0,
    };
    // grouped NT / NN on sm_90a: the wgmma + TMA kernel (unless a tile is forced)
    if let (Some(g), None) = (&s.grouped, tile) {
        if super::gemm_tma::fits(dev, layout, s, args.a, args.w) {
            return super::gemm_tma::grouped(dev, layout, s, args, g.max_tiles);
        }
    }
    let grid = (dim(n.div_ceil(t.cols()), "gemm n")?, dim(gy, "gemm rows")?, dim(gz, "gemm batch")?);
    launch_smem(dev, "gemm", mma_kernel(layout, t), grid, MMA_THREADS, t.smem(), &[KArg::Gemm(args)])
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
        assert_eq!(std::mem::offset_of!(super::GemmArgs, flags), 124);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, a_rows), 128);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, norm_w), 136);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, norm_eps), 144);
        assert_eq!(std::mem::offset_of!(super::GemmArgs, a_rows_m), 148);
        // MoeCombineArgs (gemm.cu): 6 pointers, 2 ints
        assert_eq!(std::mem::offset_of!(crate::ops::moe::CombineArgs, tokens), 48);
        assert_eq!(std::mem::size_of::<crate::ops::moe::CombineArgs>(), 56);
    }

    #[test]
    fn every_skinny_kernel_has_its_fused_forms() {
        use super::{skinny_epilogue_name, Epilogue};
        let forms = [Epilogue::MoeCombine(Default::default(), 0), Epilogue::MlaPrep(Default::default())];
        for sk in ["gemm_skinny_f32", "gemm_skinny_bf16_bf16", "gemm_skinny_fp8_bf16"] {
            for e in &forms {
                let name = skinny_epilogue_name(sk, e).unwrap();
                assert!(crate::ops::KERNELS.iter().any(|(_, k)| *k == name), "{name} not listed");
            }
        }
        // C in f32 under bf16 activations has none (the residual is in the activation dtype)
        assert!(skinny_epilogue_name("gemm_skinny_bf16_f32", &forms[0]).is_none());
    }

    #[test]
    fn every_mma_kernel_is_listed() {
        use super::{mma_kernel, Layout, Tile};
        for l in [Layout::NT, Layout::NN, Layout::TN] {
            for t in [Tile::Wide, Tile::Large, Tile::Small] {
                let k = mma_kernel(l, t);
                assert!(crate::ops::KERNELS.contains(&("gemm", k)), "{k} not in KERNELS");
            }
        }
        // gemm.cu's sizes: 4 stages of (BM + BN) x 32 bf16, or BM x (BN + 8) f32
        assert_eq!(Tile::Wide.smem(), 135168);
        assert_eq!(Tile::Large.smem(), 69632);
        assert_eq!(Tile::Small.smem(), 49152);
    }

    #[test]
    fn the_auto_tile_is_128x128_where_it_fills_the_gpu_and_never_128x256() {
        use super::{tile_for, Tile};
        let h100 = (132, 227 * 1024);
        // the H100's training shapes (kernel_bench 2026-11-24: 128x128 beat 128x256 at each)
        for (m, n) in [(8192, 8192), (4096, 7168), (8192, 512), (2048, 32000)] {
            assert_eq!(tile_for(h100.0, h100.1, m, n, 1, false, None), Tile::Large, "{m}x{n}");
        }
        // too few 128x128 blocks to fill 132 SMs: 64x128
        assert_eq!(tile_for(h100.0, h100.1, 2048, 512, 1, false, None), Tile::Small);
        // batched: the blocks of every product count
        assert_eq!(tile_for(h100.0, h100.1, 2048, 512, 4, false, None), Tile::Large);
        // grouped rows: always 64-row tiles; forced: as asked where the shared memory allows
        assert_eq!(tile_for(h100.0, h100.1, 8192, 8192, 1, true, None), Tile::Small);
        assert_eq!(tile_for(h100.0, h100.1, 64, 64, 1, false, Some(Tile::Wide)), Tile::Wide);
        // a 99 KiB GPU (sm_86/89): 128x256 does not fit, falls back to 128x128
        assert_eq!(tile_for(84, 99 * 1024, 8192, 8192, 1, false, Some(Tile::Wide)), Tile::Large);
        assert_eq!(tile_for(84, 48 * 1024, 8192, 8192, 1, false, None), Tile::Small);
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
