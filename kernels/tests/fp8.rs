//! DeepSeek's FP8 recipe on the GPU against the CPU oracle (dsv3_core::fp8): the quantize kernels
//! bit for bit (codes and scales, f32 and bf16 inputs, plain and power-of-two scales, ragged
//! shapes, strided rows), and the promoted FP8 GEMM in its three forms (Fprop/Dgrad 1x128 x
//! 128x128, Wgrad 1x128 x 1x128 along tokens with f32 accumulate, grouped-contiguous MoE) against
//! core's exact emulation and an f64 reference of the unquantized inputs with DeepGEMM's measure
//! `1 - 2·Σxy/Σ(x²+y²) < 1e-3`. Every kernel (SIMT anywhere; on sm_90a fp8_gemm_wgmma, the
//! pipelined fp8_gemm_wgmma2 and the TMA fp8_gemm_tma where their 16-byte alignment holds). Skip
//! without a GPU.
mod common;
use common::*;
use dsv3_core::fp8::gemm::{calc_diff, fp8_gemm as cpu_fp8_gemm};
use dsv3_core::fp8::quant::{quantize_unchecked, QTensor, ScaleLayout};
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::fp8::{
    fp8_gemm, quant_1x128, quant_1x128_form, quant_block128, quant_block128_batch, quant_t128, quant_t128_groups,
    t128_segments, tma_fits, wgmma2_fits, BScales, Fp8BlockOut, Fp8Gemm, Fp8Kernel, Fp8Operand, Fp8Out, FP8_BM,
};
use dsv3_kernels::ops::fp8_tma::store_by_tma;
use dsv3_kernels::ops::gemm::Grouped;
use dsv3_kernels::ptx::Arch;
use dsv3_kernels::tensor::{download, upload};
use dsv3_kernels::train::mm::ActView;
use dsv3_kernels::{Act, DType, Device};

/// Random values over many magnitudes: rows (and columns) scaled by 1e-7..1e3, so amax floors,
/// subnormal E4M3 codes and saturation-free large values all occur; never all zeros.
fn spread(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let rs: Vec<f32> = (0..rows).map(|_| 10f32.powi(rng.below(11) as i32 - 7)).collect();
    let cs: Vec<f32> = (0..cols).map(|_| if rng.below(8) == 0 { 30.0 } else { 1.0 }).collect();
    (0..rows * cols).map(|i| rng.normal() * rs[i / cols] * cs[i % cols]).collect()
}

fn poisoned_u8(dev: &Device, n: usize) -> cudarc::driver::CudaSlice<u8> {
    upload(dev, &vec![0x7fu8; n.max(1)]).unwrap()
}
fn poisoned_f32(dev: &Device, n: usize) -> cudarc::driver::CudaSlice<f32> {
    upload(dev, &vec![f32::NAN; n.max(1)]).unwrap()
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g:e}, want {w:e}");
    }
}
fn assert_codes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("{what}: code {i}: got {:#04x}, want {:#04x}", got[i], want[i]);
    }
}

const QSHAPES: [(usize, usize); 6] = [(1, 1), (3, 127), (5, 128), (7, 300), (130, 257), (257, 1024)];
/// Row counts past CUDA's 65535 grid.y: quant_1x128 walks its rows grid-stride over y capped at
/// 65535 (one block row per token), quant_t128 its 128-row blocks (65536 of them).
const QSHAPES_1X128_TALL: [(usize, usize); 1] = [(65536 + 3, 5)];
const QSHAPES_T128_TALL: [(usize, usize); 1] = [(65536 * 128 + 1, 1)];
const DTYPES: [DType; 2] = [DType::F32, DType::Bf16];

/// The CPU's view of what a buffer of `dt` holds.
fn as_dtype(x: &[f32], dt: DType) -> Vec<f32> {
    if dt == DType::Bf16 {
        bf16r(x)
    } else {
        x.to_vec()
    }
}

/// Both forms (`quant_1x128_form`: the warp-per-group kernel `quant_1x128` runs, and the
/// block-per-group v1), with rows 4-element aligned (the warp kernel's vector loads and 4-byte
/// code stores) and not (its element path).
#[test]
fn quant_1x128_matches_cpu_bit_for_bit() {
    let Some(dev) = device("quant_1x128_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng::new(70);
    for (rows, cols) in QSHAPES.into_iter().chain(QSHAPES_1X128_TALL) {
        for aligned in [false, true] {
            let (ldx, ldq) = if aligned {
                (cols.next_multiple_of(4) + 4, cols.next_multiple_of(4) + 8)
            } else {
                (cols + 3, cols + 5)
            };
            let x = spread(&mut rng, rows, ldx);
            for dt in DTYPES {
                for (pow2, warp) in [(false, true), (true, true), (false, false), (true, false)] {
                    let xs = as_dtype(&x, dt);
                    let dense: Vec<f32> = (0..rows).flat_map(|r| xs[r * ldx..r * ldx + cols].to_vec()).collect();
                    let want = quantize_unchecked(&dense, rows, cols, ScaleLayout::Tile1x128, pow2);
                    // codes with a padded row stride (the padding must stay poisoned), scales M-contiguous
                    let kg = cols.div_ceil(128);
                    let mut q = poisoned_u8(&dev, rows * ldq);
                    let mut s = poisoned_f32(&dev, rows * kg);
                    let out = Fp8Out { q: &mut q, ld: ldq, scale: &mut s, s_rs: 1, s_cs: rows };
                    let xa = Act::from_f32(&dev, dt, &x).unwrap();
                    quant_1x128_form(&dev, &xa, ldx, rows, cols, out, pow2, warp).unwrap();
                    let (gq, gs) = (download(&dev, &q).unwrap(), download(&dev, &s).unwrap());
                    let what =
                        format!("quant_1x128 warp={warp} {dt:?} pow2 {pow2} [{rows}, {cols}] ldx {ldx} ldq {ldq}");
                    let codes: Vec<u8> = (0..rows).flat_map(|r| gq[r * ldq..r * ldq + cols].to_vec()).collect();
                    assert_codes(&codes, &want.codes, &what);
                    assert!(
                        (0..rows).all(|r| gq[r * ldq + cols..(r + 1) * ldq].iter().all(|&b| b == 0x7f)),
                        "{what}: pad"
                    );
                    let scales: Vec<f32> =
                        (0..rows).flat_map(|r| (0..kg).map(move |b| (r, b))).map(|(r, b)| gs[b * rows + r]).collect();
                    assert_bits(&scales, &want.scales, &what);
                }
            }
        }
    }
}

#[test]
fn quant_block128_and_its_transpose_match_cpu_bit_for_bit() {
    let Some(dev) = device("quant_block128_and_its_transpose_match_cpu_bit_for_bit") else { return };
    let mut rng = Rng::new(71);
    for (rows, cols) in QSHAPES {
        let x = spread(&mut rng, rows, cols);
        for dt in DTYPES {
            for pow2 in [false, true] {
                let want = quantize_unchecked(&as_dtype(&x, dt), rows, cols, ScaleLayout::Block128, pow2);
                let want_t = want.transposed();
                let ns = rows.div_ceil(128) * cols.div_ceil(128);
                let (mut q, mut s) = (poisoned_u8(&dev, rows * cols), poisoned_f32(&dev, ns));
                let (mut qt, mut st) = (poisoned_u8(&dev, rows * cols), poisoned_f32(&dev, ns));
                let out = Fp8BlockOut { q: &mut q, scale: &mut s, transposed: Some((&mut qt, &mut st)) };
                quant_block128(&dev, &Act::from_f32(&dev, dt, &x).unwrap(), cols, rows, cols, out, pow2).unwrap();
                let what = format!("quant_block128 {dt:?} pow2 {pow2} [{rows}, {cols}]");
                assert_codes(&download(&dev, &q).unwrap()[..rows * cols], &want.codes, &what);
                assert_bits(&download(&dev, &s).unwrap()[..ns], &want.scales, &what);
                assert_codes(
                    &download(&dev, &qt).unwrap()[..rows * cols],
                    &want_t.codes,
                    &format!("{what} transposed"),
                );
                assert_bits(&download(&dev, &st).unwrap()[..ns], &want_t.scales, &format!("{what} transposed"));
            }
        }
    }
}

/// The batched form (one launch over the experts of a grouped weight, as the training pass's
/// FP8 refresh runs it): matrix z at `x[z·bx..]` with padded rows and gaps between matrices,
/// outputs packed per matrix, equal bit for bit to core's per-matrix quantization.
#[test]
fn quant_block128_batch_equals_per_matrix_quantization() {
    let Some(dev) = device("quant_block128_batch_equals_per_matrix_quantization") else { return };
    let mut rng = Rng::new(73);
    for (rows, cols, batch) in [(300usize, 200usize, 3usize), (128, 256, 5), (1, 1, 2), (257, 130, 4)] {
        let (ldx, gap) = (cols + 3, 17);
        let bx = rows * ldx + gap;
        let mats: Vec<Vec<f32>> = (0..batch).map(|_| spread(&mut rng, rows, cols)).collect();
        let mut x = vec![f32::NAN; (batch - 1) * bx + rows * ldx];
        for (z, m) in mats.iter().enumerate() {
            for r in 0..rows {
                x[z * bx + r * ldx..z * bx + r * ldx + cols].copy_from_slice(&m[r * cols..(r + 1) * cols]);
            }
        }
        let (nc, ns) = (rows * cols, rows.div_ceil(128) * cols.div_ceil(128));
        let (mut q, mut s) = (poisoned_u8(&dev, batch * nc), poisoned_f32(&dev, batch * ns));
        let (mut qt, mut st) = (poisoned_u8(&dev, batch * nc), poisoned_f32(&dev, batch * ns));
        let out = Fp8BlockOut { q: &mut q, scale: &mut s, transposed: Some((&mut qt, &mut st)) };
        let xd = Act::from_f32(&dev, DType::F32, &x).unwrap();
        quant_block128_batch(&dev, &xd, ldx, rows, cols, batch, bx, out, false).unwrap();
        let (q, s, qt, st) = (
            download(&dev, &q).unwrap(),
            download(&dev, &s).unwrap(),
            download(&dev, &qt).unwrap(),
            download(&dev, &st).unwrap(),
        );
        for (z, m) in mats.iter().enumerate() {
            let want = quantize_unchecked(m, rows, cols, ScaleLayout::Block128, false);
            let want_t = want.transposed();
            let what = format!("quant_block128_batch [{rows}, {cols}] matrix {z} of {batch}");
            assert_codes(&q[z * nc..(z + 1) * nc], &want.codes, &what);
            assert_bits(&s[z * ns..(z + 1) * ns], &want.scales, &what);
            assert_codes(&qt[z * nc..(z + 1) * nc], &want_t.codes, &format!("{what} transposed"));
            assert_bits(&st[z * ns..(z + 1) * ns], &want_t.scales, &format!("{what} transposed"));
        }
    }
}

#[test]
fn quant_t128_matches_cpu_128x1_transposed_bit_for_bit() {
    let Some(dev) = device("quant_t128_matches_cpu_128x1_transposed_bit_for_bit") else { return };
    let mut rng = Rng::new(72);
    for (rows, cols) in QSHAPES.into_iter().chain(QSHAPES_T128_TALL) {
        // per-column magnitudes (the 128x1 tiles run down the columns)
        let x = {
            let t = spread(&mut rng, cols, rows);
            let mut x = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    x[r * cols + c] = t[c * rows + r];
                }
            }
            x
        };
        // output rows 4-byte aligned (the 32-bit code stores) and not (byte stores)
        for (dt, ldq) in DTYPES.into_iter().flat_map(|dt| [(dt, rows + 16), (dt, rows.next_multiple_of(4) + 16)]) {
            for pow2 in [false, true] {
                let want = quantize_unchecked(&as_dtype(&x, dt), rows, cols, ScaleLayout::Tile128x1, pow2).transposed();
                assert_eq!(want.layout, ScaleLayout::Tile1x128);
                let rb = rows.div_ceil(128);
                let mut q = poisoned_u8(&dev, cols * ldq);
                let mut s = poisoned_f32(&dev, cols * rb);
                let out = Fp8Out { q: &mut q, ld: ldq, scale: &mut s, s_rs: rb, s_cs: 1 };
                quant_t128(&dev, &Act::from_f32(&dev, dt, &x).unwrap(), cols, rows, cols, out, pow2).unwrap();
                let gq = download(&dev, &q).unwrap();
                let what = format!("quant_t128 {dt:?} pow2 {pow2} [{rows}, {cols}] ldq {ldq}");
                let codes: Vec<u8> = (0..cols).flat_map(|c| gq[c * ldq..c * ldq + rows].to_vec()).collect();
                assert_codes(&codes, &want.codes, &what);
                assert!((0..cols).all(|c| gq[c * ldq + rows..(c + 1) * ldq].iter().all(|&b| b == 0x7f)), "{what}: pad");
                assert_bits(&download(&dev, &s).unwrap()[..cols * rb], &want.scales, &what);
            }
        }
    }
}

/// The MoE experts' Wgrad operands in one launch (`quant_t128_groups`, as the FP8 training pass's
/// expert Wgrad runs it): each expert's 128-aligned segment (codes from column `seg[e]`, scales
/// from token block `seg[e]/128`) equals `quant_t128` of the expert's rows alone bit for bit;
/// the segments' padding is zero and everything past them stays poisoned. Empty experts (first,
/// middle, last), counts below, at and past 128, rows starting past row 0, strided rows.
#[test]
fn quant_t128_groups_equals_per_expert_quant_t128() {
    let Some(dev) = device("quant_t128_groups_equals_per_expert_quant_t128") else { return };
    let mut rng = Rng::new(76);
    let cases: [(&[usize], usize, usize); 4] = [
        (&[0, 5, 128, 0, 300, 1, 129, 0], 0, 70),
        (&[3, 0, 257, 127, 0], 2, 33),
        (&[1000, 1, 0, 333, 128, 256, 7], 0, 300),
        (&[0, 0], 0, 5),
    ];
    for (counts, first, cols) in cases {
        let mut ro = vec![first as i32];
        for &n in counts {
            ro.push(ro.last().unwrap() + n as i32);
        }
        let (rows, ldx) = (*ro.last().unwrap() as usize, cols + 3);
        let x = spread(&mut rng, rows.max(1), ldx);
        let seg = t128_segments(&ro).unwrap();
        let total = seg[counts.len()];
        assert!(seg.iter().all(|s| s % 128 == 0));
        let (tb, ldq) = (total / 128, total + 16);
        for dt in DTYPES {
            for pow2 in [false, true] {
                let what = format!("quant_t128_groups {dt:?} pow2 {pow2} {counts:?} from row {first}, {cols} cols");
                let xd = Act::from_f32(&dev, dt, &x).unwrap();
                let (mut q, mut s) = (poisoned_u8(&dev, cols * ldq), poisoned_f32(&dev, cols * tb + 1));
                let out = Fp8Out { q: &mut q, ld: ldq, scale: &mut s, s_rs: tb, s_cs: 1 };
                quant_t128_groups(&dev, &xd, ldx, &ro, cols, out, pow2).unwrap();
                let (gq, gs) = (download(&dev, &q).unwrap(), download(&dev, &s).unwrap());
                for (e, &n) in counts.iter().enumerate() {
                    if n == 0 {
                        continue;
                    }
                    // quant_t128 of the expert's rows alone
                    let r0 = ro[e] as usize;
                    let xe = Act::from_f32(&dev, dt, &x[r0 * ldx..(r0 + n) * ldx]).unwrap();
                    let rb = n.div_ceil(128);
                    let (mut qe, mut se) = (poisoned_u8(&dev, cols * n), poisoned_f32(&dev, cols * rb));
                    let oe = Fp8Out { q: &mut qe, ld: n, scale: &mut se, s_rs: rb, s_cs: 1 };
                    quant_t128(&dev, &xe, ldx, n, cols, oe, pow2).unwrap();
                    let (wq, ws) = (download(&dev, &qe).unwrap(), download(&dev, &se).unwrap());
                    let (s0, b0) = (seg[e], seg[e] / 128);
                    let codes: Vec<u8> = (0..cols).flat_map(|c| gq[c * ldq + s0..c * ldq + s0 + n].to_vec()).collect();
                    let scales: Vec<f32> = (0..cols).flat_map(|c| gs[c * tb + b0..c * tb + b0 + rb].to_vec()).collect();
                    assert_codes(&codes, &wq, &format!("{what}: expert {e}"));
                    assert_bits(&scales, &ws, &format!("{what}: expert {e}"));
                    for c in 0..cols {
                        let pad = &gq[c * ldq + s0 + n..c * ldq + seg[e + 1]];
                        assert!(pad.iter().all(|&b| b == 0), "{what}: expert {e} column {c}: padding not zero");
                    }
                }
                for c in 0..cols {
                    let past = &gq[c * ldq + total..(c + 1) * ldq];
                    assert!(past.iter().all(|&b| b == 0x7f), "{what}: column {c}: written past the segments");
                }
                assert!(gs[cols * tb].is_nan(), "{what}: scale past the tensor written");
            }
        }
    }
}

/// `C[m, n] = A[m, k] · B[n, k]ᵀ` in f64.
fn matmul_f64(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|x| a[i * k + x] as f64 * b[j * k + x] as f64).sum();
        }
    }
    c
}

/// The kernels this device runs: SIMT everywhere, the wgmma forms on sm_90a (the TMA kernel with
/// either epilogue).
fn kernels(dev: &Device) -> Vec<Fp8Kernel> {
    if dev.arch == Arch::Sm90a {
        vec![Fp8Kernel::Simt, Fp8Kernel::Wgmma, Fp8Kernel::Wgmma2, Fp8Kernel::Tma, Fp8Kernel::TmaPlain]
    } else {
        vec![Fp8Kernel::Simt]
    }
}

/// Whether `which` can run `g` (the pipelined kernel needs 16-byte aligned K chunks, the TMA one
/// 16-byte leading dimensions; device allocations are aligned).
fn runs(which: Fp8Kernel, g: &Fp8Gemm) -> bool {
    match which {
        Fp8Kernel::Wgmma2 => wgmma2_fits(g, 0, 0),
        Fp8Kernel::Tma | Fp8Kernel::TmaPlain => tma_fits(g, 0, 0),
        _ => true,
    }
}

/// The GPU for a test of the TMA kernel (sm_90a only): None, with a SKIP line, elsewhere.
fn sm90_device(test: &str) -> Option<std::sync::Arc<Device>> {
    let dev = device(test)?;
    if dev.arch != Arch::Sm90a {
        println!("SKIP {test}: the TMA kernel needs sm_90a");
        return None;
    }
    Some(dev)
}

/// Uploads a CPU-quantized tensor as a GEMM operand's buffers (codes, scales in the CPU layout).
fn up(dev: &Device, t: &QTensor) -> (cudarc::driver::CudaSlice<u8>, cudarc::driver::CudaSlice<f32>) {
    (upload(dev, &t.codes).unwrap(), upload(dev, &t.scales).unwrap())
}

/// Checks `got` against core's emulation (`emu`, tolerance relative to the largest output: the
/// tensor cores' in-group accumulation differs from the CPU's f32 sums) and the f64 reference of
/// the unquantized inputs (DeepGEMM's calc_diff < 1e-3).
fn check_gemm(got: &[f32], emu: &[f32], exact: &[f64], tol: f32, what: &str) {
    let amax = emu.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    assert_close(got, emu, tol * amax, tol, &format!("{what} vs core's FP8 emulation"));
    let d = calc_diff(got, exact);
    assert!(d < 1e-3, "{what}: calc_diff {d:e} vs the f64 reference (want < 1e-3)");
}

// the last four have k % 16 == 0 (fp8_gemm_wgmma2 runs them; 1040: its 4-stage ring wraps)
const GSHAPES: [(usize, usize, usize); 7] =
    [(1, 1, 1), (7, 33, 45), (65, 130, 257), (64, 128, 128), (3, 200, 1008), (130, 257, 384), (200, 300, 1040)];

#[test]
fn fp8_gemm_fprop_1x128_by_128x128_matches_emulation_and_f64() {
    let Some(dev) = device("fp8_gemm_fprop_1x128_by_128x128_matches_emulation_and_f64") else { return };
    let mut rng = Rng::new(73);
    for (m, n, k) in GSHAPES {
        let x = randn(&mut rng, m * k);
        let w = randn(&mut rng, n * k);
        let qa = quantize_unchecked(&x, m, k, ScaleLayout::Tile1x128, false);
        let qb = quantize_unchecked(&w, n, k, ScaleLayout::Block128, false);
        let mut emu = vec![0f32; m * n];
        cpu_fp8_gemm(&qa, &qb, &mut emu, false).unwrap();
        let exact = matmul_f64(&x, &w, m, n, k);
        let ((aq, asc), (bq, bsc)) = (up(&dev, &qa), up(&dev, &qb));
        let kg = k.div_ceil(128);
        for which in kernels(&dev) {
            for out_dt in DTYPES {
                let g = Fp8Gemm {
                    m,
                    n,
                    k,
                    a: Fp8Operand { q: &aq, ld: k, scale: &asc, s_rs: kg, s_ks: 1 },
                    b: Fp8Operand { q: &bq, ld: k, scale: &bsc, s_rs: kg, s_ks: 1 },
                    b_scales: BScales::Block128,
                    ldd: n,
                    accumulate: false,
                    groups: 1,
                    stride_b: 0,
                    stride_sb: 0,
                    grouped: None,
                };
                if !runs(which, &g) {
                    continue;
                }
                let mut d = poisoned(&dev, out_dt, m * n);
                fp8_gemm(&dev, &g, &mut d, which).unwrap();
                let tol = if out_dt == DType::Bf16 { BF16_RTOL } else { 2e-3 };
                let what = format!("fprop {which:?} -> {out_dt:?} {m}x{n}x{k}");
                if m * n > 1 {
                    check_gemm(&d.to_f32(&dev).unwrap(), &emu, &exact, tol, &what);
                } else {
                    assert_close(&d.to_f32(&dev).unwrap(), &emu, 1e-6, tol, &what);
                }
            }
        }
    }
}

#[test]
fn fp8_gemm_wgrad_along_tokens_accumulates_into_f32() {
    let Some(dev) = device("fp8_gemm_wgrad_along_tokens_accumulates_into_f32") else { return };
    let mut rng = Rng::new(74);
    // dW[out, in] += dYᵀ·X over T tokens, both operands quantized 128x1 along tokens by the GPU
    for (t, n_out, n_in) in
        [(1usize, 3usize, 5usize), (130, 64, 200), (300, 129, 70), (512, 256, 128), (1024, 130, 200)]
    {
        let dy = randn(&mut rng, t * n_out);
        let x = randn(&mut rng, t * n_in);
        let prev = randn(&mut rng, n_out * n_in);
        let qa = quantize_unchecked(&dy, t, n_out, ScaleLayout::Tile128x1, false).transposed();
        let qb = quantize_unchecked(&x, t, n_in, ScaleLayout::Tile128x1, false).transposed();
        let mut emu = prev.clone();
        cpu_fp8_gemm(&qa, &qb, &mut emu, true).unwrap();
        let dyt: Vec<f32> = (0..n_out * t).map(|i| dy[(i % t) * n_out + i / t]).collect();
        let xt: Vec<f32> = (0..n_in * t).map(|i| x[(i % t) * n_in + i / t]).collect();
        let exact: Vec<f64> =
            matmul_f64(&dyt, &xt, n_out, n_in, t).iter().zip(&prev).map(|(v, &p)| v + p as f64).collect();
        let tg = t.div_ceil(128);
        let quant = |v: &[f32], cols: usize| {
            let (mut q, mut s) = (poisoned_u8(&dev, cols * t), poisoned_f32(&dev, cols * tg));
            let out = Fp8Out { q: &mut q, ld: t, scale: &mut s, s_rs: tg, s_cs: 1 };
            quant_t128(&dev, &Act::from_f32(&dev, DType::F32, v).unwrap(), cols, t, cols, out, false).unwrap();
            (q, s)
        };
        let ((aq, asc), (bq, bsc)) = (quant(&dy, n_out), quant(&x, n_in));
        assert_codes(&download(&dev, &aq).unwrap(), &qa.codes, "wgrad A operand");
        for which in kernels(&dev) {
            let g = Fp8Gemm {
                m: n_out,
                n: n_in,
                k: t,
                a: Fp8Operand { q: &aq, ld: t, scale: &asc, s_rs: tg, s_ks: 1 },
                b: Fp8Operand { q: &bq, ld: t, scale: &bsc, s_rs: tg, s_ks: 1 },
                b_scales: BScales::Tile1x128,
                ldd: n_in,
                accumulate: true,
                groups: 1,
                stride_b: 0,
                stride_sb: 0,
                grouped: None,
            };
            if !runs(which, &g) {
                continue;
            }
            let mut d = Act::from_f32(&dev, DType::F32, &prev).unwrap();
            fp8_gemm(&dev, &g, &mut d, which).unwrap();
            let what = format!("wgrad {which:?} T={t} {n_out}x{n_in}");
            check_gemm(&d.to_f32(&dev).unwrap(), &emu, &exact, 2e-3, &what);
            // D at an odd element of a larger buffer (a parameter's gradient inside the flat
            // gradient arena: 4-byte, not 8-byte aligned): the same values, nothing around it
            // touched (the paired f32 stores must not fault on it: the H100 faulted with
            // CUDA_ERROR_MISALIGNED_ADDRESS before fp8_store2 checked the address)
            let mut big = prev.clone();
            big.insert(0, 7.0);
            big.push(9.0);
            let arena = Act::from_f32(&dev, DType::F32, &big).unwrap();
            {
                let mut dv = ActView::of(&dev, &arena, 1, prev.len()).unwrap();
                fp8_gemm(&dev, &g, &mut dv, which).unwrap();
            }
            let got = arena.to_f32(&dev).unwrap();
            assert_eq!((got[0], got[got.len() - 1]), (7.0, 9.0), "{what}: odd-offset D wrote outside its view");
            check_gemm(&got[1..got.len() - 1], &emu, &exact, 2e-3, &format!("{what}, D at an odd offset"));
        }
    }
}

#[test]
fn fp8_gemm_grouped_contiguous_with_empty_and_ragged_groups() {
    let Some(dev) = device("fp8_gemm_grouped_contiguous_with_empty_and_ragged_groups") else { return };
    let mut rng = Rng::new(75);
    let (n, k) = (200usize, 384usize);
    let rows = [0usize, 70, 1, 130, 64];
    let g = rows.len();
    let m: usize = rows.iter().sum();
    let (mut ro, mut to) = (vec![0i32], vec![0i32]);
    for &r in &rows {
        ro.push(ro.last().unwrap() + r as i32);
        to.push(to.last().unwrap() + r.div_ceil(FP8_BM) as i32);
    }
    let x = randn(&mut rng, m * k);
    let w = randn(&mut rng, g * n * k);
    let qa = quantize_unchecked(&x, m, k, ScaleLayout::Tile1x128, false);
    let qbs: Vec<QTensor> = (0..g)
        .map(|e| quantize_unchecked(&w[e * n * k..(e + 1) * n * k], n, k, ScaleLayout::Block128, false))
        .collect();
    let (mut emu, mut exact) = (vec![0f32; m * n], vec![0f64; m * n]);
    for e in 0..g {
        let (r0, r1) = (ro[e] as usize, ro[e + 1] as usize);
        if r0 == r1 {
            continue;
        }
        let rows_q = QTensor {
            rows: r1 - r0,
            codes: qa.codes[r0 * k..r1 * k].to_vec(),
            scales: qa.scales[r0 * k.div_ceil(128)..r1 * k.div_ceil(128)].to_vec(),
            ..qa.clone()
        };
        cpu_fp8_gemm(&rows_q, &qbs[e], &mut emu[r0 * n..r1 * n], false).unwrap();
        exact[r0 * n..r1 * n].copy_from_slice(&matmul_f64(
            &x[r0 * k..r1 * k],
            &w[e * n * k..(e + 1) * n * k],
            r1 - r0,
            n,
            k,
        ));
    }
    let (aq, asc) = up(&dev, &qa);
    let bq = upload(&dev, &qbs.iter().flat_map(|q| q.codes.clone()).collect::<Vec<u8>>()).unwrap();
    let bsc = upload(&dev, &qbs.iter().flat_map(|q| q.scales.clone()).collect::<Vec<f32>>()).unwrap();
    let (rod, tod) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap());
    let kg = k.div_ceil(128);
    for which in kernels(&dev) {
        let gm = Fp8Gemm {
            m,
            n,
            k,
            a: Fp8Operand { q: &aq, ld: k, scale: &asc, s_rs: kg, s_ks: 1 },
            b: Fp8Operand { q: &bq, ld: k, scale: &bsc, s_rs: kg, s_ks: 1 },
            b_scales: BScales::Block128,
            ldd: n,
            accumulate: false,
            groups: g,
            stride_b: n * k,
            stride_sb: n.div_ceil(128) * kg,
            // one more tile than needed: the extra block must exit
            grouped: Some(Grouped { row_offsets: &rod, tile_offsets: &tod, max_tiles: to[g] as usize + 1 }),
        };
        assert!(runs(which, &gm), "the grouped case is aligned for every kernel");
        // bf16 D: the TMA kernel's full tiles leave by TMA stores, the ragged ones from registers
        for out_dt in DTYPES {
            let mut d = poisoned(&dev, out_dt, m * n);
            fp8_gemm(&dev, &gm, &mut d, which).unwrap();
            let tol = if out_dt == DType::Bf16 { BF16_RTOL } else { 2e-3 };
            check_gemm(&d.to_f32(&dev).unwrap(), &emu, &exact, tol, &format!("grouped {which:?} -> {out_dt:?}"));
        }
    }
}

/// `fp8_gemm_tma_*`'s two epilogues (TMA stores from a swizzled staging buffer; stores from
/// registers) write the same bf16 D bit for bit: dense with ragged m and n (boxes clipped at the
/// tensor's edge, a tile's second box past n skipped), padded D rows (the padding untouched),
/// more block tiles than the 132 persistent blocks (a warpgroup reuses its staging buffer), and grouped with ragged groups (their partial
/// tiles store from registers, the rows below them belong to the next group).
#[test]
fn tma_store_epilogue_equals_the_register_epilogue_bit_for_bit() {
    let Some(dev) = sm90_device("tma_store_epilogue_equals_the_register_epilogue_bit_for_bit") else { return };
    let mut rng = Rng::new(76);
    // (m, n, k, ldd, group rows): dense where empty
    let cases: [(usize, usize, usize, usize, &[usize]); 5] = [
        (200, 200, 384, 200, &[]),
        (130, 130, 272, 144, &[]),
        (64, 128, 128, 128, &[]),
        (2200, 1032, 128, 1040, &[]),
        (0, 264, 256, 272, &[64, 1, 63, 0, 129, 60]),
    ];
    for (m0, n, k, ldd, rows) in cases {
        let m = if rows.is_empty() { m0 } else { rows.iter().sum() };
        let g = rows.len().max(1);
        let (mut ro, mut to) = (vec![0i32], vec![0i32]);
        for &r in rows {
            ro.push(ro.last().unwrap() + r as i32);
            to.push(to.last().unwrap() + r.div_ceil(FP8_BM) as i32);
        }
        let x = spread(&mut rng, m, k);
        let w = randn(&mut rng, g * n * k);
        let qa = quantize_unchecked(&x, m, k, ScaleLayout::Tile1x128, false);
        let qbs: Vec<QTensor> = (0..g)
            .map(|e| quantize_unchecked(&w[e * n * k..(e + 1) * n * k], n, k, ScaleLayout::Block128, false))
            .collect();
        let (aq, asc) = up(&dev, &qa);
        let bq = upload(&dev, &qbs.iter().flat_map(|q| q.codes.clone()).collect::<Vec<u8>>()).unwrap();
        let bsc = upload(&dev, &qbs.iter().flat_map(|q| q.scales.clone()).collect::<Vec<f32>>()).unwrap();
        let (rod, tod) = (upload(&dev, &ro).unwrap(), upload(&dev, &to).unwrap());
        let kg = k.div_ceil(128);
        let gm = Fp8Gemm {
            m,
            n,
            k,
            a: Fp8Operand { q: &aq, ld: k, scale: &asc, s_rs: kg, s_ks: 1 },
            b: Fp8Operand { q: &bq, ld: k, scale: &bsc, s_rs: kg, s_ks: 1 },
            b_scales: BScales::Block128,
            ldd,
            accumulate: false,
            groups: g,
            stride_b: n * k,
            stride_sb: n.div_ceil(128) * kg,
            grouped: if rows.is_empty() {
                None
            } else {
                Some(Grouped { row_offsets: &rod, tile_offsets: &tod, max_tiles: to[g] as usize })
            },
        };
        let whole = dsv3_kernels::ops::fp8_tma::SplitPlan { split_from: 0, splits: 1 };
        assert!(store_by_tma(DType::Bf16, &gm, 0, whole), "the case must take the TMA-store epilogue");
        let run = |which| {
            let mut d = poisoned(&dev, DType::Bf16, m * ldd);
            fp8_gemm(&dev, &gm, &mut d, which).unwrap();
            d.to_f32(&dev).unwrap()
        };
        let (st, regs) = (run(Fp8Kernel::Tma), run(Fp8Kernel::TmaPlain));
        let what = format!("TMA-store vs register epilogue, {m}x{n}x{k} ldd {ldd} groups {rows:?}");
        assert_bits(&st, &regs, &what);
        // every owned element written (a tile the walk skipped would stay NaN in both)
        let owned = if rows.is_empty() { m } else { rows.iter().sum() };
        assert!((0..owned).all(|r| st[r * ldd..r * ldd + n].iter().all(|v| v.is_finite())), "{what}: unwritten D");
        // the padding past n in each row is the poison both left
        assert!((0..m).all(|r| st[r * ldd + n..(r + 1) * ldd].iter().all(|v| v.is_nan())), "{what}: padding written");
    }
}

/// A dense FP8 product on the device: `x [m, k]` (1x128 tiles) times `w [n, k]` (128x128 blocks;
/// a Wgrad: 1x128 tiles and an f32 D accumulated onto `prev`), with the unquantized inputs.
struct Dense {
    m: usize,
    n: usize,
    k: usize,
    wgrad: bool,
    x: Vec<f32>,
    w: Vec<f32>,
    prev: Vec<f32>,
    a: (cudarc::driver::CudaSlice<u8>, cudarc::driver::CudaSlice<f32>),
    b: (cudarc::driver::CudaSlice<u8>, cudarc::driver::CudaSlice<f32>),
}

/// The TMA kernel's plain form (neither epilogue fusion), then its default form twice.
const THREE: [Fp8Kernel; 3] = [Fp8Kernel::TmaPlain, Fp8Kernel::Tma, Fp8Kernel::Tma];

impl Dense {
    fn new(dev: &Device, rng: &mut Rng, m: usize, n: usize, k: usize, wgrad: bool) -> Dense {
        let x = spread(rng, m, k);
        let w = randn(rng, n * k);
        let qa = quantize_unchecked(&x, m, k, ScaleLayout::Tile1x128, false);
        let qb =
            quantize_unchecked(&w, n, k, if wgrad { ScaleLayout::Tile1x128 } else { ScaleLayout::Block128 }, false);
        let prev = randn(rng, m * n);
        Dense { m, n, k, wgrad, x, w, prev, a: up(dev, &qa), b: up(dev, &qb) }
    }
    fn dt(&self) -> DType {
        if self.wgrad {
            DType::F32
        } else {
            DType::Bf16
        }
    }
    fn gemm(&self) -> Fp8Gemm<'_> {
        let kg = self.k.div_ceil(128);
        Fp8Gemm {
            m: self.m,
            n: self.n,
            k: self.k,
            a: Fp8Operand { q: &self.a.0, ld: self.k, scale: &self.a.1, s_rs: kg, s_ks: 1 },
            b: Fp8Operand { q: &self.b.0, ld: self.k, scale: &self.b.1, s_rs: kg, s_ks: 1 },
            b_scales: if self.wgrad { BScales::Tile1x128 } else { BScales::Block128 },
            ldd: self.n,
            accumulate: self.wgrad,
            groups: 1,
            stride_b: 0,
            stride_sb: 0,
            grouped: None,
        }
    }
    /// D after one `fp8_gemm` with each kernel of `which` (from `prev` for a Wgrad, else from
    /// NaN poison); `reduces(which, n)` is told how many `fp8_splitk_reduce_*` launches it made.
    fn run_each(&self, dev: &Device, which: [Fp8Kernel; 3], reduces: impl Fn(Fp8Kernel, usize)) -> Vec<Vec<f32>> {
        let (g, dt) = (self.gemm(), self.dt());
        which
            .into_iter()
            .map(|w| {
                let mut d = if self.wgrad {
                    Act::from_f32(dev, dt, &self.prev).unwrap()
                } else {
                    poisoned(dev, dt, self.m * self.n)
                };
                dev.profile_begin().unwrap();
                fp8_gemm(dev, &g, &mut d, w).unwrap();
                let ran = dev.profile_end().unwrap().kernels;
                reduces(w, ran.iter().filter(|k| k.name.starts_with("fp8_splitk_reduce")).count());
                d.to_f32(dev).unwrap()
            })
            .collect()
    }
}

/// Split-K (dense calls with too few tiles to fill the GPU, e.g. M = 128) summed inside
/// `fp8_gemm_tma_*` (the warpgroup finishing a tile's last split adds the partials, per-tile
/// arrival counters) writes the same bits as the separate `fp8_splitk_reduce_*` launch
/// (`Fp8Kernel::TmaPlain`), for a bf16 Fprop and an f32 Wgrad accumulating into D, twice in a row
/// (the counters must come back to zero for the second call); and launches no reduce kernel.
#[test]
fn split_k_summed_in_the_kernel_equals_the_reduce_launch_bit_for_bit() {
    let Some(dev) = sm90_device("split_k_summed_in_the_kernel_equals_the_reduce_launch_bit_for_bit") else { return };
    let mut rng = Rng::new(77);
    // (m, n, k, Wgrad: 1x128 B scales and f32 D accumulated)
    for (m, n, k, wgrad) in [(128usize, 384usize, 2048usize, false), (130, 200, 2000, true)] {
        let case = Dense::new(&dev, &mut rng, m, n, k, wgrad);
        let what = format!("split-K {m}x{n}x{k} -> {:?}", case.dt());
        let outs = case.run_each(&dev, THREE, |which, reduces| {
            assert_eq!(reduces, usize::from(which == Fp8Kernel::TmaPlain), "{what} {which:?}: reduce launches");
        });
        assert!(outs[0].iter().all(|v| v.is_finite()), "{what}: unwritten D");
        assert_bits(&outs[1], &outs[0], &format!("{what}: in-kernel sum vs the reduce launch"));
        assert_bits(&outs[2], &outs[0], &format!("{what}: the second in-kernel call (counters re-armed)"));
    }
}

/// A walk whose last wave holds few block tiles splits just those along K (`split_plan`): the
/// whole tiles are bit for bit the kernel's without the split (`Fp8Kernel::TmaPlain`, whole tiles
/// everywhere), the split ones agree with the f64 reference, no reduce kernel runs, and a second
/// call (counters re-armed) gives the same bits. bf16 Fprop (whole tiles stored by TMA) and f32
/// Wgrad accumulating into D.
#[test]
fn the_last_waves_tiles_split_along_k_and_the_rest_run_whole() {
    let Some(dev) = sm90_device("the_last_waves_tiles_split_along_k_and_the_rest_run_whole") else { return };
    if std::env::var("DSV3_FP8_SPLITK").is_ok() || std::env::var("DSV3_FP8_TAIL_SPLIT").is_ok() {
        println!("SKIP the_last_waves_tiles_split_along_k_and_the_rest_run_whole: split-K forced by the environment");
        return;
    }
    use dsv3_kernels::ops::fp8_tma::{set_tail_split, split_plan, TailSplit};
    // the split whenever the last wave allows it (Auto would wait for a longer K: this K keeps the
    // test's emulated run short); no other test of this file has a partly filled last wave
    set_tail_split(TailSplit::Always);
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            set_tail_split(TailSplit::Auto);
        }
    }
    let _restore = Restore;
    let mut rng = Rng::new(78);
    // 8 row tiles (one band of the L2 order) x (sms / 8 + 1) column tiles: 1..=8 tiles past the
    // last full wave
    let (m, k) = (1024usize, 1024usize);
    let nt = dev.sms / 8 + 1;
    let tiles = 8 * nt;
    let plan = split_plan(tiles, k / 128, dev.sms, true);
    assert!(plan.split_from > 0 && plan.splits > 1, "{tiles} tiles on {} SMs: {plan:?}", dev.sms);
    // the split tiles: the last of the walk (column-major inside the band of 8 row tiles)
    let split_tile = |r: usize, c: usize| {
        let t = (c / 128) * 8 + r / 128;
        t >= plan.split_from
    };
    for (n, wgrad) in [(nt * 128 - 40, false), (nt * 128, true)] {
        let case = Dense::new(&dev, &mut rng, m, n, k, wgrad);
        let what = format!("tail split {m}x{n}x{k} -> {:?} ({plan:?})", case.dt());
        let outs = case.run_each(&dev, THREE, |which, reduces| {
            assert_eq!(reduces, 0, "{what} {which:?}: reduce launches");
        });
        assert!(outs[1].iter().all(|v| v.is_finite()), "{what}: unwritten D");
        assert_bits(&outs[2], &outs[1], &format!("{what}: the second call (counters re-armed)"));
        let (mut split, mut whole) = (0, 0);
        for r in 0..m {
            for c in 0..n {
                let (got, plain) = (outs[1][r * n + c], outs[0][r * n + c]);
                if split_tile(r, c) {
                    split += 1;
                } else {
                    whole += 1;
                    assert_eq!(got.to_bits(), plain.to_bits(), "{what}: whole tile element ({r}, {c})");
                }
            }
        }
        assert!(split > 0 && whole > 0, "{what}: {split} split and {whole} whole elements");
        let mut exact = matmul_f64(&case.x, &case.w, m, n, k);
        if wgrad {
            exact.iter_mut().zip(&case.prev).for_each(|(e, p)| *e += *p as f64);
        }
        let d = calc_diff(&outs[1], &exact);
        assert!(d < 1e-3, "{what}: calc_diff {d:e} vs the f64 reference (want < 1e-3)");
        // the split tiles: each element near the whole-tile kernel's (the K splits' f32 sums round
        // differently; bf16 D within a rounding step)
        let amax = outs[0].iter().fold(0f32, |a, v| a.max(v.abs()));
        let tol = if wgrad { 1e-5 } else { BF16_RTOL };
        assert_close(&outs[1], &outs[0], tol * amax, tol, &format!("{what}: split tiles vs whole"));
    }
}

#[test]
fn fp8_launchers_refuse_bad_shapes_without_launching() {
    let Some(dev) = device("fp8_launchers_refuse_bad_shapes_without_launching") else { return };
    let x = Act::from_f32(&dev, DType::F32, &[1.0; 256]).unwrap();
    let (mut q, mut s) = (poisoned_u8(&dev, 256), poisoned_f32(&dev, 1));
    // 2 rows of 128 need 2 scales
    assert!(quant_1x128(&dev, &x, 128, 2, 128, Fp8Out::dense(&mut q, &mut s, 128), false).is_err());
    let (aq, asc) = (poisoned_u8(&dev, 256), poisoned_f32(&dev, 2));
    let g = Fp8Gemm {
        m: 2,
        n: 2,
        k: 129,
        a: Fp8Operand { q: &aq, ld: 129, scale: &asc, s_rs: 2, s_ks: 1 },
        b: Fp8Operand { q: &aq, ld: 129, scale: &asc, s_rs: 2, s_ks: 1 },
        b_scales: BScales::Tile1x128,
        ldd: 2,
        accumulate: false,
        groups: 1,
        stride_b: 0,
        stride_sb: 0,
        grouped: None,
    };
    let mut d = poisoned(&dev, DType::F32, 4);
    assert!(fp8_gemm(&dev, &g, &mut d, Fp8Kernel::Auto).is_err());
}
