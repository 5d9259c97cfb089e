// Optimizer-step helpers for the trainer (kernels/src/train/trainer.rs, core's Trainer::apply_gradients):
// the global gradient norm as a sum of squares in f64 (per-tensor partial sums, then one fixed-order
// reduction; deterministic for given sizes). The clip factor is applied inside AdamW (train.cu).
#include "common.cuh"

// f64 sum over the block through shared memory (blockDim.x a power of two, <= 1024); thread 0
// gets the result. Every thread of the block must call it.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double s[1024];
    s[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x >> 1; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    return s[0];
}

// ---- partial sums of squares: block b writes partial[b] = Σ x[i]² (f64) over
// i ∈ [b·chunk, min((b+1)·chunk, n)). grid: (ceil(n / chunk)), block: 256 (a power of two).
extern "C" __global__ void sumsq_f32(const float* __restrict__ x, long long n, long long chunk,
                                     double* __restrict__ partial) {
    DSV3_PDL();
    long long lo = (long long)blockIdx.x * chunk;
    long long hi = lo + chunk < n ? lo + chunk : n;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        double v = (double)x[i];
        acc += v * v;
    }
    double t = block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = t;
}

// ---- out[0] = Σ partial[0..n) (f64, fixed order). grid: (1), block: 1024 (a power of two).
extern "C" __global__ void sum_f64(const double* __restrict__ partial, int n, double* __restrict__ out) {
    DSV3_PDL();
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    double t = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = t;
}
