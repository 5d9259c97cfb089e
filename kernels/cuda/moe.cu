// DeepSeekMoE on device: the router (core/src/model/moe.rs Router::select), the dispatch plan
// (token permutation), and the weighted combine. The expert GEMMs are gemm.cu's grouped mode.
#include "common.cuh"
#include "gemm.cuh"
#include "moe_combine.cuh"

#define MOE_EMAX 512

// Per token (one warp each): scores (sigmoid or softmax of the logits), selection on
// scores + bias limited to the best groups (noaux_tc: group score = sum of its two best biased
// scores, other groups -inf; group_limited_greedy: group max, others 0; greedy: plain top-k),
// weights = chosen unbiased scores, normalized (norm: / (sum + 1e-20)) and times `scaling`.
// Orders follow topk_desc (value descending, lower index first on ties) and the sums run in the
// same order as the CPU router (softmax denominator and weight sum sequential), so the result is
// those of a one-thread-per-token scan, bit for bit. Lane l holds experts l, l + 32, ...
// logits [n, e] f32; bias [e] or null; idx_out [n, k] int; w_out [n, k] f32.
// scoring: 0 sigmoid, 1 softmax. method: 0 noaux_tc, 1 greedy, 2 group_limited_greedy.
// grid: (ceil(n / 4)), block: 128. e <= 512, k <= 16, n_group <= 64.
#define MOE_PER_LANE (MOE_EMAX / 32)
#define MOE_WARPS 4

// Warp-wide best (value descending, index ascending) of each lane's candidate (v, i); i < 0 = none.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        bool better = i2 >= 0 && (i < 0 || v2 > v || (v2 == v && i2 < i));
        if (better) {
            v = v2;
            i = i2;
        }
    }
}

// Whether the routing settings are ones the kernels take (the launchers check them first).
__device__ __forceinline__ bool route_ok(int e, int k, int n_group) {
    return e <= MOE_EMAX && k <= MOE_KMAX && n_group >= 1 && n_group <= 64 && e % n_group == 0;
}

// Routes token t with the calling warp; s, sel ([MOE_EMAX]), gs ([64]) and top ([MOE_KMAX]) are the
// warp's shared scratch.
__device__ __forceinline__ void route_token(const float* __restrict__ logits, int t, int e,
                                            const float* __restrict__ bias, int n_group, int topk_group, int k,
                                            int norm, float scaling, int scoring, int method,
                                            int* __restrict__ idx_out, float* __restrict__ w_out, float* s,
                                            float* sel, float* gs, int* top) {
    const int lane = threadIdx.x & 31;
    const float* l = logits + (long long)t * e;
    if (scoring == 0) {
        for (int i = lane; i < e; i += 32) s[i] = dsv3_sigmoid(l[i]);
        __syncwarp();
    } else {
        float m = -__int_as_float(0x7f800000);
        for (int i = lane; i < e; i += 32) m = fmaxf(m, l[i]);
        m = warp_max(m);
        for (int i = lane; i < e; i += 32) s[i] = dsv3_exp(l[i] - m);
        __syncwarp();
        float z = 0.0f;  // every lane sums in index order (the CPU's order)
        for (int i = 0; i < e; i++) z += s[i];
        float inv = 1.0f / z;
        __syncwarp();
        for (int i = lane; i < e; i += 32) s[i] *= inv;
        __syncwarp();
    }
    // selection scores (biased for noaux_tc) in shared memory: the group scans read them, the
    // masking overwrites them, the top-k reads them (s keeps the unbiased scores)
    for (int i = lane; i < e; i += 32) sel[i] = (method == 0 && bias) ? s[i] + bias[i] : s[i];
    __syncwarp();
    if (method != 1) {
        int gsize = e / n_group;
        for (int g = lane; g < n_group; g += 32) {
            const float* v = sel + g * gsize;
            if (method == 0) {
                // the two best in index order of first occurrence, as topk_desc(kk = 2)
                int b0 = 0;
                for (int q = 1; q < gsize; q++)
                    if (v[q] > v[b0]) b0 = q;
                float sum = 0.0f + v[b0];
                if (gsize >= 2) {
                    int b1 = -1;
                    for (int q = 0; q < gsize; q++)
                        if (q != b0 && (b1 < 0 || v[q] > v[b1])) b1 = q;
                    sum += v[b1];
                }
                gs[g] = sum;
            } else {
                float m = -__int_as_float(0x7f800000);
                for (int q = 0; q < gsize; q++) m = fmaxf(m, v[q]);
                gs[g] = m;
            }
        }
        __syncwarp();
        int keep = topk_group < n_group ? topk_group : n_group;
        float fill = method == 0 ? -__int_as_float(0x7f800000) : 0.0f;
        for (int i = lane; i < e; i += 32) {
            int g = i / gsize, rank = 0;  // kept iff fewer than `keep` groups rank before g
            for (int q = 0; q < n_group; q++) rank += gs[q] > gs[g] || (gs[q] == gs[g] && q < g);
            if (rank >= keep) sel[i] = fill;
        }
        __syncwarp();
    }
    // top-k over the masked selection scores: k rounds of a warp-wide best, skipping taken ones
    unsigned taken = 0;
    for (int q = 0; q < k; q++) {
        float bv = 0.0f;
        int bi = -1;
#pragma unroll
        for (int j = 0; j < MOE_PER_LANE; j++) {
            int i = lane + 32 * j;
            if (i < e && !(taken >> j & 1u) && (bi < 0 || sel[i] > bv)) {
                bv = sel[i];
                bi = i;
            }
        }
        warp_best(bv, bi);
        if (bi >= 0 && (bi & 31) == lane) taken |= 1u << (bi >> 5);
        if (lane == 0) top[q] = bi;
    }
    __syncwarp();
    if (lane < k) {
        float denom = 0.0f;  // summed in rank order by every writing lane
        for (int j = 0; j < k; j++) denom += s[top[j]];
        denom += 1e-20f;
        float w = s[top[lane]];
        float v = norm ? w / denom : w;
        idx_out[(long long)t * k + lane] = top[lane];
        w_out[(long long)t * k + lane] = v * scaling;
    }
    __syncwarp();  // the scratch is reused by the warp's next token
}

extern "C" __global__ void __launch_bounds__(128)
    moe_route(const float* __restrict__ logits, int n, int e, const float* __restrict__ bias, int n_group,
              int topk_group, int k, int norm, float scaling, int scoring, int method, int* __restrict__ idx_out,
              float* __restrict__ w_out) {
    DSV3_PDL();
    __shared__ float s_sh[MOE_WARPS][MOE_EMAX], b_sh[MOE_WARPS][MOE_EMAX];
    __shared__ float gs_sh[MOE_WARPS][64];
    __shared__ int top_sh[MOE_WARPS][MOE_KMAX];
    int warp = threadIdx.x >> 5;
    int t = blockIdx.x * MOE_WARPS + warp;
    if (t >= n || !route_ok(e, k, n_group)) return;
    route_token(logits, t, e, bias, n_group, topk_group, k, norm, scaling, scoring, method, idx_out, w_out, s_sh[warp],
                b_sh[warp], gs_sh[warp], top_sh[warp]);
}

// The dispatch plan for nk = n * k routed rows: counts per expert, row_offsets [e + 1] (rows of
// the permuted order per expert), tile_offsets [e + 1] (GEMM_BM-row tiles per expert, for the
// grouped GEMM), slot_of [nk] (where routed row j = t * k + q went) and src_row [nk] (the token
// each permuted row copies). Order within an expert is arbitrary; results do not depend on it
// (rows are independent in the GEMMs and moe_combine sums in a fixed order).
// grid: (1), block: 1024. e <= 1024.
//
// The plan's body for the whole block; cnt and fill are shared [e].
__device__ __forceinline__ void plan_block(const int* __restrict__ idx, int nk, int k, int e,
                                           int* __restrict__ row_offsets, int* __restrict__ tile_offsets,
                                           int* __restrict__ slot_of, int* __restrict__ src_row, int* cnt,
                                           int* fill) {
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
extern "C" __global__ void moe_plan(const int* __restrict__ idx, int nk, int k, int e, int* __restrict__ row_offsets,
                                    int* __restrict__ tile_offsets, int* __restrict__ slot_of,
                                    int* __restrict__ src_row) {
    DSV3_PDL();
    __shared__ int cnt[1024], fill[1024];
    if (e > 1024) return;
    plan_block(idx, nk, k, e, row_offsets, tile_offsets, slot_of, src_row, cnt, fill);
}

// moe_route and moe_plan in one launch for few tokens (decode): one block, its 8 warps route
// tokens warp, warp + 8, ... (the same per-token code, so the same results bit for bit), then
// the block builds the plan from the routing it just wrote (global writes are visible to the
// block after __syncthreads). grid: (1), block: 256. e <= 512.
#define MOE_RP_WARPS 8
__device__ __forceinline__ void route_plan_block(const float* __restrict__ logits, int n, int e,
                                                 const float* __restrict__ bias, int n_group, int topk_group, int k,
                                                 int norm, float scaling, int scoring, int method,
                                                 int* __restrict__ idx_out, float* __restrict__ w_out,
                                                 int* __restrict__ row_offsets, int* __restrict__ tile_offsets,
                                                 int* __restrict__ slot_of, int* __restrict__ src_row) {
    __shared__ float s_sh[MOE_RP_WARPS][MOE_EMAX], b_sh[MOE_RP_WARPS][MOE_EMAX];
    __shared__ float gs_sh[MOE_RP_WARPS][64];
    __shared__ int top_sh[MOE_RP_WARPS][MOE_KMAX];
    __shared__ int cnt[MOE_EMAX], fill[MOE_EMAX];
    if (!route_ok(e, k, n_group)) return;
    const int warp = threadIdx.x >> 5;
    for (int t = warp; t < n; t += MOE_RP_WARPS)
        route_token(logits, t, e, bias, n_group, topk_group, k, norm, scaling, scoring, method, idx_out, w_out,
                    s_sh[warp], b_sh[warp], gs_sh[warp], top_sh[warp]);
    __syncthreads();
    plan_block(idx_out, n * k, k, e, row_offsets, tile_offsets, slot_of, src_row, cnt, fill);
}
extern "C" __global__ void __launch_bounds__(256)
    moe_route_plan(const float* __restrict__ logits, int n, int e, const float* __restrict__ bias, int n_group,
                   int topk_group, int k, int norm, float scaling, int scoring, int method, int* __restrict__ idx_out,
                   float* __restrict__ w_out, int* __restrict__ row_offsets, int* __restrict__ tile_offsets,
                   int* __restrict__ slot_of, int* __restrict__ src_row) {
    DSV3_PDL();
    route_plan_block(logits, n, e, bias, n_group, topk_group, k, norm, scaling, scoring, method, idx_out, w_out,
                     row_offsets, tile_offsets, slot_of, src_row);
}

// The router GEMM too, for a few tokens of a small router (decode; the launcher checks e·d): warp
// w computes the logits of tokens w, w + 8, ...: logits[t, c] = (Σ_j x[t, j]·nw[j]·W[c, j]) / rms(x[t])
// (the post-attention RMSNorm folded in as the skinny GEMM does: weights multiplied in as x is read,
// the row's 1/rms applied to each finished sum; nw null: no norm), each lane over the 8-wide chunks
// lane·8 + 256·i, the lanes' sums added in a warp tree; then, after a barrier (the block's global
// writes visible to the block), moe_route_plan's routing and plan. x [n, ldx] bf16, W [e, d] f32
// (16-byte aligned, d % 8 == 0), logits [n, e] f32 scratch. grid: (1), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    moe_router_route_plan(const bf16* __restrict__ x, int ldx, int d, const float* __restrict__ nw, float eps,
                          const float* __restrict__ rw, float* __restrict__ logits, int n, int e,
                          const float* __restrict__ bias, int n_group, int topk_group, int k, int norm, float scaling,
                          int scoring, int method, int* __restrict__ idx_out, float* __restrict__ w_out,
                          int* __restrict__ row_offsets, int* __restrict__ tile_offsets, int* __restrict__ slot_of,
                          int* __restrict__ src_row) {
    DSV3_PDL();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t = warp; t < n; t += MOE_RP_WARPS) {
        const bf16* xr = x + (long long)t * ldx;
        float ss = 0.0f;
        for (int j0 = lane * 8; j0 < d; j0 += 256) {
            for (int j = 0; j < 8; j++) {
                float v = to_f32(xr[j0 + j]);
                ss = fmaf(v, v, ss);
            }
        }
        ss = warp_sum(ss);
        const float inv = nw ? 1.0f / sqrtf(ss / (float)d + eps) : 1.0f;
        for (int c = 0; c < e; c++) {
            const float* wr = rw + (long long)c * d;
            float acc = 0.0f;
            for (int j0 = lane * 8; j0 < d; j0 += 256) {
                float dot = 0.0f;
                for (int j = 0; j < 8; j++) {
                    float v = to_f32(xr[j0 + j]);
                    if (nw) v *= nw[j0 + j];
                    dot = fmaf(v, wr[j0 + j], dot);
                }
                acc += dot;
            }
            acc = warp_sum(acc);
            if (lane == 0) logits[(long long)t * e + c] = acc * inv;
        }
    }
    __syncthreads();
    route_plan_block(logits, n, e, bias, n_group, topk_group, k, norm, scaling, scoring, method, idx_out, w_out,
                     row_offsets, tile_offsets, slot_of, src_row);
}

// x[t, :] += shared[t, :] + Σ_q w[t, q] · y[slot_of[t, q], :] (moe_combine.cuh).
// y [nk, d], shared [n, d] or null. grid: (n), block: 256.
template <typename T>
__device__ void moe_combine(const T* __restrict__ y, const int* __restrict__ slot_of, const int* __restrict__ idx,
                            const float* __restrict__ w, const T* __restrict__ shared, T* x, int n, int k, int d) {
    int t = blockIdx.x;
    if (t >= n || k > MOE_KMAX) return;
    int order[MOE_KMAX];
    moe_combine_order(idx, t, k, order);
    for (int j = threadIdx.x; j < d; j += blockDim.x) moe_combine_elem<T>(y, slot_of, w, shared, x, order, t, j, k, d);
}
extern "C" __global__ void moe_combine_f32(const float* y, const int* slot_of, const int* idx, const float* w,
                                           const float* shared, float* x, int n, int k, int d) {
    DSV3_PDL();
    moe_combine<float>(y, slot_of, idx, w, shared, x, n, k, d);
}
extern "C" __global__ void moe_combine_bf16(const bf16* y, const int* slot_of, const int* idx, const float* w,
                                            const bf16* shared, bf16* x, int n, int k, int d) {
    DSV3_PDL();
    moe_combine<bf16>(y, slot_of, idx, w, shared, x, n, k, d);
}
