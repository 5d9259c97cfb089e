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

/// `dsv3 train --device cuda` and `dsv3 bench --train --device cuda` without a GPU: a clear error,
/// exit 1, no panic, nothing written; `--pipeline` with `--device cuda` is refused either way.
#[test]
fn train_on_cuda_without_a_gpu_is_a_clear_error() {
    let m = fixture("v3_group");
    let m = m.to_str().unwrap();
    let d = std::env::temp_dir().join(format!("dsv3-cuda-train-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let data = d.join("data.txt");
    std::fs::write(&data, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20").unwrap();
    let out = d.join("run");
    let (data_s, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let train = ["train", "--preset", "tiny", "--data", data_s, "--out", out_s, "--steps", "2", "--seq-len", "8"];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = train.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let o = dsv3(&with(&["--device", "cuda", "--pipeline", "1f1b"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--pipeline") && err.contains("--device cuda") && !err.contains("panicked"), "{err}");
    let o = dsv3(&["bench", "--model", m, "--train", "--pipeline", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(2), "clap: --train conflicts with --pipeline");
    // the CPU's bf16 emulation is not a GPU precision (fp8 is: below, it gets as far as the GPU)
    let o = dsv3(&with(&["--device", "cuda", "--precision", "bf16"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--dtype"), "{err}");
    let o = dsv3(&["bench", "--model", m, "--precision", "fp8", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(2), "clap: --precision requires --train");
    let o = dsv3(&["bench", "--model", m, "--train", "--precision", "bf16", "--device", "cuda"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--precision must be f32 or fp8"), "{err}");
    let o = dsv3(&with(&["--device", "cuda", "--dtype", "fp4"]));
    assert_eq!(o.status.code(), Some(1));
    let o = dsv3(&["bench", "--model", m, "--train", "--profile"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--profile") && err.contains("--device cuda"), "{err}");
    if gpu() {
        let _ = writeln_skip("SKIP train_on_cuda_without_a_gpu_is_a_clear_error (no-GPU part): a GPU is present");
        return;
    }
    for args in [
        with(&["--device", "cuda"]),
        with(&["--device", "cuda:1", "--dtype", "f32"]),
        with(&["--device", "cuda", "--precision", "fp8"]),
        vec!["bench", "--model", m, "--train", "--device", "cuda", "--batch", "2", "--prompt-len", "8"],
        vec!["bench", "--model", m, "--train", "--device", "cuda", "--precision", "fp8"],
        vec!["bench", "--model", m, "--train", "--device", "cuda", "--dtype", "f32", "--json"],
    ] {
        let o = dsv3(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
        assert!(err.contains("CUDA") || err.contains("GPU"), "{err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    assert!(!out.join("checkpoint").exists() && !out.join("metrics.jsonl").exists(), "no output on failure");
}

/// On a GPU: `dsv3 train --device cuda --dtype f32` writes the CPU path's files (metrics.jsonl,
/// a checkpoint core loads, loss.svg), resumes, and its first losses track the CPU run's;
/// `dsv3 bench --train --device cuda --json` reports tokens/s and MFU.
#[test]
fn on_a_gpu_train_matches_the_cpu_and_resumes() {
    if !gpu() {
        let _ = writeln_skip("SKIP on_a_gpu_train_matches_the_cpu_and_resumes: no CUDA GPU (driver or device missing)");
        return;
    }
    let d = std::env::temp_dir().join(format!("dsv3-cuda-train-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let data = d.join("data.txt");
    let text: String = (0..400).map(|i| format!("{} + {} = {}\n", i % 17, i % 5, i % 17 + i % 5)).collect();
    std::fs::write(&data, text).unwrap();
    let data_s = data.to_str().unwrap().to_string();
    let run = |dir: &str, dev: &[&str], steps: &str, resume: bool| {
        let out = d.join(dir);
        let out_s = out.to_str().unwrap().to_string();
        let mut args: Vec<String> = ["train", "--data", &data_s, "--out", &out_s, "--steps", steps, "--seq-len", "16"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        args.extend(
            ["--batch", "4", "--threads", "1", "--quiet", "--schedule", "constant", "--lr", "3e-3"].map(String::from),
        );
        if resume {
            args.extend(["--resume".to_string(), out.join("checkpoint").to_str().unwrap().to_string()]);
        } else {
            args.extend(["--preset", "tiny", "--seed", "3"].map(String::from));
        }
        args.extend(dev.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        ok(&refs);
        let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        m.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let cpu = run("cpu", &["--device", "cpu"], "4", false);
    let first = run("gpu", &["--device", "cuda", "--dtype", "f32"], "2", false);
    assert_eq!(first.len(), 2);
    assert!(d.join("gpu/checkpoint/model.safetensors").exists() && d.join("gpu/loss.svg").exists());
    let gpu32 = run("gpu", &["--device", "cuda", "--dtype", "f32"], "4", true);
    assert_eq!(gpu32.len(), 4, "resumed run appends to metrics.jsonl");
    for (i, (a, b)) in cpu.iter().zip(&gpu32).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {i}: cpu loss {a}, gpu f32 loss {b}");
    }
    let bf = run("gpu_bf16", &["--device", "cuda", "--dtype", "bf16"], "3", false);
    assert!(bf.iter().all(|x| x.is_finite()), "{bf:?}");
    // FP8 linears: f32 activations track the CPU's FP8 emulation; bf16 activations run
    let cpu8 = run("cpu_fp8", &["--device", "cpu", "--precision", "fp8"], "2", false);
    let gpu8 = run("gpu_fp8", &["--device", "cuda", "--dtype", "f32", "--precision", "fp8"], "2", false);
    for (i, (a, b)) in cpu8.iter().zip(&gpu8).enumerate() {
        assert!((a - b).abs() <= 5e-3 * a.abs(), "step {i}: cpu FP8 loss {a}, gpu f32+FP8 loss {b}");
    }
    let bf8 = run("gpu_bf16_fp8", &["--device", "cuda", "--dtype", "bf16", "--precision", "fp8"], "3", false);
    assert!(bf8.iter().all(|x| x.is_finite()), "{bf8:?}");
    for (i, (a, b)) in bf.iter().zip(&bf8).enumerate() {
        assert!((a - b).abs() <= 3e-2 * a.abs(), "step {i}: bf16 loss {a}, bf16+FP8 loss {b}");
    }
    let (out, _) = ok(&[
        "bench",
        "--model",
        fixture("v3_group").to_str().unwrap(),
        "--train",
        "--device",
        "cuda",
        "--batch",
        "2",
        "--prompt-len",
        "32",
        "--repeat",
        "2",
        "--json",
        "--profile",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0 && v["mfu"].as_f64().unwrap() > 0.0, "{out}");
    check_profile(&v["profile"], "rmsnorm", &out);
    let (out, _) = ok(&[
        "bench",
        "--model",
        fixture("v3_group").to_str().unwrap(),
        "--train",
        "--precision",
        "fp8",
        "--device",
        "cuda",
        "--batch",
        "2",
        "--prompt-len",
        "32",
        "--repeat",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["precision"], "Fp8", "{out}");
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    assert!(v.get("profile").is_none(), "no profile unless asked: {out}");
    // the text table
    let (out, _) = ok(&[
        "bench",
        "--model",
        fixture("v3_group").to_str().unwrap(),
        "--train",
        "--precision",
        "fp8",
        "--device",
        "cuda",
        "--batch",
        "1",
        "--prompt-len",
        "16",
        "--repeat",
        "1",
        "--profile",
    ]);
    assert!(out.contains("GPU time by kernel, per step (2 steps profiled)"), "{out}");
    assert!(out.contains("us/call") && out.contains("  fp8_"), "{out}");
}

/// A `--profile` field of `dsv3 bench --json`: kernels with their calls and times, one of them
/// `expect`, busy time within the wall time.
fn check_profile(p: &serde_json::Value, expect: &str, out: &str) {
    let ks = p["kernels"].as_array().unwrap_or_else(|| panic!("no profile.kernels: {out}"));
    assert!(!ks.is_empty(), "{out}");
    assert!(ks.iter().any(|k| k["name"].as_str().is_some_and(|n| n.starts_with(expect))), "{expect}: {out}");
    for k in ks {
        assert!(k["calls"].as_f64().unwrap() > 0.0 && k["ms"].as_f64().unwrap() >= 0.0, "{out}");
    }
    let (busy, wall) = (p["busy_ms"].as_f64().unwrap(), p["wall_ms"].as_f64().unwrap());
    assert!(busy >= 0.0 && busy <= wall + 1e-6, "{out}");
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
    let (out, _) =
        ok(&["bench", "--model", m.to_str().unwrap(), "--device", "cuda", "--new-tokens", "8", "--json", "--profile"]);
    assert!(out.contains("decode_tokens_per_s"), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // the captured steps are one span each
    check_profile(&v["profile"], "decode graph", &out);
}
