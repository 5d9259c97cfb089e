//! Sampling helpers on device (`kernels/cuda/sampling.cu`): argmax per row (greedy) and softmax.
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
