//! The training pass's matrix products and buffer views.
//!
//! [`Mm`] runs `C (+)= op(A)·op(B)` in the three row-major layouts of [`Layout`] (NT: `x·Wᵀ`,
//! NN: `dY·W`, TN: `dYᵀ·X`), plain, batched with strides, or grouped by expert: in bf16 mode on
//! cuBLAS where it loads (`cublasGemmStridedBatchedEx`: bf16 operands, bf16 or f32 C, f32
//! accumulation; products with a bias epilogue and grouped products without host offsets go to
//! the mma kernels) or, with `DSV3_TRAIN_GEMM=mma`, the mma.sync kernels ([`gemm_mat`]; bf16
//! operands, bf16 or f32 C); in f32 mode through cuBLAS SGEMM (strided batched; grouped products
//! loop over the experts with the row offsets on the host). [`View`] and [`ActView`] are
//! non-owning handles to part of a buffer (an arena's tensor), for launchers that take whole
//! buffers.
use crate::device::{cuda_err, Device};
use crate::ops::gemm::{gemm_mat, Grouped, Layout, MatShape, Operand};
use crate::tensor::{dptr, Act, DType};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};
use std::ops::{Deref, DerefMut};

/// A non-owning [`CudaSlice`] over `len` elements of another buffer (never freed: dropping it
/// only releases the handle). Valid while the viewed buffer lives; everything runs on the one
/// device stream, so the aliasing is ordered.
pub struct View<T>(Option<CudaSlice<T>>);

impl<T> View<T> {
    /// Elements `[off, off + len)` of `s`.
    pub fn of(dev: &Device, s: &CudaSlice<T>, off: usize, len: usize) -> Result<View<T>> {
        if off + len > s.len() {
            return Err(Error::Input(format!("view [{off}, {}) past a buffer of {}", off + len, s.len())));
        }
        let p = dptr(dev, s, off)?;
        // SAFETY: the range lies inside `s` (checked); the handle is released with `leak` (never
        // freed), and the device context does no event tracking (Device::new disables it).
        Ok(View(Some(unsafe { dev.stream.upgrade_device_ptr::<T>(p, len.max(1)) })))
    }
}

impl<T> Deref for View<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        self.0.as_ref().expect("view")
    }
}

impl<T> DerefMut for View<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        self.0.as_mut().expect("view")
    }
}

impl<T> Drop for View<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

/// A non-owning [`Act`] over part of another buffer (see [`View`]).
pub struct ActView(Option<Act>);

impl ActView {
    /// Elements `[off, off + len)` of `a`.
    pub fn of(dev: &Device, a: &Act, off: usize, len: usize) -> Result<ActView> {
        Ok(ActView(Some(match a {
            Act::F32(s) => Act::F32(View::of(dev, s, off, len)?.take()),
            Act::Bf16(s) => Act::Bf16(View::of(dev, s, off, len)?.take()),
        })))
    }
    /// An f32 slice viewed as an activation.
    pub fn f32(dev: &Device, s: &CudaSlice<f32>, off: usize, len: usize) -> Result<ActView> {
        Ok(ActView(Some(Act::F32(View::of(dev, s, off, len)?.take()))))
    }
}

impl<T> View<T> {
    /// The handle itself (the caller must `leak` it, never drop it).
    pub(crate) fn take(mut self) -> CudaSlice<T> {
        self.0.take().expect("view")
    }
}

impl Deref for ActView {
    type Target = Act;
    fn deref(&self) -> &Act {
        self.0.as_ref().expect("view")
    }
}

impl DerefMut for ActView {
    fn deref_mut(&mut self) -> &mut Act {
        self.0.as_mut().expect("view")
    }
}

impl Drop for ActView {
    fn drop(&mut self) {
        match self.0.take() {
            Some(Act::F32(s)) => {
                s.leak();
            }
            Some(Act::Bf16(s)) => {
                s.leak();
            }
            None => {}
        }
    }
}

/// An operand: `buf` from element `off`, rows `ld` apart, batch entries `st` apart.
#[derive(Clone, Copy)]
pub struct Rd<'a> {
    pub buf: &'a Act,
    pub off: usize,
    pub ld: usize,
    pub st: usize,
}

/// The output operand.
pub struct Wr<'a> {
    pub buf: &'a mut Act,
    pub off: usize,
    pub ld: usize,
    pub st: usize,
}

/// Shorthand constructors.
pub fn rd(buf: &Act, off: usize, ld: usize) -> Rd<'_> {
    Rd { buf, off, ld, st: 0 }
}
pub fn wr(buf: &mut Act, off: usize, ld: usize) -> Wr<'_> {
    Wr { buf, off, ld, st: 0 }
}

/// The product's size: `C[m, n]`, summed over `k`, `batch` times.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub acc: bool,
}

pub fn dims(m: usize, n: usize, k: usize) -> Dims {
    Dims { m, n, k, batch: 1, acc: false }
}

impl Dims {
    pub fn acc(self, acc: bool) -> Dims {
        Dims { acc, ..self }
    }
    pub fn batch(self, batch: usize) -> Dims {
        Dims { batch, ..self }
    }
}

/// Expert groups of a grouped product: device offsets, their host copy (f32 mode) and the FP8
/// expert Wgrad's table (`ops::moe_train::plan_token_order`'s `t128`).
pub struct Groups<'a> {
    pub row_offsets: &'a CudaSlice<i32>,
    pub tile_offsets: &'a CudaSlice<i32>,
    pub max_tiles: usize,
    pub host: Option<&'a [i32]>,
    pub t128: Option<&'a CudaSlice<i32>>,
    pub groups: usize,
}

/// The products' engine for one dtype.
pub struct Mm {
    pub dt: DType,
    /// f32 mode: always (pedantic math: the CPU oracle's products); bf16 mode: with
    /// [`train_gemm_cublas`].
    blas: Option<CudaBlas>,
}

/// `DSV3_TRAIN_GEMM` (read once): `mma` keeps the bf16 training products on the mma kernels,
/// `cublas` puts them on cuBLAS; unset (the default), cuBLAS where libcublas loads, else the mma
/// kernels. The H100 measured cuBLAS 2.2-3.5x faster than the mma kernels at every training
/// shape (kernel_bench, 2026-11-24: 8192x512x1408 NT 627 vs 243 TFLOP/s, 2048x32000x512 610 vs
/// 232; docs/PERF.md). Anything else is reported and treated as unset.
pub fn train_gemm_cublas() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| match std::env::var("DSV3_TRAIN_GEMM").as_deref().map(str::trim) {
        Ok("cublas") => true,
        Ok("mma") => false,
        Ok("") | Err(_) => cublas_loadable(),
        Ok(v) => {
            eprintln!("DSV3_TRAIN_GEMM={v}: expected cublas or mma; using the default");
            cublas_loadable()
        }
    })
}

/// Whether libcublas can be loaded.
fn cublas_loadable() -> bool {
    // SAFETY: only tries to dlopen the library
    std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false)
}

/// Opens cuBLAS on the device stream (`what`: the mode that needs it, for the error).
fn open_blas(dev: &Device, what: &str) -> Result<CudaBlas> {
    if !cublas_loadable() {
        return Err(Error::Unsupported(format!("{what} needs cuBLAS (libcublas.so), which could not be loaded")));
    }
    CudaBlas::new(dev.stream.clone()).map_err(|e| cuda_err("cuBLAS handle", e))
}

/// A device operand's address at element `off` and its cuBLAS type.
fn blas_ptr(dev: &Device, a: &Act, off: usize) -> Result<(u64, blas_sys::cudaDataType)> {
    use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
    Ok(match a {
        Act::F32(s) => (dptr(dev, s, off.min(s.len()))?, CUDA_R_32F),
        Act::Bf16(s) => (dptr(dev, s, off.min(s.len()))?, CUDA_R_16BF),
    })
}

/// Stored operand shape `[rows, cols]` of A and B in `l` for `m x n x k`.
fn stored(l: Layout, m: usize, n: usize, k: usize) -> ((usize, usize), (usize, usize)) {
    let a = if l == Layout::TN { (k, m) } else { (m, k) };
    let b = if l == Layout::NT { (n, k) } else { (k, n) };
    (a, b)
}

impl Mm {
    /// bf16 mode: cuBLAS, or the mma kernels ([`train_gemm_cublas`], [`Mm::with_cublas`]); f32
    /// mode opens cuBLAS on the device stream.
    pub fn new(dev: &Device, dt: DType) -> Result<Mm> {
        Mm::with_cublas(dev, dt, train_gemm_cublas())
    }

    /// [`Mm::new`] with the bf16 engine chosen by the caller (`cublas`; f32 mode always uses it).
    pub fn with_cublas(dev: &Device, dt: DType, cublas: bool) -> Result<Mm> {
        let blas = match dt {
            DType::Bf16 if cublas => {
                Some(open_blas(dev, "bf16 training products on cuBLAS (DSV3_TRAIN_GEMM=mma: without)")?)
            }
            DType::Bf16 => None,
            DType::F32 => {
                let b = open_blas(dev, "GPU training in f32 mode")?;
                // no TF32: the f32 mode is the CPU oracle's math
                // SAFETY: a valid handle
                unsafe { blas_sys::cublasSetMathMode(*b.handle(), blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH) }
                    .result()
                    .map_err(|e| cuda_err("cuBLAS math mode", e))?;
                Some(b)
            }
        };
        Ok(Mm { dt, blas })
    }

    /// Whether bf16 products run on cuBLAS (grouped ones too where [`Groups`] has host offsets;
    /// the training pass passes none in bf16 mode, so its experts stay on the mma kernels).
    pub fn bf16_on_cublas(&self) -> bool {
        self.dt == DType::Bf16 && self.blas.is_some()
    }

    /// `C (+)= op(A)·op(B)` (+ `bias` `[n]` on every row: bf16 mode only, f32 mode adds it with
    /// [`Mm::add_bias`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        dev: &Device,
        l: Layout,
        d: Dims,
        a: Rd,
        b: Rd,
        c: Wr,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        if d.m == 0 || d.n == 0 || d.batch == 0 {
            return Ok(());
        }
        match self.dt {
            DType::Bf16 if self.blas.is_some() && bias.is_none() => {
                if d.k == 0 {
                    return Err(Error::Input("train mm: k = 0".into()));
                }
                self.blas_gemm(dev, l, d, a, b, c)
            }
            DType::Bf16 => {
                let s = MatShape {
                    m: d.m,
                    n: d.n,
                    k: d.k,
                    a_off: a.off,
                    lda: a.ld,
                    stride_a: a.st,
                    b_off: b.off,
                    ldb: b.ld,
                    stride_b: b.st,
                    c_off: c.off,
                    ldc: c.ld,
                    stride_c: c.st,
                    batch: d.batch,
                    accumulate: d.acc,
                    bias,
                    grouped: None,
                };
                if d.k == 0 {
                    return Err(Error::Input("train mm: k = 0".into()));
                }
                gemm_mat(dev, l, a.buf, Operand::Act(b.buf), c.buf, &s)
            }
            DType::F32 => {
                if bias.is_some() {
                    return Err(Error::Input("train mm: f32 bias goes through add_bias".into()));
                }
                self.blas_gemm(dev, l, d, a, b, c)
            }
        }
    }

    /// Grouped by expert (`g.groups` groups): NT / NN by rows (`d.m` all rows; group e reads B
    /// at `b.off + e·b.st`), TN by K (`d.k` all rows; group e writes C at `c.off + e·c.st`).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped(&self, dev: &Device, l: Layout, d: Dims, a: Rd, b: Rd, c: Wr, g: &Groups) -> Result<()> {
        let total = if l == Layout::TN { d.k } else { d.m };
        if total == 0 || d.n == 0 || g.groups == 0 {
            return Ok(());
        }
        match self.dt {
            DType::Bf16 if self.blas.is_none() || g.host.is_none() => {
                let s = MatShape {
                    m: d.m,
                    n: d.n,
                    k: d.k,
                    a_off: a.off,
                    lda: a.ld,
                    stride_a: 0,
                    b_off: b.off,
                    ldb: b.ld,
                    stride_b: if l == Layout::TN { 0 } else { b.st },
                    c_off: c.off,
                    ldc: c.ld,
                    stride_c: if l == Layout::TN { c.st } else { 0 },
                    batch: g.groups,
                    accumulate: d.acc,
                    bias: None,
                    grouped: Some(Grouped {
                        row_offsets: g.row_offsets,
                        tile_offsets: g.tile_offsets,
                        max_tiles: g.max_tiles,
                    }),
                };
                gemm_mat(dev, l, a.buf, Operand::Act(b.buf), c.buf, &s)
            }
            // f32 mode, and bf16 on cuBLAS with host offsets: one product per non-empty expert
            _ => {
                let ro =
                    g.host.ok_or_else(|| Error::Input("train mm: f32 grouped product without host offsets".into()))?;
                if ro.len() < g.groups + 1 {
                    return Err(Error::Input("train mm: offsets shorter than groups + 1".into()));
                }
                for e in 0..g.groups {
                    let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
                    if r1 < r0 || r1 > total {
                        return Err(Error::Input(format!("train mm: bad group offsets {r0}..{r1} of {total}")));
                    }
                    let rows = r1 - r0;
                    if l == Layout::TN {
                        if rows == 0 {
                            if !d.acc {
                                self.blas_zero(
                                    dev,
                                    a.buf.dtype(),
                                    d.m,
                                    d.n,
                                    Wr { buf: &mut *c.buf, off: c.off + e * c.st, ld: c.ld, st: 0 },
                                )?;
                            }
                            continue;
                        }
                        let ae = Rd { off: a.off + r0 * a.ld, st: 0, ..a };
                        let be = Rd { off: b.off + r0 * b.ld, st: 0, ..b };
                        let ce = Wr { buf: &mut *c.buf, off: c.off + e * c.st, ld: c.ld, st: 0 };
                        self.blas_gemm(dev, l, Dims { k: rows, batch: 1, ..d }, ae, be, ce)?;
                    } else {
                        if rows == 0 {
                            continue;
                        }
                        let ae = Rd { off: a.off + r0 * a.ld, st: 0, ..a };
                        let be = Rd { off: b.off + e * b.st, st: 0, ..b };
                        let ce = Wr { buf: &mut *c.buf, off: c.off + r0 * c.ld, ld: c.ld, st: 0 };
                        self.blas_gemm(dev, l, Dims { m: rows, batch: 1, ..d }, ae, be, ce)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// f32 mode: `C[m, n] += 1·bias` on every row (a rank-1 product with `ones` `[≥ m]`).
    pub fn add_bias(&self, dev: &Device, ones: &Act, bias: &Act, m: usize, n: usize, c: Wr) -> Result<()> {
        self.blas_gemm(dev, Layout::NN, dims(m, n, 1).acc(true), rd(ones, 0, 1), rd(bias, 0, n), c)
    }

    /// `C = 0` through a product with k = 1 and beta 0 (cuBLAS never reads C then); operands of
    /// dtype `dt`.
    fn blas_zero(&self, dev: &Device, dt: DType, m: usize, n: usize, c: Wr) -> Result<()> {
        let z = Act::zeros(dev, dt, m.max(n))?;
        self.blas_gemm(dev, Layout::NN, dims(m, n, 1), rd(&z, 0, 1), rd(&z, 0, n), c)
    }

    /// cuBLAS `GemmStridedBatchedEx`: row-major `C = X·Y` is column-major `Cᵀ = Yᵀ·Xᵀ`. f32
    /// operands and C: f32 pedantic compute (SGEMM without TF32); bf16 operands, bf16 or f32 C:
    /// f32 compute.
    fn blas_gemm(&self, dev: &Device, l: Layout, d: Dims, a: Rd, b: Rd, c: Wr) -> Result<()> {
        let blas = self.blas.as_ref().ok_or_else(|| Error::Input("train mm: no cuBLAS handle".into()))?;
        if d.m == 0 || d.n == 0 || d.batch == 0 {
            return Ok(());
        }
        let f32_only = matches!((a.buf, b.buf, &*c.buf), (Act::F32(_), Act::F32(_), Act::F32(_)));
        if !f32_only && !matches!((a.buf, b.buf), (Act::Bf16(_), Act::Bf16(_))) {
            return Err(Error::Input("train mm: cuBLAS takes f32 operands and C, or bf16 operands".into()));
        }
        let (ab, bb, cb) = (a.buf.len(), b.buf.len(), c.buf.len());
        let ((ra, ca), (rb, cb_)) = stored(l, d.m, d.n, d.k);
        if a.ld < ca.max(1) || b.ld < cb_.max(1) || c.ld < d.n {
            return Err(Error::Input(format!("train mm {l:?}: lda {}, ldb {}, ldc {} for {d:?}", a.ld, b.ld, c.ld)));
        }
        let last = d.batch - 1;
        let ext = |off: usize, st: usize, rows: usize, ld: usize, cols: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                off + last * st + (rows - 1) * ld + cols
            }
        };
        let chk = |need: usize, len: usize, what: &str| {
            if need > len {
                Err(Error::Input(format!("train mm {l:?} {what}: {need} elements needed, buffer holds {len}")))
            } else {
                Ok(())
            }
        };
        chk(ext(a.off, a.st, ra, a.ld, ca), ab, "A")?;
        chk(ext(b.off, b.st, rb, b.ld, cb_), bb, "B")?;
        chk(ext(c.off, c.st, d.m, c.ld, d.n), cb, "C")?;
        // cuBLAS runs on the thread's current context (the launchers bind it themselves)
        dev.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        // (op of B, op of A) in column-major terms
        let (tb, ta) = match l {
            Layout::NT => (T, N),
            Layout::NN => (N, N),
            Layout::TN => (N, T),
        };
        let i = |v: usize, what: &str| crate::ops::int(v, what);
        let (alpha, beta) = (1.0f32, if d.acc { 1.0f32 } else { 0.0 });
        let (ap, at) = blas_ptr(dev, a.buf, a.off)?;
        let (bp, bt) = blas_ptr(dev, b.buf, b.off)?;
        let (cp, ct) = blas_ptr(dev, c.buf, c.off)?;
        // f32: no TF32 or other reduced-precision paths (the CPU oracle's math); bf16: f32 compute
        let compute = if f32_only {
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        } else {
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let vp = |p: u64| p as *const std::ffi::c_void;
        let mark = crate::profile::start(dev)?;
        // SAFETY: every operand's extent is checked against its buffer above; alpha and beta are
        // f32 as both compute types want; the handle runs on the device stream.
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas.handle(),
                tb,
                ta,
                i(d.n, "n")?,
                i(d.m, "m")?,
                i(d.k, "k")?,
                &alpha as *const f32 as *const std::ffi::c_void,
                vp(bp),
                bt,
                i(b.ld, "ldb")?,
                b.st as i64,
                vp(ap),
                at,
                i(a.ld, "lda")?,
                a.st as i64,
                &beta as *const f32 as *const std::ffi::c_void,
                cp as *mut std::ffi::c_void,
                ct,
                i(c.ld, "ldc")?,
                c.st as i64,
                i(d.batch, "batch")?,
                compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS GemmStridedBatchedEx", e))?;
        crate::profile::finish(dev, mark, || {
            let ty = if f32_only { "f32" } else { "bf16" };
            let batch = if d.batch > 1 { format!("x{}", d.batch) } else { String::new() };
            format!("cublas {ty} {l:?} {}x{}x{}{batch}{}", d.m, d.n, d.k, if d.acc { " +=" } else { "" }).into()
        })
    }
}

/// `dst = src` (same dtype and length at least `n`).
pub fn copy(dev: &Device, src: &Act, dst: &mut Act, n: usize) -> Result<()> {
    src.check(n, "copy src")?;
    dst.check(n, "copy dst")?;
    fn cp<T: DeviceRepr>(dev: &Device, s: &CudaSlice<T>, d: &mut CudaSlice<T>, n: usize) -> Result<()> {
        dev.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n)).map_err(|e| cuda_err("copy", e))
    }
    match (src, dst) {
        (Act::F32(s), Act::F32(d)) => cp(dev, s, d, n),
        (Act::Bf16(s), Act::Bf16(d)) => cp(dev, s, d, n),
        _ => Err(Error::Input("copy: dtypes differ".into())),
    }
}

/// The f32 slice of an f32 buffer.
pub fn f32_of(a: &Act) -> Result<&CudaSlice<f32>> {
    match a {
        Act::F32(s) => Ok(s),
        Act::Bf16(_) => Err(Error::Input("expected an f32 buffer".into())),
    }
}

/// The f32 slice of an f32 buffer, mutably.
pub fn f32_of_mut(a: &mut Act) -> Result<&mut CudaSlice<f32>> {
    match a {
        Act::F32(s) => Ok(s),
        Act::Bf16(_) => Err(Error::Input("expected an f32 buffer".into())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stored_operand_shapes_per_layout() {
        use super::{stored, Layout};
        assert_eq!(stored(Layout::NT, 2, 3, 4), ((2, 4), (3, 4)));
        assert_eq!(stored(Layout::NN, 2, 3, 4), ((2, 4), (4, 3)));
        assert_eq!(stored(Layout::TN, 2, 3, 4), ((4, 2), (4, 3)));
    }
}
