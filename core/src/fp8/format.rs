//! FP8 formats: E4M3 (`float8_e4m3fn`: bias 7, max 448, no infinity, NaN = S.1111.111) and
//! E5M2 (`float8_e5m2`: bias 15, max 57344, infinities, IEEE-style NaNs); encoding rounds to
//! nearest, ties to even, and saturates at the largest finite value (DeepSeek clamps before its
//! casts); power-of-two (UE8M0) scales.

/// Decodes one e4m3fn code to f32 (exact).
pub const fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 0x7) as f32;
    if e == 0xF && (code & 0x7) == 0x7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        // subnormal: m/8 · 2^-6
        m * (1.0 / 512.0)
    } else {
        let mut p = 1.0f32;
        let mut k = e - 7;
        while k > 0 {
            p *= 2.0;
            k -= 1;
        }
        while k < 0 {
            p *= 0.5;
            k += 1;
        }
        (1.0 + m / 8.0) * p
    };
    sign * mag
}

/// All 256 e4m3fn codes decoded (a lookup table).
pub static E4M3_LUT: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// Whether `code` is an e4m3fn NaN.
pub fn e4m3_is_nan(code: u8) -> bool {
    code & 0x7F == 0x7F
}

/// Which FP8 format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    E4M3,
    E5M2,
}

impl Fp8Format {
    /// Largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }
    /// (exponent bias, mantissa bits).
    fn layout(self) -> (i32, u32) {
        match self {
            Fp8Format::E4M3 => (7, 3),
            Fp8Format::E5M2 => (15, 2),
        }
    }
    /// Encodes `x` with round-to-nearest-even and saturation to ±max. NaN encodes as 0x7F with
    /// the input's sign (as torch does).
    pub fn encode(self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return sign | 0x7F;
        }
        let (bias, mbits) = self.layout();
        let a = x.abs().min(self.max());
        let min_normal_exp = 1 - bias; // e.g. -6 for E4M3
                                       // subnormals (and zero): multiples of 2^(min_normal_exp - mbits)
        if a < f32_pow2(min_normal_exp) {
            let t = a * f32_pow2(mbits as i32 - min_normal_exp);
            let q = round_half_even(t) as u32; // up to 2^mbits, which is the smallest normal
            return sign | q as u8;
        }
        let bits = a.to_bits();
        let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
        let man = bits & 0x7F_FFFF;
        let shift = 23 - mbits;
        let mut r = man >> shift;
        let rem = man & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
            if r == 1 << mbits {
                r = 0;
                e += 1;
            }
        }
        let code = (((e + bias) as u32) << mbits) | r;
        sign | code.min(self.max_code() as u32) as u8
    }
    /// The code of the largest finite positive value.
    fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }
    /// Decodes a code (exact).
    pub fn decode(self, code: u8) -> f32 {
        match self {
            Fp8Format::E4M3 => E4M3_LUT[code as usize],
            Fp8Format::E5M2 => e5m2_to_f32(code),
        }
    }
}

/// E4M3 encode, round-to-nearest-even with saturation, branch-free (vectorizes): the same
/// result as `Fp8Format::E4M3.encode` for every input (NaN → 0x7F with the input's sign).
#[inline(always)]
pub fn encode_e4m3_fast(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    let nan = a.is_nan();
    let a = if a > 448.0 { 448.0 } else { a };
    // normal: round the f32 mantissa to 3 bits (ties to even; a carry bumps the exponent), rebias 127 → 7
    let ab = a.to_bits();
    let r = (ab + 0x7_FFFF + ((ab >> 20) & 1)) >> 20;
    let normal = r.wrapping_sub(120 << 3);
    // subnormal (a < 2^-6): multiples of 2^-9, ties to even via the 2^23 trick
    let sub = ((a * 512.0 + 8_388_608.0) - 8_388_608.0) as u32;
    let code = if a < 0.015_625 { sub } else { normal };
    if nan {
        sign | 0x7F
    } else {
        sign | code as u8
    }
}

/// `decode(encode(x))` for E4M3 without the byte in between: `x` rounded to the nearest E4M3
/// value (ties to even), saturated at ±448, as f32; NaN stays NaN. Branch-free.
#[inline(always)]
pub fn round_e4m3(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    let a = if a > 448.0 { 448.0 } else { a };
    let ab = a.to_bits();
    let normal = f32::from_bits((ab + 0x7_FFFF + ((ab >> 20) & 1)) & 0xFFF0_0000);
    let sub = ((a * 512.0 + 8_388_608.0) - 8_388_608.0) * (1.0 / 512.0);
    let r = if a < 0.015_625 { sub } else { normal };
    let r = if x.is_nan() { x } else { r };
    f32::from_bits(r.to_bits() | sign)
}

/// Decodes one e5m2 code to f32 (exact): it is the top byte of an IEEE half.
pub fn e5m2_to_f32(code: u8) -> f32 {
    half::f16::from_bits((code as u16) << 8).to_f32()
}

/// `2^e` as f32 for e in the normal range.
fn f32_pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Round to nearest integer, ties to even (for non-negative `t` below 2^23).
fn round_half_even(t: f32) -> f32 {
    let f = libm::floorf(t);
    let d = t - f;
    if d > 0.5 || (d == 0.5 && libm::fmodf(f, 2.0) == 1.0) {
        f + 1.0
    } else {
        f
    }
}

/// A power-of-two (UE8M0) scale: `2^ceil(log2(s))` for `s > 0` (DeepGEMM's `ceil_to_ue8m0`), so a
/// value scaled by it never exceeds the format's max.
pub fn ue8m0(s: f32) -> f32 {
    if s.is_nan() || s <= 0.0 || !s.is_finite() {
        return s;
    }
    let bits = s.to_bits();
    let e = ((bits >> 23) & 0xFF) as i32 - 127;
    let exact = bits & 0x7F_FFFF == 0;
    if (bits >> 23) & 0xFF == 0 {
        // subnormal input: next power of two up
        return libm::exp2f(libm::ceilf(libm::log2f(s)));
    }
    f32_pow2(if exact { e } else { e + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn known_codes() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert!(e4m3_is_nan(0xFF) && !e4m3_is_nan(0x7E));
        // monotone over the positive codes
        for c in 1..0x7Eu8 {
            assert!(E4M3_LUT[c as usize + 1] > E4M3_LUT[c as usize]);
        }
    }
    #[test]
    fn encode_roundtrips_every_code_and_rounds_ties_to_even() {
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for c in 0..=255u8 {
                let v = f.decode(c);
                if v.is_finite() {
                    let back = f.encode(v);
                    assert!(back == c || (v == 0.0 && (back & 0x7F) == 0), "{f:?} code {c:#x} -> {v} -> {back:#x}");
                }
            }
        }
        let e = Fp8Format::E4M3;
        assert_eq!(e.decode(e.encode(1.0625)), 1.0); // tie between 1.0 and 1.125 → even (1.0)
        assert_eq!(e.decode(e.encode(1.1875)), 1.25); // tie between 1.125 and 1.25 → even (1.25)
        assert_eq!(e.encode(1e9), 0x7E);
        assert_eq!(e.encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(e.encode(460.0), 0x7E);
        assert_eq!(Fp8Format::E5M2.encode(1e9), 0x7B);
        assert_eq!(e.decode(e.encode(2f32.powi(-10))), 0.0); // half the smallest subnormal → even (0)
        assert_eq!(e.decode(e.encode(3.0 * 2f32.powi(-10))), 2f32.powi(-8)); // 1.5 ulps → 2
                                                                             // the branch-free encoder agrees with the reference one
        let mut r = crate::rng::Rng::new(1);
        for i in 0..200_000 {
            let v = match i % 4 {
                0 => r.normal() * 100.0,
                1 => r.normal() * 1e-3,
                2 => f32::from_bits(r.next_u64() as u32),
                _ => (r.below(2000) as f32 - 1000.0) * 2f32.powi(-9) * 0.5,
            };
            let (a, b) = (encode_e4m3_fast(v), e.encode(v));
            assert!(a == b || (v.is_nan() && a & 0x7F == 0x7F && b & 0x7F == 0x7F), "{v:e}: fast {a:#x} vs {b:#x}");
        }
        for i in 0..200_000u32 {
            let v = f32::from_bits(i.wrapping_mul(2_654_435_761));
            let want = e.decode(e.encode(v));
            let got = round_e4m3(v);
            assert!(
                got.to_bits() == want.to_bits() || (v.is_nan() && got.is_nan()) || (got == 0.0 && want == 0.0),
                "{v:e}: {got:e} vs {want:e}"
            );
        }
        assert_eq!(ue8m0(0.3), 0.5);
        assert_eq!(ue8m0(0.25), 0.25);
        assert_eq!(ue8m0(448.0 / 448.0), 1.0);
    }
}
