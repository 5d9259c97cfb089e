//! Optimizer-step kernels (`kernels/cuda/optim.cu`): the global gradient norm's sum of squares
//! (per-tensor f64 partial sums into one buffer, then one fixed-order reduction, so the trainer
//! downloads a single `f64` per step), as `dsv3_core::train::Trainer::apply_gradients` (the clip
//! factor is applied inside AdamW, `ops::train::adamw`).
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::dptr;
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};

/// Elements per block of [`sumsq_partials`].
pub const SUMSQ_CHUNK: usize = 16 * 1024;

/// Partial sums [`sumsq_partials`] writes for a tensor of `n` elements.
pub fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(SUMSQ_CHUNK)
}

/// Writes `partial[offset + b] = Σ x[i]²` (f64) for each chunk `b` of [`SUMSQ_CHUNK`] elements of
/// `x[..n]` ([`sumsq_blocks`]`(n)` entries).
pub fn sumsq_partials(
    dev: &Device,
    x: &CudaSlice<f32>,
    n: usize,
    partial: &mut CudaSlice<f64>,
    offset: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let blocks = sumsq_blocks(n);
    if x.len() < n || partial.len() < offset + blocks {
        return Err(Error::Input(format!(
            "sumsq_partials: {n} elements need x of {n} and {blocks} partial slots from {offset} (x {}, partial {})",
            x.len(),
            partial.len()
        )));
    }
    launch(
        dev,
        "optim",
        "sumsq_f32",
        (dim(blocks, "sumsq_partials")?, 1, 1),
        256,
        &[
            KArg::Ptr(dptr(dev, x, 0)?),
            KArg::I64(n as i64),
            KArg::I64(SUMSQ_CHUNK as i64),
            KArg::Ptr(dptr(dev, partial, offset)?),
        ],
    )
}

/// `out[0] = Σ partial[..n]` (f64, one block, fixed order).
pub fn sum_f64(dev: &Device, partial: &CudaSlice<f64>, n: usize, out: &mut CudaSlice<f64>) -> Result<()> {
    if partial.len() < n || out.is_empty() {
        return Err(Error::Input(format!("sum_f64: {n} partials, buffers of {} and {}", partial.len(), out.len())));
    }
    launch(
        dev,
        "optim",
        "sum_f64",
        (1, 1, 1),
        1024,
        &[KArg::Ptr(dptr(dev, partial, 0)?), KArg::I32(int(n, "partials")?), KArg::Ptr(dptr(dev, out, 0)?)],
    )
}
