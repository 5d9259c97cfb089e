// GEMMs C = A · Wᵀ (see gemm.cuh for the argument block, batching and grouping):
// - gemm_f32: SIMT f32 (the f32 mode that matches the CPU oracle), 64x64 tiles, 4x4 per thread.
// - gemm_mma_*: bf16 tensor cores (mma.sync m16n8k16, f32 accumulate), cp.async pipeline,
//   ldmatrix from swizzled shared memory; the NT (A·Wᵀ), NN (A·B) and TN (Aᵀ·B) layouts.
// - gemm_fp8_*: FP8 E4M3 weights dequantized in shared memory (exact in bf16), WMMA 16x16x16, and
//   DeepSeek's per-128-K-block promotion: the block's f32 partial sum times its weight scale.
// - gemm_skinny*: few rows (decode), memory-bound on W.
// Output bf16 or f32; optional bias [n] (f32) and accumulate (C += result).
#include "common.cuh"
#include "gemm.cuh"
#include "mma.cuh"
#include "moe_combine.cuh"
#include "mla_prep.cuh"
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
    DSV3_PDL();
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

// ---- FP8 weights on tensor cores (WMMA). 128 threads = 4 warps in 2x2, each warp 32x32 =
// 2x2 WMMA fragments; BK = 32; operands staged in shared memory as bf16 (zero-padded edges).
// (FP8 = false, plain bf16, is no longer instantiated: gemm_mma_* below replaced it.)
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

extern "C" __global__ void __launch_bounds__(128) gemm_fp8_bf16(GemmArgs p) { DSV3_PDL(); gemm_tc<true, bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) gemm_fp8_f32(GemmArgs p) { DSV3_PDL(); gemm_tc<true, float>(p); }

// ---- bf16 on tensor cores: mma.sync.m16n8k16 (f32 accumulate), 256 threads = 8 warps in
// WGM x WGN, a BM x BN block tile (128x256, 128x128 or 64x128), warp tiles of (BM/WGM) x (BN/WGN) = MT m16 x NT n8 fragments.
// K advances in GBK = 32 slices through a GM_STAGES-deep cp.async ring (one __syncthreads per
// slice: the wait for slice kt, then the load of slice kt + STAGES - 1 into the stage slice kt - 1
// used, which every warp has finished at that barrier).
//
// Operands in shared memory, per stage, as stored in global memory:
//   K-major (A of NT/NN, B of NT: rows of the m or n index, K contiguous): [R][32] bf16, 64-byte
//     rows of four 16-byte chunks; chunk c of row r sits at c ^ ((r >> 1) & 3), so the 8 row
//     addresses of an ldmatrix phase (8 consecutive rows, one logical chunk) cover all 32 banks.
//     Fragments by ldmatrix (non-transposed): A as [m][k] row-major, B as [n][k] = the .col
//     operand.
//   MN-major (A of TN stored [k][m], B of NN/TN stored [k][n]): [32][R], rows of R = 64 or 128
//     elements; chunk c of row k at c ^ (k & 7) within each 8 chunks (128 bytes). Fragments by
//     ldmatrix.trans (an 8x8 block stored k-major read as its transpose).
// Global -> shared by cp.async.cg 16 bytes (flags & GEMM_VEC: the launcher checked the 16-byte
// alignment of every row and chunk), zero-filled past the edges (src-size 0, no read); otherwise
// element by element (any alignment, any K), stored to the same swizzled places.
// The epilogue writes straight from the accumulators: (row, 2 adjacent columns) per register pair,
// as one 4- or 8-byte store where aligned; bias, accumulate and bf16/f32 C as gemm_store.
// Rows: plain and batched (blockIdx.y = BM-row tile, blockIdx.z = batch), grouped by rows for NT
// and NN (BM == GEMM_BM: moe_plan's tiles), grouped by K for TN (blockIdx.z = group).
#define GBK 32
#define GM_STAGES 4
#define GM_THREADS 256
#define GM_BAND 8

DSV3_DYNAMIC_SMEM(gemm_smem);

// One operand slice [k0, k0 + GBK) into stage memory s. KMAJ: X[r][k] (r < rlim, k < kend; row
// stride ld) into [R][GBK]; otherwise X[k][r] into [GBK][R].
template <bool KMAJ, int R>
__device__ __forceinline__ void gm_load(bf16* s, const bf16* X, long long ld, int r0, int rlim, int k0, int kend,
                                        bool vec) {
    constexpr int CH = R * GBK / 8;  // 16-byte chunks
    static_assert(CH % GM_THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < CH / GM_THREADS; it++) {
        const int i = threadIdx.x + it * GM_THREADS;
        int r, kk, soff;
        if (KMAJ) {
            r = i / (GBK / 8);
            const int c = i % (GBK / 8);
            kk = c * 8;
            soff = r * GBK + ((c ^ ((r >> 1) & 3)) << 3);
        } else {
            kk = i / (R / 8);
            const int c = i % (R / 8);
            r = c * 8;
            soff = kk * R + ((c ^ (kk & 7)) << 3);
        }
        const int gr = r0 + r, gk = k0 + kk;
        bf16* dst = s + soff;
        if (vec) {
            const bool ok = gr < rlim && gk < kend;
            const bf16* src = ok ? X + (KMAJ ? gr * ld + gk : gk * ld + gr) : X;
            cp_async16(smem_u32(dst), src, ok ? 16 : 0);
        } else {
            const unsigned short* Xs = (const unsigned short*)X;
            unsigned long long lo = 0, hi = 0;  // the 8 values, shifted in from the top
#pragma unroll 1
            for (int e = 0; e < 8; e++) {
                const int er = KMAJ ? gr : gr + e, ek = KMAJ ? gk + e : gk;
                const unsigned long long v = er < rlim && ek < kend ? Xs[KMAJ ? er * ld + ek : ek * ld + er] : 0u;
                lo = (lo >> 16) | (hi << 48);
                hi = (hi >> 16) | (v << 48);
            }
            uint4 u;
            u.x = (uint32_t)lo, u.y = (uint32_t)(lo >> 32), u.z = (uint32_t)hi, u.w = (uint32_t)(hi >> 32);
            *(uint4*)dst = u;
        }
    }
}

// C[row, c .. c+8) = v (+ bias) (+ C) for the columns below n; dst = &C[row, c]. One 16-byte
// (bf16) or two (f32) stores when all 8 columns exist and dst is 16-byte aligned.
template <typename TC>
__device__ __forceinline__ void gm_store8(const GemmArgs& p, TC* dst, int c, float4 x0, float4 x1) {
    float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
    const int nc = min(8, p.n - c);
    if (nc == 8 && ((size_t)dst & 15) == 0) {
        if (p.bias) {
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] += p.bias[c + e];
        }
        if constexpr (sizeof(TC) == 4) {
            float4* d = (float4*)dst;
            if (p.accumulate) {
                const float4 o0 = d[0], o1 = d[1];
                v[0] = o0.x + v[0], v[1] = o0.y + v[1], v[2] = o0.z + v[2], v[3] = o0.w + v[3];
                v[4] = o1.x + v[4], v[5] = o1.y + v[5], v[6] = o1.z + v[6], v[7] = o1.w + v[7];
            }
            float4 y0, y1;
            y0.x = v[0], y0.y = v[1], y0.z = v[2], y0.w = v[3];
            y1.x = v[4], y1.y = v[5], y1.z = v[6], y1.w = v[7];
            d[0] = y0;
            d[1] = y1;
        } else {
            uint4* d = (uint4*)dst;
            uint4 u;
            uint32_t* w = (uint32_t*)&u;
            if (p.accumulate) {
                const uint4 o = *d;
                const __nv_bfloat162* h = (const __nv_bfloat162*)&o;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 f = __bfloat1622float2(h[e]);
                    v[2 * e] = f.x + v[2 * e];
                    v[2 * e + 1] = f.y + v[2 * e + 1];
                }
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                __nv_bfloat162 b = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
                w[e] = *(uint32_t*)&b;
            }
            *d = u;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            if (e < nc) {
                float x = v[e];
                if (p.bias) x += p.bias[c + e];
                if (p.accumulate) x = to_f32(dst[e]) + x;
                dst[e] = from_f32<TC>(x);
            }
        }
    }
}

// AK: A is K-major ([m][k]; else [k][m], TN). BK_: B is K-major ([n][k], NT; else [k][n]).
template <int BM, int BN, int WGM, int WGN, bool AK, bool BK_>
__device__ __forceinline__ void gemm_mma(const GemmArgs& p) {
    constexpr int WTM = BM / WGM, WTN = BN / WGN;  // warp tile
    constexpr int MT = WTM / 16, NT = WTN / 8;     // m16 and n8 fragments per warp
    constexpr int A_ST = BM * GBK, B_ST = BN * GBK;  // elements per stage
    static_assert(WGM * WGN * 32 == GM_THREADS && MT >= 1 && NT % 2 == 0, "8 warps, pairs of n8 tiles");
    // rows, K range and operand bases of this block
    int g = 0, row0, row_end, kbeg = 0, kend = p.k, bx = blockIdx.x;
    long long ba = blockIdx.z, bb = blockIdx.z, bc = blockIdx.z;  // batch index of A, B, C
    if (p.row_offsets && AK) {  // NT / NN grouped by rows (tiles of GEMM_BM rows)
        if (BM != GEMM_BM || !gemm_tile_rows(p, row0, row_end, g)) return;
        ba = bc = 0;
        bb = g;
    } else {
        // tile order: bands of GM_BAND row tiles, walked column by column, so the blocks running
        // at once share fewer A and B tiles (L2 reuse); the grid is (ceil(n / BN), ceil(m / BM))
        const int gx = (p.n + BN - 1) / BN, gy = (p.m + BM - 1) / BM;
        const int id = blockIdx.y * gx + blockIdx.x, band = id / (GM_BAND * gx);
        const int in = id - band * GM_BAND * gx, h = min(GM_BAND, gy - band * GM_BAND);
        bx = in / h;
        row0 = (band * GM_BAND + in % h) * BM;
        row_end = p.m;
        if (p.row_offsets) {  // TN grouped by K rows
            g = blockIdx.z;
            if (g >= p.groups) return;
            kbeg = p.row_offsets[g];
            kend = p.row_offsets[g + 1];
            ba = bb = 0;
            bc = g;
        }
        if (row0 >= row_end) return;
    }
    const int col0 = bx * BN;
    const bf16* A = (const bf16*)p.a + ba * p.stride_a;
    const bf16* B = (const bf16*)p.w + bb * p.stride_w;
    const long long c_off = bc * p.stride_c;  // elements
    const bool vec = p.flags & GEMM_VEC;

    bf16* sA = (bf16*)gemm_smem;
    bf16* sB = sA + GM_STAGES * A_ST;
    const int ktiles = kend > kbeg ? (kend - kbeg + GBK - 1) / GBK : 0;
    auto load = [&](int kt) {
        const int st = kt % GM_STAGES, k0 = kbeg + kt * GBK;
        gm_load<AK, BM>(sA + st * A_ST, A, p.lda, row0, row_end, k0, kend, vec);
        gm_load<BK_, BN>(sB + st * B_ST, B, p.ldw, col0, p.n, k0, kend, vec);
    };
#pragma unroll 1
    for (int s = 0; s < GM_STAGES - 1; s++) {
        if (s < ktiles) load(s);
        cp_async_commit();
    }

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = (warp / WGN) * WTM, wn0 = (warp % WGN) * WTN;
    const int l8 = lane & 7, j4 = lane >> 3;  // row within an 8x8 matrix, which of the 4 matrices
    // ldmatrix element offsets within a stage of this lane's row address: A fragment i (m16 x k16)
    // and B fragment pair jp (two n8 x k16) at k16 step ks. Every row an ldmatrix phase reads has
    // r % 8 == lane % 8, so the K-major swizzle term is per lane, and +16 rows keep it; in the
    // MN-major tiles the XOR acts on the column bits 3-5, so it is applied per fragment.
    // A K-major (x4: lanes 0-15 rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15 = the
    // fragment's a0..a3); MN-major (.trans: matrix j4 = k half j4 >> 1, m half j4 & 1).
    // B K-major (x4: matrix j4 = n half j4 >> 1, k half j4 & 1 = b0, b1 of n8 tile 0, then of
    // tile 1); MN-major (.trans) in the same order.
    auto a_off = [&](int ks, int i) {
        if (AK) {
            const int r = wm0 + (lane & 15);
            return (r + i * 16) * GBK + (((ks * 2 + (lane >> 4)) ^ ((r >> 1) & 3)) << 3);
        }
        const int k = ks * 16 + l8 + (j4 >> 1) * 8;
        return k * BM + ((wm0 + i * 16 + (j4 & 1) * 8) ^ (l8 << 3));
    };
    auto b_off = [&](int ks, int jp) {
        if (BK_) {
            const int n = wn0 + l8 + (j4 >> 1) * 8;
            return (n + jp * 16) * GBK + (((ks * 2 + (j4 & 1)) ^ ((n >> 1) & 3)) << 3);
        }
        const int k = ks * 16 + l8 + (j4 & 1) * 8;
        return k * BN + ((wn0 + jp * 16 + (j4 >> 1) * 8) ^ (l8 << 3));
    };
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    const uint32_t sA0 = smem_u32(sA), sB0 = smem_u32(sB);
    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<GM_STAGES - 2>();
        __syncthreads();
        if (kt + GM_STAGES - 1 < ktiles) load(kt + GM_STAGES - 1);
        cp_async_commit();
        const int st = kt % GM_STAGES;
        const uint32_t as = sA0 + st * A_ST * 2, bs = sB0 + st * B_ST * 2;
#pragma unroll
        for (int ks = 0; ks < GBK / 16; ks++) {
            uint32_t af[MT][4], bfr[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                if (AK) ldsm_x4(as + a_off(ks, i) * 2, af[i]);
                else ldsm_x4_t(as + a_off(ks, i) * 2, af[i]);
            }
#pragma unroll
            for (int jp = 0; jp < NT / 2; jp++) {
                uint32_t r[4];
                if (BK_) ldsm_x4(bs + b_off(ks, jp) * 2, r);
                else ldsm_x4_t(bs + b_off(ks, jp) * 2, r);
                bfr[2 * jp][0] = r[0];
                bfr[2 * jp][1] = r[1];
                bfr[2 * jp + 1][0] = r[2];
                bfr[2 * jp + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++) mma_bf16_16816(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
        }
    }

    // epilogue: the accumulators through shared memory (f32 rows of BN + 8: the float2 stores of
    // each half-warp cover all 32 banks), then C in 8-column pieces (16- or 32-byte stores)
    cp_async_wait<0>();  // only empty groups are left; every stage has been read
    __syncthreads();
    constexpr int LDS = BN + 8;
    float* sC = (float*)gemm_smem;
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) {
            float* d = sC + (wm0 + i * 16 + gq) * LDS + wn0 + j * 8 + 2 * tq;
            *(float2*)d = make_float2(acc[i][j][0], acc[i][j][1]);
            *(float2*)(d + 8 * LDS) = make_float2(acc[i][j][2], acc[i][j][3]);
        }
    __syncthreads();
    const int rows = min(BM, row_end - row0);
#pragma unroll 1
    for (int i = threadIdx.x; i < rows * (BN / 8); i += GM_THREADS) {
        const int r = i / (BN / 8), c = (i % (BN / 8)) * 8, gc = col0 + c;
        if (gc >= p.n) continue;
        const float4 x0 = *(const float4*)(sC + r * LDS + c), x1 = *(const float4*)(sC + r * LDS + c + 4);
        const long long at = c_off + (long long)(row0 + r) * p.ldc + gc;
        if (p.flags & GEMM_F32C) gm_store8<float>(p, (float*)p.c + at, gc, x0, x1);
        else gm_store8<bf16>(p, (bf16*)p.c + at, gc, x0, x1);
    }
}

// Shared memory per block (bytes): the larger of the stages, GM_STAGES x (BM + BN) x GBK x 2, and
// the epilogue's BM x (BN + 8) x 4 (mirrored in ops/gemm.rs: Tile::smem).
// C is bf16, or f32 with flags & GEMM_F32C (one kernel for both: only the epilogue differs).
#define GEMM_MMA(name, BM, BN, WGM, WGN, AK, BK_, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(GM_THREADS, MINB) gemm_mma_##name(GemmArgs p) {      \
        DSV3_PDL(); gemm_mma<BM, BN, WGM, WGN, AK, BK_>(p);                                           \
    }
// w: 128x256 (warp tiles 64x64: 8 ldmatrix per 32 mma, the least shared-memory and L2 traffic
// per FLOP; one block per SM) for large problems; l: 128x128 (64x32, two blocks per SM); s: 64x128
// (32x32) for small problems and for grouped rows (GEMM_BM == 64 is moe_plan's tile).
GEMM_MMA(nt_w, 128, 256, 2, 4, true, true, 1)
GEMM_MMA(nt_l, 128, 128, 2, 4, true, true, 2)
GEMM_MMA(nt_s, 64, 128, 2, 4, true, true, 2)
GEMM_MMA(nn_w, 128, 256, 2, 4, true, false, 1)
GEMM_MMA(nn_l, 128, 128, 2, 4, true, false, 2)
GEMM_MMA(nn_s, 64, 128, 2, 4, true, false, 2)
GEMM_MMA(tn_w, 128, 256, 2, 4, false, false, 1)
GEMM_MMA(tn_l, 128, 128, 2, 4, false, false, 2)
GEMM_MMA(tn_s, 64, 128, 2, 4, false, false, 2)

// ---- Skinny GEMMs (few rows: decode steps, small expert groups), memory-bound on W. One warp
// owns SK_COLS = 4 output columns; its lanes stride along K in chunks of 8 (16-byte loads of bf16
// W, 8-byte of FP8 codes, 2x16 of f32), each lane keeping SK_ROWS x SK_COLS = 32 partial sums for
// a tile of SK_ROWS = 8 rows; a transposing butterfly (31 shuffles) leaves lane l with the full
// sum of (row l % 8, column l / 8). Each block takes one 8-row tile, so W is read (from L2 after
// the first) once per tile. A rows are read straight from global memory (small, shared by all
// warps through L1).
// Needs K, lda, ldw and the batch/group strides to be multiples of 8 and 16-byte aligned bases
// (the launcher checks). Batched (blockIdx.z) and grouped (blockIdx.y = group: rows
// [row_offsets[g], row_offsets[g+1])) as the tiled kernels. FP8 weights: each 8-wide chunk lies
// in one 128-wide K block, so its partial product is scaled by that block's scale before it is
// added (DeepSeek's promotion, at a finer grain). grid: (ceil(n / (4 · SK_COLS)), ceil(m / 8),
// batch), grouped (ceil(n / 16), groups, ceil(most rows of a group / 8)); block: 128.
//
// Fused forms (gemm.cuh): a_rows (A row r read from row a_rows[r]: the MoE dispatch gather
// folded in), norm_w (RMSNorm of the A rows folded in: every warp streams whole A rows anyway,
// so each lane also sums x² of its chunks, multiplies norm_w into x as it loads, and the row's
// 1/rms scales the finished sum), and SwiGLU (SWIGLU: W is gate|up [2n, k]; a warp's 32 sums are
// ROWS rows x COLS/2 columns x {gate, up}, the gate of (r, j) ending in lane l < 16 and its up in
// lane l + 16, one more shuffle pairs them: C[r, j] = silu(g) · u as elementwise.cu's swiglu,
// with g and u first rounded to C's type as the unfused GEMM would store them). The SwiGLU forms
// have 2 (8-row) or 16 (1-row) output columns per warp, so the same grid.x as the plain GEMM
// over the 2n weight rows: ceil(n / 8), ceil(n / 64).
#define SK_WARPS 4

__device__ __forceinline__ void sk_load8(const float* p, float* v) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void sk_load8(const bf16* p, float* v) {
    uint4 u = *(const uint4*)p;
    const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
// E4M3 code to f32 without branches (the same values as e4m3_to_f32): the 7 bits below the sign
// placed at f32 bit 20 read as 2^(e-127)·(1 + m/8) (e > 0) or m·2^-129 (e == 0); times 2^120
// that is exactly 2^(e-7)·(1 + m/8) or m·2^-9. 0x7f is NaN.
__device__ __forceinline__ float sk_e4m3(uint32_t b) {
    uint32_t em = b & 0x7fu;
    float v = __uint_as_float(em << 20) * 1.329227995784916e36f;  // 2^120
    v = em == 0x7fu ? __int_as_float(0x7fc00000) : v;
    return (b & 0x80u) ? -v : v;
}
__device__ __forceinline__ void sk_load8(const uint8_t* p, float* v) {
    uint2 u = *(const uint2*)p;
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = sk_e4m3(((i < 4 ? u.x : u.y) >> (8 * (i & 3))) & 0xffu);
}

// The A row read for C row `row`: itself, or a_rows[row] (an index out of range reads row 0).
__device__ __forceinline__ int sk_arow(const GemmArgs& p, int row) {
    if (!p.a_rows) return row;
    int s = p.a_rows[row];
    return (unsigned)s < (unsigned)p.a_rows_m ? s : 0;
}

// Transposing butterfly over v[0 .. 2S): after the step of width s, v[i] (i < s) holds index
// i + (the bits of lane at s and above, up to S) summed over the lanes that differ only in those
// bits; after the step of width 1, v[0] of lane l is the sum of index l % 2S over them. One
// instantiation per step, so every index is a constant and v stays in registers.
template <int S>
__device__ __forceinline__ void sk_butterfly(float* v, int lane) {
    bool upper = lane & S;
#pragma unroll
    for (int i = 0; i < S; i++) {
        float lo = v[i], hi = v[i + S];
        float send = upper ? lo : hi;
        float keep = upper ? hi : lo;
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, S);
    }
    if constexpr (S > 1) sk_butterfly<S / 2>(v, lane);
}

// ROPE (gemm_skinny_prep_*: C = q, `rope` its MlaPrepArgs): the heads' rope columns are rotated
// in the epilogue (a pair's two columns are lanes l and l ^ 8 of one warp) and stored
// de-interleaved, as mla_prep's rope_head_inplace would leave them.
template <typename TA, typename TW, typename TC, int ROWS, bool SWIGLU, bool NORM, bool ROPE = false>
__device__ __forceinline__ void gemm_skinny_impl(const GemmArgs& p, const MlaPrepArgs* rope = nullptr) {
    constexpr bool FP8 = sizeof(TW) == 1;
    constexpr int COLS = 32 / ROWS;  // ROWS x COLS = 32 sums per lane, one per lane after the butterfly
    constexpr int OC = SWIGLU ? COLS / 2 : COLS;  // output columns per warp
    // this block's tile of ROWS rows
    int g = 0, r0, row_end;
    long long b = 0;
    if (p.row_offsets) {
        g = blockIdx.y;
        if (g >= p.groups) return;
        r0 = p.row_offsets[g] + blockIdx.z * ROWS;
        row_end = p.row_offsets[g + 1];
    } else {
        r0 = blockIdx.y * ROWS;
        row_end = p.m;
        b = blockIdx.z;
    }
    if (r0 >= row_end) return;
    const TA* A = (const TA*)p.a + (p.row_offsets ? 0 : b * p.stride_a);
    long long woff = p.row_offsets ? (long long)g * p.stride_w : b * p.stride_w;
    long long soff = p.row_offsets ? (long long)g * p.stride_scale : b * p.stride_scale;
    const TW* W = (const TW*)p.w + woff;
    TC* C = (TC*)p.c + (p.row_offsets ? 0 : b * p.stride_c);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int col0 = (blockIdx.x * SK_WARPS + warp) * OC;
    if (col0 >= p.n) return;
    int nr = min(ROWS, row_end - r0);
    // the A row of each tile row (rows past nr are never read)
    int arow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) arow[r] = sk_arow(p, r0 + min(r, nr - 1));
    float acc[32], ss[ROWS];
#pragma unroll
    for (int i = 0; i < 32; i++) acc[i] = 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS; r++) ss[r] = 0.0f;
    for (int k = lane * 8; k < p.k; k += 256) {
        float nw[8];  // the norm weights of this chunk
        if (NORM) sk_load8(p.norm_w + k, nw);
        if constexpr (ROWS == 1) {
            // one row: its 8 values once, then the 32 columns one after another
            float x[8];
            sk_load8(A + (long long)arow[0] * p.lda + k, x);
            if (NORM) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    ss[0] = fmaf(x[j], x[j], ss[0]);
                    x[j] *= nw[j];
                }
            }
#pragma unroll
            for (int c = 0; c < COLS; c++) {
                // columns past n repeat the last one, unstored; SwiGLU: slots OC.. are the up rows
                int col = min(col0 + (SWIGLU ? c % OC : c), p.n - 1) + (SWIGLU && c >= OC ? p.n : 0);
                float w[8];
                sk_load8(W + (long long)col * p.ldw + k, w);
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; j++) d = fmaf(x[j], w[j], d);
                acc[c] = FP8 ? fmaf(p.scale[soff + (long long)(col / 128) * p.scale_ld + k / 128], d, acc[c]) : acc[c] + d;
            }
        } else {
            // the columns' weights once, then each row of the tile against them
            float w[COLS][8];
            float sc[COLS];
#pragma unroll
            for (int c = 0; c < COLS; c++) {
                int oc = col0 + (SWIGLU ? c % OC : c);
                int col = oc + (SWIGLU && c >= OC ? p.n : 0);
                sc[c] = 1.0f;
                if (oc < p.n) {
                    sk_load8(W + (long long)col * p.ldw + k, w[c]);
                    if (FP8) sc[c] = p.scale[soff + (long long)(col / 128) * p.scale_ld + k / 128];
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) w[c][j] = 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (r < nr) {
                    float x[8];
                    sk_load8(A + (long long)arow[r] * p.lda + k, x);
                    if (NORM) {
#pragma unroll
                        for (int j = 0; j < 8; j++) {
                            ss[r] = fmaf(x[j], x[j], ss[r]);
                            x[j] *= nw[j];
                        }
                    }
#pragma unroll
                    for (int c = 0; c < COLS; c++) {
                        float d = 0.0f;
#pragma unroll
                        for (int j = 0; j < 8; j++) d = fmaf(x[j], w[c][j], d);
                        acc[c * ROWS + r] = FP8 ? fmaf(sc[c], d, acc[c * ROWS + r]) : acc[c * ROWS + r] + d;
                    }
                }
            }
        }
    }
    // transposing butterfly: acc[0] of lane l ends as the warp sum of index l = c * ROWS + r
    sk_butterfly<16>(acc, lane);
    int c = lane / ROWS, r = lane % ROWS;
    float v = acc[0];
    if (NORM) {
        // the sums of x² over the warp: 8 rows, a butterfly over them (ss[0] of lane l: row l % 8)
        // and the lanes holding the same row summed; one row, its sum over the lanes combined in
        // the same tree (lane bits 4, 2, 1, 8, 16), so both forms give the same bits
        static_assert(ROWS == 8 || ROWS == 1, "the norm's reduction covers 8-row and 1-row tiles");
        if constexpr (ROWS == 8) {
            sk_butterfly<4>(ss, lane);
        } else {
            ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], 4);
            ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], 2);
            ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], 1);
        }
        ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], 8);
        ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], 16);
        v *= 1.0f / sqrtf(ss[0] / (float)p.k + p.norm_eps);  // rmsnorm.cu's inverse RMS
    }
    // a gathered row whose index is out of range: NaN, never another row's values
    if (p.a_rows && r < nr && (unsigned)p.a_rows[r0 + r] >= (unsigned)p.a_rows_m) v = __int_as_float(0x7fc00000);
    if constexpr (SWIGLU) {
        float u = __shfl_xor_sync(0xffffffffu, v, 16);  // lane l < 16: the up sum of its (row, column)
        int j = col0 + c;
        if (c < OC && r < nr && j < p.n) {
            float gv = v;
            if (p.bias) {
                gv += p.bias[j];
                u += p.bias[p.n + j];
            }
            // as gemm_store would have stored them, then elementwise.cu's swiglu
            gv = to_f32(from_f32<TC>(gv));
            u = to_f32(from_f32<TC>(u));
            C[(long long)(r0 + r) * p.ldc + j] = from_f32<TC>(gv * dsv3_sigmoid(gv) * u);
        }
    } else if constexpr (ROPE) {
        static_assert(ROWS == 8, "pairs of columns in lanes l and l ^ 8");
        const float other = __shfl_xor_sync(0xffffffffu, v, 8);  // column j ^ 1, same row
        const int j = col0 + c, t = j - rope->q_off;
        const int hh = t >= 0 ? t / rope->hs_q : -1, u = t - hh * rope->hs_q;
        if (r < nr && j < p.n) {
            if (hh >= 0 && hh < rope->h && u < rope->dr) {
                // both values as the GEMM would have stored them, then rope_head_inplace's pair
                const float mine = to_f32(from_f32<TC>(p.bias ? v + p.bias[j] : v));
                const float theirs = to_f32(from_f32<TC>(p.bias ? other + p.bias[j ^ 1] : other));
                const bool even = (u & 1) == 0;
                float re, im;
                rope_pair(even ? mine : theirs, even ? theirs : mine, rope->pos[r0 + r], rope->inv_freq[u >> 1],
                          rope->attn_factor, re, im);
                const int at = j - u + (even ? (u >> 1) : (rope->dr >> 1) + (u >> 1));
                C[(long long)(r0 + r) * p.ldc + at] = from_f32<TC>(even ? re : im);
            } else {
                gemm_store<TC>(p, C, r0 + r, j, v);
            }
        }
    } else {
        if (r < nr && col0 + c < p.n) gemm_store<TC>(p, C, r0 + r, col0 + c, v);
    }
}

// The folded RMSNorm is a separate instantiation, so calls without it run the plain code.
template <typename TA, typename TW, typename TC, int ROWS, bool SWIGLU>
__device__ __forceinline__ void gemm_skinny(const GemmArgs& p) {
    if (p.norm_w) gemm_skinny_impl<TA, TW, TC, ROWS, SWIGLU, true>(p);
    else gemm_skinny_impl<TA, TW, TC, ROWS, SWIGLU, false>(p);
}

#define SKINNY8(name, TA, TW, TC)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) gemm_skinny_##name(GemmArgs p) {                     \
        DSV3_PDL(); gemm_skinny<TA, TW, TC, 8, false>(p);                                                 \
    }
#define SKINNY1(name, TA, TW, TC)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, 1) gemm_skinny1_##name(GemmArgs p) {                 \
        DSV3_PDL(); gemm_skinny<TA, TW, TC, 1, false>(p);                                                 \
    }
#define SKINNY8_SWIGLU(name, TA, TW, TC)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) gemm_skinny_swiglu_##name(GemmArgs p) {              \
        DSV3_PDL(); gemm_skinny<TA, TW, TC, 8, true>(p);                                                  \
    }
#define SKINNY1_SWIGLU(name, TA, TW, TC)                                                                 \
    extern "C" __global__ void __launch_bounds__(128, 1) gemm_skinny1_swiglu_##name(GemmArgs p) {          \
        DSV3_PDL(); gemm_skinny<TA, TW, TC, 1, true>(p);                                                  \
    }
// The routed experts' down GEMM with the MoE combine after it (decode; moe_combine.cuh): C = y
// [n·k, n] in the dispatch plan's row order, grouped by expert, as gemm_skinny_*; then the last
// block of each column tile to finish (counted in q.counters[blockIdx.x] after a fence, as
// mla.cu's fused split merge) adds the tile's 16 columns of every token into x with
// moe_combine_elem and re-arms the counter for the next launch (graph replays). Only blocks with
// rows arrive; the count they complete is computed from the plan's row offsets, so it holds for
// any grid. Needs ldc == n (the launcher checks).
struct MoeCombineArgs {
    int* counters;  // [gridDim.x], zero between launches
    const int* slot_of;
    const int* idx;
    const float* w;
    const void* shared;  // [tokens, n] of C's type, or null
    void* x;             // [tokens, n] of C's type, updated in place
    int tokens, k;
};

template <typename TC>
__device__ __forceinline__ void sk_moe_combine(const GemmArgs& p, const MoeCombineArgs& q) {
    const int g = blockIdx.y;
    if (g >= p.groups || p.row_offsets[g] + (int)blockIdx.z * 8 >= p.row_offsets[g + 1]) return;  // no rows: never arrives
    __shared__ int last;
    __threadfence();  // this block's rows of y before its arrival
    __syncthreads();
    if (threadIdx.x == 0) {
        int arrivals = 0;  // blocks with rows in this column tile
        for (int e = 0; e < min(p.groups, (int)gridDim.y); e++)
            arrivals += min((p.row_offsets[e + 1] - p.row_offsets[e] + 7) / 8, (int)gridDim.z);
        last = atomicAdd(q.counters + blockIdx.x, 1) == arrivals - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // every other block's rows before the reads
    const int c0 = blockIdx.x * SK_WARPS * 4, nc = min(SK_WARPS * 4, p.n - c0);  // 8-row tiles: 4 columns a warp
    const TC* y = (const TC*)p.c;
    for (int e = threadIdx.x; e < q.tokens * nc; e += blockDim.x) {
        const int t = e / nc, j = c0 + e % nc;
        int order[MOE_KMAX];
        moe_combine_order(q.idx, t, q.k, order);
        moe_combine_elem<TC>(y, q.slot_of, q.w, (const TC*)q.shared, (TC*)q.x, order, t, j, q.k, p.n);
    }
    if (threadIdx.x == 0) q.counters[blockIdx.x] = 0;
}

// The query projection's last GEMM with mla_prep in the same launch (decode; mla_prep.cuh): the
// GEMM's blocks rotate the query heads' rope parts in their epilogue, and 8 extra blocks per row
// tile (blockIdx.x >= q.col_tiles) normalize, rotate and append each row's new latent. The
// launcher checks accumulate off, ldc == n, q_off and hs_q even, and the heads' rope parts inside
// the n columns.
#define SKINNY8_PREP(name, TA, TW, TC)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) gemm_skinny_prep_##name(GemmArgs p, MlaPrepArgs q) {  \
        DSV3_PDL();                                                                                      \
        if ((int)blockIdx.x >= q.col_tiles) {                                                            \
            mla_prep_kv_block<TC>(q, (int)blockIdx.y * 8 + (int)blockIdx.x - q.col_tiles, p.m);          \
            return;                                                                                      \
        }                                                                                                \
        if (p.norm_w) gemm_skinny_impl<TA, TW, TC, 8, false, true, true>(p, &q);                         \
        else gemm_skinny_impl<TA, TW, TC, 8, false, false, true>(p, &q);                                 \
    }
#define SKINNY8_COMBINE(name, TA, TW, TC)                                                                \
    extern "C" __global__ void __launch_bounds__(128) gemm_skinny_combine_##name(GemmArgs p, MoeCombineArgs q) { \
        DSV3_PDL(); gemm_skinny<TA, TW, TC, 8, false>(p); sk_moe_combine<TC>(p, q);                       \
    }
// 8-row tiles (4 columns per warp) and 1-row (32 columns per warp, for one row against a wide W;
// not for f32 weights, whose 32 columns in flight would not fit the registers)
SKINNY8(f32, float, float, float)
SKINNY8(bf16_bf16, bf16, bf16, bf16)
SKINNY8(bf16_f32, bf16, bf16, float)
SKINNY8(fp8_bf16, bf16, uint8_t, bf16)
SKINNY8(fp8_f32, bf16, uint8_t, float)
// bf16 activations against f32 weights (the router in bf16 mode: no cast of the hidden states)
SKINNY8(bf16_f32w, bf16, float, float)
SKINNY1(bf16_bf16, bf16, bf16, bf16)
SKINNY1(bf16_f32, bf16, bf16, float)
SKINNY1(fp8_bf16, bf16, uint8_t, bf16)
SKINNY1(fp8_f32, bf16, uint8_t, float)
// gate|up GEMM + SwiGLU in one (C in the activation dtype: f32 mode, bf16 mode bf16 / FP8 weights)
SKINNY8_SWIGLU(f32, float, float, float)
SKINNY8_SWIGLU(bf16, bf16, bf16, bf16)
SKINNY8_SWIGLU(fp8, bf16, uint8_t, bf16)
SKINNY1_SWIGLU(bf16, bf16, bf16, bf16)
SKINNY1_SWIGLU(fp8, bf16, uint8_t, bf16)
// the routed experts' down GEMM + MoE combine (C, x and shared in the activation dtype)
SKINNY8_COMBINE(f32, float, float, float)
SKINNY8_COMBINE(bf16_bf16, bf16, bf16, bf16)
SKINNY8_COMBINE(fp8_bf16, bf16, uint8_t, bf16)
// the query projection's last GEMM + mla_prep (C in the activation dtype)
SKINNY8_PREP(f32, float, float, float)
SKINNY8_PREP(bf16_bf16, bf16, bf16, bf16)
SKINNY8_PREP(fp8_bf16, bf16, uint8_t, bf16)
