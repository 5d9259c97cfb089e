//! Elementwise kernels (`kernels/cuda/elementwise.cu`): SwiGLU over fused gate|up rows, add, casts.
use super::{dim, grid_y, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{Act, DType};
use dsv3_core::{Error, Result};

/// `out[r, i] = silu(gu[r, i]) · gu[r, inter + i]` for `rows` rows; `gu` `[rows, ld]` (ld >= 2·inter),
/// `out` `[rows, ldo]`.
pub fn swiglu(dev: &Device, gu: &Act, ld: usize, out: &mut Act, ldo: usize, inter: usize, rows: usize) -> Result<()> {
    if rows == 0 || inter == 0 {
        return Ok(());
    }
    if gu.dtype() != out.dtype() || ld < 2 * inter || ldo < inter {
        return Err(Error::Input(format!("swiglu: dtypes or strides (ld {ld}, ldo {ldo}, inter {inter})")));
    }
    gu.check((rows - 1) * ld + 2 * inter, "swiglu input")?;
    out.check((rows - 1) * ldo + inter, "swiglu output")?;
    let k = match gu.dtype() {
        DType::F32 => "swiglu_f32",
        DType::Bf16 => "swiglu_bf16",
    };
    launch(
        dev,
        "elementwise",
        k,
        (dim(inter.div_ceil(256), "swiglu")?, grid_y(rows, "swiglu rows")?, 1),
        256,
        &[
            KArg::Ptr(gu.ptr(dev, 0)?),
            KArg::I32(int(ld, "ld")?),
            KArg::Ptr(out.ptr(dev, 0)?),
            KArg::I32(int(ldo, "ldo")?),
            KArg::I32(int(inter, "inter")?),
            KArg::I32(int(rows, "rows")?),
        ],
    )
}

/// `x[..n] += y[..n]`.
pub fn add(dev: &Device, x: &mut Act, y: &Act, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if x.dtype() != y.dtype() {
        return Err(Error::Input("add: dtypes differ".into()));
    }
    x.check(n, "add x")?;
    y.check(n, "add y")?;
    let k = match x.dtype() {
        DType::F32 => "add_f32",
        DType::Bf16 => "add_bf16",
    };
    let args = [KArg::Ptr(x.ptr(dev, 0)?), KArg::Ptr(y.ptr(dev, 0)?), KArg::I64(n as i64)];
    launch(dev, "elementwise", k, (dim(n.div_ceil(256), "add")?, 1, 1), 256, &args)
}

/// `dst[..n] = src[..n]` converted (f32 <-> bf16, round to nearest even).
pub fn cast(dev: &Device, src: &Act, dst: &mut Act, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    src.check(n, "cast src")?;
    dst.check(n, "cast dst")?;
    let k = match (src.dtype(), dst.dtype()) {
        (DType::F32, DType::Bf16) => "cast_f32_bf16",
        (DType::Bf16, DType::F32) => "cast_bf16_f32",
        _ => return Err(Error::Input("cast: source and destination have the same dtype".into())),
    };
    let args = [KArg::Ptr(src.ptr(dev, 0)?), KArg::Ptr(dst.ptr(dev, 0)?), KArg::I64(n as i64)];
    launch(dev, "elementwise", k, (dim(n.div_ceil(256), "cast")?, 1, 1), 256, &args)
}
