//! A fast, branch-light `exp` for f32 (softmax, sigmoid, SiLU, cross-entropy): range reduction
//! `x = n·ln2 + r` and a degree-6 polynomial, scaled by `2^n` through the exponent bits.
//! Max relative error ~2e-7 against f64 `exp` (tested); 0 below −87.3, +inf above 88.7.

const LOG2E: f32 = core::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` in f32. Branch-free (the out-of-range cases are selects), so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // compute on x clamped to the finite range (NaN passes through), fix the edges at the end
    let xc = x.clamp(-87.3, 88.7);
    // n = round(x / ln2) with the 1.5·2^23 trick
    let n = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // exp(r) on |r| <= ln2/2
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // n in [-126, 127): 2^n as a normal float; n = 127, 128 (x near 88.7) as 2^(n−1)·2
    let ni = n as i32;
    let hi = (ni >= 127) as i32;
    let y = p * f32::from_bits(((ni - hi + 127) as u32) << 23) * (1 + hi) as f32;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Logistic sigmoid `1 / (1 + e^{-x})`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let got = super::exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(100.0), f32::INFINITY);
    }
}
