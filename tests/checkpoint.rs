//! Checkpoints: the saved model gives the same logits when loaded back, a resumed run's losses
//! are bit-identical to an uninterrupted run, and a failure mid-write leaves the previous
//! checkpoint intact.
mod common;
use common::*;
use dsv3::model::LoadOptions;
use dsv3::rng::Rng;
use dsv3::train::checkpoint::{self, Fault};
use dsv3::train::data::{Dataset, Loader};
use dsv3::train::{AdamW, LrSchedule, TrainConfig, Trainer};

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg() -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule::WarmupCosine { lr: 2e-3, min_lr: 2e-4, warmup: 2, total: 6 },
        ..Default::default()
    }
}

fn loader() -> Loader {
    let v = 128u32;
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 7 + i / 3) % v).collect();
    Loader::new(Dataset::Stream(tokens), 10, 4, 9)
}

fn user_state(l: &Loader) -> serde_json::Value {
    serde_json::json!({ "rng": l.rng.state() })
}

#[test]
fn resume_is_bit_identical_and_checkpoint_reloads() {
    let base = load("v3_group", LoadOptions::default());
    // uninterrupted: 6 steps
    let mut a = Trainer::new(base.clone(), AdamW::deepseek_v3(), cfg());
    let mut la = loader();
    let full: Vec<f32> = (0..6).map(|_| a.train_step(&[la.next_batch()]).unwrap().loss).collect();
    // 3 steps, save, load, 3 more
    let mut b = Trainer::new(base, AdamW::deepseek_v3(), cfg());
    let mut lb = loader();
    let mut resumed: Vec<f32> = (0..3).map(|_| b.train_step(&[lb.next_batch()]).unwrap().loss).collect();
    let dir = tmp("resume").join("ckpt");
    checkpoint::save(&mut b, &dir, user_state(&lb), Fault::None).unwrap();
    // the checkpoint is an ordinary model directory: same logits as the trainer's model
    let ids = golden_ids("v3_group", "input_ids").unwrap();
    let seqs: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let reloaded = dsv3::model::Model::load(&dir, LoadOptions::default()).unwrap();
    assert_eq!(reloaded.forward(&seqs).unwrap(), b.model.forward(&seqs).unwrap());
    drop(b);
    let (mut c, state) = checkpoint::load(&dir, cfg()).unwrap();
    assert_eq!(c.step, 3);
    let s: Vec<u64> = state["rng"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let mut lc = loader();
    lc.rng = Rng::from_state([s[0], s[1], s[2], s[3]]);
    resumed.extend((0..3).map(|_| c.train_step(&[lc.next_batch()]).unwrap().loss));
    assert_eq!(full, resumed, "losses after resuming must be bit-identical");
}

#[test]
fn a_failed_write_leaves_the_previous_checkpoint() {
    let mut tr = Trainer::new(load("v3_tiny", LoadOptions::default()), AdamW::deepseek_v3(), cfg());
    let mut l = Loader::new(Dataset::Stream((0..300u32).map(|i| i % 99).collect()), 8, 2, 1);
    tr.train_step(&[l.next_batch()]).unwrap();
    let root = tmp("fault");
    let dir = root.join("ckpt");
    checkpoint::save(&mut tr, &dir, serde_json::json!({"tag": "first"}), Fault::None).unwrap();
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    tr.train_step(&[l.next_batch()]).unwrap();
    for fault in [Fault::AfterModel, Fault::BeforeRename] {
        let e = checkpoint::save(&mut tr, &dir, serde_json::json!({"tag": "second"}), fault).unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        let (t, state) = checkpoint::load(&dir, cfg()).unwrap();
        assert_eq!((t.step, state["tag"].as_str()), (1, Some("first")));
        assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), before);
        let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary directories left: {leftovers:?}");
    }
    // and a normal save replaces it
    checkpoint::save(&mut tr, &dir, serde_json::json!({"tag": "second"}), Fault::None).unwrap();
    assert_eq!(checkpoint::load(&dir, cfg()).unwrap().0.step, 2);
    assert!(checkpoint::load(&root.join("nope"), cfg()).is_err());
}
