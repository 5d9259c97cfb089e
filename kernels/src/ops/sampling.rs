//! Sampling on device (`kernels/cuda/sampling.cu`): argmax per row (greedy), softmax, and the
//! sampler (temperature / top-k / top-p with the CPU `Sampler`'s exact semantics).
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::dptr;
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};

/// `out[r] = argmax(x[r, :n])` (first index on ties) for `x` `[rows, n]` f32.
pub fn argmax_rows(dev: &Device, x: &CudaSlice<f32>, rows: usize, n: usize, out: &mut CudaSlice<i32>) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if n == 0 || x.len() < rows * n || out.len() < rows {
        return Err(Error::Input(format!("argmax_rows: [{rows}, {n}] over {} values, {} outputs", x.len(), out.len())));
    }
    let args = [
        KArg::Ptr(dptr(dev, x, 0)?),
        KArg::I32(int(rows, "rows")?),
        KArg::I32(int(n, "n")?),
        KArg::Ptr(dptr(dev, out, 0)?),
    ];
    launch(dev, "sampling", "argmax_rows_f32", (dim(rows, "argmax")?, 1, 1), 1024, &args)
}

/// `x[r, :] = softmax(x[r, :] / temperature)` in place for `x` `[rows, n]` f32.
pub fn softmax_rows(dev: &Device, x: &mut CudaSlice<f32>, rows: usize, n: usize, temperature: f32) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if n == 0 || x.len() < rows * n || !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::Input(format!(
            "softmax_rows: [{rows}, {n}] over {} values, temperature {temperature}",
            x.len()
        )));
    }
    let args =
        [KArg::Ptr(dptr(dev, x, 0)?), KArg::I32(int(rows, "rows")?), KArg::I32(int(n, "n")?), KArg::F32(temperature)];
    launch(dev, "sampling", "softmax_rows_f32", (dim(rows, "softmax")?, 1, 1), 256, &args)
}

/// One row's sampling parameters for [`sample_rows`]: `core::infer::sampling::SamplingParams`'
/// temperature, top-k and top-p, and the uniform the CPU `Sampler` would draw for this token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSample {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
}

/// What [`sample_rows`] decided for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampled {
    /// The token the CPU `Sampler` picks with the same uniform, bit for bit.
    Token(u32),
    /// Top-p over the whole vocabulary where the normalizer is the exactly rounded sum instead
    /// of the CPU's sorted f32 running sum (a different token only where that difference moves
    /// the top-p cut).
    Rounded(u32),
    /// NaN in the row's logits (the CPU sampler's error).
    NaN,
    /// Not decided on the device (a ±inf maximum, or more than [`SAMPLE_CAP`] candidates for
    /// top-k / top-p): sample the row on the host with the same uniform.
    Host,
}

/// Most top-k / top-p candidates the device sorts (more: [`Sampled::Host`]).
pub const SAMPLE_CAP: usize = 4096;

/// The kernel's per-row parameters, `[rows, 4]`: temperature, top-k (as i32 bits, saturated),
/// top-p, u.
pub fn encode_rows(rows: &[RowSample]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| {
            let k = i32::try_from(r.top_k).unwrap_or(i32::MAX);
            [r.temperature, f32::from_bits(k as u32), r.top_p, r.u]
        })
        .collect()
}

/// The kernel's output (`[rows, 2]`: token, status) as decisions; a bad token id is an error.
pub fn decode_rows(out: &[i32], vocab: usize) -> Result<Vec<Sampled>> {
    out.chunks_exact(2)
        .map(|p| {
            let tok = || {
                usize::try_from(p[0])
                    .ok()
                    .filter(|&t| t < vocab)
                    .map(|t| t as u32)
                    .ok_or_else(|| Error::Io(format!("device sampler returned token {} (vocab {vocab})", p[0])))
            };
            match p[1] {
                0 => Ok(Sampled::Token(tok()?)),
                1 => Ok(Sampled::Rounded(tok()?)),
                -1 => Ok(Sampled::NaN),
                -2 => Ok(Sampled::Host),
                s => Err(Error::Io(format!("device sampler returned status {s}"))),
            }
        })
        .collect()
}

/// Samples a token per row of `x` (`[rows, n]` f32 logits) on the device as
/// `core::infer::sampling::Sampler::sample` would with the uniform `prm` carries
/// ([`encode_rows`], `[rows, 4]` on the device); writes `out` `[rows, 2]` (token, status: see
/// [`decode_rows`]). `ebuf` is `[rows, n]` scratch.
pub fn sample_rows(
    dev: &Device,
    x: &CudaSlice<f32>,
    rows: usize,
    n: usize,
    prm: &CudaSlice<f32>,
    ebuf: &mut CudaSlice<f32>,
    out: &mut CudaSlice<i32>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if n == 0 || x.len() < rows * n || prm.len() < rows * 4 || ebuf.len() < rows * n || out.len() < rows * 2 {
        return Err(Error::Input(format!(
            "sample_rows: [{rows}, {n}] over {} values, {} params, {} scratch, {} outputs",
            x.len(),
            prm.len(),
            ebuf.len(),
            out.len()
        )));
    }
    let args = [
        KArg::Ptr(dptr(dev, x, 0)?),
        KArg::I32(int(rows, "rows")?),
        KArg::I32(int(n, "n")?),
        KArg::Ptr(dptr(dev, prm, 0)?),
        KArg::Ptr(dptr(dev, ebuf, 0)?),
        KArg::Ptr(dptr(dev, out, 0)?),
    ];
    launch(dev, "sampling", "sample_rows_f32", (dim(rows, "sample")?, 1, 1), 1024, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_encode_and_decode() {
        let p = encode_rows(&[
            RowSample { temperature: 0.8, top_k: 0, top_p: 0.9, u: 0.25 },
            RowSample { temperature: 1.0, top_k: usize::MAX, top_p: 1.0, u: 0.0 },
        ]);
        assert_eq!(p.len(), 8);
        assert_eq!((p[0], p[1].to_bits(), p[2], p[3]), (0.8, 0, 0.9, 0.25));
        assert_eq!(p[5].to_bits() as i32, i32::MAX); // top_k past the vocabulary stays "past it", not 0
        let d = decode_rows(&[3, 0, 4, 1, 0, -1, 0, -2], 10).unwrap();
        assert_eq!(d, vec![Sampled::Token(3), Sampled::Rounded(4), Sampled::NaN, Sampled::Host]);
        assert!(decode_rows(&[10, 0], 10).is_err());
        assert!(decode_rows(&[-1, 0], 10).is_err());
        assert!(decode_rows(&[1, 7], 10).is_err());
    }
}
