//! RMSNorm (`kernels/cuda/rmsnorm.cu`), statistics in f32; strided rows, in place allowed.
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};

/// `y[r, :d] = x[r, :d] · rsqrt(mean(x[r, :d]²) + eps) · w` for `rows` rows; `x` at element
/// `x_off` with row stride `ldx`, `y` at `y_off` with stride `ldy`. `x` and `y` may be the same
/// buffer (pass `y = None` to normalize `x` in place).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    dev: &Device,
    x: &mut Act,
    x_off: usize,
    ldx: usize,
    y: Option<(&mut Act, usize, usize)>,
    w: &CudaSlice<f32>,
    d: usize,
    eps: f32,
    rows: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if d == 0 || d > ldx || w.len() < d {
        return Err(Error::Input(format!("rmsnorm: d {d}, ldx {ldx}, weight of {}", w.len())));
    }
    x.check(x_off + (rows - 1) * ldx + d, "rmsnorm x")?;
    let xp = x.ptr(dev, x_off)?;
    let (yp, ldy) = match y {
        Some((y, y_off, ldy)) => {
            if y.dtype() != x.dtype() || d > ldy {
                return Err(Error::Input("rmsnorm: output dtype or stride mismatch".into()));
            }
            y.check(y_off + (rows - 1) * ldy + d, "rmsnorm y")?;
            (y.ptr(dev, y_off)?, ldy)
        }
        None => (xp, ldx),
    };
    let k = match x.dtype() {
        DType::F32 => "rmsnorm_f32",
        DType::Bf16 => "rmsnorm_bf16",
    };
    launch(
        dev,
        "rmsnorm",
        k,
        (dim(rows, "rmsnorm")?, 1, 1),
        256,
        &[
            KArg::Ptr(xp),
            KArg::I32(int(ldx, "ldx")?),
            KArg::Ptr(yp),
            KArg::I32(int(ldy, "ldy")?),
            KArg::Ptr(dptr(dev, w, 0)?),
            KArg::I32(int(d, "d")?),
            KArg::F32(eps),
            KArg::I32(int(rows, "rows")?),
        ],
    )
}
