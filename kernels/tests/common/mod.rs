//! Helpers for the GPU tests: the device (or a visible SKIP), random data, poisoned outputs,
//! and error measures.
#![allow(dead_code)]
use dsv3_core::rng::Rng;
use dsv3_kernels::{Act, DType, Device};
use std::sync::{Arc, OnceLock};

/// The GPU, or `None` after printing a SKIP line straight to stderr (libtest captures
/// `eprintln!` of passing tests; a skipped check must be visible in CI's output).
pub fn device(test: &str) -> Option<Arc<Device>> {
    static DEV: OnceLock<Result<Arc<Device>, String>> = OnceLock::new();
    match DEV.get_or_init(|| Device::new(0).map(Arc::new).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA GPU ({e})");
            None
        }
    }
}

/// Whether `dev` is the CPU emulator standing in for a GPU (kernels/emu/gpu_tests.sh): every
/// thread a fiber, every MMA in f64, so the few tests with GPU-sized shapes (hundreds of
/// GFLOP) leave those shapes to real GPUs and say so.
pub fn emulator(dev: &Device) -> bool {
    dev.name.starts_with("dsv3 CPU emulator")
}

/// Whether a case of `flops` runs here: always on a GPU; on the emulator only up to 2 GFLOP
/// (a skipped case prints a line saying so).
pub fn runs_here(dev: &Device, flops: f64, what: &str) -> bool {
    if emulator(dev) && flops > 2e9 {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "EMULATOR: {what} ({:.0} GFLOP) left to a GPU", flops / 1e9);
        return false;
    }
    true
}

/// `n` normal(0, 1) values (never all zeros).
pub fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Rounds through bf16 (what a bf16 buffer holds).
pub fn bf16r(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// An output buffer of `n` NaNs: every element the kernel must write and does not stays NaN.
pub fn poisoned(dev: &Device, dtype: DType, n: usize) -> Act {
    Act::from_f32(dev, dtype, &vec![f32::NAN; n]).unwrap()
}

/// `‖a − b‖ / ‖b‖` (f64 sums).
#[allow(dead_code)]
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (d / n.max(f64::MIN_POSITIVE)).sqrt()
}

/// Largest `|a - b| / (atol + |b|)`-style error: max over i of `|a_i - b_i|`, failing on NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

/// Asserts `|got - want| <= atol + rtol·|want|` elementwise.
pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            !g.is_nan() && (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {rtol})"
        );
    }
}

/// Tolerance of a bf16 output: its rounding (2^-8 relative) plus inputs rounded to bf16.
pub const BF16_RTOL: f32 = 1.6e-2;

/// Random E4M3 codes (no NaN) and positive block scales for `[g, n, k]`.
pub fn fp8_weight(rng: &mut Rng, g: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
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
                dense[at] =
                    dsv3_core::fp8::format::E4M3_LUT[q[at] as usize] * s[gg * nb * kb + (i / 128) * kb + j / 128];
            }
        }
    }
    (q, s, dense)
}

/// The rope widths and scalings the RoPE tests run: V3's YaRN at 64 rope dims, and plain RoPE at
/// 16 and 2.
pub const ROPE_CASES: [(usize, dsv3_core::config::RopeScaling); 3] = [
    (
        64,
        dsv3_core::config::RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.707,
        },
    ),
    (16, dsv3_core::config::RopeScaling::None),
    (2, dsv3_core::config::RopeScaling::None),
];

/// A one-layer config with `dr` rope dims and `scaling` (the RoPE tests' tables).
pub fn rope_cfg(dr: usize, scaling: dsv3_core::config::RopeScaling) -> dsv3_core::config::Config {
    let text = format!(
        r#"{{"model_type":"deepseek_v3","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
        "num_attention_heads":1,"q_lora_rank":null,"kv_lora_rank":4,"qk_nope_head_dim":16,
        "qk_rope_head_dim":{dr},"v_head_dim":4,"intermediate_size":8}}"#
    );
    let mut c = dsv3_core::config::Config::from_json_str(&text, "test").unwrap();
    c.rope_scaling = scaling;
    c
}
