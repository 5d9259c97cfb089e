//! `dsv3 quantize`: DeepSeek's FP8 checkpoint format from an f32/bf16/f16 checkpoint.
//! Every 2-D linear weight inside the decoder layers (MTP block included; not the router gate,
//! embedding, lm_head, MTP's eh_proj or its embedding/head copies) becomes `float8_e4m3fn` with
//! `<name>_scale_inv` (f32 `[ceil(out/128), ceil(in/128)]`, `max(amax, 1e-4)/448` over zero-padded
//! blocks, round-to-nearest-even); other tensors are copied; config.json gains
//! `quantization_config`.
use dsv3_core::config::Fp8Config;
use dsv3_core::fp8::quant::{quantize, Role, ScaleLayout};
use dsv3_core::weights::file::{open_store, read_config, write_atomic};
use dsv3_core::weights::write::{to_bytes, OutTensor};
use dsv3_core::weights::DType;
use dsv3_core::{Error, Result};
use std::path::Path;

/// Whether a checkpoint tensor is quantized: a 2-D `.weight` of a decoder projection.
pub fn is_quantized(name: &str, shape: &[usize]) -> bool {
    const LINEARS: [&str; 9] = [
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    shape.len() == 2
        && name.starts_with("model.layers.")
        && name.ends_with(".weight")
        && LINEARS.iter().any(|l| name.ends_with(&format!(".{l}.weight")))
}

pub fn run(model: &Path, out: &Path) -> Result<()> {
    let mut cfg = read_config(model)?;
    if cfg.quantization.is_some() {
        return Err(Error::Input(format!(
            "{}: already FP8-quantized (config.json has quantization_config)",
            model.display()
        )));
    }
    let store = open_store(model)?;
    let names: Vec<String> = store.names().map(String::from).collect();
    let mut tensors = Vec::with_capacity(names.len());
    let (mut nq, mut bytes_in, mut bytes_out) = (0usize, 0usize, 0usize);
    for n in &names {
        let t = store.get(n).expect("listed");
        bytes_in += t.bytes().len();
        if is_quantized(n, &t.shape) {
            let (r, c) = (t.shape[0], t.shape[1]);
            let q = quantize(&t.to_f32()?, r, c, ScaleLayout::Block128, Role::Weight, false)
                .map_err(|e| Error::Weights { tensor: n.clone(), msg: format!("{e}") })?;
            tensors.push(OutTensor { name: n.clone(), dtype: DType::F8E4M3, shape: vec![r, c], data: q.codes });
            tensors.push(OutTensor::f32(&format!("{n}_scale_inv"), &[r.div_ceil(128), c.div_ceil(128)], &q.scales));
            nq += 1;
        } else {
            tensors.push(OutTensor {
                name: n.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.bytes().to_vec(),
            });
        }
    }
    bytes_out += tensors.iter().map(|t| t.data.len()).sum::<usize>();
    std::fs::create_dir_all(out).map_err(|e| Error::Io(format!("{}: {e}", out.display())))?;
    write_atomic(&out.join("model.safetensors"), &to_bytes(&tensors)?)?;
    cfg.quantization = Some(Fp8Config { block: [128, 128], ue8m0: false });
    let json = serde_json::to_string_pretty(&cfg.to_json()).map_err(|e| Error::Io(e.to_string()))?;
    write_atomic(&out.join("config.json"), json.as_bytes())?;
    for extra in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        if model.join(extra).exists() {
            std::fs::copy(model.join(extra), out.join(extra)).map_err(|e| Error::Io(format!("{extra}: {e}")))?;
        }
    }
    println!(
        "quantized {nq} weights to FP8 E4M3 (128x128 blocks): {bytes_in} -> {bytes_out} bytes; wrote {}",
        out.display()
    );
    Ok(())
}
