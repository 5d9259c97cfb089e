//! Gradients: every trainable tensor's gradient checked by central finite differences along the
//! gradient's own direction (d/dε L(θ + ε·g/|g|) = |g|), on small random models of each family;
//! and against HF autograd goldens (tests/fixtures/*/grad_golden.safetensors) at 1e-4.
mod common;
use common::*;
use dsv3::config::Config;
use dsv3::model::train::PassOptions;
use dsv3::model::{LoadOptions, Model};
use dsv3::weights::init::random_checkpoint;
use dsv3::weights::write::to_bytes;
use dsv3::weights::TensorStore;

fn random_model(json: &str, seed: u64, std: f32) -> Model {
    let cfg = Config::from_json_str(json, "test").unwrap();
    let mut store = TensorStore::new();
    let mut t = random_checkpoint(&cfg, seed, std);
    // non-trivial norms and biases
    let mut rng = dsv3::rng::Rng::new(seed + 1);
    for x in &mut t {
        if x.name.ends_with("norm.weight") || x.name.ends_with(".bias") {
            let v: Vec<f32> = (0..x.data.len() / 4).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            x.data = bytemuck_cast(&v);
        }
    }
    store.add_bytes(to_bytes(&t).unwrap(), "m").unwrap();
    Model::from_store(cfg, store, LoadOptions::default()).unwrap()
}

fn bytemuck_cast(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The loss, and the experts every token was routed to (to detect a perturbation that flips routing).
fn loss(m: &Model, seqs: &[&[u32]], opts: &PassOptions) -> (f64, Vec<Vec<usize>>) {
    let mut g = m.zeros_like();
    let out = m.train_pass(seqs, &mut g, opts).unwrap();
    let l = (out.ce_loss + out.balance_loss + out.mtp_loss) as f64;
    let (_, trace) = m.train_forward(seqs).unwrap();
    let mut routes = Vec::new();
    for s in &trace.saved {
        if let dsv3::model::block::FfnSaved::Moe(ms) = &s.ffn {
            routes.extend(ms.routes.iter().map(|r| {
                let mut e: Vec<usize> = r.iter().map(|p| p.0).collect();
                e.sort();
                e
            }));
        }
    }
    (l, routes)
}

fn fd_check(json: &str, seqs: &[&[u32]], opts: &PassOptions) {
    let model = random_model(json, 11, 0.15);
    let mut grad = model.zeros_like();
    model.train_pass(seqs, &mut grad, opts).unwrap();
    fd_check_with(&model, grad, seqs, &|m| loss(m, seqs, opts).0, opts.scale as f64);
}

/// Checks every tensor of `grad` against central differences of `objective` along the tensor's
/// gradient direction (`scale`: the factor the pass applied to the gradients).
fn fd_check_with(model: &Model, mut grad: Model, seqs: &[&[u32]], objective: &dyn Fn(&Model) -> f64, scale: f64) {
    let opts = &PassOptions::default();
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    grad.visit(&mut |n, t| grads.push((n.to_string(), t.to_vec())));
    let mut checked = 0;
    for (name, g) in &grads {
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if norm < 1e-6 {
            continue; // e.g. an expert no token chose
        }
        let eval = |eps: f64| {
            let mut m = model.clone();
            m.visit(&mut |n, t| {
                if n == name {
                    for (w, &gv) in t.iter_mut().zip(g) {
                        *w += (eps * gv as f64 / norm) as f32;
                    }
                }
            });
            (objective(&m), loss(&m, seqs, opts).1)
        };
        // shrink ε until the perturbation leaves every routing decision unchanged
        let base = loss(model, seqs, opts).1;
        let mut eps = 1e-3f64;
        let fd = loop {
            let ((lp, rp), (lm, rm)) = (eval(eps), eval(-eps));
            if (rp == base && rm == base) || eps < 1e-6 {
                assert!(rp == base && rm == base, "{name}: routing flips even at ε = {eps}");
                // the pass scales gradients by opts.scale, not the loss
                break (lp - lm) / (2.0 * eps) * scale;
            }
            eps /= 4.0;
        };
        let rel = (fd - norm).abs() / norm;
        // f32 loss: noise of about 1e-6 / ε on the difference quotient
        let tol = 2e-2 * norm + 2e-6 / eps;
        assert!(
            (fd - norm).abs() <= tol,
            "{name}: finite difference {fd:.6} vs |g| {norm:.6} (rel {rel:.3}, ε {eps:e})"
        );
        checked += 1;
    }
    assert!(checked > 10, "only {checked} tensors checked");
}

const V3: &str = r#"{"model_type":"deepseek_v3","vocab_size":37,"hidden_size":16,"num_hidden_layers":2,
 "num_attention_heads":2,"q_lora_rank":12,"kv_lora_rank":8,"qk_nope_head_dim":4,"qk_rope_head_dim":4,
 "v_head_dim":6,"intermediate_size":24,"moe_intermediate_size":8,"n_routed_experts":4,"num_experts_per_tok":2,
 "n_group":2,"topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":2.5,
 "attention_bias":true,
 "rope_scaling":{"type":"yarn","factor":4,"original_max_position_embeddings":16,"mscale":1.0,"mscale_all_dim":0.7}}"#;

const V2: &str = r#"{"model_type":"deepseek_v2","vocab_size":37,"hidden_size":16,"num_hidden_layers":2,
 "num_attention_heads":2,"q_lora_rank":null,"kv_lora_rank":8,"qk_nope_head_dim":4,"qk_rope_head_dim":4,
 "v_head_dim":6,"intermediate_size":24,"moe_intermediate_size":8,"n_routed_experts":4,"num_experts_per_tok":2,
 "n_group":1,"topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":1.5,
 "scoring_func":"softmax","topk_method":"greedy"}"#;

#[test]
fn finite_differences_v3_lora_yarn_bias_moe() {
    fd_check(V3, &[&[1, 5, 9, 2, 30, 7], &[3, 3, 8, 36, 0]], &PassOptions::default());
}

#[test]
fn finite_differences_v2_plain_q_softmax_router() {
    fd_check(V2, &[&[4, 2, 19, 33, 1, 8, 8]], &PassOptions::default());
}

#[test]
fn finite_differences_with_balance_losses_and_mask() {
    // large α so the balance terms matter; a mask that drops some positions (SFT)
    let mask = vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
    let opts = PassOptions { scale: 0.7, seq_alpha: 0.5, aux_alpha: 0.3, mask: Some(mask), mtp_lambda: 0.0 };
    fd_check(V3, &[&[1, 5, 9, 2, 30, 7], &[3, 3, 8, 36, 0]], &opts);
    fd_check(V2, &[&[4, 2, 19, 33, 1, 8], &[9, 9, 1, 2, 3]], &opts);
}

/// Per-tensor relative L2 error `|a − b| / |b|` (b = 0 → `|a|`).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

#[test]
fn gradients_match_hf_autograd() {
    use dsv3::weights::file::read_safetensors;
    let mut checked = 0;
    for name in ["v3_tiny", "v3_group", "v3_yarn", "v3_yarn_mscale", "v3_qnull", "v2_lite", "v2_group", "v3_fp8"] {
        let path = fixture(name).join("grad_golden.safetensors");
        assert!(path.exists(), "{name}: grad_golden.safetensors missing (run tests/fixtures/generate.py)");
        let golden = read_safetensors(&path).unwrap();
        let ids = golden.get("input_ids").unwrap();
        let rows: Vec<Vec<u32>> =
            ids.to_i64().unwrap().chunks(ids.shape[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect();
        let seqs: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
        let mut model = load(name, LoadOptions::default());
        model.make_trainable();
        let mut grad = model.zeros_like();
        let loss = model.loss_and_grads(&seqs, &mut grad).unwrap();
        let want = golden.get("loss").unwrap().to_f32().unwrap()[0];
        assert!(((loss - want) / want).abs() <= 1e-5, "{name}: loss {loss} vs HF {want}");
        let main: std::collections::HashSet<String> = model.main_param_names().into_iter().collect();
        let mut n = 0;
        let mut worst = (0f64, String::new());
        grad.visit(&mut |pname, g| {
            if !main.contains(pname) {
                return;
            }
            let w = golden.get(&format!("grad.{pname}")).unwrap_or_else(|| panic!("{name}: HF has no grad.{pname}"));
            let e = rel_l2(g, &w.to_f32().unwrap());
            if e > worst.0 {
                worst = (e, pname.to_string());
            }
            assert!(e <= 1e-4, "{name}: grad.{pname} relative L2 error {e:e}");
            n += 1;
        });
        let hf_count = golden.names().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(n, hf_count, "{name}: we have {n} gradient tensors, HF {hf_count}");
        eprintln!("{name:16} loss {loss:.6} (HF {want:.6}); {n} grads, worst rel L2 {:.1e} ({})", worst.0, worst.1);
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn finite_differences_with_mtp_depth_2() {
    let json = V3.replace("\"attention_bias\":true,", "\"attention_bias\":true,\"num_nextn_predict_layers\":2,");
    let model = random_model(&json, 11, 0.15);
    assert_eq!(model.mtp.len(), 2, "the random checkpoint has two MTP modules");
    let opts = PassOptions { mtp_lambda: 0.6, seq_alpha: 0.1, ..Default::default() };
    fd_check(&json, &[&[1, 5, 9, 2, 30, 7, 11], &[3, 3, 8, 36, 0, 4]], &opts);
    // MTP tensors get gradients, and the loss changes with λ
    let mut g = model.zeros_like();
    let seqs: [&[u32]; 1] = [&[1, 5, 9, 2, 30, 7, 11]];
    let out = model.train_pass(&seqs, &mut g, &opts).unwrap();
    assert!(out.mtp_loss > 0.0);
    let mut n = 0.0f64;
    g.visit(&mut |name, t| {
        if name.starts_with("model.layers.2.") || name.starts_with("model.layers.3.") {
            n += t.iter().map(|x| (*x as f64).abs()).sum::<f64>();
        }
    });
    assert!(n > 0.0, "MTP modules receive gradients");
}

#[test]
fn finite_differences_of_the_grpo_objective() {
    use dsv3::grpo::pass::Rollouts;
    use dsv3::grpo::{GrpoConfig, LossType};
    let model = random_model(V3, 11, 0.15);
    let ids: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 2, 30, 7, 0],
        vec![1, 5, 9, 4, 4, 0, 0],
        vec![3, 3, 8, 36, 1, 2, 9],
        vec![3, 3, 8, 11, 0, 0, 0],
    ];
    let mask: Vec<f32> = [
        [0., 0., 0., 1., 1., 1., 0.],
        [0., 0., 0., 1., 1., 0., 0.],
        [0., 0., 0., 0., 1., 1., 1.],
        [0., 0., 0., 0., 1., 0., 0.],
    ]
    .concat();
    let rewards = [1.0f32, 0.0, 0.2, 0.9];
    let mut r = dsv3::rng::Rng::new(4);
    let noise = |r: &mut dsv3::rng::Rng| (0..28).map(|_| -2.0 + 0.3 * r.normal()).collect::<Vec<f32>>();
    let (old, reff) = (noise(&mut r), noise(&mut r));
    let seqs: Vec<&[u32]> = ids.iter().map(|x| &x[..]).collect();
    for lt in [LossType::Grpo, LossType::Dapo, LossType::DrGrpo] {
        let cfg = GrpoConfig { beta: 0.1, loss_type: lt, temperature: 0.8, epsilon_high: 0.28, ..Default::default() };
        let ro = Rollouts {
            ids: &ids,
            mask: &mask,
            rewards: &rewards,
            group_size: 2,
            old_logps: Some(&old),
            ref_logps: Some(&reff),
        };
        let mut grad = model.zeros_like();
        model.grpo_pass(&ro, &cfg, &mut grad).unwrap();
        let objective = |m: &Model| {
            let mut g = m.zeros_like();
            m.grpo_pass(&ro, &cfg, &mut g).unwrap().0.loss as f64
        };
        fd_check_with(&model, grad, &seqs, &objective, 1.0);
    }
}

/// Sequences longer than the training attention's causal row block (64 rows, several blocks,
/// a ragged last one): the training pass's loss equals the inference path's (which does not
/// block), and its gradients pass the finite-difference check (one dense layer: no routing).
#[test]
fn long_sequences_cross_causal_blocks() {
    let mut rng = dsv3::rng::Rng::new(5);
    let long: Vec<Vec<u32>> = [150usize, 70].iter().map(|&t| (0..t).map(|_| rng.below(37) as u32).collect()).collect();
    let seqs: Vec<&[u32]> = long.iter().map(|s| &s[..]).collect();
    let model = random_model(V3, 11, 0.15);
    let mut g = model.zeros_like();
    let ce = model.train_pass(&seqs, &mut g, &PassOptions::default()).unwrap().ce_loss as f64;
    let (mut sum, mut cnt) = (0f64, 0usize);
    for s in &seqs {
        let logits = model.forward(&[s]).unwrap();
        for (i, row) in logits.chunks_exact(37).take(s.len() - 1).enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - row[s[i + 1] as usize] as f64;
            cnt += 1;
        }
    }
    let want = sum / cnt as f64;
    assert!((ce - want).abs() < 1e-4 * want.abs(), "training loss {ce} vs inference {want}");
    let dense = V3.replace(r#""num_hidden_layers":2"#, r#""num_hidden_layers":1"#);
    fd_check(&dense, &seqs, &PassOptions::default());
}
