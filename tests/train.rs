//! The trainer: accumulation equals one big batch, masks drop positions, the bias update
//! follows load, clipping bounds the update, and the loss falls on a fixed batch.
mod common;
use common::*;
use dsv3::model::block::Ffn;
use dsv3::model::train::PassOptions;
use dsv3::model::LoadOptions;
use dsv3::train::trainer::{micro_batches, MicroBatch};
use dsv3::train::{AdamW, LrSchedule, TrainConfig, Trainer};

fn seqs() -> Vec<Vec<u32>> {
    golden_ids("v3_group", "input_ids").unwrap()
}

#[test]
fn accumulation_equals_one_batch() {
    let model = load("v3_group", LoadOptions::default());
    let s = seqs();
    let cfg = TrainConfig { bias_update_speed: 0.0, ..Default::default() };
    let mut a = Trainer::new(model.clone(), AdamW::deepseek_v3(), cfg.clone());
    let mut b = Trainer::new(model, AdamW::deepseek_v3(), cfg);
    let ma = a.train_step(&micro_batches(s.clone(), 2)).unwrap();
    let mb = b.train_step(&micro_batches(s, 1)).unwrap();
    assert!((ma.loss - mb.loss).abs() < 1e-5 * ma.loss, "{} vs {}", ma.loss, mb.loss);
    assert!((ma.grad_norm - mb.grad_norm).abs() < 1e-4 * ma.grad_norm);
    assert_eq!(ma.expert_load, mb.expert_load);
    let mut wa = Vec::new();
    a.model.visit(&mut |_, t| wa.extend_from_slice(t));
    let mut i = 0;
    b.model.visit(&mut |n, t| {
        for v in t.iter() {
            assert!((v - wa[i]).abs() < 1e-6, "{n}");
            i += 1;
        }
    });
}

#[test]
fn mask_drops_positions() {
    let mut model = load("v3_tiny", LoadOptions::default());
    model.make_trainable();
    let s = golden_ids("v3_tiny", "input_ids").unwrap();
    let one: Vec<&[u32]> = vec![&s[0]];
    let t = s[0].len() - 1;
    // counting only the last position equals the CE of that position alone
    let mut mask = vec![0.0; t];
    mask[t - 1] = 1.0;
    let mut g = model.zeros_like();
    let masked = model.train_pass(&one, &mut g, &PassOptions { mask: Some(mask), ..Default::default() }).unwrap();
    let logits = model.forward(&one).unwrap();
    let v = model.cfg.vocab_size;
    let row = &logits[(t - 1) * v..t * v];
    let want = dsv3::ops::softmax::logsumexp(row) - row[s[0][t] as usize];
    assert!((masked.ce_loss - want).abs() < 1e-5, "{} vs {want}", masked.ce_loss);
}

/// Each MoE layer's correction bias.
fn router_biases(tr: &Trainer) -> Vec<Vec<f32>> {
    tr.model
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => m.router.bias.clone(),
            _ => None,
        })
        .collect()
}

#[test]
fn bias_update_follows_load_and_loss_falls() {
    let model = load("v3_group", LoadOptions::default());
    let cfg = TrainConfig { schedule: LrSchedule::Constant { lr: 3e-3 }, ..Default::default() };
    let mut tr = Trainer::new(model, AdamW::deepseek_v3(), cfg);
    let before = router_biases(&tr);
    let batch = micro_batches(seqs(), 2);
    let first = tr.train_step(&batch).unwrap();
    let after = router_biases(&tr);
    for ((b0, b1), load) in before.iter().zip(&after).zip(&first.expert_load) {
        let mean = load.iter().sum::<u32>() as f32 / load.len() as f32;
        for ((x0, x1), &l) in b0.iter().zip(b1).zip(load) {
            let want = x0 + 0.001 * (mean - l as f32).signum() * if mean == l as f32 { 0.0 } else { 1.0 };
            assert!((x1 - want).abs() < 1e-7, "overloaded experts go down, underloaded up");
        }
    }
    assert!(first.max_over_mean.iter().all(|&r| r >= 1.0));
    let mut last = first.loss;
    for _ in 0..15 {
        last = tr.train_step(&batch).unwrap().loss;
    }
    assert!(last < first.loss * 0.7, "loss {} → {last}", first.loss);
}

#[test]
fn clipping_and_empty_steps() {
    let model = load("v3_tiny", LoadOptions::default());
    let cfg = TrainConfig { clip_norm: Some(1e-3), ..Default::default() };
    let mut tr = Trainer::new(model, AdamW::deepseek_v3(), cfg);
    let m = tr.train_step(&micro_batches(golden_ids("v3_tiny", "input_ids").unwrap(), 4)).unwrap();
    assert!(m.grad_norm > 1e-3, "the reported norm is the pre-clip norm");
    let mut after = 0f64;
    tr.grad.visit(&mut |_, g| after += g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>());
    assert!((after.sqrt() - 1e-3).abs() < 1e-6);
    assert!(tr.train_step(&[MicroBatch { seqs: vec![vec![1]], mask: None }]).is_err());
}

/// Tied embeddings: passes accumulating into one buffer add each pass's head gradient once,
/// and after a step the head is the updated embedding again.
#[test]
fn tied_embeddings_accumulate_once_and_stay_tied() {
    let mut cfg = load("v3_tiny", LoadOptions::default()).cfg.clone();
    cfg.tie_word_embeddings = true;
    let v = cfg.vocab_size as u32;
    let mut model = dsv3::model::Model::random(cfg, 3, 0.05).unwrap();
    model.make_trainable();
    let s: Vec<Vec<u32>> = (0..4u32).map(|i| (0..9u32).map(|j| (i * 31 + j * 7 + 1) % v).collect()).collect();
    let refs: Vec<&[u32]> = s.iter().map(|x| &x[..]).collect();
    let mut once = model.zeros_like();
    model.train_pass(&refs, &mut once, &PassOptions::default()).unwrap();
    let mut twice = model.zeros_like();
    for _ in 0..2 {
        model.train_pass(&refs, &mut twice, &PassOptions::default()).unwrap();
    }
    for (a, b) in once.embed.iter().zip(&twice.embed) {
        assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + a.abs()), "embedding gradient {b} is not twice {a}");
    }
    let mut tr = Trainer::new(model, AdamW::deepseek_v3(), TrainConfig::default());
    let before = tr.model.embed.clone();
    tr.train_step(&micro_batches(s.clone(), 2)).unwrap();
    tr.train_step(&micro_batches(s, 2)).unwrap();
    assert_ne!(tr.model.embed, before, "the embedding trained");
    assert_eq!(tr.model.lm_head.dense(), tr.model.embed, "the tied head follows the embedding");
}
