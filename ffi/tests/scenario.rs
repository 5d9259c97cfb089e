//! The scenario every binding runs (C, C++, Go, Python, Swift): load the tiny fixture model,
//! greedy-generate 8 tokens, run 3 training steps on a fixed batch, load a missing path.
//! This test computes the expected results with the Rust API and checks them against
//! bindings/testdata/expected.json (rewrite it with DSV3_BLESS=1), so the file cannot go stale;
//! then it compiles tests/c/scenario.c against the C ABI and runs it (under valgrind when it is
//! installed: no leaks, no invalid accesses).
use dsv3_core::infer::{generate, SamplingParams};
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::train::trainer::MicroBatch;
use dsv3_core::train::{AdamW, LrSchedule, TrainConfig, Trainer};
use std::process::Command;

#[macro_use]
mod common;
use common::*;

/// The scenario's fixed inputs (also in expected.json for the bindings).
const PROMPT: [u32; 3] = [1, 2, 3];
const BATCH: [[u32; 8]; 2] = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]];
const LR: f32 = 5e-3;

fn expected() -> serde_json::Value {
    let model = Model::load(&root().join("tests/fixtures/v3_tiny"), LoadOptions::default()).unwrap();
    let params = SamplingParams { max_new_tokens: 8, ..Default::default() };
    let ids = generate(&model, &[&PROMPT], &params, |_| true).unwrap().tokens[0].clone();
    // the C API's dsv3_train_params with schedule 0 (constant lr) and otherwise default values
    let cfg = TrainConfig { schedule: LrSchedule::Constant { lr: LR }, ..Default::default() };
    let mut tr = Trainer::new(model, AdamW::new(0.9, 0.95, 1e-8, 0.1), cfg);
    let batch: Vec<Vec<u32>> = BATCH.iter().map(|r| r.to_vec()).collect();
    let losses: Vec<f32> =
        (0..3).map(|_| tr.train_step(&[MicroBatch { seqs: batch.clone(), mask: None }]).unwrap().loss).collect();
    serde_json::json!({
        "model": "tests/fixtures/v3_tiny",
        "prompt": PROMPT,
        "max_new_tokens": 8,
        "generated": ids,
        "train": {"batch": BATCH, "lr": LR, "schedule": 0, "steps": 3, "losses": losses},
        "missing_model": "/nonexistent/dsv3-model",
        "missing_model_error_contains": "/nonexistent/dsv3-model/config.json",
        "loss_rel_tolerance": 1e-5,
    })
}

#[test]
fn expected_values_are_current() {
    let path = root().join("bindings/testdata/expected.json");
    let want = expected();
    if std::env::var("DSV3_BLESS").is_ok() {
        std::fs::write(&path, serde_json::to_string_pretty(&want).unwrap() + "\n").unwrap();
    }
    let have: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("bindings/testdata/expected.json (DSV3_BLESS=1 writes it)"),
    )
    .unwrap();
    assert_eq!(have["generated"], want["generated"]);
    let (a, b) = (have["train"]["losses"].as_array().unwrap(), want["train"]["losses"].as_array().unwrap());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!(((x - y) / y).abs() < 1e-5, "expected.json loss {x} vs Rust {y}");
    }
    assert!(b[2].as_f64() < b[0].as_f64(), "losses decrease");
}

#[test]
fn c_scenario_under_valgrind() {
    build_c_library();
    let r = root();
    let out = lib_dir().join("c_scenario");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(r.join("tests/c/scenario.c"))
        .arg("-I")
        .arg(r.join("include"))
        .arg("-L")
        .arg(lib_dir())
        .args(["-ldsv3", "-o"])
        .arg(&out)
        .arg(format!("-Wl,-rpath,{}", lib_dir().display()))
        .status()
        .expect("a C compiler (cc)");
    assert!(st.success(), "compiling tests/c/scenario.c");
    let mut cmd = under_valgrind(&out);
    let o = cmd.current_dir(&r).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{text}");
    assert!(o.status.success(), "C scenario failed:\n{text}");
    assert!(text.contains("C scenario: ok"));
}
