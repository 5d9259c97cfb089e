//! Model configuration: HF `config.json` for `deepseek_v3` and `deepseek_v2`.
//!
//! Both `rope_scaling` (hub checkpoints) and `rope_parameters` (what transformers 5 writes) are
//! accepted. A missing or inconsistent field is an error that names the field and the file.
use crate::error::{Error, Result};
use alloc::format;
use alloc::string::{String, ToString};
use serde_json::{Map, Value};

/// Which architecture family the config describes (HF `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `deepseek_v3`: sigmoid scores, correction bias, group-limited top-k, interleaved RoPE.
    V3,
    /// `deepseek_v2`: softmax scores, greedy or group-limited greedy top-k, complex RoPE.
    V2,
}

/// How router scores are computed from the gate logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// How the top-k experts are selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: `sigmoid + bias`, groups scored by the sum of their two best, −inf masking.
    NoauxTc,
    /// V2: plain top-k over all experts.
    Greedy,
    /// V2: groups scored by their best expert, dropped groups masked with 0.
    GroupLimitedGreedy,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE with `inv_freq[i] = θ^(-2i/d)`.
    None,
    /// YaRN (see `ops::rope`).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
}

/// FP8 block quantization of the checkpoint (`quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Config {
    /// Block size `[rows, cols]` of `weight_scale_inv` (DeepSeek: 128x128).
    pub block: [usize; 2],
    /// Activation scales are powers of two (`scale_fmt: ue8m0`, V3.1).
    pub ue8m0: bool,
}

/// A DeepSeek-V3/V2 model configuration. Field names follow HF's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: usize,
    /// D: the residual width.
    pub hidden_size: usize,
    /// L: decoder layers of the main model (the MTP layers come after, at index L..).
    pub num_hidden_layers: usize,
    /// H: attention heads.
    pub num_attention_heads: usize,
    /// Rq: query LoRA rank; `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// C: the KV latent width (what the cache stores, with the rope key).
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// SwiGLU width of the dense layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    /// Layers `< first_k_dense_replace` use a dense MLP, the rest MoE.
    pub first_k_dense_replace: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    /// Eps of the layer, final and MTP norms (q_a/kv_a norms always use 1e-6).
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Bias on q_a_proj / q_proj, kv_a_proj_with_mqa and o_proj.
    pub attention_bias: bool,
    /// MTP modules stored at layer indices `num_hidden_layers..`.
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: alloc::vec::Vec<u32>,
    pub quantization: Option<Fp8Config>,
}

/// The eps of the `q_a_layernorm` / `kv_a_layernorm` (HF builds them with the default).
pub const LORA_NORM_EPS: f32 = 1e-6;

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl core::fmt::Display) -> Error {
        Error::Config { file: self.file.to_string(), msg: format!("field '{field}': {msg}") }
    }
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?.ok_or_else(|| self.err(k, "missing"))
    }
    fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.usize_opt(k)?.unwrap_or(d))
    }
    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(k, format!("expected a number, got {v}"))),
        }
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.f64_opt(k)?.unwrap_or(d))
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v.as_bool().ok_or_else(|| self.err(k, format!("expected true/false, got {v}"))),
        }
    }
    fn str_opt(&self, k: &str) -> Result<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(k, format!("expected a string, got {v}"))),
        }
    }
}

impl Config {
    /// Parses `config.json` text. `file` names the file in error messages.
    pub fn from_json_str(text: &str, file: &str) -> Result<Config> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config { file: file.to_string(), msg: format!("not valid JSON: {e}") })?;
        let obj = v.as_object().ok_or_else(|| Error::Config {
            file: file.to_string(),
            msg: "top level must be a JSON object".to_string(),
        })?;
        Self::from_json(obj, file)
    }

    /// Parses an already-decoded `config.json` object.
    pub fn from_json(obj: &Map<String, Value>, file: &str) -> Result<Config> {
        let f = Fields { obj, file };
        let model_type = match f.str_opt("model_type")? {
            Some("deepseek_v3") => ModelType::V3,
            Some("deepseek_v2") => ModelType::V2,
            Some(other) => {
                return Err(f.err("model_type", format!("'{other}' is not supported (deepseek_v3, deepseek_v2)")))
            }
            None => return Err(f.err("model_type", "missing")),
        };
        let v3 = model_type == ModelType::V3;
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(f.err("hidden_act", format!("'{act}' is not supported (silu)")));
            }
        }
        if f.bool_or("mlp_bias", false)? {
            return Err(f.err("mlp_bias", "MLP biases are not supported"));
        }
        let hidden_size = f.usize_req("hidden_size")?;
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let n_routed_experts = f.usize_or("n_routed_experts", 0)?;
        let first_k_dense_replace = f.usize_or("first_k_dense_replace", 0)?;
        let has_moe = n_routed_experts > 0 && first_k_dense_replace < num_hidden_layers;
        // V3 always uses sigmoid + noaux_tc (HF hard-codes it); V2 reads its fields.
        let scoring_func = if v3 {
            ScoringFunc::Sigmoid
        } else {
            match f.str_opt("scoring_func")?.unwrap_or("softmax") {
                "softmax" => ScoringFunc::Softmax,
                "sigmoid" => ScoringFunc::Sigmoid,
                o => return Err(f.err("scoring_func", format!("'{o}' is not supported (softmax, sigmoid)"))),
            }
        };
        let topk_method = if v3 {
            TopkMethod::NoauxTc
        } else {
            match f.str_opt("topk_method")?.unwrap_or("greedy") {
                "greedy" => TopkMethod::Greedy,
                "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                o => return Err(f.err("topk_method", format!("'{o}' is not supported (greedy, group_limited_greedy)"))),
            }
        };
        let rope_theta_top = f.f64_opt("rope_theta")?;
        let (rope_scaling, rope_theta) = parse_rope(&f, rope_theta_top)?;
        let quantization = parse_quant(&f)?;
        let eos_token_ids = match f.get("eos_token_id") {
            None => alloc::vec::Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| f.err("eos_token_id", "expected integers")))
                .collect::<Result<_>>()?,
            Some(v) => alloc::vec![v.as_u64().ok_or_else(|| f.err("eos_token_id", "expected an integer"))? as u32],
        };
        let cfg = Config {
            model_type,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            q_lora_rank: f.usize_opt("q_lora_rank")?,
            kv_lora_rank: f.usize_req("kv_lora_rank")?,
            qk_nope_head_dim: f.usize_req("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize_req("qk_rope_head_dim")?,
            v_head_dim: f.usize_req("v_head_dim")?,
            intermediate_size: f.usize_req("intermediate_size")?,
            moe_intermediate_size: if has_moe {
                f.usize_req("moe_intermediate_size")?
            } else {
                f.usize_or("moe_intermediate_size", 0)?
            },
            n_routed_experts,
            n_shared_experts: f.usize_or("n_shared_experts", 0)?,
            num_experts_per_tok: if has_moe {
                f.usize_req("num_experts_per_tok")?
            } else {
                f.usize_or("num_experts_per_tok", 0)?
            },
            first_k_dense_replace,
            n_group: f.usize_or("n_group", 1)?.max(1),
            topk_group: f.usize_or("topk_group", 1)?.max(1),
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.0)? as f32,
            scoring_func,
            topk_method,
            norm_topk_prob: f.bool_or("norm_topk_prob", v3)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            num_nextn_predict_layers: match f.usize_opt("num_nextn_predict_layers")? {
                Some(n) => n,
                None => f.usize_or("num_mtp_layers", 0)?,
            },
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.usize_opt("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            quantization,
        };
        if let Some(kv) = f.usize_opt("num_key_value_heads")? {
            if kv != num_attention_heads {
                return Err(f.err(
                    "num_key_value_heads",
                    format!("MLA needs num_key_value_heads == num_attention_heads ({num_attention_heads}), got {kv}"),
                ));
            }
        }
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks that the fields are consistent with each other.
    pub fn validate(&self, file: &str) -> Result<()> {
        let err =
            |field: &str, msg: String| Error::Config { file: file.to_string(), msg: format!("field '{field}': {msg}") };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(err(name, "must be positive".into()));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(err("q_lora_rank", "must be positive or null".into()));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(err("qk_rope_head_dim", format!("must be even, got {}", self.qk_rope_head_dim)));
        }
        if self.first_k_dense_replace > 0 && self.intermediate_size == 0 {
            return Err(err("intermediate_size", "must be positive when there are dense layers".into()));
        }
        if self.has_moe() {
            let (e, g, k) = (self.n_routed_experts, self.n_group, self.num_experts_per_tok);
            if self.moe_intermediate_size == 0 {
                return Err(err("moe_intermediate_size", "must be positive".into()));
            }
            if k == 0 || k > e {
                return Err(err("num_experts_per_tok", format!("must be in 1..={e} (n_routed_experts), got {k}")));
            }
            if e % g != 0 {
                return Err(err("n_group", format!("n_routed_experts ({e}) must be divisible by n_group ({g})")));
            }
            if self.topk_group > g {
                return Err(err("topk_group", format!("must be <= n_group ({g}), got {}", self.topk_group)));
            }
            if self.topk_method == TopkMethod::NoauxTc && e / g < 2 {
                return Err(err("n_group", format!("each group needs >= 2 experts for noaux_tc, got {}", e / g)));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(err("rms_norm_eps", "must be a finite non-negative number".into()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(err("rope_theta", format!("must be > 1, got {}", self.rope_theta)));
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(err("routed_scaling_factor", "must be finite".into()));
        }
        if let RopeScaling::Yarn { factor, original_max_position_embeddings, .. } = self.rope_scaling {
            if !(factor.is_finite() && factor > 0.0) {
                return Err(err("rope_scaling.factor", format!("must be positive, got {factor}")));
            }
            if original_max_position_embeddings <= 0.0 {
                return Err(err("rope_scaling.original_max_position_embeddings", "must be positive".into()));
            }
        }
        Ok(())
    }

    /// qk head dim: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// Whether any layer of the main model is MoE.
    pub fn has_moe(&self) -> bool {
        self.n_routed_experts > 0 && self.first_k_dense_replace < self.num_hidden_layers
    }
    /// Whether layer `idx` (main or MTP) uses MoE (HF ignores `moe_layer_freq`).
    pub fn is_moe_layer(&self, idx: usize) -> bool {
        self.n_routed_experts > 0 && idx >= self.first_k_dense_replace
    }
    /// Values cached per token per layer in the absorbed form: `kv_lora_rank + qk_rope_head_dim`.
    pub fn latent_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
    /// Values per token per layer a naive (expanded K and V) cache would hold: `H·(dq+dv)`.
    pub fn naive_cache_width(&self) -> usize {
        self.num_attention_heads * (self.qk_head_dim() + self.v_head_dim)
    }

    /// Serializes back to a `config.json` object in HF transformers 5 style.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mt = match self.model_type {
            ModelType::V3 => "deepseek_v3",
            ModelType::V2 => "deepseek_v2",
        };
        let arch = match self.model_type {
            ModelType::V3 => "DeepseekV3ForCausalLM",
            ModelType::V2 => "DeepseekV2ForCausalLM",
        };
        m.insert("architectures".into(), Value::Array(alloc::vec![arch.into()]));
        m.insert("model_type".into(), mt.into());
        let us = |x: usize| Value::from(x as u64);
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("n_routed_experts", self.n_routed_experts),
            ("n_shared_experts", self.n_shared_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("first_k_dense_replace", self.first_k_dense_replace),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_nextn_predict_layers", self.num_nextn_predict_layers),
        ] {
            m.insert(k.into(), us(v));
        }
        m.insert("q_lora_rank".into(), self.q_lora_rank.map(us).unwrap_or(Value::Null));
        m.insert("routed_scaling_factor".into(), Value::from(self.routed_scaling_factor as f64));
        m.insert("norm_topk_prob".into(), self.norm_topk_prob.into());
        m.insert("rms_norm_eps".into(), Value::from(self.rms_norm_eps as f64));
        m.insert("attention_bias".into(), self.attention_bias.into());
        m.insert("tie_word_embeddings".into(), self.tie_word_embeddings.into());
        m.insert("hidden_act".into(), "silu".into());
        m.insert("attention_dropout".into(), Value::from(0.0));
        m.insert("rope_interleave".into(), true.into());
        if self.model_type == ModelType::V2 {
            let sf = match self.scoring_func {
                ScoringFunc::Softmax => "softmax",
                ScoringFunc::Sigmoid => "sigmoid",
            };
            let tm = match self.topk_method {
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
                TopkMethod::NoauxTc => "noaux_tc",
            };
            m.insert("scoring_func".into(), sf.into());
            m.insert("topk_method".into(), tm.into());
        }
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), Value::from(b as u64));
        }
        match self.eos_token_ids.len() {
            0 => {}
            1 => {
                m.insert("eos_token_id".into(), Value::from(self.eos_token_ids[0] as u64));
            }
            _ => {
                let a = self.eos_token_ids.iter().map(|&x| Value::from(x as u64)).collect();
                m.insert("eos_token_id".into(), Value::Array(a));
            }
        }
        let mut rp = Map::new();
        rp.insert("rope_theta".into(), Value::from(self.rope_theta));
        match self.rope_scaling {
            RopeScaling::None => {
                rp.insert("rope_type".into(), "default".into());
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
            } => {
                rp.insert("rope_type".into(), "yarn".into());
                rp.insert("factor".into(), Value::from(factor));
                rp.insert("original_max_position_embeddings".into(), Value::from(original_max_position_embeddings));
                rp.insert("beta_fast".into(), Value::from(beta_fast));
                rp.insert("beta_slow".into(), Value::from(beta_slow));
                rp.insert("mscale".into(), Value::from(mscale));
                rp.insert("mscale_all_dim".into(), Value::from(mscale_all_dim));
            }
        }
        m.insert("rope_theta".into(), Value::from(self.rope_theta));
        m.insert("rope_parameters".into(), Value::Object(rp));
        if let Some(q) = self.quantization {
            let mut qm = Map::new();
            qm.insert("activation_scheme".into(), "dynamic".into());
            qm.insert("fmt".into(), "e4m3".into());
            qm.insert("quant_method".into(), "fp8".into());
            qm.insert("weight_block_size".into(), Value::Array(alloc::vec![us(q.block[0]), us(q.block[1])]));
            if q.ue8m0 {
                qm.insert("scale_fmt".into(), "ue8m0".into());
            }
            m.insert("quantization_config".into(), Value::Object(qm));
        }
        m.insert("torch_dtype".into(), "float32".into());
        Value::Object(m)
    }
}

fn parse_rope(f: &Fields<'_>, theta_top: Option<f64>) -> Result<(RopeScaling, f64)> {
    // transformers 5 writes `rope_parameters` (with rope_theta inside); hub checkpoints `rope_scaling`.
    let (key, obj) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(v), _) => ("rope_parameters", v),
        (None, Some(v)) => ("rope_scaling", v),
        (None, None) => return Ok((RopeScaling::None, theta_top.unwrap_or(10000.0))),
    };
    let o = obj.as_object().ok_or_else(|| f.err(key, "expected an object"))?;
    let sub = Fields { obj: o, file: f.file };
    let pre = |k: &str| format!("{key}.{k}");
    let theta = match sub.f64_opt("rope_theta").map_err(|_| f.err(&pre("rope_theta"), "expected a number"))? {
        Some(t) => t,
        None => theta_top.unwrap_or(10000.0),
    };
    let ty = match (sub.str_opt("rope_type"), sub.str_opt("type")) {
        (Ok(Some(t)), _) | (_, Ok(Some(t))) => t,
        _ => "default",
    };
    let num = |k: &str| sub.f64_opt(k).map_err(|_| f.err(&pre(k), "expected a number"));
    match ty {
        "default" => Ok((RopeScaling::None, theta)),
        "yarn" => {
            let orig = num("original_max_position_embeddings")?
                .ok_or_else(|| f.err(&pre("original_max_position_embeddings"), "missing (needed by yarn)"))?;
            let factor = match num("factor")? {
                Some(s) => s,
                None => f.usize_req("max_position_embeddings")? as f64 / orig,
            };
            // HF: beta_fast / beta_slow default to 32 / 1, also when 0 or null.
            let nz = |x: Option<f64>, d: f64| match x {
                Some(v) if v != 0.0 => v,
                _ => d,
            };
            Ok((
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: nz(num("beta_fast")?, 32.0),
                    beta_slow: nz(num("beta_slow")?, 1.0),
                    mscale: num("mscale")?.unwrap_or(0.0),
                    mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
                },
                theta,
            ))
        }
        other => Err(f.err(&pre("rope_type"), format!("'{other}' is not supported (default, yarn)"))),
    }
}

fn parse_quant(f: &Fields<'_>) -> Result<Option<Fp8Config>> {
    let Some(q) = f.get("quantization_config") else {
        return Ok(None);
    };
    let o = q.as_object().ok_or_else(|| f.err("quantization_config", "expected an object"))?;
    let sub = Fields { obj: o, file: f.file };
    match sub.str_opt("quant_method")? {
        Some("fp8") => {}
        other => return Err(f.err("quantization_config.quant_method", format!("{other:?} is not supported (fp8)"))),
    }
    if let Some(fmt) = sub.str_opt("fmt")? {
        if fmt != "e4m3" {
            return Err(f.err("quantization_config.fmt", format!("'{fmt}' is not supported (e4m3)")));
        }
    }
    let block = match sub.get("weight_block_size") {
        None => [128, 128],
        Some(Value::Array(a)) if a.len() == 2 => {
            let g = |i: usize| {
                a[i].as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(|| f.err("quantization_config.weight_block_size", "expected two positive integers"))
            };
            [g(0)?, g(1)?]
        }
        Some(_) => return Err(f.err("quantization_config.weight_block_size", "expected [rows, cols]")),
    };
    let ue8m0 = sub.str_opt("scale_fmt")? == Some("ue8m0");
    Ok(Some(Fp8Config { block, ue8m0 }))
}
