//! Generation: batched prefill of every prompt, then batched decode steps, with a streaming
//! callback that can stop a sequence.
use crate::error::{ierr, Result};
use crate::infer::sampling::{Sampler, SamplingParams};
use crate::infer::session::Session;
use crate::model::Model;
use alloc::vec::Vec;

/// What the generation callback is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Every prompt has been prefilled (`tokens` prompt tokens in all).
    PrefillDone { tokens: usize },
    /// Sequence `seq` produced `token`. Return false from the callback to stop that sequence.
    Token { seq: usize, token: u32 },
}

/// Generated tokens per sequence (the prompt excluded), and whether each hit a stop token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOutput {
    pub tokens: Vec<Vec<u32>>,
    pub stopped: Vec<bool>,
}

/// Generates continuations of `prompts` (each non-empty). One sampler (and RNG stream) serves
/// all sequences in order, so results depend only on the seed and the inputs.
pub fn generate(
    model: &Model,
    prompts: &[&[u32]],
    params: &SamplingParams,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<GenerateOutput> {
    if prompts.is_empty() {
        return Err(ierr("no prompts given"));
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(ierr("every prompt needs at least one token"));
    }
    let mut sampler = Sampler::new(params.clone())?;
    let mut sess = Session::new(model, prompts.len());
    let n = prompts.len();
    let mut out = GenerateOutput { tokens: (0..n).map(|_| Vec::new()).collect(), stopped: alloc::vec![false; n] };
    if params.max_new_tokens == 0 {
        return Ok(out);
    }
    let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i, *p)).collect();
    let mut logits = sess.step(&inputs)?;
    let mut active: Vec<usize> = (0..n).collect();
    on_event(Event::PrefillDone { tokens: prompts.iter().map(|p| p.len()).sum() });
    let v = model.cfg.vocab_size;
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (row, &s) in active.iter().enumerate() {
            let t = sampler.sample(&logits[row * v..(row + 1) * v])?;
            out.tokens[s].push(t);
            let keep_going = on_event(Event::Token { seq: s, token: t });
            if params.stop_tokens.contains(&t) {
                out.stopped[s] = true;
            } else if keep_going && out.tokens[s].len() < params.max_new_tokens {
                still.push(s);
                next.push(t);
            }
        }
        if still.is_empty() {
            return Ok(out);
        }
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<(usize, &[u32])> = still.iter().zip(&toks).map(|(&s, t)| (s, &t[..])).collect();
        logits = sess.step(&inputs)?;
        active = still;
    }
}
