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
