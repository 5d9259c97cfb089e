//! [`generate`]: one prompt's continuation on the device, with the semantics of
//! `dsv3_core::infer::generate` for a single row: greedy (temperature 0 or top-k 1) and sampling
//! (temperature / top-k / top-p) pick tokens on the device and bring back only their ids; the
//! sampler's uniforms come from the same seeded `Sampler` the CPU path uses, so a seed gives the
//! CPU's tokens from the same logits (super::sample). Used by `dsv3 generate --device cuda` and
//! the C ABI.
use super::sample::next_row;
use super::{CudaModel, CudaSession};
use dsv3_core::infer::sampling::{Sampler, SamplingParams};
use dsv3_core::{Error, Result};
use std::time::Instant;

/// What [`generate`] made, and how long its two phases took.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Seconds of the prefill step (including the first token's choice).
    pub prefill_s: f64,
    /// Seconds of the decode steps after it.
    pub decode_s: f64,
}

/// Continues `prompt` (non-empty) for up to `params.max_new_tokens` tokens. `on_token` sees each
/// token as it is made; returning `false` stops after that token. A stop token ends generation
/// and is kept. Errors (bad ids, a prompt longer than the model's positions) come before any
/// token.
pub fn generate(
    cm: &CudaModel,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt needs at least one token".into()));
    }
    let mut sampler = Sampler::new(params.clone())?;
    let mut out = Generated::default();
    if params.max_new_tokens == 0 {
        return Ok(out);
    }
    let greedy = params.temperature == 0.0 || params.top_k == 1;
    let mut sess = CudaSession::new(cm, 1, prompt.len() + params.max_new_tokens)?;
    let mut next = |sess: &mut CudaSession, toks: &[u32]| -> Result<u32> {
        if greedy {
            Ok(sess.step_greedy(&[(0, toks)])?[0])
        } else {
            let row = next_row(&mut sampler);
            Ok(sess.step_sample(&[(0, toks)], &[row])?[0])
        }
    };
    let t0 = Instant::now();
    let mut t = next(&mut sess, prompt)?;
    out.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        out.tokens.push(t);
        let go_on = on_token(t);
        if !go_on || params.stop_tokens.contains(&t) || out.tokens.len() >= params.max_new_tokens {
            break;
        }
        t = next(&mut sess, &[t])?;
    }
    out.decode_s = t1.elapsed().as_secs_f64();
    Ok(out)
}
