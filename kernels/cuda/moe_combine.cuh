// The weighted MoE combine, x[t, j] += shared[t, j] + Σ_q w[t, q] · y[slot_of[t, q], j], shared by
// moe.cu's moe_combine and the routed experts' down GEMM that does it itself (gemm.cu,
// gemm_skinny_combine_*), so the two give the same bits.
// y [n·k, d] (the experts' rows in the dispatch plan's order), slot_of / idx / w [n, k], shared
// [n, d] or null, x [n, d]. The routed terms are added in ascending expert order into a sum
// starting at 0 (as the CPU path adds them). y is read through L2 (__ldcg): in the fused form
// other blocks of the same grid wrote it.
#pragma once
#include "common.cuh"

#define MOE_KMAX 16

// order[0 .. k): token t's routing slots q sorted by expert idx[t, q] (insertion sort, stable).
__device__ __forceinline__ void moe_combine_order(const int* __restrict__ idx, int t, int k, int* order) {
    for (int q = 0; q < k; q++) order[q] = q;
    for (int a = 1; a < k; a++)
        for (int b = a; b > 0 && idx[t * k + order[b]] < idx[t * k + order[b - 1]]; b--) {
            int tmp = order[b];
            order[b] = order[b - 1];
            order[b - 1] = tmp;
        }
}

// x[t, j] += shared[t, j] + Σ w·y for one element, the slots in `order` (moe_combine_order).
template <typename T>
__device__ __forceinline__ void moe_combine_elem(const T* y, const int* __restrict__ slot_of,
                                                 const float* __restrict__ w, const T* __restrict__ shared, T* x,
                                                 const int* order, int t, int j, int k, int d) {
    float r = 0.0f;
    for (int q = 0; q < k; q++) {
        int o = order[q];
        int s = slot_of[t * k + o];
        if (s >= 0) r += w[t * k + o] * to_f32(__ldcg(y + (long long)s * d + j));
    }
    float o = shared ? to_f32(shared[(long long)t * d + j]) + r : r;
    long long at = (long long)t * d + j;
    x[at] = from_f32<T>(to_f32(x[at]) + o);
}
