//! Sampling on the device: [`CudaSession::step_sample`] runs a step and picks each row's next
//! token with `sample_rows_f32` (kernels/cuda/sampling.cu), the CPU `Sampler`'s semantics bit for
//! bit given the uniform it would draw (drawn on the host, [`Sampler::draw`]); only the ids and a
//! status per row come back. In a captured decode step the sampler is part of the CUDA graph (its
//! parameters, uniforms included, are written to a device buffer before the replay). A row the
//! device does not decide (a ±inf maximum, or more than `SAMPLE_CAP` top-k / top-p candidates)
//! is sampled on the host from its downloaded logits with the same uniform.
use super::session::{Out, Want};
use super::CudaSession;
use crate::device::{cuda_err, Device};
use crate::ops::sampling::{self, decode_rows, encode_rows, RowSample, Sampled};
use crate::tensor::zeros;
use cudarc::driver::CudaSlice;
use dsv3_core::infer::sampling::{sample_with, Sampler, SamplingParams};
use dsv3_core::{Error, Result};

/// The device sampler's buffers for `n` rows: parameters `[n, 4]`, exp scratch `[n, V]`, output
/// `[n, 2]`.
pub(super) struct SampleBufs {
    prm: CudaSlice<f32>,
    ebuf: CudaSlice<f32>,
    out: CudaSlice<i32>,
}

impl SampleBufs {
    pub(super) fn new(dev: &Device, n: usize, v: usize) -> Result<SampleBufs> {
        Ok(SampleBufs { prm: zeros(dev, n * 4)?, ebuf: zeros(dev, n * v)?, out: zeros(dev, n * 2)? })
    }

    /// Writes the encoded parameters (before the launch or graph replay that reads them).
    pub(super) fn upload(&mut self, dev: &Device, prm: &[f32]) -> Result<()> {
        if prm.len() != self.prm.len() {
            return Err(Error::Input(format!("{} sampling parameters for {} rows", prm.len() / 4, self.prm.len() / 4)));
        }
        dev.stream.memcpy_htod(prm, &mut self.prm).map_err(|e| cuda_err("uploading sampling parameters", e))
    }

    /// Enqueues the sampler over `logits` `[n, v]` (recordable into a graph).
    pub(super) fn launch(&mut self, dev: &Device, logits: &CudaSlice<f32>, n: usize, v: usize) -> Result<()> {
        sampling::sample_rows(dev, logits, n, v, &self.prm, &mut self.ebuf, &mut self.out)
    }

    /// The results, and the logits too when a row needs the host.
    pub(super) fn finish(&self, dev: &Device, logits: &CudaSlice<f32>, n: usize) -> Result<Out> {
        let out = dev.stream.clone_dtoh(&self.out).map_err(|e| cuda_err("downloading sampled tokens", e))?;
        let host = out.chunks_exact(2).take(n).any(|p| p[1] == -2);
        let logits = if host {
            Some(dev.stream.clone_dtoh(logits).map_err(|e| cuda_err("downloading logits", e))?)
        } else {
            None
        };
        Ok(Out::Sampled(out, logits))
    }
}

/// An uncaptured step's sampling: fresh buffers, one launch.
pub(super) fn sample_now(dev: &Device, logits: &CudaSlice<f32>, n: usize, v: usize, prm: &[f32]) -> Result<Out> {
    let mut b = SampleBufs::new(dev, n, v)?;
    b.upload(dev, prm)?;
    b.launch(dev, logits, n, v)?;
    b.finish(dev, logits, n)
}

/// Tokens from the device's decisions: NaN is the CPU sampler's error; a row left to the host
/// is sampled from `logits` (`[rows, v]`) with its own uniform.
pub fn resolve(decided: &[Sampled], rows: &[RowSample], logits: Option<&[f32]>, v: usize) -> Result<Vec<u32>> {
    decided
        .iter()
        .zip(rows)
        .enumerate()
        .map(|(r, (d, p))| match *d {
            Sampled::Token(t) | Sampled::Rounded(t) => Ok(t),
            Sampled::NaN => Err(Error::NonFinite("NaN in logits".into())),
            Sampled::Host => {
                let l = logits
                    .and_then(|l| l.get(r * v..(r + 1) * v))
                    .ok_or_else(|| Error::Io("device sampler: a row for the host came without its logits".into()))?;
                let params =
                    SamplingParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, ..Default::default() };
                sample_with(&params, l, p.u)
            }
        })
        .collect()
}

/// Row parameters for the next token of a sequence sampled by `sampler`: its temperature,
/// top-k and top-p, and the uniform its next sampled token uses (drawn now, exactly when
/// `Sampler::sample` would draw: not for greedy).
pub fn next_row(sampler: &mut Sampler) -> RowSample {
    let p = &sampler.params;
    let (temperature, top_k, top_p) = (p.temperature, p.top_k, p.top_p);
    let greedy = temperature == 0.0 || top_k == 1;
    RowSample { temperature, top_k, top_p, u: if greedy { 0.0 } else { sampler.draw() } }
}

impl CudaSession<'_> {
    /// Like [`CudaSession::step`] but returns each pair's next token sampled on the device with
    /// `rows[i]` (one per pair): the token `Sampler::sample` picks from the same logits when it
    /// draws `rows[i].u` ([`next_row`] draws it). NaN logits are an error. Only the ids come back
    /// (and a row's logits where the device hands it to the host).
    pub fn step_sample(&mut self, inputs: &[(usize, &[u32])], rows: &[RowSample]) -> Result<Vec<u32>> {
        if rows.len() != inputs.len() {
            return Err(Error::Input(format!("{} sampling rows for {} sequences", rows.len(), inputs.len())));
        }
        let prm = encode_rows(rows);
        let v = self.model.cfg.vocab_size;
        match self.step_to(inputs, Want::Sample(&prm))? {
            Out::Sampled(out, logits) => resolve(&decode_rows(&out, v)?, rows, logits.as_deref(), v),
            _ => unreachable!("asked for sampled tokens"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rows_and_errors_resolve_as_the_cpu_sampler() {
        let logits = [0.5f32, 2.0, -1.0, 1.5, 0.0, 3.0];
        let row = |u| RowSample { temperature: 0.9, top_k: 2, top_p: 1.0, u };
        let rows = [row(0.1), row(0.9), row(0.5)];
        let both = [logits, logits].concat();
        let got = resolve(&[Sampled::Token(4), Sampled::Host], &rows[..2], Some(&both), 6).unwrap();
        let p = SamplingParams { temperature: 0.9, top_k: 2, ..Default::default() };
        assert_eq!(got, vec![4, sample_with(&p, &logits, 0.9).unwrap()]);
        assert!(resolve(&[Sampled::NaN], &rows[..1], None, 6).is_err());
        assert!(resolve(&[Sampled::Host], &rows[..1], None, 6).is_err());
        // next_row draws as Sampler::sample does: one uniform per sampled token, none for greedy
        let sp = SamplingParams { temperature: 0.7, top_p: 0.9, seed: 5, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(sp.clone()).unwrap(), Sampler::new(sp.clone()).unwrap());
        for _ in 0..5 {
            let r = next_row(&mut a);
            assert_eq!(b.sample(&logits).unwrap(), sample_with(&sp, &logits, r.u).unwrap());
        }
        let mut g = Sampler::new(SamplingParams { seed: 5, ..Default::default() }).unwrap();
        assert_eq!(next_row(&mut g).u, 0.0);
    }
}
