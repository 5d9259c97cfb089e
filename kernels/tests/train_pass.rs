//! The GPU training pass (`dsv3_kernels::train::CudaTrainModel`) against the CPU oracle
//! (`Model::train_pass`) on every test configuration (tests/fixtures, made trainable): f32 mode
//! per tensor to a relative L2 of 1e-4 with equal losses (1e-5 relative) and expert loads; bf16
//! mode within a stated looser bound. Cases: ragged and equal-length sequences, the
//! sequence-wise and auxiliary balance losses, a loss mask, `scale != 1`, the MTP loss, two
//! passes accumulating. Also: `download` round-trips the weights exactly, `zero_grads`, errors. Skip
//! without a GPU.
mod common;
use common::*;
use dsv3_core::model::train::{PassOptions, PassOutput};
use dsv3_core::model::{LoadOptions, Model};
use dsv3_kernels::train::{CudaTrainModel, TrainOptions};
use dsv3_kernels::DType;
use std::path::Path;

const FIXTURES: [&str; 8] =
    ["v3_group", "v3_tiny", "v3_qnull", "v3_yarn", "v3_yarn_mscale", "v3_fp8", "v2_lite", "v2_group"];

fn load(name: &str) -> Model {
    // DSV3_FIXTURES: where tests/fixtures is when the test binary runs on another machine
    let root = std::env::var_os("DSV3_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    let mut m = Model::load(&root.join(name), LoadOptions::default()).unwrap();
    m.make_trainable();
    m
}

fn random_seqs(v: usize, lens: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = dsv3_core::rng::Rng::new(seed);
    lens.iter().map(|&n| (0..n).map(|_| rng.below(v as u64) as u32).collect()).collect()
}

fn refs(s: &[Vec<u32>]) -> Vec<&[u32]> {
    s.iter().map(|v| &v[..]).collect()
}

/// One pass of a case: its sequence lengths and options.
type Pass = (Vec<usize>, PassOptions);

/// The cases: passes run one after another, accumulating.
fn cases() -> Vec<(&'static str, Vec<Pass>)> {
    let plain = PassOptions::default();
    let predicted = |lens: &[usize]| lens.iter().map(|&l| l.saturating_sub(1)).sum::<usize>();
    let ragged = vec![5usize, 1, 12, 3];
    let mask: Vec<f32> = (0..predicted(&ragged)).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 }).collect();
    vec![
        ("ragged", vec![(ragged.clone(), plain.clone())]),
        ("equal lengths", vec![(vec![7, 7, 7], plain.clone())]),
        (
            "balance losses, mask, scale",
            vec![(
                ragged.clone(),
                PassOptions { scale: 0.37, seq_alpha: 0.01, aux_alpha: 0.02, mask: Some(mask), mtp_lambda: 0.0 },
            )],
        ),
        (
            "MTP loss (where the fixture has MTP modules) with balance losses",
            vec![(ragged.clone(), PassOptions { seq_alpha: 0.01, mtp_lambda: 0.3, ..plain.clone() })],
        ),
        (
            "two passes accumulating",
            vec![
                (vec![6, 6, 2], PassOptions { scale: 0.5, seq_alpha: 0.003, ..plain.clone() }),
                (vec![9, 4], PassOptions { scale: 0.5, aux_alpha: 0.01, ..plain }),
            ],
        ),
    ]
}

/// Every trainable tensor of `m` by name, in visit order.
fn tensors(m: &Model) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    m.clone().visit(&mut |n, t| out.push((n.to_string(), t.to_vec())));
    out
}

/// Runs `case` on the CPU and the GPU: (CPU outputs, CPU grads, GPU outputs, GPU grads).
#[allow(clippy::type_complexity)]
fn run_case(
    model: &Model,
    gm: &mut CudaTrainModel,
    passes: &[Pass],
    seed: u64,
) -> (Vec<PassOutput>, Model, Vec<PassOutput>, Model) {
    let v = model.cfg.vocab_size;
    let mut cg = model.zeros_like();
    gm.zero_grads().unwrap();
    let (mut co, mut go) = (Vec::new(), Vec::new());
    for (j, (lens, opts)) in passes.iter().enumerate() {
        let s = random_seqs(v, lens, seed + j as u64);
        co.push(model.train_pass(&refs(&s), &mut cg, opts).unwrap());
        go.push(gm.pass(&refs(&s), opts).unwrap());
    }
    let mut gg = model.zeros_like();
    gm.download_grads(&mut gg).unwrap();
    (co, cg, go, gg)
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn f32_pass_matches_the_cpu_oracle_on_every_fixture() {
    let Some(dev) = device("f32_pass_matches_the_cpu_oracle_on_every_fixture") else { return };
    for name in FIXTURES {
        let model = load(name);
        let mut gm = CudaTrainModel::new(dev.clone(), &model, TrainOptions::new(DType::F32)).unwrap();
        for (ci, (case, passes)) in cases().into_iter().enumerate() {
            let (co, cg, go, gg) = run_case(&model, &mut gm, &passes, 100 + ci as u64);
            for (c, g) in co.iter().zip(&go) {
                assert!(rel(g.ce_loss, c.ce_loss) <= 1e-5, "{name} {case}: loss {} vs CPU {}", g.ce_loss, c.ce_loss);
                assert!(
                    (g.balance_loss - c.balance_loss).abs() <= 1e-5 * c.balance_loss.abs() + 1e-9,
                    "{name} {case}: balance loss {} vs CPU {}",
                    g.balance_loss,
                    c.balance_loss
                );
                assert_eq!(g.loads, c.loads, "{name} {case}: expert loads");
                assert_eq!(g.predicted, c.predicted, "{name} {case}");
                assert!(
                    (g.mtp_loss - c.mtp_loss).abs() <= 1e-5 * c.mtp_loss.abs(),
                    "{name} {case}: MTP loss {} vs CPU {}",
                    g.mtp_loss,
                    c.mtp_loss
                );
            }
            let mut worst = (0f64, String::new());
            for ((n, want), (n2, got)) in tensors(&cg).iter().zip(tensors(&gg)) {
                assert_eq!(n, &n2);
                let wn: f64 = want.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                if wn == 0.0 {
                    let e = max_abs_diff(&got, want);
                    assert!(e <= 1e-7, "{name} {case}: {n} should have no gradient, max |g| {e}");
                    continue;
                }
                let e = rel_l2(&got, want);
                if e > worst.0 || e.is_nan() {
                    worst = (e, n.clone());
                }
                assert!(e <= 1e-4, "{name} {case}: gradient of {n}: relative L2 {e:.3e}");
            }
            eprintln!("{name} {case}: f32 worst gradient {} at {:.3e}", worst.1, worst.0);
        }
    }
}

#[test]
fn bf16_pass_is_close_to_the_cpu_oracle() {
    let Some(dev) = device("bf16_pass_is_close_to_the_cpu_oracle") else { return };
    // bf16 activations and GEMM operands (2^-9 relative per rounding, ~20 roundings deep): the
    // per-tensor bound is loose, the global one (all gradients as one vector) tighter. A router
    // near-tie may pick another expert in bf16: that expert's gradients (and everything upstream
    // of it) then differ wholesale, so a case whose expert loads differ from the CPU's is counted
    // and checked on its loss alone. Measured on the H100 (2026-11-24): routing-equal cases at a
    // global relative L2 of 5e-3..7e-2 (the MTP and group-limited fixtures highest), worst
    // tensors up to 1.0e-1; the routing flips at 0.6..196 on one expert's tensors.
    const BF16_LOSS: f32 = 2e-2;
    const BF16_GLOBAL: f64 = 1e-1;
    const BF16_TENSOR: f64 = 0.3;
    const BF16_TENSOR_ATOL: f64 = 1e-2;
    let mut failures = Vec::new();
    let (mut n_cases, mut routing_differs) = (0, 0);
    for name in FIXTURES {
        let model = load(name);
        let mut gm = CudaTrainModel::new(dev.clone(), &model, TrainOptions::new(DType::Bf16)).unwrap();
        for (ci, (case, passes)) in cases().into_iter().enumerate() {
            let (co, cg, go, gg) = run_case(&model, &mut gm, &passes, 200 + ci as u64);
            n_cases += 1;
            for (c, g) in co.iter().zip(&go) {
                if rel(g.ce_loss, c.ce_loss) > BF16_LOSS {
                    failures.push(format!("{name} {case}: loss {} vs CPU {}", g.ce_loss, c.ce_loss));
                }
            }
            if co.iter().zip(&go).any(|(c, g)| c.loads != g.loads) {
                routing_differs += 1;
                let loads = |o: &[PassOutput]| o.iter().map(|p| p.loads.clone()).collect::<Vec<_>>();
                eprintln!(
                    "{name} {case}: expert loads differ (a routing near-tie; gradients not compared): {:?} vs {:?}",
                    loads(&go),
                    loads(&co)
                );
                continue;
            }
            let (mut all_g, mut all_c) = (Vec::new(), Vec::new());
            let pairs: Vec<(String, Vec<f32>, Vec<f32>)> =
                tensors(&cg).into_iter().zip(tensors(&gg)).map(|((n, want), (_, got))| (n, want, got)).collect();
            for (_, want, got) in &pairs {
                all_g.extend_from_slice(got);
                all_c.extend_from_slice(want);
            }
            let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let total = norm(&all_c);
            // per tensor: relative L2 within BF16_TENSOR, plus an absolute allowance of
            // BF16_TENSOR_ATOL of the whole gradient's norm: an expert that saw one or two tokens
            // has a small gradient whose relative error can be large from bf16 cancellation alone
            // (the CPU emulator, DSV3_TRAIN_FLASH=0: v3_group's MTP expert 15 at 0.9 relative)
            let mut worst = (0f64, String::new(), 0f64);
            for (n, want, got) in &pairs {
                if want.iter().all(|&x| x == 0.0) {
                    continue;
                }
                let e = rel_l2(got, want);
                let share = norm(want) / total;
                let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
                let over = norm(&diff) / total - BF16_TENSOR * share;
                if e.is_nan() || e > worst.0 {
                    worst = (e, n.clone(), share);
                }
                if over.is_nan() || over > BF16_TENSOR_ATOL {
                    failures.push(format!(
                        "{name} {case}: {n}: relative L2 {e:.3e} at {:.2}% of the gradient's norm",
                        100.0 * share
                    ));
                }
            }
            let global = rel_l2(&all_g, &all_c);
            eprintln!(
                "{name} {case}: bf16 global relative L2 {global:.3e}, worst tensor {} at {:.3e} ({:.2}% of the norm)",
                worst.1,
                worst.0,
                100.0 * worst.2
            );
            if global.is_nan() || global > BF16_GLOBAL {
                failures.push(format!("{name} {case}: global {global:.3e}"));
            }
        }
    }
    eprintln!("bf16 pass: {routing_differs} of {n_cases} cases routed differently from the CPU");
    // the gradient comparison must not become vacuous: most cases route as the CPU does
    assert!(routing_differs * 2 <= n_cases, "{routing_differs} of {n_cases} cases routed differently");
    assert!(failures.is_empty(), "bf16 pass outside the bounds: {failures:#?}");
}

#[test]
fn download_round_trips_the_weights_and_biases() {
    let Some(dev) = device("download_round_trips_the_weights_and_biases") else { return };
    for name in ["v3_group", "v3_qnull", "v2_lite"] {
        let model = load(name);
        for dtype in [DType::F32, DType::Bf16] {
            let gm = CudaTrainModel::new(dev.clone(), &model, TrainOptions::new(dtype)).unwrap();
            assert_eq!(
                gm.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                tensors(&model).into_iter().map(|t| t.0).collect::<Vec<_>>()
            );
            let mut back = model.zeros_like();
            for l in &mut back.layers {
                if let dsv3_core::model::block::Ffn::Moe(m) = &mut l.ffn {
                    if let Some(b) = &mut m.router.bias {
                        b.iter_mut().for_each(|x| *x = -7.0);
                    }
                }
            }
            gm.download(&mut back).unwrap();
            for ((n, a), (_, b)) in tensors(&model).iter().zip(tensors(&back)) {
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: {n} changed");
            }
            for (l, (a, b)) in model.layers.iter().zip(&back.layers).enumerate() {
                if let (dsv3_core::model::block::Ffn::Moe(ma), dsv3_core::model::block::Ffn::Moe(mb)) = (&a.ffn, &b.ffn)
                {
                    assert_eq!(ma.router.bias, mb.router.bias, "{name}: layer {l} router bias");
                }
            }
            // a DParam's view reads its tensor
            let p = &gm.params[1];
            let v = dsv3_kernels::tensor::download(&dev, &p.w).unwrap();
            let want = &tensors(&model)[1].1;
            assert_eq!(&v, want, "{name}: {}", p.name);
        }
    }
}

#[test]
fn zero_grads_clears_and_bad_inputs_are_errors() {
    let Some(dev) = device("zero_grads_clears_and_bad_inputs_are_errors") else { return };
    let model = load("v3_tiny");
    let mut gm = CudaTrainModel::new(dev.clone(), &model, TrainOptions::new(DType::F32)).unwrap();
    let s = random_seqs(model.cfg.vocab_size, &[6, 4], 5);
    gm.pass(&refs(&s), &PassOptions::default()).unwrap();
    let g = dsv3_kernels::tensor::download(&dev, gm.grads()).unwrap();
    assert!(g.iter().any(|&x| x != 0.0));
    gm.zero_grads().unwrap();
    let g = dsv3_kernels::tensor::download(&dev, gm.grads()).unwrap();
    assert!(g.iter().all(|&x| x == 0.0));
    let v = model.cfg.vocab_size as u32;
    assert!(gm.pass(&[&[1, v][..]], &PassOptions::default()).is_err(), "token out of range");
    assert!(gm.pass(&[&[1][..], &[][..]], &PassOptions::default()).is_err(), "nothing to predict");
    let bad_mask = PassOptions { mask: Some(vec![1.0; 2]), ..PassOptions::default() };
    assert!(gm.pass(&refs(&s), &bad_mask).is_err(), "mask length");
}

/// The training pass is bit-reproducible: two runs of the same micro-batches from the same
/// weights give the same losses, expert loads and gradients bit for bit, in bf16 and with FP8
/// linears (the MoE dispatch plan in token order, RMSNorm's dw and the embedding gradient summed
/// in a fixed order, no floating-point atomics anywhere in the pass). On a GPU this is what the
/// check is for (the CPU emulator runs blocks one at a time, so atomics would agree there too).
#[test]
fn the_pass_is_bit_reproducible() {
    use dsv3_core::model::linear::Precision;
    let Some(dev) = device("the_pass_is_bit_reproducible") else { return };
    for name in ["v3_group", "v2_lite"] {
        let model = load(name);
        let v = model.cfg.vocab_size;
        for precision in [Precision::F32, Precision::Fp8] {
            let opts = TrainOptions { dtype: DType::Bf16, precision };
            let mut gm = CudaTrainModel::new(dev.clone(), &model, opts).unwrap();
            let pass = PassOptions { seq_alpha: 0.01, mtp_lambda: 0.3, ..PassOptions::default() };
            let mut run = || {
                gm.zero_grads().unwrap();
                let mut outs = Vec::new();
                for (j, lens) in [vec![40usize, 33, 57], vec![9, 64]].iter().enumerate() {
                    let s = random_seqs(v, lens, 500 + j as u64);
                    outs.push(gm.pass(&refs(&s), &pass).unwrap());
                }
                let g = dsv3_kernels::tensor::download(&dev, gm.grads()).unwrap();
                (outs, g.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            };
            let (o1, g1) = run();
            let (o2, g2) = run();
            let what = format!("{name} bf16 {precision:?}");
            for (a, b) in o1.iter().zip(&o2) {
                assert_eq!(a.ce_loss.to_bits(), b.ce_loss.to_bits(), "{what}: loss");
                assert_eq!(a.balance_loss.to_bits(), b.balance_loss.to_bits(), "{what}: balance loss");
                assert_eq!(a.mtp_loss.to_bits(), b.mtp_loss.to_bits(), "{what}: MTP loss");
                assert_eq!(a.loads, b.loads, "{what}: expert loads");
            }
            let diff = g1.iter().zip(&g2).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{what}: {diff} of {} gradient values differ between two runs", g1.len());
        }
    }
}
