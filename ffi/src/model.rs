//! Models: loading with parameters and a progress callback, info, config.
use crate::status::*;
use dsv3_core::model::{AttnForm, Fp8Mode, LoadOptions, Model};
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded model (opaque). Immutable: share it freely across threads and sessions.
pub struct dsv3_model {
    pub(crate) inner: Arc<Model>,
    pub(crate) dir: PathBuf,
    /// The model's copy on a GPU when loaded with device >= 1 (sessions and generation run there;
    /// trainers always train `inner` on the CPU).
    pub(crate) cuda: Option<Arc<CudaShared>>,
}

/// A model on a GPU and the lock that serializes its GPU work: all of it goes through one CUDA
/// stream, and a decode step being captured into a CUDA graph must not see another thread's
/// launches, so calls on sessions of one GPU model from several threads take turns.
pub(crate) struct CudaShared {
    pub(crate) model: dsv3_kernels::model::CudaModel,
    pub(crate) lock: std::sync::Mutex<()>,
}

impl CudaShared {
    /// Runs `f` holding the model's GPU lock.
    pub(crate) fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

/// Called during loading with the fraction done in [0, 1]. Return 0 to continue, anything else
/// to cancel (the load then fails with DSV3_ERR_CANCELLED).
pub type dsv3_progress_fn = Option<extern "C" fn(user_data: *mut c_void, fraction: f32) -> i32>;

/// How to load a model. Initialize with dsv3_model_params_default().
#[repr(C)]
pub struct dsv3_model_params {
    /// sizeof(dsv3_model_params), set by dsv3_model_params_default().
    pub struct_size: usize,
    /// 0 = CPU. 1 + N = CUDA GPU N (1 = the first GPU): sessions and dsv3_generate run there;
    /// without a driver or GPU the load fails with DSV3_ERR_UNSUPPORTED. Trainers and GRPO made
    /// from such a model train on the CPU.
    pub device: i32,
    /// Compute dtype: 0 = f32 (the CPU's; on a GPU it matches the CPU to ~1e-4), 1 = bf16 (CUDA
    /// only: bf16 weights and activations, FP8 checkpoint weights kept FP8, f32 accumulation).
    pub dtype: i32,
    /// 0 = keep FP8 checkpoint weights as FP8 + block scales (~1 byte/parameter), 1 = dequantize to f32 at load.
    pub dequantize_fp8: i32,
    /// MLA formulation: 0 = absorbed (default), 1 = naive. Same results.
    pub attention: i32,
    /// Optional progress callback (may be NULL).
    pub progress: dsv3_progress_fn,
    /// Passed to `progress`.
    pub user_data: *mut c_void,
}

/// Fills `params` with the defaults (CPU, f32, FP8 kept, absorbed attention, no callback).
#[no_mangle]
pub unsafe extern "C" fn dsv3_model_params_default(params: *mut dsv3_model_params) -> dsv3_status {
    guard("dsv3_model_params_default", || {
        *nonnull_mut(params, "params")? = dsv3_model_params {
            struct_size: std::mem::size_of::<dsv3_model_params>(),
            device: 0,
            dtype: 0,
            dequantize_fp8: 0,
            attention: 0,
            progress: None,
            user_data: std::ptr::null_mut(),
        };
        Ok(())
    })
}

/// Loads the model in directory `path` (config.json + safetensors, HF layout; sharded or not;
/// f32/bf16/f16/FP8). `params` may be NULL for the defaults. On success `*out` owns a new
/// handle (free with dsv3_model_free); on failure `*out` is untouched.
#[no_mangle]
pub unsafe extern "C" fn dsv3_model_load(
    path: *const c_char,
    params: *const dsv3_model_params,
    out: *mut *mut dsv3_model,
) -> dsv3_status {
    guard("dsv3_model_load", || {
        let path = cstr(path, "path")?;
        let out = nonnull_mut(out, "out")?;
        let mut opts = LoadOptions::default();
        let mut progress: dsv3_progress_fn = None;
        let mut user = std::ptr::null_mut();
        let (mut gpu, mut bf16) = (None, false);
        if let Some(p) = unsafe { params.as_ref() } {
            check_size(p.struct_size, std::mem::size_of::<dsv3_model_params>(), "dsv3_model_params")?;
            gpu = match p.device {
                0 => None,
                d if d >= 1 => Some((d - 1) as usize),
                d => return Err(invalid(format!("device must be 0 (CPU) or 1 + N (CUDA GPU N), got {d}"))),
            };
            bf16 = match (p.dtype, gpu) {
                (0, _) => false,
                (1, Some(_)) => true,
                (1, None) => {
                    return Err(Fail(DSV3_ERR_UNSUPPORTED, "dtype 1 (bf16) runs on a GPU only (device >= 1)".into()))
                }
                (d, _) => return Err(invalid(format!("dtype must be 0 (f32) or 1 (bf16), got {d}"))),
            };
            opts.fp8 = match p.dequantize_fp8 {
                0 => Fp8Mode::Keep,
                1 => Fp8Mode::Dequantize,
                v => return Err(invalid(format!("dequantize_fp8 must be 0 or 1, got {v}"))),
            };
            opts.attn = match p.attention {
                0 => AttnForm::Absorbed,
                1 => AttnForm::Naive,
                v => return Err(invalid(format!("attention must be 0 (absorbed) or 1 (naive), got {v}"))),
            };
            progress = p.progress;
            user = p.user_data;
        }
        // open the GPU first: no driver or GPU is a clear error before any weight is read
        let dev = match gpu {
            Some(i) => Some(Arc::new(dsv3_kernels::Device::new(i)?)),
            None => None,
        };
        let dir = Path::new(path);
        let cfg = dsv3_core::weights::file::read_config(dir)?;
        let store = dsv3_core::weights::file::open_store(dir)?;
        let mut cb = |done: usize, total: usize| match progress {
            Some(f) => f(user, done as f32 / total.max(1) as f32) == 0,
            None => true,
        };
        let model = Model::from_store_with_progress(cfg, store, opts, &mut cb)?;
        let cuda = match dev {
            Some(dev) => {
                let dtype = if bf16 { dsv3_kernels::DType::Bf16 } else { dsv3_kernels::DType::F32 };
                let o = dsv3_kernels::model::CudaOptions { dtype, keep_fp8: bf16 };
                let model = dsv3_kernels::model::CudaModel::new(dev, &model, o)?;
                Some(Arc::new(CudaShared { model, lock: std::sync::Mutex::new(()) }))
            }
            None => None,
        };
        *out = Box::into_raw(Box::new(dsv3_model { inner: Arc::new(model), dir: dir.to_path_buf(), cuda }));
        Ok(())
    })
}

/// Frees a model. NULL is a no-op. Sessions and trainers made from it stay valid (they hold
/// their own reference).
#[no_mangle]
pub unsafe extern "C" fn dsv3_model_free(model: *mut dsv3_model) {
    free_handle(model)
}

/// What dsv3_model_get_info() reports.
#[repr(C)]
#[derive(Default)]
pub struct dsv3_model_info {
    /// Set to sizeof(dsv3_model_info) before calling.
    pub struct_size: usize,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub num_layers: u64,
    pub num_attention_heads: u64,
    /// Routed experts per MoE layer (0 for a dense model).
    pub num_experts: u64,
    pub experts_per_token: u64,
    /// MTP modules loaded.
    pub num_mtp_modules: u64,
    pub params_total: u64,
    /// Parameters used per token.
    pub params_active: u64,
    /// Latent KV cache per token over all layers, f32 bytes (absorbed MLA: kv_lora_rank + qk_rope_head_dim values per layer).
    pub kv_cache_bytes_per_token: u64,
    /// BOS / first EOS token id, or -1.
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

/// Fills `*info` (whose struct_size the caller sets) with the model's figures.
#[no_mangle]
pub unsafe extern "C" fn dsv3_model_get_info(model: *const dsv3_model, info: *mut dsv3_model_info) -> dsv3_status {
    guard("dsv3_model_get_info", || {
        let m = &nonnull(model, "model")?.inner;
        let info = nonnull_mut(info, "info")?;
        check_size(info.struct_size, std::mem::size_of::<dsv3_model_info>(), "dsv3_model_info")?;
        let c = &m.cfg;
        *info = dsv3_model_info {
            struct_size: info.struct_size,
            vocab_size: c.vocab_size as u64,
            hidden_size: c.hidden_size as u64,
            num_layers: c.num_hidden_layers as u64,
            num_attention_heads: c.num_attention_heads as u64,
            num_experts: c.n_routed_experts as u64,
            experts_per_token: c.num_experts_per_tok as u64,
            num_mtp_modules: m.mtp.len() as u64,
            params_total: m.params() as u64,
            params_active: m.active_params() as u64,
            kv_cache_bytes_per_token: (c.latent_cache_width() * c.num_hidden_layers * 4) as u64,
            bos_token_id: c.bos_token_id.map_or(-1, |b| b as i64),
            eos_token_id: c.eos_token_ids.first().map_or(-1, |&e| e as i64),
        };
        Ok(())
    })
}

/// Writes the model's config as JSON (NUL-terminated) into `buf` (`cap` bytes); `*needed` (may be
/// NULL) gets the size including the NUL.
#[no_mangle]
pub unsafe extern "C" fn dsv3_model_config_json(
    model: *const dsv3_model,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> dsv3_status {
    guard("dsv3_model_config_json", || {
        let m = &nonnull(model, "model")?.inner;
        fill_str(&m.cfg.to_json().to_string(), buf, cap, needed, "config JSON")
    })
}
