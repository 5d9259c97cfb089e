//! Absorbed MLA attention over the latent cache (`kernels/cuda/mla.cu`) and the cache append.
//!
//! The cache of one layer is `[slots, max_len, C + dr]` (normalized latent ‖ rotated rope key per
//! token, 576 values for V3); a sequence owns a slot. Each query row `r` attends to the first
//! `row_len[r]` entries of slot `row_slot[r]` (causal prefill: `row_len = position + 1`).
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::{CudaSlice, DeviceRepr};
use dsv3_core::{Error, Result};

/// Heads per block (`MLA_HB`), the largest latent and rope widths the kernel takes.
pub const MLA_HB: usize = 8;
pub const MLA_CMAX: usize = 512;
pub const MLA_RMAX: usize = 128;

/// The kernels' argument block (`struct MlaArgs` in `kernels/cuda/mla.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MlaArgs {
    pub qt: u64,
    pub qpe: u64,
    pub cache: u64,
    pub out: u64,
    pub row_slot: u64,
    pub row_len: u64,
    pub part_o: u64,
    pub part_ml: u64,
    pub slot_stride: i64,
    pub n: i32,
    pub h: i32,
    pub c: i32,
    pub dr: i32,
    pub ld_qt: i32,
    pub ld_qpe: i32,
    pub hs_qpe: i32,
    pub ld_out: i32,
    pub splits: i32,
    pub split_len: i32,
    pub scale: f32,
    pub max_len: i32,
}

// SAFETY: plain integers and floats, #[repr(C)], laid out as the CUDA struct.
unsafe impl DeviceRepr for MlaArgs {}

/// One attention call: `n` query rows, `h` heads, latent width `c`, rope width `dr`.
pub struct MlaCall<'a> {
    pub n: usize,
    pub h: usize,
    pub c: usize,
    pub dr: usize,
    /// Absorbed queries `[n, h, c]` (row stride `ld_qt`).
    pub qt: &'a Act,
    pub ld_qt: usize,
    /// Rope queries: head `hh` of row `r` at `qpe_off + r·ld_qpe + hh·hs_qpe` (`[dr]`).
    pub qpe: &'a Act,
    pub qpe_off: usize,
    pub ld_qpe: usize,
    pub hs_qpe: usize,
    /// `[slots, max_len, c + dr]`.
    pub cache: &'a Act,
    pub slots: usize,
    pub max_len: usize,
    /// `[n]` slot of each row (must be `< slots`; the caller builds these) and visible entries.
    pub row_slot: &'a CudaSlice<i32>,
    pub row_len: &'a CudaSlice<i32>,
    /// Softmax scale.
    pub scale: f32,
    /// Splits along the cache (flash-decoding); > 1 needs `work`.
    pub splits: usize,
}

/// Scratch for split attention: `[splits, n, h, c]` and `[splits, n, h, 2]` f32.
pub struct MlaWork {
    pub part_o: CudaSlice<f32>,
    pub part_ml: CudaSlice<f32>,
}

impl MlaWork {
    /// Scratch for up to `splits` splits of `n` rows, `h` heads, width `c`.
    pub fn new(dev: &Device, splits: usize, n: usize, h: usize, c: usize) -> Result<MlaWork> {
        Ok(MlaWork {
            part_o: crate::tensor::zeros(dev, splits * n * h * c)?,
            part_ml: crate::tensor::zeros(dev, splits * n * h * 2)?,
        })
    }
}

/// `out[r, hh, :c] = Σ_t softmax_t(s) · c_t` (the attention-weighted latent, before `W_UV`);
/// `out` `[n, h, c]` with row stride `ld_out`.
pub fn mla_decode(dev: &Device, p: &MlaCall, out: &mut Act, ld_out: usize, work: Option<&mut MlaWork>) -> Result<()> {
    let MlaCall { n, h, c, dr, .. } = *p;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let dt = p.cache.dtype();
    if p.qt.dtype() != dt || p.qpe.dtype() != dt || out.dtype() != dt {
        return Err(Error::Input("mla_decode: queries, cache and output must share a dtype".into()));
    }
    if c == 0 || c > MLA_CMAX || dr > MLA_RMAX || p.splits == 0 {
        return Err(Error::Input(format!(
            "mla_decode: C {c} (1..={MLA_CMAX}), dr {dr} (<= {MLA_RMAX}), splits {}",
            p.splits
        )));
    }
    if p.ld_qt < h * c || ld_out < h * c || p.row_slot.len() < n || p.row_len.len() < n || p.max_len == 0 {
        return Err(Error::Input("mla_decode: strides or row arrays too small".into()));
    }
    p.qt.check((n - 1) * p.ld_qt + h * c, "mla qt")?;
    p.qpe.check(p.qpe_off + (n - 1) * p.ld_qpe + (h - 1) * p.hs_qpe + dr, "mla qpe")?;
    p.cache.check(p.slots * p.max_len * (c + dr), "mla cache")?;
    out.check((n - 1) * ld_out + h * c, "mla out")?;
    let split_len = p.max_len.div_ceil(p.splits);
    let (po, pm) = match (&work, p.splits) {
        (_, 1) => (0, 0),
        (Some(w), s) if w.part_o.len() >= s * n * h * c && w.part_ml.len() >= s * n * h * 2 => {
            (dptr(dev, &w.part_o, 0)?, dptr(dev, &w.part_ml, 0)?)
        }
        _ => return Err(Error::Input(format!("mla_decode: {} splits need scratch (MlaWork) that large", p.splits))),
    };
    let args = MlaArgs {
        qt: p.qt.ptr(dev, 0)?,
        qpe: p.qpe.ptr(dev, p.qpe_off)?,
        cache: p.cache.ptr(dev, 0)?,
        out: out.ptr(dev, 0)?,
        row_slot: dptr(dev, p.row_slot, 0)?,
        row_len: dptr(dev, p.row_len, 0)?,
        part_o: po,
        part_ml: pm,
        slot_stride: (p.max_len * (c + dr)) as i64,
        n: int(n, "n")?,
        h: int(h, "h")?,
        c: int(c, "c")?,
        dr: int(dr, "dr")?,
        ld_qt: int(p.ld_qt, "ld_qt")?,
        ld_qpe: int(p.ld_qpe, "ld_qpe")?,
        hs_qpe: int(p.hs_qpe, "hs_qpe")?,
        ld_out: int(ld_out, "ld_out")?,
        splits: int(p.splits, "splits")?,
        split_len: int(split_len, "split_len")?,
        scale: p.scale,
        max_len: int(p.max_len, "max_len")?,
    };
    let (kd, kc) = match dt {
        DType::F32 => ("mla_decode_f32", "mla_combine_f32"),
        DType::Bf16 => ("mla_decode_bf16", "mla_combine_bf16"),
    };
    let grid = (dim(n, "mla rows")?, dim(h.div_ceil(MLA_HB), "mla heads")?, dim(p.splits, "mla splits")?);
    launch(dev, "mla", kd, grid, 256, &[KArg::Mla(args)])?;
    if p.splits > 1 {
        launch(dev, "mla", kc, (dim(n, "mla rows")?, dim(h, "mla heads")?, 1), 256, &[KArg::Mla(args)])?;
    }
    Ok(())
}

/// Appends `n` rows of `w = C + dr` values (`src` `[n, ld_src]`) to the cache
/// (`[slots, max_len, w]`): row i goes to slot `slot[i]`, position `pos[i]` (callers check both).
#[allow(clippy::too_many_arguments)]
pub fn cache_append(
    dev: &Device,
    src: &Act,
    ld_src: usize,
    cache: &mut Act,
    max_len: usize,
    slot: &CudaSlice<i32>,
    pos: &CudaSlice<i32>,
    n: usize,
    w: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if src.dtype() != cache.dtype() || ld_src < w || slot.len() < n || pos.len() < n {
        return Err(Error::Input("cache_append: dtype, stride or row arrays".into()));
    }
    src.check((n - 1) * ld_src + w, "cache_append src")?;
    let k = match src.dtype() {
        DType::F32 => "cache_append_f32",
        DType::Bf16 => "cache_append_bf16",
    };
    launch(
        dev,
        "mla",
        k,
        (dim(n, "cache_append")?, 1, 1),
        256,
        &[
            KArg::Ptr(src.ptr(dev, 0)?),
            KArg::I32(int(ld_src, "ld_src")?),
            KArg::Ptr(cache.ptr(dev, 0)?),
            KArg::I64((max_len * w) as i64),
            KArg::Ptr(dptr(dev, slot, 0)?),
            KArg::Ptr(dptr(dev, pos, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(w, "w")?),
        ],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn mla_args_match_the_cuda_struct_layout() {
        assert_eq!(std::mem::size_of::<super::MlaArgs>(), 8 * 8 + 8 + 12 * 4);
        assert_eq!(std::mem::offset_of!(super::MlaArgs, n), 72);
        assert_eq!(std::mem::offset_of!(super::MlaArgs, scale), 112);
    }
}
