//! Numerically stable softmax over the last dimension.

/// In-place softmax of one row. Entries equal to −inf get probability 0.
pub fn softmax_inplace(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = super::fastmath::exp(*v - m);
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Backward of softmax for one row: `dz = p ⊙ (dp − Σ p·dp)`, written over `dp`.
pub fn softmax_backward_inplace(p: &[f32], dp: &mut [f32]) {
    let dot: f32 = p.iter().zip(dp.iter()).map(|(a, b)| a * b).sum();
    for (d, &pv) in dp.iter_mut().zip(p) {
        *d = pv * (*d - dot);
    }
}

/// `log(Σ exp(x))`, stable.
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let s: f32 = x.iter().map(|&v| super::fastmath::exp(v - m)).sum();
    m + libm::logf(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_to_one_and_masks() {
        let mut x = [1.0f32, 2.0, f32::NEG_INFINITY, 3.0];
        super::softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
        assert!(x[3] > x[1] && x[1] > x[0]);
    }
}
