// DeepSeekMoE training on device: the dispatch plan in token order (at the end), the backward of
// moe.cu's combine and dispatch, the gradient of the routing weights into the router logits, the
// balance losses (DeepSeek-V3's complementary sequence-wise loss, or a conventional auxiliary
// loss) and the auxiliary-loss-free bias update,
// mirroring the CPU oracle (core/src/model/moe.rs: Moe::backward, Router::weights_backward,
// Router::balance_loss, Router::loads; core/src/train/trainer.rs: update_biases).
//
// The router math runs in f32 with the oracle's functions (dsv3_sigmoid / dsv3_exp) and its sums
// in its order (one lane sums sequentially where the CPU does), so router gradients and losses
// match the CPU to rounding (the compiler's FMA contraction aside); combine/dispatch sums are f32
// in another order.
#include "common.cuh"

#define MT_EMAX 512
#define MT_KMAX 16
#define MT_WARPS 4

// Router scores of one token into s[0..e) (shared): sigmoid (scoring 0) or softmax (1), as
// Router::scores. Executed by one warp; lane 0 does the softmax sums in index order.
__device__ __forceinline__ void mt_scores(const float* __restrict__ l, int e, int scoring, float* s) {
    const int lane = threadIdx.x & 31;
    if (scoring == 0) {
        for (int j = lane; j < e; j += 32) s[j] = dsv3_sigmoid(l[j]);
        __syncwarp();
        return;
    }
    if (lane == 0) {
        float m = -__int_as_float(0x7f800000);
        for (int j = 0; j < e; j++) m = fmaxf(m, l[j]);
        if (m == -__int_as_float(0x7f800000)) {
            for (int j = 0; j < e; j++) s[j] = 0.0f;
        } else {
            float z = 0.0f;
            for (int j = 0; j < e; j++) {
                s[j] = dsv3_exp(l[j] - m);
                z += s[j];
            }
            float inv = 1.0f / z;
            for (int j = 0; j < e; j++) s[j] *= inv;
        }
    }
    __syncwarp();
}

// dl[j] (+)= the logit gradient of score gradient ds (Router::scores_backward): sigmoid
// ds·s·(1 − s); softmax s·(ds − Σ ds·s) (lane 0 sums in index order). One warp.
__device__ __forceinline__ void mt_scores_bwd(const float* s, const float* ds, int e, int scoring, float* dl,
                                              bool accumulate, float* tmp) {
    const int lane = threadIdx.x & 31;
    float dot = 0.0f;
    if (scoring == 1) {
        if (lane == 0) {
            for (int j = 0; j < e; j++) dot += ds[j] * s[j];
            *tmp = dot;
        }
        __syncwarp();
        dot = *tmp;
    }
    for (int j = lane; j < e; j += 32) {
        float v = scoring == 0 ? ds[j] * s[j] * (1.0f - s[j]) : s[j] * (ds[j] - dot);
        dl[j] = accumulate ? dl[j] + v : v;
    }
    __syncwarp();
}

// ---- combine backward. Forward (moe_combine): y[t] += Σ_q w[t, q] · ye[slot_of[t·K + q]].
// dye[slot_of[r]] = w[r] · dy[r / K] (the experts' output gradient, in the permuted order) and
// dw[r] = Σ_d dy[r / K, d] · ye[slot_of[r], d] (f32) for the nk = n·K routed rows r.
// grid: (ceil(nk / 4)), block: 128 (a warp per routed row).
template <typename T>
__device__ void combine_bwd(const T* __restrict__ dy, const T* __restrict__ ye, const int* __restrict__ slot_of,
                            const float* __restrict__ w, int nk, int k, int d, T* __restrict__ dye,
                            float* __restrict__ dw) {
    const int r = blockIdx.x * MT_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= nk) return;
    const long long t = r / k, s = slot_of[r];
    const float wr = w[r];
    const T* dyt = dy + t * d;
    const T* yr = ye + s * d;
    T* o = dye + s * d;
    float acc = 0.0f;
    for (int j = lane; j < d; j += 32) {
        float g = to_f32(dyt[j]);
        acc += g * to_f32(yr[j]);
        o[j] = from_f32<T>(wr * g);
    }
    acc = warp_sum(acc);
    if (lane == 0) dw[r] = acc;
}
extern "C" __global__ void __launch_bounds__(128)
    moe_combine_bwd_f32(const float* dy, const float* ye, const int* slot_of, const float* w, int nk, int k, int d,
                        float* dye, float* dw) {
    DSV3_PDL();
    combine_bwd<float>(dy, ye, slot_of, w, nk, k, d, dye, dw);
}
extern "C" __global__ void __launch_bounds__(128)
    moe_combine_bwd_bf16(const bf16* dy, const bf16* ye, const int* slot_of, const float* w, int nk, int k, int d,
                         bf16* dye, float* dw) {
    DSV3_PDL();
    combine_bwd<bf16>(dy, ye, slot_of, w, nk, k, d, dye, dw);
}

// ---- dispatch backward: the tokens' input gradient from the experts' input gradients (the
// forward copied token t's row to permuted rows slot_of[t·K + q]):
// dx[t] (+)= Σ_q dxe[slot_of[t·K + q]] (f32 sum in q order). grid: (n), block: 128.
template <typename T>
__device__ void dispatch_bwd(const T* __restrict__ dxe, const int* __restrict__ slot_of, int n, int k, int d,
                             T* __restrict__ dx, int accumulate) {
    const int t = blockIdx.x;
    if (t >= n) return;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = accumulate ? to_f32(dx[(long long)t * d + j]) : 0.0f;
        for (int q = 0; q < k; q++) acc += to_f32(dxe[(long long)slot_of[t * k + q] * d + j]);
        dx[(long long)t * d + j] = from_f32<T>(acc);
    }
}
extern "C" __global__ void moe_dispatch_bwd_f32(const float* dxe, const int* slot_of, int n, int k, int d, float* dx,
                                                int accumulate) {
    DSV3_PDL();
    dispatch_bwd<float>(dxe, slot_of, n, k, d, dx, accumulate);
}
extern "C" __global__ void moe_dispatch_bwd_bf16(const bf16* dxe, const int* slot_of, int n, int k, int d, bf16* dx,
                                                 int accumulate) {
    DSV3_PDL();
    dispatch_bwd<bf16>(dxe, slot_of, n, k, d, dx, accumulate);
}

// ---- routing weights backward (Router::weights_backward): from dw[t, q], the gradient of the
// chosen weights w[t, q] = c·s_e / (Σ_q s_e + 1e-20) (norm_topk_prob) or c·s_e, writes the
// router logits' gradient dlogits[t, :] (overwritten). idx[t, q] are the chosen experts.
// grid: (ceil(n / 4)), block: 128 (a warp per token).
extern "C" __global__ void __launch_bounds__(128)
    moe_router_bwd(const float* __restrict__ logits, const int* __restrict__ idx, const float* __restrict__ dw, int n,
                   int e, int k, int norm_topk, float scaling, int scoring, float* __restrict__ dlogits) {
    DSV3_PDL();
    __shared__ float s_sc[MT_WARPS][MT_EMAX], s_ds[MT_WARPS][MT_EMAX];
    __shared__ float s_tmp[MT_WARPS];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * MT_WARPS + w;
    if (t >= n) return;
    float* sc = s_sc[w];
    float* ds = s_ds[w];
    mt_scores(logits + (long long)t * e, e, scoring, sc);
    for (int j = lane; j < e; j += 32) ds[j] = 0.0f;
    __syncwarp();
    if (lane == 0) {
        const int* it = idx + (long long)t * k;
        const float* dwt = dw + (long long)t * k;
        if (norm_topk) {
            float z = 0.0f, dot = 0.0f;
            for (int q = 0; q < k; q++) z += sc[it[q]];
            z += 1e-20f;
            for (int q = 0; q < k; q++) dot += dwt[q] * sc[it[q]];
            for (int q = 0; q < k; q++) ds[it[q]] += scaling * (dwt[q] / z - dot / (z * z));
        } else {
            for (int q = 0; q < k; q++) ds[it[q]] += scaling * dwt[q];
        }
    }
    __syncwarp();
    mt_scores_bwd(sc, ds, e, scoring, dlogits + (long long)t * e, false, &s_tmp[w]);
}

// ---- expert counts per span of token rows: f[s, i] = (E / (K·T_s)) added once per token of
// span s that chose expert i (Router::balance_loss's f, summed as the CPU does), and the raw
// counts load[s, i]. span_start [S + 1]. grid: (S), block: 256.
extern "C" __global__ void moe_expert_freq(const int* __restrict__ idx, const int* __restrict__ span_start, int e,
                                           int k, float* __restrict__ f, int* __restrict__ load) {
    DSV3_PDL();
    __shared__ int cnt[MT_EMAX];
    const int s = blockIdx.x;
    const int r0 = span_start[s], r1 = span_start[s + 1];
    for (int j = threadIdx.x; j < e; j += blockDim.x) cnt[j] = 0;
    __syncthreads();
    for (int i = r0 * k + threadIdx.x; i < r1 * k; i += blockDim.x) atomicAdd(&cnt[idx[i]], 1);
    __syncthreads();
    const float unit = (float)e / ((float)k * (float)(r1 - r0));
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        float acc = 0.0f;
        for (int c = 0; c < cnt[j]; c++) acc += unit;
        f[(long long)s * e + j] = acc;
        load[(long long)s * e + j] = cnt[j];
    }
}

// ---- balance loss over spans (Router::balance_loss): for row t of span s (T_s rows),
// P-part: sc = scores, Σsc, fs = Σ_i f[s, i]·sc_i; row_loss[t] = α·fs / (Σsc·T_s) (the host sums
// them and divides by `groups`, the non-empty spans); dlogits[t] += scores_bwd(ds) with
// ds_i = c·(f_i / Σsc − fs / Σsc²), c = scale·α / (T_s·groups). row_span [n].
// grid: (ceil(n / 4)), block: 128 (a warp per row).
extern "C" __global__ void __launch_bounds__(128)
    moe_balance_bwd(const float* __restrict__ logits, const int* __restrict__ row_span,
                    const int* __restrict__ span_start, const float* __restrict__ f, int n, int e, int scoring,
                    float alpha, float scale, int groups, float* __restrict__ row_loss, float* __restrict__ dlogits) {
    DSV3_PDL();
    __shared__ float s_sc[MT_WARPS][MT_EMAX], s_ds[MT_WARPS][MT_EMAX];
    __shared__ float s_tmp[MT_WARPS][3];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * MT_WARPS + w;
    if (t >= n) return;
    const int s = row_span[t];
    const float tl = (float)(span_start[s + 1] - span_start[s]);
    const float* fs_ = f + (long long)s * e;
    float* sc = s_sc[w];
    float* ds = s_ds[w];
    mt_scores(logits + (long long)t * e, e, scoring, sc);
    if (lane == 0) {
        float sum = 0.0f, fs = 0.0f;
        for (int j = 0; j < e; j++) sum += sc[j];
        for (int j = 0; j < e; j++) fs += fs_[j] * sc[j];
        row_loss[t] = alpha * fs / (sum * tl);
        s_tmp[w][0] = sum;
        s_tmp[w][1] = fs;
    }
    __syncwarp();
    const float sum = s_tmp[w][0], fs = s_tmp[w][1];
    const float c = scale * alpha / (tl * (float)groups);
    for (int j = lane; j < e; j += 32) ds[j] = c * (fs_[j] / sum - fs / (sum * sum));
    __syncwarp();
    mt_scores_bwd(sc, ds, e, scoring, dlogits + (long long)t * e, true, &s_tmp[w][2]);
}

// ---- auxiliary-loss-free bias update (trainer's update_biases): mean = Σ load / E;
// bias[i] += γ·sign(mean − load[i]). grid: (1), block: 256.
extern "C" __global__ void moe_bias_update(const int* __restrict__ load, int e, float gamma, float* __restrict__ bias) {
    DSV3_PDL();
    __shared__ float s_mean;
    if (threadIdx.x == 0) {
        unsigned long long tot = 0;
        for (int j = 0; j < e; j++) tot += (unsigned)load[j];
        s_mean = (float)(unsigned)tot / (float)e;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        float diff = s_mean - (float)load[j];
        float sg = diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f);
        bias[j] += gamma * sg;
    }
}

// ---- the dispatch plan in token order, on device (training): moe.cu's plan (row_offsets,
// tile_offsets, slot_of, src_row) with each expert's rows in token order, as the CPU's
// Moe::dispatch lists them (per[e]: by expert, then by token), so the plan is deterministic (the
// grouped Wgrad sums an expert's rows in a fixed order) and an expert's 128-token FP8 Wgrad tiles
// hold the tokens the CPU's hold. Also the 128-aligned token segments of the FP8 expert Wgrad
// (quant_t128_groups / fp8_gemm_kgrouped): t128 = [ro[0..e], seg[0..e]] with seg[x + 1] = seg[x]
// + ceil(count_x / 128) * 128. Three launches over chunks of MP_CHUNK routed rows:
//   moe_plan_count   hist[c, x] = rows of chunk c routed to expert x
//   moe_plan_offsets the offsets, then hist[c, x] = ro[x] + rows routed to x in chunks before c
//   moe_plan_place   routed row j of chunk c, the r-th of its chunk routed to x, goes to
//                    hist[c, x] + r; an expert outside [0, e) gets slot -1 (no row)
#define MP_CHUNK 256

// chunk c's experts in shared memory (-1: none); returns this thread's
__device__ __forceinline__ int mp_load_chunk(const int* __restrict__ idx, int nk, int e, int* v) {
    const int j = blockIdx.x * MP_CHUNK + threadIdx.x;
    int x = j < nk ? idx[j] : -1;
    if (x < 0 || x >= e) x = -1;
    v[threadIdx.x] = x;
    __syncthreads();
    return x;
}

// grid: (chunks), block: MP_CHUNK. hist [chunks, e].
extern "C" __global__ void __launch_bounds__(MP_CHUNK)
    moe_plan_count(const int* __restrict__ idx, int nk, int e, int* __restrict__ hist) {
    DSV3_PDL();
    __shared__ int v[MP_CHUNK];
    int* h = hist + (long long)blockIdx.x * e;
    for (int i = threadIdx.x; i < e; i += MP_CHUNK) h[i] = 0;
    const int x = mp_load_chunk(idx, nk, e, v);  // its barrier orders the zeros before the counts
    if (x < 0) return;
    for (int i = threadIdx.x + 1; i < MP_CHUNK; i++)
        if (v[i] == x) return;  // not the chunk's last row routed to x
    int r = 1;
    for (int i = 0; i < threadIdx.x; i++) r += v[i] == x;
    h[x] = r;
}

// grid: (1), block: 1024 (a warp per expert, e <= 1024). tile_rows: the grouped GEMM's row tile.
extern "C" __global__ void __launch_bounds__(1024)
    moe_plan_offsets(int* __restrict__ hist, int chunks, int e, int tile_rows, int* __restrict__ row_offsets,
                     int* __restrict__ tile_offsets, int* __restrict__ t128) {
    DSV3_PDL();
    __shared__ int cnt[1024];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (e > 1024) return;
    for (int x = warp; x < e; x += warps) {
        int s = 0;
        for (int c = lane; c < chunks; c += 32) s += hist[(long long)c * e + x];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) cnt[x] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int r = 0, tl = 0, sg = 0;
        for (int x = 0; x < e; x++) {
            const int c = cnt[x];
            row_offsets[x] = r;
            tile_offsets[x] = tl;
            t128[x] = r;
            t128[e + 1 + x] = sg;
            cnt[x] = r;
            r += c;
            tl += (c + tile_rows - 1) / tile_rows;
            sg += (c + 127) / 128 * 128;
        }
        row_offsets[e] = r;
        tile_offsets[e] = tl;
        t128[e] = r;
        t128[2 * e + 1] = sg;
    }
    __syncthreads();
    // exclusive scan over the chunks, 32 at a time, from the expert's first row
    for (int x = warp; x < e; x += warps) {
        int base = cnt[x];
        for (int c0 = 0; c0 < chunks; c0 += 32) {
            const int c = c0 + lane;
            const int h = c < chunks ? hist[(long long)c * e + x] : 0;
            int inc = h;
            for (int o = 1; o < 32; o <<= 1) {
                const int t = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += t;
            }
            if (c < chunks) hist[(long long)c * e + x] = base + inc - h;
            base += __shfl_sync(0xffffffffu, inc, 31);
        }
    }
}

// grid: (chunks), block: MP_CHUNK. k: routed rows per token (row j is token j / k's).
extern "C" __global__ void __launch_bounds__(MP_CHUNK)
    moe_plan_place(const int* __restrict__ idx, int nk, int k, int e, const int* __restrict__ hist,
                   int* __restrict__ slot_of, int* __restrict__ src_row) {
    DSV3_PDL();
    __shared__ int v[MP_CHUNK];
    const int x = mp_load_chunk(idx, nk, e, v);
    const int j = blockIdx.x * MP_CHUNK + threadIdx.x;
    if (j >= nk) return;
    if (x < 0) {
        slot_of[j] = -1;
        return;
    }
    int r = 0;
    for (int i = 0; i < threadIdx.x; i++) r += v[i] == x;
    const int pos = hist[(long long)blockIdx.x * e + x] + r;
    slot_of[j] = pos;
    src_row[pos] = j / k;
}
