//! The FP8 GEMM `C[m,n] = Σ_k A[m,k]·B[n,k]`, both operands FP8 along K with 1x128 (per row)
//! or 128x128 (block) scales, emulated exactly: per 128-wide K group, products of the FP8 values
//! summed in f32, then `C += (sa·sb)·partial` into an f32 accumulator (DeepGEMM's promotion).
use crate::error::{ierr, Result};
use crate::fp8::quant::{QTensor, ScaleLayout};
use crate::ops::gemm::matmul_t;
use alloc::borrow::Cow;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

const T: usize = 128;

/// `C[M, N]` (f32) from `a` (`[M, K]`, 1x128 tiles) and `b` (`[N, K]`, 1x128 tiles or 128x128
/// blocks), with promotion every 128 K. `accumulate`: add into `c` instead of overwriting.
pub fn fp8_gemm(a: &QTensor, b: &QTensor, c: &mut [f32], accumulate: bool) -> Result<()> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    if b.cols != k {
        return Err(ierr(format!("fp8_gemm: K mismatch ({} vs {})", a.cols, b.cols)));
    }
    if a.layout != ScaleLayout::Tile1x128 || b.layout == ScaleLayout::Tile128x1 {
        return Err(ierr("fp8_gemm: A needs 1x128 tiles and B 1x128 tiles or 128x128 blocks along K"));
    }
    if c.len() != m * n {
        return Err(ierr(format!("fp8_gemm: output has {} values, want {m}x{n}", c.len())));
    }
    if !accumulate {
        c.fill(0.0);
    }
    let af: Vec<f32> = a.codes.iter().map(|&q| a.format.decode(q)).collect();
    let bf: Vec<f32> = b.codes.iter().map(|&q| b.format.decode(q)).collect();
    let mut part = vec![0f32; m * n];
    for kb in 0..k.div_ceil(T) {
        let (k0, kw) = (kb * T, T.min(k - kb * T));
        // exact products of FP8 values, summed in f32 over this K group
        matmul_t(m, n, kw, &af[k0..], k, &bf[k0..], k, &mut part, n, false);
        for i in 0..m {
            let sa = a.scale_at(i, k0);
            let row = &mut c[i * n..(i + 1) * n];
            for (j, (cv, &pv)) in row.iter_mut().zip(&part[i * n..(i + 1) * n]).enumerate() {
                *cv += sa * b.scale_at(j, k0) * pv;
            }
        }
    }
    Ok(())
}

/// The promoted FP8 GEMM on pre-quantized values, any strides: `C[m,n] (+)= Σ_kb
/// sa(kb)[i]·sb(kb)[j]·Σ_{k∈kb} A[i,k]·B[j,k]`, where `A[i,k] = a[i·a_rs + k·a_cs]`,
/// `B[j,k] = b[j·b_rs + k·b_cs]`, and `sa(kb)` / `sb(kb)` give the per-row / per-column scales
/// of K group `kb`. The training path uses it for Fprop, Dgrad and (reading both operands along
/// the token axis) Wgrad without transposing anything.
#[allow(clippy::too_many_arguments)]
pub fn promoted_gemm<'s>(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    sa: impl Fn(usize) -> Cow<'s, [f32]>,
    sb: impl Fn(usize) -> Cow<'s, [f32]>,
    c: &mut [f32],
    accumulate: bool,
) {
    if !accumulate {
        c[..m * n].fill(0.0);
    }
    let mut part = vec![0f32; m * n];
    for kb in 0..k.div_ceil(T) {
        let (k0, kw) = (kb * T, T.min(k - kb * T));
        // B as a [k, n] operand: B[j,k] at k·b_cs + j·b_rs
        crate::ops::gemm::matmul_strided(
            m,
            n,
            kw,
            &a[k0 * a_cs..],
            a_rs,
            a_cs,
            &b[k0 * b_cs..],
            b_cs,
            b_rs,
            &mut part,
            n,
            false,
        );
        let (sa, sb) = (sa(kb), sb(kb));
        for i in 0..m {
            let s = sa[i];
            for ((cv, &pv), &t) in c[i * n..(i + 1) * n].iter_mut().zip(&part[i * n..(i + 1) * n]).zip(sb.iter()) {
                *cv += s * t * pv;
            }
        }
    }
}

/// The same product without promotion, through an emulated Hopper FP8 tensor-core accumulator:
/// every 32 products are aligned to the largest exponent among them and the running sum, and only
/// the top `bits` bits are kept (V3 §3.5.2: ~14). Scales must be uniform per operand (per-tensor);
/// they are applied once at the end. For tests; scalar and slow.
pub fn fp8_gemm_limited_accumulator(a: &QTensor, b: &QTensor, bits: u32) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for g in (0..k).step_by(32) {
                let prods: Vec<f64> = (g..(g + 32).min(k))
                    .map(|p| a.format.decode(a.codes[i * k + p]) as f64 * b.format.decode(b.codes[j * k + p]) as f64)
                    .collect();
                let emax = prods.iter().chain(core::iter::once(&acc)).fold(f64::MIN, |e, v| {
                    if *v == 0.0 {
                        e
                    } else {
                        e.max(libm::floor(libm::log2(libm::fabs(*v))))
                    }
                });
                if emax == f64::MIN {
                    continue;
                }
                let ulp = libm::exp2(emax - (bits as f64 - 1.0));
                let trunc = |v: f64| libm::trunc(v / ulp) * ulp;
                acc = trunc(acc) + prods.iter().map(|&p| trunc(p)).sum::<f64>();
            }
            c[i * n + j] = (acc * a.scale_at(i, 0) as f64 * b.scale_at(j, 0) as f64) as f32;
        }
    }
    c
}

/// DeepGEMM's agreement measure `1 − 2·Σxy / Σ(x² + y²)` (0 = identical).
pub fn calc_diff(x: &[f32], y: &[f64]) -> f64 {
    let (mut xy, mut sq) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(y) {
        xy += a as f64 * b;
        sq += (a as f64) * (a as f64) + b * b;
    }
    1.0 - 2.0 * xy / sq
}
