//! Named model configurations (HF `config.json` text), for `dsv3 init`, `dsv3 train`, the demo
//! and the benchmarks.
use crate::config::Config;
use crate::error::{Error, Result};
use alloc::format;

/// `(name, description, config.json)`.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "tiny",
        "~0.6M params, byte-level vocabulary: trains in minutes on 2 CPU cores (the demo model)",
        r#"{"model_type":"deepseek_v3","vocab_size":259,"hidden_size":128,"num_hidden_layers":3,
        "num_attention_heads":4,"num_key_value_heads":4,"q_lora_rank":64,"kv_lora_rank":32,
        "qk_nope_head_dim":16,"qk_rope_head_dim":16,"v_head_dim":16,"intermediate_size":256,
        "moe_intermediate_size":64,"n_routed_experts":8,"num_experts_per_tok":2,"n_group":2,
        "topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":2.5,
        "norm_topk_prob":true,"rms_norm_eps":1e-6,"rope_theta":10000.0,"max_position_embeddings":1024,
        "num_nextn_predict_layers":0,"bos_token_id":256,"eos_token_id":257,"tie_word_embeddings":false}"#,
    ),
    (
        "bench-4m",
        "~4M params: the CPU benchmark config (hidden 256, 4 layers, 8 experts top-2)",
        r#"{"model_type":"deepseek_v3","vocab_size":512,"hidden_size":256,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":4,"q_lora_rank":128,"kv_lora_rank":64,
        "qk_nope_head_dim":32,"qk_rope_head_dim":16,"v_head_dim":32,"intermediate_size":704,
        "moe_intermediate_size":128,"n_routed_experts":8,"num_experts_per_tok":2,"n_group":2,
        "topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":2.5,
        "norm_topk_prob":true,"rms_norm_eps":1e-6,"rope_theta":10000.0,"max_position_embeddings":4096,
        "num_nextn_predict_layers":0,"bos_token_id":0,"eos_token_id":1,"tie_word_embeddings":false}"#,
    ),
    (
        "bench-88m",
        "~88M params: the GPU benchmark config (hidden 512, 8 layers, 16 experts top-4)",
        r#"{"model_type":"deepseek_v3","vocab_size":32000,"hidden_size":512,"num_hidden_layers":8,
        "num_attention_heads":8,"num_key_value_heads":8,"q_lora_rank":256,"kv_lora_rank":128,
        "qk_nope_head_dim":64,"qk_rope_head_dim":32,"v_head_dim":64,"intermediate_size":1408,
        "moe_intermediate_size":256,"n_routed_experts":16,"num_experts_per_tok":4,"n_group":4,
        "topk_group":2,"n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":2.5,
        "norm_topk_prob":true,"rms_norm_eps":1e-6,"rope_theta":10000.0,"max_position_embeddings":4096,
        "num_nextn_predict_layers":0,"bos_token_id":0,"eos_token_id":1,"tie_word_embeddings":false}"#,
    ),
];

/// The config of a named preset.
pub fn preset(name: &str) -> Result<Config> {
    match PRESETS.iter().find(|p| p.0 == name) {
        Some(p) => Config::from_json_str(p.2, &format!("<preset {name}>")),
        None => {
            let names: alloc::vec::Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            Err(Error::Input(format!("unknown preset '{name}' (known: {})", names.join(", "))))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn presets_parse() {
        for p in super::PRESETS {
            super::preset(p.0).unwrap();
        }
        assert!(super::preset("nope").is_err());
    }
}
