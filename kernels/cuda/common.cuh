// Shared helpers for the dsv3 kernels: element types, loads/stores through f32, and the CPU
// oracle's fast exp (core/src/ops/fastmath.rs) so f32-mode results track the CPU closely.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Declares the kernel's dynamic shared memory (the CPU emulator, kernels/emu/include/emu.h, maps
// it to its own buffer).
#ifndef DSV3_EMU
#define DSV3_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Programmatic dependent launch (sm_90+; kernels/src/ops/mod.rs, DSV3_PDL=1): every kernel starts
// with DSV3_PDL(). griddepcontrol.wait blocks until the grids this one depends on have completed
// and their memory is visible (it returns at once for a kernel launched without the programmatic
// attribute), so nothing is read or written before the predecessor is done, exactly as with
// plain stream order; launch_dependents then lets the next kernel's blocks be scheduled (and run
// up to their own wait) while this grid runs: the launch latency and prologue between dependent
// kernels overlap. A no-op for sm_80 and in the CPU emulator. ops::tests checks that every
// kernel's sm_90a PTX waits before its first global memory access.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(DSV3_EMU)
#define DSV3_PDL() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n" ::: "memory")
#else
#define DSV3_PDL() ((void)0)
#endif

// CUDA caps gridDim.y and gridDim.z at 65535 (gridDim.x at 2^31 - 1). Row counts that can pass
// that (tokens, routed rows, heads x sequences) either sit in y capped at 65535 with the kernel
// walking them grid-stride (for (r = blockIdx.y; r < rows; r += gridDim.y); the launchers'
// ops::grid_y), or, for tile counts, spread over y and z, the tile being tile_yz() (ops::split_yz).
__device__ __forceinline__ int tile_yz() { return (int)(blockIdx.y + gridDim.y * blockIdx.z); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

// e^x as core::ops::fastmath::exp computes it (degree-6 polynomial after range reduction).
__device__ __forceinline__ float dsv3_exp(float x) {
    if (isnan(x)) return x;
    if (x < -87.3f) return 0.0f;
    if (x > 88.7f) return __int_as_float(0x7f800000);
    const float LOG2E = 1.44269504088896341f, LN2_HI = 0.69314575f, LN2_LO = 1.4286068e-6f;
    float n = __fsub_rn(__fadd_rn(__fmul_rn(x, LOG2E), 12582912.0f), 12582912.0f);
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f + r * 0.001388889f)))));
    int ni = (int)n;
    if (n >= 127.0f) return p * __int_as_float((ni + 126) << 23) * 2.0f;
    return p * __int_as_float((ni + 127) << 23);
}

__device__ __forceinline__ float dsv3_sigmoid(float x) { return 1.0f / (1.0f + dsv3_exp(-x)); }

// Sum over a warp (all 32 lanes get the result).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    float t = lane < nw ? part[lane] : 0.0f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    float t = lane < nw ? part[lane] : -__int_as_float(0x7f800000);
    return warp_max(t);
}

// E4M3 (float8_e4m3fn) code to f32: exact (every E4M3 value is a bf16 and an f32).
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
    uint32_t s = (b >> 7) & 1, e = (b >> 3) & 0xf, m = b & 7;
    float v;
    if (e == 0xf && m == 7) v = __int_as_float(0x7fc00000);
    else if (e == 0) v = ldexpf((float)m, -9);
    else v = ldexpf((float)(8 + m), (int)e - 10);
    return s ? -v : v;
}

// RoPE / YaRN of one pair (core/src/ops/rope.rs): angle = f32(pos) * inv_freq rounded to f32,
// cos/sin of it in f64 rounded to f32, times the YaRN attention factor; (e, o) -> (re, im).
__device__ __forceinline__ void rope_pair(float e, float o, int pos, float inv_freq, float attn_factor, float& re,
                                          float& im) {
    float a = __fmul_rn((float)pos, inv_freq);
    float c = __fmul_rn((float)cos((double)a), attn_factor);
    float s = __fmul_rn((float)sin((double)a), attn_factor);
    re = __fsub_rn(__fmul_rn(e, c), __fmul_rn(o, s));
    im = __fadd_rn(__fmul_rn(o, c), __fmul_rn(e, s));
}

// 1 / sqrt(mean(x[0..d)^2) + eps) of one row, the whole block summing (every thread must call it):
// RMSNorm's statistic in f32 (core/src/ops/norm.rs), one reduction order for every kernel.
template <typename T>
__device__ __forceinline__ float row_inv_rms(const T* x, int d, float eps) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f32(x[j]);
        s += v * v;
    }
    s = block_sum(s);
    return 1.0f / sqrtf(s / (float)d + eps);
}

// Rotates one head's rope vector v[0..2·half) in place, de-interleaved (pairs (v[2i], v[2i+1]) ->
// (v[i], v[half+i])), one thread per pair: every thread reads its pair before any writes. Every
// thread of the block must call it (it synchronizes); threads >= half only wait.
template <typename T>
__device__ __forceinline__ void rope_head_inplace(T* v, int half, int pos, const float* __restrict__ inv_freq,
                                                  float attn_factor) {
    int i = threadIdx.x;
    float e = 0.0f, o = 0.0f;
    if (i < half) {
        e = to_f32(v[2 * i]);
        o = to_f32(v[2 * i + 1]);
    }
    __syncthreads();
    if (i >= half) return;
    float re, im;
    rope_pair(e, o, pos, inv_freq[i], attn_factor, re, im);
    v[i] = from_f32<T>(re);
    v[half + i] = from_f32<T>(im);
}

