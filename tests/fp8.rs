//! FP8: formats and quantization against torch / DeepSeek's reference (tests/fixtures/fp8), and
//! the GEMM: with promotion every 128 K it agrees with an f64 GEMM (calc_diff < 1e-3); through an
//! emulated ~14-bit tensor-core accumulator without promotion it does not.
mod common;
use dsv3::fp8::gemm::{calc_diff, fp8_gemm, fp8_gemm_limited_accumulator};
use dsv3::fp8::quant::{quantize, Role, ScaleLayout};
use dsv3::rng::Rng;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

#[test]
fn promotion_matters_at_k_4096() {
    let (m, n, k) = (16, 24, 4096);
    // all-positive inputs make the running sum large, which is where a short accumulator loses bits
    let a: Vec<f32> = randn(m * k, 1).iter().map(|x| x.abs()).collect();
    let b: Vec<f32> = randn(n * k, 2).iter().map(|x| x.abs()).collect();
    let mut exact = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            exact[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum();
        }
    }
    let qa = quantize(&a, m, k, ScaleLayout::Tile1x128, Role::Activation, false).unwrap();
    let qb = quantize(&b, n, k, ScaleLayout::Block128, Role::Weight, false).unwrap();
    let mut c = vec![0f32; m * n];
    fp8_gemm(&qa, &qb, &mut c, false).unwrap();
    let promoted = calc_diff(&c, &exact);
    let max_rel = |c: &[f32]| c.iter().zip(&exact).map(|(x, y)| ((*x as f64 - y) / y).abs()).fold(0f64, f64::max);
    // per-tensor scales for the no-promotion path (a tensor core cannot apply per-group scales)
    let amax = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let qa1 = quantize(&a, m, k, ScaleLayout::Tile1x128, Role::Activation, false).unwrap();
    let mut qa1 = qa1;
    let sa = amax(&a) / 448.0;
    qa1.codes = a.iter().map(|&x| dsv3::fp8::Fp8Format::E4M3.encode(x / sa)).collect();
    qa1.scales.iter_mut().for_each(|s| *s = sa);
    let sb = amax(&b) / 448.0;
    let mut qb1 = quantize(&b, n, k, ScaleLayout::Block128, Role::Weight, false).unwrap();
    qb1.codes = b.iter().map(|&x| dsv3::fp8::Fp8Format::E4M3.encode(x / sb)).collect();
    qb1.scales.iter_mut().for_each(|s| *s = sb);
    let limited = fp8_gemm_limited_accumulator(&qa1, &qb1, 14);
    let mut c1 = vec![0f32; m * n];
    fp8_gemm(&qa1, &qb1, &mut c1, false).unwrap();
    eprintln!(
        "K=4096: promoted calc_diff {promoted:.2e}, max rel err {:.2e}; 14-bit accumulator without promotion: max rel err {:.2e} (same operands promoted: {:.2e})",
        max_rel(&c),
        max_rel(&limited),
        max_rel(&c1)
    );
    assert!(promoted < 1e-3, "calc_diff {promoted}");
    assert!(max_rel(&limited) > 5e-3, "the short accumulator should lose ~1-2%: {}", max_rel(&limited));
    assert!(max_rel(&limited) > 10.0 * max_rel(&c1));
}

#[test]
fn fp8_linear_fprop_dgrad_wgrad_agree_with_f32() {
    use dsv3::model::linear::{Linear, Precision};
    // ragged shapes: partial 128 tiles along every axis
    let (m, n, k) = (300, 200, 260);
    let x = randn(m * k, 3);
    let w: Vec<f32> = randn(n * k, 4).iter().map(|v| v * 0.05).collect();
    let dy = randn(m * n, 5);
    let f32l = Linear::from_f32(n, k, w.clone(), None);
    let mut fp8l = f32l.clone();
    fp8l.precision = Precision::Fp8;
    let run = |l: &Linear| {
        let mut y = vec![0f32; m * n];
        l.forward(&x, m, &mut y);
        let mut g = Linear::from_f32(n, k, vec![0.0; n * k], None);
        let mut dx = vec![0f32; m * k];
        l.backward(&x, m, &dy, &mut g, Some(&mut dx), false);
        (y, dx, g.dense())
    };
    let (y0, dx0, dw0) = run(&f32l);
    let (y1, dx1, dw1) = run(&fp8l);
    let d = |a: &[f32], b: &[f32]| calc_diff(a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let (df, dd, dw) = (d(&y1, &y0), d(&dx1, &dx0), d(&dw1, &dw0));
    eprintln!("FP8 vs f32 calc_diff: Fprop {df:.2e}, Dgrad {dd:.2e}, Wgrad {dw:.2e}");
    assert!(df < 1e-3 && dd < 1e-3 && dw < 1e-3, "{df} {dd} {dw}");
    assert!(df > 0.0, "the FP8 path must actually quantize");
}

#[test]
fn fp8_and_bf16_training_track_f32() {
    use dsv3::model::linear::Precision;
    use dsv3::model::LoadOptions;
    use dsv3::train::data::{Dataset, Loader};
    use dsv3::train::{AdamW, LrSchedule, TrainConfig, Trainer};
    let base = common::load("v3_group", LoadOptions::default());
    // a noisy Markov chain: learnable, with an entropy floor of ln 4 (so relative gaps mean something)
    let mut r = Rng::new(17);
    let mut tokens = vec![1u32];
    for _ in 0..4000 {
        let prev = *tokens.last().unwrap();
        tokens.push((prev * 5 + r.below(4) as u32) % 128);
    }
    let mut finals = Vec::new();
    for p in [Precision::F32, Precision::Bf16, Precision::Fp8] {
        let cfg = TrainConfig { schedule: LrSchedule::Constant { lr: 4e-3 }, precision: p, ..Default::default() };
        let mut opt = AdamW::deepseek_v3();
        opt.bf16_moments = p != Precision::F32;
        let mut tr = Trainer::new(base.clone(), opt, cfg);
        let mut l = Loader::new(Dataset::Stream(tokens.clone()), 32, 8, 3);
        let losses: Vec<f32> = (0..80).map(|_| tr.train_step(&[l.next_batch()]).unwrap().loss).collect();
        assert!(losses[79] < losses[0] * 0.8, "{p:?} trains: {losses:?}");
        finals.push(losses.iter().rev().take(10).sum::<f32>() / 10.0);
    }
    let gap = |x: f32| ((x - finals[0]) / finals[0]).abs();
    eprintln!(
        "final loss f32 {:.4}, bf16 {:.4} ({:.2}%), fp8 {:.4} ({:.2}%)",
        finals[0],
        finals[1],
        100.0 * gap(finals[1]),
        finals[2],
        100.0 * gap(finals[2])
    );
    // an 80-step run at high LR is noisy: this guards against gross errors (a wrong scale or tiling
    // shows up as tens of percent); the few-hundred-step experiment is in docs/FP8.md
    assert!(gap(finals[2]) < 0.06 && gap(finals[1]) < 0.06);
}

fn fixture(name: &str) -> dsv3::weights::TensorStore {
    dsv3::weights::file::read_safetensors(&common::fixture("fp8").join(name)).unwrap()
}

#[test]
fn casts_match_torch_on_every_code_and_a_200k_sweep() {
    use dsv3::fp8::Fp8Format::{E4M3, E5M2};
    let st = fixture("casts.safetensors");
    let f32s = |n: &str| -> Vec<f32> {
        st.get(n).unwrap().bytes().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    for (fmt, name) in [(E4M3, "e4m3_codes_decoded"), (E5M2, "e5m2_codes_decoded")] {
        for (code, want) in f32s(name).iter().enumerate() {
            let got = fmt.decode(code as u8);
            assert!(got == *want || (got.is_nan() && want.is_nan()), "{fmt:?} code {code:#x}: {got} vs torch {want}");
        }
    }
    let x = f32s("sweep");
    for (fmt, name) in [(E4M3, "sweep_e4m3"), (E5M2, "sweep_e5m2")] {
        let want = st.get(name).unwrap().bytes();
        let mut bad = 0;
        for (i, (&v, &w)) in x.iter().zip(want).enumerate() {
            let got = fmt.encode(v);
            let ok = if v.is_nan() { got & 0x7F == 0x7F && w & 0x7F == 0x7F } else { got == w };
            if !ok && bad < 5 {
                eprintln!("{fmt:?}: {v:e} (index {i}) -> {got:#04x}, torch {w:#04x}");
            }
            bad += !ok as usize;
        }
        assert_eq!(bad, 0, "{fmt:?}: {bad} of {} codes differ from torch", x.len());
    }
}

#[test]
fn quantization_matches_deepseek_reference_bit_for_bit() {
    let st = fixture("quant.safetensors");
    let f = |n: &str| st.get(n).unwrap().to_f32().unwrap();
    let u = |n: &str| st.get(n).unwrap().bytes().to_vec();
    let shape = |n: &str| st.get(n).unwrap().shape.clone();
    let cases = [
        ("act", "act_q", "act_scale", ScaleLayout::Tile1x128, Role::Activation, false),
        ("act", "act_q_ue8m0", "act_scale_ue8m0", ScaleLayout::Tile1x128, Role::Activation, true),
        ("act_zero_tile", "act_zero_tile_q", "act_zero_tile_scale", ScaleLayout::Tile1x128, Role::Activation, false),
        (
            "act_zero_tile",
            "act_zero_tile_q_ue8m0",
            "act_zero_tile_scale_ue8m0",
            ScaleLayout::Tile1x128,
            Role::Activation,
            true,
        ),
        ("w", "w_q", "w_scale", ScaleLayout::Block128, Role::Weight, false),
        ("wgrad", "wgrad_q", "wgrad_scale", ScaleLayout::Tile128x1, Role::ActivationGrad, false),
        ("gemm_a", "gemm_a_q", "gemm_a_scale", ScaleLayout::Tile1x128, Role::Activation, false),
        ("gemm_b", "gemm_b_q", "gemm_b_scale", ScaleLayout::Block128, Role::Weight, false),
    ];
    for (x, q, s, layout, role, ue) in cases {
        let sh = shape(x);
        let got = quantize(&f(x), sh[0], sh[1], layout, role, ue).unwrap();
        assert_eq!(got.scales, f(s), "{q}: scales");
        assert_eq!(got.codes, u(q), "{q}: codes");
    }
    // the promoted GEMM of DeepSeek's quantized operands against the f64 product of their
    // dequantized values: the emulation itself adds almost nothing
    let sa = shape("gemm_a");
    let qa = quantize(&f("gemm_a"), sa[0], sa[1], ScaleLayout::Tile1x128, Role::Activation, false).unwrap();
    let sb = shape("gemm_b");
    let qb = quantize(&f("gemm_b"), sb[0], sb[1], ScaleLayout::Block128, Role::Weight, false).unwrap();
    let mut c = vec![0f32; sa[0] * sb[0]];
    fp8_gemm(&qa, &qb, &mut c, false).unwrap();
    let deq: Vec<f64> = f("gemm_ref_deq").iter().map(|&v| v as f64).collect();
    let full: Vec<f64> = f("gemm_ref").iter().map(|&v| v as f64).collect();
    let (d1, d2) = (calc_diff(&c, &deq), calc_diff(&c, &full));
    eprintln!(
        "fp8_gemm vs dequantized f64 product: calc_diff {d1:.1e}; vs the f64 product of the f32 inputs: {d2:.1e}"
    );
    assert!(d1 < 1e-5 && d2 < 1e-3);
}
