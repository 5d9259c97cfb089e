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
    on_event: impl FnMut(Event) -> bool,
) -> Result<GenerateOutput> {
    generate_grouped(model, prompts, 1, params, on_event)
}

/// Generates `group` continuations of each prompt: sequences `p·group .. (p+1)·group` continue
/// prompt `p`. Each prompt is prefilled once and its latent cache copied to the group's other
/// slots (GRPO's G samples per prompt share the prefill). Event sequence numbers count the
/// `prompts.len() · group` sequences.
pub fn generate_grouped(
    model: &Model,
    prompts: &[&[u32]],
    group: usize,
    params: &SamplingParams,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<GenerateOutput> {
    if prompts.is_empty() {
        return Err(ierr("no prompts given"));
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(ierr("every prompt needs at least one token"));
    }
    if group == 0 {
        return Err(ierr("group must be at least 1"));
    }
    let mut sampler = Sampler::new(params.clone())?;
    let n = prompts.len() * group;
    let mut sess = Session::new(model, n);
    let mut out = GenerateOutput { tokens: (0..n).map(|_| Vec::new()).collect(), stopped: alloc::vec![false; n] };
    if params.max_new_tokens == 0 {
        return Ok(out);
    }
    let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i * group, *p)).collect();
    let first = sess.step(&inputs)?;
    for p in 0..prompts.len() {
        for k in 1..group {
            sess.fork(p * group, p * group + k)?;
        }
    }
    on_event(Event::PrefillDone { tokens: prompts.iter().map(|p| p.len()).sum() });
    let v = model.cfg.vocab_size;
    let mut active: Vec<usize> = (0..n).collect();
    // the rows of `logits` for the active sequences: the prompt's row at first, then their own
    let mut logits = first;
    let mut row_of: Vec<usize> = (0..n).map(|s| s / group).collect();
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for &s in &active {
            let r = row_of[s];
            let t = sampler.sample(&logits[r * v..(r + 1) * v])?;
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
        for (row, &s) in still.iter().enumerate() {
            row_of[s] = row;
        }
        active = still;
    }
}
