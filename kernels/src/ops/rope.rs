//! RoPE / YaRN in place (`kernels/cuda/rope.cu`), the same math as `dsv3_core::ops::rope`.
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};

/// Where the rotated vectors lie: `rows` rows of stride `ld_row`, `heads` vectors per row of
/// stride `ld_head`, each `2·half` values starting `offset` into its head.
#[derive(Debug, Clone, Copy)]
pub struct RopeLayout {
    pub rows: usize,
    pub ld_row: usize,
    pub heads: usize,
    pub ld_head: usize,
    pub offset: usize,
    pub half: usize,
}

/// The arguments of `rope_*` and `rope_bwd_*` (the same signature) after checking `layout`
/// against `x`, `pos` and `inv_freq`; `None` when there is nothing to rotate.
fn rope_args(
    dev: &Device,
    what: &str,
    x: &mut Act,
    layout: RopeLayout,
    pos: &CudaSlice<i32>,
    inv_freq: &CudaSlice<f32>,
    attention_factor: f32,
) -> Result<Option<[KArg; 10]>> {
    let RopeLayout { rows, ld_row, heads, ld_head, offset, half } = layout;
    if rows == 0 || heads == 0 {
        return Ok(None);
    }
    if half == 0 || half > 128 || inv_freq.len() < half || pos.len() < rows {
        return Err(Error::Input(format!(
            "{what}: half {half} (1..=128), {} freqs, {} positions",
            inv_freq.len(),
            pos.len()
        )));
    }
    if heads > 1 && ld_head < offset + 2 * half {
        return Err(Error::Input(format!("{what}: heads overlap")));
    }
    x.check((rows - 1) * ld_row + (heads - 1) * ld_head + offset + 2 * half, &format!("{what} x"))?;
    Ok(Some([
        KArg::Ptr(x.ptr(dev, 0)?),
        KArg::I32(int(rows, "rows")?),
        KArg::I32(int(ld_row, "ld_row")?),
        KArg::I32(int(heads, "heads")?),
        KArg::I32(int(ld_head, "ld_head")?),
        KArg::I32(int(offset, "offset")?),
        KArg::I32(int(half, "half")?),
        KArg::Ptr(dptr(dev, pos, 0)?),
        KArg::Ptr(dptr(dev, inv_freq, 0)?),
        KArg::F32(attention_factor),
    ]))
}

/// Rotates every vector of `layout` in `x` by its row's position `pos[row]` with `inv_freq`
/// (`[half]`) and `attention_factor`; output de-interleaved as `Rope::apply` writes it.
pub fn rope(
    dev: &Device,
    x: &mut Act,
    layout: RopeLayout,
    pos: &CudaSlice<i32>,
    inv_freq: &CudaSlice<f32>,
    attention_factor: f32,
) -> Result<()> {
    let Some(args) = rope_args(dev, "rope", x, layout, pos, inv_freq, attention_factor)? else { return Ok(()) };
    let k = match x.dtype() {
        DType::F32 => "rope_f32",
        DType::Bf16 => "rope_bf16",
    };
    let (rows, heads) = (layout.rows, layout.heads);
    launch(
        dev,
        "rope",
        k,
        (dim(rows, "rope rows")?, dim(heads, "rope heads")?, 1),
        layout.half.div_ceil(32) as u32 * 32,
        &args,
    )
}

/// Backward of [`rope`] (`rope_bwd_*` in kernels/cuda/train.cu), in place over the same layout:
/// the gradient of the rotated (de-interleaved) vectors becomes the gradient of the interleaved
/// inputs.
pub fn rope_backward(
    dev: &Device,
    x: &mut Act,
    layout: RopeLayout,
    pos: &CudaSlice<i32>,
    inv_freq: &CudaSlice<f32>,
    attention_factor: f32,
) -> Result<()> {
    let Some(args) = rope_args(dev, "rope_backward", x, layout, pos, inv_freq, attention_factor)? else {
        return Ok(());
    };
    let k = match x.dtype() {
        DType::F32 => "rope_bwd_f32",
        DType::Bf16 => "rope_bwd_bf16",
    };
    let (rows, heads) = (layout.rows, layout.heads);
    launch(
        dev,
        "train",
        k,
        (dim(rows, "rope_backward rows")?, dim(heads.div_ceil(64), "rope_backward heads")?, 1),
        64,
        &args,
    )
}
