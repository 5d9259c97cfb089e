//! The GPU training pass with the decoder's linears in DeepSeek-V3's FP8 recipe
//! (`TrainOptions::precision == Fp8`, kernels/src/train/fp8.rs) against the CPU emulation
//! (`Model::set_precision(Precision::Fp8)` then `Model::train_pass`), and FP8 training steps
//! against core's FP8 `Trainer` and against the GPU's bf16 steps. Skip without a GPU.
//!
//! Tolerances (first guesses, printed for calibration; the bf16 dtype's measured on the H100,
//! 2026-11-24, see fp8_pass_vs_cpu). Both sides
//! quantize with the same rule (kernels/tests/fp8.rs: the quantize kernels are core's bit for bit)
//! and promote every 128 K; what differs is the f32 summation order, and on sm_90a the tensor
//! cores' in-group accumulation, which kernels/tests/fp8.rs bounds at 2e-3 of a GEMM's largest
//! output against core's emulation. Where a GEMM output moves by that much, a quantization of it
//! downstream may round to the neighbouring E4M3 value (a 2^-3 relative step of that one element):
//! such flips are rare and isolated, so the loss agrees closely (FP8_LOSS) and the gradients
//! globally (FP8_GLOBAL) more loosely than the f32 mode's 1e-4. Tolerance-free check beside the
//! bounds: the GPU's FP8 gradients are much closer to the CPU's FP8 gradients than the CPU's f32
//! gradients are (the FP8 recipe is really applied, and only it).
mod common;
use common::*;
use dsv3_core::model::linear::Precision;
use dsv3_core::model::train::PassOptions;
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::rng::Rng;
use dsv3_core::train::{AdamW, LrSchedule, MicroBatch, TrainConfig, Trainer};
use dsv3_kernels::ops::fp8::t128_segments;
use dsv3_kernels::tensor::upload;
use dsv3_kernels::train::fp8::{fp8_expert_wgrad, ExpertRows};
use dsv3_kernels::train::mm::{dims, rd, Wr};
use dsv3_kernels::train::{CudaTrainModel, CudaTrainer, TrainOptions};
use dsv3_kernels::{Act, DType};
use std::path::Path;

const FIXTURES: [&str; 8] =
    ["v3_group", "v3_tiny", "v3_qnull", "v3_yarn", "v3_yarn_mscale", "v3_fp8", "v2_lite", "v2_group"];

/// Relative loss error of the f32-dtype FP8 pass vs the CPU's FP8 pass.
const FP8_LOSS: f32 = 2e-3;
/// Relative L2 of all gradients as one vector.
const FP8_GLOBAL: f64 = 2e-2;
/// Relative L2 of each tensor's gradient.
const FP8_TENSOR: f64 = 0.1;
/// The GPU-vs-CPU FP8 gradient difference must be below this share of the CPU's f32-vs-FP8 one
/// (f32 dtype only: the bf16 dtype's own rounding is of the same order as FP8's effect on these
/// small fixtures, train_pass.rs's bf16 bounds).
const FP8_VS_RECIPE: f64 = 0.25;

fn load(name: &str) -> Model {
    if name == "tiny_mtp" {
        let mut c = dsv3_core::presets::preset("tiny").unwrap();
        c.num_nextn_predict_layers = 1;
        let mut store = dsv3_core::weights::TensorStore::new();
        let t = dsv3_core::weights::init::random_checkpoint(&c, 4, 0.02);
        store.add_bytes(dsv3_core::weights::write::to_bytes(&t).unwrap(), "<init>").unwrap();
        let mut m = Model::from_store(c, store, LoadOptions::default()).unwrap();
        m.make_trainable();
        return m;
    }
    let root = std::env::var_os("DSV3_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    let mut m = Model::load(&root.join(name), LoadOptions::default()).unwrap();
    m.make_trainable();
    m
}

fn random_seqs(v: usize, lens: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    lens.iter().map(|&n| (0..n).map(|_| rng.below(v as u64) as u32).collect()).collect()
}

fn refs(s: &[Vec<u32>]) -> Vec<&[u32]> {
    s.iter().map(|v| &v[..]).collect()
}

fn flat(m: &Model) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    m.clone().visit(&mut |n, t| out.push((n.to_string(), t.to_vec())));
    out
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// The cases: (name, sequence lengths, options); lengths above 128 in one case so that the
/// Wgrad's 128-token tiles and the activations' second 128-column tiles both occur.
fn cases() -> Vec<(&'static str, Vec<usize>, PassOptions)> {
    let ragged = vec![5usize, 1, 12, 3];
    let p: usize = ragged.iter().map(|&l| l - 1).sum();
    let mask: Vec<f32> = (0..p).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 }).collect();
    vec![
        ("ragged", ragged.clone(), PassOptions::default()),
        (
            "balance losses, mask, scale",
            ragged.clone(),
            PassOptions { scale: 0.37, seq_alpha: 0.01, aux_alpha: 0.02, mask: Some(mask), mtp_lambda: 0.0 },
        ),
        ("MTP loss", ragged, PassOptions { seq_alpha: 0.01, mtp_lambda: 0.3, ..PassOptions::default() }),
        ("more than 128 tokens", vec![140, 70], PassOptions { seq_alpha: 0.003, ..PassOptions::default() }),
    ]
}

/// One pass on the GPU model and on `cpu` (FP8 or not); returns their outputs and gradients.
fn pass_both(
    cpu: &Model,
    gm: &mut CudaTrainModel,
    seqs: &[Vec<u32>],
    opts: &PassOptions,
) -> (dsv3_core::model::train::PassOutput, Model, dsv3_core::model::train::PassOutput, Model) {
    let mut cg = cpu.zeros_like();
    let co = cpu.train_pass(&refs(seqs), &mut cg, opts).unwrap();
    gm.zero_grads().unwrap();
    let go = gm.pass(&refs(seqs), opts).unwrap();
    let mut gg = cpu.zeros_like();
    gm.download_grads(&mut gg).unwrap();
    (co, cg, go, gg)
}

/// Relative L2 of all gradients as one vector, and the worst tensor's (name, relative L2).
fn compare(got: &Model, want: &Model) -> (f64, (String, f64)) {
    let (mut all_g, mut all_w) = (Vec::new(), Vec::new());
    let mut worst = (String::new(), 0f64);
    for ((n, w), (_, g)) in flat(want).iter().zip(flat(got)) {
        all_g.extend_from_slice(&g);
        all_w.extend_from_slice(w);
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let e = rel_l2(&g, w);
        if e.is_nan() || e > worst.1 {
            worst = (n.clone(), e);
        }
    }
    (rel_l2(&all_g, &all_w), worst)
}

fn fp8_pass_vs_cpu(dtype: DType, loss_tol: f32, global_tol: f64, tensor_tol: f64, test: &str) {
    let vs_recipe = if dtype == DType::F32 { FP8_VS_RECIPE } else { f64::INFINITY };
    let Some(dev) = device(test) else { return };
    let mut failures = Vec::new();
    let mut routing_differs = 0;
    let mut tight_cases = 0;
    let mut n_cases = 0;
    for name in FIXTURES.iter().copied().chain(["tiny_mtp"]) {
        let model = load(name);
        let mut fp8 = model.clone();
        fp8.set_precision(Precision::Fp8);
        let opts = TrainOptions { dtype, precision: Precision::Fp8 };
        let mut gm = CudaTrainModel::new(dev.clone(), &model, opts).unwrap();
        assert!(gm.fp8_bytes() > 0, "{name}: FP8 copies");
        for (ci, (case, lens, po)) in cases().into_iter().enumerate() {
            n_cases += 1;
            let seqs = random_seqs(model.cfg.vocab_size, &lens, 300 + ci as u64);
            let (co, cg, go, gg) = pass_both(&fp8, &mut gm, &seqs, &po);
            // the recipe's own effect: CPU f32 vs CPU FP8
            let mut fg = model.zeros_like();
            let fo = model.train_pass(&refs(&seqs), &mut fg, &po).unwrap();
            let (recipe, _) = compare(&fg, &cg);
            let (global, worst) = compare(&gg, &cg);
            let what = format!("{name} {case} ({dtype:?})");
            eprintln!(
                "{what}: loss {} vs CPU FP8 {} (CPU f32 {}), MTP {} vs {} (f32 {}); gradients: global {global:.3e}, worst {} {:.3e}; CPU f32 vs FP8 {recipe:.3e}",
                go.ce_loss, co.ce_loss, fo.ce_loss, go.mtp_loss, co.mtp_loss, fo.mtp_loss, worst.0, worst.1
            );
            assert_eq!(go.predicted, co.predicted, "{what}");
            if go.loads != co.loads {
                // a near-tie in a router picked another expert: that expert's gradients differ
                // wholesale; counted, and the gradient bounds skipped for the case
                routing_differs += 1;
                eprintln!("{what}: expert loads differ (a routing near-tie): {:?} vs {:?}", go.loads, co.loads);
                continue;
            }
            // bf16 dtype: the GPU quantizes bf16-rounded activations, the CPU f32 ones, so codes
            // near an E4M3 boundary differ: a perturbation of the recipe's own size, and the
            // bounds scale with it (H100, 2026-11-24: routing-equal cases at 0.2..1.25x the
            // recipe's global effect, worst tensors up to 3.6x)
            let (global_tol, tensor_tol) = if dtype == DType::Bf16 {
                (global_tol.max(1.5 * recipe), tensor_tol.max(4.0 * recipe))
            } else {
                (global_tol, tensor_tol)
            };
            let tight = rel(go.ce_loss, co.ce_loss) <= loss_tol
                && rel(go.mtp_loss, co.mtp_loss) <= loss_tol
                && (go.balance_loss - co.balance_loss).abs() <= loss_tol * co.balance_loss.abs().max(1e-2)
                && global <= global_tol
                && worst.1 <= tensor_tol
                && global <= vs_recipe * recipe;
            if tight {
                tight_cases += 1;
                continue;
            }
            // A code flip. The GPU sums in another order than the CPU (wgmma's k32 steps, cuBLAS,
            // bf16 rounding), so a value on an E4M3 rounding boundary can take the other code, or
            // a block's amax the other scale; on these small random models one flip moves the
            // whole pass by up to the order of the recipe's own effect. The CPU alone shows it
            // (2026-11-24, a scratch run): its FP8 pass with random weights moved by 1 ulp
            // differs from itself by up to 1e-1 global (v3_fp8, v2_group) with the same routing,
            // and on "v3_group MTP loss" 2 of 12 such perturbations land exactly where the
            // emulated GPU (kernels/emu/gpu_tests.sh: 5 of 36 f32 cases not tight, the same with
            // the wgmma and the SIMT GEMMs) lands: loss 6.2940 vs 6.2754, MTP 1.8444 vs 1.8102,
            // gradients 0.198 apart. Such a case must stay within the recipe's own effect: the
            // losses within twice the CPU's f32-vs-FP8 gap, the gradients within once; a wrong
            // kernel breaks the tight cases besides.
            let within = |g: f32, c: f32, f: f32| (g - c).abs() <= 2.0 * (f - c).abs() + loss_tol * c.abs();
            eprintln!("{what}: not within the tight bounds (a code flip); checked against the recipe's effect");
            if !within(go.ce_loss, co.ce_loss, fo.ce_loss) {
                failures
                    .push(format!("{what}: loss {} vs CPU FP8 {} (CPU f32 {})", go.ce_loss, co.ce_loss, fo.ce_loss));
            }
            if !within(go.mtp_loss, co.mtp_loss, fo.mtp_loss) {
                failures
                    .push(format!("{what}: MTP loss {} vs CPU FP8 {} (f32 {})", go.mtp_loss, co.mtp_loss, fo.mtp_loss));
            }
            if global.is_nan() || global > recipe {
                failures.push(format!("{what}: GPU FP8 vs CPU FP8 {global:.3e} beyond CPU f32 vs FP8 {recipe:.3e}"));
            }
        }
    }
    // FP8's 2^-3 code steps flip the near-ties of these small random routers often (the H100's
    // bf16 run: 25 of 36 cases, the CPU's own f32 vs FP8 gradients 3e-2..8e-1 apart); at least a
    // fifth of the cases must route as the CPU does, or the gradient bounds check too little
    eprintln!("{test}: {routing_differs} of {n_cases} cases routed differently from the CPU");
    assert!(routing_differs * 5 <= 4 * n_cases, "{routing_differs} of {n_cases} cases routed differently");
    // and most of those that route alike agree tightly (a broken kernel agrees in none)
    let equal = n_cases - routing_differs;
    eprintln!("{test}: {tight_cases} of {equal} routing-equal cases within the tight bounds");
    assert!(2 * tight_cases >= equal, "only {tight_cases} of {equal} routing-equal cases within the tight bounds");
    assert!(failures.is_empty(), "FP8 pass outside the bounds: {failures:#?}");
}

#[test]
fn fp8_pass_matches_the_cpu_fp8_emulation_on_every_fixture() {
    fp8_pass_vs_cpu(
        DType::F32,
        FP8_LOSS,
        FP8_GLOBAL,
        FP8_TENSOR,
        "fp8_pass_matches_the_cpu_fp8_emulation_on_every_fixture",
    );
}

#[test]
fn bf16_fp8_pass_is_close_to_the_cpu_fp8_emulation() {
    // bf16 activations (the FP8 operands quantized from bf16 values, bf16 GEMM outputs): the
    // bf16 pass's bounds (train_pass.rs), which the FP8 rounding of bf16 inputs does not widen
    fp8_pass_vs_cpu(DType::Bf16, 2e-2, 5e-2, 0.3, "bf16_fp8_pass_is_close_to_the_cpu_fp8_emulation");
}

#[test]
fn linear_precision_bf16_is_refused_on_the_gpu() {
    let Some(dev) = device("linear_precision_bf16_is_refused_on_the_gpu") else { return };
    let model = load("v3_tiny");
    let opts = TrainOptions { dtype: DType::Bf16, precision: Precision::Bf16 };
    assert!(CudaTrainModel::new(dev.clone(), &model, opts).is_err());
    let tr = Trainer::new(load("v3_tiny"), AdamW::new(0.9, 0.95, 1e-8, 0.1), step_cfg(Precision::Bf16));
    assert!(CudaTrainer::new(dev.clone(), &tr, DType::Bf16).is_err());
    // the f32 precision has no FP8 copies
    let gm = CudaTrainModel::new(dev, &model, TrainOptions::new(DType::F32)).unwrap();
    assert_eq!(gm.fp8_bytes(), 0);
}

fn step_cfg(precision: Precision) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule::Constant { lr: 3e-3 },
        clip_norm: Some(1.0),
        bias_update_speed: 0.01,
        seq_aux_alpha: 1e-3,
        aux_loss_alpha: 0.0,
        mtp_lambda: 0.3,
        precision,
    }
}

fn batch(rng: &mut Rng, v: usize) -> Vec<MicroBatch> {
    let mut seq = |n: usize| (0..n).map(|_| rng.below(v as u64) as u32).collect::<Vec<u32>>();
    vec![MicroBatch { seqs: vec![seq(12), seq(9), seq(16)], mask: None }]
}

/// CudaTrainer in FP8 (f32 dtype) against core's FP8 Trainer for a few steps: the FP8 copies
/// are re-quantized after each step as core's (a stale copy would drift from step 1 on).
#[test]
fn fp8_steps_track_cores_fp8_trainer() {
    let Some(dev) = device("fp8_steps_track_cores_fp8_trainer") else { return };
    let _ = dsv3_core::ops::set_threads(1); // one shard per micro-batch, as the GPU
    for name in ["v3_group", "tiny_mtp"] {
        let mut cpu = Trainer::new(load(name), AdamW::new(0.9, 0.95, 1e-8, 0.1), step_cfg(Precision::Fp8));
        let core = Trainer::new(load(name), AdamW::new(0.9, 0.95, 1e-8, 0.1), step_cfg(Precision::Fp8));
        let mut gpu = CudaTrainer::new(dev.clone(), &core, DType::F32).unwrap();
        let mut rng = Rng::new(17);
        for s in 0..4 {
            let mb = batch(&mut rng, cpu.model.cfg.vocab_size);
            let c = cpu.train_step(&mb).unwrap();
            let g = gpu.train_step(&mb).unwrap();
            eprintln!(
                "{name} step {s}: FP8 loss GPU {} CPU {}, grad norm GPU {} CPU {}",
                g.loss, c.loss, g.grad_norm, c.grad_norm
            );
            if g.expert_load != c.expert_load {
                eprintln!("{name} step {s}: expert loads differ (a routing near-tie); later steps not compared");
                break;
            }
            assert!(rel(g.loss, c.loss) <= 5e-3, "{name} step {s}: loss {} vs CPU FP8 {}", g.loss, c.loss);
            assert!(
                rel(g.grad_norm, c.grad_norm) <= 5e-2,
                "{name} step {s}: grad norm {} vs {}",
                g.grad_norm,
                c.grad_norm
            );
        }
    }
}

/// Short FP8-vs-bf16 comparison (the V3 report's claim at scale: FP8's loss within 0.25% of
/// BF16's): the tiny preset trained 8 steps in bf16 with the linears in bf16 GEMMs or in FP8,
/// same data; both losses fall, and stay within a few percent of each other.
#[test]
fn fp8_and_bf16_training_losses_stay_close() {
    let Some(dev) = device("fp8_and_bf16_training_losses_stay_close") else { return };
    let run = |precision: Precision| -> Vec<f32> {
        let t = Trainer::new(load("tiny_mtp"), AdamW::new(0.9, 0.95, 1e-8, 0.1), step_cfg(precision));
        let mut gpu = CudaTrainer::new(dev.clone(), &t, DType::Bf16).unwrap();
        let mut rng = Rng::new(23);
        // a small fixed set of batches seen twice: the loss must fall
        let data: Vec<Vec<MicroBatch>> = (0..4).map(|_| batch(&mut rng, t.model.cfg.vocab_size)).collect();
        (0..8).map(|s| gpu.train_step(&data[s % 4]).unwrap().loss).collect()
    };
    let (bf, f8) = (run(Precision::F32), run(Precision::Fp8));
    eprintln!("bf16 losses {bf:?}\nfp8  losses {f8:?}");
    for (s, (a, b)) in bf.iter().zip(&f8).enumerate() {
        assert!(a.is_finite() && b.is_finite(), "step {s}");
        assert!(rel(*b, *a) <= 3e-2, "step {s}: FP8 loss {b} vs bf16 {a}");
    }
    assert!(f8[4..].iter().sum::<f32>() < f8[..4].iter().sum::<f32>(), "FP8 loss does not fall: {f8:?}");
    assert!(bf[4..].iter().sum::<f32>() < bf[..4].iter().sum::<f32>(), "bf16 loss does not fall: {bf:?}");
}

/// The FP8 expert Wgrad's forms (`fp8_expert_wgrad`: every expert's operands quantized in one
/// `quant_t128_groups` launch each, then one K-grouped GEMM on sm_90a, else a GEMM per expert over
/// its segment; or `quant_t128` per expert, which `DSV3_FP8_WGRAD_BATCH=0` keeps in the pass),
/// from host row offsets or from the training pass's device table (`ExpertRows::Device`: on
/// sm_90a nothing read back, operands sized by an upper bound) give the same gradients bit for bit
/// (the GEMMs read the same operand bits), f32 and bf16 activations, accumulating or not, with
/// empty experts (their gradients and the gaps between experts untouched), ragged counts, strided
/// rows and routed rows past the last expert's.
#[test]
fn fp8_expert_wgrad_batched_equals_per_expert() {
    let Some(dev) = device("fp8_expert_wgrad_batched_equals_per_expert") else { return };
    let mut rng = Rng::new(77);
    // at most 300 tokens per expert (3 K groups): fp8_gemm_tma does not split K (splitk_for keeps
    // >= 2 groups per split), so both forms' products are bit for bit the same
    let cases: [(&[usize], usize, usize, bool); 3] = [
        (&[0, 5, 130, 0, 300, 1, 128, 0], 70, 200, true),
        (&[256, 0, 17, 129], 129, 64, false),
        (&[0, 0, 0], 16, 16, true),
    ];
    for dtype in [DType::F32, DType::Bf16] {
        for (counts, out, inp, acc) in cases {
            let g = counts.len();
            let mut ro = vec![0i32];
            for &n in counts {
                ro.push(ro.last().unwrap() + n as i32);
            }
            let t = *ro.last().unwrap() as usize + 3;
            let (ldy, ldx, st, off) = (out + 2, inp + 5, out * inp + 7, 3);
            let dy = Act::from_f32(&dev, dtype, &randn(&mut rng, t * ldy)).unwrap();
            let x = Act::from_f32(&dev, dtype, &randn(&mut rng, t * ldx)).unwrap();
            let prev = randn(&mut rng, off + g * st);
            // the device table of the training pass (moe_train::plan_token_order's t128)
            let mut table = ro.clone();
            table.extend(t128_segments(&ro).unwrap().iter().map(|&s| s as i32));
            let table = upload(&dev, &table).unwrap();
            let run = |rows: ExpertRows, batched: bool| -> Vec<f32> {
                let mut c = Act::from_f32(&dev, DType::F32, &prev).unwrap();
                let cw = Wr { buf: &mut c, off, ld: inp, st };
                let d = dims(out, inp, t).acc(acc);
                fp8_expert_wgrad(&dev, d, rd(&dy, 0, ldy), rd(&x, 0, ldx), cw, rows, batched).unwrap();
                c.to_f32(&dev).unwrap()
            };
            let want = run(ExpertRows::Host(&ro), false);
            let what = format!("{dtype:?} {counts:?} [{out}, {inp}] acc {acc}");
            let on_device = ExpertRows::Device { t128: &table, groups: g };
            for (form, got) in [("batched", run(ExpertRows::Host(&ro), true)), ("device table", run(on_device, true))] {
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: {form} {a:e}, per expert {b:e}");
                }
            }
            let got = run(on_device, false);
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: per expert from the table"
            );
            let mut changed = vec![0usize; g];
            for (i, (&a, &p)) in got.iter().zip(&prev).enumerate() {
                let e = i.saturating_sub(off) / st;
                let inside = i >= off && (i - off) % st < out * inp;
                if !inside || counts[e] == 0 {
                    assert_eq!(a.to_bits(), p.to_bits(), "{what}: element {i} (no expert rows there) written");
                } else {
                    assert!(a.is_finite(), "{what}: element {i} of expert {e}: {a}");
                    changed[e] += (a != p) as usize;
                }
            }
            for (e, &n) in counts.iter().enumerate() {
                assert!(
                    n == 0 || changed[e] * 2 > out * inp,
                    "{what}: expert {e}: {} of {} changed",
                    changed[e],
                    out * inp
                );
            }
        }
    }
}
