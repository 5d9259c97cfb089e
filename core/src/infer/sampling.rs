//! Sampling: greedy, temperature, top-k, top-p, with a seeded RNG (HF's order:
//! temperature → top-k → top-p).
use crate::error::{ierr, Result};
use crate::rng::Rng;
use alloc::format;
use alloc::vec::Vec;

/// How the next token is chosen, and when generation stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens with cumulative probability >= top_p (1 = off).
    pub top_p: f32,
    pub seed: u64,
    /// Tokens generated at most per sequence.
    pub max_new_tokens: usize,
    /// Generation of a sequence stops after it emits one of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, max_new_tokens: 64, stop_tokens: Vec::new() }
    }
}

impl SamplingParams {
    /// Checks the ranges: temperature >= 0 and finite, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ierr(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ierr(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Draws tokens from logits.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks a token from one row of logits (`[V]`). NaN logits are an error.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) {
            return Err(crate::Error::NonFinite("NaN in logits".into()));
        }
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return Ok(argmax(logits) as u32);
        }
        let t = self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(core::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let m = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| libm::expf(c.1 - m)).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.params.top_p < 1.0 {
            let mut cum = 0f32;
            let mut keep = probs.len();
            for (i, &p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let u = self.rng.uniform();
        let mut cum = 0f32;
        for (i, &p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return Ok(cand[i].0);
            }
        }
        Ok(cand[probs.len() - 1].0)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn greedy_topk_topp_and_seed() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.sample(&logits).unwrap(), 1);
        // top_k = 2: only 1 and 3 ever come out
        let p = SamplingParams { temperature: 1.0, top_k: 2, seed: 5, ..Default::default() };
        let mut s = Sampler::new(p.clone()).unwrap();
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 3));
        assert!(draws.contains(&1) && draws.contains(&3));
        // same seed, same stream
        let mut s2 = Sampler::new(p).unwrap();
        let again: Vec<u32> = (0..200).map(|_| s2.sample(&logits).unwrap()).collect();
        assert_eq!(draws, again);
        // tiny top_p keeps only the best token
        let mut s3 = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.01, ..Default::default() }).unwrap();
        assert!((0..50).all(|_| s3.sample(&logits).unwrap() == 1));
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(g.sample(&[f32::NAN, 1.0]).is_err());
    }
}
