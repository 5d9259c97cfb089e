//! [`Linear`]: `y = x · Wᵀ (+ b)` with W `[out, in]` in f32, or FP8 E4M3 with block scales.
use crate::error::{werr, Result};
use crate::fp8::gemm::promoted_gemm;
use crate::fp8::quant::{dequant_rows, e4m3_is_nan, ScaleLayout};
use crate::fp8::quant::{quantize_values, QValues};
use crate::ops::gemm::{matmul_nn, matmul_t, matmul_tn};
use crate::weights::{DType, RawTensor, TensorStore};
use alloc::borrow::Cow;
use alloc::format;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

/// The weight matrix of a [`Linear`], `[out, in]` row-major.
#[derive(Clone)]
pub enum Weight {
    /// Dense f32 values.
    F32(Vec<f32>),
    /// `float8_e4m3fn` codes (zero-copy from the checkpoint) with f32 block scales
    /// `[ceil(out/block[0]), ceil(in/block[1])]`; `W[i,j] = e4m3(q[i,j]) · scale[i/b0, j/b1]`.
    Fp8 { q: RawTensor, scale: Vec<f32>, block: [usize; 2] },
}

/// A linear layer.
#[derive(Clone)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
    /// Precision of this layer's GEMMs (forward and backward); f32 unless training sets it.
    pub precision: Precision,
    /// FP8: the weight quantized in 128x128 blocks, refreshed by [`Linear::requantize`] after
    /// every optimizer step (DeepSeek-V3 re-quantizes then too).
    pub fp8_weight: Option<Arc<QValues>>,
    /// On a gradient buffer: when `Some`, [`Linear::backward`] leaves `dW += dyᵀ·x` to later and
    /// queues its operands here instead (zero-bubble pipeline schedules run the job in a W op
    /// through [`Linear::weight_grad`]). Bias gradients are still added at once.
    pub deferred: Option<Vec<WgradJob>>,
}

/// A deferred weight-gradient job of a [`Linear`]: its input `x` `[m, in]` and output gradient
/// `dy` `[m, out]`.
#[derive(Clone, Debug, Default)]
pub struct WgradJob {
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
    pub m: usize,
}

/// GEMM precision of a [`Linear`] (the CPU emulates the lower ones exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// Inputs rounded to bf16, f32 accumulation.
    Bf16,
    /// DeepSeek-V3's FP8 recipe: E4M3 with 1x128 activation tiles, 128x128 weight blocks,
    /// 128x1 (along tokens) Wgrad operands, f32 promotion every 128 K.
    Fp8,
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// How FP8 checkpoint weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8Mode {
    /// Keep FP8 codes + scales (about 1 byte per parameter); dequantize per block in the matmul.
    #[default]
    Keep,
    /// Dequantize to f32 at load.
    Dequantize,
}

/// Rows of W dequantized at a time by the FP8 path (a multiple of the block rows).
const FP8_PANEL_ROWS: usize = 128;

impl Linear {
    /// A dense f32 layer.
    pub fn from_f32(out_dim: usize, in_dim: usize, w: Vec<f32>, bias: Option<Vec<f32>>) -> Linear {
        assert_eq!(w.len(), out_dim * in_dim);
        Linear {
            out_dim,
            in_dim,
            weight: Weight::F32(w),
            bias,
            precision: Precision::F32,
            fp8_weight: None,
            deferred: None,
        }
    }

    /// Takes `{prefix}.weight` (and `{prefix}.bias` when `bias`) from the store, shape `[out, in]`.
    /// An FP8 weight needs its sibling `{prefix}.weight_scale_inv`.
    pub fn load(
        store: &mut TensorStore,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        fp8_block: Option<[usize; 2]>,
        mode: Fp8Mode,
    ) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let t = store.take(&wname)?;
        t.expect_shape(&[out_dim, in_dim])?;
        let weight = if t.dtype == DType::F8E4M3 {
            let sname = format!("{prefix}.weight_scale_inv");
            let block = fp8_block.unwrap_or([128, 128]);
            let sshape = [out_dim.div_ceil(block[0]), in_dim.div_ceil(block[1])];
            let st = store
                .take(&sname)
                .map_err(|_| werr(&sname, format!("missing: FP8 weight '{wname}' needs its block scales")))?;
            if st.dtype != DType::F32 && st.dtype != DType::BF16 {
                return Err(werr(&sname, format!("expected F32 scales, found {:?}", st.dtype)));
            }
            st.expect_shape(&sshape)?;
            let scale = st.to_f32()?;
            if let Some(i) = t.bytes().iter().position(|&c| e4m3_is_nan(c)) {
                return Err(werr(&wname, format!("FP8 NaN code at flat index {i}")));
            }
            match mode {
                Fp8Mode::Keep => Weight::Fp8 { q: t, scale, block },
                Fp8Mode::Dequantize => {
                    let mut w = vec![0f32; out_dim * in_dim];
                    dequant_rows(t.bytes(), in_dim, &scale, block, 0, out_dim, &mut w);
                    Weight::F32(w)
                }
            }
        } else {
            Weight::F32(t.to_f32()?)
        };
        let bias = if bias { Some(store.take_f32(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { out_dim, in_dim, weight, bias, precision: Precision::F32, fp8_weight: None, deferred: None })
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        self.out_dim * self.in_dim + self.bias.as_ref().map_or(0, |b| b.len())
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::F32(w) => w.len() * 4,
            Weight::Fp8 { q, scale, .. } => q.bytes().len() + scale.len() * 4,
        }
    }

    /// `y[m, out] = x[m, in] · Wᵀ + b`. Shapes: `x` [m, in_dim], `y` [m, out_dim].
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.forward_strided(x, m, y, self.out_dim);
    }

    /// Like [`Linear::forward`] but `y` rows have stride `ldy` (>= out_dim).
    pub fn forward_strided(&self, x: &[f32], m: usize, y: &mut [f32], ldy: usize) {
        let (n, k) = (self.out_dim, self.in_dim);
        debug_assert!(x.len() >= m * k);
        if self.precision != Precision::F32 && m > 0 {
            let mut out = vec![0f32; m * n];
            self.low_precision_forward(&x[..m * k], m, &mut out);
            for (dst, src) in y.chunks_mut(ldy).zip(out.chunks_exact(n)) {
                dst[..n].copy_from_slice(src);
            }
            self.add_bias(y, m, ldy);
            return;
        }
        match &self.weight {
            Weight::F32(w) => matmul_t(m, n, k, x, k, w, k, y, ldy, false),
            Weight::Fp8 { q, scale, block } => {
                let q = q.bytes();
                let panel = FP8_PANEL_ROWS.next_multiple_of(block[0]).min(n.next_multiple_of(block[0]));
                let mut buf = vec![0f32; panel * k];
                let mut r0 = 0;
                while r0 < n {
                    let r1 = (r0 + panel).min(n);
                    dequant_rows(q, k, scale, *block, r0, r1, &mut buf[..(r1 - r0) * k]);
                    matmul_t(m, r1 - r0, k, x, k, &buf, k, &mut y[r0..], ldy, false);
                    r0 = r1;
                }
            }
        }
        self.add_bias(y, m, ldy);
    }

    fn add_bias(&self, y: &mut [f32], m: usize, ldy: usize) {
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(ldy).take(m) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
    }

    /// Fprop in bf16 or FP8 (`y` `[m, out]`, no bias).
    fn low_precision_forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        match self.precision {
            Precision::Bf16 => matmul_t(m, n, k, &bf16_round(x), k, &bf16_round(&self.dense()), k, y, n, false),
            Precision::Fp8 => {
                // Fprop: x in 1x128 tiles per token, W in 128x128 blocks
                let qx = quantize_values(x, m, k, ScaleLayout::Tile1x128, false);
                let qw = self.fp8_weights();
                let kb = k.div_ceil(128);
                promoted_gemm(
                    (m, n, k),
                    (&qx.vals, k, 1),
                    (&qw.vals, k, 1),
                    |b| Cow::Owned((0..m).map(|i| qx.scales[i * kb + b]).collect()),
                    |b| Cow::Owned((0..n).map(|j| qw.scales[(j / 128) * kb + b]).collect()),
                    y,
                    false,
                );
            }
            Precision::F32 => unreachable!(),
        }
    }

    /// The weight as dense f32 `[out, in]` (dequantized if FP8).
    pub fn dense(&self) -> Vec<f32> {
        match &self.weight {
            Weight::F32(w) => w.clone(),
            Weight::Fp8 { q, scale, block } => {
                let mut w = vec![0f32; self.out_dim * self.in_dim];
                dequant_rows(q.bytes(), self.in_dim, scale, *block, 0, self.out_dim, &mut w);
                w
            }
        }
    }

    /// Backward of [`Linear::forward`] for `x` `[m, in]` and `dy` `[m, out]`: accumulates
    /// `dW += dyᵀ·x` (and `db += Σ dy`) into `grad`, and writes (or adds to) `dx = dy·W`.
    /// When `grad.deferred` is set, `dW` is queued there instead ([`Linear::weight_grad`]).
    pub fn backward(&self, x: &[f32], m: usize, dy: &[f32], grad: &mut Linear, dx: Option<&mut [f32]>, add_dx: bool) {
        let (n, k) = (self.out_dim, self.in_dim);
        if let Some(q) = &mut grad.deferred {
            if m > 0 {
                q.push(WgradJob { x: x[..m * k].to_vec(), dy: dy[..m * n].to_vec(), m });
            }
        } else if let Weight::F32(gw) = &mut grad.weight {
            self.wgrad(x, m, dy, gw);
        }
        if let (Some(gb), true) = (&mut grad.bias, self.bias.is_some()) {
            for row in dy.chunks_exact(n).take(m) {
                for (g, &d) in gb.iter_mut().zip(row) {
                    *g += d;
                }
            }
        }
        if let Some(dx) = dx {
            self.dgrad(m, dy, dx, add_dx);
        }
    }

    /// Runs a deferred weight-gradient job: `dW += dyᵀ·x` into `grad`, in this layer's precision.
    pub fn weight_grad(&self, job: &WgradJob, grad: &mut Linear) {
        if let Weight::F32(gw) = &mut grad.weight {
            self.wgrad(&job.x, job.m, &job.dy, gw);
        }
    }

    /// Wgrad `gw += dyᵀ·x` (`gw` `[out, in]`). bf16: operands rounded to bf16. FP8: both
    /// operands tiled 128x1 along the token axis (DeepSeek-V3's Wgrad), read in place.
    fn wgrad(&self, x: &[f32], m: usize, dy: &[f32], gw: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        if m == 0 {
            return;
        }
        let (x, dy) = (&x[..m * k], &dy[..m * n]);
        match self.precision {
            Precision::F32 => matmul_tn(n, k, m, dy, x, gw, true),
            Precision::Bf16 => matmul_tn(n, k, m, &bf16_round(dy), &bf16_round(x), gw, true),
            Precision::Fp8 => {
                let qdy = quantize_values(dy, m, n, ScaleLayout::Tile128x1, false);
                let qx = quantize_values(x, m, k, ScaleLayout::Tile128x1, false);
                promoted_gemm(
                    (n, k, m),
                    (&qdy.vals, 1, n),
                    (&qx.vals, 1, k),
                    |b| Cow::Borrowed(&qdy.scales[b * n..(b + 1) * n]),
                    |b| Cow::Borrowed(&qx.scales[b * k..(b + 1) * k]),
                    gw,
                    true,
                );
            }
        }
    }

    /// Dgrad `dx = dy·W` (or `+=` with `add_dx`), `dx` `[m, in]`. FP8: dy in 1x128 tiles per
    /// token (activation gradients are never block-quantized) and W in 128x128 blocks (the same
    /// scales serve Wᵀ), read transposed through strides.
    fn dgrad(&self, m: usize, dy: &[f32], dx: &mut [f32], add_dx: bool) {
        let (n, k) = (self.out_dim, self.in_dim);
        match self.precision {
            _ if m == 0 => {}
            Precision::F32 => match &self.weight {
                Weight::F32(w) => matmul_nn(m, k, n, dy, w, dx, add_dx),
                Weight::Fp8 { .. } => matmul_nn(m, k, n, dy, &self.dense(), dx, add_dx),
            },
            Precision::Bf16 => matmul_nn(m, k, n, &bf16_round(&dy[..m * n]), &bf16_round(&self.dense()), dx, add_dx),
            Precision::Fp8 => {
                let qdy = quantize_values(&dy[..m * n], m, n, ScaleLayout::Tile1x128, false);
                let qw = self.fp8_weights();
                let (ob, kb) = (n.div_ceil(128), k.div_ceil(128));
                let sa = |b: usize| Cow::Owned((0..m).map(|i| qdy.scales[i * ob + b]).collect());
                let sb = |b: usize| Cow::Owned((0..k).map(|j| qw.scales[b * kb + j / 128]).collect());
                if add_dx {
                    let mut t = vec![0f32; m * k];
                    promoted_gemm((m, k, n), (&qdy.vals, n, 1), (&qw.vals, 1, k), sa, sb, &mut t, false);
                    dx[..m * k].iter_mut().zip(&t).for_each(|(d, v)| *d += v);
                } else {
                    promoted_gemm((m, k, n), (&qdy.vals, n, 1), (&qw.vals, 1, k), sa, sb, &mut dx[..m * k], false);
                }
            }
        }
    }

    /// The FP8 weight (128x128 blocks): the cached one, or computed now.
    fn fp8_weights(&self) -> Arc<QValues> {
        match &self.fp8_weight {
            Some(c) => c.clone(),
            None => Arc::new(self.quantize_weight()),
        }
    }

    fn quantize_weight(&self) -> QValues {
        quantize_values(&self.dense(), self.out_dim, self.in_dim, ScaleLayout::Block128, false)
    }

    /// Refreshes the cached FP8 weight (FP8 layers; clears the cache otherwise). Call after
    /// every change of the weights.
    pub fn requantize(&mut self) {
        self.fp8_weight = (self.precision == Precision::Fp8).then(|| Arc::new(self.quantize_weight()));
    }

    /// Converts an FP8 weight to f32 in place (training keeps f32 master weights).
    pub fn make_f32(&mut self) {
        if matches!(self.weight, Weight::Fp8 { .. }) {
            self.weight = Weight::F32(self.dense());
        }
    }

    /// Visits the trainable tensors (`{prefix}.weight`, `{prefix}.bias`); FP8 weights are
    /// skipped (call [`Linear::make_f32`] first).
    pub fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut [f32])) {
        if let Weight::F32(w) = &mut self.weight {
            f(&format!("{prefix}.weight"), w);
        }
        if let Some(b) = &mut self.bias {
            f(&format!("{prefix}.bias"), b);
        }
    }
}
