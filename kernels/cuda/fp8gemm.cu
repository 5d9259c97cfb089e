// FP8 GEMMs of DeepSeek's training recipe: D[m, n] (+)= sum_kb sa(m, kb) * sb(n, kb) * sum_{k in kb}
// A[m, k] * B[n, k], with A and B E4M3 codes (K contiguous) and the per-128-K-group partial sums
// promoted into f32 with their scales (V3 §3.3.2; DeepGEMM's "promote with scales"). Forms:
// - Fprop / Dgrad: A 1x128 tiles (per row per 128 K), B 128x128 blocks (b_block = 1).
// - Wgrad: A and B both 1x128 along K = tokens (b_block = 0: one B scale per row of B), f32 D with
//   accumulate = 1 (dW += dYᵀ X across micro-batches).
// - grouped-contiguous (MoE experts, row_offsets != 0): group g owns rows [row_offsets[g],
//   row_offsets[g+1]) of A and D and uses B + g * stride_b, sb + g * stride_sb; blockIdx.y walks
//   the 64-row tiles of all groups (tile_offsets as moe_plan writes them, GEMM_BM = 64).
// Kernels:
// - fp8_gemm_wgmma_*: sm_90a, one warpgroup per 64x128 tile, wgmma.mma_async m64n128k32 e4m3 with
//   the 128-K group accumulated in the wgmma accumulator (4 instructions, the first with
//   scale-d = 0) and then promoted into f32 registers. Operands staged in shared memory in the
//   no-swizzle core-matrix layout by ordinary loads (no TMA / mbarrier pipeline / warp
//   specialization yet: the simple, correct first version). On sm_80 the entry traps.
// - fp8_gemm_simt_*: any arch (the sm_80 path and a cross-check): f32 SIMT over decoded E4M3
//   values (products exact in f32), 64x64 tiles, the same promotion.
#include "common.cuh"
#include "wgmma.cuh"
#include <stdint.h>

struct Fp8GemmArgs {
    const uint8_t* a;
    const uint8_t* b;
    void* d;
    const float* sa;
    const float* sb;
    const int* row_offsets;
    const int* tile_offsets;
    long long stride_b, stride_sb;
    long long sa_rs, sa_ks, sb_rs, sb_ks;
    int m, n, k, lda, ldb, ldd;
    int groups, accumulate, b_block, pad;
};

#define FP8_BM 64

// Rows of this block's tile: [row0, row_end) of group g (as gemm.cuh's gemm_tile_rows).
__device__ __forceinline__ bool fp8_tile_rows(const Fp8GemmArgs& p, int& row0, int& row_end, int& g) {
    if (p.row_offsets) {
        int t = blockIdx.y;
        if (t >= p.tile_offsets[p.groups]) return false;
        int lo = 0, hi = p.groups - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (p.tile_offsets[mid] <= t) lo = mid; else hi = mid - 1;
        }
        g = lo;
        row0 = p.row_offsets[g] + (t - p.tile_offsets[g]) * FP8_BM;
        row_end = p.row_offsets[g + 1];
        return row0 < row_end;
    }
    g = 0;
    row0 = blockIdx.y * FP8_BM;
    row_end = p.m;
    return row0 < row_end;
}

__device__ __forceinline__ float fp8_sb(const Fp8GemmArgs& p, const float* sb, int col, int kb) {
    long long r = p.b_block ? (col >> 7) : col;
    return sb[r * p.sb_rs + (long long)kb * p.sb_ks];
}

template <typename TD>
__device__ __forceinline__ void fp8_store(const Fp8GemmArgs& p, int row, int col, float v) {
    TD* dst = (TD*)p.d + (long long)row * p.ldd + col;
    if (p.accumulate) v += to_f32(*dst);
    *dst = from_f32<TD>(v);
}

// ---- SIMT: 256 threads = 16x16, 4x4 outputs each, BK = 16, promotion every 128 K.
template <typename TD>
__device__ void fp8_gemm_simt(const Fp8GemmArgs& p) {
    int row0, row_end, g;
    if (!fp8_tile_rows(p, row0, row_end, g)) return;
    const uint8_t* B = p.b + (long long)g * p.stride_b;
    const float* SB = p.sb + (long long)g * p.stride_sb;
    int col0 = blockIdx.x * 64;
    __shared__ float As[16][64 + 4];
    __shared__ float Bs[16][64 + 4];
    __shared__ float lut[256];
    for (int i = threadIdx.x; i < 256; i += 256) lut[i] = e4m3_to_f32((uint8_t)i);
    int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    float acc[4][4] = {}, part[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += 16) {
        __syncthreads();
        for (int i = threadIdx.x; i < 64 * 16; i += 256) {
            int r = i >> 4, kk = i & 15, gk = k0 + kk;
            int gr = row0 + r, gc = col0 + r;
            As[kk][r] = (gr < row_end && gk < p.k) ? lut[p.a[(long long)gr * p.lda + gk]] : 0.0f;
            Bs[kk][r] = (gc < p.n && gk < p.k) ? lut[B[(long long)gc * p.ldb + gk]] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) part[i][j] += As[kk][ty * 4 + i] * Bs[kk][tx * 4 + j];
        if ((k0 + 16) % 128 == 0 || k0 + 16 >= p.k) {
            int kb = k0 >> 7;
            for (int i = 0; i < 4; i++) {
                int r = row0 + ty * 4 + i;
                float sa = r < row_end ? p.sa[(long long)r * p.sa_rs + (long long)kb * p.sa_ks] : 0.0f;
                for (int j = 0; j < 4; j++) {
                    int c = col0 + tx * 4 + j;
                    float sb = c < p.n ? fp8_sb(p, SB, c, kb) : 0.0f;
                    acc[i][j] += (sa * sb) * part[i][j];
                    part[i][j] = 0.0f;
                }
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        int r = row0 + ty * 4 + i;
        if (r >= row_end) continue;
        for (int j = 0; j < 4; j++) {
            int c = col0 + tx * 4 + j;
            if (c < p.n) fp8_store<TD>(p, r, c, acc[i][j]);
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) fp8_gemm_simt_bf16(Fp8GemmArgs p) { fp8_gemm_simt<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) fp8_gemm_simt_f32(Fp8GemmArgs p) { fp8_gemm_simt<float>(p); }

// ---- sm_90a wgmma.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// 16 bytes of row `row` from column k0 (zero past k or past the valid rows).
__device__ __forceinline__ uint4 load16(const uint8_t* base, long long ld, int row, bool row_ok, int k0, int k) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (!row_ok || k0 >= k) return v;
    const uint8_t* src = base + (long long)row * ld + k0;
    if (k0 + 16 <= k && ((uintptr_t)src & 15) == 0) return __ldg((const uint4*)src);
    uint8_t b[16];
#pragma unroll
    for (int i = 0; i < 16; i++) b[i] = (k0 + i < k) ? src[i] : 0;
    memcpy(&v, b, 16);
    return v;
}
#endif

// Tile 64 x 128, 128 threads (one warpgroup). Shared layout (no swizzle): byte (r, k) of the A
// tile at (k / 16) * 64 * 16 + r * 16 + k % 16 (K-adjacent core matrices 1024 B apart, 8-row
// groups 128 B apart); the B tile the same with 128 rows (2048 B).
template <typename TD>
__device__ void fp8_gemm_wgmma(const Fp8GemmArgs& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    int row0, row_end, g;
    if (!fp8_tile_rows(p, row0, row_end, g)) return;
    const uint8_t* B = p.b + (long long)g * p.stride_b;
    const float* SB = p.sb + (long long)g * p.stride_sb;
    int col0 = blockIdx.x * 128;
    __shared__ __align__(1024) uint8_t As[64 * 128];
    __shared__ __align__(1024) uint8_t Bs[128 * 128];
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int ra = warp * 16 + (lane >> 2);  // this thread's accumulator rows: ra and ra + 8
    float acc[64], out[64];
#pragma unroll
    for (int i = 0; i < 64; i++) out[i] = 0.0f;
    int nkb = (p.k + 127) >> 7;
    for (int kb = 0; kb < nkb; kb++) {
        int k0 = kb * 128;
        __syncthreads();  // the previous group's wgmmas (waited) are done with the tiles
        for (int i = tid; i < 64 * 8; i += 128) {
            int r = i >> 3, kc = i & 7;
            uint4 v = load16(p.a, p.lda, row0 + r, row0 + r < row_end, k0 + kc * 16, p.k);
            *(uint4*)&As[kc * 1024 + r * 16] = v;
        }
        for (int i = tid; i < 128 * 8; i += 128) {
            int r = i >> 3, kc = i & 7;
            uint4 v = load16(B, p.ldb, col0 + r, col0 + r < p.n, k0 + kc * 16, p.k);
            *(uint4*)&Bs[kc * 2048 + r * 16] = v;
        }
        // make the generic-proxy stores visible to wgmma's async proxy, then to every warp
        fence_proxy_async();
        __syncthreads();
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint64_t da = wg_desc(&As[kk * 2 * 1024], 1024, 128);
            uint64_t db = wg_desc(&Bs[kk * 2 * 2048], 2048, 128);
            wgmma_m64n128k32_e4m3(acc, da, db, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_acc(acc);
        // promote: out += (sa * sb) * acc
        float sa0 = row0 + ra < row_end ? p.sa[(long long)(row0 + ra) * p.sa_rs + (long long)kb * p.sa_ks] : 0.0f;
        float sa1 = row0 + ra + 8 < row_end ? p.sa[(long long)(row0 + ra + 8) * p.sa_rs + (long long)kb * p.sa_ks] : 0.0f;
        float sbb = p.b_block ? SB[(long long)(col0 >> 7) * p.sb_rs + (long long)kb * p.sb_ks] : 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int c = col0 + j * 8 + (lane & 3) * 2 + e;
                float sb = p.b_block ? sbb : (c < p.n ? fp8_sb(p, SB, c, kb) : 0.0f);
                out[j * 4 + e] += (sa0 * sb) * acc[j * 4 + e];
                out[j * 4 + 2 + e] += (sa1 * sb) * acc[j * 4 + 2 + e];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int c = col0 + j * 8 + (lane & 3) * 2 + e;
            if (c >= p.n) continue;
            if (row0 + ra < row_end) fp8_store<TD>(p, row0 + ra, c, out[j * 4 + e]);
            if (row0 + ra + 8 < row_end) fp8_store<TD>(p, row0 + ra + 8, c, out[j * 4 + 2 + e]);
        }
#else
    __trap();  // sm_90a only: the launcher picks fp8_gemm_simt_* elsewhere
#endif
}
extern "C" __global__ void __launch_bounds__(128) fp8_gemm_wgmma_bf16(Fp8GemmArgs p) { fp8_gemm_wgmma<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) fp8_gemm_wgmma_f32(Fp8GemmArgs p) { fp8_gemm_wgmma<float>(p); }
