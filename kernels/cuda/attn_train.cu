// Flash attention for training (MHA form of MLA, bf16 operands, f32 accumulate on
// mma.sync.m16n8k16): FlashAttention-2's forward that also saves the log-sum-exp, and its
// backward as two deterministic kernels (no atomics: every output element is written once, by one
// thread, from a fixed summation order, so a step is bit-reproducible).
//
// Per head h, query row i of a segment (one sequence, its first row at position p0) sees keys
// 0..=p0+i of that sequence:
//   K_h[t] = [k_h[t] (dn) ‖ kpe[t] (dr, shared by every head)],  V_h[t] = v_h[t] (dv),
//   s = scale·(Q_h[i]·K_h[t]),  P = softmax_t(s),  O_h[i] = Σ_t P_t V_h[t],
//   lse[i, h] = log Σ_t e^{s_t}  (natural log, of the scaled scores).
// Backward, from dO (FlashAttention-2, Dao 2023, Algorithm 2):
//   D[i] = Σ_j dO[i, j]·O[i, j]                                       flash_bwd_preprocess
//   P = exp(s − lse),  dP = dO·Vᵀ,  dS = P ∘ (dP − D)
//   dV = Pᵀ·dO,  dK = scale·dSᵀ·Q                                      flash_bwd_dkdv (per key tile)
//   dQ = scale·dS·K                                                    flash_bwd_dq (per query tile)
// The rope part of dK is per head in an f32 scratch [pe rows][h][dr] that flash_bwd_dkpe_reduce
// sums over the heads in order (the key is shared). S and dP are computed in both backward kernels
// (7 GEMM-sized products instead of FlashAttention-2's 5) in exchange for no f32 atomics on dQ.
//
// Layouts as kernels/cuda/attn.cu (the inference prefill kernel this one follows): one CTA = 4
// warps; a warp owns 16 rows (queries in the forward and dQ, keys in dK/dV) and keeps everything
// about them in registers; the operand streamed over (keys, or queries) goes through an NS-stage
// cp.async ring in shared memory, one group per tile. Shared rows are 128-byte multiples: RSK =
// round_up(dkp, 64), RSV = round_up(dvp, 64) bf16, dkp / dvp = dk / dv rounded up to 16 (padding
// zero-filled by cp.async); 16-byte chunk c of row r sits at chunk c ^ (r & 7).
//   forward / dQ:  sQ [64][RSK], sO [64][RSV] (dQ: dO), ring sK [NS][BN][RSK], sV [NS][BN][RSV]
//   dK/dV:         sK [64][RSK], sV [64][RSV], ring sQ [NS][BMQ][RSK], sdO [NS][BMQ][RSV],
//                  then f32 sL [NS][BMQ] (lse·log2 e), sD [NS][BMQ]
// (FlashTrainVariant::smem_* in kernels/src/ops/attn_train.rs must agree.)
// Fragments: C (m16n8) of two adjacent n8 tiles = the A (m16k16) fragment, so P / dS go from the
// accumulators straight into A operands (rounded to bf16). Products with the streamed operand as
// B .col take it by a non-transposed ldmatrix when its depth is contiguous (Q·Kᵀ, dO·Vᵀ, K·Qᵀ,
// V·dOᵀ) and by ldmatrix.trans when the reduction runs over its rows (P·V, dS·K, Pᵀ·dO, dSᵀ·Q).
//
// Shapes: dn, dr, dv multiples of 8; dk = dn + dr <= DKT; dv <= DVT (the variant's). Strides and
// offsets of q, k, kpe, v, dO multiples of 8 elements (16-byte cp.async), of O, dQ, dK, dV even:
// checked by the launcher. Key rows of different segments must not overlap (dK/dV are written).
// lse and D: f32 [rows][h] at row*h + head (rows = query rows).
#include "mma.cuh"

#define FT_THREADS 128

struct FlashTrainArgs {
    const bf16* q;     // query row r, head h: q + r*ld_q + h*hs_q, dk values (q_nope ‖ q_pe)
    const bf16* k;     // key row j, head h: k + j*ld_k + h*hs_k, dn values
    const bf16* kpe;   // key row j: kpe + j*ld_kpe, dr values (all heads)
    const bf16* v;     // key row j, head h: v + j*ld_v + h*hs_v, dv values
    bf16* o;           // row r, head h: o + r*ld_o + h*hs_o, dv values (forward writes, backward reads)
    const bf16* dout;  // dO: dout + r*ld_do + h*hs_do, dv values
    float* lse;        // [rows][h]: the forward writes it, the backward reads it
    float* dd;         // [rows][h]: D = rowsum(dO ∘ O) (preprocess writes, dK/dV and dQ read)
    bf16* gq;          // dQ: gq + r*ld_dq + h*hs_dq, dk values
    bf16* gk;          // dK: gk + j*ld_dk + h*hs_dk, dn values (the nope part)
    float* gkpe_part;  // [pe rows][h][dr] f32: the rope part of dK per head
    bf16* gkpe;        // dK's rope part: gkpe + j*ld_dkpe, dr values, Σ over heads of gkpe_part
    bf16* gv;          // dV: gv + j*ld_dv + h*hs_dv, dv values
    const int* segs;   // [segments][5]: q_row0, nq, p0, k_row0, pe_row0
    const int* tiles;  // [ntiles][2]: segment, first query row (forward, preprocess, dQ) or key (dK/dV, reduce)
    int ld_q, hs_q, ld_k, hs_k, ld_kpe, ld_v, hs_v, ld_o, hs_o, ld_do, hs_do;
    int ld_dq, hs_dq, ld_dk, hs_dk, ld_dkpe, ld_dv, hs_dv;
    int h, dn, dr, dv, ntiles;
    float scale;
};

DSV3_DYNAMIC_SMEM(ft_smem);

#define FT_LOG2E 1.4426950408889634f
#define FT_LN2 0.6931471805599453f

__device__ __forceinline__ uint32_t ft_pack(float lo, float hi, float& rlo, float& rhi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    rlo = __low2float(v);
    rhi = __high2float(v);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t ft_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ bool ft_dims_ok(const FlashTrainArgs& p, int dkt, int dvt) {
    const int dk = p.dn + p.dr;
    return dk > 0 && p.dv > 0 && !(p.dn & 7) && !(p.dr & 7) && !(p.dv & 7) && ((dk + 15) & ~15) <= dkt &&
           ((p.dv + 15) & ~15) <= dvt;
}

// Rows [r0, r0 + nrows) of a [.., h, d] bf16 operand (d = cd 16-byte chunks; the row's chunks
// past cd and rows past nvalid zero-filled) -> smem rows of rs elements, swizzled. For K the
// chunks past cdn come from the shared rope key.
__device__ __forceinline__ void ft_load_rows(bf16* dst, int rs, int nrows, int ckp, int nvalid, const bf16* base,
                                             long long ld, int cd) {
    for (int i = threadIdx.x; i < nrows * ckp; i += FT_THREADS) {
        const int r = i / ckp, ch = i - r * ckp;
        const bool ok = r < nvalid && ch < cd;
        const bf16* src = ok ? base + (long long)r * ld + ch * 8 : base;
        cp_async16(smem_u32(dst + r * rs + ((ch ^ (r & 7)) << 3)), src, ok ? 16 : 0);
    }
}
__device__ __forceinline__ void ft_load_k(bf16* dst, int rs, int nrows, int ckp, int nvalid, const FlashTrainArgs& p,
                                          int head, int krow, int perow) {
    const int cdn = p.dn >> 3, cdk = (p.dn + p.dr) >> 3;
    for (int i = threadIdx.x; i < nrows * ckp; i += FT_THREADS) {
        const int r = i / ckp, ch = i - r * ckp;
        const bool ok = r < nvalid && ch < cdk;
        const bf16* src = p.k;
        if (ok)
            src = ch < cdn ? p.k + (long long)(krow + r) * p.ld_k + (long long)head * p.hs_k + ch * 8
                           : p.kpe + (long long)(perow + r) * p.ld_kpe + (ch - cdn) * 8;
        cp_async16(smem_u32(dst + r * rs + ((ch ^ (r & 7)) << 3)), src, ok ? 16 : 0);
    }
}


// ---- the products every kernel below is made of (a warp's 16 rows; swizzled shared rows) ----

template <int N>
__device__ __forceinline__ void ft_zero(float (&acc)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

// acc[N][4] = A·Bᵀ over nsteps 16-deep steps (Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ): A the warp's 16 rows at
// a_row0 of `a` (rows of rsa elements), B the N·8 rows of `b` (rows of rsb), both with their depth
// contiguous, taken by non-transposed ldmatrix.
template <int N>
__device__ __forceinline__ void ft_mma_abt(float (&acc)[N][4], uint32_t a, int rsa, int a_row0, uint32_t b, int rsb,
                                           int nsteps) {
    static_assert(N % 2 == 0, "column tiles in pairs");
    const int lane = threadIdx.x & 31, x7 = lane & 7;
    const int arow = a_row0 + (lane & 15), ahi = lane >> 4;
    const int brow = (lane & 7) + ((lane >> 4) << 3), bhi = (lane >> 3) & 1;
    ft_zero(acc);
#pragma unroll 2
    for (int ks = 0; ks < nsteps; ks++) {
        uint32_t af[4];
        ldsm_x4(a + (uint32_t)(arow * rsa + (((2 * ks + ahi) ^ x7) << 3)) * 2u, af);
#pragma unroll
        for (int np = 0; np < N / 2; np++) {
            uint32_t bf[4];
            ldsm_x4(b + (uint32_t)((np * 16 + brow) * rsb + (((2 * ks + bhi) ^ x7) << 3)) * 2u, bf);
            mma_bf16_16816(acc[2 * np], af, bf[0], bf[1]);
            mma_bf16_16816(acc[2 * np + 1], af, bf[2], bf[3]);
        }
    }
}

// acc[J][4] += P·B (P·V, dS·K, Pᵀ·dO, dSᵀ·Q): P the bf16 A fragments pk (the accumulators of a
// 16 x KN·8 product, packed), B the KN·8 rows of `b` (rows of rs elements) whose first njp·16
// columns are summed into (the reduction runs over B's rows: ldmatrix.trans).
template <int KN, int J>
__device__ __forceinline__ void ft_mma_pb(float (&acc)[J][4], const uint32_t (&pk)[KN][2], uint32_t b, int rs,
                                          int njp) {
    static_assert(KN % 2 == 0 && J % 2 == 0, "tiles in pairs");
    const int lane = threadIdx.x & 31, x7 = lane & 7;
    const int trow = lane & 15, thi = lane >> 4;
#pragma unroll
    for (int kt = 0; kt < KN / 2; kt++) {
        const uint32_t a[4] = {pk[2 * kt][0], pk[2 * kt][1], pk[2 * kt + 1][0], pk[2 * kt + 1][1]};
        const int r = kt * 16 + trow;
#pragma unroll
        for (int jp = 0; jp < J / 2; jp++) {
            if (jp < njp) {
                uint32_t bf[4];
                ldsm_x4_t(b + (uint32_t)(r * rs + (((2 * jp + thi) ^ x7) << 3)) * 2u, bf);
                mma_bf16_16816(acc[2 * jp], a, bf[0], bf[1]);
                mma_bf16_16816(acc[2 * jp + 1], a, bf[2], bf[3]);
            }
        }
    }
}

// A query tile of the forward / dQ grid: blockIdx.x's (segment, first query row) and the key
// range its rows see.
struct FtQueryTile {
    int q_row0, nq, p0, k_row0, pe_row0, q0, nqt, kend;
};
__device__ __forceinline__ FtQueryTile ft_query_tile(const FlashTrainArgs& p, int bm) {
    const int* seg = p.segs + 5 * p.tiles[2 * blockIdx.x];
    FtQueryTile t;
    t.q_row0 = seg[0], t.nq = seg[1], t.p0 = seg[2], t.k_row0 = seg[3], t.pe_row0 = seg[4];
    t.q0 = p.tiles[2 * blockIdx.x + 1];
    t.nqt = min(bm, t.nq - t.q0);
    t.kend = t.p0 + t.q0 + t.nqt;
    return t;
}

// ---------------------------------------------------------------------------------------------
// Forward: attn.cu's attn_fwd (64 query rows per CTA, a warp 16) that also writes lse.
// grid (tiles, h), tiles: (segment, first query row), 64 rows each.
template <int DVT, int BN, int NS>
__device__ __forceinline__ void ft_fwd(const FlashTrainArgs& p) {
    constexpr int BM = 64, NT = BN / 8, NV = DVT / 8;
    static_assert(BN % 16 == 0 && DVT % 16 == 0 && NS >= 2, "tile shapes");
    const float NEG_INF = -__int_as_float(0x7f800000);
    if (!ft_dims_ok(p, 256, DVT)) return;
    if ((int)blockIdx.x >= p.ntiles || (int)blockIdx.y >= p.h) return;
    const int dk = p.dn + p.dr;
    const int dkp = (dk + 15) & ~15, dvp = (p.dv + 15) & ~15;
    const FtQueryTile qt = ft_query_tile(p, BM);
    const int q_row0 = qt.q_row0, p0 = qt.p0, k_row0 = qt.k_row0, pe_row0 = qt.pe_row0, q0 = qt.q0;
    const int head = blockIdx.y, nqt = qt.nqt, kend = qt.kend;
    if (nqt <= 0) return;
    const int nkt = (kend + BN - 1) / BN;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int rsk = (dkp + 63) & ~63, rsv = (dvp + 63) & ~63;
    bf16* sQ = (bf16*)ft_smem;
    bf16* sK = sQ + BM * rsk;
    bf16* sV = sK + NS * BN * rsk;
    const int ckk = dkp >> 3, ckv = dvp >> 3;

    ft_load_rows(sQ, rsk, BM, ckk, nqt, p.q + (long long)(q_row0 + q0) * p.ld_q + (long long)head * p.hs_q, p.ld_q,
                 dk >> 3);
    auto load_kv = [&](int it, int st) {
        const int t0 = it * BN;
        ft_load_k(sK + st * BN * rsk, rsk, BN, ckk, kend - t0, p, head, k_row0 + t0, pe_row0 + t0);
        ft_load_rows(sV + st * BN * rsv, rsv, BN, ckv, kend - t0,
                     p.v + (long long)(k_row0 + t0) * p.ld_v + (long long)head * p.hs_v, p.ld_v, p.dv >> 3);
    };
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < nkt) load_kv(s, s);
        cp_async_commit();
    }

    const int wrow0 = warp * 16;
    const bool wactive = wrow0 < nqt;
    const int wq_first = p0 + q0 + wrow0;
    const int wq_last = p0 + q0 + min(wrow0 + 16, nqt) - 1;
    const int nks = dkp >> 4, nvj = dvp >> 4;

    float o[NV][4];
    ft_zero(o);
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};
    const float sl2 = p.scale * FT_LOG2E;

    for (int it = 0; it < nkt; it++) {
        cp_async_wait<NS - 2>();
        __syncthreads();
        {
            const int nx = it + NS - 1;
            if (nx < nkt) load_kv(nx, nx % NS);
            cp_async_commit();
        }
        const int t0 = it * BN;
        if (!wactive || t0 > wq_last) continue;
        const int st = it % NS;
        const uint32_t kbase = smem_u32(sK + st * BN * rsk);
        const uint32_t vbase = smem_u32(sV + st * BN * rsv);

        float s[NT][4];
        ft_mma_abt(s, smem_u32(sQ), rsk, wrow0, kbase, rsk, nks);

        const bool masked = t0 + BN - 1 > wq_first;
        uint32_t pk[NT][2];
        {
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float v = s[nt][e] * sl2;
                    if (masked) {
                        const int key = t0 + nt * 8 + 2 * tq + (e & 1);
                        const int pos = wq_first + g + 8 * (e >> 1);
                        if (key > pos) v = NEG_INF;
                    }
                    s[nt][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
            float mu[2];
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
                const float mn = fmaxf(m_run[hr], mx[hr]);
                mu[hr] = mn == NEG_INF ? 0.0f : mn;
                const float alpha = fast_exp2(m_run[hr] - mu[hr]);
                m_run[hr] = mn;
                l_run[hr] *= alpha;
#pragma unroll
                for (int j = 0; j < NV; j++) {
                    o[j][2 * hr] *= alpha;
                    o[j][2 * hr + 1] *= alpha;
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                float r0, r1, r2, r3;
                pk[nt][0] = ft_pack(fast_exp2(s[nt][0] - mu[0]), fast_exp2(s[nt][1] - mu[0]), r0, r1);
                pk[nt][1] = ft_pack(fast_exp2(s[nt][2] - mu[1]), fast_exp2(s[nt][3] - mu[1]), r2, r3);
                l_run[0] += r0 + r1;
                l_run[1] += r2 + r3;
            }
        }

        ft_mma_pb(o, pk, vbase, rsv, nvj);
    }

    // epilogue: O / l and lse = (m + log2 l)·ln 2 for the valid rows
    if (!wactive) return;
    const int cdv = p.dv >> 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float l = l_run[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = wrow0 + g + 8 * hr;
        if (r >= nqt) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const long long row = q_row0 + q0 + r;
        bf16* dst = p.o + row * p.ld_o + (long long)head * p.hs_o + 2 * tq;
#pragma unroll
        for (int j = 0; j < NV; j++)
            if (j < cdv)
                *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) =
                    __floats2bfloat162_rn(o[j][2 * hr] * inv, o[j][2 * hr + 1] * inv);
        if (tq == 0) p.lse[row * p.h + head] = l > 0.0f ? (m_run[hr] + log2f(l)) * FT_LN2 : NEG_INF;
    }
}

// ---------------------------------------------------------------------------------------------
// D[row, head] = Σ_j dO·O (f32). grid (tiles, h) over the forward's tile table; a warp per 16 rows.
__device__ __forceinline__ void ft_preprocess(const FlashTrainArgs& p) {
    if ((int)blockIdx.x >= p.ntiles || (int)blockIdx.y >= p.h || p.dv <= 0 || (p.dv & 7)) return;
    const int* seg = p.segs + 5 * p.tiles[2 * blockIdx.x];
    const int q_row0 = seg[0], nq = seg[1];
    const int q0 = p.tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y;
    const int nqt = min(64, nq - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int r = warp * 16; r < min(warp * 16 + 16, nqt); r++) {
        const long long row = q_row0 + q0 + r;
        const bf16* o = p.o + row * p.ld_o + (long long)head * p.hs_o;
        const bf16* d = p.dout + row * p.ld_do + (long long)head * p.hs_do;
        float acc = 0.0f;
        for (int j = 2 * lane; j < p.dv; j += 64) {
            const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(o + j);
            const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(d + j);
            acc += __low2float(a) * __low2float(b) + __high2float(a) * __high2float(b);
        }
        acc = warp_sum(acc);
        if (lane == 0) p.dd[row * p.h + head] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV: one CTA = 64 keys of one segment x one head (grid (key tiles, h); tiles: (segment,
// first key)); warp w owns keys 16w..16w+15 and accumulates dK (16 x DKT) and dV (16 x DVT) in
// registers over the query tiles (BMQ rows) that see them, streamed through the ring with their
// dO, lse and D.
template <int DKT, int DVT, int BMQ, int NS>
__device__ __forceinline__ void ft_bwd_dkdv(const FlashTrainArgs& p) {
    constexpr int BNK = 64, NQ = BMQ / 8, NK = DKT / 8, NV = DVT / 8;
    static_assert(BMQ % 16 == 0 && DKT % 16 == 0 && DVT % 16 == 0 && NS >= 2, "tile shapes");
    const float INF = __int_as_float(0x7f800000);
    if (!ft_dims_ok(p, DKT, DVT)) return;
    if ((int)blockIdx.x >= p.ntiles || (int)blockIdx.y >= p.h) return;
    const int dk = p.dn + p.dr;
    const int dkp = (dk + 15) & ~15, dvp = (p.dv + 15) & ~15;
    const int* seg = p.segs + 5 * p.tiles[2 * blockIdx.x];
    const int q_row0 = seg[0], nq = seg[1], p0 = seg[2], k_row0 = seg[3], pe_row0 = seg[4];
    const int k0 = p.tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y;
    const int kend = p0 + nq;  // keys of the segment
    const int nkr = min(BNK, kend - k0);
    if (nkr <= 0) return;
    const int qfirst = max(0, k0 - p0);  // the first query row that sees key k0
    const int nqtiles = (nq - qfirst + BMQ - 1) / BMQ;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int rsk = (dkp + 63) & ~63, rsv = (dvp + 63) & ~63;
    bf16* sK = (bf16*)ft_smem;
    bf16* sV = sK + BNK * rsk;
    bf16* sQ = sV + BNK * rsv;
    bf16* sO = sQ + NS * BMQ * rsk;
    float* sL = (float*)(sO + NS * BMQ * rsv);
    float* sD = sL + NS * BMQ;
    const int ckk = dkp >> 3, ckv = dvp >> 3;

    ft_load_k(sK, rsk, BNK, ckk, nkr, p, head, k_row0 + k0, pe_row0 + k0);
    ft_load_rows(sV, rsv, BNK, ckv, nkr, p.v + (long long)(k_row0 + k0) * p.ld_v + (long long)head * p.hs_v, p.ld_v,
                 p.dv >> 3);
    // query tile `it` -> stage `st`: Q, dO by cp.async; lse·log2 e and D by plain stores (rows
    // past the segment: lse +inf, so P = 0 there, D 0)
    auto load_q = [&](int it, int st) {
        const int q0 = qfirst + it * BMQ, nv = min(BMQ, nq - q0);
        const long long r0 = q_row0 + q0;
        ft_load_rows(sQ + st * BMQ * rsk, rsk, BMQ, ckk, nv, p.q + r0 * p.ld_q + (long long)head * p.hs_q, p.ld_q,
                     dk >> 3);
        ft_load_rows(sO + st * BMQ * rsv, rsv, BMQ, ckv, nv, p.dout + r0 * p.ld_do + (long long)head * p.hs_do,
                     p.ld_do, p.dv >> 3);
        for (int i = threadIdx.x; i < BMQ; i += FT_THREADS) {
            sL[st * BMQ + i] = i < nv ? p.lse[(r0 + i) * p.h + head] * FT_LOG2E : INF;
            sD[st * BMQ + i] = i < nv ? p.dd[(r0 + i) * p.h + head] : 0.0f;
        }
    };
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < nqtiles) load_q(s, s);
        cp_async_commit();
    }

    const int kw0 = k0 + warp * 16;  // this warp's first key (position in the segment)
    const bool wactive = kw0 < kend;
    const int nks = dkp >> 4, nvj = dvp >> 4;
    const float sl2 = p.scale * FT_LOG2E;

    float dkacc[NK][4], dvacc[NV][4];
    ft_zero(dkacc);
    ft_zero(dvacc);

    for (int it = 0; it < nqtiles; it++) {
        cp_async_wait<NS - 2>();
        __syncthreads();
        {
            const int nx = it + NS - 1;
            if (nx < nqtiles) load_q(nx, nx % NS);
            cp_async_commit();
        }
        const int q0 = qfirst + it * BMQ;
        const int pos_first = p0 + q0, pos_last = p0 + q0 + min(BMQ, nq - q0) - 1;
        if (!wactive || kw0 > pos_last) continue;  // no query of the tile sees a key of the warp
        const bool masked = kw0 + 15 > pos_first;
        const int st = it % NS;
        const uint32_t qbase = smem_u32(sQ + st * BMQ * rsk);
        const uint32_t obase = smem_u32(sO + st * BMQ * rsv);
        const float* lt = sL + st * BMQ;
        const float* dt = sD + st * BMQ;

        // ---- Sᵀ = K·Qᵀ (16 keys x BMQ queries) ----
        float s[NQ][4];
        ft_mma_abt(s, smem_u32(sK), rsk, warp * 16, qbase, rsk, nks);
        // ---- Pᵀ = exp2(s·scale·log2 e − lse·log2 e), 0 where the key is past the query ----
        uint32_t pk[NQ][2];
#pragma unroll
        for (int nt = 0; nt < NQ; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = nt * 8 + 2 * tq + (e & 1);
                float pv = fast_exp2(s[nt][e] * sl2 - lt[qi]);
                if (masked && kw0 + g + 8 * (e >> 1) > pos_first + qi) pv = 0.0f;
                s[nt][e] = pv;
            }
            pk[nt][0] = ft_pack(s[nt][0], s[nt][1]);
            pk[nt][1] = ft_pack(s[nt][2], s[nt][3]);
        }
        // ---- dV += Pᵀ·dO ----
        ft_mma_pb(dvacc, pk, obase, rsv, nvj);
        // ---- dPᵀ = V·dOᵀ ----
        float dp[NQ][4];
        ft_mma_abt(dp, smem_u32(sV), rsv, warp * 16, obase, rsv, nvj);
        // ---- dSᵀ = Pᵀ ∘ (dPᵀ − D), bf16 A fragments ----
#pragma unroll
        for (int nt = 0; nt < NQ; nt++) {
            const int qi = nt * 8 + 2 * tq;
            pk[nt][0] = ft_pack(s[nt][0] * (dp[nt][0] - dt[qi]), s[nt][1] * (dp[nt][1] - dt[qi + 1]));
            pk[nt][1] = ft_pack(s[nt][2] * (dp[nt][2] - dt[qi]), s[nt][3] * (dp[nt][3] - dt[qi + 1]));
        }
        // ---- dK += dSᵀ·Q ----
        ft_mma_pb(dkacc, pk, qbase, rsk, nks);
    }

    // ---- epilogue: dV, scale·dK (nope -> dk, rope -> the per-head f32 scratch) ----
    if (!wactive) return;
    const int cdn = p.dn >> 3, cdk = dk >> 3, cdv = p.dv >> 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int key = kw0 + g + 8 * hr;
        if (key >= kend) continue;
        const long long kr = k_row0 + key;
        bf16* vdst = p.gv + kr * p.ld_dv + (long long)head * p.hs_dv + 2 * tq;
#pragma unroll
        for (int j = 0; j < NV; j++)
            if (j < cdv)
                *reinterpret_cast<__nv_bfloat162*>(vdst + j * 8) =
                    __floats2bfloat162_rn(dvacc[j][2 * hr], dvacc[j][2 * hr + 1]);
        bf16* kdst = p.gk + kr * p.ld_dk + (long long)head * p.hs_dk + 2 * tq;
        float* pdst = p.gkpe_part + ((long long)(pe_row0 + key) * p.h + head) * p.dr + 2 * tq;
#pragma unroll
        for (int j = 0; j < NK; j++) {
            const float x0 = dkacc[j][2 * hr] * p.scale, x1 = dkacc[j][2 * hr + 1] * p.scale;
            if (j < cdn) {
                *reinterpret_cast<__nv_bfloat162*>(kdst + j * 8) = __floats2bfloat162_rn(x0, x1);
            } else if (j < cdk) {
                pdst[(j - cdn) * 8] = x0;
                pdst[(j - cdn) * 8 + 1] = x1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dQ: one CTA = 64 query rows of one segment x one head (the forward's grid and tiles); warp w
// owns rows 16w..16w+15 and accumulates dQ (16 x DKT) over the key tiles they see.
template <int DKT, int DVT, int BN, int NS>
__device__ __forceinline__ void ft_bwd_dq(const FlashTrainArgs& p) {
    constexpr int BM = 64, NT = BN / 8, NK = DKT / 8;
    static_assert(BN % 16 == 0 && DKT % 16 == 0 && DVT % 16 == 0 && NS >= 2, "tile shapes");
    const float INF = __int_as_float(0x7f800000);
    if (!ft_dims_ok(p, DKT, DVT)) return;
    if ((int)blockIdx.x >= p.ntiles || (int)blockIdx.y >= p.h) return;
    const int dk = p.dn + p.dr;
    const int dkp = (dk + 15) & ~15, dvp = (p.dv + 15) & ~15;
    const FtQueryTile qt = ft_query_tile(p, BM);
    const int p0 = qt.p0, k_row0 = qt.k_row0, pe_row0 = qt.pe_row0, q0 = qt.q0;
    const int head = blockIdx.y, nqt = qt.nqt, kend = qt.kend;
    if (nqt <= 0) return;
    const int nkt = (kend + BN - 1) / BN;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int rsk = (dkp + 63) & ~63, rsv = (dvp + 63) & ~63;
    bf16* sQ = (bf16*)ft_smem;
    bf16* sO = sQ + BM * rsk;
    bf16* sK = sO + BM * rsv;
    bf16* sV = sK + NS * BN * rsk;
    const int ckk = dkp >> 3, ckv = dvp >> 3;
    const long long r0 = qt.q_row0 + q0;

    ft_load_rows(sQ, rsk, BM, ckk, nqt, p.q + r0 * p.ld_q + (long long)head * p.hs_q, p.ld_q, dk >> 3);
    ft_load_rows(sO, rsv, BM, ckv, nqt, p.dout + r0 * p.ld_do + (long long)head * p.hs_do, p.ld_do, p.dv >> 3);
    auto load_kv = [&](int it, int st) {
        const int t0 = it * BN;
        ft_load_k(sK + st * BN * rsk, rsk, BN, ckk, kend - t0, p, head, k_row0 + t0, pe_row0 + t0);
        ft_load_rows(sV + st * BN * rsv, rsv, BN, ckv, kend - t0,
                     p.v + (long long)(k_row0 + t0) * p.ld_v + (long long)head * p.hs_v, p.ld_v, p.dv >> 3);
    };
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < nkt) load_kv(s, s);
        cp_async_commit();
    }

    const int wrow0 = warp * 16;
    const bool wactive = wrow0 < nqt;
    const int wq_first = p0 + q0 + wrow0;
    const int wq_last = p0 + q0 + min(wrow0 + 16, nqt) - 1;
    const int nks = dkp >> 4, nvj = dvp >> 4;
    const float sl2 = p.scale * FT_LOG2E;
    // this thread's rows g, g + 8: lse·log2 e (+inf past the segment: P = 0) and D
    float lr[2], dr_[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int r = wrow0 + g + 8 * hr;
        lr[hr] = r < nqt ? p.lse[(r0 + r) * p.h + head] * FT_LOG2E : INF;
        dr_[hr] = r < nqt ? p.dd[(r0 + r) * p.h + head] : 0.0f;
    }

    float dqacc[NK][4];
    ft_zero(dqacc);

    for (int it = 0; it < nkt; it++) {
        cp_async_wait<NS - 2>();
        __syncthreads();
        {
            const int nx = it + NS - 1;
            if (nx < nkt) load_kv(nx, nx % NS);
            cp_async_commit();
        }
        const int t0 = it * BN;
        if (!wactive || t0 > wq_last) continue;
        const int st = it % NS;
        const uint32_t kbase = smem_u32(sK + st * BN * rsk);
        const uint32_t vbase = smem_u32(sV + st * BN * rsv);

        // ---- S = Q·Kᵀ ----
        float s[NT][4];
        ft_mma_abt(s, smem_u32(sQ), rsk, wrow0, kbase, rsk, nks);
        // ---- P ----
        const bool masked = t0 + BN - 1 > wq_first;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float pv = fast_exp2(s[nt][e] * sl2 - lr[e >> 1]);
                if (masked && t0 + nt * 8 + 2 * tq + (e & 1) > wq_first + g + 8 * (e >> 1)) pv = 0.0f;
                s[nt][e] = pv;
            }
        // ---- dP = dO·Vᵀ ----
        float dp[NT][4];
        ft_mma_abt(dp, smem_u32(sO), rsv, wrow0, vbase, rsv, nvj);
        // ---- dS = P ∘ (dP − D) -> bf16 A fragments; dQ += dS·K ----
        uint32_t pk[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            pk[nt][0] = ft_pack(s[nt][0] * (dp[nt][0] - dr_[0]), s[nt][1] * (dp[nt][1] - dr_[0]));
            pk[nt][1] = ft_pack(s[nt][2] * (dp[nt][2] - dr_[1]), s[nt][3] * (dp[nt][3] - dr_[1]));
        }
        ft_mma_pb(dqacc, pk, kbase, rsk, nks);
    }

    if (!wactive) return;
    const int cdk = dk >> 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int r = wrow0 + g + 8 * hr;
        if (r >= nqt) continue;
        bf16* dst = p.gq + (r0 + r) * p.ld_dq + (long long)head * p.hs_dq + 2 * tq;
#pragma unroll
        for (int j = 0; j < NK; j++)
            if (j < cdk)
                *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) =
                    __floats2bfloat162_rn(dqacc[j][2 * hr] * p.scale, dqacc[j][2 * hr + 1] * p.scale);
    }
}

// ---------------------------------------------------------------------------------------------
// gkpe[key] = Σ_head gkpe_part[key][head] (heads in order, f32), bf16. grid (key tiles) over
// the dK/dV tile table, 64 keys per block.
__device__ __forceinline__ void ft_dkpe_reduce(const FlashTrainArgs& p) {
    if ((int)blockIdx.x >= p.ntiles || p.dr <= 0) return;
    const int* seg = p.segs + 5 * p.tiles[2 * blockIdx.x];
    const int nq = seg[1], p0 = seg[2], pe_row0 = seg[4];
    const int k0 = p.tiles[2 * blockIdx.x + 1];
    const int nk = min(64, p0 + nq - k0);
    for (int i = threadIdx.x; i < nk * p.dr; i += FT_THREADS) {
        const int t = i / p.dr, c = i - t * p.dr;
        const long long row = pe_row0 + k0 + t;
        const float* src = p.gkpe_part + row * p.h * p.dr + c;
        float acc = 0.0f;
        for (int hh = 0; hh < p.h; hh++) acc += src[(long long)hh * p.dr];
        p.gkpe[row * p.ld_dkpe + c] = __float2bfloat16_rn(acc);
    }
}

// Variants k<DKT>v<DVT>: dk = dn + dr <= DKT, dv <= DVT (kernels/src/ops/attn_train.rs,
// FLASH_TRAIN_VARIANTS). The forward takes dk <= 256 whatever the variant (its dk loop runs
// over shared memory); the backward kernels keep 16 x DKT (and 16 x DVT) accumulators per thread.
#define FT_VARIANT(NAME, DKT, DVT, FBN, BMQ, QBN)                                                                       \
    extern "C" __global__ void __launch_bounds__(FT_THREADS) flash_fwd_train_bf16_##NAME(FlashTrainArgs p) {          \
        DSV3_PDL(); ft_fwd<DVT, FBN, 2>(p);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FT_THREADS) flash_bwd_dkdv_bf16_##NAME(FlashTrainArgs p) {           \
        DSV3_PDL(); ft_bwd_dkdv<DKT, DVT, BMQ, 2>(p);                                                                \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FT_THREADS) flash_bwd_dq_bf16_##NAME(FlashTrainArgs p) {             \
        DSV3_PDL(); ft_bwd_dq<DKT, DVT, QBN, 2>(p);                                                                  \
    }
FT_VARIANT(k64v64, 64, 64, 64, 64, 64)
FT_VARIANT(k128v128, 128, 128, 64, 32, 64)
FT_VARIANT(k192v128, 192, 128, 64, 32, 32)

extern "C" __global__ void __launch_bounds__(FT_THREADS) flash_bwd_preprocess(FlashTrainArgs p) { DSV3_PDL(); ft_preprocess(p); }
extern "C" __global__ void __launch_bounds__(FT_THREADS) flash_bwd_dkpe_reduce(FlashTrainArgs p) { DSV3_PDL(); ft_dkpe_reduce(p); }
