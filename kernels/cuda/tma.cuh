// The inline-PTX helpers of the sm_90a TMA + mbarrier pipelines (fp8gemm.cu's fp8_gemm_tma_*):
// shared-memory mbarriers (init, arrive, arrive with an expected transaction count, parity wait),
// tiled tensor loads through a tensor map (cp.async.bulk.tensor, completing on an mbarrier),
// tiled tensor stores from shared memory (bulk groups: commit, wait until read / until done),
// named barriers (a warpgroup's own barrier) and the tensor-map argument type; and the staging of
// a warpgroup's m64n128 accumulator fragment as bf16 for such a store (plain C++, emulated as is).
// The CPU emulator (kernels/emu/include/tma_emu.h) defines DSV3_EMU and supplies its own versions
// of exactly the inline-PTX functions (mbarrier phases and transaction counts as the PTX ISA
// defines them, TMA boxes with zero fill out of bounds and the 128-byte swizzle, stores that read
// shared memory at their wait or at issue, named barriers).
#pragma once
#include <stdint.h>

#include "mma.cuh"    // smem_u32
#include "wgmma.cuh"  // fence_proxy_async

// A CUtensorMap (cuda.h: 128 bytes, 64-byte aligned, opaque; the host encodes it with
// cuTensorMapEncodeTiled and passes it inside a __grid_constant__ kernel argument).
struct __align__(64) TmaDesc {
    unsigned long long v[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(DSV3_EMU)
// mbarrier at shared address `bar` expecting `count` arrivals per phase.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialized mbarriers visible to the other threads and to the async (TMA) proxy.
__device__ __forceinline__ void mbar_fence_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// One arrival.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also expects `bytes` more transaction bytes in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// Fetches the tensor map into the TMA unit's cache.
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* d) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)d) : "memory");
}
// Box at coordinates (c0 innermost, c1) of tensor map `d` into shared `dst`; its bytes complete
// on mbarrier `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
            dst),
        "l"((uint64_t)d), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
        "[%2];\n" ::"r"(dst),
        "l"((uint64_t)d), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}
// Shared `src` (the box, laid out as a load would leave it) into the box at coordinates (c0
// innermost, c1) of tensor map `d`; elements past the tensor's dims are not written. Joins the
// thread's current bulk group.
__device__ __forceinline__ void tma_store_2d(const TmaDesc* d, uint32_t src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((uint64_t)d),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
}
// Closes the thread's current bulk group.
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of the thread's bulk groups still read their shared sources (the buffers
// of the others may be written again).
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of the thread's bulk groups are incomplete (their writes done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads') of `count` threads, whole warps.
__device__ __forceinline__ void named_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
#endif

// The persistent GEMMs' walk order (L2 rasterization, as CUTLASS's and DeepGEMM's swizzled tile
// schedulers): block tile t of mtiles x ntiles is row tile mt, column tile nt, taken in bands of
// TMA_RASTER row tiles, column-major inside a band. The blocks running at once (consecutive t)
// then share TMA_RASTER row tiles of A and ~SMs / TMA_RASTER column tiles of B, instead of ~SMs /
// ntiles row tiles and every column tile (all of B) per wave: a smaller L2 working set where B is
// larger than L2 (e.g. N x K = 7168 x 16384). Any order gives the same results.
#define TMA_RASTER 8
__device__ __forceinline__ void tma_raster(int t, int mtiles, int ntiles, int& mt, int& nt) {
    const int band = t / (TMA_RASTER * ntiles), first = band * TMA_RASTER;
    const int rows = min(TMA_RASTER, mtiles - first), r = t - band * TMA_RASTER * ntiles;
    mt = first + r % rows;
    nt = r / rows;
}

// A block tile of the two TMA GEMMs (fp8_gemm_tma, gemm_tma_grouped): 64-row tiles 2·mt (rows
// [r0a, rea) of group ga, warpgroup 0's; act0) and 2·mt + 1 ([r0b, reb) of group gb, warpgroup
// 1's; act1) x the 128 columns from col0; two_b: the two row tiles' groups differ, so a ring stage
// holds both groups' B tiles.
struct TmaTile {
    int col0, r0a, rea, ga, r0b, reb, gb;
    bool act0, act1, two_b;
};
// Block tile t of mtiles x ntiles in tma_raster's order; tile64(t64, row0, row_end, g) says
// whether 64-row tile t64 exists and its rows and group.
template <typename Tile64>
__device__ __forceinline__ TmaTile tma_tile(int t, int mtiles, int ntiles, Tile64 tile64) {
    TmaTile x;
    int mt, nt;
    tma_raster(t, mtiles, ntiles, mt, nt);
    x.col0 = nt * 128;
    x.act0 = tile64(2 * mt, x.r0a, x.rea, x.ga);
    if (!x.act0) x.r0a = x.rea = 0, x.ga = 0;
    x.act1 = x.act0 && tile64(2 * mt + 1, x.r0b, x.reb, x.gb);
    if (!x.act1) x.r0b = x.reb = 0, x.gb = x.ga;
    x.two_b = x.act1 && x.gb != x.ga;
    return x;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(DSV3_EMU)
// The two TMA GEMMs' ring: TMA_AB_STAGES stages of TMA_AB_STAGE_BYTES from a 1024-byte aligned
// base, each A (2 x 64 rows x 128 bytes) | B of warpgroup 0's group (128 x 128 bytes) | B of
// warpgroup 1's; its mbarriers at `bars`: full[s] at +8s (the producer's arrive.expect_tx + the
// TMA bytes), empty[s] at +32 + 8s (one arrival per consumer warp).
#define TMA_AB_STAGES 4
#define TMA_AB_STAGE_BYTES (3 * 16384)
__device__ __forceinline__ void tma_ring_init(uint32_t bars) {
    for (int s = 0; s < TMA_AB_STAGES; s++) {
        mbar_init(bars + 8 * s, 1);
        mbar_init(bars + 32 + 8 * s, 8);
    }
    mbar_fence_init();
}
// The producer's loads of tile x's 128-byte K slices [s0, s1) (A through map ta at byte column
// 128·s, rows r0a / r0b; B through tb, rows col0.., groups ga / gb) into the ring at sbase, stage
// `it` % TMA_AB_STAGES for the it-th slice of the walk (it counts on): each stage once the
// consumers freed it.
__device__ __forceinline__ void tma_produce_ab(uint32_t sbase, uint32_t bars, int& it, const TmaDesc* ta,
                                               const TmaDesc* tb, const TmaTile& x, int s0, int s1) {
    const uint32_t bytes = 8192u * (x.act1 ? 2u : 1u) + 16384u * (x.two_b ? 2u : 1u);
    for (int ks = s0; ks < s1; ks++, it++) {
        const int s = it % TMA_AB_STAGES;
        const uint32_t st = sbase + s * TMA_AB_STAGE_BYTES, full = bars + 8 * s;
        mbar_wait(bars + 32 + 8 * s, ((it / TMA_AB_STAGES) & 1) ^ 1);
        mbar_arrive_expect_tx(full, bytes);
        tma_load_2d(st, ta, full, ks * 128, x.r0a);
        if (x.act1) tma_load_2d(st + 8192, ta, full, ks * 128, x.r0b);
        tma_load_3d(st + 16384, tb, full, ks * 128, x.col0, x.ga);
        if (x.two_b) tma_load_3d(st + 32768, tb, full, ks * 128, x.col0, x.gb);
    }
}
#endif

// A warpgroup's m64n128 f32 accumulator fragment (warp `warp` of 4, lane `lane`: rows 16·warp +
// lane/4 and + 8, columns 8j + 2·(lane % 4) + e at out[4j + 2h + e], as the wgmma m64n128 f32
// fragment) rounded to bf16 into the 16 KiB staging buffer `buf` (1024-byte aligned) of two TMA
// store boxes: columns [0, 64) and [64, 128), each 64 rows x 128 bytes in the 128-byte swizzle
// (row r's 16-byte chunk j at chunk j ^ (r % 8) of its line). Each warp's 4-byte stores touch 32
// different banks. The same rounding as a paired register store (__floats2bfloat162_rn).
__device__ __forceinline__ void tma_stage_bf16_m64n128(unsigned char* buf, int warp, int lane, const float* out) {
    const int r0 = warp * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < 16; j++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = r0 + 8 * h, c = j * 8 + (lane & 3) * 2;
            const uint32_t lin = (uint32_t)((c >> 6) * 8192 + r * 128 + (c & 63) * 2);
            *(__nv_bfloat162*)(buf + (lin ^ (((lin >> 7) & 7) << 4))) =
                __floats2bfloat162_rn(out[j * 4 + 2 * h], out[j * 4 + 2 * h + 1]);
        }
    }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(DSV3_EMU)
// The TMA-store epilogue of the calling consumer warpgroup (threads 128·wg .. 128·wg + 127 of
// the block, named barrier 1 + wg): its finished m64n128 fragment `frag` (columns col0.., rows
// row0..) through its staging buffer `buf` (1024-byte aligned, 16 KiB) into the bf16 tensor of
// map `d` (uint8 dims {2n, rows}, box {128, 64}, 128B swizzle): the warpgroup's first thread
// waits until its previous store has read the buffer, all stage the fragment and fence it to the
// async proxy, then the first thread stores the one or two 64-column boxes (the second only where
// col0 + 64 < n) and commits them. The warpgroup can go on while the stores drain; before the
// block ends its first thread must bulk_wait<0>().
__device__ __forceinline__ void tma_store_tile_bf16(const TmaDesc* d, unsigned char* buf, const float* frag, int col0,
                                                    int row0, int n) {
    const int tid = threadIdx.x, wg = tid >> 7;
    const bool leader = (tid & 127) == 0;
    if (leader) bulk_wait_read<0>();
    named_bar_sync(1 + wg, 128);
    tma_stage_bf16_m64n128(buf, (tid >> 5) & 3, tid & 31, frag);
    fence_proxy_async();
    named_bar_sync(1 + wg, 128);
    if (leader) {
        const uint32_t a = smem_u32(buf);
        tma_store_2d(d, a, 2 * col0, row0);
        if (col0 + 64 < n) tma_store_2d(d, a + 8192, 2 * (col0 + 64), row0);
        bulk_commit();
    }
}
#endif
