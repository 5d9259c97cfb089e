//! `--device cuda` as a user runs it. Without a GPU (CI): a clear error, exit 1, no panic.
//! With one: the logits contract on the GPU (f32 mode) against the CPU oracle's output, and
//! generate / bench in bf16.
use dsv3_core::weights::file::read_safetensors;
use dsv3_core::weights::write::{to_bytes, OutTensor};
mod common;
use common::*;

fn gpu() -> bool {
    dsv3_kernels::device_count().map(|n| n > 0).unwrap_or(false)
}

#[test]
fn bad_device_names_are_rejected() {
    for d in ["gpu", "cuda:x", "cuda:"] {
        let o = dsv3(&["bench", "--model", fixture("v3_group").to_str().unwrap(), "--device", d]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("--device must be cpu, cuda or cuda:N") && !err.contains("panicked"), "{err}");
    }
    let o = dsv3(&["bench", "--model", fixture("v3_group").to_str().unwrap(), "--device", "cuda", "--dtype", "fp4"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn without_a_gpu_device_cuda_is_a_clear_error() {
    if gpu() {
        let _ = writeln_skip("SKIP without_a_gpu_device_cuda_is_a_clear_error: a GPU is present");
        return;
    }
    let m = fixture("v3_group");
    let m = m.to_str().unwrap();
    let d = std::env::temp_dir().join(format!("dsv3-cuda-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let input = d.join("in.safetensors");
    std::fs::write(&input, to_bytes(&[OutTensor::i64("input_ids", &[1, 3], &[1, 2, 3])]).unwrap()).unwrap();
    let out = d.join("out.safetensors");
    for args in [
        vec!["generate", "--model", m, "--ids", "1,2,3", "--device", "cuda"],
        vec!["bench", "--model", m, "--device", "cuda:0", "--dtype", "f32"],
        vec![
            "logits",
            "--model",
            m,
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cuda",
        ],
    ] {
        let o = dsv3(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
        assert!(err.contains("CUDA") || err.contains("GPU"), "{err}");
    }
    assert!(!out.exists(), "no output on failure");
}

fn writeln_skip(msg: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stderr(), "{msg}")
}

#[test]
fn on_a_gpu_logits_match_the_cpu_and_generate_runs() {
    if !gpu() {
        let _ = writeln_skip(
            "SKIP on_a_gpu_logits_match_the_cpu_and_generate_runs: no CUDA GPU (driver or device missing)",
        );
        return;
    }
    let d = std::env::temp_dir().join(format!("dsv3-cuda-cli-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for name in ["v3_group", "v2_lite", "v3_fp8"] {
        let golden = read_safetensors(&fixture(name).join("golden.safetensors")).unwrap();
        let ids = golden.get("input_ids").unwrap();
        let input = d.join(format!("{name}-in.safetensors"));
        std::fs::write(&input, to_bytes(&[OutTensor::i64("input_ids", &ids.shape, &ids.to_i64().unwrap())]).unwrap())
            .unwrap();
        let m = fixture(name);
        let mut outs = Vec::new();
        for dev in [&["--device", "cpu"][..], &["--device", "cuda", "--dtype", "f32"][..]] {
            let out = d.join(format!("{name}-{}.safetensors", dev[1]));
            let mut args = vec!["logits", "--model", m.to_str().unwrap(), "--input", input.to_str().unwrap()];
            args.extend_from_slice(&["--out", out.to_str().unwrap()]);
            args.extend_from_slice(dev);
            ok(&args);
            outs.push(read_safetensors(&out).unwrap().get("logits").unwrap().to_f32().unwrap());
        }
        let worst = outs[0].iter().zip(&outs[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // f32 mode: the same math with another summation order (tiled GEMMs, online softmax)
        assert!(worst < 1e-4, "{name}: GPU f32 logits differ from the CPU by {worst}");
    }
    let m = fixture("v3_group");
    let (out, _) = ok(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--max-new-tokens",
        "8",
        "--device",
        "cuda",
    ]);
    assert!(out.contains("[cuda]"), "{out}");
    let (out, _) = ok(&["bench", "--model", m.to_str().unwrap(), "--device", "cuda", "--new-tokens", "8", "--json"]);
    assert!(out.contains("decode_tokens_per_s"), "{out}");
}
