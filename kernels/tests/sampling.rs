//! Sampling on the device (`sample_rows_f32`, `CudaSession::step_sample`, `model::generate`)
//! against the CPU `Sampler` with the same seed: the same tokens, NaN as an error, the host
//! fallback. GPU tests skip without a GPU; `expf_vectors_are_libm` runs everywhere (it keeps the
//! emulator's libm vectors, kernels/emu/expf_vectors.txt, true to the Rust libm crate).
mod common;
use common::*;
use dsv3_core::infer::sampling::{sample_with, Sampler, SamplingParams};
use dsv3_core::rng::Rng;
use dsv3_kernels::model::sample::resolve;
use dsv3_kernels::ops::sampling::{self, RowSample, Sampled};
use dsv3_kernels::tensor::{download, upload, zeros};
use std::path::Path;

/// x values around every branch of libm's expf, and random ones over the sampler's range.
fn expf_inputs() -> Vec<f32> {
    let mut xs = vec![0.0f32, -0.0, 1.0, -1.0, f32::NEG_INFINITY, f32::INFINITY, 88.0, 89.0, -87.0, -104.0, -103.97];
    for b in [0x3900_0000u32, 0x3eb1_7218, 0x3f85_1592, 0x42ae_ac50, 0x42b1_7218, 0x42cf_f1b5] {
        for d in 0..4u32 {
            xs.push(f32::from_bits(b + d));
            xs.push(f32::from_bits(b - d - 1));
            xs.push(-f32::from_bits(b + d));
            xs.push(-f32::from_bits(b - d - 1));
        }
    }
    let mut rng = Rng::new(99);
    while xs.len() < 3000 {
        xs.push(-(rng.uniform() * 105.0));
    }
    while xs.len() < 3600 {
        xs.push(-(rng.uniform() * 2.0));
    }
    while xs.len() < 4096 {
        xs.push(rng.uniform() * 178.0 - 89.0);
    }
    xs
}

#[test]
fn expf_vectors_are_libm() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("emu/expf_vectors.txt");
    let text: String =
        expf_inputs().iter().map(|&x| format!("{:08x} {:08x}\n", x.to_bits(), libm::expf(x).to_bits())).collect();
    if std::env::var_os("DSV3_WRITE_EXPF").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let have = std::fs::read_to_string(&path).expect("kernels/emu/expf_vectors.txt (DSV3_WRITE_EXPF=1 writes it)");
    assert!(have == text, "kernels/emu/expf_vectors.txt is stale: rerun with DSV3_WRITE_EXPF=1");
}

/// Random logits rows with every kind of parameters, and rows the device must not decide alone
/// (NaN, ±inf, more top-k / top-p candidates than `SAMPLE_CAP`).
#[test]
fn sample_rows_match_the_cpu_sampler() {
    let Some(dev) = device("sample_rows_match_the_cpu_sampler") else { return };
    let mut rng = Rng::new(2024);
    let (mut same, mut host, mut rounded, mut rounded_same) = (0usize, 0usize, 0usize, 0usize);
    for &v in &[7usize, 1000, 32_000, 129_280] {
        let mut rows = Vec::new();
        let mut logits = Vec::new();
        for r in 0..48 {
            // scales from flat to peaked; some rows with ties (rounded to a coarse grid)
            let scale = [0.3f32, 1.0, 3.0, 10.0][r % 4];
            let mut l: Vec<f32> = (0..v).map(|_| rng.normal() * scale).collect();
            if r % 7 == 3 {
                l.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0);
            }
            match r {
                5 => l[v / 2] = f32::NAN,
                6 => l[v - 1] = f32::INFINITY,
                7 => l[0] = f32::NEG_INFINITY,
                _ => {}
            }
            let temperature = [1.0f32, 0.7, 1.3, 0.05][r % 4];
            let top_k = [0usize, 1, 5, 50, 5000, usize::MAX][(r / 4) % 6];
            let top_p = [1.0f32, 0.9, 0.5, 0.999][(r / 3) % 4];
            rows.push(RowSample { temperature, top_k, top_p, u: rng.uniform() });
            logits.extend(l);
        }
        let n = rows.len();
        let x = upload(&dev, &logits).unwrap();
        let prm = upload(&dev, &sampling::encode_rows(&rows)).unwrap();
        let mut ebuf = zeros::<f32>(&dev, n * v).unwrap();
        let mut out = zeros::<i32>(&dev, n * 2).unwrap();
        sampling::sample_rows(&dev, &x, n, v, &prm, &mut ebuf, &mut out).unwrap();
        let decided = sampling::decode_rows(&download(&dev, &out).unwrap(), v).unwrap();
        for (r, (d, p)) in decided.iter().zip(&rows).enumerate() {
            let l = &logits[r * v..(r + 1) * v];
            let params =
                SamplingParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, ..Default::default() };
            let want = sample_with(&params, l, p.u);
            match *d {
                Sampled::NaN => assert!(want.is_err(), "v {v} row {r}: NaN from the device, CPU {want:?}"),
                Sampled::Token(t) => {
                    assert_eq!(Some(t), want.as_ref().ok().copied(), "v {v} row {r} {p:?}: device token differs");
                    same += 1;
                }
                Sampled::Rounded(t) => {
                    rounded += 1;
                    rounded_same += usize::from(Some(t) == want.as_ref().ok().copied());
                }
                Sampled::Host => {
                    // resolved on the host from the row's logits with its uniform
                    let t = resolve(&[*d], std::slice::from_ref(p), Some(l), v).unwrap();
                    assert_eq!(Some(t[0]), want.as_ref().ok().copied(), "v {v} row {r}: host fallback differs");
                    host += 1;
                }
            }
        }
    }
    eprintln!("sample_rows: {same} rows exactly the CPU's token, {host} to the host, {rounded_same}/{rounded} rounded-normalizer rows the CPU's token");
    assert!(same > 100, "too few rows decided on the device: {same}");
}

fn fixture(name: &str) -> dsv3_core::model::Model {
    let root = std::env::var_os("DSV3_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    dsv3_core::model::Model::load(&root.join(name), Default::default()).unwrap()
}

/// Two device sessions over the same inputs: one brings back the logits and samples on the host
/// with `Sampler::sample`, the other samples on the device (`step_sample`, inside the captured
/// decode graph after the first replay) with uniforms from a Sampler of the same seed. Same tokens.
#[test]
fn session_step_sample_gives_the_host_samplers_tokens() {
    use dsv3_kernels::model::sample::next_row;
    use dsv3_kernels::model::{CudaModel, CudaOptions, CudaSession};
    let Some(dev) = device("session_step_sample_gives_the_host_samplers_tokens") else { return };
    for (name, dtype) in [("v3_tiny", dsv3_kernels::DType::F32), ("v2_lite", dsv3_kernels::DType::Bf16)] {
        let model = fixture(name);
        let v = model.cfg.vocab_size;
        let cm = CudaModel::new(dev.clone(), &model, CudaOptions { dtype, keep_fp8: false }).unwrap();
        let mut a = CudaSession::new(&cm, 3, 40).unwrap();
        let mut b = CudaSession::new(&cm, 3, 40).unwrap();
        let params = [
            SamplingParams { temperature: 0.8, seed: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 5, seed: 2, ..Default::default() },
            SamplingParams { temperature: 1.2, top_p: 0.9, seed: 3, ..Default::default() },
        ];
        let mut host: Vec<Sampler> = params.iter().map(|p| Sampler::new(p.clone()).unwrap()).collect();
        let mut devs: Vec<Sampler> = params.iter().map(|p| Sampler::new(p.clone()).unwrap()).collect();
        let mut rng = Rng::new(11);
        let mut inputs: Vec<(usize, Vec<u32>)> = [4usize, 1, 9]
            .iter()
            .enumerate()
            .map(|(i, &n)| (i, (0..n).map(|_| rng.below(v as u64) as u32).collect()))
            .collect();
        for step in 0..7 {
            let refs: Vec<(usize, &[u32])> = inputs.iter().map(|(i, t)| (*i, &t[..])).collect();
            let la = a.step(&refs).unwrap();
            let want: Vec<u32> = (0..3).map(|r| host[r].sample(&la[r * v..(r + 1) * v]).unwrap()).collect();
            let rows: Vec<RowSample> = devs.iter_mut().map(next_row).collect();
            let got = b.step_sample(&refs, &rows).unwrap();
            assert_eq!(got, want, "{name} step {step}: device sampling differs from the host sampler");
            inputs = want.iter().enumerate().map(|(i, &t)| (i, vec![t])).collect();
        }
        // a wrong number of rows is an input error, and leaves the caches alone
        let l0 = b.len(0);
        assert!(b.step_sample(&[(0, &[1])], &[]).is_err());
        assert_eq!(b.len(0), l0);
    }
}

/// `model::generate` with a seed: the tokens of a host loop over the same session steps.
#[test]
fn generate_samples_on_the_device_like_the_host_loop() {
    use dsv3_kernels::model::{generate::generate, CudaModel, CudaOptions, CudaSession};
    let Some(dev) = device("generate_samples_on_the_device_like_the_host_loop") else { return };
    let model = fixture("v3_tiny");
    let v = model.cfg.vocab_size;
    let cm =
        CudaModel::new(dev.clone(), &model, CudaOptions { dtype: dsv3_kernels::DType::F32, keep_fp8: false }).unwrap();
    let params =
        SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 42, max_new_tokens: 12, ..Default::default() };
    let prompt = [3u32, 1, 4, 1, 5];
    let got = generate(&cm, &prompt, &params, |_| true).unwrap().tokens;
    let mut s = CudaSession::new(&cm, 1, prompt.len() + 12).unwrap();
    let mut sampler = Sampler::new(params.clone()).unwrap();
    let mut want = Vec::new();
    let mut toks = prompt.to_vec();
    while want.len() < 12 {
        let l = s.step(&[(0, &toks)]).unwrap();
        let t = sampler.sample(&l[..v]).unwrap();
        want.push(t);
        toks = vec![t];
    }
    assert_eq!(got, want);
}
