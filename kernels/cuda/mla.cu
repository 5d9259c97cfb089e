// MLA on the latent cache, absorbed form (DeepSeek's attn_impl="absorb", FlashMLA's layout):
// each query row attends to its sequence's cache of [C + dr] rows (normalized latent ‖ rotated
// rope key), with the absorbed query q̃ = q_nope · W_UK ([C] per head) and q_pe ([dr] per head):
//   s_t = (q̃·c_t + q_pe·k_pe_t) * scale,  p = softmax(s over t < len),  ō = Σ_t p_t c_t  ([C]).
// One block serves MLA_HB heads of one query row, so a cache chunk loaded into shared memory is
// used by all of them (the cache is read H / MLA_HB times per row, not H times). Splits along the
// cache (blockIdx.z) write partial (max, sum, unnormalized ō) that mla_decode_combine merges.
//
// Shapes: qt [N, H, C] (row stride ld_qt), qpe at qpe + n*ld_qpe + h*hs_qpe ([dr]),
// cache [slots, max_len, C + dr], row_slot[N], row_len[N] (entries visible to row n),
// out [N, H, C] (row stride ld_out). Partials: part_o [splits, N, H, C] f32, part_ml [splits, N, H, 2].
// grid: (N, ceil(H / MLA_HB), splits), block: 256. C <= 512, dr <= 128.
#include "common.cuh"

#define MLA_HB 8
#define MLA_TC 8
#define MLA_CMAX 512
#define MLA_RMAX 128
#define MLA_THREADS 256
#define MLA_ACC (MLA_HB * MLA_CMAX / MLA_THREADS)

struct MlaArgs {
    const void* qt;
    const void* qpe;
    const void* cache;
    void* out;
    const int* row_slot;
    const int* row_len;
    float* part_o;
    float* part_ml;
    long long slot_stride;
    int n, h, c, dr, ld_qt, ld_qpe, hs_qpe, ld_out, splits, split_len;
    float scale;
    int max_len;  // row_len values are clamped to it
};

template <typename T>
__device__ void mla_decode(const MlaArgs& p) {
    int row = blockIdx.x, h0 = blockIdx.y * MLA_HB, split = blockIdx.z;
    if (row >= p.n || p.c > MLA_CMAX || p.dr > MLA_RMAX) return;
    int w = p.c + p.dr;
    int len = min(p.row_len[row], p.max_len);
    int t_begin = split * p.split_len, t_end = min(len, t_begin + p.split_len);
    const T* cache = (const T*)p.cache + (long long)p.row_slot[row] * p.slot_stride;
    __shared__ float q[MLA_HB][MLA_CMAX + MLA_RMAX];
    __shared__ float kv[MLA_TC][MLA_CMAX + MLA_RMAX];
    __shared__ float sc[MLA_HB][MLA_TC];
    __shared__ float corr[MLA_HB];
    __shared__ float m_run[MLA_HB], l_run[MLA_HB];
    int nh = min(MLA_HB, p.h - h0);
    for (int i = threadIdx.x; i < MLA_HB * w; i += blockDim.x) {
        int hh = i / w, j = i % w;
        float v = 0.0f;
        if (hh < nh) {
            if (j < p.c) v = to_f32(((const T*)p.qt)[(long long)row * p.ld_qt + (long long)(h0 + hh) * p.c + j]);
            else v = to_f32(((const T*)p.qpe)[(long long)row * p.ld_qpe + (long long)(h0 + hh) * p.hs_qpe + j - p.c]);
        }
        q[hh][j] = v;
    }
    if (threadIdx.x < MLA_HB) {
        m_run[threadIdx.x] = -__int_as_float(0x7f800000);
        l_run[threadIdx.x] = 0.0f;
    }
    float acc[MLA_ACC];
#pragma unroll
    for (int j = 0; j < MLA_ACC; j++) acc[j] = 0.0f;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t0 = t_begin; t0 < t_end; t0 += MLA_TC) {
        int nt = min(MLA_TC, t_end - t0);
        __syncthreads();
        for (int i = threadIdx.x; i < MLA_TC * w; i += blockDim.x) {
            int tt = i / w, j = i % w;
            kv[tt][j] = tt < nt ? to_f32(cache[(long long)(t0 + tt) * w + j]) : 0.0f;
        }
        __syncthreads();
        // scores: MLA_HB x MLA_TC dot products, one per warp at a time
        for (int pr = warp; pr < MLA_HB * MLA_TC; pr += MLA_THREADS / 32) {
            int hh = pr / MLA_TC, tt = pr % MLA_TC;
            float a = 0.0f, b = 0.0f;
            for (int j = lane; j < p.c; j += 32) a += q[hh][j] * kv[tt][j];
            for (int j = p.c + lane; j < w; j += 32) b += q[hh][j] * kv[tt][j];
            a = warp_sum(a);
            b = warp_sum(b);
            if (lane == 0) sc[hh][tt] = tt < nt ? (a + b) * p.scale : -__int_as_float(0x7f800000);
        }
        __syncthreads();
        // online softmax per head
        if (threadIdx.x < MLA_HB) {
            int hh = threadIdx.x;
            float m = m_run[hh];
            for (int tt = 0; tt < nt; tt++) m = fmaxf(m, sc[hh][tt]);
            float cr = dsv3_exp(m_run[hh] - m);
            float l = l_run[hh] * cr;
            for (int tt = 0; tt < MLA_TC; tt++) {
                float e = tt < nt ? dsv3_exp(sc[hh][tt] - m) : 0.0f;
                sc[hh][tt] = e;
                l += e;
            }
            corr[hh] = cr;
            m_run[hh] = m;
            l_run[hh] = l;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < MLA_ACC; j++) {
            int idx = threadIdx.x + j * MLA_THREADS;
            int hh = idx / MLA_CMAX, cc = idx % MLA_CMAX;
            if (cc < p.c) {
                float a = acc[j] * corr[hh];
                for (int tt = 0; tt < nt; tt++) a += sc[hh][tt] * kv[tt][cc];
                acc[j] = a;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < MLA_ACC; j++) {
        int idx = threadIdx.x + j * MLA_THREADS;
        int hh = idx / MLA_CMAX, cc = idx % MLA_CMAX;
        if (hh >= nh || cc >= p.c) continue;
        int head = h0 + hh;
        if (p.splits == 1) {
            float l = l_run[hh];
            float v = l > 0.0f ? acc[j] / l : 0.0f;
            ((T*)p.out)[(long long)row * p.ld_out + (long long)head * p.c + cc] = from_f32<T>(v);
        } else {
            p.part_o[(((long long)split * p.n + row) * p.h + head) * p.c + cc] = acc[j];
        }
    }
    if (p.splits > 1 && threadIdx.x < nh) {
        long long at = (((long long)split * p.n + row) * p.h + h0 + threadIdx.x) * 2;
        p.part_ml[at] = m_run[threadIdx.x];
        p.part_ml[at + 1] = l_run[threadIdx.x];
    }
}

extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_f32(MlaArgs p) { mla_decode<float>(p); }
extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_bf16(MlaArgs p) { mla_decode<bf16>(p); }

// Merges the splits: ō = Σ_s e^{m_s - M} o_s / Σ_s e^{m_s - M} l_s. grid: (N, H), block: 256.
template <typename T>
__device__ void mla_combine(const MlaArgs& p) {
    int row = blockIdx.x, head = blockIdx.y;
    if (row >= p.n || head >= p.h) return;
    float m = -__int_as_float(0x7f800000);
    for (int s = 0; s < p.splits; s++) m = fmaxf(m, p.part_ml[(((long long)s * p.n + row) * p.h + head) * 2]);
    float l = 0.0f;
    for (int s = 0; s < p.splits; s++) {
        long long at = (((long long)s * p.n + row) * p.h + head) * 2;
        if (p.part_ml[at + 1] > 0.0f) l += dsv3_exp(p.part_ml[at] - m) * p.part_ml[at + 1];
    }
    for (int cc = threadIdx.x; cc < p.c; cc += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < p.splits; s++) {
            long long at = (((long long)s * p.n + row) * p.h + head) * 2;
            if (p.part_ml[at + 1] > 0.0f)
                v += dsv3_exp(p.part_ml[at] - m) * p.part_o[(((long long)s * p.n + row) * p.h + head) * p.c + cc];
        }
        ((T*)p.out)[(long long)row * p.ld_out + (long long)head * p.c + cc] = from_f32<T>(l > 0.0f ? v / l : 0.0f);
    }
}

extern "C" __global__ void mla_combine_f32(MlaArgs p) { mla_combine<float>(p); }
extern "C" __global__ void mla_combine_bf16(MlaArgs p) { mla_combine<bf16>(p); }

// Appends rows of [C + dr] values to the cache: cache[slot[i], pos[i], :] = src[i, :].
// grid: (N), block: 256.
template <typename T>
__device__ void cache_append(const T* src, int ld_src, T* cache, long long slot_stride, const int* slot, const int* pos,
                             int n, int w) {
    int i = blockIdx.x;
    if (i >= n || pos[i] < 0 || (long long)(pos[i] + 1) * w > slot_stride) return;
    T* dst = cache + (long long)slot[i] * slot_stride + (long long)pos[i] * w;
    for (int j = threadIdx.x; j < w; j += blockDim.x) dst[j] = src[(long long)i * ld_src + j];
}
extern "C" __global__ void cache_append_f32(const float* src, int ld_src, float* cache, long long slot_stride,
                                            const int* slot, const int* pos, int n, int w) {
    cache_append<float>(src, ld_src, cache, slot_stride, slot, pos, n, w);
}
extern "C" __global__ void cache_append_bf16(const bf16* src, int ld_src, bf16* cache, long long slot_stride,
                                             const int* slot, const int* pos, int n, int w) {
    cache_append<bf16>(src, ld_src, cache, slot_stride, slot, pos, n, w);
}
