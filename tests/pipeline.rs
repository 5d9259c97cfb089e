//! The pipeline executor against serial training: for 1F1B, ZB-H1, DualPipe and DualPipeV at
//! PP 2 and 4 with 2·PP and more micro-batches, the per-micro-batch losses are bit-identical and
//! every gradient tensor equals the serial one to 1e-6 (relative, max-abs over max-abs).
use dsv3::config::Config;
use dsv3::model::Model;
use dsv3::pipeline::exec::{run_step, serial_step};
use dsv3::pipeline::stage::LossOptions;
use dsv3::pipeline::{Kind, Schedule};
use dsv3::rng::Rng;
use dsv3::train::MicroBatch;

/// A small V3 model (MLA with q-LoRA, one dense layer then MoE layers with a shared expert and
/// group routing): 8 layers, so DualPipeV at PP 4 gets one layer per stage.
fn model(layers: usize) -> Model {
    let cfg = format!(
        r#"{{"model_type":"deepseek_v3","vocab_size":48,"hidden_size":16,"num_hidden_layers":{layers},
        "num_attention_heads":2,"q_lora_rank":8,"kv_lora_rank":8,"qk_nope_head_dim":4,"qk_rope_head_dim":4,
        "v_head_dim":4,"intermediate_size":24,"moe_intermediate_size":8,"n_routed_experts":4,"num_experts_per_tok":2,
        "n_group":2,"topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"tie_word_embeddings":false}}"#
    );
    let cfg = Config::from_json_str(&cfg, "test.json").unwrap();
    let mut m = Model::random(cfg, 7, 0.1).unwrap();
    m.make_trainable();
    m
}

/// `n` micro-batches of 2 sequences of varying length; every third has a loss mask.
fn micro(n: usize, seed: u64) -> Vec<MicroBatch> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|j| {
            let seqs: Vec<Vec<u32>> =
                (0..2).map(|k| (0..5 + (j + k) % 4).map(|_| rng.below(48) as u32).collect()).collect();
            let mask = (j % 3 == 2).then(|| {
                let n: usize = seqs.iter().map(|s| s.len() - 1).sum();
                (0..n).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect()
            });
            MicroBatch { seqs, mask }
        })
        .collect()
}

fn flat(m: &mut Model) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    m.visit(&mut |n, t| v.push((n.to_string(), t.to_vec())));
    v
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

/// Runs `kind` at `pp` with `m` micro-batches; returns the largest relative gradient error and
/// whether every gradient was bit-identical.
fn check(model: &Model, kind: Kind, pp: usize, m: usize, opts: &LossOptions) -> (f32, bool) {
    let mbs = micro(m, 100 + m as u64);
    let (want_losses, mut want) = serial_step(model, &mbs, opts).unwrap();
    let s = Schedule::new(kind, pp, m).unwrap();
    let mut out = run_step(model, &s, &mbs, opts).unwrap();
    assert_eq!(
        out.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        want_losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "{kind:?} pp {pp} m {m}: losses differ"
    );
    let (got, want) = (flat(&mut out.grad), flat(&mut want));
    assert_eq!(got.len(), want.len());
    let (mut worst, mut exact) = (0f32, true);
    for ((n, g), (_, w)) in got.iter().zip(&want) {
        let e = rel(g, w);
        assert!(e <= 1e-6, "{kind:?} pp {pp} m {m}: {n} differs by {e:e}");
        assert!(w.iter().any(|&x| x != 0.0) || n.contains("experts"), "{n}: the reference gradient is all zero");
        worst = worst.max(e);
        exact &= g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
    }
    (worst, exact)
}

#[test]
fn pipelined_step_matches_serial_training() {
    let opts = LossOptions { seq_alpha: 1e-3, aux_alpha: 0.0 };
    let m8 = model(8);
    for pp in [2, 4] {
        for kind in [Kind::OneFOneB, Kind::Zb1p, Kind::DualPipe, Kind::DualPipeV] {
            for m in [2 * pp, 2 * pp + 2] {
                let (worst, exact) = check(&m8, kind, pp, m, &opts);
                // one copy per stage: the same additions in the same order
                if kind != Kind::DualPipe {
                    assert!(exact, "{kind:?} pp {pp} m {m}: gradients not bit-identical (worst {worst:e})");
                }
            }
        }
    }
    // more micro-batches than the minimum, odd counts where allowed, fewer layers than stages
    let m3 = model(3);
    check(&m3, Kind::DualPipeV, 2, 5, &opts);
    check(&m3, Kind::DualPipe, 4, 12, &opts);
    check(&m3, Kind::Zb1p, 4, 7, &LossOptions { seq_alpha: 0.0, aux_alpha: 1e-2 });
}

#[test]
fn executor_errors_are_clear() {
    let m = model(2);
    let s = Schedule::new(Kind::OneFOneB, 2, 4).unwrap();
    let e = run_step(&m, &s, &micro(3, 1), &LossOptions::default()).unwrap_err().to_string();
    assert!(e.contains("4 micro-batches"), "{e}");
    let mut bad = micro(4, 1);
    bad[2].seqs[1][3] = 999;
    let e = run_step(&m, &s, &bad, &LossOptions::default()).unwrap_err().to_string();
    assert!(e.contains("token id 999"), "{e}");
}
