// GEMMs C = A · Wᵀ (see gemm.cuh for the argument block, batching and grouping):
// - gemm_f32: SIMT f32 (the f32 mode that matches the CPU oracle), 64x64 tiles, 4x4 per thread.
// - gemm_bf16_*: bf16 tensor cores (WMMA 16x16x16, f32 accumulate), 64x64x32 tiles, 4 warps.
// - gemm_fp8_*: the same with E4M3 weights dequantized in shared memory (exact in bf16) and
//   DeepSeek's per-128-K-block promotion: the block's f32 partial sum times its weight scale.
// Output bf16 or f32; optional bias [n] (f32) and accumulate (C += result).
#include "common.cuh"
#include "gemm.cuh"
#include <mma.h>
using namespace nvcuda;

template <typename TC>
__device__ __forceinline__ void gemm_store(const GemmArgs& p, TC* c, int row, int col, float v) {
    if (p.bias) v += p.bias[col];
    TC* dst = c + (long long)row * p.ldc + col;
    if (p.accumulate) v = to_f32(*dst) + v;
    *dst = from_f32<TC>(v);
}

// ---- f32 SIMT: block 256 threads = 16x16, each thread 4 rows x 4 cols; BK = 16.
extern "C" __global__ void __launch_bounds__(256) gemm_f32(GemmArgs p) {
    int row0, row_end, g;
    if (!gemm_tile_rows(p, row0, row_end, g)) return;
    long long b = blockIdx.z;
    const float* A = (const float*)p.a + (p.row_offsets ? 0 : b * p.stride_a);
    const float* W = (const float*)p.w + (p.row_offsets ? (long long)g * p.stride_w : b * p.stride_w);
    float* C = (float*)p.c + (p.row_offsets ? 0 : b * p.stride_c);
    int col0 = blockIdx.x * GEMM_BN;
    __shared__ float As[16][GEMM_BM + 4];
    __shared__ float Ws[16][GEMM_BN + 4];
    int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += 16) {
        for (int i = threadIdx.x; i < GEMM_BM * 16; i += 256) {
            int r = i >> 4, kk = i & 15;
            int gr = row0 + r, gk = k0 + kk;
            As[kk][r] = (gr < row_end && gk < p.k) ? A[(long long)gr * p.lda + gk] : 0.0f;
            int gc = col0 + r;
            Ws[kk][r] = (gc < p.n && gk < p.k) ? W[(long long)gc * p.ldw + gk] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; kk++) {
            float a[4], w[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) w[j] = Ws[kk][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * w[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        int r = row0 + ty * 4 + i;
        if (r >= row_end) continue;
        for (int j = 0; j < 4; j++) {
            int c = col0 + tx * 4 + j;
            if (c < p.n) gemm_store<float>(p, C, r, c, acc[i][j]);
        }
    }
}

// ---- bf16 / fp8 weights on tensor cores. 128 threads = 4 warps in 2x2, each warp 32x32 =
// 2x2 WMMA fragments; BK = 32; operands staged in shared memory as bf16 (zero-padded edges).
#define TBK 32
#define TLD (TBK + 8)

template <bool FP8, typename TC>
__device__ void gemm_tc(const GemmArgs& p) {
    int row0, row_end, g;
    if (!gemm_tile_rows(p, row0, row_end, g)) return;
    long long b = blockIdx.z;
    const bf16* A = (const bf16*)p.a + (p.row_offsets ? 0 : b * p.stride_a);
    long long woff = p.row_offsets ? (long long)g * p.stride_w : b * p.stride_w;
    long long soff = p.row_offsets ? (long long)g * p.stride_scale : b * p.stride_scale;
    TC* C = (TC*)p.c + (p.row_offsets ? 0 : b * p.stride_c);
    int col0 = blockIdx.x * GEMM_BN;
    __shared__ __align__(32) bf16 As[GEMM_BM][TLD];
    __shared__ __align__(32) bf16 Ws[GEMM_BN][TLD];
    __shared__ __align__(32) float Cs[GEMM_BM][GEMM_BN + 4];
    int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], part[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            wmma::fill_fragment(acc[i][j], 0.0f);
            wmma::fill_fragment(part[i][j], 0.0f);
        }
    for (int k0 = 0; k0 < p.k; k0 += TBK) {
        for (int i = threadIdx.x; i < GEMM_BM * TBK; i += 128) {
            int r = i / TBK, kk = i % TBK;
            int gr = row0 + r, gk = k0 + kk;
            As[r][kk] = (gr < row_end && gk < p.k) ? A[(long long)gr * p.lda + gk] : __float2bfloat16_rn(0.0f);
            int gc = col0 + r;
            bf16 wv = __float2bfloat16_rn(0.0f);
            if (gc < p.n && gk < p.k) {
                long long at = woff + (long long)gc * p.ldw + gk;
                if (FP8) wv = __float2bfloat16_rn(e4m3_to_f32(((const uint8_t*)p.w)[at]));
                else wv = ((const bf16*)p.w)[at];
            }
            Ws[r][kk] = wv;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &As[wm * 32 + i * 16][kk], TLD);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &Ws[wn * 32 + j * 16][kk], TLD);
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) {
                    if (FP8) wmma::mma_sync(part[i][j], fa[i], fb[j], part[i][j]);
                    else wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
                }
        }
        __syncthreads();
        // FP8: promote at the end of every 128-wide K block (and at the end of K)
        if (FP8 && ((k0 + TBK) % 128 == 0 || k0 + TBK >= p.k)) {
            float s = p.scale[soff + (long long)(col0 / 128) * p.scale_ld + k0 / 128];
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) {
                    for (int e = 0; e < acc[i][j].num_elements; e++) acc[i][j].x[e] += s * part[i][j].x[e];
                    wmma::fill_fragment(part[i][j], 0.0f);
                }
        }
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], GEMM_BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < GEMM_BM * GEMM_BN; i += 128) {
        int r = i / GEMM_BN, c = i % GEMM_BN;
        int gr = row0 + r, gc = col0 + c;
        if (gr < row_end && gc < p.n) gemm_store<TC>(p, C, gr, gc, Cs[r][c]);
    }
}

extern "C" __global__ void __launch_bounds__(128) gemm_bf16_bf16(GemmArgs p) { gemm_tc<false, bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) gemm_bf16_f32(GemmArgs p) { gemm_tc<false, float>(p); }
extern "C" __global__ void __launch_bounds__(128) gemm_fp8_bf16(GemmArgs p) { gemm_tc<true, bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) gemm_fp8_f32(GemmArgs p) { gemm_tc<true, float>(p); }
