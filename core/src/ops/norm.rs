//! RMSNorm: `y = x · rsqrt(mean(x²) + eps) · w`, computed in f32 per row.

crate::ops::avx2_dispatch! {
    /// Normalizes each row of `x` ([rows, d]) into `y` ([rows, d]) with weight `w` ([d]).
    pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        assert!(d > 0 && x.len().is_multiple_of(d) && y.len() == x.len(), "rmsnorm: shape mismatch");
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = xv * r * wv;
            }
        }
    }
}

/// In-place [`rmsnorm`] over rows of `x` ([rows, d]).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rmsnorm: shape mismatch");
    for xr in x.chunks_exact_mut(d) {
        let r = inv_rms(xr, eps);
        for (xv, &wv) in xr.iter_mut().zip(w) {
            *xv = *xv * r * wv;
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)` with an 8-lane f32 sum.
#[inline]
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in it.remainder() {
        s += v * v;
    }
    1.0 / libm::sqrtf(s / x.len() as f32 + eps)
}

crate::ops::avx2_dispatch! {
    /// Backward of [`rmsnorm`] for rows of `x` ([rows, d]): writes `dx` and accumulates `dw`.
    /// With `r = (mean(x²)+eps)^-½`: `dx = r·(w⊙dy) − x·r³/d·Σ(w⊙dy⊙x)`, `dw += Σ_rows dy⊙x·r`.
    pub fn rmsnorm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
        let d = w.len();
        assert!(x.len() == dy.len() && dx.len() == x.len() && dw.len() == d, "rmsnorm_backward: shape mismatch");
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            // Σ w·dy·x in 8 interleaved partial sums
            let mut acc = [0f32; 8];
            let (mut iw, mut idy, mut ix) = (w.chunks_exact(8), dyr.chunks_exact(8), xr.chunks_exact(8));
            for ((cw, cdy), cx) in (&mut iw).zip(&mut idy).zip(&mut ix) {
                for (((a, &wv), &dv), &xv) in acc.iter_mut().zip(cw).zip(cdy).zip(cx) {
                    *a += wv * dv * xv;
                }
            }
            let mut dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for ((&wv, &dv), &xv) in iw.remainder().iter().zip(idy.remainder()).zip(ix.remainder()) {
                dot += wv * dv * xv;
            }
            for ((g, &dv), &xv) in dw.iter_mut().zip(dyr).zip(xr) {
                *g += dv * xv * r;
            }
            let c = r * r * r * dot / d as f32;
            for (((o, &wv), &dv), &xv) in dxr.iter_mut().zip(w).zip(dyr).zip(xr) {
                *o = r * wv * dv - c * xv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_rms_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0];
        let w = [1.0f32, 2.0, 0.5];
        let mut y = [0f32; 6];
        super::rmsnorm(&x, &w, 0.0, &mut y);
        let r = 1.0 / (25.0f32 / 3.0).sqrt();
        assert!((y[0] - 3.0 * r).abs() < 1e-6 && (y[1] - 8.0 * r).abs() < 1e-6);
        let r2 = 1.0 / (2.0f32 / 3.0).sqrt();
        assert!((y[4] - 2.0 * r2).abs() < 1e-6 && (y[5] - 0.5 * r2).abs() < 1e-6);
    }
}
