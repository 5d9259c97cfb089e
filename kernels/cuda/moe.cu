// DeepSeekMoE on device: the router (core/src/model/moe.rs Router::select), the dispatch plan
// (token permutation), and the weighted combine. The expert GEMMs are gemm.cu's grouped mode.
#include "common.cuh"
#include "gemm.cuh"

#define MOE_EMAX 512
#define MOE_KMAX 16

// Indices of the k largest of v[0..n) into out (descending; ties: lower index first).
__device__ void topk_desc(const float* v, int n, int k, int* out) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++) {
            bool taken = false;
            for (int q = 0; q < j; q++) taken |= out[q] == i;
            if (taken) continue;
            if (best < 0 || v[i] > v[best]) best = i;
        }
        out[j] = best;
    }
}

// Per token (one thread each): scores (sigmoid or softmax of the logits), selection on
// scores + bias limited to the best groups (noaux_tc: group score = sum of its two best biased
// scores, other groups -inf; group_limited_greedy: group max, others 0; greedy: plain top-k),
// weights = chosen unbiased scores, normalized (norm: / (sum + 1e-20)) and times `scaling`.
// logits [n, e] f32; bias [e] or null; idx_out [n, k] int; w_out [n, k] f32.
// scoring: 0 sigmoid, 1 softmax. method: 0 noaux_tc, 1 greedy, 2 group_limited_greedy.
// grid: (ceil(n / 64)), block: 64. e <= 512, k <= 16.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int n, int e, const float* __restrict__ bias,
                                     int n_group, int topk_group, int k, int norm, float scaling, int scoring,
                                     int method, int* __restrict__ idx_out, float* __restrict__ w_out) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n || e > MOE_EMAX || k > MOE_KMAX || n_group < 1 || e % n_group) return;
    float s[MOE_EMAX], sel[MOE_EMAX];
    const float* l = logits + (long long)t * e;
    if (scoring == 0) {
        for (int i = 0; i < e; i++) s[i] = dsv3_sigmoid(l[i]);
    } else {
        float m = -__int_as_float(0x7f800000);
        for (int i = 0; i < e; i++) m = fmaxf(m, l[i]);
        float z = 0.0f;
        for (int i = 0; i < e; i++) {
            s[i] = dsv3_exp(l[i] - m);
            z += s[i];
        }
        float inv = 1.0f / z;
        for (int i = 0; i < e; i++) s[i] *= inv;
    }
    for (int i = 0; i < e; i++) sel[i] = (method == 0 && bias) ? s[i] + bias[i] : s[i];
    if (method != 1) {
        int gsize = e / n_group;
        float gs[64];
        int top[MOE_KMAX > 64 ? MOE_KMAX : 64];
        for (int g = 0; g < n_group && g < 64; g++) {
            if (method == 0) {
                int t2[2];
                int kk = gsize < 2 ? gsize : 2;
                topk_desc(sel + g * gsize, gsize, kk, t2);
                float sum = 0.0f;
                for (int q = 0; q < kk; q++) sum += sel[g * gsize + t2[q]];
                gs[g] = sum;
            } else {
                float m = -__int_as_float(0x7f800000);
                for (int q = 0; q < gsize; q++) m = fmaxf(m, sel[g * gsize + q]);
                gs[g] = m;
            }
        }
        int keep = topk_group < n_group ? topk_group : n_group;
        topk_desc(gs, n_group, keep, top);
        float fill = method == 0 ? -__int_as_float(0x7f800000) : 0.0f;
        for (int i = 0; i < e; i++) {
            bool kept = false;
            for (int q = 0; q < keep; q++) kept |= top[q] == i / gsize;
            if (!kept) sel[i] = fill;
        }
    }
    int idx[MOE_KMAX];
    topk_desc(sel, e, k, idx);
    float w[MOE_KMAX];
    float denom = 0.0f;
    for (int j = 0; j < k; j++) {
        w[j] = s[idx[j]];
        denom += w[j];
    }
    denom += 1e-20f;
    for (int j = 0; j < k; j++) {
        float v = norm ? w[j] / denom : w[j];
        idx_out[(long long)t * k + j] = idx[j];
        w_out[(long long)t * k + j] = v * scaling;
    }
}

// The dispatch plan for nk = n * k routed rows: counts per expert, row_offsets [e + 1] (rows of
// the permuted order per expert), tile_offsets [e + 1] (GEMM_BM-row tiles per expert, for the
// grouped GEMM), slot_of [nk] (where routed row j = t * k + q went) and src_row [nk] (the token
// each permuted row copies). Order within an expert is arbitrary; results do not depend on it
// (rows are independent in the GEMMs and moe_combine sums in a fixed order).
// grid: (1), block: 1024. e <= 1024.
extern "C" __global__ void moe_plan(const int* __restrict__ idx, int nk, int k, int e, int* __restrict__ row_offsets,
                                    int* __restrict__ tile_offsets, int* __restrict__ slot_of,
                                    int* __restrict__ src_row) {
    __shared__ int cnt[1024], fill[1024];
    if (e > 1024) return;
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        cnt[i] = 0;
        fill[i] = 0;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        int x = idx[j];
        if (x >= 0 && x < e) atomicAdd(&cnt[x], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int r = 0, tl = 0;
        for (int i = 0; i < e; i++) {
            row_offsets[i] = r;
            tile_offsets[i] = tl;
            int c = cnt[i];
            r += c;
            tl += (c + GEMM_BM - 1) / GEMM_BM;
            cnt[i] = row_offsets[i];
        }
        row_offsets[e] = r;
        tile_offsets[e] = tl;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        int x = idx[j];
        int pos = -1;
        if (x >= 0 && x < e) {
            pos = cnt[x] + atomicAdd(&fill[x], 1);
            src_row[pos] = j / k;
        }
        slot_of[j] = pos;
    }
}

// x[t, :] += shared[t, :] + Σ_q w[t, q] · y[slot_of[t, q], :], the routed terms added in
// ascending expert order into a sum starting at 0 (as the CPU path adds them).
// y [nk, d], shared [n, d] or null. grid: (n), block: 256.
template <typename T>
__device__ void moe_combine(const T* __restrict__ y, const int* __restrict__ slot_of, const int* __restrict__ idx,
                            const float* __restrict__ w, const T* __restrict__ shared, T* x, int n, int k, int d) {
    int t = blockIdx.x;
    if (t >= n || k > MOE_KMAX) return;
    int order[MOE_KMAX];
    for (int q = 0; q < k; q++) order[q] = q;
    for (int a = 1; a < k; a++)
        for (int b = a; b > 0 && idx[t * k + order[b]] < idx[t * k + order[b - 1]]; b--) {
            int tmp = order[b];
            order[b] = order[b - 1];
            order[b - 1] = tmp;
        }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float r = 0.0f;
        for (int q = 0; q < k; q++) {
            int o = order[q];
            int s = slot_of[t * k + o];
            if (s >= 0) r += w[t * k + o] * to_f32(y[(long long)s * d + j]);
        }
        float o = shared ? to_f32(shared[(long long)t * d + j]) + r : r;
        long long at = (long long)t * d + j;
        x[at] = from_f32<T>(to_f32(x[at]) + o);
    }
}
extern "C" __global__ void moe_combine_f32(const float* y, const int* slot_of, const int* idx, const float* w,
                                           const float* shared, float* x, int n, int k, int d) {
    moe_combine<float>(y, slot_of, idx, w, shared, x, n, k, d);
}
extern "C" __global__ void moe_combine_bf16(const bf16* y, const int* slot_of, const int* idx, const float* w,
                                            const bf16* shared, bf16* x, int n, int k, int d) {
    moe_combine<bf16>(y, slot_of, idx, w, shared, x, n, k, d);
}
