// Elementwise ops: SwiGLU over a fused gate|up row, in-place add, dtype casts.
#include "common.cuh"

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i] (core/src/ops/swiglu.rs).
// grid: (ceil(inter / 256), min(rows, 65535)), block: 256; rows grid-stride over y.
template <typename T>
__device__ void swiglu(const T* __restrict__ gu, int ld, T* __restrict__ out, int ldo, int inter, int rows) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= inter) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float g = to_f32(gu[(long long)r * ld + i]), u = to_f32(gu[(long long)r * ld + inter + i]);
        out[(long long)r * ldo + i] = from_f32<T>(g * dsv3_sigmoid(g) * u);
    }
}
extern "C" __global__ void swiglu_f32(const float* gu, int ld, float* out, int ldo, int inter, int rows) {
    DSV3_PDL();
    swiglu<float>(gu, ld, out, ldo, inter, rows);
}
extern "C" __global__ void swiglu_bf16(const bf16* gu, int ld, bf16* out, int ldo, int inter, int rows) {
    DSV3_PDL();
    swiglu<bf16>(gu, ld, out, ldo, inter, rows);
}

// x[i] += y[i]. grid: (ceil(n / 256)), block: 256.
extern "C" __global__ void add_f32(float* x, const float* y, long long n) {
    DSV3_PDL();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
extern "C" __global__ void add_bf16(bf16* x, const bf16* y, long long n) {
    DSV3_PDL();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __float2bfloat16_rn(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

// Casts (round to nearest even). grid: (ceil(n / 256)), block: 256.
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long long n) {
    DSV3_PDL();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long long n) {
    DSV3_PDL();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __bfloat162float(x[i]);
}
