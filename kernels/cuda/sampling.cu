// Sampling helpers: argmax per row (greedy decoding; first index on ties, as
// core::infer::sampling::argmax) and an in-place softmax with temperature.
#include "common.cuh"

// out[r] = argmax_j x[r, j]. grid: (rows), block: 1024. NaN never wins (a row of NaN gives 0).
// Each thread scans its elements in index order (4 at a time with 16-byte loads when n % 4 == 0,
// so a 32000-wide row takes 8 rounds); the candidates (value, index) are merged by warp shuffles
// and then across warps, always preferring the larger value and then the lower index.
__device__ __forceinline__ void am_take(float v, int j, float& best, int& bi) {
    if (v > best || (v == best && j < bi)) {
        best = v;
        bi = j;
    }
}
extern "C" __global__ void __launch_bounds__(1024)
    argmax_rows_f32(const float* __restrict__ x, int rows, int n, int* __restrict__ out) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * n;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    if ((n & 3) == 0) {
        const float4* x4 = (const float4*)xr;
        for (int q = threadIdx.x; q < n / 4; q += blockDim.x) {
            float4 v = x4[q];
            am_take(v.x, 4 * q, best, bi);
            am_take(v.y, 4 * q + 1, best, bi);
            am_take(v.z, 4 * q + 2, best, bi);
            am_take(v.w, 4 * q + 3, best, bi);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) am_take(xr[j], j, best, bi);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, best, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        am_take(v, i, best, bi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? sv[lane] : -__int_as_float(0x7f800000);
        bi = lane < warps ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float v = __shfl_xor_sync(0xffffffffu, best, o);
            int i = __shfl_xor_sync(0xffffffffu, bi, o);
            am_take(v, i, best, bi);
        }
        if (lane == 0) out[r] = bi == 0x7fffffff ? 0 : bi;
    }
}

// x[r, :] = softmax(x[r, :] / temperature) in place (core/src/ops/softmax.rs; -inf -> 0).
// grid: (rows), block: 256.
extern "C" __global__ void softmax_rows_f32(float* x, int rows, int n, float temperature) {
    int r = blockIdx.x;
    if (r >= rows) return;
    float* xr = x + (long long)r * n;
    float inv_t = 1.0f / temperature;
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, xr[j] * inv_t);
    m = block_max(m);
    if (m == -__int_as_float(0x7f800000)) {
        for (int j = threadIdx.x; j < n; j += blockDim.x) xr[j] = 0.0f;
        return;
    }
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = dsv3_exp(xr[j] * inv_t - m);
        xr[j] = e;
        s += e;
    }
    s = block_sum(s);
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < n; j += blockDim.x) xr[j] *= inv;
}
