// Host stand-in for <cuda_bf16.h> and the CUDA built-ins the kernels use, for the CPU emulations
// in kernels/emu/ (never used by the real build). Threads are fibers (emu.h, which includes this
// first); warp collectives and __syncthreads are emulated there.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
// static __shared__ arrays: one instance shared by the block's threads (blocks run one at a time)
#define __shared__ static
// dynamic shared memory: the emulator's buffer (kernels/cuda/common.cuh declares it on the GPU)
namespace emu {
extern unsigned char dyn_smem[];
}
#define DSV3_DYNAMIC_SMEM(name) static unsigned char* const name = emu::dyn_smem
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__

using std::isnan;
using std::isinf;

struct __nv_bfloat16 {
    uint16_t bits;
};
// the GPU's alignments (4 and 8 bytes): run.sh builds with -fsanitize=alignment, so a paired
// store or load at an address the GPU would fault on (CUDA_ERROR_MISALIGNED_ADDRESS) stops the
// emulation here too
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
// vector types of the skinny GEMMs' 16- and 8-byte loads (x86 is little-endian, as the GPU)
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
    uint32_t x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
// read-only global loads: plain loads here
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline float __uint_as_float(uint32_t v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline uint32_t __float_as_uint(float f) {
    uint32_t v;
    std::memcpy(&v, &f, 4);
    return v;
}
// shared/global atomics: a fiber runs until it reaches a collective or barrier, so a plain
// read-modify-write is atomic here
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned o = *p;
    *p = o + v;
    return o;
}
inline int atomicAdd(int* p, int v) {
    int o = *p;
    *p = o + v;
    return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    *p = o + v;
    return o;
}
inline float atomicAdd(float* p, float v) {
    float o = *p;
    *p = o + v;
    return o;
}
inline int atomicMin(int* p, int v) {
    int o = *p;
    if (v < o) *p = v;
    return o;
}
inline int atomicMax(int* p, int v) {
    int o = *p;
    if (v > o) *p = v;
    return o;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

struct emu_dim3 {
    unsigned x, y, z;
};
namespace emu {
inline int cur_tid();
extern emu_dim3 block_idx, block_dim;
inline const emu_dim3& grid_dim_read();
}  // namespace emu
#define threadIdx (emu_dim3{(unsigned)emu::cur_tid(), 0u, 0u})
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
// gridDim is only known inside emu::launch (run_block alone reads it as a failure)
#define gridDim (emu::grid_dim_read())
