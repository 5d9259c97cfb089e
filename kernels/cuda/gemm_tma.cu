// bf16 GEMM on sm_90a's wgmma with TMA operands, grouped by rows (the MoE experts' products of
// training): C[r, n] (+)= sum_k A[r, k] · W_g[n, k] for the rows r of group g, both operands
// K-contiguous (NT), f32 accumulation, C bf16 or f32 (GemmArgs: row_offsets / tile_offsets as
// moe_plan writes them in 64-row tiles, W_g = W + g·stride_w, GEMM_F32C, accumulate, bias).
// The NN product of the backward (dX = dY·W_g) runs here too, on Wᵀ from transpose_groups_bf16
// (ops/gemm_tma.rs).
//
// The structure of fp8_gemm_tma (fp8gemm.cu, correct on the H100), byte for byte the same shared
// layout: 288 threads = 2 consumer warpgroups + 1 producer warp. Block tile = 64-row tiles 2·mt
// and 2·mt + 1 (one per consumer warpgroup, each in its own group, so a stage holds B of both
// groups when they differ) x 128 columns. The producer's first thread streams 64-K slices (128
// bytes a row) of A and B by TMA (uint8 tensor maps over the bf16 bytes: dims {2k, rows}, boxes
// {128, 64} / {128, 128, 1}, 128-byte swizzle, zero fill past k, m and n) into a 4-stage ring:
// "full" mbarrier per stage (arrive.expect_tx + the TMA bytes), "empty" one (an arrival per
// consumer warp). A consumer warpgroup issues 4 wgmma m64n128k16 per slice into one accumulator
// over the whole K (no promotion: bf16 products accumulate in f32 in the tensor core), keeps one
// slice's MMAs in flight (wait_group 1 releases the slice before), and stores from registers or,
// for a bf16 C written without accumulate or bias (the experts'), by TMA stores from a staging
// buffer (fp8_gemm_tma's epilogue: the warpgroup starts the next tile while the store drains).
// Persistent: gridDim.x blocks walk the block tiles u = blockIdx.x + i·gridDim.x in tma_raster's
// order (bands of 8 row tiles, column-major inside a band: L2 reuse). Needs k > 0, lda, ldw (and
// stride_w) multiples of 8 elements, A and W 16-byte aligned.
// EMULATOR-VERIFIED (kernels/emu, wgmma_emu.h's bf16 form); not yet run on a GPU.
#include "common.cuh"
#include "gemm.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define GT_STAGES TMA_AB_STAGES  // the ring of tma.cuh: 4 x (A 2 x 64 rows x 128 B | B | B)
#define GT_STAGE_BYTES TMA_AB_STAGE_BYTES
#define GT_BARS (GT_STAGES * GT_STAGE_BYTES)  // full[s] at +8s, empty[s] at +32 + 8s
#define GT_STORE (GT_BARS + 1024)              // the TMA-store staging: 16 KiB per warpgroup

struct GemmTmaArgs {
    TmaDesc ta;  // A: uint8 dims {2k, m}, stride 2·lda, box {128, 64}, 128B swizzle
    TmaDesc tb;  // W: uint8 dims {2k, n, groups}, strides {2·ldw, 2·stride_w}, box {128, 128, 1}
    GemmArgs p;
    // store_c != 0 (bf16 C, accumulate = 0, no bias): a warpgroup's finished 64 x 128 tile leaves
    // through its 16 KiB staging buffer by two TMA stores through tc (uint8 dims {2n, m}, stride
    // 2·ldc, box {128, 64}, 128B swizzle) while it goes on to the next tile; partial tiles with
    // another group's rows below them store from registers
    int store_c;
    TmaDesc tc;
};

// Block tile u (of mtiles x ntiles, in tma_raster's order; act0 false past the last tile).
__device__ __forceinline__ TmaTile gt_tile(const GemmArgs& p, int u, int mtiles, int ntiles) {
    return tma_tile(u, mtiles, ntiles,
                    [&](int t64, int& row0, int& row_end, int& g) { return gemm_group_tile(p, t64, row0, row_end, g); });
}

// C[row, c], C[row, c + 1] (+ bias) (+ C): one paired store where the address allows it.
template <typename TC>
__device__ __forceinline__ void gt_store2(const GemmArgs& p, int row, int c, float v0, float v1) {
    TC* dst = (TC*)p.c + (long long)row * p.ldc + c;
    if (p.bias) {
        v0 += p.bias[c];
        if (c + 1 < p.n) v1 += p.bias[c + 1];
    }
    if (c + 1 < p.n && ((uintptr_t)dst & (2 * sizeof(TC) - 1)) == 0) {
        if (p.accumulate) {
            v0 += to_f32(dst[0]);
            v1 += to_f32(dst[1]);
        }
        if constexpr (sizeof(TC) == 4) {
            *(float2*)dst = make_float2(v0, v1);
        } else {
            *(__nv_bfloat162*)dst = __floats2bfloat162_rn(v0, v1);
        }
        return;
    }
    if (p.accumulate) v0 += to_f32(dst[0]);
    dst[0] = from_f32<TC>(v0);
    if (c + 1 < p.n) {
        if (p.accumulate) v1 += to_f32(dst[1]);
        dst[1] = from_f32<TC>(v1);
    }
}

template <typename TC>
__device__ void gemm_tma_grouped(const GemmTmaArgs& q) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const GemmArgs& p = q.p;
    DSV3_DYNAMIC_SMEM(smem_raw);
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sbase = (raw + 1023) & ~1023u;  // 128B-swizzled boxes need 1024-byte alignment
    unsigned char* smem = smem_raw + (sbase - raw);
    const uint32_t bars = sbase + GT_BARS;
    const int tid = threadIdx.x;
    const int tiles64 = p.tile_offsets[p.groups];
    const int ntiles = (p.n + 127) >> 7, mtiles = (tiles64 + 1) >> 1, units = mtiles * ntiles;
    const int nks = (p.k + 63) >> 6;  // 64-K slices
    if (tid == 0) tma_ring_init(bars);
    __syncthreads();  // the last block-wide barrier: the producer warp's idle lanes leave below

    if (tid >= 256) {  // ---- producer warp
        if (tid != 256) return;
        tma_prefetch_desc(&q.ta);
        tma_prefetch_desc(&q.tb);
        int it = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            const TmaTile x = gt_tile(p, u, mtiles, ntiles);
            if (x.act0) tma_produce_ab(sbase, bars, it, &q.ta, &q.tb, x, 0, nks);
        }
        return;
    }

    // ---- consumers: warpgroup wg, accumulator rows ra and ra + 8 of its 64-row tile
    const int wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3;
    const int ra = warp * 16 + (lane >> 2);
    float acc[64];
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const TmaTile x = gt_tile(p, u, mtiles, ntiles);
        if (!x.act0) continue;  // past the last tile (the producer skips it too)
        const bool active = wg == 0 || x.act1;
        const int row0 = wg ? x.r0b : x.r0a, row_end = wg ? x.reb : x.rea;
        const uint32_t a_off = wg * 8192, b_off = 16384 + ((x.two_b && wg) ? 16384 : 0);
        // (an idle warpgroup 1 multiplies whatever its A slot holds and discards it: a branch
        // around the wgmmas makes ptxas serialize them, C7518)
        for (int ks = 0; ks < nks; ks++, it++) {
            const int s = it % GT_STAGES;
            mbar_wait(bars + 8 * s, (it / GT_STAGES) & 1);  // slice ks landed
            const unsigned char* st = smem + s * GT_STAGE_BYTES;
            fence_acc(acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wgmma_m64n128k16_bf16(acc, wg_desc_sw128(st + a_off + kk * 32), wg_desc_sw128(st + b_off + kk * 32),
                                      ks > 0 || kk > 0);
            wgmma_commit();
            // the previous slice's MMAs are done: its stage goes back to the producer
            wgmma_wait<1>();
            fence_acc(acc);
            if (ks > 0 && lane == 0) mbar_arrive(bars + 32 + 8 * ((it - 1) % GT_STAGES));
        }
        wgmma_wait<0>();
        fence_acc(acc);
        if (lane == 0) mbar_arrive(bars + 32 + 8 * ((it - 1) % GT_STAGES));
        if (!active) continue;
        if constexpr (sizeof(TC) == 2) {
            if (q.store_c && (row_end - row0 >= 64 || row_end == p.m)) {
                tma_store_tile_bf16(&q.tc, smem + GT_STORE + wg * 16384, acc, x.col0, row0, p.n);
                continue;
            }
        }
        const bool ok0 = row0 + ra < row_end, ok1 = row0 + ra + 8 < row_end;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int c = x.col0 + j * 8 + (lane & 3) * 2;
            if (c >= p.n) continue;
            if (ok0) gt_store2<TC>(p, row0 + ra, c, acc[j * 4], acc[j * 4 + 1]);
            if (ok1) gt_store2<TC>(p, row0 + ra + 8, c, acc[j * 4 + 2], acc[j * 4 + 3]);
        }
    }
    if (q.store_c && (tid & 127) == 0) bulk_wait<0>();  // the last stores done before the block ends
#else
    __trap();  // sm_90a only
#endif
}
extern "C" __global__ void __launch_bounds__(288, 1) gemm_tma_grouped_bf16(const __grid_constant__ GemmTmaArgs q) {
    DSV3_PDL();
    if (q.p.flags & GEMM_F32C) gemm_tma_grouped<float>(q);
    else gemm_tma_grouped<bf16>(q);
}

// Wᵀ per group for the NN product: dst[g][c][r] = src[g][r][c] (src rows of ld_src, dst rows of
// ld_dst elements; groups g at g·stride_src / g·stride_dst), 32x32 tiles through shared memory
// (rows x cols of src: grid (ceil(cols/32), ceil(rows/32), groups), 32 x 8 threads).
extern "C" __global__ void __launch_bounds__(256) transpose_groups_bf16(const bf16* __restrict__ src, long long ld_src,
                                                                      long long stride_src, int rows, int cols,
                                                                      bf16* __restrict__ dst, long long ld_dst,
                                                                      long long stride_dst) {
    DSV3_PDL();
    __shared__ bf16 t[32][33];
    const bf16* S = src + (long long)blockIdx.z * stride_src;
    bf16* D = dst + (long long)blockIdx.z * stride_dst;
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32, tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    for (int i = ty; i < 32; i += 8) {
        const int r = r0 + i, c = c0 + tx;
        if (r < rows && c < cols) t[i][tx] = S[(long long)r * ld_src + c];
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 8) {
        const int c = c0 + i, r = r0 + tx;
        if (r < rows && c < cols) D[(long long)c * ld_dst + r] = t[tx][i];
    }
}
