//! SwiGLU: `silu(g) ⊙ u`, with `silu(x) = x · σ(x)`.

/// `silu(x) = x / (1 + e^{-x})`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

/// `out[i] = silu(g[i]) · u[i]` for equal-length slices.
pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && u.len() == out.len(), "swiglu: shape mismatch");
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = silu(gv) * uv;
    }
}
