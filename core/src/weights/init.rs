//! The tensor layout of a checkpoint (names and shapes, as HF `save_pretrained` writes them)
//! and random initialization of a fresh model in that layout.
use crate::config::Config;
use crate::rng::Rng;
use crate::weights::write::OutTensor;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// What a tensor is, for initialization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A weight matrix or embedding: normal(0, std).
    Matrix,
    /// A norm weight: ones.
    Norm,
    /// A bias (attention biases, the router correction bias): zeros.
    Bias,
}

/// Every tensor of a checkpoint for `cfg` (main layers, then MTP modules) with its shape.
pub fn tensor_specs(cfg: &Config) -> Vec<(String, Vec<usize>, Kind)> {
    let (v, d, h) = (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads);
    let (dn, dr, dv, c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let dq = dn + dr;
    let mut s: Vec<(String, Vec<usize>, Kind)> = Vec::new();
    let mut add = |n: String, shape: &[usize], k: Kind| s.push((n, shape.to_vec(), k));
    add("model.embed_tokens.weight".into(), &[v, d], Kind::Matrix);
    for idx in 0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers {
        let p = format!("model.layers.{idx}");
        add(format!("{p}.input_layernorm.weight"), &[d], Kind::Norm);
        add(format!("{p}.post_attention_layernorm.weight"), &[d], Kind::Norm);
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(rq) => {
                add(format!("{a}.q_a_proj.weight"), &[rq, d], Kind::Matrix);
                if cfg.attention_bias {
                    add(format!("{a}.q_a_proj.bias"), &[rq], Kind::Bias);
                }
                add(format!("{a}.q_a_layernorm.weight"), &[rq], Kind::Norm);
                add(format!("{a}.q_b_proj.weight"), &[h * dq, rq], Kind::Matrix);
            }
            None => add(format!("{a}.q_proj.weight"), &[h * dq, d], Kind::Matrix),
        }
        add(format!("{a}.kv_a_proj_with_mqa.weight"), &[c + dr, d], Kind::Matrix);
        if cfg.attention_bias {
            add(format!("{a}.kv_a_proj_with_mqa.bias"), &[c + dr], Kind::Bias);
        }
        add(format!("{a}.kv_a_layernorm.weight"), &[c], Kind::Norm);
        add(format!("{a}.kv_b_proj.weight"), &[h * (dn + dv), c], Kind::Matrix);
        add(format!("{a}.o_proj.weight"), &[d, h * dv], Kind::Matrix);
        if cfg.attention_bias {
            add(format!("{a}.o_proj.bias"), &[d], Kind::Bias);
        }
        let m = format!("{p}.mlp");
        let mut mlp = |pre: String, inter: usize| {
            add(format!("{pre}.gate_proj.weight"), &[inter, d], Kind::Matrix);
            add(format!("{pre}.up_proj.weight"), &[inter, d], Kind::Matrix);
            add(format!("{pre}.down_proj.weight"), &[d, inter], Kind::Matrix);
        };
        if cfg.is_moe_layer(idx) {
            let (e, i) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
            for x in 0..e {
                mlp(format!("{m}.experts.{x}"), i);
            }
            if cfg.n_shared_experts > 0 {
                mlp(format!("{m}.shared_experts"), i * cfg.n_shared_experts);
            }
            add(format!("{m}.gate.weight"), &[e, d], Kind::Matrix);
            if cfg.topk_method == crate::config::TopkMethod::NoauxTc {
                add(format!("{m}.gate.e_score_correction_bias"), &[e], Kind::Bias);
            }
        } else {
            mlp(m, cfg.intermediate_size);
        }
        if idx >= cfg.num_hidden_layers {
            add(format!("{p}.enorm.weight"), &[d], Kind::Norm);
            add(format!("{p}.hnorm.weight"), &[d], Kind::Norm);
            add(format!("{p}.eh_proj.weight"), &[d, 2 * d], Kind::Matrix);
            add(format!("{p}.shared_head.norm.weight"), &[d], Kind::Norm);
        }
    }
    add("model.norm.weight".into(), &[d], Kind::Norm);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, d], Kind::Matrix);
    }
    s
}

/// A randomly initialized f32 checkpoint for `cfg`: matrices normal(0, `std`), norms one,
/// biases zero. Deterministic in `seed`.
pub fn random_checkpoint(cfg: &Config, seed: u64, std: f32) -> Vec<OutTensor> {
    let mut rng = Rng::new(seed);
    tensor_specs(cfg)
        .into_iter()
        .map(|(name, shape, kind)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = match kind {
                Kind::Matrix => (0..n).map(|_| rng.normal() * std).collect(),
                Kind::Norm => vec![1.0; n],
                Kind::Bias => vec![0.0; n],
            };
            OutTensor::f32(&name, &shape, &v)
        })
        .collect()
}
