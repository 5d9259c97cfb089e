//! Inference: sessions (prefill and decode on token ids, with a latent KV cache per slot) and
//! generation with sampling and a per-token callback.
use crate::model::{dsv3_model, CudaShared};
use crate::status::*;
use dsv3_core::infer::{generate, Event, SamplingParams, Session};
use dsv3_core::model::Model;
use dsv3_kernels::model::{CudaModel, CudaSession};
use std::ffi::c_void;
use std::sync::Arc;

/// An inference session over a fixed number of sequence slots (opaque). One thread at a time.
pub struct dsv3_session {
    inner: Kind,
}

enum Kind {
    Cpu(Session<Arc<Model>>),
    /// On the model's GPU. `sess` borrows `shared.model`, which `shared` keeps alive: the session
    /// is dropped first (under the GPU lock: freeing device memory is stream work too).
    Cuda {
        sess: Option<CudaSession<'static>>,
        slots: usize,
        shared: Arc<CudaShared>,
    },
}

impl Drop for dsv3_session {
    fn drop(&mut self) {
        if let Kind::Cuda { sess, shared, .. } = &mut self.inner {
            let _g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            drop(sess.take());
        }
    }
}

impl Kind {
    fn slots(&self) -> usize {
        match self {
            Kind::Cpu(s) => s.slots(),
            Kind::Cuda { slots, .. } => *slots,
        }
    }

    fn vocab(&self) -> usize {
        match self {
            Kind::Cpu(s) => s.model().cfg.vocab_size,
            Kind::Cuda { shared, .. } => shared.model.cfg.vocab_size,
        }
    }

    /// Runs `f` on the GPU session holding the model's GPU lock.
    fn cuda<T>(&mut self, f: impl FnOnce(&mut CudaSession<'static>) -> dsv3_core::Result<T>) -> Result<T, Fail> {
        match self {
            Kind::Cuda { sess: Some(s), shared, .. } => Ok(shared.with(|| f(s))?),
            _ => Err(Fail(DSV3_ERR_INTERNAL, "not a GPU session".into())),
        }
    }
}

/// The cache length a GPU session gets from dsv3_session_new: the model's positions, at most this.
pub const DSV3_DEFAULT_GPU_MAX_LEN: usize = 4096;

fn tokens(ids: &[i32], vocab: usize) -> Result<Vec<u32>, Fail> {
    ids.iter()
        .map(|&t| {
            if t < 0 || t as usize >= vocab {
                Err(invalid(format!("token id {t} is outside [0, {vocab})")))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

/// The most sequence slots a session may have.
pub const DSV3_MAX_SLOTS: usize = 1 << 16;

/// Creates a session with `slots` (1..=DSV3_MAX_SLOTS) empty sequences on `model` (which may be
/// freed afterwards). On a GPU model (loaded with device >= 1) the session lives on the GPU with a
/// latent cache of min(max_position_embeddings, DSV3_DEFAULT_GPU_MAX_LEN) tokens per slot
/// (allocated now; dsv3_session_new_ex sets another length); a step past it fails with
/// DSV3_ERR_INVALID_ARGUMENT and changes nothing.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_new(
    model: *const dsv3_model,
    slots: usize,
    out: *mut *mut dsv3_session,
) -> dsv3_status {
    guard("dsv3_session_new", || new_session(model, slots, 0, out))
}

/// dsv3_session_new with the per-slot cache length of a GPU session: `max_len` tokens (prompt and
/// generated together; 0 = the default). CPU sessions grow as needed: there `max_len` is only
/// checked against the model's positions (0 = no limit).
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_new_ex(
    model: *const dsv3_model,
    slots: usize,
    max_len: usize,
    out: *mut *mut dsv3_session,
) -> dsv3_status {
    guard("dsv3_session_new_ex", || new_session(model, slots, max_len, out))
}

fn new_session(
    model: *const dsv3_model,
    slots: usize,
    max_len: usize,
    out: *mut *mut dsv3_session,
) -> Result<(), Fail> {
    let m = nonnull(model, "model")?;
    let out = nonnull_mut(out, "out")?;
    if slots == 0 || slots > DSV3_MAX_SLOTS {
        return Err(invalid(format!("slots must be in 1..={DSV3_MAX_SLOTS}, got {slots}")));
    }
    let positions = m.inner.cfg.max_position_embeddings;
    if max_len > positions {
        return Err(invalid(format!("max_len {max_len} exceeds the model's {positions} positions")));
    }
    let inner = match &m.cuda {
        None => Kind::Cpu(Session::new(m.inner.clone(), slots)),
        Some(shared) => {
            let len = if max_len == 0 { positions.min(DSV3_DEFAULT_GPU_MAX_LEN) } else { max_len };
            // SAFETY: `shared` (an Arc kept in the same variant) owns the model for as long as the
            // session exists: Drop frees the session first.
            let model: &'static CudaModel = unsafe { &*(&shared.model as *const CudaModel) };
            let sess = shared.with(|| CudaSession::new(model, slots, len))?;
            Kind::Cuda { sess: Some(sess), slots, shared: shared.clone() }
        }
    };
    *out = Box::into_raw(Box::new(dsv3_session { inner }));
    Ok(())
}

/// Frees a session. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_free(session: *mut dsv3_session) {
    free_handle(session)
}

/// Appends `n` tokens to `slot` (prefill when n > 1, decode when n == 1) and, if `logits` is not
/// NULL, writes the logits of the last token (vocab_size floats; `cap` must hold them; `*needed`
/// may be NULL). On failure the slot's cache is unchanged.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_step(
    session: *mut dsv3_session,
    slot: usize,
    ids: *const i32,
    n: usize,
    logits: *mut f32,
    cap: usize,
    needed: *mut usize,
) -> dsv3_status {
    guard("dsv3_session_step", || {
        let s = &mut nonnull_mut(session, "session")?.inner;
        let v = s.vocab();
        if !logits.is_null() && cap < v {
            if let Some(nd) = unsafe { needed.as_mut() } {
                *nd = v;
            }
            return Err(Fail(DSV3_ERR_BUFFER_TOO_SMALL, format!("logits need {v} floats, the buffer holds {cap}")));
        }
        let toks = tokens(slice(ids, n, "ids")?, v)?;
        let out = match s {
            Kind::Cpu(c) => c.step(&[(slot, &toks)])?,
            Kind::Cuda { .. } => s.cuda(|g| g.step(&[(slot, &toks)]))?,
        };
        if !logits.is_null() {
            fill(&out, logits, cap, needed, "logits")?;
        } else if let Some(nd) = unsafe { needed.as_mut() } {
            *nd = v;
        }
        Ok(())
    })
}

/// Tokens cached in `slot`.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_length(
    session: *const dsv3_session,
    slot: usize,
    out: *mut usize,
) -> dsv3_status {
    guard("dsv3_session_length", || {
        let s = &nonnull(session, "session")?.inner;
        if slot >= s.slots() {
            return Err(invalid(format!("slot {slot} out of range (session has {})", s.slots())));
        }
        *nonnull_mut(out, "out")? = match s {
            Kind::Cpu(c) => c.len(slot),
            Kind::Cuda { sess, .. } => sess.as_ref().map_or(0, |g| g.len(slot)),
        };
        Ok(())
    })
}

/// Empties `slot`.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_reset(session: *mut dsv3_session, slot: usize) -> dsv3_status {
    guard("dsv3_session_reset", || match &mut nonnull_mut(session, "session")?.inner {
        Kind::Cpu(c) => Ok(c.reset(slot)?),
        k => k.cuda(|g| g.reset(slot)),
    })
}

/// Keeps the first `len` tokens of `slot`.
#[no_mangle]
pub unsafe extern "C" fn dsv3_session_truncate(session: *mut dsv3_session, slot: usize, len: usize) -> dsv3_status {
    guard("dsv3_session_truncate", || match &mut nonnull_mut(session, "session")?.inner {
        Kind::Cpu(c) => Ok(c.truncate(slot, len)?),
        k => k.cuda(|g| g.truncate(slot, len)),
    })
}

/// Sampling settings. Initialize with dsv3_sampling_params_default().
#[repr(C)]
pub struct dsv3_sampling_params {
    /// sizeof(dsv3_sampling_params).
    pub struct_size: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off; in (0, 1].
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: u32,
    /// Tokens that end generation (the stop token is included in the output). May be NULL when n_stop_tokens is 0.
    pub stop_tokens: *const i32,
    pub n_stop_tokens: usize,
}

/// Fills `params` with the defaults: greedy, 64 new tokens, no stop tokens.
#[no_mangle]
pub unsafe extern "C" fn dsv3_sampling_params_default(params: *mut dsv3_sampling_params) -> dsv3_status {
    guard("dsv3_sampling_params_default", || {
        *nonnull_mut(params, "params")? = dsv3_sampling_params {
            struct_size: std::mem::size_of::<dsv3_sampling_params>(),
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 64,
            stop_tokens: std::ptr::null(),
            n_stop_tokens: 0,
        };
        Ok(())
    })
}

/// Called with each generated token; return 0 to continue, anything else to stop.
pub type dsv3_token_fn = Option<extern "C" fn(user_data: *mut c_void, token: i32) -> i32>;

/// Generates a continuation of `prompt` (`n_prompt` > 0 ids) with `params` (NULL = defaults),
/// calling `callback` (may be NULL) with each token, and writes the generated ids to `out`
/// (`cap` must be at least max_new_tokens, checked before generating); `*n_out` gets their
/// number. Generation ends after max_new_tokens, after a stop token (included in `out`), or after
/// the token for which the callback returned nonzero (also included) — all with DSV3_OK.
#[no_mangle]
pub unsafe extern "C" fn dsv3_generate(
    model: *const dsv3_model,
    prompt: *const i32,
    n_prompt: usize,
    params: *const dsv3_sampling_params,
    callback: dsv3_token_fn,
    user_data: *mut c_void,
    out: *mut i32,
    cap: usize,
    n_out: *mut usize,
) -> dsv3_status {
    guard("dsv3_generate", || {
        let m = &nonnull(model, "model")?.inner;
        let n_out = nonnull_mut(n_out, "n_out")?;
        let prompt = tokens(slice(prompt, n_prompt, "prompt")?, m.cfg.vocab_size)?;
        let mut sp = SamplingParams::default();
        if let Some(p) = unsafe { params.as_ref() } {
            check_size(p.struct_size, std::mem::size_of::<dsv3_sampling_params>(), "dsv3_sampling_params")?;
            sp.temperature = p.temperature;
            sp.top_k = p.top_k as usize;
            sp.top_p = p.top_p;
            sp.seed = p.seed;
            sp.max_new_tokens = p.max_new_tokens as usize;
            sp.stop_tokens = tokens(slice(p.stop_tokens, p.n_stop_tokens, "stop_tokens")?, m.cfg.vocab_size)?;
        }
        if cap < sp.max_new_tokens {
            return Err(Fail(
                DSV3_ERR_BUFFER_TOO_SMALL,
                format!("out holds {cap} ids, max_new_tokens is {}", sp.max_new_tokens),
            ));
        }
        let dst = slice_mut(out, cap, "out")?;
        let toks = match &nonnull(model, "model")?.cuda {
            None => {
                let res = generate(m, &[&prompt], &sp, |e| match (e, callback) {
                    (Event::Token { token, .. }, Some(f)) => f(user_data, token as i32) == 0,
                    _ => true,
                })?;
                res.tokens.into_iter().next().unwrap_or_default()
            }
            Some(shared) => {
                let g = shared.with(|| {
                    dsv3_kernels::model::generate(&shared.model, &prompt, &sp, |t| match callback {
                        Some(f) => f(user_data, t as i32) == 0,
                        None => true,
                    })
                })?;
                g.tokens
            }
        };
        for (d, &t) in dst.iter_mut().zip(&toks) {
            *d = t as i32;
        }
        *n_out = toks.len();
        Ok(())
    })
}
