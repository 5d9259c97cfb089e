// The new latent's part of mla.cu's mla_prep (RMSNorm of the latent, RoPE of k_pe, the cache
// append), shared with the query GEMM that does it in extra blocks (gemm.cu, gemm_skinny_prep_*),
// so the two give the same bits; and the argument block of that GEMM's prep.
#pragma once
#include "common.cuh"

// row_inv_rms (common.cuh) as a block of 256 threads computes it, bit for bit, on a block of 128
// or 256 threads: thread t sums the elements j ≡ t (mod 256) of each of its 256 / blockDim
// virtual threads, each warp's partial sums go through warp_sum as block_sum's would, and the 8
// warp sums are added in block_sum's order. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ float row_inv_rms256(const T* x, int d, float eps) {
    __shared__ float part[8];
    const int lane = threadIdx.x & 31, per = 256 / blockDim.x;
    __syncthreads();  // part is free (an earlier call's reads are done)
    for (int v = 0; v < per; v++) {
        const int vt = threadIdx.x + v * blockDim.x;
        float s = 0.0f;
        for (int j = vt; j < d; j += 256) {
            float a = to_f32(x[j]);
            s += a * a;
        }
        s = warp_sum(s);
        if (lane == 0) part[vt >> 5] = s;
    }
    __syncthreads();
    float t = lane < 8 ? part[lane] : 0.0f;
    t = warp_sum(t);
    return 1.0f / sqrtf(t / (float)d + eps);
}

// One row's new latent: xr [c + dr] (latent ‖ k_pe, as projected) -> the cache row of its slot
// (`cache_slot`, slot_stride elements) at position p: the latent RMS-normalized with kv_norm,
// k_pe rotated for position p and de-interleaved (pairs (2i, 2i+1) -> (i, half + i)); nothing
// where p is outside the slot (as cache_append). The whole block (128 or 256 threads) calls it.
template <typename T>
__device__ __forceinline__ void mla_prep_kv_row(const T* xr, T* cache_slot, long long slot_stride, int p,
                                                const float* __restrict__ kv_norm, float eps,
                                                const float* __restrict__ inv_freq, float attn_factor, int c, int dr) {
    const int half = dr / 2, w = c + dr;
    if (p < 0 || (long long)(p + 1) * w > slot_stride) return;  // block-uniform
    T* dst = cache_slot + (long long)p * w;
    float inv = row_inv_rms256(xr, c, eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = from_f32<T>(to_f32(xr[j]) * inv * kv_norm[j]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float re, im;
        rope_pair(to_f32(xr[c + 2 * i]), to_f32(xr[c + 2 * i + 1]), p, inv_freq[i], attn_factor, re, im);
        dst[c + i] = from_f32<T>(re);
        dst[c + half + i] = from_f32<T>(im);
    }
}

// What the query GEMM with the prep fused in (gemm_skinny_prep_*) needs besides its GemmArgs
// (mirrored by kernels/src/ops/mla.rs, #[repr(C)]). Its C is q [m, ld_q = ldc]: head h's rope
// part at h·hs_q + q_off (dr values, as projected: pairs adjacent), rotated in the epilogue and
// stored de-interleaved; blocks blockIdx.x >= col_tiles do row blockIdx.y·8 + (blockIdx.x -
// col_tiles)'s latent (ckv rows of stride ld_ckv) into cache[slot[r], pos[r]] (skipped where the
// position is outside the slot, as mla_prep).
struct MlaPrepArgs {
    const void* ckv;
    void* cache;
    const float* kv_norm;
    const int* pos;
    const int* slot;
    const float* inv_freq;
    long long slot_stride;
    float eps, attn_factor;
    int ld_ckv, c, dr, h, hs_q, q_off, col_tiles;
};

// The latent of GEMM row r (a prep block's work); every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void mla_prep_kv_block(const MlaPrepArgs& q, int r, int m) {
    if (r >= m) return;  // block-uniform
    mla_prep_kv_row<T>((const T*)q.ckv + (long long)r * q.ld_ckv, (T*)q.cache + (long long)q.slot[r] * q.slot_stride,
                       q.slot_stride, q.pos[r], q.kv_norm, q.eps, q.inv_freq, q.attn_factor, q.c, q.dr);
}
