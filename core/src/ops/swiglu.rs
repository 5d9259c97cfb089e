//! SwiGLU: `silu(g) ⊙ u`, with `silu(x) = x · σ(x)`.

/// `silu(x) = x / (1 + e^{-x})`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

/// `out[i] = silu(g[i]) · u[i]` for equal-length slices.
pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == u.len() && u.len() == out.len(),
        "swiglu: shape mismatch"
    );
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = silu(gv) * uv;
    }
}

/// In-place on a fused `[rows, 2I]` buffer whose rows are `gate ‖ up`: writes `silu(gate)·up`
/// into the first `I` values of each row.
pub fn swiglu_fused_rows(gu: &mut [f32], i: usize) {
    assert!(i > 0 && gu.len() % (2 * i) == 0, "swiglu: shape mismatch");
    for row in gu.chunks_exact_mut(2 * i) {
        let (g, u) = row.split_at_mut(i);
        for (gv, &uv) in g.iter_mut().zip(u.iter()) {
            *gv = silu(*gv) * uv;
        }
    }
}
