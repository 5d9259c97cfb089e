// FP8 E4M3 helpers shared by the FP8 kernels: rounding and encoding exactly as the CPU oracle
// (core/src/fp8/format.rs encode_e4m3_fast: round to nearest even, saturate at ±448, NaN -> 0x7F
// with the input's sign), and the recipe's scale (core/src/fp8/quant.rs: max(amax, 1e-4) / 448,
// optionally rounded up to a power of two, DeepGEMM's ceil_to_ue8m0). Bit tricks instead of
// cvt.rn.satfinite.e4m3x2 so sm_80 (no FP8 conversions) gets the same codes.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint8_t encode_e4m3(float x) {
    uint32_t bits = __float_as_uint(x);
    uint32_t sign = (bits >> 24) & 0x80u;
    float a = __uint_as_float(bits & 0x7fffffffu);
    bool nan = isnan(a);
    if (a > 448.0f) a = 448.0f;
    uint32_t ab = __float_as_uint(a);
    uint32_t normal = ((ab + 0x7ffffu + ((ab >> 20) & 1u)) >> 20) - (120u << 3);
    // subnormal (a < 2^-6): multiples of 2^-9, ties to even via the 2^23 trick (no FMA contraction)
    uint32_t sub = (uint32_t)__fadd_rn(__fadd_rn(__fmul_rn(a, 512.0f), 8388608.0f), -8388608.0f);
    uint32_t code = a < 0.015625f ? sub : normal;
    return nan ? (uint8_t)(sign | 0x7fu) : (uint8_t)(sign | (code & 0xffu));
}

// 2^ceil(log2(s)) for a positive normal s (core::fp8::format::ue8m0; scales are >= 1e-4/448, normal).
__device__ __forceinline__ float ue8m0_scale(float s) {
    uint32_t b = __float_as_uint(s);
    if (isnan(s) || s <= 0.0f || isinf(s) || (b & 0x7fffffu) == 0) return s;
    return __uint_as_float(((b >> 23) + 1u) << 23);
}

__device__ __forceinline__ float fp8_scale(float amax, int pow2) {
    float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    return pow2 ? ue8m0_scale(s) : s;
}
