//! SwiGLU: `silu(g) ⊙ u`, with `silu(x) = x · σ(x)`.

/// `silu(x) = x / (1 + e^{-x})`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x * super::fastmath::sigmoid(x)
}

crate::ops::avx2_dispatch! {
    /// `out[i] = silu(g[i]) · u[i]` for equal-length slices.
    pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
        assert!(g.len() == u.len() && u.len() == out.len(), "swiglu: shape mismatch");
        for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
            *o = silu(gv) * uv;
        }
    }
}

crate::ops::avx2_dispatch! {
    /// Backward of [`swiglu`]: `dg = da·u·silu'(g)`, `du = da·silu(g)`, with
    /// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
    pub fn swiglu_backward(g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = g.len();
        assert!(u.len() == n && da.len() == n && dg.len() == n && du.len() == n, "swiglu_backward: shape mismatch");
        for ((((&g, &u), &da), dg), du) in g.iter().zip(u).zip(da).zip(dg.iter_mut()).zip(du.iter_mut()) {
            let s = super::fastmath::sigmoid(g);
            *dg = da * u * s * (1.0 + g * (1.0 - s));
            *du = da * g * s;
        }
    }
}
