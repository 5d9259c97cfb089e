//! `CudaTrainer` (the optimizer step on the GPU) against core's `Trainer` on the test fixtures:
//! per-step losses, gradient norms, learning rates and expert loads, final weights, AdamW moments
//! and router biases; the round trip through a core checkpoint (`to_core`, `checkpoint::save` /
//! `load`, upload of the resumed moments); bf16 moments; a non-finite gradient norm leaves the
//! weights untouched. The host-side scalars (AdamW bias corrections, clip factor, load statistics)
//! are checked against core without a GPU; everything else skips visibly without one.
mod common;
use common::*;
use dsv3_core::model::block::Ffn;
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::rng::Rng;
use dsv3_core::train::checkpoint::{self, Fault};
use dsv3_core::train::{AdamW, LrSchedule, MicroBatch, StepMetrics, TrainConfig, Trainer};
use dsv3_kernels::ops::train::AdamStep;
use dsv3_kernels::tensor::download;
use dsv3_kernels::train::layout::ArenaLayout;
use dsv3_kernels::train::trainer::{adam_scalars, bias_layers, clip_factor, decay_mask, max_over_mean};
use dsv3_kernels::train::CudaTrainer;
use dsv3_kernels::DType;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    // DSV3_FIXTURES: where tests/fixtures is when the test binary runs on another machine
    std::env::var_os("DSV3_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
        .join(name)
}

/// A fixture, or `tiny_mtp`: the tiny preset with one MTP module (random weights).
fn load(name: &str) -> Model {
    if name == "tiny_mtp" {
        let mut c = dsv3_core::presets::preset("tiny").unwrap();
        c.num_nextn_predict_layers = 1;
        let mut store = dsv3_core::weights::TensorStore::new();
        let t = dsv3_core::weights::init::random_checkpoint(&c, 4, 0.02);
        store.add_bytes(dsv3_core::weights::write::to_bytes(&t).unwrap(), "<init>").unwrap();
        return Model::from_store(c, store, LoadOptions::default()).unwrap();
    }
    Model::load(&fixture(name), LoadOptions::default()).unwrap()
}

fn cfg() -> TrainConfig {
    TrainConfig {
        // warmup then cosine: the learning rate changes every step
        schedule: LrSchedule::WarmupCosine { lr: 2e-3, min_lr: 2e-4, warmup: 2, total: 6 },
        // small enough that clipping happens
        clip_norm: Some(0.1),
        bias_update_speed: 0.01,
        seq_aux_alpha: 1e-3,
        aux_loss_alpha: 0.0,
        mtp_lambda: 0.3,
        precision: dsv3_core::model::linear::Precision::F32,
    }
}

/// Two micro-batches of random tokens (never all zeros) of unequal sizes, the second with an
/// SFT-style loss mask: the step weights them by counted positions.
fn batches(rng: &mut Rng, v: usize) -> Vec<MicroBatch> {
    let mut seq = |n: usize| (0..n).map(|_| rng.below(v as u64) as u32).collect::<Vec<u32>>();
    let a = MicroBatch { seqs: vec![seq(9), seq(6), seq(12)], mask: None };
    let seqs = vec![seq(7), seq(10)];
    let n_pred: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let mask = (0..n_pred).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
    vec![a, MicroBatch { seqs, mask: Some(mask) }]
}

/// Every trainable tensor by name (visit order).
fn weights(m: &mut Model) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    m.visit(&mut |n, t| out.push((n.to_string(), t.to_vec())));
    out
}

/// The router correction biases of the main MoE layers.
fn biases(m: &Model) -> Vec<Vec<f32>> {
    m.layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(moe) => moe.router.bias.clone(),
            _ => None,
        })
        .collect()
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_step_close(g: &StepMetrics, c: &StepMetrics, tol: f32, what: &str) {
    assert_eq!(g.step, c.step, "{what}");
    assert!(rel(g.loss, c.loss) <= tol, "{what}: loss {} vs CPU {}", g.loss, c.loss);
    assert!(rel(g.grad_norm, c.grad_norm) <= tol, "{what}: grad norm {} vs CPU {}", g.grad_norm, c.grad_norm);
    assert!(
        (g.balance_loss - c.balance_loss).abs() <= tol * c.balance_loss.abs().max(1e-2),
        "{what}: balance loss {} vs CPU {}",
        g.balance_loss,
        c.balance_loss
    );
    assert!(
        (g.mtp_loss - c.mtp_loss).abs() <= tol * c.mtp_loss.abs().max(1e-2),
        "{what}: MTP loss {} vs CPU {}",
        g.mtp_loss,
        c.mtp_loss
    );
    assert_eq!(g.lr, c.lr, "{what}: lr");
    assert_eq!((g.tokens, g.predicted), (c.tokens, c.predicted), "{what}: tokens");
    assert_eq!(g.expert_load, c.expert_load, "{what}: expert loads");
    assert_eq!(g.max_over_mean, c.max_over_mean, "{what}");
}

/// The AdamW kernel's arithmetic (kernels/cuda/train.cu `adamw`, every operation rounded to f32
/// in the kernel's order) on the host.
fn adamw_host(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamStep, bf16: bool) {
    let r = |x: f32| if bf16 { half::bf16::from_f32(x).to_f32() } else { x };
    for j in 0..p.len() {
        let g = g[j] * s.grad_scale;
        m[j] = r(s.beta1 * m[j] + (1.0 - s.beta1) * g);
        v[j] = r(s.beta2 * v[j] + (1.0 - s.beta2) * g * g);
        let (mh, vh) = (m[j] / s.bc1, v[j] / s.bc2);
        p[j] = p[j] * s.decay - s.lr * mh / (vh.sqrt() + s.eps);
    }
}

/// No GPU needed: the step scalars the trainer passes to the AdamW kernel reproduce core's
/// `AdamW::step` bit for bit (f32 and bf16 moments, decayed and undecayed tensors, several steps
/// and learning rates, a clipped step); the clip factor, max/mean loads and the bias-layer map are
/// core's.
#[test]
fn host_step_scalars_match_core() {
    for bf16 in [false, true] {
        let mut model = load("v3_tiny");
        model.make_trainable();
        let mut host = model.clone();
        let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
        opt.bf16_moments = bf16;
        let mut hm: Vec<Vec<f32>> = Vec::new();
        let mut hv: Vec<Vec<f32>> = Vec::new();
        let mut rng = Rng::new(3);
        for (t, lr) in [(1u64, 1e-3f32), (2, 7e-4), (3, 3e-3)] {
            let mut grad = model.zeros_like();
            grad.visit(&mut |_, g| g.iter_mut().for_each(|x| *x = rng.normal() * 0.1));
            let mut gl: Vec<Vec<f32>> = Vec::new();
            grad.visit(&mut |_, g| gl.push(g.to_vec()));
            // step 2 clipped: core scales the gradients first, the kernel as it reads them
            let clip = (t == 2).then_some(0.5f32);
            opt.step_scaled(&mut model, &mut grad, lr, clip);
            let mut i = 0;
            host.visit(&mut |n, p| {
                if hm.len() <= i {
                    hm.push(vec![0.0; p.len()]);
                    hv.push(vec![0.0; p.len()]);
                }
                let s = AdamStep { grad_scale: clip.unwrap_or(1.0), ..adam_scalars(&opt, t, lr, AdamW::decays(n)) };
                adamw_host(p, &gl[i], &mut hm[i], &mut hv[i], &s, bf16);
                i += 1;
            });
            assert_eq!(opt.t, t);
        }
        let (a, b) = (weights(&mut model), weights(&mut host));
        for ((n, x), (_, y)) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{n} (bf16 moments {bf16})");
        }
        assert_eq!(opt.m, hm, "first moments");
        assert_eq!(opt.v, hv, "second moments");
    }
    assert_eq!(clip_factor(Some(1.0), 2.0), Some(0.5));
    assert_eq!(clip_factor(Some(1.0), 1.0), None);
    assert_eq!(clip_factor(None, 5.0), None);
    assert_eq!(max_over_mean(&[vec![1, 3], vec![0, 0]]), vec![1.5, 0.0]);
    // the optimizer's one launch on a fixture: every 64-element chunk marked as its tensor's decay
    let mut t = load("v3_group");
    t.make_trainable();
    let (lay, _) = ArenaLayout::of(&t).unwrap();
    let mask = decay_mask(&lay.slots);
    let last = lay.slots.last().unwrap();
    assert_eq!(mask.len(), (last.off + last.len).div_ceil(64));
    for sl in &lay.slots {
        assert_eq!(sl.decays, AdamW::decays(&sl.name));
        let chunks = &mask[sl.off / 64..(sl.off + sl.len).div_ceil(64)];
        assert!(chunks.iter().all(|&m| m == sl.decays as u8), "{}: chunks {chunks:?}", sl.name);
    }
    assert!(mask.contains(&0) && mask.contains(&1), "v3_group has decayed and undecayed tensors");
    assert!(decay_mask(&[]).is_empty());
    let g = load("v3_group");
    let with_bias = biases(&g).len();
    assert!(with_bias > 0, "v3_group has router correction biases");
    assert_eq!(bias_layers(&g).len(), with_bias);
    assert_eq!(load("tiny_mtp").mtp.len(), 1, "the MTP case has its module");
}

fn core_trainer(name: &str, bf16_moments: bool) -> Trainer {
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
    opt.bf16_moments = bf16_moments;
    Trainer::new(load(name), opt, cfg())
}

/// Runs `steps` steps of the CPU trainer and the GPU one (F32) on the same data; compares
/// every step's metrics, then weights, biases and moments. Returns both trainers.
fn run_both(name: &str, bf16_moments: bool, steps: usize) -> (Trainer, CudaTrainer) {
    let _ = dsv3_core::ops::set_threads(1); // one shard per micro-batch on the CPU, as the GPU
    let dev = device(name).unwrap();
    let mut cpu = core_trainer(name, bf16_moments);
    let mut gpu = CudaTrainer::new(dev, &core_trainer(name, bf16_moments), DType::F32).unwrap();
    let mut rng = Rng::new(11);
    let mut clipped = 0;
    for s in 0..steps {
        let mb = batches(&mut rng, cpu.model.cfg.vocab_size);
        let c = cpu.train_step(&mb).unwrap();
        let g = gpu.train_step(&mb).unwrap();
        assert_step_close(&g, &c, 1e-4, &format!("{name} step {s}"));
        clipped += (c.grad_norm > 0.1) as usize;
    }
    assert!(clipped > 0, "{name}: no step was clipped (norms <= 0.1)");
    assert_eq!(gpu.step, cpu.step);
    let mut back = core_trainer(name, bf16_moments);
    gpu.to_core(&mut back).unwrap();
    assert_eq!((back.step, back.opt.t), (cpu.step, cpu.opt.t));
    assert_eq!(biases(&back.model), biases(&cpu.model), "{name}: router biases");
    let (a, b) = (weights(&mut back.model), weights(&mut cpu.model));
    assert_eq!(a.len(), b.len());
    let init = weights(&mut core_trainer(name, bf16_moments).model);
    for (((n, x), (_, y)), (_, w0)) in a.iter().zip(&b).zip(&init) {
        // Adam normalizes each element's step: elements with gradients near 0 may move
        // differently under a 1e-6 gradient change; the bulk of the update must agree
        // a few elements may flip their step's sign (gradients cancelling to ~0): count them
        let far = x.iter().zip(y).filter(|(a, b)| (*a - *b).abs().is_nan() || (*a - *b).abs() > 1e-4).count();
        assert!(far * 1000 <= x.len().max(1000), "{name}: {far} of {} elements of {n} differ by > 1e-4", x.len());
        let dx: Vec<f32> = x.iter().zip(w0).map(|(a, b)| a - b).collect();
        let dy: Vec<f32> = y.iter().zip(w0).map(|(a, b)| a - b).collect();
        let r = rel_l2(&dx, &dy);
        assert!(r < 1e-2, "{name}: {n}'s update differs from the CPU's by {r} (relative L2)");
    }
    assert_eq!(back.opt.names, cpu.opt.names);
    // Adam's normalized steps carry the sub-1e-4 gradient differences of one step into weights
    // that differ at a few elements, so later steps' gradients (and the moments) drift apart more;
    // bf16 moments round both sides' values to 2^-8 steps, where a near-midpoint value may round
    // either way. H100 (2026-11-24): f32 moments up to 1.01e-3 after 2 steps (v3_group's
    // post_attention_layernorm), bf16 moments 1.7e-3.
    let tol = if bf16_moments { 5e-3 } else { 3e-3 };
    for (i, n) in cpu.opt.names.iter().enumerate() {
        let r = rel_l2(&back.opt.m[i], &cpu.opt.m[i]);
        assert!(r < tol, "{name}: first moment of {n}: {r}");
        let r = rel_l2(&back.opt.v[i], &cpu.opt.v[i]);
        assert!(r < tol, "{name}: second moment of {n}: {r}");
        if bf16_moments {
            let exact = |v: &[f32]| v.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x);
            assert!(exact(&back.opt.m[i]) && exact(&back.opt.v[i]), "{name}: {n}'s moments are not bf16 values");
        }
    }
    (cpu, gpu)
}

#[test]
fn f32_steps_match_the_cpu_trainer() {
    if device("f32_steps_match_the_cpu_trainer").is_none() {
        return;
    }
    // tiny_mtp: the MTP loss (λ = 0.3) in the step, its modules' tensors in AdamW
    for name in ["v3_tiny", "v3_group", "tiny_mtp"] {
        run_both(name, false, 3);
    }
}

#[test]
fn bf16_moments_match_the_cpu_trainer() {
    if device("bf16_moments_match_the_cpu_trainer").is_none() {
        return;
    }
    run_both("v3_group", true, 3);
}

/// `to_core` → `checkpoint::save` → `checkpoint::load` → `CudaTrainer::new`: the resumed GPU
/// trainer holds the same weights, biases, moments and step counts, and its next step matches
/// the uninterrupted one's.
#[test]
fn checkpoint_round_trip_resumes_the_same_run() {
    let Some(dev) = device("checkpoint_round_trip_resumes_the_same_run") else { return };
    for bf16 in [false, true] {
        let (_, mut gpu) = run_both("v3_group", bf16, 2);
        let dir = std::env::temp_dir().join(format!("dsv3-train-step-ckpt-{}-{bf16}", std::process::id()));
        let mut tr = core_trainer("v3_group", bf16);
        gpu.to_core(&mut tr).unwrap();
        checkpoint::save(&mut tr, &dir, serde_json::json!({"note": "test"}), Fault::None).unwrap();
        let (loaded, user) = checkpoint::load(&dir, cfg()).unwrap();
        assert_eq!(user["note"], "test");
        assert_eq!(loaded.opt.bf16_moments, bf16);
        let mut resumed = CudaTrainer::new(dev.clone(), &loaded, DType::F32).unwrap();
        assert_eq!((resumed.step, resumed.opt.t), (gpu.step, gpu.opt.t));
        let mut again = core_trainer("v3_group", bf16);
        resumed.to_core(&mut again).unwrap();
        let (a, b) = (weights(&mut again.model), weights(&mut tr.model));
        for ((n, x), (_, y)) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{n} after the round trip");
        }
        assert_eq!(biases(&again.model), biases(&tr.model));
        assert_eq!((&again.opt.m, &again.opt.v, &again.opt.names), (&tr.opt.m, &tr.opt.v, &tr.opt.names));
        let mb = batches(&mut Rng::new(99), tr.model.cfg.vocab_size);
        let x = gpu.train_step(&mb).unwrap();
        let y = resumed.train_step(&mb).unwrap();
        // the same device and data: equal up to the order of the kernels' atomic sums
        assert_step_close(&y, &x, 1e-5, "resumed step");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A NaN or infinite gradient: `apply_gradients` is an error and leaves the weights, biases,
/// moments and step counts as they were; the trainer goes on with finite gradients.
#[test]
fn non_finite_gradient_norm_is_an_error_that_leaves_the_weights() {
    let Some(dev) = device("non_finite_gradient_norm_is_an_error_that_leaves_the_weights") else { return };
    let mut gpu = CudaTrainer::new(dev.clone(), &core_trainer("v3_group", false), DType::F32).unwrap();
    let mut rng = Rng::new(5);
    gpu.train_step(&batches(&mut rng, gpu.model.cfg.vocab_size)).unwrap();
    let snapshot = |g: &CudaTrainer| {
        let mut t = core_trainer("v3_group", false);
        g.to_core(&mut t).unwrap();
        (weights(&mut t.model), biases(&t.model), t.opt.m.clone(), t.opt.v.clone(), t.step, t.opt.t)
    };
    let before = snapshot(&gpu);
    for bad in [f32::NAN, f32::INFINITY] {
        gpu.zero_grads().unwrap();
        let mut g = vec![0.25f32; gpu.model.params[1].g.len()];
        let mid = g.len() / 2;
        g[mid] = bad;
        dev.stream.memcpy_htod(&g, &mut gpu.model.params[1].g).unwrap();
        let loads: Vec<Vec<u32>> = vec![];
        let e = gpu.apply_gradients(&loads).unwrap_err();
        assert!(matches!(e, dsv3_core::Error::NonFinite(_)), "{e}");
        let after = snapshot(&gpu);
        assert!(before == after, "a non-finite step changed the trainer's state");
    }
    let mb = batches(&mut rng, gpu.model.cfg.vocab_size);
    let m = gpu.train_step(&mb).unwrap();
    assert!(m.loss.is_finite() && m.grad_norm.is_finite() && gpu.step == 2);
}

/// bf16 mode (bf16 activations and GEMMs over f32 masters): a few steps stay finite and close to
/// the CPU's f32 losses.
#[test]
fn bf16_steps_track_the_cpu() {
    let Some(dev) = device("bf16_steps_track_the_cpu") else { return };
    let _ = dsv3_core::ops::set_threads(1);
    let mut cpu = core_trainer("v3_group", false);
    let mut gpu = CudaTrainer::new(dev, &core_trainer("v3_group", false), DType::Bf16).unwrap();
    let mut rng = Rng::new(21);
    for s in 0..3 {
        let mb = batches(&mut rng, cpu.model.cfg.vocab_size);
        let c = cpu.train_step(&mb).unwrap();
        let g = gpu.train_step(&mb).unwrap();
        assert!(rel(g.loss, c.loss) < 3e-2, "step {s}: bf16 loss {} vs CPU {}", g.loss, c.loss);
        assert!(
            rel(g.grad_norm, c.grad_norm) < 1e-1,
            "step {s}: bf16 grad norm {} vs CPU {}",
            g.grad_norm,
            c.grad_norm
        );
        assert_eq!(g.lr, c.lr);
        // the bf16 working copy, written by AdamW itself, is the masters rounded
        let masters = download(&gpu.model.dev, gpu.model.masters()).unwrap();
        let copy = download(&gpu.model.dev, gpu.model.working_bf16().expect("bf16 mode")).unwrap();
        let want: Vec<u16> = masters.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let got: Vec<u16> = copy.iter().map(|x| x.to_bits()).collect();
        assert!(got == want, "step {s}: the bf16 working copy is not the masters rounded");
    }
}
