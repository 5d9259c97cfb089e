//! Bad input gets a clear error naming the field, tensor or file — never a panic.
mod common;
use dsv3::config::Config;
use dsv3::model::{LoadOptions, Model};
use dsv3::weights::init::random_checkpoint;
use dsv3::weights::write::{to_bytes, OutTensor};
use dsv3::weights::{DType, TensorStore};
use dsv3::Error;

const CFG: &str = r#"{"model_type":"deepseek_v3","vocab_size":40,"hidden_size":16,"num_hidden_layers":2,
 "num_attention_heads":2,"q_lora_rank":8,"kv_lora_rank":8,"qk_nope_head_dim":4,"qk_rope_head_dim":4,
 "v_head_dim":4,"intermediate_size":24,"moe_intermediate_size":8,"n_routed_experts":4,"num_experts_per_tok":2,
 "n_group":2,"topk_group":1,"n_shared_experts":1,"first_k_dense_replace":1}"#;

fn cfg() -> Config {
    Config::from_json_str(CFG, "test.json").unwrap()
}

fn config_err(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(CFG).unwrap();
    edit(v.as_object_mut().unwrap());
    let e = Config::from_json_str(&v.to_string(), "dir/config.json").unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("dir/config.json"), "message does not name the file: {msg}");
    msg
}

#[test]
fn config_errors_name_field_and_file() {
    assert!(config_err(|m| {
        m.remove("hidden_size");
    })
    .contains("'hidden_size': missing"));
    assert!(config_err(|m| {
        m.insert("kv_lora_rank".into(), "x".into());
    })
    .contains("kv_lora_rank"));
    assert!(config_err(|m| {
        m.insert("model_type".into(), "llama".into());
    })
    .contains("model_type"));
    assert!(config_err(|m| {
        m.insert("num_key_value_heads".into(), 1.into());
    })
    .contains("num_key_value_heads"));
    assert!(config_err(|m| {
        m.insert("n_group".into(), 3.into());
    })
    .contains("n_group"));
    assert!(config_err(|m| {
        m.insert("num_experts_per_tok".into(), 9.into());
    })
    .contains("num_experts_per_tok"));
    assert!(config_err(|m| {
        m.insert("qk_rope_head_dim".into(), 5.into());
    })
    .contains("qk_rope_head_dim"));
    assert!(config_err(|m| {
        m.insert("rope_scaling".into(), serde_json::json!({"type": "dynamic", "factor": 2.0}));
    })
    .contains("rope_scaling.rope_type"));
    assert!(config_err(|m| {
        m.insert("rope_scaling".into(), serde_json::json!({"type": "yarn", "factor": 4.0}));
    })
    .contains("original_max_position_embeddings"));
    assert!(config_err(|m| {
        m.insert("quantization_config".into(), serde_json::json!({"quant_method": "gptq"}));
    })
    .contains("quant_method"));
    assert!(config_err(|m| {
        m.insert("hidden_act".into(), "gelu".into());
    })
    .contains("hidden_act"));
    let e = Config::from_json_str("{not json", "c.json").unwrap_err().to_string();
    assert!(e.contains("c.json") && e.contains("not valid JSON"), "{e}");
    // both rope spellings parse to the same thing
    let a = config_err_free(
        r#""rope_scaling":{"type":"yarn","factor":40,"original_max_position_embeddings":4096},"rope_theta":500.0"#,
    );
    let b = config_err_free(
        r#""rope_parameters":{"rope_type":"yarn","factor":40,"original_max_position_embeddings":4096,"rope_theta":500.0}"#,
    );
    assert_eq!(a.rope_scaling, b.rope_scaling);
    assert_eq!(a.rope_theta, 500.0);
    assert_eq!(b.rope_theta, 500.0);
}

fn config_err_free(extra: &str) -> Config {
    let text = format!("{},{extra}}}", CFG.trim_end().trim_end_matches('}'));
    Config::from_json_str(&text, "x").unwrap()
}

fn store_of(tensors: &[OutTensor]) -> TensorStore {
    let mut s = TensorStore::new();
    s.add_bytes(to_bytes(tensors).unwrap(), "model.safetensors").unwrap();
    s
}

fn load_err(tensors: Vec<OutTensor>) -> Error {
    match Model::from_store(cfg(), store_of(&tensors), LoadOptions::default()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn weights_err_for(e: &Error, name: &str) -> String {
    match e {
        Error::Weights { tensor, msg } => {
            assert_eq!(tensor, name, "{msg}");
            msg.clone()
        }
        other => panic!("expected a weights error for {name}, got {other:?}"),
    }
}

#[test]
fn weight_errors_name_the_tensor() {
    let good = random_checkpoint(&cfg(), 3, 0.1);
    assert!(Model::from_store(cfg(), store_of(&good), LoadOptions::default()).is_ok());
    let target = "model.layers.1.mlp.experts.2.up_proj.weight";
    let idx = good.iter().position(|t| t.name == target).unwrap();

    // missing
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t.remove(idx);
    assert!(weights_err_for(&load_err(t), target).contains("missing"));
    // extra
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t.push(OutTensor::f32("model.layers.7.foo.weight", &[2], &[1.0, 2.0]));
    assert!(weights_err_for(&load_err(t), "model.layers.7.foo.weight").contains("unexpected"));
    // wrong shape
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t[idx] = OutTensor::f32(target, &[16, 8], &vec![0.5; 128]);
    assert!(weights_err_for(&load_err(t), target).contains("expected shape [8, 16]"));
    // wrong dtype
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t[idx] = OutTensor::i64(target, &[8, 16], &[1; 128]);
    assert!(weights_err_for(&load_err(t), target).contains("I64"));
    // NaN
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    let mut v = vec![0.5f32; 128];
    v[17] = f32::NAN;
    t[idx] = OutTensor::f32(target, &[8, 16], &v);
    assert!(weights_err_for(&load_err(t), target).contains("non-finite"));
    // FP8 weight without its scale, then with a NaN code, then with a wrong scale shape
    let fp8 = |codes: Vec<u8>| OutTensor { name: target.into(), dtype: DType::F8E4M3, shape: vec![8, 16], data: codes };
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t[idx] = fp8(vec![0x38; 128]);
    weights_err_for(&load_err(t), &format!("{target}_scale_inv"));
    let scale =
        |shape: &[usize]| OutTensor::f32(&format!("{target}_scale_inv"), shape, &vec![1.0; shape.iter().product()]);
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    let mut codes = vec![0x38u8; 128];
    codes[5] = 0x7F;
    t[idx] = fp8(codes);
    t.push(scale(&[1, 1]));
    assert!(weights_err_for(&load_err(t), target).contains("NaN"));
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t[idx] = fp8(vec![0x38; 128]);
    t.push(scale(&[2, 1]));
    weights_err_for(&load_err(t), &format!("{target}_scale_inv"));
    // a valid FP8 weight loads
    let mut t = random_checkpoint(&cfg(), 3, 0.1);
    t[idx] = fp8(vec![0x38; 128]);
    t.push(scale(&[1, 1]));
    assert!(Model::from_store(cfg(), store_of(&t), LoadOptions::default()).is_ok());
}

#[test]
fn malformed_safetensors_bytes() {
    let bytes = to_bytes(&random_checkpoint(&cfg(), 3, 0.1)).unwrap();
    for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let mut s = TensorStore::new();
        let e = s.add_bytes(bytes[..cut].to_vec(), "shard-3.safetensors").unwrap_err();
        assert!(e.to_string().contains("shard-3.safetensors"), "{e}");
    }
    let mut garbage = bytes.clone();
    garbage[8..16].copy_from_slice(b"notjson!");
    assert!(TensorStore::new().add_bytes(garbage, "g.safetensors").is_err());
    // the same name in two shards
    let mut s = TensorStore::new();
    s.add_bytes(to_bytes(&[OutTensor::f32("a", &[1], &[1.0])]).unwrap(), "1.safetensors").unwrap();
    let e = s.add_bytes(to_bytes(&[OutTensor::f32("a", &[1], &[1.0])]).unwrap(), "2.safetensors").unwrap_err();
    assert!(e.to_string().contains("twice"));
}

#[test]
fn files_and_directories() {
    let e = Model::load(std::path::Path::new("/nonexistent/model"), LoadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Io(_)) && e.to_string().contains("/nonexistent/model/config.json"), "{e}");
    // a sharded checkpoint whose index names a missing shard
    let dir = tempdir("missing-shard");
    std::fs::write(dir.join("config.json"), CFG).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.norm.weight":"model-00001.safetensors"}}"#,
    )
    .unwrap();
    let e = Model::load(&dir, LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("model-00001.safetensors"), "{e}");
    // an index naming a tensor that is not in its shard
    let dir = tempdir("bad-index");
    std::fs::write(dir.join("config.json"), CFG).unwrap();
    std::fs::write(dir.join("model-00001.safetensors"), to_bytes(&random_checkpoint(&cfg(), 3, 0.1)).unwrap()).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.ghost.weight":"model-00001.safetensors"}}"#,
    )
    .unwrap();
    let e = Model::load(&dir, LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("model.ghost.weight"), "{e}");
    // no weights at all
    let dir = tempdir("no-weights");
    std::fs::write(dir.join("config.json"), CFG).unwrap();
    assert!(Model::load(&dir, LoadOptions::default()).unwrap_err().to_string().contains("no model.safetensors"));
}

#[test]
fn token_ids_out_of_range() {
    let m = Model::from_store(cfg(), store_of(&random_checkpoint(&cfg(), 3, 0.1)), LoadOptions::default()).unwrap();
    let e = m.forward(&[&[1, 2, 40]]).unwrap_err();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains("40"), "{e}");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
