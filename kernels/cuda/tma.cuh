// The inline-PTX helpers of the sm_90a TMA + mbarrier pipelines (fp8gemm.cu's fp8_gemm_tma_*):
// shared-memory mbarriers (init, arrive, arrive with an expected transaction count, parity wait),
// tiled tensor loads through a tensor map (cp.async.bulk.tensor, completing on an mbarrier) and
// the tensor-map argument type. The CPU emulator (kernels/emu/include/tma_emu.h) defines DSV3_EMU
// and supplies its own versions of exactly these functions (mbarrier phases and transaction counts
// as the PTX ISA defines them, TMA boxes with zero fill out of bounds and the 128-byte swizzle).
#pragma once
#include <stdint.h>

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
#endif
