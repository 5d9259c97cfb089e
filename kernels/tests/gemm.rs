//! GEMMs against a CPU reference: f32 (1e-5 relative), bf16 tensor cores (inputs rounded to bf16,
//! f32 accumulation: the only extra error is the bf16 output rounding), FP8 weights with
//! 128x128 block scales (DeepSeek's per-128-K promotion), batched with strides, grouped by rows
//! with empty and ragged groups, bias and accumulate. Ragged shapes (not multiples of the tiles).
mod common;
use common::*;
use dsv3_core::fp8::format::E4M3_LUT;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::gemm::{gemm, gemm_via, GemmPath, GemmShape, Grouped, GEMM_BM};
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

/// Random E4M3 codes (no NaN) and positive block scales for `[g, n, k]`.
fn fp8_weight(rng: &mut Rng, g: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let q: Vec<u8> = (0..g * n * k)
        .map(|_| loop {
            let b = rng.below(256) as u8;
            if b & 0x7f != 0x7f {
                break b;
            }
        })
        .collect();
    let (nb, kb) = (n.div_ceil(128), k.div_ceil(128));
    let s: Vec<f32> = (0..g * nb * kb).map(|_| 0.001 + 0.01 * rng.uniform()).collect();
    let mut dense = vec![0f32; g * n * k];
    for gg in 0..g {
        for i in 0..n {
            for j in 0..k {
                let at = gg * n * k + i * k + j;
                dense[at] = E4M3_LUT[q[at] as usize] * s[gg * nb * kb + (i / 128) * kb + j / 128];
            }
        }
    }
    (q, s, dense)
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
