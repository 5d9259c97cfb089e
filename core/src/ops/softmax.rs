//! Numerically stable softmax over the last dimension.

crate::ops::avx2_dispatch! {
    /// In-place softmax of one row. Entries equal to −inf get probability 0.
    pub fn softmax_inplace(x: &mut [f32]) {
        let m = max(x);
        if m == f32::NEG_INFINITY {
            x.fill(0.0);
            return;
        }
        x.iter_mut().for_each(|v| *v = super::fastmath::exp(*v - m));
        let inv = 1.0 / sum(x);
        x.iter_mut().for_each(|v| *v *= inv);
    }
}

crate::ops::avx2_dispatch! {
    /// Backward of softmax for one row: `dz = p ⊙ (dp − Σ p·dp)`, written over `dp`.
    pub fn softmax_backward_inplace(p: &[f32], dp: &mut [f32]) {
        let dot = dot(p, dp);
        for (d, &pv) in dp.iter_mut().zip(p) {
            *d = pv * (*d - dot);
        }
    }
}

/// `log(Σ exp(x))`, stable.
pub fn logsumexp(x: &[f32]) -> f32 {
    let mut out = 0f32;
    logsumexp_into(x, &mut out);
    out
}

crate::ops::avx2_dispatch! {
    fn logsumexp_into(x: &[f32], out: &mut f32) {
        let m = max(x);
        if m == f32::NEG_INFINITY {
            *out = m;
            return;
        }
        let mut acc = [0f32; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += super::fastmath::exp(v - m);
            }
        }
        let tail: f32 = it.remainder().iter().map(|&v| super::fastmath::exp(v - m)).sum();
        *out = m + libm::logf(reduce8(acc) + tail);
    }
}

/// Maximum of a row (−inf when empty), 8 lanes at a time.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = it.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Sum of a row in 8 interleaved partial sums.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    reduce8(acc) + it.remainder().iter().sum::<f32>()
}

/// `Σ a·b` in 8 interleaved partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut ia, mut ib) = (a.chunks_exact(8), b.chunks_exact(8));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    reduce8(acc) + ia.remainder().iter().zip(ib.remainder()).map(|(x, y)| x * y).sum::<f32>()
}

#[inline(always)]
fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
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
