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
#include "mma.cuh"
#include "mla_prep.cuh"

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
    // Tensor-core kernels with several splits: when set, the last CTA of each (row, head block) to
    // finish merges the splits itself (mma_fused_combine) instead of mla_combine; one counter per
    // CTA column blockIdx.x, zero between launches (the merging CTA re-arms it).
    int* counters;
};

// Merges the splits of row `row`, head `head` into out: ō = Σ_s e^{m_s - M} o_s / Σ_s e^{m_s - M} l_s,
// columns tid, tid + nthr, ... The partials are read through L2 (ld.global.cg): in the fused merge
// other CTAs of the same launch wrote them.
template <typename T>
__device__ __forceinline__ void mla_combine_head(const MlaArgs& p, int row, int head, int tid, int nthr) {
    float m = -__int_as_float(0x7f800000);
    for (int s = 0; s < p.splits; s++) m = fmaxf(m, __ldcg(p.part_ml + (((long long)s * p.n + row) * p.h + head) * 2));
    float l = 0.0f;
    for (int s = 0; s < p.splits; s++) {
        long long at = (((long long)s * p.n + row) * p.h + head) * 2;
        const float ls = __ldcg(p.part_ml + at + 1);
        if (ls > 0.0f) l += dsv3_exp(__ldcg(p.part_ml + at) - m) * ls;
    }
    for (int cc = tid; cc < p.c; cc += nthr) {
        float v = 0.0f;
        for (int s = 0; s < p.splits; s++) {
            long long at = (((long long)s * p.n + row) * p.h + head) * 2;
            if (__ldcg(p.part_ml + at + 1) > 0.0f)
                v += dsv3_exp(__ldcg(p.part_ml + at) - m) *
                     __ldcg(p.part_o + (((long long)s * p.n + row) * p.h + head) * p.c + cc);
        }
        ((T*)p.out)[(long long)row * p.ld_out + (long long)head * p.c + cc] = from_f32<T>(l > 0.0f ? v / l : 0.0f);
    }
}

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

extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_f32(MlaArgs p) { DSV3_PDL(); mla_decode<float>(p); }
extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_decode_bf16(MlaArgs p) { DSV3_PDL(); mla_decode<bf16>(p); }

// ---------------------------------------------------------------------------------------------
// Tensor-core path (bf16): mla_decode_mma_*. FlashAttention-2 / FlashMLA structure with
// mma.sync.m16n8k16 (bf16 in, f32 accumulate), ldmatrix and cp.async (all sm_80+).
//
// One CTA = one query row x MT*16 heads (MT m16 tiles; heads past h are zero queries, never
// written) x one split of the row's cache. 4 warps (128 threads). Grid: (N * head_blocks, splits);
// blockIdx.x = row * head_blocks + head_block, so the CTAs of one row (which read the same cache
// rows) are adjacent in launch order and share the cache through L2.
//
// Per tile of T cache rows (staged by cp.async into an NS-stage shared-memory ring):
//   S = Q·Kᵀ    (MT*16 x T, depth C+dr): warp w computes tokens [w*T/4, (w+1)*T/4) for all heads.
//               Q (A operand) and K (B operand, .col = each token row contiguous along depth) both
//               come from shared memory through non-transposed ldmatrix.
//   softmax     online, in the log2 domain: s2 = s * scale * log2(e), p = 2^(s2 - m2) with one
//               ex2.approx (MUFU) per element. dsv3_exp would be ~20 instructions per element;
//               ex2.approx's relative error (~2^-22) is far below the bf16 rounding of P (2^-9),
//               and the row max/sum are exchanged in the natural-log domain (m = m2 * ln 2) so the
//               combine kernel (dsv3_exp) sees the same convention as the SIMT kernel. The row max
//               over the tile needs every warp's tokens: partial maxima go through shared memory
//               (sM), then every warp computes the same new max for every row it holds. P is
//               rounded to bf16 into shared memory (sP); the running sum l adds the rounded values
//               (so out = Σ p̂·v / Σ p̂ exactly for the weights the MMA used).
//   O += P·V    V = the first C columns of the same tile, B operand row-major -> ldmatrix.trans.
//               Warp w owns output columns [w*C/4, (w+1)*C/4) for all heads: 16 n8 tiles x MT m16
//               tiles -> 64*MT f32 accumulators per thread.
// Splitting S across warps by tokens (rather than each warp computing all of S redundantly)
// costs two extra __syncthreads per tile but does 4x less S work (the S GEMM is as large as the
// P·V GEMM); with 128 heads the kernel is compute-bound, so the split wins there, and with 16
// heads it is memory-bound either way.
//
// Shared memory (dynamic, bytes; must match MmaVariant::smem_bytes in kernels/src/ops/mla.rs):
//   sQ [M][RS] bf16, sKV [NS][T][RS] bf16, sP [M][T+8] bf16, sM [4][M] f32, sL [4][M] f32,
//   M = 16*MT, RS = round_up(C+dr, 64). Rows of sQ/sKV are 128-byte multiples; element e of row r
//   is stored at e ^ ((r & 7) << 3) (16-byte chunks XOR-swizzled within each 128 bytes), so the
//   8 row addresses of every ldmatrix phase (8 consecutive rows, same logical chunk) hit 8
//   different bank groups. sP rows are padded by 8 elements (80 or 144 bytes: conflict-free).
//
// Splits: the row's own length is partitioned (per = round_up(ceil(len / splits), T)), so every
// split gets a share of the tokens whatever max_len is; p.split_len (used by the SIMT kernel) is
// ignored. Any partition is valid for mla_combine. An empty split writes m = -inf, l = 0.
// Rows past the split's end inside the last tile are zero-filled by cp.async (src-size 0, no
// global read) and masked to -inf before the softmax.
//
// Shapes: bf16 only, C % 64 == 0, C <= 512, dr % 32 == 0, dr <= 128 (the launcher checks).
#define MMA_THREADS 128

DSV3_DYNAMIC_SMEM(mla_smem);

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi, float& rlo, float& rhi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    rlo = __low2float(v);
    rhi = __high2float(v);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ---- pieces shared by the tensor-core variants (mla_decode_mma and mla_decode_mmad) ----

// An empty split (uniform over the CTA): a zero output row (one split) or m = -inf, l = 0.
__device__ __forceinline__ void mma_empty_split(const MlaArgs& p, int row, int h0, int nh, int split) {
    const int c = p.c;
    if (p.splits == 1) {
        for (int i = threadIdx.x; i < nh * c; i += blockDim.x) {
            int hh = i / c, cc = i - hh * c;
            ((bf16*)p.out)[(long long)row * p.ld_out + (long long)(h0 + hh) * c + cc] = __float2bfloat16_rn(0.0f);
        }
    } else if (threadIdx.x < nh) {
        long long at = (((long long)split * p.n + row) * p.h + h0 + threadIdx.x) * 2;
        p.part_ml[at] = -__int_as_float(0x7f800000);
        p.part_ml[at + 1] = 0.0f;
    }
}

// The split merge inside the decode kernel (p.counters set, several splits): each CTA, after its
// partials are written, makes them visible device-wide and counts itself in its column's counter;
// the one that completes the count merges the column's heads (M per CTA; the row and heads from
// blockIdx.x as in mma_cta) with mla_combine_head, the same arithmetic as mla_combine, and
// re-arms the counter for the next launch (graph replays). Uniform over the CTA; empty splits
// arrive too.
template <int M>
__device__ __forceinline__ void mma_fused_combine(const MlaArgs& p) {
    __shared__ int last;
    __threadfence();  // this CTA's partials before its arrival
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(p.counters + blockIdx.x, 1) == p.splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // every other CTA's partials before the reads
    const int hblocks = (p.h + M - 1) / M, row = blockIdx.x / hblocks, h0 = (blockIdx.x % hblocks) * M;
    for (int head = h0; head < min(h0 + M, p.h); head++) mla_combine_head<bf16>(p, row, head, threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) p.counters[blockIdx.x] = 0;
}

// A tensor-core CTA's work: query row, first head and head count (blockIdx.x = row * head blocks
// + head block), split (blockIdx.y) and its tokens [t_begin, t_end) (the row's own length
// partitioned into splits of a whole number of T-token tiles); the thread's warp, lane and mma
// coordinates (groupID g, thread in group tq). False (nothing more to do) for unsupported shapes,
// rows past n and empty splits (whose outputs it writes).
struct MmaCta {
    int row, h0, nh, split, t_begin, t_end, warp, lane, g, tq;
};
template <int M, int T>
__device__ __forceinline__ bool mma_cta(const MlaArgs& p, MmaCta& t) {
    if (p.c % 64 != 0 || p.c > MLA_CMAX || p.dr % 32 != 0 || p.dr > MLA_RMAX) return false;
    const int hblocks = (p.h + M - 1) / M;
    t.row = blockIdx.x / hblocks, t.h0 = (blockIdx.x % hblocks) * M, t.split = blockIdx.y;
    if (t.row >= p.n) return false;
    t.nh = min(M, p.h - t.h0);
    t.warp = threadIdx.x >> 5, t.lane = threadIdx.x & 31, t.g = t.lane >> 2, t.tq = t.lane & 3;
    const int len = max(0, min(p.row_len[t.row], p.max_len));
    int per = (len + p.splits - 1) / p.splits;
    per = (per + T - 1) / T * T;
    t.t_begin = t.split * per;
    t.t_end = min(len, t.t_begin + per);
    if (t.t_begin >= t.t_end) {  // nothing to attend to (uniform over the CTA)
        mma_empty_split(p, t.row, t.h0, t.nh, t.split);
        if (p.splits > 1 && p.counters) mma_fused_combine<M>(p);
        return false;
    }
    return true;
}

// Cache rows [t0, t0 + T) of the split into a ring stage `dst` ([T][rs], swizzled): warp w of NW
// copies rows w, w+NW, ...; rows at or past t_end are zero-filled (src-size 0, the source address
// clamped to the split's first row).
template <int T, int NW>
__device__ __forceinline__ void mma_load_tile(const bf16* cache, int w, int rs, bf16* dst, int t0, int t_begin,
                                              int t_end, int warp, int lane) {
    const int cw = w >> 3;  // 16-byte chunks per cache row
    for (int r = warp; r < T; r += NW) {
        const int t = t0 + r;
        const bool ok = t < t_end;
        const bf16* src = cache + (long long)(ok ? t : t_begin) * w;
        const uint32_t drow = smem_u32(dst + r * rs);
        const int xr = (r & 7) << 3;
        for (int ch = lane; ch < cw; ch += 32) cp_async16(drow + (((ch << 3) ^ xr) << 1), src + (ch << 3), ok ? 16 : 0);
    }
}

// Q of the CTA's M heads -> sQ [M][rs] (zeros for heads past nh), swizzled like the cache tiles;
// warp w of NW stages heads w, w+NW, ...
template <int M, int NW>
__device__ __forceinline__ void mma_stage_q(const MlaArgs& p, bf16* sQ, int rs, int row, int h0, int nh, int warp,
                                            int lane) {
    const int c = p.c, w = p.c + p.dr;
    const bf16* qt = (const bf16*)p.qt;
    const bf16* qpe = (const bf16*)p.qpe;
    for (int hh = warp; hh < M; hh += NW) {
        const bf16* qrow = qt + (long long)row * p.ld_qt + (long long)(h0 + hh) * c;
        const bf16* prow = qpe + (long long)row * p.ld_qpe + (long long)(h0 + hh) * p.hs_qpe;
        for (int j = lane; j < w; j += 32) {
            bf16 v = __float2bfloat16_rn(0.0f);
            if (hh < nh) v = j < c ? qrow[j] : prow[j - c];
            sQ[hh * rs + (j ^ ((hh & 7) << 3))] = v;
        }
    }
}

// The pipeline's start: tiles 0 .. NS-2 of the split in flight (one commit group each, empty past
// the last tile) and Q staged into sQ (read only after a barrier). Returns the split's tile count.
template <int M, int T, int NS, int NW>
__device__ __forceinline__ int mma_prologue(const MlaArgs& p, const MmaCta& t, const bf16* cache, bf16* sQ, bf16* sKV,
                                            int rs) {
    const int w = p.c + p.dr, ntiles = (t.t_end - t.t_begin + T - 1) / T;
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < ntiles)
            mma_load_tile<T, NW>(cache, w, rs, sKV + s * T * rs, t.t_begin + s * T, t.t_begin, t.t_end, t.warp,
                                 t.lane);
        cp_async_commit();
    }
    mma_stage_q<M, NW>(p, sQ, rs, t.row, t.h0, t.nh, t.warp, t.lane);
    return ntiles;
}

// O += P·V over this warp's output columns [col0, col0 + 8·ntw): P from sP [16·MT][T + 8] bf16,
// V = the first C columns of the ring stage at kvbase (rows kt·16 + (lane & 15), ldmatrix.trans;
// lanes 0-7: k 0-7, 8-15: k 8-15, repeated for the second n8 tile; chunk lane/16: b[0], b[1] ->
// n8 tile 2jp, b[2], b[3] -> 2jp + 1).
template <int MT, int T, int NJ>
__device__ __forceinline__ void mma_pv(float (&o)[MT][NJ][4], const bf16* sP, uint32_t kvbase, int rs, int col0,
                                       int ntw, int xr, int lane) {
    constexpr int PS = T + 8;
#pragma unroll
    for (int kt = 0; kt < T / 16; kt++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
            ldsm_x4(smem_u32(sP + (mt * 16 + (lane & 15)) * PS + kt * 16 + (lane >> 4) * 8), a[mt]);
        const uint32_t vrow = kvbase + (uint32_t)((kt * 16 + (lane & 15)) * rs) * 2u;
#pragma unroll
        for (int jp = 0; jp < NJ / 2; jp++) {
            if (2 * jp < ntw) {
                uint32_t b[4];
                ldsm_x4_t(vrow + (uint32_t)((col0 + jp * 16 + (lane >> 4) * 8) ^ xr) * 2u, b);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16_16816(o[mt][2 * jp], a[mt], b[0], b[1]);
                    mma_bf16_16816(o[mt][2 * jp + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }
}

// Writes this thread's part of head `head`'s output (fragment row half hr of m16 tile o16): one
// split: O / l in bf16; several: the unnormalized f32 partial, and (m in natural-log units, l)
// from the thread with `ml_writer`.
template <int NJ>
__device__ __forceinline__ void mma_store_head(const MlaArgs& p, const float (&o16)[NJ][4], int hr, int row, int head,
                                               int split, int col0, int ntw, int tq, float m2, float l,
                                               bool ml_writer) {
    const int c = p.c;
    if (p.splits == 1) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        bf16* dst = (bf16*)p.out + (long long)row * p.ld_out + (long long)head * c + col0 + 2 * tq;
#pragma unroll
        for (int j = 0; j < NJ; j++)
            if (j < ntw)
                *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) =
                    __floats2bfloat162_rn(o16[j][2 * hr] * inv, o16[j][2 * hr + 1] * inv);
    } else {
        float* dst = p.part_o + (((long long)split * p.n + row) * p.h + head) * c + col0 + 2 * tq;
#pragma unroll
        for (int j = 0; j < NJ; j++)
            if (j < ntw) *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o16[j][2 * hr], o16[j][2 * hr + 1]);
        if (ml_writer) {
            long long at = (((long long)split * p.n + row) * p.h + head) * 2;
            p.part_ml[at] = m2 * 0.6931471805599453f;  // log2 units -> natural
            p.part_ml[at + 1] = l;
        }
    }
}

template <int MT, int T, int NS>
__device__ __forceinline__ void mla_decode_mma(const MlaArgs& p) {
    constexpr int M = 16 * MT;    // heads per CTA
    constexpr int TW = T / 4;     // tokens per warp in S
    constexpr int NTS = TW / 8;   // n8 tiles per warp in S
    constexpr int PS = T + 8;     // sP row stride (elements)
    constexpr int KCH = MT * NTS >= 4 ? 1 : 2;  // independent S accumulator chains (mma latency)
    const float NEG_INF = -__int_as_float(0x7f800000);
    static_assert(T % 32 == 0 && NS >= 2, "tile of 32k tokens, >= 2 stages");

    MmaCta t;
    if (!mma_cta<M, T>(p, t)) return;
    const int c = p.c, w = p.c + p.dr, row = t.row, h0 = t.h0, nh = t.nh, split = t.split;
    const int warp = t.warp, lane = t.lane, g = t.g, tq = t.tq, t_begin = t.t_begin, t_end = t.t_end;

    const int rs = (w + 63) & ~63;  // smem row stride (elements): 128-byte multiple
    bf16* sQ = (bf16*)mla_smem;
    bf16* sKV = sQ + M * rs;
    bf16* sP = sKV + NS * T * rs;
    float* sM = (float*)(sP + M * PS);
    float* sL = sM + 4 * M;

    const bf16* cache = (const bf16*)p.cache + (long long)p.row_slot[row] * p.slot_stride;
    const int ntiles = mma_prologue<M, T, NS, 4>(p, t, cache, sQ, sKV, rs);  // sQ read after a barrier

    // Per-lane ldmatrix offsets. Every ldmatrix below reads rows r with r % 8 == lane % 8, so the
    // swizzle term is the per-lane constant xr; offsets are within 64-element (128-byte) groups.
    const int xr = (lane & 7) << 3;
    // Q (A, x4 = one m16 x k16 step s16 of a 64-group): rows lane&15, chunk s16*2 + lane/16
    int qoff[4];
#pragma unroll
    for (int s16 = 0; s16 < 4; s16++) qoff[s16] = (s16 * 16 + (lane >> 4) * 8) ^ xr;
    // K (B, x4 = one n8 tile x two k16 steps): rows lane&7, chunk q*4 + lane/8
    int koff[2];
#pragma unroll
    for (int q = 0; q < 2; q++) koff[q] = (q * 32 + (lane >> 3) * 8) ^ xr;
    const uint32_t qbase = smem_u32(sQ) + (uint32_t)((lane & 15) * rs) * 2u;
    const int ntw = c >> 5;            // output n8 tiles per warp (C/4 columns)
    const int col0 = warp * (c >> 2);  // first output column of this warp

    float o[MT][16][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 16; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[mt][j][e] = 0.0f;
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) m_run[mt][hr] = NEG_INF, l_run[mt][hr] = 0.0f;
    const float sl2 = p.scale * 1.4426950408889634f;

    for (int it = 0; it < ntiles; it++) {
        cp_async_wait<NS - 2>();  // tile it has landed (this thread's copies)
        __syncthreads();          // ... everyone's; and everyone is done with tile it-1
        {
            const int nx = it + NS - 1;
            if (nx < ntiles)
                mma_load_tile<T, 4>(cache, w, rs, sKV + (nx % NS) * T * rs, t_begin + nx * T, t_begin, t_end, warp,
                                    lane);
            cp_async_commit();
        }
        const bf16* sK = sKV + (it % NS) * T * rs;
        const uint32_t kvbase = smem_u32(sK);
        const int t0 = t_begin + it * T;

        // ---- S = Q·Kᵀ for this warp's TW tokens ----
        float sacc[KCH][MT][NTS][4];
#pragma unroll
        for (int ch = 0; ch < KCH; ch++)
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NTS; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sacc[ch][mt][nt][e] = 0.0f;
        const uint32_t kbase = kvbase + (uint32_t)((warp * TW + (lane & 7)) * rs) * 2u;
#pragma unroll 3
        for (int g64 = 0; g64 < w; g64 += 64) {
#pragma unroll
            for (int q = 0; q < 2; q++) {
                if (q == 1 && g64 + 64 > w) break;  // w % 64 == 32: half group at the end
                uint32_t kb[NTS][4];
#pragma unroll
                for (int nt = 0; nt < NTS; nt++) ldsm_x4(kbase + (uint32_t)(nt * 8 * rs + g64 + koff[q]) * 2u, kb[nt]);
#pragma unroll
                for (int kk = 0; kk < 2; kk++) {
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        uint32_t a[4];
                        ldsm_x4(qbase + (uint32_t)(mt * 16 * rs + g64 + qoff[q * 2 + kk]) * 2u, a);
#pragma unroll
                        for (int nt = 0; nt < NTS; nt++)
                            mma_bf16_16816(sacc[kk % KCH][mt][nt], a, kb[nt][2 * kk], kb[nt][2 * kk + 1]);
                    }
                }
            }
        }

        // ---- scale to log2 units, mask, partial row max over this warp's tokens ----
        float s2[MT][NTS][4];
        float mx[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            mx[mt][0] = mx[mt][1] = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NTS; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float v = sacc[0][mt][nt][e];
                    if (KCH == 2) v += sacc[KCH - 1][mt][nt][e];
                    const int tok = t0 + warp * TW + nt * 8 + 2 * tq + (e & 1);
                    v = tok < t_end ? v * sl2 : NEG_INF;
                    s2[mt][nt][e] = v;
                    mx[mt][e >> 1] = fmaxf(mx[mt][e >> 1], v);
                }
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                mx[mt][hr] = fmaxf(mx[mt][hr], __shfl_xor_sync(0xffffffffu, mx[mt][hr], 1));
                mx[mt][hr] = fmaxf(mx[mt][hr], __shfl_xor_sync(0xffffffffu, mx[mt][hr], 2));
                if (tq == 0) sM[warp * M + mt * 16 + g + 8 * hr] = mx[mt][hr];
            }
        }
        __syncthreads();

        // ---- new row max (same in every warp), P = 2^(s2 - m) -> sP, l, rescale O ----
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float alpha[2], mu[2];
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                const int r = mt * 16 + g + 8 * hr;
                float mn = fmaxf(fmaxf(sM[r], sM[M + r]), fmaxf(sM[2 * M + r], sM[3 * M + r]));
                mn = fmaxf(mn, m_run[mt][hr]);
                mu[hr] = mn == NEG_INF ? 0.0f : mn;  // no finite score yet: avoid -inf - -inf
                alpha[hr] = fast_exp2(m_run[mt][hr] - mu[hr]);
                m_run[mt][hr] = mn;
                l_run[mt][hr] *= alpha[hr];
            }
#pragma unroll
            for (int nt = 0; nt < NTS; nt++) {
                float r0, r1, r2, r3;
                const uint32_t lo = pack_bf16x2(fast_exp2(s2[mt][nt][0] - mu[0]), fast_exp2(s2[mt][nt][1] - mu[0]), r0, r1);
                const uint32_t hi = pack_bf16x2(fast_exp2(s2[mt][nt][2] - mu[1]), fast_exp2(s2[mt][nt][3] - mu[1]), r2, r3);
                l_run[mt][0] += r0 + r1;
                l_run[mt][1] += r2 + r3;
                const int col = warp * TW + nt * 8 + 2 * tq;
                *reinterpret_cast<uint32_t*>(sP + (mt * 16 + g) * PS + col) = lo;
                *reinterpret_cast<uint32_t*>(sP + (mt * 16 + g + 8) * PS + col) = hi;
            }
#pragma unroll
            for (int j = 0; j < 16; j++) {
                if (j < ntw) {
                    o[mt][j][0] *= alpha[0];
                    o[mt][j][1] *= alpha[0];
                    o[mt][j][2] *= alpha[1];
                    o[mt][j][3] *= alpha[1];
                }
            }
        }
        __syncthreads();

        // ---- O += P·V over this warp's columns ----
        mma_pv<MT, T, 16>(o, sP, kvbase, rs, col0, ntw, xr, lane);
    }

    // ---- epilogue: l over the quad and the warps; write O (normalized or partial) ----
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float l = l_run[mt][hr];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            if (tq == 0) sL[warp * M + mt * 16 + g + 8 * hr] = l;
        }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int hh = mt * 16 + g + 8 * hr;
            if (hh >= nh) continue;
            const float l = sL[hh] + sL[M + hh] + sL[2 * M + hh] + sL[3 * M + hh];
            mma_store_head(p, o[mt], hr, row, h0 + hh, split, col0, ntw, tq, m_run[mt][hr], l, warp == 0 && tq == 0);
        }
    if (p.splits > 1 && p.counters) mma_fused_combine<M>(p);
}

// ---------------------------------------------------------------------------------------------
// Depth-split variant (bf16, 16 heads per CTA, NW = 4 or 8 warps): mla_decode_mmad_*. Same grid,
// splits, cache ring, swizzle, P·V and outputs as mla_decode_mma<1, T, NS>; the S GEMM is split
// across the warps along the depth C + dr instead of the tokens. In mla_decode_mma every warp reads
// all of Q from shared memory again for every tile (4 x 18 KiB per 32-token tile at d 576: more
// shared-memory traffic than the tile itself, and the memory-bound 16-head case ran at 68% of the
// copy ceiling on the H100). Here warp w holds Q's A fragments of its k16 steps
// [w·KS/NW, (w+1)·KS/NW) (KS = (C + dr)/16: at most 10 per warp with 4 warps, 40 registers; 5 with
// 8) from the start, and per tile:
//   1. S_w = Q[:, depth_w]·K[tile, depth_w]ᵀ for all T tokens (T/8 independent accumulator
//      chains) -> sS[w] (f32, rows padded to T + 8: the float2 stores are conflict-free)
//   2. softmax: the 2·NW lanes of a head row (thread t: row t / (2·NW), tokens
//      (t % (2·NW))·TPT + [0, TPT), TPT = T / (2·NW)) sum the NW partials (fixed order
//      w = 0..NW-1), scale to log2 units, mask past the split, take the row max over the row's
//      lanes (shuffles) and the running max, write P = 2^(s - m) rounded to bf16 to sP and
//      alpha = 2^(m_old - m) to sA, and keep per-thread partial row sums l of the rounded P
//      (rescaled by alpha every tile; summed over the row's lanes at the end)
//   3. every warp rescales its O by sA and runs O += P·V over its C/NW columns (mma_pv)
// Three barriers per tile, as in mla_decode_mma. The S sums run in another order than
// mla_decode_mma's, so the two agree to f32 rounding of S (both within the tests' bf16 tolerance).
// 8 warps: twice the warps per SM to hide ldmatrix/mma latency, half the registers per thread.
//
// Shared memory (must match MmaVariant::smem_bytes): a union of sQ [16][RS] bf16 (read once into
// the fragments) and sS [NW][16][T+8] f32, rounded up to 128 bytes, then sKV [NS][T][RS] bf16,
// sP [16][T+8] bf16, and sA, sMr, sL [16] f32 each.
template <int T, int NS, int NW>
__device__ __forceinline__ void mla_decode_mmad(const MlaArgs& p) {
    constexpr int M = 16;                                     // heads per CTA
    constexpr int PS = T + 8;                                 // sS and sP row stride (elements)
    constexpr int NT8 = T / 8;                                // n8 tiles of S (every warp: all T tokens)
    constexpr int QMAX = ((MLA_CMAX + MLA_RMAX) / 16 + NW - 1) / NW;  // k16 steps per warp at most
    constexpr int LPR = 2 * NW;                               // softmax lanes per head row
    constexpr int TPT = T / LPR;                              // tokens per thread in the softmax
    const float NEG_INF = -__int_as_float(0x7f800000);
    static_assert(T % 32 == 0 && T <= 64 && NS >= 2, "tile of 32 or 64 tokens, >= 2 stages");
    static_assert((NW == 4 || NW == 8) && TPT % 2 == 0, "4 or 8 warps, an even token count per thread");

    MmaCta t;
    if (!mma_cta<M, T>(p, t)) return;
    const int c = p.c, w = p.c + p.dr, row = t.row, h0 = t.h0, nh = t.nh, split = t.split;
    const int warp = t.warp, lane = t.lane, g = t.g, tq = t.tq, t_begin = t.t_begin, t_end = t.t_end;

    const int rs = (w + 63) & ~63;
    const int ubytes = (max(M * rs * 2, NW * M * PS * 4) + 127) & ~127;
    bf16* sQ = (bf16*)mla_smem;
    float* sS = (float*)mla_smem;  // aliases sQ once the fragments are in registers
    bf16* sKV = (bf16*)(mla_smem + ubytes);
    bf16* sP = sKV + NS * T * rs;
    float* sA = (float*)(sP + M * PS);
    float* sMr = sA + M;
    float* sL = sMr + M;

    const bf16* cache = (const bf16*)p.cache + (long long)p.row_slot[row] * p.slot_stride;
    const int ntiles = mma_prologue<M, T, NS, NW>(p, t, cache, sQ, sKV, rs);
    __syncthreads();

    // this warp's k16 steps of Q as A fragments (rows lane & 15, chunk lane / 16); every ldmatrix
    // here reads rows r with r % 8 == lane % 8, so the swizzle is the per-lane constant xr
    const int xr = (lane & 7) << 3;
    const int ks = w >> 4, kb0 = warp * ks / NW, nks = (warp + 1) * ks / NW - kb0;
    auto swz = [&](int e) { return (e & ~63) | ((e & 63) ^ xr); };
    uint32_t qf[QMAX][4];
    {
        const uint32_t qbase = smem_u32(sQ) + (uint32_t)((lane & 15) * rs) * 2u;
#pragma unroll
        for (int s = 0; s < QMAX; s++) {
            if (s < nks) {
                ldsm_x4(qbase + (uint32_t)swz((kb0 + s) * 16 + (lane >> 4) * 8) * 2u, qf[s]);
            } else {
                qf[s][0] = qf[s][1] = qf[s][2] = qf[s][3] = 0u;
            }
        }
    }
    // K (B, x4 = two n8 token tiles x one k16 step): token rows (lane / 16)·8 + lane % 8 of the
    // pair, k chunk (lane / 8) % 2 -> b[0], b[1] for the first tile, b[2], b[3] for the second
    const uint32_t krow = (uint32_t)((((lane >> 4) << 3) + (lane & 7)) * rs) * 2u;
    const int kh = ((lane >> 3) & 1) * 8;
    const int ntw = c / (8 * NW), col0 = warp * (c / NW);  // output n8 tiles and first column of this warp
    const int sr = threadIdx.x / LPR, sj = (threadIdx.x % LPR) * TPT;  // softmax row and first token

    constexpr int NJ = 64 / NW;  // output n8 tiles per warp at most (C <= 512)
    float o[1][NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[0][j][e] = 0.0f;
    float m_run = NEG_INF, l_part = 0.0f;
    const float sl2 = p.scale * 1.4426950408889634f;

    for (int it = 0; it < ntiles; it++) {
        cp_async_wait<NS - 2>();
        __syncthreads();  // tile it landed; tile it-1's P·V done (sP, sA, the stage); qf loaded (sS)
        {
            const int nx = it + NS - 1;
            if (nx < ntiles)
                mma_load_tile<T, NW>(cache, w, rs, sKV + (nx % NS) * T * rs, t_begin + nx * T, t_begin, t_end, warp,
                                     lane);
            cp_async_commit();
        }
        const uint32_t kvbase = smem_u32(sKV + (it % NS) * T * rs);
        const int t0 = t_begin + it * T;

        // ---- 1. partial S over this warp's depth, all T tokens ----
        float sacc[NT8][4];
#pragma unroll
        for (int nt = 0; nt < NT8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sacc[nt][e] = 0.0f;
#pragma unroll
        for (int s = 0; s < QMAX; s++) {
            if (s < nks) {
                const uint32_t ko = kvbase + krow + (uint32_t)swz((kb0 + s) * 16 + kh) * 2u;
#pragma unroll
                for (int np = 0; np < NT8 / 2; np++) {
                    uint32_t kb[4];
                    ldsm_x4(ko + (uint32_t)(np * 16 * rs) * 2u, kb);
                    mma_bf16_16816(sacc[2 * np], qf[s], kb[0], kb[1]);
                    mma_bf16_16816(sacc[2 * np + 1], qf[s], kb[2], kb[3]);
                }
            }
        }
        {
            float* sw = sS + warp * M * PS;
#pragma unroll
            for (int nt = 0; nt < NT8; nt++) {
                const int col = nt * 8 + 2 * tq;
                *reinterpret_cast<float2*>(sw + g * PS + col) = make_float2(sacc[nt][0], sacc[nt][1]);
                *reinterpret_cast<float2*>(sw + (g + 8) * PS + col) = make_float2(sacc[nt][2], sacc[nt][3]);
            }
        }
        __syncthreads();

        // ---- 2. softmax of row sr, tokens sj + [0, TPT) ----
        {
            float sv[TPT];
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < TPT; j += 2) {
                float2 a = *reinterpret_cast<const float2*>(sS + sr * PS + sj + j);
#pragma unroll
                for (int ww = 1; ww < NW; ww++) {
                    const float2 b = *reinterpret_cast<const float2*>(sS + (ww * M + sr) * PS + sj + j);
                    a.x += b.x, a.y += b.y;
                }
                sv[j] = a.x, sv[j + 1] = a.y;
            }
#pragma unroll
            for (int j = 0; j < TPT; j++) {
                sv[j] = t0 + sj + j < t_end ? sv[j] * sl2 : NEG_INF;
                mx = fmaxf(mx, sv[j]);
            }
#pragma unroll
            for (int x = 1; x < LPR; x <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
            const float mn = fmaxf(m_run, mx);
            const float mu = mn == NEG_INF ? 0.0f : mn;  // no finite score yet: avoid -inf - -inf
            const float alpha = fast_exp2(m_run - mu);
            m_run = mn;
            l_part *= alpha;
#pragma unroll
            for (int j = 0; j < TPT; j += 2) {
                float r0, r1;
                const uint32_t pp = pack_bf16x2(fast_exp2(sv[j] - mu), fast_exp2(sv[j + 1] - mu), r0, r1);
                l_part += r0 + r1;
                *reinterpret_cast<uint32_t*>(sP + sr * PS + sj + j) = pp;
            }
            if (threadIdx.x % LPR == 0) sA[sr] = alpha;
        }
        __syncthreads();

        // ---- 3. rescale O, O += P·V over this warp's columns ----
        {
            const float a0 = sA[g], a1 = sA[g + 8];
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                if (j < ntw) {
                    o[0][j][0] *= a0;
                    o[0][j][1] *= a0;
                    o[0][j][2] *= a1;
                    o[0][j][3] *= a1;
                }
            }
        }
        mma_pv<1, T, NJ>(o, sP, kvbase, rs, col0, ntw, xr, lane);
    }

    // ---- epilogue: l over the row's lanes; write O (normalized or partial) ----
#pragma unroll
    for (int x = 1; x < LPR; x <<= 1) l_part += __shfl_xor_sync(0xffffffffu, l_part, x);
    if (threadIdx.x % LPR == 0) sL[sr] = l_part, sMr[sr] = m_run;
    __syncthreads();
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int hh = g + 8 * hr;
        if (hh >= nh) continue;
        mma_store_head(p, o[0], hr, row, h0 + hh, split, col0, ntw, tq, sMr[hh], sL[hh], warp == 0 && tq == 0);
    }
    if (p.splits > 1 && p.counters) mma_fused_combine<M>(p);
}

// Variants (heads per CTA = 16*MT, tile T tokens, NS stages; mmad: depth-split S with NW warps);
// the launcher picks one by shape and by the GPU's opt-in shared memory (kernels/src/ops/mla.rs,
// MMA_VARIANTS). MLA_MMA(name, (launch bounds), body<...>) defines one kernel (d1t32 asks for two
// blocks per SM: ptxas then keeps it at <= 256 registers without spilling).
#define MLA_MMA(name, BOUNDS, ...)                                                   \
    extern "C" __global__ void __launch_bounds__ BOUNDS name(MlaArgs p) {            \
        DSV3_PDL();                                                                  \
        __VA_ARGS__(p);                                                              \
    }
MLA_MMA(mla_decode_mma_bf16, (MMA_THREADS), mla_decode_mma<1, 32, 2>)
MLA_MMA(mla_decode_mma_m1s4_bf16, (MMA_THREADS), mla_decode_mma<1, 32, 4>)
MLA_MMA(mla_decode_mma_m1t64_bf16, (MMA_THREADS), mla_decode_mma<1, 64, 2>)
MLA_MMA(mla_decode_mma_m2t32_bf16, (MMA_THREADS), mla_decode_mma<2, 32, 2>)
MLA_MMA(mla_decode_mma_m2t64_bf16, (MMA_THREADS), mla_decode_mma<2, 64, 2>)
MLA_MMA(mla_decode_mmad_t32_bf16, (MMA_THREADS, 2), mla_decode_mmad<32, 2, 4>)
MLA_MMA(mla_decode_mmad_s3_bf16, (MMA_THREADS), mla_decode_mmad<32, 3, 4>)
MLA_MMA(mla_decode_mmad_t64_bf16, (MMA_THREADS), mla_decode_mmad<64, 2, 4>)
MLA_MMA(mla_decode_mmad_w8_bf16, (2 * MMA_THREADS), mla_decode_mmad<32, 2, 8>)
MLA_MMA(mla_decode_mmad_w8s3_bf16, (2 * MMA_THREADS), mla_decode_mmad<32, 3, 8>)

// Merges the splits: ō = Σ_s e^{m_s - M} o_s / Σ_s e^{m_s - M} l_s. grid: (N, H), block: 256.
template <typename T>
__device__ void mla_combine(const MlaArgs& p) {
    int row = blockIdx.x, head = blockIdx.y;
    if (row >= p.n || head >= p.h) return;
    mla_combine_head<T>(p, row, head, threadIdx.x, blockDim.x);
}

extern "C" __global__ void mla_combine_f32(MlaArgs p) { DSV3_PDL(); mla_combine<float>(p); }
extern "C" __global__ void mla_combine_bf16(MlaArgs p) { DSV3_PDL(); mla_combine<bf16>(p); }

// The step between the projections and attention, fused (one launch instead of RMSNorm, two
// RoPEs and the cache append): block (r, 0) normalizes row r's latent ckv[r, :C] (kv_a_layernorm,
// statistics in f32 as rmsnorm.cu, the same reduction), rotates its k_pe ckv[r, C:C+dr] and writes
// both to cache[slot[r], pos[r], :] (rows with a position outside the slot are skipped, as
// cache_append does); block (r, 1 + h) rotates head h's q_pe in place in q (row stride ld_q,
// head stride hs_q, rope part at offset q_off). The values equal the unfused ops' bit for bit.
// (The latent's part is mla_prep.cuh's, which the query GEMM gemm_skinny_prep_* also runs.)
// grid: (N, 1 + H), block: 256. C <= 512 (two latent values per thread), dr / 2 <= 256.
template <typename T>
__device__ void mla_prep(const T* ckv, int ld_ckv, const float* __restrict__ kv_norm, float eps, T* q, int ld_q,
                         int hs_q, int q_off, const int* __restrict__ pos, const float* __restrict__ inv_freq,
                         float attn_factor, T* cache, long long slot_stride, const int* __restrict__ slot, int n,
                         int c, int dr) {
    int r = blockIdx.x, y = blockIdx.y, half = dr / 2;
    if (r >= n) return;
    if (y == 0) {
        mla_prep_kv_row<T>(ckv + (long long)r * ld_ckv, cache + (long long)slot[r] * slot_stride, slot_stride, pos[r],
                           kv_norm, eps, inv_freq, attn_factor, c, dr);
    } else {
        rope_head_inplace(q + (long long)r * ld_q + (long long)(y - 1) * hs_q + q_off, half, pos[r], inv_freq,
                          attn_factor);
    }
}
extern "C" __global__ void mla_prep_f32(const float* ckv, int ld_ckv, const float* kv_norm, float eps, float* q,
                                        int ld_q, int hs_q, int q_off, const int* pos, const float* inv_freq,
                                        float attn_factor, float* cache, long long slot_stride, const int* slot, int n,
                                        int c, int dr) {
    DSV3_PDL();
    mla_prep<float>(ckv, ld_ckv, kv_norm, eps, q, ld_q, hs_q, q_off, pos, inv_freq, attn_factor, cache, slot_stride,
                    slot, n, c, dr);
}
extern "C" __global__ void mla_prep_bf16(const bf16* ckv, int ld_ckv, const float* kv_norm, float eps, bf16* q,
                                         int ld_q, int hs_q, int q_off, const int* pos, const float* inv_freq,
                                         float attn_factor, bf16* cache, long long slot_stride, const int* slot, int n,
                                         int c, int dr) {
    DSV3_PDL();
    mla_prep<bf16>(ckv, ld_ckv, kv_norm, eps, q, ld_q, hs_q, q_off, pos, inv_freq, attn_factor, cache, slot_stride,
                   slot, n, c, dr);
}

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
    DSV3_PDL();
    cache_append<float>(src, ld_src, cache, slot_stride, slot, pos, n, w);
}
extern "C" __global__ void cache_append_bf16(const bf16* src, int ld_src, bf16* cache, long long slot_stride,
                                             const int* slot, const int* pos, int n, int w) {
    DSV3_PDL();
    cache_append<bf16>(src, ld_src, cache, slot_stride, slot, pos, n, w);
}
