//! [`CudaModel`]: a loaded [`dsv3_core::Model`] on one GPU, and [`CudaSession`]: sequences with a
//! device latent cache, fed prefill and batched decode steps.
//!
//! Precision: [`DType::Bf16`] (weights bf16 or FP8 E4M3 + 128x128 scales, activations bf16,
//! every GEMM, norm and softmax accumulating in f32; router in f32; logits f32) or [`DType::F32`]
//! (everything f32: the mode that matches the CPU oracle to ~1e-4). Attention is the absorbed
//! form over the `[C + dr]` latent cache in both modes, except bf16 prefill: slots with several
//! new tokens run the MHA form (the cached latents decompressed by `kv_b_proj`, then the flash
//! kernel `ops::attn`; [`session::Flash`], `DSV3_FLASH=0` turns it off).
pub mod generate;
pub mod sample;
pub mod session;
pub mod weights;

use crate::device::Device;
use crate::tensor::{upload, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::config::LORA_NORM_EPS;
use dsv3_core::{Config, Error, Model, Result};
pub use generate::{generate, Generated};
pub use session::CudaSession;
use std::sync::Arc;
use weights::{DBlock, DLinear, Storage};

/// How a model is put on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Activation (and weight) dtype.
    pub dtype: DType,
    /// Keep FP8 checkpoint weights as FP8 (bf16 mode only; about 1 byte per parameter).
    pub keep_fp8: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { dtype: DType::Bf16, keep_fp8: true }
    }
}

/// The model on the device.
pub struct CudaModel {
    pub dev: Arc<Device>,
    pub cfg: Config,
    pub dtype: DType,
    /// `[V, D]`.
    pub embed: Act,
    pub layers: Vec<DBlock>,
    pub norm: CudaSlice<f32>,
    pub lm_head: DLinear,
    /// `[dr/2]` RoPE inverse frequencies and the YaRN attention factor (core's `Rope`).
    pub inv_freq: CudaSlice<f32>,
    pub attention_factor: f32,
    /// The attention softmax scale.
    pub scale: f32,
    pub eps: f32,
    pub lora_eps: f32,
    /// The arrival counters of the decode steps' fused MoE combine
    /// ([`crate::ops::moe::down_combine`]): every launch runs on the device's one stream and
    /// leaves them zero, so the model's MoE layers share them.
    pub moe_counters: CudaSlice<i32>,
}

impl CudaModel {
    /// Uploads `model` (the main model; MTP modules stay on the CPU).
    pub fn new(dev: Arc<Device>, model: &Model, opts: CudaOptions) -> Result<CudaModel> {
        let cfg = model.cfg.clone();
        let (h, c, dn, dv, dr) =
            (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim);
        if c > crate::ops::mla::MLA_CMAX || dr > crate::ops::mla::MLA_RMAX || dr % 2 != 0 {
            return Err(Error::Unsupported(format!(
                "the CUDA attention kernel takes kv_lora_rank <= {} and an even qk_rope_head_dim <= {} (got {c}, {dr})",
                crate::ops::mla::MLA_CMAX,
                crate::ops::mla::MLA_RMAX
            )));
        }
        let st = Storage { dtype: opts.dtype, keep_fp8: opts.keep_fp8 };
        let layers =
            model.layers.iter().map(|b| weights::block(&dev, b, (h, c, dn, dv), dr, st)).collect::<Result<Vec<_>>>()?;
        Ok(CudaModel {
            embed: weights::embedding(&dev, &model.embed, opts.dtype)?,
            layers,
            norm: upload(&dev, &model.norm)?,
            lm_head: weights::linear(&dev, &model.lm_head, st)?,
            inv_freq: upload(&dev, &model.rope.inv_freq)?,
            attention_factor: model.rope.attention_factor,
            scale: dsv3_core::ops::rope::softmax_scale(&cfg),
            eps: cfg.rms_norm_eps,
            lora_eps: LORA_NORM_EPS,
            moe_counters: crate::ops::moe::combine_counters(&dev, cfg.hidden_size)?,
            dtype: opts.dtype,
            cfg,
            dev,
        })
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &DLinear| l.w.bytes() + l.bias.as_ref().map_or(0, |b| b.len() * 4);
        let mlp = |m: &weights::DMlp| m.gate_up.bytes() + m.down.bytes();
        let mut b = self.embed.len() * self.dtype.size() + lin(&self.lm_head) + self.norm.len() * 4;
        for l in &self.layers {
            let a = &l.attn;
            b += match &a.q {
                weights::DQ::Lora { a, norm, b, .. } => lin(a) + lin(b) + norm.len() * 4,
                weights::DQ::Plain(q) => lin(q),
            };
            b += a.kv_a.as_ref().map_or(0, lin) + lin(&a.o) + a.w_uk.bytes() + a.w_uv.bytes() + a.kv_norm.len() * 4;
            b += a.kv_b.as_ref().map_or(0, lin);
            b += a.absorbed.as_ref().map_or(0, |f| lin(&f.q) + lin(&f.o));
            b += match &l.ffn {
                weights::DFfn::Dense(m) => mlp(m),
                weights::DFfn::Moe { router, experts, shared, .. } => {
                    router.bytes() + mlp(experts) + shared.as_ref().map_or(0, mlp)
                }
            };
        }
        b
    }

    /// The full uncached forward of whole sequences: logits `[Σ T_i, V]` (as `Model::forward`).
    pub fn forward(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let max_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut sess = CudaSession::new(self, seqs.len(), max_len.max(1))?;
        let inputs: Vec<(usize, &[u32])> = seqs.iter().enumerate().map(|(i, s)| (i, *s)).collect();
        sess.step_all(&inputs)
    }
}
