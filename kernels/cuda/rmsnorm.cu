// RMSNorm per row: y = x * rsqrt(mean(x^2) + eps) * w, statistics in f32 (core/src/ops/norm.rs).
// x and y may alias (in place); rows are strided so the latent part of a [C + dr] row can be
// normalized where it lies. grid: (rows), block: 256.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm(const T* x, int ldx, T* y, int ldy, const float* __restrict__ w, int d, float eps, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (long long)r * ldx;
    T* yr = y + (long long)r * ldy;
    float inv = row_inv_rms(xr, d, eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) * inv * w[j]);
}

extern "C" __global__ void rmsnorm_f32(const float* x, int ldx, float* y, int ldy, const float* w, int d, float eps,
                                       int rows) {
    DSV3_PDL();
    rmsnorm<float>(x, ldx, y, ldy, w, d, eps, rows);
}
extern "C" __global__ void rmsnorm_bf16(const bf16* x, int ldx, bf16* y, int ldy, const float* w, int d, float eps,
                                        int rows) {
    DSV3_PDL();
    rmsnorm<bf16>(x, ldx, y, ldy, w, d, eps, rows);
}
