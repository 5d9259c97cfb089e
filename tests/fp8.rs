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
