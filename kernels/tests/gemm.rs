//! GEMMs against a CPU reference: f32 (1e-5 relative), bf16 tensor cores (inputs rounded to bf16,
//! f32 accumulation: the only extra error is the bf16 output rounding), FP8 weights with
//! 128x128 block scales (DeepSeek's per-128-K promotion), batched with strides, grouped by rows
//! with empty and ragged groups, bias and accumulate. Ragged shapes (not multiples of the tiles).
//! The bf16 mma kernels also in the NN (`dX = dY·W`) and TN (`dW = dYᵀ·X`) layouts: both tiles,
//! batched with strides, grouped by expert (rows for NN, K for TN), the model's shapes.
mod common;
use common::*;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::gemm::{
    gemm, gemm_mat, gemm_mat_with, gemm_nn, gemm_tn, gemm_via, GemmPath, GemmShape, Grouped, Layout, MatShape, Operand,
    Tile, GEMM_BM,
};
use dsv3_kernels::tensor::upload;
use dsv3_kernels::{Act, DType, DWeight};

/// `C[m, n] = A[m, k] · W[n, k]ᵀ` in f64 (the reference).
fn matmul_ref(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|x| a[i * k + x] as f64 * w[j * k + x] as f64).sum::<f64>() as f32;
        }
    }
    c
}

/// Relative error bound of a k-long f32 dot product of random normals, scaled by `|row|·|col|`.
fn check(got: &[f32], want: &[f32], k: usize, rtol: f32, what: &str) {
    let scale = (k as f32).sqrt();
    assert_close(got, want, rtol * scale, rtol, what);
}

const SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 1), (7, 33, 45), (65, 130, 257), (64, 64, 128), (3, 200, 1000), (1, 37, 8), (70, 21, 264), (1, 4100, 264)];

/// The kernel families to check for a K: tiled always, skinny where K allows it (any row count:
/// row tiles of 8 with a ragged last one), the one-row skinny form for single rows.
fn paths_for(m: usize, k: usize, w: DType) -> Vec<GemmPath> {
    match (k.is_multiple_of(8), m, w) {
        (false, _, _) => vec![GemmPath::Tiled],
        (true, 1, DType::Bf16) => vec![GemmPath::Tiled, GemmPath::Skinny, GemmPath::SkinnyRow],
        (true, _, _) => vec![GemmPath::Tiled, GemmPath::Skinny],
    }
}

fn paths(k: usize) -> Vec<GemmPath> {
    paths_for(2, k, DType::F32)
}

#[test]
fn f32_and_bf16_gemms_match_the_reference() {
    let Some(dev) = device("f32_and_bf16_gemms_match_the_reference") else { return };
    let mut rng = Rng::new(10);
    for (m, n, k) in SHAPES {
        let a = randn(&mut rng, m * k);
        let w = randn(&mut rng, n * k);
        let bias = randn(&mut rng, n);
        let prev = randn(&mut rng, m * n);
        for (dt, out_dt, rtol) in
            [(DType::F32, DType::F32, 1e-5), (DType::Bf16, DType::Bf16, BF16_RTOL), (DType::Bf16, DType::F32, 1e-5)]
        {
            let (ar, wr) = if dt == DType::Bf16 { (bf16r(&a), bf16r(&w)) } else { (a.clone(), w.clone()) };
            let mut want = matmul_ref(&ar, &wr, m, n, k);
            let aa = Act::from_f32(&dev, dt, &a).unwrap();
            let ww = DWeight::from_f32(&dev, dt, 1, n, k, &w).unwrap();
            for path in paths_for(m, k, dt) {
                let mut c = poisoned(&dev, out_dt, m * n);
                gemm_via(&dev, &aa, &ww, &mut c, &GemmShape::plain(m, k, n), path).unwrap();
                check(
                    &c.to_f32(&dev).unwrap(),
                    &want,
                    k,
                    rtol,
                    &format!("gemm {path:?} {dt:?}->{out_dt:?} {m}x{n}x{k}"),
                );
            }
            // accumulate + bias: C = prev + A·Wᵀ + b
            let prev_r = if out_dt == DType::Bf16 { bf16r(&prev) } else { prev.clone() };
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += prev_r[i * n + j] + bias[j];
                }
            }
            let b = upload(&dev, &bias).unwrap();
            let s = GemmShape { accumulate: true, bias: Some(&b), ..GemmShape::plain(m, k, n) };
            for path in paths_for(m, k, dt) {
                let mut c = Act::from_f32(&dev, out_dt, &prev).unwrap();
                gemm_via(&dev, &aa, &ww, &mut c, &s, path).unwrap();
                check(&c.to_f32(&dev).unwrap(), &want, k, rtol, &format!("gemm {path:?} accumulate + bias"));
            }
        }
    }
}

#[test]
fn batched_gemm_with_head_strides_matches() {
    let Some(dev) = device("batched_gemm_with_head_strides_matches") else { return };
    // MLA's absorption: q [N, H·dq], head h's first dn values times W_UK_h [C, dn] -> [N, H·C]
    let mut rng = Rng::new(11);
    for n in [9usize, 1] {
        let (h, dn, dq, c) = (5usize, 24usize, 40usize, 70usize);
        let q = randn(&mut rng, n * h * dq);
        let w = randn(&mut rng, h * c * dn);
        for (dt, rtol) in [(DType::F32, 1e-5), (DType::Bf16, BF16_RTOL)] {
            let (qr, wr) = if dt == DType::Bf16 { (bf16r(&q), bf16r(&w)) } else { (q.clone(), w.clone()) };
            let mut want = vec![0f32; n * h * c];
            for hh in 0..h {
                let a: Vec<f32> =
                    (0..n).flat_map(|r| qr[r * h * dq + hh * dq..r * h * dq + hh * dq + dn].to_vec()).collect();
                let o = matmul_ref(&a, &wr[hh * c * dn..(hh + 1) * c * dn], n, c, dn);
                for r in 0..n {
                    want[r * h * c + hh * c..r * h * c + (hh + 1) * c].copy_from_slice(&o[r * c..(r + 1) * c]);
                }
            }
            let s = GemmShape {
                lda: h * dq,
                stride_a: dq,
                ldc: h * c,
                stride_c: c,
                batch: h,
                ..GemmShape::plain(n, dn, c)
            };
            let (qa, wa) = (Act::from_f32(&dev, dt, &q).unwrap(), DWeight::from_f32(&dev, dt, h, c, dn, &w).unwrap());
            for path in paths_for(n, dn, dt) {
                let mut out = poisoned(&dev, dt, n * h * c);
                gemm_via(&dev, &qa, &wa, &mut out, &s, path).unwrap();
                check(&out.to_f32(&dev).unwrap(), &want, dn, rtol, &format!("batched {path:?} {dt:?}"));
            }
        }
    }
}

#[test]
fn fp8_block_scaled_gemm_matches_dequantized_reference() {
    let Some(dev) = device("fp8_block_scaled_gemm_matches_dequantized_reference") else { return };
    let mut rng = Rng::new(12);
    for (m, n, k) in
        [(1usize, 1usize, 1usize), (5, 130, 300), (70, 256, 512), (2, 7168 / 8, 2048), (9, 200, 384), (1, 300, 256)]
    {
        let a = randn(&mut rng, m * k);
        let (q, s, dense) = fp8_weight(&mut rng, 1, n, k);
        let want = matmul_ref(&bf16r(&a), &dense, m, n, k);
        let w = DWeight::from_fp8(&dev, 1, n, k, &q, &s).unwrap();
        let aa = Act::from_f32(&dev, DType::Bf16, &a).unwrap();
        for out_dt in [DType::F32, DType::Bf16] {
            // values are ~1e-2·448·sqrt(k): compare relative to the output scale
            let amax = want.iter().fold(0f32, |x, v| x.max(v.abs())).max(1e-6);
            let rtol = if out_dt == DType::F32 { 1e-5 } else { BF16_RTOL };
            for path in paths_for(m, k, DType::Bf16) {
                let mut c = poisoned(&dev, out_dt, m * n);
                gemm_via(&dev, &aa, &w, &mut c, &GemmShape::plain(m, k, n), path).unwrap();
                let what = format!("fp8 {path:?} {m}x{n}x{k} -> {out_dt:?}");
                assert_close(&c.to_f32(&dev).unwrap(), &want, rtol * amax, rtol, &what);
            }
        }
    }
}

#[test]
fn grouped_gemm_over_ragged_expert_rows_matches() {
    let Some(dev) = device("grouped_gemm_over_ragged_expert_rows_matches") else { return };
    let mut rng = Rng::new(13);
    let (n, k) = (96usize, 72usize);
    // 6 experts: empty, 1 row, a full tile, a tile + 1, empty, 3 rows
    let counts = [0usize, 1, GEMM_BM, GEMM_BM + 1, 0, 3];
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let mut ro = vec![0i32];
    let mut to = vec![0i32];
    for &c in &counts {
        ro.push(ro.last().unwrap() + c as i32);
        to.push(to.last().unwrap() + c.div_ceil(GEMM_BM) as i32);
    }
    let a = randn(&mut rng, rows * k);
    let w = randn(&mut rng, g * n * k);
    let (q, s, dense) = fp8_weight(&mut rng, g, n, k);
    let ro_d = upload(&dev, &ro).unwrap();
    let to_d = upload(&dev, &to).unwrap();
    for (dt, fp8) in [(DType::F32, false), (DType::Bf16, false), (DType::Bf16, true)] {
        let (ar, wr) = match (dt, fp8) {
            (DType::F32, _) => (a.clone(), w.clone()),
            (_, false) => (bf16r(&a), bf16r(&w)),
            (_, true) => (bf16r(&a), dense.clone()),
        };
        let mut want = vec![0f32; rows * n];
        for e in 0..g {
            let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
            let o = matmul_ref(&ar[r0 * k..r1 * k], &wr[e * n * k..(e + 1) * n * k], r1 - r0, n, k);
            want[r0 * n..r1 * n].copy_from_slice(&o);
        }
        let ww = if fp8 {
            DWeight::from_fp8(&dev, g, n, k, &q, &s).unwrap()
        } else {
            DWeight::from_f32(&dev, dt, g, n, k, &w).unwrap()
        };
        let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
        let sh = GemmShape { grouped: Some(grouped), ..GemmShape::plain(rows, k, n) };
        let aa = Act::from_f32(&dev, dt, &a).unwrap();
        let amax = want.iter().fold(0f32, |x, v| x.max(v.abs()));
        for path in paths(k) {
            let mut c = poisoned(&dev, DType::F32, rows * n);
            gemm_via(&dev, &aa, &ww, &mut c, &sh, path).unwrap();
            let what = format!("grouped {path:?} {dt:?} fp8={fp8}");
            assert_close(&c.to_f32(&dev).unwrap(), &want, 1e-5 * amax, 1e-5, &what);
        }
    }
}

#[test]
fn gemm_rejects_mismatched_dtypes_and_short_buffers() {
    let Some(dev) = device("gemm_rejects_mismatched_dtypes_and_short_buffers") else { return };
    let a = Act::from_f32(&dev, DType::F32, &[1.0; 12]).unwrap();
    let w = DWeight::from_f32(&dev, DType::Bf16, 1, 3, 4, &[1.0; 12]).unwrap();
    let mut c = poisoned(&dev, DType::F32, 9);
    assert!(gemm(&dev, &a, &w, &mut c, &GemmShape::plain(3, 4, 3)).is_err(), "f32 A with bf16 W");
    let w = DWeight::from_f32(&dev, DType::F32, 1, 3, 4, &[1.0; 12]).unwrap();
    let mut short = poisoned(&dev, DType::F32, 8);
    assert!(gemm(&dev, &a, &w, &mut short, &GemmShape::plain(3, 4, 3)).is_err(), "C too small");
}

#[test]
fn bf16_activations_times_f32_weights_run_skinny_only() {
    let Some(dev) = device("bf16_activations_times_f32_weights_run_skinny_only") else { return };
    let mut rng = Rng::new(14);
    for (m, n, k) in [(1usize, 16usize, 512usize), (5, 37, 64), (64, 9, 8)] {
        let a = randn(&mut rng, m * k);
        let w = randn(&mut rng, n * k);
        let want = matmul_ref(&bf16r(&a), &w, m, n, k);
        let aa = Act::from_f32(&dev, DType::Bf16, &a).unwrap();
        let ww = DWeight::from_f32(&dev, DType::F32, 1, n, k, &w).unwrap();
        for path in paths_for(m, k, DType::F32).into_iter().filter(|p| *p != GemmPath::Tiled) {
            let mut c = poisoned(&dev, DType::F32, m * n);
            gemm_via(&dev, &aa, &ww, &mut c, &GemmShape::plain(m, k, n), path).unwrap();
            check(&c.to_f32(&dev).unwrap(), &want, k, 1e-5, &format!("bf16 x f32 {path:?} {m}x{n}x{k}"));
        }
        let mut c = poisoned(&dev, DType::F32, m * n);
        let tiled = gemm_via(&dev, &aa, &ww, &mut c, &GemmShape::plain(m, k, n), GemmPath::Tiled);
        assert!(tiled.is_err(), "the tiled kernels have no bf16 x f32 form");
    }
}

// ---- the skinny kernels' fused forms: SwiGLU epilogue, gathered A rows, folded RMSNorm

/// `C = A · Wᵀ` in f64 and, per element, `Σ |a·w|` (the scale of an f32 summation's error).
fn matmul_abs(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut s) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for x in 0..k {
                let p = a[i * k + x] as f64 * w[j * k + x] as f64;
                c[i * n + j] += p;
                s[i * n + j] += p.abs();
            }
        }
    }
    (c, s)
}

/// Rows `x` (`[rows, k]`) RMS-normalized in f64: `x · rsqrt(mean(x²) + eps) · g`.
fn rmsnorm_ref(x: &[f32], g: &[f32], eps: f32, k: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|r| {
            let inv = 1.0 / (r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64 + eps as f64).sqrt();
            r.iter().zip(g).map(move |(&v, &gv)| (v as f64 * inv * gv as f64) as f32).collect::<Vec<_>>()
        })
        .collect()
}

/// Relative rounding of an output of `dt` (bf16: 2^-9, with a 2x margin).
fn out_rounding(dt: DType) -> f64 {
    if dt == DType::Bf16 {
        1.0 / 256.0
    } else {
        1e-6
    }
}

/// `got ≈ want` within the f32 summation bound `1e-5 · Σ|a·w|` plus the output rounding.
fn assert_gemm_close(got: &[f32], want: &[f64], sabs: &[f64], dt: DType, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(sabs).enumerate() {
        let tol = 1e-5 * s + out_rounding(dt) * w.abs() + 1e-30;
        assert!(!g.is_nan() && (g as f64 - w).abs() <= tol, "{what}: element {i}: got {g}, want {w} (tol {tol:.3e})");
    }
}

/// `got[r, j] ≈ silu(g) · u` for `g = gu[r, j]`, `u = gu[r, I + j]` (`[m, 2I]`, f64, with their
/// `Σ|a·w|`): the bound carries the errors of g and u (f32 sums, rounding to the output dtype)
/// through the derivative of silu(g)·u, plus the output's rounding.
fn assert_swiglu_close(got: &[f32], gu: &[f64], sabs: &[f64], m: usize, i: usize, dt: DType, what: &str) {
    let rr = out_rounding(dt);
    for r in 0..m {
        for j in 0..i {
            let (g, u) = (gu[r * 2 * i + j], gu[r * 2 * i + i + j]);
            let eg = 1e-5 * sabs[r * 2 * i + j] + rr * g.abs();
            let eu = 1e-5 * sabs[r * 2 * i + i + j] + rr * u.abs();
            let sig = 1.0 / (1.0 + (-g).exp());
            let (silu, dsilu) = (g * sig, sig * (1.0 + g * (1.0 - sig)));
            let want = silu * u;
            let tol = (dsilu * u).abs() * eg + silu.abs() * eu + eg * eu + (rr + 1e-6) * want.abs() + 1e-30;
            let x = got[r * i + j];
            assert!(
                !x.is_nan() && (x as f64 - want).abs() <= tol,
                "{what}: row {r} col {j}: got {x}, want {want} (g {g}, u {u}, tol {tol:.3e})"
            );
        }
    }
}

/// Weights of the three kinds (f32 mode, bf16, FP8 in bf16 mode) `[g, n, k]` and their values as
/// the kernels see them (bf16-rounded, or E4M3 x block scale).
fn weights_of(
    dev: &dsv3_kernels::Device,
    rng: &mut Rng,
    kind: &str,
    g: usize,
    n: usize,
    k: usize,
) -> (DWeight, Vec<f32>) {
    match kind {
        "f32" => {
            let w = randn(rng, g * n * k);
            (DWeight::from_f32(dev, DType::F32, g, n, k, &w).unwrap(), w)
        }
        "bf16" => {
            let w = randn(rng, g * n * k);
            (DWeight::from_f32(dev, DType::Bf16, g, n, k, &w).unwrap(), bf16r(&w))
        }
        _ => {
            let (q, s, dense) = fp8_weight(rng, g, n, k);
            (DWeight::from_fp8(dev, g, n, k, &q, &s).unwrap(), dense)
        }
    }
}

/// The activation dtype of a weight kind.
fn act_dtype(kind: &str) -> DType {
    if kind == "f32" {
        DType::F32
    } else {
        DType::Bf16
    }
}

#[test]
fn fused_swiglu_matches_gemm_then_swiglu() {
    let Some(dev) = device("fused_swiglu_matches_gemm_then_swiglu") else { return };
    let mut rng = Rng::new(15);
    // I ragged against 8 (8-row) and 64 (1-row) outputs per block; FP8: the up half starts
    // inside a 128-row scale block; K ragged against the 256-wide lane stride
    for (m, i, k) in [(1usize, 37usize, 264usize), (5, 100, 296), (13, 21, 8), (1, 2100, 512)] {
        for kind in ["f32", "bf16", "fp8"] {
            let dt = act_dtype(kind);
            let a = randn(&mut rng, m * k);
            let ar = if dt == DType::Bf16 { bf16r(&a) } else { a.clone() };
            let (w, wv) = weights_of(&dev, &mut rng, kind, 1, 2 * i, k);
            let bias = randn(&mut rng, 2 * i);
            let b = upload(&dev, &bias).unwrap();
            let (mut gu, sabs) = matmul_abs(&ar, &wv, m, 2 * i, k);
            for r in 0..m {
                for j in 0..2 * i {
                    gu[r * 2 * i + j] += bias[j] as f64;
                }
            }
            let aa = Act::from_f32(&dev, dt, &a).unwrap();
            let mut paths = vec![GemmPath::Auto, GemmPath::Skinny];
            if m == 1 && kind != "f32" {
                paths.push(GemmPath::SkinnyRow);
            }
            for path in paths {
                let what = format!("swiglu {kind} {path:?} {m}x{i}x{k}");
                let s = GemmShape { swiglu: true, bias: Some(&b), ..GemmShape::plain(m, k, i) };
                let mut c = poisoned(&dev, dt, m * i);
                gemm_via(&dev, &aa, &w, &mut c, &s, path).unwrap();
                let fused = c.to_f32(&dev).unwrap();
                assert_swiglu_close(&fused, &gu, &sabs, m, i, dt, &what);
                // the unfused pair on the same kernel family: the same sums, the same SwiGLU math
                let mut gu_d = poisoned(&dev, dt, m * 2 * i);
                let sp = GemmShape { bias: Some(&b), ..GemmShape::plain(m, k, 2 * i) };
                gemm_via(&dev, &aa, &w, &mut gu_d, &sp, path).unwrap();
                let mut act = poisoned(&dev, dt, m * i);
                dsv3_kernels::ops::elementwise::swiglu(&dev, &gu_d, 2 * i, &mut act, i, i, m).unwrap();
                let unfused = act.to_f32(&dev).unwrap();
                assert_swiglu_close(&unfused, &gu, &sabs, m, i, dt, &format!("{what} (gemm + swiglu)"));
                let same = fused.iter().zip(&unfused).filter(|(x, y)| x.to_bits() == y.to_bits()).count();
                eprintln!("{what}: {same} of {} outputs bit-equal to gemm + swiglu", fused.len());
            }
            // the tiled kernels have no SwiGLU form
            let mut c = poisoned(&dev, dt, m * i);
            let s = GemmShape { swiglu: true, ..GemmShape::plain(m, k, i) };
            assert!(gemm_via(&dev, &aa, &w, &mut c, &s, GemmPath::Tiled).is_err(), "tiled SwiGLU must be refused");
        }
    }
}

/// Row offsets and 64-row tile offsets of `counts` rows per group.
fn offsets(counts: &[usize]) -> (Vec<i32>, Vec<i32>) {
    let (mut ro, mut to) = (vec![0i32], vec![0i32]);
    for &c in counts {
        ro.push(ro.last().unwrap() + c as i32);
        to.push(to.last().unwrap() + c.div_ceil(GEMM_BM) as i32);
    }
    (ro, to)
}

#[test]
fn gathered_rows_match_the_gathered_operand() {
    let Some(dev) = device("gathered_rows_match_the_gathered_operand") else { return };
    let mut rng = Rng::new(16);
    let (n, k, src_m) = (45usize, 264usize, 7usize);
    for kind in ["f32", "bf16", "fp8"] {
        let dt = act_dtype(kind);
        let a = randn(&mut rng, src_m * k);
        let ar = if dt == DType::Bf16 { bf16r(&a) } else { a.clone() };
        let aa = Act::from_f32(&dev, dt, &a).unwrap();
        // plain: 11 rows read through indices (repeats, any order), row 4 out of range -> NaN
        let m = 11usize;
        let mut idx: Vec<i32> = (0..m).map(|_| rng.below(src_m as u64) as i32).collect();
        idx[4] = src_m as i32;
        let (w, wv) = weights_of(&dev, &mut rng, kind, 1, n, k);
        let gathered: Vec<f32> =
            idx.iter().flat_map(|&s| ar[(s.max(0) as usize % src_m) * k..][..k].to_vec()).collect();
        let (want, sabs) = matmul_abs(&gathered, &wv, m, n, k);
        let ids = upload(&dev, &idx).unwrap();
        for path in [GemmPath::Auto, GemmPath::Skinny] {
            let s = GemmShape { a_rows: Some(&ids), ..GemmShape::plain(m, k, n) };
            let mut c = poisoned(&dev, DType::F32, m * n);
            gemm_via(&dev, &aa, &w, &mut c, &s, path).unwrap();
            let got = c.to_f32(&dev).unwrap();
            assert!(got[4 * n..5 * n].iter().all(|v| v.is_nan()), "{kind}: an index out of range must give NaN");
            let keep: Vec<usize> = (0..m * n).filter(|e| e / n != 4).collect();
            let pick = |v: &[f64]| keep.iter().map(|&e| v[e]).collect::<Vec<_>>();
            let gotk: Vec<f32> = keep.iter().map(|&e| got[e]).collect();
            assert_gemm_close(&gotk, &pick(&want), &pick(&sabs), DType::F32, &format!("a_rows {kind} {path:?}"));
        }
        // one row through an index, the one-row kernel
        if kind != "f32" {
            let one = upload(&dev, &[5i32]).unwrap();
            let s = GemmShape { a_rows: Some(&one), ..GemmShape::plain(1, k, n) };
            let mut c = poisoned(&dev, DType::F32, n);
            gemm_via(&dev, &aa, &w, &mut c, &s, GemmPath::SkinnyRow).unwrap();
            let (want1, sabs1) = matmul_abs(&ar[5 * k..6 * k], &wv, 1, n, k);
            assert_gemm_close(&c.to_f32(&dev).unwrap(), &want1, &sabs1, DType::F32, &format!("a_rows 1-row {kind}"));
        }
        // grouped (the MoE dispatch): empty and ragged groups, rows read through src_row
        let counts = [0usize, 1, 8, 9, 0, 3];
        let g = counts.len();
        let rows: usize = counts.iter().sum();
        let (ro, to) = offsets(&counts);
        let src: Vec<i32> = (0..rows).map(|_| rng.below(src_m as u64) as i32).collect();
        let (wg, wgv) = weights_of(&dev, &mut rng, kind, g, n, k);
        let (ro_d, to_d, src_d) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap(), upload(&dev, &src).unwrap());
        let (mut want, mut sabs) = (vec![0f64; rows * n], vec![0f64; rows * n]);
        for e in 0..g {
            let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
            let xe: Vec<f32> = src[r0..r1].iter().flat_map(|&s| ar[s as usize * k..][..k].to_vec()).collect();
            let (o, sa) = matmul_abs(&xe, &wgv[e * n * k..(e + 1) * n * k], r1 - r0, n, k);
            want[r0 * n..r1 * n].copy_from_slice(&o);
            sabs[r0 * n..r1 * n].copy_from_slice(&sa);
        }
        let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
        let s = GemmShape { grouped: Some(grouped), a_rows: Some(&src_d), ..GemmShape::plain(rows, k, n) };
        let mut c = poisoned(&dev, dt, rows * n);
        gemm(&dev, &aa, &wg, &mut c, &s).unwrap();
        assert_gemm_close(&c.to_f32(&dev).unwrap(), &want, &sabs, dt, &format!("grouped a_rows {kind}"));
        // the tiled kernels refuse gathered rows
        let s = GemmShape { a_rows: Some(&ids), ..GemmShape::plain(m, k, n) };
        let mut c = poisoned(&dev, DType::F32, m * n);
        assert!(gemm_via(&dev, &aa, &w, &mut c, &s, GemmPath::Tiled).is_err(), "tiled a_rows must be refused");
    }
}

#[test]
fn folded_norm_matches_rmsnorm_then_gemm() {
    let Some(dev) = device("folded_norm_matches_rmsnorm_then_gemm") else { return };
    let mut rng = Rng::new(17);
    let eps = 1e-6f32;
    for kind in ["f32", "bf16", "fp8"] {
        let dt = act_dtype(kind);
        for (m, n, k) in [(1usize, 300usize, 512usize), (5, 37, 264), (1, 4100, 264)] {
            // rows of different scales (the norm undoes them)
            let a: Vec<f32> = (0..m * k).map(|e| rng.normal() * (1 + e / k) as f32).collect();
            let ar = if dt == DType::Bf16 { bf16r(&a) } else { a.clone() };
            let g: Vec<f32> = (0..k).map(|_| 0.5 + rng.uniform()).collect();
            let gd = upload(&dev, &g).unwrap();
            let (w, wv) = weights_of(&dev, &mut rng, kind, 1, n, k);
            let (want, sabs) = matmul_abs(&rmsnorm_ref(&ar, &g, eps, k), &wv, m, n, k);
            let aa = Act::from_f32(&dev, dt, &a).unwrap();
            let mut paths = vec![GemmPath::Auto, GemmPath::Skinny];
            if m == 1 && kind != "f32" {
                paths.push(GemmPath::SkinnyRow);
            }
            for out_dt in [DType::F32, dt] {
                for &path in &paths {
                    let s = GemmShape { norm: Some((&gd, eps)), ..GemmShape::plain(m, k, n) };
                    let mut c = poisoned(&dev, out_dt, m * n);
                    gemm_via(&dev, &aa, &w, &mut c, &s, path).unwrap();
                    let got = c.to_f32(&dev).unwrap();
                    let what = format!("norm {kind} {path:?} {m}x{n}x{k} -> {out_dt:?}");
                    assert_gemm_close(&got, &want, &sabs, out_dt, &what);
                    // against the unfused kernels: rmsnorm (h rounded to A's dtype) + GEMM
                    let mut h = Act::from_f32(&dev, dt, &a).unwrap();
                    dsv3_kernels::ops::norm::rmsnorm(&dev, &mut h, 0, k, None, &gd, k, eps, m).unwrap();
                    let mut cu = poisoned(&dev, out_dt, m * n);
                    gemm_via(&dev, &h, &w, &mut cu, &GemmShape::plain(m, k, n), path).unwrap();
                    let unf = cu.to_f32(&dev).unwrap();
                    let h_round = if dt == DType::Bf16 { 1.0 / 256.0 } else { 0.0 };
                    for e in 0..m * n {
                        let tol = 2.0 * (1e-5 * sabs[e] + out_rounding(out_dt) * want[e].abs()) + h_round * sabs[e];
                        assert!(
                            ((got[e] - unf[e]) as f64).abs() <= tol,
                            "{what}: element {e}: fused {}, rmsnorm + gemm {} (tol {tol:.3e})",
                            got[e],
                            unf[e]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn moe_decode_fusion_matches_norm_gather_gemm_swiglu() {
    let Some(dev) = device("moe_decode_fusion_matches_norm_gather_gemm_swiglu") else { return };
    // the routed gate|up of a decode step: one GEMM reading token rows through src_row with the
    // post-attention norm folded in and SwiGLU applied, over empty and ragged expert groups
    let mut rng = Rng::new(18);
    let (tokens, d, i, eps) = (6usize, 264usize, 100usize, 1e-6f32);
    let counts = [2usize, 0, 1, 9, 0, 3, 1];
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let (ro, to) = offsets(&counts);
    let src: Vec<i32> = (0..rows).map(|_| rng.below(tokens as u64) as i32).collect();
    let (ro_d, to_d, src_d) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap(), upload(&dev, &src).unwrap());
    for kind in ["f32", "bf16", "fp8"] {
        let dt = act_dtype(kind);
        let x: Vec<f32> = (0..tokens * d).map(|e| rng.normal() * (1 + e / d) as f32).collect();
        let xr = if dt == DType::Bf16 { bf16r(&x) } else { x.clone() };
        let nw: Vec<f32> = (0..d).map(|_| 0.5 + rng.uniform()).collect();
        let nw_d = upload(&dev, &nw).unwrap();
        let (w, wv) = weights_of(&dev, &mut rng, kind, g, 2 * i, d);
        let h = rmsnorm_ref(&xr, &nw, eps, d);
        let (mut gu, mut sabs) = (vec![0f64; rows * 2 * i], vec![0f64; rows * 2 * i]);
        for e in 0..g {
            let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
            let xe: Vec<f32> = src[r0..r1].iter().flat_map(|&s| h[s as usize * d..][..d].to_vec()).collect();
            let (o, sa) = matmul_abs(&xe, &wv[e * 2 * i * d..(e + 1) * 2 * i * d], r1 - r0, 2 * i, d);
            gu[r0 * 2 * i..r1 * 2 * i].copy_from_slice(&o);
            sabs[r0 * 2 * i..r1 * 2 * i].copy_from_slice(&sa);
        }
        let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
        let s = GemmShape {
            grouped: Some(grouped),
            a_rows: Some(&src_d),
            norm: Some((&nw_d, eps)),
            swiglu: true,
            ..GemmShape::plain(rows, d, i)
        };
        let xa = Act::from_f32(&dev, dt, &x).unwrap();
        let mut act = poisoned(&dev, dt, rows * i);
        gemm(&dev, &xa, &w, &mut act, &s).unwrap();
        assert_swiglu_close(&act.to_f32(&dev).unwrap(), &gu, &sabs, rows, i, dt, &format!("moe fused {kind}"));
    }
}

// ---- the bf16 mma kernels in every layout (NT = the forward, NN = dX = dY·W, TN = dW = dYᵀ·X)

/// `op(A)[r, ·] · op(B)[·, c]` over `kk` in `[k0, k1)` in f64, and the sum of `|products|`;
/// operands as stored (row-major, `lda`/`ldb` apart, from `ao`/`bo`).
#[allow(clippy::too_many_arguments)]
fn mat_dot(
    l: Layout,
    a: &[f32],
    b: &[f32],
    (ao, lda): (usize, usize),
    (bo, ldb): (usize, usize),
    r: usize,
    c: usize,
    (k0, k1): (usize, usize),
) -> (f64, f64) {
    let (mut s, mut sa) = (0f64, 0f64);
    for kk in k0..k1 {
        let av = a[ao + if l == Layout::TN { kk * lda + r } else { r * lda + kk }] as f64;
        let bv = b[bo + if l == Layout::NT { c * ldb + kk } else { kk * ldb + c }] as f64;
        s += av * bv;
        sa += (av * bv).abs();
    }
    (s, sa)
}

/// Stored sizes of A and B for one `m x n x k` product in layout `l` with leading dims.
fn mat_lens(l: Layout, m: usize, n: usize, k: usize, lda: usize, ldb: usize) -> (usize, usize) {
    let (ra, ca) = if l == Layout::TN { (k, m) } else { (m, k) };
    let (rb, cb) = if l == Layout::NT { (n, k) } else { (k, n) };
    ((ra.max(1) - 1) * lda + ca, (rb.max(1) - 1) * ldb + cb)
}

/// The rows to check of an `m`-row output: all of them up to 300, else 40 spread over every
/// 64-row tile edge and the ragged end (the f64 reference of a whole 4096 x 7168 x 2048 product
/// would take minutes).
fn rows_to_check(m: usize, rng: &mut Rng) -> Vec<usize> {
    if m <= 300 {
        return (0..m).collect();
    }
    let mut r: Vec<usize> = vec![0, 63, 64, 127, 128, m - 1, m - 2, m / 2];
    r.extend((0..32).map(|_| rng.below(m as u64) as usize));
    r.sort();
    r.dedup();
    r
}

const LAYOUTS: [Layout; 3] = [Layout::NT, Layout::NN, Layout::TN];

#[test]
fn mma_gemm_layouts_match_the_reference() {
    let Some(dev) = device("mma_gemm_layouts_match_the_reference") else { return };
    let mut rng = Rng::new(20);
    // ragged against the 128/64-row, 128-column and 32-K tiles; K or M/N not multiples of 8 (the
    // element-by-element loads); the model's prefill and training shapes (rows sampled)
    let shapes = [
        (1usize, 1usize, 1usize),
        (7, 33, 45),
        (65, 130, 257),
        (130, 136, 72),
        (257, 264, 200),
        (64, 128, 32),
        (300, 520, 1000),
        (2048, 32000, 512),
        (4096, 7168, 2048),
        (8192, 512, 1408),
    ];
    for (m, n, k) in shapes {
        if !runs_here(&dev, 2.0 * (m * n * k) as f64, &format!("mma layouts {m}x{n}x{k}")) {
            continue;
        }
        for l in LAYOUTS {
            let s0 = MatShape::plain(l, m, n, k);
            let (alen, blen) = mat_lens(l, m, n, k, s0.lda, s0.ldb);
            let a = bf16r(&randn(&mut rng, alen));
            let b = bf16r(&randn(&mut rng, blen));
            let bias = randn(&mut rng, n);
            let aa = Act::from_f32(&dev, DType::Bf16, &a).unwrap();
            let bb = Act::from_f32(&dev, DType::Bf16, &b).unwrap();
            let bd = upload(&dev, &bias).unwrap();
            let rows = rows_to_check(m, &mut rng);
            let big = m * n > 1 << 22;
            for out_dt in [DType::Bf16, DType::F32] {
                // tiles: both where small, the chosen one for the big shapes
                let tiles: &[Option<Tile>] =
                    if big { &[None] } else { &[Some(Tile::Wide), Some(Tile::Large), Some(Tile::Small)] };
                for &tile in tiles {
                    // plain, then accumulate + bias on top of random C
                    for acc in [false, true] {
                        if big && acc && out_dt == DType::Bf16 {
                            continue;
                        }
                        // (C's previous values only where accumulated: the big shapes' host-side
                        // work kept this test past 120 s on the H100 machine)
                        let prev = if acc { randn(&mut rng, m * n) } else { Vec::new() };
                        let mut c = if acc {
                            Act::from_f32(&dev, out_dt, &prev).unwrap()
                        } else {
                            poisoned(&dev, out_dt, m * n)
                        };
                        let s = MatShape {
                            accumulate: acc,
                            bias: if acc { Some(&bd) } else { None },
                            ..MatShape::plain(l, m, n, k)
                        };
                        gemm_mat_with(&dev, l, &aa, Operand::Act(&bb), &mut c, &s, tile).unwrap();
                        let got = c.to_f32(&dev).unwrap();
                        let prev_r = if out_dt == DType::Bf16 { bf16r(&prev) } else { prev };
                        let (mut want, mut sabs, mut gotv) = (vec![], vec![], vec![]);
                        for &r in &rows {
                            for j in 0..n {
                                let (mut v, sa) = mat_dot(l, &a, &b, (0, s0.lda), (0, s0.ldb), r, j, (0, k));
                                if acc {
                                    v += prev_r[r * n + j] as f64 + bias[j] as f64;
                                }
                                want.push(v);
                                sabs.push(
                                    sa + if acc { (prev_r[r * n + j].abs() + bias[j].abs()) as f64 } else { 0.0 },
                                );
                                gotv.push(got[r * n + j]);
                            }
                        }
                        let what = format!("mma {l:?} {m}x{n}x{k} {tile:?} acc={acc} -> {out_dt:?}");
                        assert_gemm_close(&gotv, &want, &sabs, out_dt, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn mma_gemm_batched_with_strides_matches() {
    let Some(dev) = device("mma_gemm_batched_with_strides_matches") else { return };
    let mut rng = Rng::new(21);
    // operands inside wider rows at offsets, C with gaps between products, B shared (stride 0)
    for l in LAYOUTS {
        for (m, n, k, share_b) in [(40usize, 48usize, 64usize, false), (70, 136, 96, true), (9, 20, 13, false)] {
            let batch = 3;
            let (ca, cb) = (if l == Layout::TN { m } else { k }, if l == Layout::NT { k } else { n });
            let (lda, ldb, ldc) = (ca + 8, cb + 16, n + 5);
            let (alen, blen) = mat_lens(l, m, n, k, lda, ldb);
            let (a_off, b_off, c_off) = (8usize, 16usize, 3usize);
            let (sa, sb, sc) = (alen + 24, if share_b { 0 } else { blen + 8 }, m * ldc + 7);
            let a = bf16r(&randn(&mut rng, a_off + 2 * sa + alen));
            let b = bf16r(&randn(&mut rng, b_off + 2 * sb + blen));
            let clen = c_off + 2 * sc + (m - 1) * ldc + n;
            let s = MatShape {
                a_off,
                lda,
                stride_a: sa,
                b_off,
                ldb,
                stride_b: sb,
                c_off,
                ldc,
                stride_c: sc,
                batch,
                ..MatShape::plain(l, m, n, k)
            };
            let aa = Act::from_f32(&dev, DType::Bf16, &a).unwrap();
            let bb = Act::from_f32(&dev, DType::Bf16, &b).unwrap();
            for out_dt in [DType::Bf16, DType::F32] {
                let mut c = poisoned(&dev, out_dt, clen);
                gemm_mat(&dev, l, &aa, Operand::Act(&bb), &mut c, &s).unwrap();
                let got = c.to_f32(&dev).unwrap();
                let mut written = vec![false; clen];
                let (mut want, mut sabs, mut gotv) = (vec![], vec![], vec![]);
                for bi in 0..batch {
                    for r in 0..m {
                        for j in 0..n {
                            let at = c_off + bi * sc + r * ldc + j;
                            written[at] = true;
                            let (v, s1) =
                                mat_dot(l, &a, &b, (a_off + bi * sa, lda), (b_off + bi * sb, ldb), r, j, (0, k));
                            want.push(v);
                            sabs.push(s1);
                            gotv.push(got[at]);
                        }
                    }
                }
                let what = format!("mma batched {l:?} {m}x{n}x{k} -> {out_dt:?}");
                assert_gemm_close(&gotv, &want, &sabs, out_dt, &what);
                assert!(got.iter().zip(&written).all(|(v, w)| *w || v.is_nan()), "{what}: wrote outside the products");
            }
        }
    }
}

/// f64 reference of the grouped `dX = dY_e·W_e` (NN by rows; `dy` `[rows, d_out]`, `w`
/// `[g, d_out, d_in]`, expert e's rows `ro[e]..ro[e + 1]`): values and `Σ|a·w|`.
fn grouped_nn_ref(dy: &[f32], w: &[f32], ro: &[i32], d_in: usize, d_out: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = ro[ro.len() - 1] as usize;
    let (mut want, mut sabs) = (vec![0f64; rows * d_in], vec![0f64; rows * d_in]);
    for e in 0..ro.len() - 1 {
        for r in ro[e] as usize..ro[e + 1] as usize {
            for j in 0..d_in {
                let (v, sa) = mat_dot(Layout::NN, dy, w, (0, d_out), (e * d_out * d_in, d_in), r, j, (0, d_out));
                want[r * d_in + j] = v;
                sabs[r * d_in + j] = sa;
            }
        }
    }
    (want, sabs)
}

/// f64 reference of the grouped `dW_e (+)= dY_eᵀ·X_e` (TN by K; `[g, d_out, d_in]`, on top of
/// `prev` when given): values and `Σ|a·w|`.
fn grouped_tn_ref(
    dy: &[f32],
    x: &[f32],
    ro: &[i32],
    d_out: usize,
    d_in: usize,
    prev: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let g = ro.len() - 1;
    let (mut want, mut sabs) = (vec![0f64; g * d_out * d_in], vec![0f64; g * d_out * d_in]);
    for e in 0..g {
        for r in 0..d_out {
            for j in 0..d_in {
                let at = e * d_out * d_in + r * d_in + j;
                let span = (ro[e] as usize, ro[e + 1] as usize);
                let (v, sa) = mat_dot(Layout::TN, dy, x, (0, d_out), (0, d_in), r, j, span);
                let p = prev.map_or(0.0, |p| p[at] as f64);
                want[at] = v + p;
                sabs[at] = sa + p.abs();
            }
        }
    }
    (want, sabs)
}

#[test]
fn mma_gemm_grouped_by_expert_matches() {
    let Some(dev) = device("mma_gemm_grouped_by_expert_matches") else { return };
    let mut rng = Rng::new(22);
    // experts: empty, 1 row, a whole 64-row tile, a tile + 1, empty, 3 rows, 130
    let counts = [0usize, 1, GEMM_BM, GEMM_BM + 1, 0, 3, 130];
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let (ro, to) = offsets(&counts);
    let (ro_d, to_d) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap());
    let (d_in, d_out) = (72usize, 136usize);
    // the MoE backward of y_e = x_e · W_eᵀ (W_e [d_out, d_in]): dX = dY · W (NN, grouped by rows,
    // one weight per expert) and dW_e += dY_eᵀ · X_e (TN, grouped by K, into f32)
    let dy = bf16r(&randn(&mut rng, rows * d_out));
    let x = bf16r(&randn(&mut rng, rows * d_in));
    let w = bf16r(&randn(&mut rng, g * d_out * d_in));
    let dya = Act::from_f32(&dev, DType::Bf16, &dy).unwrap();
    let xa = Act::from_f32(&dev, DType::Bf16, &x).unwrap();
    let wd = DWeight::from_f32(&dev, DType::Bf16, g, d_out, d_in, &w).unwrap();
    // NN: dX [rows, d_in]
    for out_dt in [DType::Bf16, DType::F32] {
        let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
        let s = MatShape {
            stride_b: d_out * d_in,
            batch: g,
            grouped: Some(grouped),
            ..MatShape::plain(Layout::NN, rows, d_in, d_out)
        };
        let mut c = poisoned(&dev, out_dt, rows * d_in);
        gemm_nn(&dev, &dya, Operand::Weight(&wd), &mut c, &s).unwrap();
        let got = c.to_f32(&dev).unwrap();
        let (want, sabs) = grouped_nn_ref(&dy, &w, &ro, d_in, d_out);
        assert_gemm_close(&got, &want, &sabs, out_dt, &format!("grouped NN (dX) -> {out_dt:?}"));
    }
    // TN: dW [g, d_out, d_in] += dYᵀ · X per expert, over its rows
    let prev = randn(&mut rng, g * d_out * d_in);
    let mut dw = Act::from_f32(&dev, DType::F32, &prev).unwrap();
    let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &ro_d, max_tiles: 0 };
    let s = MatShape {
        stride_c: d_out * d_in,
        batch: g,
        accumulate: true,
        grouped: Some(grouped),
        ..MatShape::plain(Layout::TN, d_out, d_in, rows)
    };
    gemm_tn(&dev, &dya, Operand::Act(&xa), &mut dw, &s).unwrap();
    let got = dw.to_f32(&dev).unwrap();
    let (want, sabs) = grouped_tn_ref(&dy, &x, &ro, d_out, d_in, Some(&prev));
    assert_gemm_close(&got, &want, &sabs, DType::F32, "grouped TN (dW += dYᵀ·X, empty experts keep dW)");
}

#[test]
fn mma_gemm_rejects_bad_operands() {
    let Some(dev) = device("mma_gemm_rejects_bad_operands") else { return };
    let a32 = Act::from_f32(&dev, DType::F32, &[1.0; 12]).unwrap();
    let a = Act::from_f32(&dev, DType::Bf16, &[1.0; 12]).unwrap();
    let mut c = poisoned(&dev, DType::F32, 16);
    let s = MatShape::plain(Layout::NN, 3, 4, 4);
    assert!(gemm_nn(&dev, &a32, Operand::Act(&a), &mut c, &s).is_err(), "f32 A");
    assert!(gemm_nn(&dev, &a, Operand::Act(&a32), &mut c, &s).is_err(), "f32 B");
    // B [4, 4] needs 16 elements, the buffer holds 12
    assert!(gemm_nn(&dev, &a, Operand::Act(&a), &mut c, &s).is_err(), "short B");
    let mut short = poisoned(&dev, DType::F32, 8);
    let s = MatShape::plain(Layout::TN, 3, 3, 4);
    assert!(gemm_tn(&dev, &a, Operand::Act(&a), &mut short, &s).is_err(), "short C");
    let s = MatShape { lda: 2, ..MatShape::plain(Layout::TN, 3, 3, 4) };
    assert!(gemm_tn(&dev, &a, Operand::Act(&a), &mut c, &s).is_err(), "lda < m");
}

/// The training products on cuBLAS (`DSV3_TRAIN_GEMM=cublas`: `Mm::with_cublas(.., true)`, bf16
/// operands, bf16 or f32 C, f32 compute): every layout plain and accumulating, batched with
/// strides, and grouped by expert with host offsets (NN by rows; TN by K, with empty experts
/// zeroed or kept), against the f64 reference at the mma kernels' bounds.
#[test]
fn train_products_on_cublas_match_the_reference() {
    use dsv3_kernels::train::mm::{dims, Groups, Mm, Rd, Wr};
    let Some(dev) = device("train_products_on_cublas_match_the_reference") else { return };
    let mm = Mm::with_cublas(&dev, DType::Bf16, true).unwrap();
    assert!(mm.bf16_on_cublas());
    let mut rng = Rng::new(23);
    for l in LAYOUTS {
        for (m, n, k, batch) in [(7usize, 33usize, 45usize, 1usize), (130, 136, 72, 1), (40, 48, 64, 3)] {
            let (ca, cb) = (if l == Layout::TN { m } else { k }, if l == Layout::NT { k } else { n });
            let (lda, ldb, ldc) = (ca + 8, cb + 16, n + 5);
            let (alen, blen) = mat_lens(l, m, n, k, lda, ldb);
            let (sa, sb, sc) = (alen + 24, if batch > 1 { blen + 8 } else { 0 }, m * ldc + 7);
            let a = bf16r(&randn(&mut rng, batch * sa));
            let b = bf16r(&randn(&mut rng, (batch - 1) * sb + blen));
            let clen = (batch - 1) * sc + (m - 1) * ldc + n;
            let aa = Act::from_f32(&dev, DType::Bf16, &a).unwrap();
            let bb = Act::from_f32(&dev, DType::Bf16, &b).unwrap();
            for out_dt in [DType::Bf16, DType::F32] {
                for acc in [false, true] {
                    let prev = randn(&mut rng, clen);
                    let mut c =
                        if acc { Act::from_f32(&dev, out_dt, &prev).unwrap() } else { poisoned(&dev, out_dt, clen) };
                    let (ra, rb) = (Rd { buf: &aa, off: 0, ld: lda, st: sa }, Rd { buf: &bb, off: 0, ld: ldb, st: sb });
                    let cw = Wr { buf: &mut c, off: 0, ld: ldc, st: sc };
                    mm.run(&dev, l, dims(m, n, k).batch(batch).acc(acc), ra, rb, cw, None).unwrap();
                    let got = c.to_f32(&dev).unwrap();
                    let prev_r = if out_dt == DType::Bf16 { bf16r(&prev) } else { prev };
                    let (mut want, mut sabs, mut gotv) = (vec![], vec![], vec![]);
                    let mut written = vec![false; clen];
                    for bi in 0..batch {
                        for r in 0..m {
                            for j in 0..n {
                                let at = bi * sc + r * ldc + j;
                                written[at] = true;
                                let (mut v, mut s1) = mat_dot(l, &a, &b, (bi * sa, lda), (bi * sb, ldb), r, j, (0, k));
                                if acc {
                                    v += prev_r[at] as f64;
                                    s1 += prev_r[at].abs() as f64;
                                }
                                want.push(v);
                                sabs.push(s1);
                                gotv.push(got[at]);
                            }
                        }
                    }
                    let what = format!("cuBLAS {l:?} {m}x{n}x{k} x{batch} acc={acc} -> {out_dt:?}");
                    assert_gemm_close(&gotv, &want, &sabs, out_dt, &what);
                    if !acc {
                        assert!(got.iter().zip(&written).all(|(v, w)| *w || v.is_nan()), "{what}: wrote outside C");
                    }
                }
            }
        }
    }
    // grouped by expert with host offsets: empty experts, ragged counts
    let counts = [0usize, 1, 64, 65, 0, 3, 130];
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let (ro, to) = offsets(&counts);
    let (ro_d, to_d) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap());
    let gr = Groups {
        row_offsets: &ro_d,
        tile_offsets: &to_d,
        max_tiles: rows.div_ceil(GEMM_BM) + g,
        host: Some(&ro),
        t128: None,
        groups: g,
    };
    let (d_in, d_out) = (72usize, 136usize);
    let dy = bf16r(&randn(&mut rng, rows * d_out));
    let x = bf16r(&randn(&mut rng, rows * d_in));
    let w = bf16r(&randn(&mut rng, g * d_out * d_in));
    let (dya, xa, wa) = (
        Act::from_f32(&dev, DType::Bf16, &dy).unwrap(),
        Act::from_f32(&dev, DType::Bf16, &x).unwrap(),
        Act::from_f32(&dev, DType::Bf16, &w).unwrap(),
    );
    // NN: dX [rows, d_in] = dY_e · W_e
    let mut c = poisoned(&dev, DType::Bf16, rows * d_in);
    let (ra, rb) = (Rd { buf: &dya, off: 0, ld: d_out, st: 0 }, Rd { buf: &wa, off: 0, ld: d_in, st: d_out * d_in });
    mm.grouped(&dev, Layout::NN, dims(rows, d_in, d_out), ra, rb, Wr { buf: &mut c, off: 0, ld: d_in, st: 0 }, &gr)
        .unwrap();
    let got = c.to_f32(&dev).unwrap();
    let (want, sabs) = grouped_nn_ref(&dy, &w, &ro, d_in, d_out);
    assert_gemm_close(&got, &want, &sabs, DType::Bf16, "cuBLAS grouped NN (dX)");
    // TN: dW_e (+)= dY_eᵀ · X_e into f32; without accumulation an empty expert's dW is zeroed
    for acc in [false, true] {
        let prev = randn(&mut rng, g * d_out * d_in);
        let mut dw = Act::from_f32(&dev, DType::F32, &prev).unwrap();
        let (ra, rb) = (Rd { buf: &dya, off: 0, ld: d_out, st: 0 }, Rd { buf: &xa, off: 0, ld: d_in, st: 0 });
        let cw = Wr { buf: &mut dw, off: 0, ld: d_in, st: d_out * d_in };
        mm.grouped(&dev, Layout::TN, dims(d_out, d_in, rows).acc(acc), ra, rb, cw, &gr).unwrap();
        let got = dw.to_f32(&dev).unwrap();
        let (want, sabs) = grouped_tn_ref(&dy, &x, &ro, d_out, d_in, acc.then_some(&prev[..]));
        assert_gemm_close(&got, &want, &sabs, DType::F32, &format!("cuBLAS grouped TN (dW) acc={acc}"));
    }
}

/// The experts' grouped bf16 products on wgmma + TMA (`gemm_tma_grouped_bf16`, which `gemm_mat`
/// picks for row-grouped NT / NN on sm_90a; the mma.sync kernel elsewhere): ragged and empty
/// experts (two experts in one 128-row block tile, a tile + 1 row), K not a multiple of the 64-K
/// slice, N not a multiple of 128, bias, bf16 and f32 C, accumulate; NN through the transposed
/// weight; and more block tiles than SMs (the persistent walk). bf16 C without bias (and NN)
/// leaves by TMA stores (`DSV3_BF16_GROUPED=tma-regs`: from registers; both must pass). The
/// profile says which kernel ran.
#[test]
fn grouped_products_on_wgmma_tma_match_the_reference() {
    let Some(dev) = device("grouped_products_on_wgmma_tma_match_the_reference") else { return };
    let tma = dev.arch == dsv3_kernels::ptx::Arch::Sm90a && std::env::var("DSV3_BF16_GROUPED").as_deref() != Ok("mma");
    let mut rng = Rng::new(31);
    // (expert rows, k, n): ragged; one slice of K with more block tiles than SMs
    let big = dev.sms * 64 + 64 * 3 + 17;
    let cases: [(Vec<usize>, usize, usize); 2] =
        [(vec![0, 1, GEMM_BM, GEMM_BM + 1, 0, 3, 130, 40], 200, 200), (vec![big / 2, 0, big - big / 2], 16, 256)];
    for (counts, k, n) in cases {
        let g = counts.len();
        let rows: usize = counts.iter().sum();
        let (ro, to) = offsets(&counts);
        let (ro_d, to_d) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap());
        // EXTRA rows past the groups in A and C (the NT calls' m): no group owns them, so C's stay
        // as they were (a partial tile stored whole, by TMA or otherwise, would overwrite them)
        const EXTRA: usize = 5;
        let x = bf16r(&randn(&mut rng, (rows + EXTRA) * k));
        let w = bf16r(&randn(&mut rng, g * n * k));
        let bias = randn(&mut rng, n);
        let xa = Act::from_f32(&dev, DType::Bf16, &x).unwrap();
        let wd = DWeight::from_f32(&dev, DType::Bf16, g, n, k, &w).unwrap();
        let bias_d = upload(&dev, &bias).unwrap();
        // the reference: each expert's rows times its weight, + bias
        let (mut want, mut sabs) = (vec![0f64; rows * n], vec![0f64; rows * n]);
        for e in 0..g {
            let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
            let (c, s) = matmul_abs(&x[r0 * k..r1 * k], &w[e * n * k..(e + 1) * n * k], r1 - r0, n, k);
            for i in 0..(r1 - r0) * n {
                want[r0 * n + i] = c[i] + bias[i % n] as f64;
                sabs[r0 * n + i] = s[i] + (bias[i % n] as f64).abs();
            }
        }
        // bf16 C without bias: the TMA-store epilogue (full tiles; the partial ones from registers)
        for (out_dt, acc, with_bias) in
            [(DType::Bf16, false, true), (DType::Bf16, false, false), (DType::F32, true, true)]
        {
            let prev = randn(&mut rng, (rows + EXTRA) * n);
            let mut c = if acc {
                Act::from_f32(&dev, out_dt, &prev).unwrap()
            } else {
                poisoned(&dev, out_dt, (rows + EXTRA) * n)
            };
            let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
            let s = MatShape {
                stride_b: n * k,
                batch: g,
                accumulate: acc,
                bias: with_bias.then_some(&bias_d),
                grouped: Some(grouped),
                ..MatShape::plain(Layout::NT, rows + EXTRA, n, k)
            };
            dev.profile_begin().unwrap();
            gemm_mat(&dev, Layout::NT, &xa, Operand::Weight(&wd), &mut c, &s).unwrap();
            let ran: Vec<String> = dev.profile_end().unwrap().kernels.into_iter().map(|k| k.name).collect();
            let want_kernel = if tma { "gemm_tma_grouped_bf16" } else { "gemm_mma_nt_s" };
            assert_eq!(ran, vec![want_kernel.to_string()], "{counts:?}");
            let mut wc = want.clone();
            if acc {
                wc.iter_mut().zip(&prev).for_each(|(v, p)| *v += *p as f64);
            }
            if !with_bias {
                wc.iter_mut().enumerate().for_each(|(i, v)| *v -= bias[i % n] as f64);
            }
            let got = c.to_f32(&dev).unwrap();
            let what = format!("grouped NT {counts:?} k {k} n {n} -> {out_dt:?} bias {with_bias}");
            assert_gemm_close(&got[..rows * n], &wc, &sabs, out_dt, &what);
            let untouched =
                got[rows * n..].iter().zip(&prev[rows * n..]).all(|(v, p)| if acc { v == p } else { v.is_nan() });
            assert!(untouched, "{what}: the rows past the groups were written");
        }
        // NN: dX [rows, n] = dY [rows, k] · W_e [k, n] (W stored [g][k][n], as the expert weight
        // [d_out = k, d_in = n] of the backward)
        let mut c = poisoned(&dev, DType::Bf16, rows * n);
        let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + g };
        let s =
            MatShape { stride_b: n * k, batch: g, grouped: Some(grouped), ..MatShape::plain(Layout::NN, rows, n, k) };
        dev.profile_begin().unwrap();
        gemm_nn(&dev, &xa, Operand::Weight(&wd), &mut c, &s).unwrap();
        let mut ran: Vec<String> = dev.profile_end().unwrap().kernels.into_iter().map(|k| k.name).collect();
        ran.sort();
        let want_kernels: Vec<String> = if tma {
            vec!["gemm_tma_grouped_bf16".into(), "transpose_groups_bf16".into()]
        } else {
            vec!["gemm_mma_nn_s".into()]
        };
        assert_eq!(ran, want_kernels);
        let (want_nn, sabs_nn) = grouped_nn_ref(&x, &w, &ro, n, k);
        assert_gemm_close(&c.to_f32(&dev).unwrap(), &want_nn, &sabs_nn, DType::Bf16, &format!("grouped NN {counts:?}"));
    }
}
