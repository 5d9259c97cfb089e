// Sampling helpers: argmax per row (greedy decoding; first index on ties, as
// core::infer::sampling::argmax) and an in-place softmax with temperature.
#include "common.cuh"

// out[r] = argmax_j x[r, j]. grid: (rows), block: 256. NaN never wins.
extern "C" __global__ void argmax_rows_f32(const float* __restrict__ x, int rows, int n, int* __restrict__ out) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * n;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = xr[j];
        if (v > best || (v == best && j < bi)) { best = v; bi = j; }
    }
    __shared__ float sv[256];
    __shared__ int si[256];
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float v = sv[threadIdx.x + s];
            int i = si[threadIdx.x + s];
            if (v > sv[threadIdx.x] || (v == sv[threadIdx.x] && i < si[threadIdx.x])) {
                sv[threadIdx.x] = v;
                si[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = si[0] == 0x7fffffff ? 0 : si[0];
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
