//! The `dsv3` binary as a user runs it: the fixed `logits` contract against HF goldens,
//! generate / info / init / bench, and clear errors (exit 1, no panic) on bad input.
use dsv3_core::weights::file::read_safetensors;
use dsv3_core::weights::write::{to_bytes, OutTensor};
mod common;
use common::*;
use std::path::Path;

#[test]
fn logits_contract_matches_hf_goldens() {
    let d = tmp("logits");
    for name in ["v3_group", "v2_lite", "v3_fp8"] {
        let golden = read_safetensors(&fixture(name).join("golden.safetensors")).unwrap();
        let ids = golden.get("input_ids").unwrap();
        let input = d.join(format!("{name}-in.safetensors"));
        std::fs::write(&input, to_bytes(&[OutTensor::i64("input_ids", &ids.shape, &ids.to_i64().unwrap())]).unwrap())
            .unwrap();
        let out = d.join(format!("{name}-out.safetensors"));
        let m = fixture(name);
        ok(&[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let got = read_safetensors(&out).unwrap();
        let l = got.get("logits").unwrap();
        let want = golden.get("logits").unwrap();
        assert_eq!(l.shape, want.shape);
        let (a, b) = (l.to_f32().unwrap(), want.to_f32().unwrap());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(err <= 1e-4, "{name}: {err}");
    }
}

#[test]
fn logits_bad_inputs() {
    let d = tmp("logits-bad");
    let m = fixture("v3_tiny");
    let m = m.to_str().unwrap();
    let input = d.join("in.safetensors");
    let out = d.join("out.safetensors");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    std::fs::write(&input, to_bytes(&[OutTensor::i64("tokens", &[1, 2], &[1, 2])]).unwrap()).unwrap();
    assert!(fails(&["logits", "--model", m, "--input", i, "--out", o]).contains("'input_ids'"));
    std::fs::write(&input, to_bytes(&[OutTensor::i64("input_ids", &[1, 2], &[1, 99])]).unwrap()).unwrap();
    assert!(fails(&["logits", "--model", m, "--input", i, "--out", o]).contains("99"));
    std::fs::write(&input, to_bytes(&[OutTensor::i64("input_ids", &[2], &[1, 2])]).unwrap()).unwrap();
    assert!(fails(&["logits", "--model", m, "--input", i, "--out", o]).contains("[B,T]"));
    std::fs::write(&input, b"garbage").unwrap();
    assert!(fails(&["logits", "--model", m, "--input", i, "--out", o]).contains("in.safetensors"));
    assert!(fails(&["logits", "--model", "/no/such/model", "--input", i, "--out", o])
        .contains("/no/such/model/config.json"));
    assert!(!out.exists(), "no output file after a failure");
}

#[test]
fn generate_info_and_bench() {
    let m = fixture("v3_group");
    let m = m.to_str().unwrap();
    let (out, _) = ok(&["generate", "--model", m, "--ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos"]);
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap().split(',').count(), 5, "{out}");
    let stats = lines.next().unwrap();
    assert!(
        stats.contains("prefill: 3 tokens")
            && stats.contains("5 tokens generated, decode: 4 steps")
            && stats.contains("tokens/s"),
        "{out}"
    );
    // seeded sampling is reproducible
    let args = [
        "generate",
        "--model",
        m,
        "--ids",
        "5,6",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--ignore-eos",
    ];
    let first_line = |o: String| o.lines().next().unwrap().to_string();
    assert_eq!(first_line(ok(&args).0), first_line(ok(&args).0));
    assert!(fails(&["generate", "--model", m, "--prompt", "hello"]).contains("tokenizer"));
    assert!(fails(&["generate", "--model", m, "--ids", "1", "--top-p", "0"]).contains("top_p"));
    assert!(fails(&["generate", "--model", m, "--ids", "1", "--attn", "fast"]).contains("--attn"));
    let (info, _) = ok(&["info", "--model", fixture("v3_fp8").to_str().unwrap()]);
    for needle in ["deepseek_v3", "params total", "params active", "kv cache/token", "absorbed: 80 values", "fp8 e4m3"]
    {
        assert!(info.contains(needle), "info lacks '{needle}':\n{info}");
    }
    let (b, _) = ok(&["bench", "--model", m, "--prompt-len", "4", "--new-tokens", "4", "--repeat", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(b.trim()).unwrap();
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // training steps with the decoder's linears in the FP8 recipe (CPU emulation)
    let (b, _) =
        ok(&["bench", "--model", m, "--train", "--precision", "fp8", "--prompt-len", "8", "--repeat", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(b.trim()).unwrap();
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(fails(&["bench", "--model", m, "--train", "--precision", "bf8"]).contains("--precision must be f32 or fp8"));
}

#[test]
fn init_then_generate_with_the_byte_tokenizer() {
    let d = tmp("init");
    let cfg = d.join("cfg.json");
    std::fs::write(
        &cfg,
        r#"{"model_type":"deepseek_v3","vocab_size":259,"hidden_size":32,"num_hidden_layers":2,"num_attention_heads":2,
        "q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":8,"qk_rope_head_dim":8,"v_head_dim":8,
        "intermediate_size":48,"moe_intermediate_size":16,"n_routed_experts":4,"num_experts_per_tok":2,
        "n_group":2,"topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"eos_token_id":257}"#,
    )
    .unwrap();
    let model = d.join("model");
    let (o, _) = ok(&["init", "--config", cfg.to_str().unwrap(), "--out", model.to_str().unwrap(), "--seed", "3"]);
    assert!(o.contains("wrote"));
    ok(&["generate", "--model", model.to_str().unwrap(), "--prompt", "12+7=", "--max-new-tokens", "4"]);
    assert!(fails(&["init", "--preset", "huge", "--out", model.to_str().unwrap()]).contains("bench-4m"));
}

#[test]
fn hf_tokenizer_json_matches_python_tokenizers() {
    let dir = fixture("tokenizer");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tj = dir.join("tokenizer.json");
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let (out, _) = ok(&["tokenize", "--tokenizer", tj.to_str().unwrap(), "--text", text, "--decode"]);
        let mut lines = out.splitn(2, '\n');
        let ids: Vec<u64> =
            lines.next().unwrap().split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
        let want: Vec<u64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids, want, "ids of {text:?}");
        let decoded = lines.next().unwrap().strip_suffix('\n').unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decode of {text:?}");
    }
    // a model directory with tokenizer.json: --prompt works end to end
    let d = tmp("tok-model");
    let model = d.join("m");
    ok(&["init", "--config", dir.join("config.json").to_str().unwrap(), "--out", model.to_str().unwrap()]);
    std::fs::copy(&tj, model.join("tokenizer.json")).unwrap();
    let (ids, _) = ok(&["tokenize", "--model", model.to_str().unwrap(), "--text", "12+7="]);
    let n = ids.trim().split(',').count();
    assert_eq!(ids.split(',').next(), Some("0"), "BOS first: {ids}");
    let (out, _) = ok(&["generate", "--model", model.to_str().unwrap(), "--prompt", "12+7=", "--max-new-tokens", "6"]);
    assert!(out.contains(&format!("prefill: {n} tokens")), "{out}");
    assert!(fails(&["tokenize", "--tokenizer", "/no/tokenizer.json", "--text", "x"]).contains("/no/tokenizer.json"));
}

#[test]
fn grad_contract_matches_hf_autograd() {
    let d = tmp("grad");
    for name in ["v3_group", "v2_lite"] {
        let golden = read_safetensors(&fixture(name).join("grad_golden.safetensors")).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let input = fixture(name).join("grad_golden.safetensors"); // holds input_ids too
        let m = fixture(name);
        ok(&[
            "grad",
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let got = read_safetensors(&out).unwrap();
        let names: Vec<&str> = golden.names().filter(|n| *n != "input_ids").collect();
        assert_eq!(got.names().count(), names.len(), "{name}: same tensor set as HF (loss + grads)");
        for n in names {
            let (a, b) = (got.get(n).unwrap(), golden.get(n).unwrap());
            assert_eq!(a.shape, b.shape, "{name} {n}");
            let (a, b) = (a.to_f32().unwrap(), b.to_f32().unwrap());
            let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
            assert!(diff / norm <= 1e-4, "{name} {n}: {}", diff / norm);
        }
    }
    let one = d.join("short.safetensors");
    std::fs::write(&one, to_bytes(&[OutTensor::i64("input_ids", &[1, 1], &[3])]).unwrap()).unwrap();
    let m = fixture("v3_tiny");
    assert!(fails(&["grad", "--model", m.to_str().unwrap(), "--input", one.to_str().unwrap(), "--out", "/tmp/x.st"])
        .contains("T >= 2"));
}

#[test]
fn train_resume_outputs_and_errors() {
    let d = tmp("train");
    let data = d.join("data.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let out = d.join("run");
    let (o, s) = (out.to_str().unwrap(), data.to_str().unwrap());
    let common = ["--data", s, "--out", o, "--batch", "4", "--seq-len", "32", "--quiet"];
    ok(&[&["train", "--preset", "tiny", "--steps", "6"], &common[..]].concat());
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for k in
            ["step", "loss", "grad_norm", "lr", "tokens_per_s", "expert_load", "max_over_mean_load", "balance_loss"]
        {
            assert!(v.get(k).is_some(), "metrics lack {k}: {l}");
        }
    }
    assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().starts_with("<svg"));
    let ck = out.join("checkpoint");
    for f in ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(ck.join(f).exists(), "{f}");
    }
    // resume to 9 steps: metrics continue, the checkpoint advances
    ok(&[&["train", "--resume", ck.to_str().unwrap(), "--steps", "9"], &common[..]].concat());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 9);
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(st["step"], 9);
    ok(&["generate", "--model", ck.to_str().unwrap(), "--prompt", "the ", "--max-new-tokens", "5"]);
    // SFT JSONL and pre-tokenized u16
    let sft = d.join("sft.jsonl");
    std::fs::write(&sft, "{\"prompt\":\"1+1=\",\"completion\":\"2\"}\n{\"prompt\":\"2+2=\",\"completion\":\"4\"}\n")
        .unwrap();
    ok(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--data",
        sft.to_str().unwrap(),
        "--out",
        d.join("sft").to_str().unwrap(),
        "--quiet",
    ]);
    let u16f = d.join("tok.u16");
    std::fs::write(&u16f, (0..200u16).flat_map(|i| (i % 250).to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    ok(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--data",
        u16f.to_str().unwrap(),
        "--out",
        d.join("u16").to_str().unwrap(),
        "--seq-len",
        "16",
        "--quiet",
    ]);
    // a preset with an MTP module trains its MTP loss, and the checkpoint keeps the module
    let mtp = d.join("mtp");
    ok(&[
        "train",
        "--preset",
        "tiny",
        "--mtp-depth",
        "1",
        "--steps",
        "2",
        "--data",
        s,
        "--out",
        mtp.to_str().unwrap(),
        "--seq-len",
        "16",
        "--quiet",
    ]);
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(mtp.join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert!(last["mtp_loss"].as_f64().unwrap() > 0.0);
    let (info, _) = ok(&["info", "--model", mtp.join("checkpoint").to_str().unwrap()]);
    assert!(info.contains("+ 1 MTP"), "{info}");
    // bad input
    assert!(fails(&["train", "--preset", "tiny", "--data", "/no/data.txt", "--out", o]).contains("/no/data.txt"));
    assert!(fails(&["train", "--preset", "tiny", "--data", s, "--out", o, "--format", "xml"]).contains("--format"));
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\":\"x\"}\n").unwrap();
    assert!(fails(&["train", "--preset", "tiny", "--data", bad.to_str().unwrap(), "--out", o]).contains("completion"));
    std::fs::write(&bad, "not json\n").unwrap();
    assert!(fails(&["train", "--preset", "tiny", "--data", bad.to_str().unwrap(), "--out", o]).contains("bad.jsonl:1"));
    assert!(fails(&["train", "--preset", "tiny", "--data", s, "--out", o, "--lr", "0"]).contains("--lr"));
    assert!(fails(&["train", "--data", s, "--out", o]).contains("--preset"));
}

#[test]
fn demo_runs_and_reports_accuracy() {
    let d = tmp("demo");
    let dir = d.join("demo");
    let args = ["--steps", "20", "--eval", "20", "--grpo-steps", "3", "--prompts", "2", "--group", "3"];
    let (out, _) = ok(&[&["demo", "--out", dir.to_str().unwrap()], &args[..]].concat());
    assert!(out.contains("held-out accuracy before training"), "{out}");
    assert!(out.contains("held-out accuracy after supervised training"), "{out}");
    assert!(out.contains("after GRPO") && out.contains("sampling") && out.contains("rollout tokens/s"), "{out}");
    for f in ["checkpoint/model.safetensors", "loss.svg", "grpo.svg"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    assert!(fails(&["demo", "--digits", "9"]).contains("--digits"));
}

#[test]
fn quantize_writes_deepseek_fp8_format() {
    let d = tmp("quant");
    let q = d.join("q");
    let src = fixture("v3_tiny");
    ok(&["quantize", "--model", src.to_str().unwrap(), "--out", q.to_str().unwrap()]);
    let st = read_safetensors(&q.join("model.safetensors")).unwrap();
    let orig = read_safetensors(&src.join("model.safetensors")).unwrap();
    let linears =
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let mut n_fp8 = 0;
    for name in orig.names() {
        let t = st.get(name).unwrap();
        let is_linear =
            name.starts_with("model.layers.") && linears.iter().any(|l| name.ends_with(&format!(".{l}.weight")));
        if is_linear {
            assert_eq!(t.dtype, dsv3_core::weights::DType::F8E4M3, "{name}");
            let s = st.get(&format!("{name}_scale_inv")).unwrap_or_else(|| panic!("{name}_scale_inv"));
            assert_eq!(s.shape, vec![t.shape[0].div_ceil(128), t.shape[1].div_ceil(128)]);
            n_fp8 += 1;
        } else {
            assert_eq!(t.bytes(), orig.get(name).unwrap().bytes(), "{name} copied unchanged");
        }
    }
    assert!(n_fp8 > 10 && st.get("model.layers.1.mlp.gate.weight").unwrap().dtype != dsv3_core::weights::DType::F8E4M3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "fp8");
    assert_eq!(cfg["quantization_config"]["weight_block_size"], serde_json::json!([128, 128]));
    // the engine loads it and its logits stay close to the original's
    let input = src.join("golden.safetensors");
    let (a, b) = (d.join("a.st"), d.join("b.st"));
    ok(&["logits", "--model", src.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", a.to_str().unwrap()]);
    ok(&["logits", "--model", q.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", b.to_str().unwrap()]);
    let la = read_safetensors(&a).unwrap().get("logits").unwrap().to_f32().unwrap();
    let lb = read_safetensors(&b).unwrap().get("logits").unwrap().to_f32().unwrap();
    let ref64: Vec<f64> = la.iter().map(|&x| x as f64).collect();
    let diff = dsv3_core::fp8::gemm::calc_diff(&lb, &ref64);
    assert!(diff < 1e-3, "logits calc_diff {diff}");
    assert!(fails(&["quantize", "--model", q.to_str().unwrap(), "--out", d.join("q2").to_str().unwrap()])
        .contains("already FP8"));
}

#[test]
fn grpo_grad_contract_matches_trl() {
    // each case of tests/fixtures/grpo/grpo.json records the exact command line and TRL's results
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("grpo/grpo.json")).unwrap()).unwrap();
    let d = tmp("grpo");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut n = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        let line = case["cli"].as_str().unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut args: Vec<String> = line
            .split_whitespace()
            .skip(1)
            .map(|a| if a.starts_with("tests/") { root.join(a).to_str().unwrap().to_string() } else { a.to_string() })
            .collect();
        args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        ok(&argv);
        let got = read_safetensors(&out).unwrap();
        let want = read_safetensors(&fixture(&format!("grpo/golden_{name}.safetensors"))).unwrap();
        let (l, wl) = (got.get("loss").unwrap().to_f32().unwrap()[0], want.get("loss").unwrap().to_f32().unwrap()[0]);
        assert!(((l - wl) / wl).abs() <= 1e-5, "{name}: loss {l} vs TRL {wl}");
        let mut worst = 0f64;
        for t in want.names().filter(|t| t.starts_with("grad.")) {
            let (a, b) = (
                got.get(t).unwrap_or_else(|| panic!("{name}: no {t}")).to_f32().unwrap(),
                want.get(t).unwrap().to_f32().unwrap(),
            );
            let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
            let e = if norm == 0.0 { diff } else { diff / norm };
            worst = worst.max(e);
            assert!(e <= 1e-5, "{name} {t}: relative L2 {e:e}");
        }
        eprintln!("{name}: loss {l} (TRL {wl}), worst grad rel L2 {worst:.1e}");
        // TRL >= 1.10's default KL bias correction, where the case recorded TRL's loss with it
        if let Some(kbc) = case["trl"]["use_bias_correction_kl"]["loss"].as_f64() {
            args.push("--kl-bias-correction".into());
            let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            ok(&argv);
            let l = read_safetensors(&out).unwrap().get("loss").unwrap().to_f32().unwrap()[0] as f64;
            assert!(((l - kbc) / kbc).abs() <= 1e-5, "{name} with KL bias correction: {l} vs TRL {kbc}");
        }
        n += 1;
    }
    assert!(n >= 4);
}

#[test]
fn grpo_and_rejection_sampling_on_user_data() {
    let d = tmp("grpo-user-data");
    let model = d.join("m");
    ok(&["init", "--preset", "tiny", "--out", model.to_str().unwrap(), "--seed", "4"]);
    let data = d.join("p.jsonl");
    let lines: String = (0..30).map(|i| format!("{{\"prompt\":\"{i}+1=\",\"answer\":\"{}\"}}\n", i + 1)).collect();
    std::fs::write(&data, lines).unwrap();
    let out = d.join("run");
    let (m, s, o) = (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let common = [
        "--data",
        s,
        "--out",
        o,
        "--reward",
        "exact:1,format:0.5",
        "--group",
        "4",
        "--prompts",
        "3",
        "--max-completion-length",
        "4",
        "--stop",
        "\\n",
        "--lr",
        "1e-4",
        "--quiet",
        "--eval",
        s,
        "--eval-every",
        "2",
        "--beta",
        "0.04",
    ];
    ok(&[&["grpo", "--model", m, "--steps", "3"], &common[..]].concat());
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for k in [
            "reward",
            "reward_std",
            "rewards/exact/mean",
            "rewards/format/std",
            "frac_reward_zero_std",
            "kl",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "completions/clipped_ratio",
            "time/sampling_s",
        ] {
            assert!(v.get(k).is_some(), "metrics lack {k}: {l}");
        }
        assert!(v["completions/max_length"].as_u64().unwrap() <= 4);
    }
    assert!(text.contains("eval/accuracy"));
    assert!(std::fs::read_to_string(out.join("rewards.svg")).unwrap().starts_with("<svg"));
    let ck = out.join("checkpoint");
    ok(&[&["grpo", "--resume", ck.to_str().unwrap(), "--steps", "5"], &common[..]].concat());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 5);
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(st["user"]["grpo_step"], 5, "{st}");
    // bad input: clear errors
    let bad =
        |extra: &[&str]| fails(&[&["grpo", "--model", m, "--steps", "1", "--data", s, "--out", o], extra].concat());
    assert!(bad(&["--reward", "bogus"]).contains("unknown reward"));
    assert!(bad(&["--reward", "exact:x"]).contains("weight"));
    assert!(bad(&["--stop", "ab"]).contains("one"));
    assert!(bad(&["--ref-sync-steps", "2"]).contains("--beta"));
    assert!(bad(&["--loss-type", "ppo"]).contains("loss type"));
    assert!(bad(&["--group", "1"]).contains("2 generations"));
    let broken = d.join("broken.jsonl");
    std::fs::write(&broken, "{\"answer\":\"1\"}\n").unwrap();
    assert!(fails(&["grpo", "--model", m, "--data", broken.to_str().unwrap(), "--out", o]).contains("\"prompt\""));
    // rejection sampling: everything passes threshold 0; the output feeds dsv3 train's SFT path
    let sft = d.join("sft.jsonl");
    let (so, _) = ok(&[
        "rejection-sample",
        "--model",
        m,
        "--data",
        s,
        "--out",
        sft.to_str().unwrap(),
        "--reward",
        "exact",
        "--threshold",
        "0",
        "--group",
        "3",
        "--max-completion-length",
        "3",
        "--stop",
        "\\n",
        "--max-per-prompt",
        "2",
        "--keep-truncated",
    ]);
    assert!(so.contains("kept"), "{so}");
    let kept = std::fs::read_to_string(&sft).unwrap();
    let n = kept.lines().count();
    assert!((30..=60).contains(&n), "1-2 distinct completions per prompt: {n}");
    for l in kept.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["prompt"].is_string() && v["completion"].is_string() && v["reward"].is_number());
    }
    // threshold 1 keeps only exact answers (a random model has few or none)
    let exact = d.join("exact.jsonl");
    ok(&[
        "rejection-sample",
        "--model",
        m,
        "--data",
        s,
        "--out",
        exact.to_str().unwrap(),
        "--reward",
        "exact",
        "--group",
        "2",
        "--max-completion-length",
        "3",
        "--stop",
        "\\n",
    ]);
    for l in std::fs::read_to_string(&exact).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let p = v["prompt"].as_str().unwrap();
        let want: u32 = p.trim_end_matches("+1=").parse::<u32>().unwrap() + 1;
        assert_eq!(v["completion"].as_str().unwrap().trim(), want.to_string());
    }
    let run2 = d.join("sftrun");
    ok(&[
        "train",
        "--model",
        m,
        "--data",
        sft.to_str().unwrap(),
        "--format",
        "sft",
        "--out",
        run2.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ]);
}
