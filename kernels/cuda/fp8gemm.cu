// FP8 GEMMs of DeepSeek's training recipe: D[m, n] (+)= sum_kb sa(m, kb) * sb(n, kb) * sum_{k in kb}
// A[m, k] * B[n, k], with A and B E4M3 codes (K contiguous) and the per-128-K-group partial sums
// promoted into f32 with their scales (V3 §3.3.2; DeepGEMM's "promote with scales"). Forms:
// - Fprop / Dgrad: A 1x128 tiles (per row per 128 K), B 128x128 blocks (b_block = 1).
// - Wgrad: A and B both 1x128 along K = tokens (b_block = 0: one B scale per row of B), f32 D with
//   accumulate = 1 (dW += dYᵀ X across micro-batches).
// - grouped-contiguous (MoE experts, row_offsets != 0): group g owns rows [row_offsets[g],
//   row_offsets[g+1]) of A and D and uses B + g * stride_b, sb + g * stride_sb; the grid walks
//   the 64-row tiles of all groups (tile_offsets as moe_plan writes them, GEMM_BM = 64).
// Row tiles (grouped or not) are blockIdx.y + gridDim.y * blockIdx.z (tile_yz(): past 65535 tiles,
// CUDA's grid.y limit, the launcher spreads them over z; fp8_gemm_wgmma2's 128-row block tiles too).
// Kernels:
// - fp8_gemm_wgmma_*: sm_90a, one warpgroup per 64x128 tile, wgmma.mma_async m64n128k32 e4m3 with
//   the 128-K group accumulated in the wgmma accumulator (4 instructions, the first with
//   scale-d = 0) and then promoted into f32 registers. Operands staged in shared memory in the
//   no-swizzle core-matrix layout by ordinary loads (no TMA / mbarrier pipeline / warp
//   specialization yet: the simple, correct first version). On sm_80 the entry traps.
// - fp8_gemm_wgmma2_*: sm_90a, the pipelined form (correct on the H100, not yet timed): 256
//   threads = 2 consumer warpgroups on a 128x128 block tile (warpgroup w: 64-row tile 2·blockIdx.y
//   + w, its own group in the grouped mode, so B is staged once per distinct group), operands
//   streamed by cp.async into a 4-stage ring of 128-K groups (the same no-swizzle layout and
//   descriptors as fp8_gemm_wgmma, the mode the H100 run validated), loads issued 3 groups ahead
//   and landing while the MMAs run; per group 4 wgmmas, wait_group 0, promotion (scales loaded
//   under the MMAs); the two warpgroups' MMAs and promotions interleave. Needs k, lda, ldb (and stride_b) multiples
//   of 16 (the launcher falls back to fp8_gemm_wgmma otherwise).
// - fp8_gemm_tma_*: sm_90a, DeepGEMM's structure (correct on the H100, not yet timed; the
//   section at the end of this file): TMA loads into an mbarrier-guarded 4-stage ring, a producer
//   warp and 2 consumer warpgroups (warp-specialized), persistent over the block tiles, 128-byte
//   swizzled operands. The launcher's Auto choice on sm_90a where lda, ldb and stride_b are
//   multiples of 16 (DSV3_FP8_KERNEL=v2 / v1 / simt pick the others).
// - fp8_gemm_simt_*: any arch (the sm_80 path and a cross-check): f32 SIMT over decoded E4M3
//   values (products exact in f32), 64x64 tiles, the same promotion.
#include "common.cuh"
#include "mma.cuh"
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
        int t = tile_yz();
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
    row0 = tile_yz() * FP8_BM;
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
extern "C" __global__ void __launch_bounds__(256) fp8_gemm_simt_bf16(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_simt<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) fp8_gemm_simt_f32(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_simt<float>(p); }

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
extern "C" __global__ void __launch_bounds__(128) fp8_gemm_wgmma_bf16(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_wgmma<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) fp8_gemm_wgmma_f32(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_wgmma<float>(p); }

// ---- sm_90a, pipelined: 2 consumer warpgroups, cp.async ring 3 groups ahead, DeepGEMM's
// per-group wgmma -> wait_group 0 -> promote (the other warpgroup's MMAs fill the promotion). A
// wait_group 1 form with two accumulator sets (promotion of group k-1 under group k's MMAs) needs
// 192 accumulator registers: ptxas then caps at 255 and serializes the wgmmas (C7514), so not that.
#define FP8V2_STAGES 4
#define FP8V2_A_BYTES (128 * 128)            // 2 x 64 rows x 128 K (warpgroup w at w * 8192)
#define FP8V2_B_BYTES (128 * 128)            // 128 columns x 128 K
#define FP8V2_STAGE_BYTES (FP8V2_A_BYTES + 2 * FP8V2_B_BYTES)  // B of warpgroup 1 when its group differs
#define FP8V2_SMEM (FP8V2_STAGES * FP8V2_STAGE_BYTES)

// Rows of 64-row tile t: [row0, row_end) of group g.
__device__ __forceinline__ bool fp8_tile64(const Fp8GemmArgs& p, int t, int& row0, int& row_end, int& g) {
    if (p.row_offsets) {
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
    row0 = t * FP8_BM;
    row_end = p.m;
    return row0 < row_end;
}

// Two adjacent columns (c, c + 1) of row `row`; c + 1 may be past n. One paired store where the
// address is aligned to the pair (D may start anywhere in a flat buffer, a Wgrad into an expert's
// slice of the gradient arena: an even element index alone is not enough), else two.
template <typename TD>
__device__ __forceinline__ void fp8_store2(const Fp8GemmArgs& p, int row, int c, float v0, float v1) {
    TD* dst = (TD*)p.d + (long long)row * p.ldd + c;
    if (c + 1 < p.n && ((uintptr_t)dst & (2 * sizeof(TD) - 1)) == 0) {
        if (p.accumulate) {
            v0 += to_f32(dst[0]);
            v1 += to_f32(dst[1]);
        }
        if constexpr (sizeof(TD) == 4) {
            *(float2*)dst = make_float2(v0, v1);
        } else {
            *(__nv_bfloat162*)dst = __floats2bfloat162_rn(v0, v1);
        }
        return;
    }
    if (c < p.n) fp8_store<TD>(p, row, c, v0);
    if (c + 1 < p.n) fp8_store<TD>(p, row, c + 1, v1);
}

// The scales of 128-K group kb for this thread's rows (sa0p / sa1p: rows ra and ra + 8, valid where
// ok0 / ok1) and, with 128x128 B blocks, the block scale of columns col0..col0+127 (sbb).
__device__ __forceinline__ void fp8_group_scales(const Fp8GemmArgs& p, const float* SB, const float* sa0p,
                                                 const float* sa1p, bool ok0, bool ok1, int col0, int kb, float& sa0,
                                                 float& sa1, float& sbb) {
    sa0 = ok0 ? sa0p[(long long)kb * p.sa_ks] : 0.0f;
    sa1 = ok1 ? sa1p[(long long)kb * p.sa_ks] : 0.0f;
    sbb = p.b_block ? SB[(long long)(col0 >> 7) * p.sb_rs + (long long)kb * p.sb_ks] : 0.0f;
}

// One 128-K group promoted into this thread's f32 outputs: out += (sa·sb)·acc over its m64n128
// accumulator fragment (rows ra, ra + 8; columns col0 + 8j + 2·(lane % 4) + e), sb the block scale
// sbb or (Wgrad) column c's scale.
__device__ __forceinline__ void fp8_promote(const Fp8GemmArgs& p, const float* SB, int col0, int lane, int kb,
                                            float sa0, float sa1, float sbb, const float* acc, float* out) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int c = col0 + j * 8 + (lane & 3) * 2 + e;
            const float sb = p.b_block ? sbb : (c < p.n ? fp8_sb(p, SB, c, kb) : 0.0f);
            out[j * 4 + e] += (sa0 * sb) * acc[j * 4 + e];
            out[j * 4 + 2 + e] += (sa1 * sb) * acc[j * 4 + 2 + e];
        }
    }
}

// Stores this thread's fragment (rows r and r + 8 where ok0 / ok1) into D, column pairs at once.
template <typename TD>
__device__ __forceinline__ void fp8_store_frag(const Fp8GemmArgs& p, int r, bool ok0, bool ok1, int col0, int lane,
                                               const float* out) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int c = col0 + j * 8 + (lane & 3) * 2;
        if (c >= p.n) continue;
        if (ok0) fp8_store2<TD>(p, r, c, out[j * 4], out[j * 4 + 1]);
        if (ok1) fp8_store2<TD>(p, r + 8, c, out[j * 4 + 2], out[j * 4 + 3]);
    }
}

template <typename TD>
__device__ void fp8_gemm_wgmma2(const Fp8GemmArgs& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    DSV3_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3;
    int r0a, rea, ga, r0b, reb, gb;
    if (!fp8_tile64(p, tile_yz() * 2, r0a, rea, ga)) return;  // the whole block (uniform)
    if (!fp8_tile64(p, tile_yz() * 2 + 1, r0b, reb, gb)) r0b = reb = 0, gb = ga;  // warpgroup 1 idle
    const bool two_b = gb != ga;
    const uint8_t* Ba = p.b + (long long)ga * p.stride_b;
    const uint8_t* Bb = p.b + (long long)gb * p.stride_b;
    const int col0 = blockIdx.x * 128;
    const int nkb = (p.k + 127) >> 7;
    const uint32_t sbase = smem_u32(smem);

    // Stage kb's operands (every thread; an empty commit group past the end keeps the count).
    // Per 32 consecutive indices: 8 rows x 4 chunks of 16 bytes (64 contiguous bytes of a row
    // from global; 8 distinct 16-byte bank groups per 8 lanes in shared memory).
    auto load = [&](int kb) {
        if (kb < nkb) {
            const uint32_t st = sbase + (kb % FP8V2_STAGES) * FP8V2_STAGE_BYTES;
            const int k0 = kb * 128;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int idx = tid + j * 256, c = idx >> 5, l = idx & 31;
                const int r = (c >> 1) * 8 + (l & 7), kc = (c & 1) * 4 + (l >> 3);
                const bool kok = k0 + kc * 16 < p.k;
                // A: rows r < 64 of warpgroup 0's tile, the rest of warpgroup 1's
                const int w = r >> 6, rr = r & 63;
                const int grow = (w ? r0b : r0a) + rr;
                const bool aok = kok && grow < (w ? reb : rea);
                cp_async16(st + w * 8192 + kc * 1024 + rr * 16,
                           aok ? p.a + (long long)grow * p.lda + k0 + kc * 16 : p.a, aok ? 16 : 0);
                // B (columns col0 + r) of warpgroup 0's group, and of warpgroup 1's if it differs
                const bool bok = kok && col0 + r < p.n;
                const long long boff = (long long)(col0 + r) * p.ldb + k0 + kc * 16;
                cp_async16(st + FP8V2_A_BYTES + kc * 2048 + r * 16, bok ? Ba + boff : p.b, bok ? 16 : 0);
                if (two_b)
                    cp_async16(st + FP8V2_A_BYTES + FP8V2_B_BYTES + kc * 2048 + r * 16, bok ? Bb + boff : p.b,
                               bok ? 16 : 0);
            }
        }
        cp_async_commit();
    };

    // this warpgroup's rows and scales
    const int row0 = wg ? r0b : r0a, row_end = wg ? reb : rea;
    const float* SB = p.sb + (long long)(wg ? gb : ga) * p.stride_sb;
    const int ra = warp * 16 + (lane >> 2);  // accumulator rows ra and ra + 8
    const bool ok0 = row0 + ra < row_end, ok1 = row0 + ra + 8 < row_end;
    const float* sa0p = p.sa + (long long)(row0 + ra) * p.sa_rs;
    const float* sa1p = p.sa + (long long)(row0 + ra + 8) * p.sa_rs;
    const uint32_t a_off = wg * 8192, b_off = FP8V2_A_BYTES + ((two_b && wg) ? FP8V2_B_BYTES : 0);

    float acc[64], out[64];
#pragma unroll
    for (int i = 0; i < 64; i++) out[i] = 0.0f;

    for (int s = 0; s < FP8V2_STAGES - 1; s++) load(s);
    for (int kb = 0; kb < nkb; kb++) {
        // wait for group kb's operands; refill the slot group kb - 1 used (its wgmmas were waited)
        cp_async_wait<FP8V2_STAGES - 2>();
        fence_proxy_async();  // this thread's cp.async writes -> the async proxy
        __syncthreads();      // everyone's writes landed; everyone's group kb - 1 wgmmas are done
        load(kb + FP8V2_STAGES - 1);
        const uint32_t st = (kb % FP8V2_STAGES) * FP8V2_STAGE_BYTES;
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint64_t da = wg_desc(smem + st + a_off + kk * 2 * 1024, 1024, 128);
            const uint64_t db = wg_desc(smem + st + b_off + kk * 2 * 2048, 2048, 128);
            wgmma_m64n128k32_e4m3(acc, da, db, kk > 0);
        }
        wgmma_commit();
        // this group's scales while the MMAs run
        float sa0, sa1, sbb;
        fp8_group_scales(p, SB, sa0p, sa1p, ok0, ok1, col0, kb, sa0, sa1, sbb);
        wgmma_wait<0>();
        fence_acc(acc);
        fp8_promote(p, SB, col0, lane, kb, sa0, sa1, sbb, acc, out);
    }
    fp8_store_frag<TD>(p, row0 + ra, ok0, ok1, col0, lane, out);
#else
    __trap();  // sm_90a only
#endif
}
extern "C" __global__ void __launch_bounds__(256, 1) fp8_gemm_wgmma2_bf16(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_wgmma2<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) fp8_gemm_wgmma2_f32(Fp8GemmArgs p) { DSV3_PDL(); fp8_gemm_wgmma2<float>(p); }

// ---- sm_90a, TMA + mbarrier pipeline, warp-specialized, persistent (DeepGEMM's structure):
// 288 threads = 2 consumer warpgroups (as fp8_gemm_wgmma2: warpgroup w computes 64-row tile
// 2·mt + w of 128-row block tile mt, its own group in the grouped mode) + 1 producer warp whose
// first thread issues every load. Operands arrive by TMA (cp.async.bulk.tensor from the tensor
// maps of A [m, k] and B [groups, n, k], boxes of 128 K bytes x 64 / 128 rows, 128-byte swizzle,
// zero fill past m, n and k) into a 4-stage ring of 128-K groups; per stage a "full" mbarrier
// (the producer's arrive.expect_tx plus the TMA transaction bytes) and an "empty" one (one arrival
// per consumer warp after its wgmmas were waited). Consumers: per group 4 wgmma m64n128k32 from
// 128B-swizzled descriptors, wait_group 0, release the stage, promote with sa·sb into f32
// registers; the epilogue stores while the producer already streams the next tile's groups: a
// bf16 D (no accumulate, no split-K; store_d) goes through a 16 KiB staging buffer per warpgroup
// and two TMA stores (DeepGEMM's epilogue: the warpgroup moves on to the next tile's MMAs while
// the store drains; the buffer's reuse waits for the store to have read it), else from
// registers. Persistent: gridDim.x blocks (at most one per SM) walk the work units
// u = blockIdx.x + i·gridDim.x (block tile u / splits in tma_raster's L2-friendly order: bands of
// 8 row tiles). Split-K (dense calls whose tiles leave SMs idle, e.g. M = 128): unit u also
// takes K-group range u % splits and writes f32 partials; the warpgroup that finishes a tile's
// last split (an arrival counter per tile) sums them into D in split order (or, without
// counters, fp8_splitk_reduce_* does). K-grouped (k_seg; the MoE expert Wgrad): units walk
// (group, tile), each over its group's 128-K segment into its own D. Needs lda, ldb, stride_b and
// the operand base addresses multiples of 16 (TMA's global stride and address rules); k and n
// any.
// EMULATOR-VERIFIED (kernels/emu/fp8gemm_emu.cpp with include/tma_emu.h); dense and grouped forms
// correct on the H100 (kernels/tests/fp8.rs, 2026-11-24), the K-grouped form not yet run there.
#include "tma.cuh"
#define FP8T_STAGES TMA_AB_STAGES  // the ring of tma.cuh: 4 x (A 2 x 64 x 128 K | B | B)
#define FP8T_STAGE_BYTES TMA_AB_STAGE_BYTES
#define FP8T_BARS (FP8T_STAGES * FP8T_STAGE_BYTES)    // full[s] at +8s, empty[s] at +32 + 8s
#define FP8T_STORE (FP8T_BARS + 1024)                  // the TMA-store staging: 16 KiB per warpgroup
#define FP8T_SMEM (FP8T_STORE + 2 * 16384 + 1024)      // + slack to align the ring to 1024 B
#define FP8T_THREADS 288

struct Fp8TmaArgs {
    TmaDesc ta;  // A: uint8 dims {k, m}, stride lda, box {128, 64}, 128B swizzle
    TmaDesc tb;  // B: uint8 dims {k, n, groups}, strides {ldb, stride_b}, box {128, 128, 1}, 128B swizzle
    Fp8GemmArgs p;
    // split-K (splits > 1; not grouped) of the block tiles t >= split_from: work units
    // 0..split_from are tiles 0..split_from whole, unit split_from + v is split s = v % splits of
    // tile split_from + v / splits, over the K groups [s·nkb/splits, (s+1)·nkb/splits). Each split
    // writes its f32 partial sums to work: with counters at
    // ((t - split_from)·splits + s)·16384 + local row·128 + local column of the 128 x 128 tile, and
    // the last split to finish adds them into D; without (split_from = 0) at (s·m + row)·n + col,
    // and fp8_splitk_reduce_* adds them into D in split order
    float* work;
    // K-grouped (k_seg != null; the MoE expert Wgrad): kgroups groups, group e over the 128-K
    // groups [k_seg[e] / 128, k_seg[e+1] / 128) (segment starts multiples of 128; an empty group
    // leaves its D untouched) into D + e·stride_d; splits must be 1
    const int* k_seg;
    long long stride_d;
    int splits, kgroups;
    // store_d != 0 (bf16 D, accumulate = 0, not K-grouped; tiles not split): each consumer warpgroup
    // stages its finished 64 x 128 tile in shared memory and one thread stores it by TMA through
    // td (uint8 dims {2n, m}, stride 2·ldd, box {128, 64}, 128B swizzle), so the tile's MMAs
    // start while the store drains; tiles with rows of another group below them (a grouped
    // call's partial tile not at m) store from registers
    int store_d;
    // the first split block tile (above): 0 splits every tile (the M = 128 rows); the tiles of the
    // persistent walk's last, partial wave otherwise (their splits fill the SMs; needs counters)
    int split_from;
    // split-K (splits > 1) with counters: [2 · block tiles] ints, zero between launches; the last
    // split of a warpgroup's tile to finish adds all the partials into D (no fp8_splitk_reduce_*
    // launch) and zeroes its counter again
    int* counters;
    TmaDesc td;
};

// The work units of the persistent walk: K-grouped, tiles_per per K group; else split_from whole
// tiles and `splits` per tile after them.
__device__ __forceinline__ int fp8_tma_units(const Fp8TmaArgs& q, int tiles_per) {
    return q.k_seg ? tiles_per * q.kgroups : q.split_from + (tiles_per - q.split_from) * q.splits;
}
// Work unit u: its block tile t, K group range [kb0, kb1), K group e (K-grouped) and split sp
// (-1: the tile is not split).
__device__ __forceinline__ void fp8_tma_unit(const Fp8TmaArgs& q, int u, int tiles_per, int nkb, int& e, int& t,
                                             int& kb0, int& kb1, int& sp) {
    e = 0, sp = -1, kb0 = 0, kb1 = nkb;
    if (q.k_seg) {
        e = u / tiles_per;
        t = u - e * tiles_per;
        kb0 = q.k_seg[e] >> 7;
        kb1 = q.k_seg[e + 1] >> 7;
    } else if (u < q.split_from || q.splits == 1) {
        t = u;
    } else {
        const int v = u - q.split_from;
        t = q.split_from + v / q.splits;
        sp = v - (t - q.split_from) * q.splits;
        kb0 = (int)((long long)sp * nkb / q.splits);
        kb1 = (int)((long long)(sp + 1) * nkb / q.splits);
    }
}

// Block tile t (of mtiles x ntiles, in tma_raster's order): 64-row tiles 2·mt and 2·mt + 1 (the
// second may be absent; the first exists for every t of the walk).
__device__ __forceinline__ TmaTile fp8_tma_tile(const Fp8GemmArgs& p, int t, int mtiles, int ntiles) {
    return tma_tile(t, mtiles, ntiles,
                    [&](int t64, int& row0, int& row_end, int& g) { return fp8_tile64(p, t64, row0, row_end, g); });
}

template <typename TD>
__device__ void fp8_gemm_tma(const Fp8TmaArgs& q) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const Fp8GemmArgs& p = q.p;
    DSV3_DYNAMIC_SMEM(smem_raw);
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sbase = (raw + 1023) & ~1023u;  // the 128B swizzle needs 1024-byte aligned boxes
    unsigned char* smem = smem_raw + (sbase - raw);
    const uint32_t bars = sbase + FP8T_BARS;
    const int tid = threadIdx.x;
    const int tiles64 = p.row_offsets ? p.tile_offsets[p.groups] : (p.m + FP8_BM - 1) / FP8_BM;
    const int ntiles = (p.n + 127) >> 7, mtiles = (tiles64 + 1) >> 1, splits = q.splits, tiles_per = mtiles * ntiles;
    const int units = fp8_tma_units(q, tiles_per);
    const int nkb = (p.k + 127) >> 7;
    if (tid == 0) tma_ring_init(bars);
    __syncthreads();  // the last block-wide barrier: the producer warp's idle lanes leave below

    if (tid >= 256) {  // ---- producer warp
        if (tid != 256) return;
        tma_prefetch_desc(&q.ta);
        tma_prefetch_desc(&q.tb);
        int it = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            int e, t, kb0, kb1, sp;
            fp8_tma_unit(q, u, tiles_per, nkb, e, t, kb0, kb1, sp);
            if (q.k_seg && kb0 >= kb1) continue;  // an empty K group: nothing to load
            tma_produce_ab(sbase, bars, it, &q.ta, &q.tb, fp8_tma_tile(p, t, mtiles, ntiles), kb0, kb1);
        }
        return;
    }

    // ---- consumers: warpgroup wg, accumulator rows ra and ra + 8 of its 64-row tile
    const int wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3;
    const int ra = warp * 16 + (lane >> 2);
    float acc[64], out[64];
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        int e, t, kb0, kb1, sp;
        fp8_tma_unit(q, u, tiles_per, nkb, e, t, kb0, kb1, sp);
        if (q.k_seg && kb0 >= kb1) continue;  // an empty K group: its D untouched
        const TmaTile x = fp8_tma_tile(p, t, mtiles, ntiles);
        const bool active = wg == 0 || x.act1;
        const int row0 = wg ? x.r0b : x.r0a, row_end = wg ? x.reb : x.rea, col0 = x.col0;
        const float* SB = p.sb + (long long)(wg ? x.gb : x.ga) * p.stride_sb;
        const bool ok0 = row0 + ra < row_end, ok1 = row0 + ra + 8 < row_end;
        const float* sa0p = p.sa + (long long)(row0 + ra) * p.sa_rs;
        const float* sa1p = p.sa + (long long)(row0 + ra + 8) * p.sa_rs;
        const uint32_t a_off = wg * 8192, b_off = 16384 + ((x.two_b && wg) ? 16384 : 0);
#pragma unroll
        for (int i = 0; i < 64; i++) out[i] = 0.0f;
        for (int kb = kb0; kb < kb1; kb++, it++) {
            const int s = it % FP8T_STAGES;
            mbar_wait(bars + 8 * s, (it / FP8T_STAGES) & 1);  // group kb's operands landed
            // (an idle warpgroup 1 multiplies whatever its A slot holds and discards it: a branch
            // around the wgmmas makes ptxas serialize them, C7518)
            const unsigned char* st = smem + s * FP8T_STAGE_BYTES;
            fence_acc(acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wgmma_m64n128k32_e4m3(acc, wg_desc_sw128(st + a_off + kk * 32), wg_desc_sw128(st + b_off + kk * 32),
                                      kk > 0);
            wgmma_commit();
            // this group's scales while the MMAs run
            float sa0, sa1, sbb;
            fp8_group_scales(p, SB, sa0p, sa1p, ok0, ok1, col0, kb, sa0, sa1, sbb);
            wgmma_wait<0>();
            fence_acc(acc);
            if (lane == 0) mbar_arrive(bars + 32 + 8 * s);  // this warp is done with the stage
            if (active) fp8_promote(p, SB, col0, lane, kb, sa0, sa1, sbb, acc, out);
        }
        if (!active) continue;
        if (sp >= 0) {  // this split's partial sums (f32) into the work buffer
            // element (row, col) of split s: with counters in this warpgroup's 64 x 128 half of
            // the tile's 128 x 128 slab for split s (`half`, slabs 16384 floats apart), else at
            // D's position in split s's m x n slab (fp8_splitk_reduce_*'s layout)
            float* half = q.work + (long long)(t - q.split_from) * splits * 16384 + wg * 64 * 128;
            auto part = [&](int s, int row, int col) -> long long {
                return q.counters ? (half - q.work) + (long long)s * 16384 + (row - row0) * 128 + (col - col0)
                                  : ((long long)s * p.m + row) * p.n + col;
            };
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const int c = col0 + j * 8 + (lane & 3) * 2;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (c + h >= p.n) continue;
                    if (ok0) q.work[part(sp, row0 + ra, c + h)] = out[j * 4 + h];
                    if (ok1) q.work[part(sp, row0 + ra + 8, c + h)] = out[j * 4 + 2 + h];
                }
            }
            if (q.counters) {
                // the warpgroup whose split of this tile finishes last sums every split's partial
                // into D in split order, as fp8_splitk_reduce_* does (so the same bits), and
                // re-arms the tile's counter (threadFenceReduction's pattern)
                __threadfence();
                named_bar_sync(1 + wg, 128);
                volatile int* last = (volatile int*)(smem + FP8T_BARS + 64 + 4 * wg);
                if ((tid & 127) == 0) {
                    int* cnt = q.counters + 2 * t + wg;
                    const int l = atomicAdd(cnt, 1) == splits - 1;
                    if (l) *cnt = 0;
                    *last = l;
                }
                named_bar_sync(1 + wg, 128);
                if (*last) {
                    // the warpgroup's 64 x 128 slab of every split, 16 float4 per thread (a row is 32
                    // float4: coalesced, and each split's 16 loads in flight at once rather than one
                    // L2 round trip per element), summed in split order from 0 as the reduce
                    // launch does (the same bits); the elements inside D stored
                    __threadfence();
                    const float4* slab = reinterpret_cast<const float4*>(half);
                    const int lt = tid & 127;
                    float4 sum[16];
#pragma unroll
                    for (int i = 0; i < 16; i++) sum[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 1
                    for (int s2 = 0; s2 < splits; s2++) {
                        const float4* src = slab + (long long)s2 * 4096;
#pragma unroll
                        for (int i = 0; i < 16; i++) {
                            const float4 x = __ldcg(src + lt + 128 * i);
                            sum[i].x += x.x, sum[i].y += x.y, sum[i].z += x.z, sum[i].w += x.w;
                        }
                    }
#pragma unroll
                    for (int i = 0; i < 16; i++) {
                        const int f = lt + 128 * i, row = row0 + (f >> 5), c = col0 + (f & 31) * 4;
                        if (row >= row_end) continue;
                        const float v[4] = {sum[i].x, sum[i].y, sum[i].z, sum[i].w};
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            if (c + e < p.n) fp8_store<TD>(p, row, c + e, v[e]);
                    }
                }
            }
            continue;
        }
        if constexpr (sizeof(TD) == 2) {
            if (q.store_d && (row_end - row0 >= 64 || row_end == p.m)) {
                tma_store_tile_bf16(&q.td, smem + FP8T_STORE + wg * 16384, out, col0, row0, p.n);
                continue;
            }
        }
        if (q.k_seg) {  // group e's D
            Fp8GemmArgs pe = p;
            pe.d = (void*)((TD*)p.d + (long long)e * q.stride_d);
            fp8_store_frag<TD>(pe, row0 + ra, ok0, ok1, col0, lane, out);
        } else {
            fp8_store_frag<TD>(p, row0 + ra, ok0, ok1, col0, lane, out);
        }
    }
    if (q.store_d && (tid & 127) == 0) bulk_wait<0>();  // the last stores done before the block ends
#else
    __trap();  // sm_90a only
#endif
}
extern "C" __global__ void __launch_bounds__(FP8T_THREADS, 1) fp8_gemm_tma_bf16(const __grid_constant__ Fp8TmaArgs q) {
    DSV3_PDL();
    fp8_gemm_tma<bf16>(q);
}
extern "C" __global__ void __launch_bounds__(FP8T_THREADS, 1) fp8_gemm_tma_f32(const __grid_constant__ Fp8TmaArgs q) {
    DSV3_PDL();
    fp8_gemm_tma<float>(q);
}

// Split-K's second pass: D[r, c] (+)= sum_s work[s][r][c], the splits added in order (one thread
// per element, grid-stride over m·n).
template <typename TD>
__device__ void fp8_splitk_reduce(const float* work, int splits, int m, int n, TD* d, int ldd, int accumulate) {
    const long long total = (long long)m * n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += work[(long long)s * total + i];
        const long long r = i / n, c = i - r * n;
        TD* dst = d + r * ldd + c;
        if (accumulate) v += to_f32(*dst);
        *dst = from_f32<TD>(v);
    }
}
extern "C" __global__ void fp8_splitk_reduce_bf16(const float* work, int splits, int m, int n, bf16* d, int ldd,
                                                  int accumulate) {
    DSV3_PDL();
    fp8_splitk_reduce<bf16>(work, splits, m, n, d, ldd, accumulate);
}
extern "C" __global__ void fp8_splitk_reduce_f32(const float* work, int splits, int m, int n, float* d, int ldd,
                                                 int accumulate) {
    DSV3_PDL();
    fp8_splitk_reduce<float>(work, splits, m, n, d, ldd, accumulate);
}
