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

    /// Picks a token from one row of logits (`[V]`). NaN logits are an error. Draws one uniform
    /// from the generator per sampled (non-greedy) token.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) {
            return Err(crate::Error::NonFinite("NaN in logits".into()));
        }
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return Ok(argmax(logits) as u32);
        }
        let u = self.rng.uniform();
        sample_with(&self.params, logits, u)
    }

    /// The uniform the next sampled (non-greedy) token would use, drawn now: what a device
    /// sampler passes to the GPU so it picks the token [`Sampler::sample`] would.
    pub fn draw(&mut self) -> f32 {
        self.rng.uniform()
    }
}

/// [`Sampler::sample`] with its uniform given: the token it picks when its generator draws `u`
/// (unused for greedy). NaN logits are an error.
pub fn sample_with(params: &SamplingParams, logits: &[f32], u: f32) -> Result<u32> {
    if logits.iter().any(|x| x.is_nan()) {
        return Err(crate::Error::NonFinite("NaN in logits".into()));
    }
    if params.temperature == 0.0 || params.top_k == 1 {
        return Ok(argmax(logits) as u32);
    }
    let t = params.temperature;
    if params.top_k == 0 && params.top_p >= 1.0 {
        return Ok(sample_full(logits, t, u));
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
    // most likely first, ties by id: a total order, so a partial selection gives the same top k
    let order = |a: &(u32, f32), b: &(u32, f32)| {
        b.1.partial_cmp(&a.1).unwrap_or(core::cmp::Ordering::Equal).then(a.0.cmp(&b.0))
    };
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, order);
        cand.truncate(params.top_k);
    }
    cand.sort_by(order);
    let m = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|c| libm::expf(c.1 - m)).collect();
    let z: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if params.top_p < 1.0 {
        let mut cum = 0f32;
        let mut keep = probs.len();
        for (i, &p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let mut cum = 0f32;
    for (i, &p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return Ok(cand[i].0);
        }
    }
    Ok(cand[probs.len() - 1].0)
}

/// Plain temperature sampling over the whole vocabulary (no top-k / top-p): the inverse CDF
/// in token order, no sort (a sort per token dominated GRPO's rollouts at large batch).
fn sample_full(logits: &[f32], t: f32, u: f32) -> u32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) / t;
    let probs: Vec<f32> = logits.iter().map(|&l| libm::expf(l / t - m)).collect();
    let z: f32 = probs.iter().sum();
    let target = u * z;
    let mut cum = 0f32;
    for (i, &p) in probs.iter().enumerate() {
        cum += p;
        if target < cum {
            return i as u32;
        }
    }
    // rounding left the target past the sum: the last token with any mass
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
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

    #[test]
    fn sample_with_is_the_sampler_given_its_draw() {
        // the device sampler's contract: the same uniforms give the same tokens
        let mut gen = Rng::new(4);
        let logits: Vec<f32> = (0..500).map(|_| gen.normal() * 2.0).collect();
        for p in [
            SamplingParams { temperature: 0.8, seed: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 20, top_p: 0.9, seed: 2, ..Default::default() },
            SamplingParams { temperature: 0.0, seed: 3, ..Default::default() },
        ] {
            let mut s = Sampler::new(p.clone()).unwrap();
            let mut d = Sampler::new(p.clone()).unwrap();
            let greedy = p.temperature == 0.0;
            for _ in 0..50 {
                let u = if greedy { 0.0 } else { d.draw() };
                assert_eq!(s.sample(&logits).unwrap(), sample_with(&p, &logits, u).unwrap());
            }
        }
        assert!(sample_with(&SamplingParams::default(), &[1.0, f32::NAN], 0.5).is_err());
    }

    #[test]
    fn full_vocabulary_sampling_follows_the_softmax() {
        // temperature only: frequencies match softmax(l / T); -inf never comes out
        let logits = [1.0f32, 0.0, f32::NEG_INFINITY, 2.0, -1.0];
        let t = 0.7f32;
        let mut s = Sampler::new(SamplingParams { temperature: t, seed: 3, ..Default::default() }).unwrap();
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| ((l / t) as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = ((logits[i] / t) as f64).exp() / z;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((c as f64 / n as f64 - p).abs() <= 5.0 * sd + 1e-12, "token {i}: {c} of {n}, p {p}");
        }
        assert_eq!(counts[2], 0);
    }

    #[test]
    fn top_k_by_selection_equals_a_full_sort() {
        // the reference: sort everything, keep k, then the same inverse CDF
        let reference = |logits: &[f32], p: &SamplingParams, rng: &mut Rng| -> u32 {
            let mut c: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
            c.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            c.truncate(p.top_k);
            let m = c[0].1;
            let mut probs: Vec<f32> = c.iter().map(|x| libm::expf(x.1 - m)).collect();
            let z: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= z);
            let u = rng.uniform();
            let mut cum = 0f32;
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if u < cum {
                    return c[i].0;
                }
            }
            c[probs.len() - 1].0
        };
        let mut gen = Rng::new(11);
        for case in 0..50u64 {
            // ties included: values on a coarse grid
            let logits: Vec<f32> = (0..300).map(|_| (gen.below(40) as f32) * 0.25).collect();
            let p = SamplingParams {
                temperature: 0.9,
                top_k: 1 + (case as usize * 7) % 60,
                seed: case,
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone()).unwrap();
            let mut r = Rng::new(case);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits).unwrap(), reference(&logits, &p, &mut r), "case {case}");
            }
        }
    }
}
