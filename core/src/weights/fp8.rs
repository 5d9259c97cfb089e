//! FP8 E4M3 (`float8_e4m3fn`: bias 7, max 448, no infinity, NaN = S.1111.111) and block scales.

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

/// Dequantizes rows `[r0, r1)` of an FP8 matrix `q` ([rows, cols] codes) with block scales
/// `scale` ([ceil(rows/br), ceil(cols/bc)]) into `out` ([r1-r0, cols]):
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
    fn partial_blocks() {
        // 3x5 matrix with 2x2 blocks: scales [2, 3]
        let q = [0x38u8; 15];
        let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 15];
        dequant_rows(&q, 5, &s, [2, 2], 0, 3, &mut out);
        assert_eq!(&out[..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&out[10..], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }
}
