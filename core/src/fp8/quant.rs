//! Fine-grained FP8 quantization (V3 §3.3.2) and checkpoint block dequantization.
use crate::error::{ierr, Result};
use crate::fp8::format::{encode_e4m3_fast, round_e4m3, ue8m0, Fp8Format, E4M3_LUT};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// How scales tile a `[rows, cols]` matrix (cols = the GEMM reduction dimension K, except for
/// [`ScaleLayout::Tile128x1`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// One scale per row per 128 columns: activations and activation gradients (per token).
    Tile1x128,
    /// One scale per column per 128 rows: the Wgrad operands, tiled along the token axis.
    Tile128x1,
    /// One scale per 128x128 block: weights.
    Block128,
}

/// What a tensor is (the recipe forbids some layouts for some roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Weight,
    Activation,
    /// Activation gradients: never in 128x128 blocks (V3 App. B.2: a 16B MoE run diverged).
    ActivationGrad,
}

/// An FP8 tensor: codes `[rows, cols]` and its scales (`x ≈ decode(code) · scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub format: Fp8Format,
    pub layout: ScaleLayout,
    /// `[rows, ceil(cols/128)]`, `[ceil(rows/128), cols]` or `[ceil(rows/128), ceil(cols/128)]`.
    pub scales: Vec<f32>,
}

/// The floor on amax before dividing by the format max (DeepSeek's act_quant, since Aug 2025).
pub const AMAX_FLOOR: f32 = 1e-4;
const T: usize = 128;

impl QTensor {
    /// The scale of element `(r, c)`.
    #[inline]
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        match self.layout {
            ScaleLayout::Tile1x128 => self.scales[r * self.cols.div_ceil(T) + c / T],
            ScaleLayout::Tile128x1 => self.scales[(r / T) * self.cols + c],
            ScaleLayout::Block128 => self.scales[(r / T) * self.cols.div_ceil(T) + c / T],
        }
    }

    /// Dequantizes to f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| self.format.decode(self.codes[i]) * self.scale_at(i / self.cols, i % self.cols))
            .collect()
    }

    /// The transpose: codes `[cols, rows]`; a 128x1 tiling becomes 1x128 (and blocks stay blocks).
    pub fn transposed(&self) -> QTensor {
        let (r, c) = (self.rows, self.cols);
        let mut codes = vec![0u8; r * c];
        for i in 0..r {
            for j in 0..c {
                codes[j * r + i] = self.codes[i * c + j];
            }
        }
        let (layout, scales) = transpose_scales(self);
        QTensor { rows: c, cols: r, codes, format: self.format, layout, scales }
    }
}

/// Quantizes `x` (`[rows, cols]`, row-major) to E4M3 with `layout` scales (`ue8m0`: power-of-two
/// scales). Refuses 128x128 blocks for activation gradients, and non-finite inputs.
pub fn quantize(
    x: &[f32],
    rows: usize,
    cols: usize,
    layout: ScaleLayout,
    role: Role,
    ue8m0_scales: bool,
) -> Result<QTensor> {
    if role == Role::ActivationGrad && layout == ScaleLayout::Block128 {
        return Err(ierr(
            "activation gradients are never quantized in 128x128 blocks (DeepSeek-V3 App. B.2: token-correlated outliers diverge training); use 1x128 tiles per token, or 128x1 along tokens for Wgrad",
        ));
    }
    if x.len() != rows * cols {
        return Err(ierr(format!("quantize: {} values for a [{rows}, {cols}] tensor", x.len())));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(crate::Error::NonFinite(format!("quantize: value {} at flat index {i}", x[i])));
    }
    Ok(quantize_unchecked(x, rows, cols, layout, ue8m0_scales))
}

/// [`quantize`] without the checks, for the training hot path: the caller guarantees the shape
/// and that `layout` suits the role; NaN inputs become NaN codes (so a NaN propagates to the loss,
/// which the trainer reports), infinities saturate.
pub fn quantize_unchecked(x: &[f32], rows: usize, cols: usize, layout: ScaleLayout, ue8m0_scales: bool) -> QTensor {
    let q = quantize_values(x, rows, cols, layout, ue8m0_scales);
    // the values are E4M3-representable, so encoding them is exact
    let codes = q.vals.iter().map(|&v| encode_e4m3_fast(v)).collect();
    QTensor { rows, cols, codes, format: Fp8Format::E4M3, layout, scales: q.scales }
}

/// Quantized values for the training hot path: the E4M3 value of each element as f32 (the codes'
/// decoded values, bit for bit) with its scales, in the same layouts as [`QTensor`].
#[derive(Debug, Clone, PartialEq)]
pub struct QValues {
    pub rows: usize,
    pub cols: usize,
    pub vals: Vec<f32>,
    pub layout: ScaleLayout,
    pub scales: Vec<f32>,
}

/// Quantizes to E4M3 values (as f32, unscaled) and their scales: the training hot path, and the
/// core of [`quantize_unchecked`].
pub fn quantize_values(x: &[f32], rows: usize, cols: usize, layout: ScaleLayout, ue8m0_scales: bool) -> QValues {
    let scale_of = |amax: f32| {
        let s = amax.max(AMAX_FLOOR) / 448.0;
        if ue8m0_scales {
            ue8m0(s)
        } else {
            s
        }
    };
    let absmax = |v: &[f32]| v.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let mut vals = vec![0f32; rows * cols];
    let scales = match layout {
        ScaleLayout::Tile1x128 => {
            let cb = cols.div_ceil(T);
            let mut sc = vec![0f32; rows * cb];
            for r in 0..rows {
                for b in 0..cb {
                    let (c0, c1) = (r * cols + b * T, r * cols + (b * T + T).min(cols));
                    let s = scale_of(absmax(&x[c0..c1]));
                    sc[r * cb + b] = s;
                    for (q, &v) in vals[c0..c1].iter_mut().zip(&x[c0..c1]) {
                        *q = round_e4m3(v / s);
                    }
                }
            }
            sc
        }
        ScaleLayout::Tile128x1 | ScaleLayout::Block128 => {
            let per_col = layout == ScaleLayout::Tile128x1;
            let cb = if per_col { cols } else { cols.div_ceil(T) };
            let mut sc = vec![0f32; rows.div_ceil(T) * cb];
            let mut amax = vec![0f32; cols];
            let mut col_scale = vec![0f32; cols];
            for rb in 0..rows.div_ceil(T) {
                let (r0, r1) = (rb * T, (rb * T + T).min(rows));
                amax.fill(0.0);
                for r in r0..r1 {
                    for (m, &v) in amax.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                        *m = m.max(v.abs());
                    }
                }
                let srow = &mut sc[rb * cb..(rb + 1) * cb];
                if per_col {
                    srow.iter_mut().zip(&amax).for_each(|(s, &a)| *s = scale_of(a));
                    col_scale.copy_from_slice(srow);
                } else {
                    for (b, s) in srow.iter_mut().enumerate() {
                        *s = scale_of(absmax(&amax[b * T..(b * T + T).min(cols)]));
                    }
                    col_scale.iter_mut().enumerate().for_each(|(c, s)| *s = srow[c / T]);
                }
                for r in r0..r1 {
                    for ((q, &v), &s) in
                        vals[r * cols..(r + 1) * cols].iter_mut().zip(&x[r * cols..(r + 1) * cols]).zip(&col_scale)
                    {
                        *q = round_e4m3(v / s);
                    }
                }
            }
            sc
        }
    };
    QValues { rows, cols, vals, layout, scales }
}

impl QValues {
    /// The transpose (1x128 ↔ 128x1; blocks stay blocks).
    pub fn transposed(&self) -> QValues {
        let (r, c) = (self.rows, self.cols);
        let mut vals = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                vals[j * r + i] = self.vals[i * c + j];
            }
        }
        let q = QTensor {
            rows: r,
            cols: c,
            codes: Vec::new(),
            format: Fp8Format::E4M3,
            layout: self.layout,
            scales: self.scales.clone(),
        };
        let t = transpose_scales(&q);
        QValues { rows: c, cols: r, vals, layout: t.0, scales: t.1 }
    }
}

/// The scales of the transpose of `q` (and their layout).
fn transpose_scales(q: &QTensor) -> (ScaleLayout, Vec<f32>) {
    let (r, c) = (q.rows, q.cols);
    match q.layout {
        ScaleLayout::Tile128x1 => {
            let rb = r.div_ceil(T);
            let mut s = vec![0f32; c * rb];
            for b in 0..rb {
                for j in 0..c {
                    s[j * rb + b] = q.scales[b * c + j];
                }
            }
            (ScaleLayout::Tile1x128, s)
        }
        ScaleLayout::Tile1x128 => {
            let cb = c.div_ceil(T);
            let mut s = vec![0f32; cb * r];
            for i in 0..r {
                for b in 0..cb {
                    s[b * r + i] = q.scales[i * cb + b];
                }
            }
            (ScaleLayout::Tile128x1, s)
        }
        ScaleLayout::Block128 => {
            let (rb, cb) = (r.div_ceil(T), c.div_ceil(T));
            let mut s = vec![0f32; cb * rb];
            for i in 0..rb {
                for j in 0..cb {
                    s[j * rb + i] = q.scales[i * cb + j];
                }
            }
            (ScaleLayout::Block128, s)
        }
    }
}

/// Whether `code` is an e4m3fn NaN.
pub fn e4m3_is_nan(code: u8) -> bool {
    code & 0x7F == 0x7F
}

/// Dequantizes rows `[r0, r1)` of an FP8 checkpoint matrix `q` ([rows, cols] E4M3 codes) with
/// block scales `scale` ([ceil(rows/br), ceil(cols/bc)]) into `out` ([r1-r0, cols]):
/// `W[i,j] = f32(q[i,j]) · S[i/br, j/bc]` (partial edge blocks included).
pub fn dequant_rows(q: &[u8], cols: usize, scale: &[f32], block: [usize; 2], r0: usize, r1: usize, out: &mut [f32]) {
    let sc = cols.div_ceil(block[1]);
    for (i, orow) in (r0..r1).zip(out.chunks_exact_mut(cols)) {
        let qrow = &q[i * cols..(i + 1) * cols];
        let srow = &scale[(i / block[0]) * sc..(i / block[0] + 1) * sc];
        for ((oc, qc), &s) in orow.chunks_mut(block[1]).zip(qrow.chunks(block[1])).zip(srow) {
            for (o, &c) in oc.iter_mut().zip(qc) {
                *o = E4M3_LUT[c as usize] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn partial_blocks_dequantize() {
        // 3x5 matrix with 2x2 blocks: scales [2, 3]
        let q = [0x38u8; 15];
        let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 15];
        dequant_rows(&q, 5, &s, [2, 2], 0, 3, &mut out);
        assert_eq!(&out[..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&out[10..], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }
    #[test]
    fn refuses_block_quantized_activation_gradients() {
        let x = vec![0.5f32; 4];
        let e = quantize(&x, 2, 2, ScaleLayout::Block128, Role::ActivationGrad, false).unwrap_err();
        assert!(alloc::format!("{e}").contains("never quantized in 128x128 blocks"));
        assert!(quantize(&x, 2, 2, ScaleLayout::Tile1x128, Role::ActivationGrad, false).is_ok());
        assert!(quantize(&x, 2, 2, ScaleLayout::Block128, Role::Weight, false).is_ok());
        assert!(quantize(&[f32::NAN, 0.0, 0.0, 0.0], 2, 2, ScaleLayout::Tile1x128, Role::Activation, false).is_err());
    }
    #[test]
    fn transpose_keeps_values() {
        let x: Vec<f32> = (0..300 * 3).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let q = quantize(&x, 300, 3, ScaleLayout::Tile128x1, Role::Activation, false).unwrap();
        let t = q.transposed();
        assert_eq!(t.layout, ScaleLayout::Tile1x128);
        let (a, b) = (q.dequantize(), t.dequantize());
        for i in 0..300 {
            for j in 0..3 {
                assert_eq!(a[i * 3 + j], b[j * 300 + i]);
            }
        }
    }
}
