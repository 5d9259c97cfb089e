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

template <typename TA, typename TW, typename TC, int ROWS, bool SWIGLU, bool NORM>
__device__ __forceinline__ void gemm_skinny_impl(const GemmArgs& p) {
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
        gemm_skinny<TA, TW, TC, 8, false>(p);                                                             \
    }
#define SKINNY1(name, TA, TW, TC)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, 1) gemm_skinny1_##name(GemmArgs p) {                 \
        gemm_skinny<TA, TW, TC, 1, false>(p);                                                             \
    }
#define SKINNY8_SWIGLU(name, TA, TW, TC)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) gemm_skinny_swiglu_##name(GemmArgs p) {              \
        gemm_skinny<TA, TW, TC, 8, true>(p);                                                              \
    }
#define SKINNY1_SWIGLU(name, TA, TW, TC)                                                                 \
    extern "C" __global__ void __launch_bounds__(128, 1) gemm_skinny1_swiglu_##name(GemmArgs p) {          \
        gemm_skinny<TA, TW, TC, 1, true>(p);                                                              \
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
