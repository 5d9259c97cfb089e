//! Matrix products on CPU: `C[m,n] (+)= A[m,k] · B[n,k]ᵀ`.
//!
//! Both operands are row-major along k, which is how activations (`[tokens, in]`) and
//! checkpoint weights (`[out, in]`) are laid out, so every output is a dot product of two
//! contiguous rows. The micro-kernel computes a 2x4 block of outputs with AVX2+FMA when the
//! CPU has it (detected at run time under `std`, at compile time otherwise) and a portable
//! 8-lane kernel otherwise. Large products are split over columns on the rayon pool.
//! From 32 rows on (prefill), the packed GEMM of the `gemm` crate takes over. The split is
//! measured in `benches/gemm.rs` against `gemm` and `matrixmultiply` (docs/PERF.md): the dot
//! kernel wins at 1 and 8 rows, the packed crate at 256.

/// `c[i*ldc + j] (+)= Σ_p a[i*lda + p] · b[j*ldb + p]` for i < m, j < n.
///
/// Shapes: `a` [m, k] (row stride `lda`), `b` [n, k] (row stride `ldb`), `c` [m, n] (row stride `ldc`).
/// With `accumulate` false, `c` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && ldb >= k && ldc >= n, "matmul_t: strides smaller than the rows");
    assert!(a.len() >= (m - 1) * lda + k, "matmul_t: a too short");
    assert!(b.len() >= (n - 1) * ldb + k, "matmul_t: b too short");
    assert!(c.len() >= (m - 1) * ldc + n, "matmul_t: c too short");
    #[cfg(feature = "std")]
    {
        let work = m * n * k;
        let threads = gemm_threads();
        if m >= LARGE_M {
            // packed GEMM (the `gemm` crate) wins for many rows: benches/gemm.rs. B[n,k] is read
            // as a [k, n] operand through its strides.
            return matmul_strided(m, n, k, a, lda, 1, b, 1, ldb, c, ldc, accumulate);
        }
        if threads > 1 && work >= PARALLEL_MIN_WORK && n >= 8 {
            return par_cols(m, n, k, a, lda, b, ldb, c, ldc, accumulate, threads);
        }
    }
    // SAFETY: the bounds were checked above; the kernel stays inside them.
    unsafe { kernel_dispatch(m, n, k, a.as_ptr(), lda, b.as_ptr(), ldb, c.as_mut_ptr(), ldc, accumulate) }
}

/// Rows from which the packed `gemm` crate beats the dot-product kernel (benches/gemm.rs).
#[cfg(feature = "std")]
const LARGE_M: usize = 32;

/// Threads a product may use: all of the pool from outside it, one from inside a pool task
/// (the caller already parallelizes, e.g. the trainer's data-parallel shards).
#[cfg(feature = "std")]
fn gemm_threads() -> usize {
    if rayon::current_thread_index().is_some() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Multiply-adds below which a product runs on one thread (a rayon fork costs a few µs).
#[cfg(feature = "std")]
const PARALLEL_MIN_WORK: usize = 1 << 20;

#[cfg(feature = "std")]
#[allow(clippy::too_many_arguments)]
fn par_cols(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
    threads: usize,
) {
    use rayon::prelude::*;
    // Split the columns (rows of b) into chunks that are multiples of 4; each task writes a
    // disjoint column range of c, so raw pointers are shared (Send wrapper below).
    let chunks = (threads * 4).min(n.div_ceil(4));
    let per = n.div_ceil(chunks).next_multiple_of(4);
    let cp = SendPtr(c.as_mut_ptr());
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
        let j0 = t * per;
        let nn = per.min(n - j0);
        let cp = &cp;
        // SAFETY: column ranges [j0, j0+nn) are disjoint between tasks; bounds checked by the caller.
        unsafe { kernel_dispatch(m, nn, k, a.as_ptr(), lda, b.as_ptr().add(j0 * ldb), ldb, cp.0.add(j0), ldc, acc) }
    });
}

#[cfg(feature = "std")]
struct SendPtr(*mut f32);
#[cfg(feature = "std")]
unsafe impl Sync for SendPtr {}
#[cfg(feature = "std")]
unsafe impl Send for SendPtr {}

/// General strided product `C (+)= A · B`: `A[i,p] = a[i*a_rs + p*a_cs]`, `B[p,j] = b[p*b_rs + j*b_cs]`,
/// `C[i,j] = c[i*c_rs + j]`, shapes `[m,k]·[k,n] → [m,n]`. Used by the backward passes
/// (`dx = dy·W`, `dW += dyᵀ·x`), where one operand is read transposed.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, cc: usize| {
        if r == 0 || cc == 0 {
            0
        } else {
            (r - 1) * rs + (cc - 1) * cs + 1
        }
    };
    assert!(a.len() >= last(a_rs, a_cs, m, k), "matmul_strided: a too short");
    assert!(b.len() >= last(b_rs, b_cs, k, n), "matmul_strided: b too short");
    assert!(c.len() >= last(c_rs, 1, m, n) && c_rs >= n, "matmul_strided: c too short");
    if k == 0 {
        if !accumulate {
            c.chunks_mut(c_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    #[cfg(feature = "std")]
    {
        let threads = gemm_threads();
        let par = if threads > 1 && m * n * k >= PARALLEL_MIN_WORK {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: bounds checked above.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                c_rs as isize,
                accumulate,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
    #[cfg(not(feature = "std"))]
    {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for p in 0..k {
                    s += a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
                }
                let d = &mut c[i * c_rs + j];
                *d = if accumulate { *d + s } else { s };
            }
        }
    }
}

/// `c[m,n] (+)= a[m,k] · b[k,n]`, all row-major contiguous.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    matmul_strided(m, n, k, a, k, 1, b, n, 1, c, n, accumulate)
}

/// `c[m,n] (+)= a[k,m]ᵀ · b[k,n]`, all row-major contiguous (weight gradients: `dW += dyᵀ·x`).
pub fn matmul_tn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    matmul_strided(m, n, k, a, 1, m, b, n, 1, c, n, accumulate)
}

/// Dot product of two equal-length slices (uses the same kernels as [`matmul_t`]).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut c = [0f32];
    // SAFETY: m = n = 1 over slices of length k.
    unsafe { kernel_dispatch(1, 1, a.len(), a.as_ptr(), a.len(), b.as_ptr(), b.len(), c.as_mut_ptr(), 1, false) };
    c[0]
}

#[allow(clippy::too_many_arguments)]
unsafe fn kernel_dispatch(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            return avx2::kernel(m, n, k, a, lda, b, ldb, c, ldc, acc);
        }
    }
    portable::kernel(m, n, k, a, lda, b, ldb, c, ldc, acc)
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
pub(crate) fn has_avx2_fma() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static CACHE: AtomicU8 = AtomicU8::new(0);
    match CACHE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            CACHE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
pub(crate) fn has_avx2_fma() -> bool {
    cfg!(all(target_feature = "avx2", target_feature = "fma"))
}

/// Drives a micro-kernel over 2x4 output blocks with edge blocks of 1 row / 1 column.
macro_rules! block_driver {
    () => {
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn kernel(
            m: usize,
            n: usize,
            k: usize,
            a: *const f32,
            lda: usize,
            b: *const f32,
            ldb: usize,
            c: *mut f32,
            ldc: usize,
            acc: bool,
        ) {
            let mut i = 0;
            while i < m {
                let mr = if m - i >= 2 { 2 } else { 1 };
                let mut j = 0;
                while j < n {
                    let nr = if n - j >= 4 { 4 } else { 1 };
                    let ap = a.add(i * lda);
                    let bp = b.add(j * ldb);
                    let cp = c.add(i * ldc + j);
                    match (mr, nr) {
                        (2, 4) => block::<2, 4>(k, ap, lda, bp, ldb, cp, ldc, acc),
                        (1, 4) => block::<1, 4>(k, ap, lda, bp, ldb, cp, ldc, acc),
                        (2, _) => block::<2, 1>(k, ap, lda, bp, ldb, cp, ldc, acc),
                        _ => block::<1, 1>(k, ap, lda, bp, ldb, cp, ldc, acc),
                    }
                    j += nr;
                }
                i += mr;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    block_driver!();

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MR: usize, const NR: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        let mut s = [[_mm256_setzero_ps(); NR]; MR];
        let k8 = k & !7;
        let mut p = 0;
        while p < k8 {
            let mut bv = [_mm256_setzero_ps(); NR];
            for (jj, v) in bv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(b.add(jj * ldb + p));
            }
            for (ii, row) in s.iter_mut().enumerate() {
                let av = _mm256_loadu_ps(a.add(ii * lda + p));
                for (jj, sv) in row.iter_mut().enumerate() {
                    *sv = _mm256_fmadd_ps(av, bv[jj], *sv);
                }
            }
            p += 8;
        }
        for (ii, row) in s.iter().enumerate() {
            for (jj, sv) in row.iter().enumerate() {
                let mut t = hsum(*sv);
                for q in k8..k {
                    t += *a.add(ii * lda + q) * *b.add(jj * ldb + q);
                }
                let d = c.add(ii * ldc + jj);
                *d = if acc { *d + t } else { t };
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

mod portable {
    block_driver!();

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MR: usize, const NR: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        let mut s = [[[0f32; 8]; NR]; MR];
        let k8 = k & !7;
        let mut p = 0;
        while p < k8 {
            for (ii, row) in s.iter_mut().enumerate() {
                for (jj, sv) in row.iter_mut().enumerate() {
                    for (l, x) in sv.iter_mut().enumerate() {
                        *x += *a.add(ii * lda + p + l) * *b.add(jj * ldb + p + l);
                    }
                }
            }
            p += 8;
        }
        for (ii, row) in s.iter().enumerate() {
            for (jj, sv) in row.iter().enumerate() {
                let mut t = ((sv[0] + sv[4]) + (sv[1] + sv[5])) + ((sv[2] + sv[6]) + (sv[3] + sv[7]));
                for q in k8..k {
                    t += *a.add(ii * lda + q) * *b.add(jj * ldb + q);
                }
                let d = c.add(ii * ldc + jj);
                *d = if acc { *d + t } else { t };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[j * k + p] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn nn_and_tn_products() {
        let mut rng = crate::rng::Rng::new(9);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (40, 9, 33), (2, 70, 3)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let mut c = vec![f32::NAN; m * n];
            matmul_nn(m, n, k, &a, &b, &mut c, false);
            // aᵀ stored [k, m]
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let mut c2 = vec![1.0f32; m * n];
            matmul_tn(m, n, k, &at, &b, &mut c2, true);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                    assert!((c[i * n + j] - want).abs() < 1e-4, "nn {m}x{n}x{k}");
                    assert!((c2[i * n + j] - 1.0 - want).abs() < 1e-4, "tn {m}x{n}x{k}");
                }
            }
        }
    }

    #[test]
    fn strided_operands_on_both_paths() {
        // a [m, k] inside rows of 13, b [n, k] inside rows of 11, c [m, n] inside rows of 9 + offset
        let (n, k, lda, ldb, ldc) = (5, 7, 13, 11, 9);
        let mut rng = crate::rng::Rng::new(3);
        for m in [3usize, 40] {
            let a: Vec<f32> = (0..m * lda).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n * ldb).map(|_| rng.normal()).collect();
            let mut c = vec![f32::NAN; m * ldc];
            matmul_t(m, n, k, &a, lda, &b, ldb, &mut c[2..], ldc, false);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| a[i * lda + p] * b[j * ldb + p]).sum();
                    assert!((c[2 + i * ldc + j] - want).abs() < 1e-4, "m={m} ({i},{j})");
                }
                // untouched padding stays NaN
                if i + 1 < m {
                    assert!(c[2 + i * ldc + n].is_nan());
                }
            }
        }
    }

    #[test]
    fn matches_naive_on_ragged_shapes() {
        let mut rng = crate::rng::Rng::new(7);
        for &(m, n, k) in &[(1, 1, 1), (1, 5, 3), (3, 7, 9), (2, 4, 8), (5, 13, 37), (17, 33, 130), (64, 200, 300)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let want = naive(m, n, k, &a, &b);
            let close =
                |c: &[f32], f: f32| c.iter().zip(&want).all(|(x, y)| (x - f * y).abs() <= 1e-4 * f * (1.0 + y.abs()));
            let mut c = vec![f32::NAN; m * n];
            matmul_t(m, n, k, &a, k, &b, k, &mut c, n, false);
            assert!(close(&c, 1.0), "{m}x{n}x{k}");
            // accumulate adds on top
            matmul_t(m, n, k, &a, k, &b, k, &mut c, n, true);
            assert!(close(&c, 2.0), "{m}x{n}x{k} accumulate");
            // the dot kernels agree for every m (the packed path takes m >= 32 in matmul_t)
            type Kernel = unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, *mut f32, usize, bool);
            for kernel in [kernel_dispatch as Kernel, portable::kernel as Kernel] {
                let mut c = vec![f32::NAN; m * n];
                unsafe { kernel(m, n, k, a.as_ptr(), k, b.as_ptr(), k, c.as_mut_ptr(), n, false) };
                assert!(close(&c, 1.0), "{m}x{n}x{k} dot kernel");
            }
        }
    }
}
