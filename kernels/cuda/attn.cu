// Flash attention for prefill (MHA form of MLA, bf16, causal with an offset): FlashAttention-2's
// forward on mma.sync.m16n8k16 (bf16 in, f32 accumulate), ldmatrix and a cp.async ring.
//
// Per head h, query row i of a segment (one sequence's new tokens, the first at position p0) sees
// keys 0..=p0+i of that sequence:
//   K_h[t] = [k_h[t] (dn) ‖ kpe[t] (dr, shared by every head)],  V_h[t] = v_h[t] (dv),
//   s = (Q_h[i]·K_h[t]) * scale,  p = softmax over t,  O_h[i] = Σ_t p_t V_h[t].
// For MLA's prefill, k_h / v_h are the decompressed latents (latent · kv_b_projᵀ: k_nope then v
// per head) and kpe is the rotated rope key read straight from the latent cache.
//
// One CTA = one query tile of BM = 64*MW rows of one segment x one head. 4 warps; warp w owns
// rows [16*MW*w, 16*MW*(w+1)) and everything about them (S, the online softmax, O) stays in its
// registers: no cross-warp reduction (FlashAttention-2's split by queries). K/V tiles of BN keys
// stream through an NS-stage shared-memory ring (cp.async, one group per tile); each tile is
// loaded once per CTA and used by all 4 warps.
//   S = Q·Kᵀ      Q (A operand, ldmatrix from sQ) x K (B operand .col: a key's depth contiguous,
//                 non-transposed ldmatrix), MW x BN/8 accumulator tiles per warp.
//   softmax       online, log2 domain: s2 = s * scale * log2(e), p = 2^(s2 - m) (ex2.approx), the
//                 row max and sum over the thread quad (shuffles); P is rounded to bf16 and the
//                 running sum adds the rounded values (out = Σ p̂·v / Σ p̂ for the weights used).
//   O += P·V      P goes from the S accumulators straight into A fragments (the m16n8 C layout of
//                 two adjacent n8 tiles is the m16k16 A layout), V via ldmatrix.trans.
// Causality: the CTA loads keys [0, p0 + q0 + rows) (what its last row sees); a warp skips a
// tile none of its rows sees; elements past a row's position are masked to -inf only in tiles
// that reach past the warp's first row.
//
// Shared memory (dynamic; AttnVariant::smem_bytes in kernels/src/ops/attn.rs must agree):
//   sQ [BM][RSK], sK [NS][BN][RSK], sV [NS][BN][RSV] bf16; RSK = round_up(dkp, 64),
//   RSV = round_up(dvp, 64), dkp / dvp = dk / dv rounded up to 16 (the padding is zero-filled by
//   cp.async, so it adds nothing to Q·K and its output columns are never stored). Rows are
//   128-byte multiples; 16-byte chunk c of row r is stored at chunk c ^ (r & 7) (8 consecutive
//   rows of an ldmatrix phase hit 8 different bank groups).
//
// Shapes: dn, dr, dv multiples of 8; dk = dn + dr <= 256 (dr may be 0); dv <= DVT. Row strides
// and offsets multiples of 8 elements (16-byte cp.async), checked by the launcher.
// grid: (tiles, h), block 128. tiles[] lists (segment, first query row) per CTA (the launcher
// orders them by work, longest first).
#include "mma.cuh"

#define ATTN_THREADS 128

struct AttnArgs {
    const bf16* q;    // row r, head h: q + r*ld_q + h*hs_q, dk values (q_nope ‖ q_pe)
    const bf16* k;    // key row j, head h: k + j*ld_k + h*hs_k, dn values
    const bf16* kpe;  // key row j: kpe + j*ld_kpe, dr values (all heads)
    const bf16* v;    // key row j, head h: v + j*ld_v + h*hs_v, dv values
    bf16* out;        // row r, head h: out + r*ld_o + h*hs_o, dv values
    const int* segs;  // [segments][5]: q_row0, nq, p0, k_row0, pe_row0
    const int* tiles; // [ntiles][2]: segment, first query row within it
    int ld_q, hs_q, ld_k, hs_k, ld_kpe, ld_v, hs_v, ld_o, hs_o;
    int h, dn, dr, dv, ntiles;
    float scale;
};

DSV3_DYNAMIC_SMEM(attn_smem);

__device__ __forceinline__ uint32_t attn_pack(float lo, float hi, float& rlo, float& rhi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    rlo = __low2float(v);
    rhi = __high2float(v);
    return *reinterpret_cast<uint32_t*>(&v);
}

template <int MW, int DVT, int BN, int NS>
__device__ __forceinline__ void attn_fwd(const AttnArgs& p) {
    constexpr int BM = 64 * MW;  // query rows per CTA
    constexpr int NT = BN / 8;   // n8 tiles of S per m16 tile
    constexpr int NV = DVT / 8;  // n8 tiles of O per m16 tile
    static_assert(BN % 16 == 0 && DVT % 16 == 0 && NS >= 2, "tile shapes");
    const float NEG_INF = -__int_as_float(0x7f800000);

    const int dk = p.dn + p.dr;
    const int dkp = (dk + 15) & ~15, dvp = (p.dv + 15) & ~15;
    if (dk <= 0 || p.dv <= 0 || (p.dn & 7) || (p.dr & 7) || (p.dv & 7) || dkp > 256 || dvp > DVT) return;
    if ((int)blockIdx.x >= p.ntiles || (int)blockIdx.y >= p.h) return;
    const int* seg = p.segs + 5 * p.tiles[2 * blockIdx.x];
    const int q_row0 = seg[0], nq = seg[1], p0 = seg[2], k_row0 = seg[3], pe_row0 = seg[4];
    const int q0 = p.tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y;
    const int nqt = min(BM, nq - q0);  // query rows of this tile
    if (nqt <= 0) return;              // (uniform over the CTA)
    const int kend = p0 + q0 + nqt;    // keys [0, kend): what the tile's last row sees
    const int nkt = (kend + BN - 1) / BN;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;  // mma groupID, thread in group
    const int rsk = (dkp + 63) & ~63, rsv = (dvp + 63) & ~63;
    bf16* sQ = (bf16*)attn_smem;
    bf16* sK = sQ + BM * rsk;
    bf16* sV = sK + NS * BN * rsk;
    const int ckk = dkp >> 3, ckv = dvp >> 3;   // 16-byte chunks per smem row (padded)
    const int cdn = p.dn >> 3, cdk = dk >> 3, cdv = p.dv >> 3;  // ... holding data

    // Q tile -> sQ (rows past the segment and the padding: zero-filled, no read). It joins the
    // first cp.async group, with K/V tile 0.
    {
        const bf16* qb = p.q + (long long)(q_row0 + q0) * p.ld_q + (long long)head * p.hs_q;
        for (int i = threadIdx.x; i < BM * ckk; i += ATTN_THREADS) {
            const int r = i / ckk, ch = i - r * ckk;
            const bool ok = r < nqt && ch < cdk;
            const bf16* src = ok ? qb + (long long)r * p.ld_q + ch * 8 : p.q;
            cp_async16(smem_u32(sQ + r * rsk + ((ch ^ (r & 7)) << 3)), src, ok ? 16 : 0);
        }
    }
    // K/V tile `it` -> stage `st`; keys past kend and the padding zero-filled
    auto load_kv = [&](int it, int st) {
        const int t0 = it * BN;
        bf16* dK = sK + st * BN * rsk;
        bf16* dV = sV + st * BN * rsv;
        for (int i = threadIdx.x; i < BN * ckk; i += ATTN_THREADS) {
            const int r = i / ckk, ch = i - r * ckk;
            const int t = t0 + r;
            const bool ok = t < kend && ch < cdk;
            const bf16* src = p.k;
            if (ok)
                src = ch < cdn ? p.k + (long long)(k_row0 + t) * p.ld_k + (long long)head * p.hs_k + ch * 8
                               : p.kpe + (long long)(pe_row0 + t) * p.ld_kpe + (ch - cdn) * 8;
            cp_async16(smem_u32(dK + r * rsk + ((ch ^ (r & 7)) << 3)), src, ok ? 16 : 0);
        }
        for (int i = threadIdx.x; i < BN * ckv; i += ATTN_THREADS) {
            const int r = i / ckv, ch = i - r * ckv;
            const int t = t0 + r;
            const bool ok = t < kend && ch < cdv;
            const bf16* src = ok ? p.v + (long long)(k_row0 + t) * p.ld_v + (long long)head * p.hs_v + ch * 8 : p.v;
            cp_async16(smem_u32(dV + r * rsv + ((ch ^ (r & 7)) << 3)), src, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < nkt) load_kv(s, s);
        cp_async_commit();
    }

    const int wrow0 = warp * 16 * MW;  // this warp's first row in the tile
    const bool wactive = wrow0 < nqt;
    const int wq_first = p0 + q0 + wrow0;                                // its first row's position
    const int wq_last = p0 + q0 + min(wrow0 + 16 * MW, nqt) - 1;         // its last valid row's
    const int x7 = lane & 7;  // the swizzle of every row this lane addresses (row bases are 8k)
    // Q (A, x4): rows lane&15, chunk 2ks + lane/16; K (B, x4 = two n8 tiles x k16): key
    // (lane&7) + 8*(lane/16), chunk 2ks + (lane/8)&1; V (B, x4.trans = two n8 tiles x k16):
    // key lane&15, chunk 2jp + lane/16
    const int qrow = wrow0 + (lane & 15), qhi = lane >> 4;
    const int krow = (lane & 7) + ((lane >> 4) << 3), khi = (lane >> 3) & 1;
    const int vrow = lane & 15, vhi = lane >> 4;
    const int nks = dkp >> 4, nvj = dvp >> 4;

    float o[MW][NV][4];
#pragma unroll
    for (int mw = 0; mw < MW; mw++)
#pragma unroll
        for (int j = 0; j < NV; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[mw][j][e] = 0.0f;
    float m_run[MW][2], l_run[MW][2];
#pragma unroll
    for (int mw = 0; mw < MW; mw++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) m_run[mw][hr] = NEG_INF, l_run[mw][hr] = 0.0f;
    const float sl2 = p.scale * 1.4426950408889634f;

    for (int it = 0; it < nkt; it++) {
        cp_async_wait<NS - 2>();  // tile it (and Q) landed: this thread's copies
        __syncthreads();          // ... everyone's; and everyone is done with tile it-1
        {
            const int nx = it + NS - 1;
            if (nx < nkt) load_kv(nx, nx % NS);
            cp_async_commit();
        }
        const int t0 = it * BN;
        if (!wactive || t0 > wq_last) continue;  // no row of this warp sees a key of the tile
        const int st = it % NS;
        const uint32_t kbase = smem_u32(sK + st * BN * rsk);
        const uint32_t vbase = smem_u32(sV + st * BN * rsv);
        const uint32_t qbase = smem_u32(sQ);

        // ---- S = Q·Kᵀ ----
        float s[MW][NT][4];
#pragma unroll
        for (int mw = 0; mw < MW; mw++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[mw][nt][e] = 0.0f;
#pragma unroll 2
        for (int ks = 0; ks < nks; ks++) {
            uint32_t a[MW][4];
#pragma unroll
            for (int mw = 0; mw < MW; mw++)
                ldsm_x4(qbase + (uint32_t)((qrow + mw * 16) * rsk + (((2 * ks + qhi) ^ x7) << 3)) * 2u, a[mw]);
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t b[4];
                ldsm_x4(kbase + (uint32_t)((np * 16 + krow) * rsk + (((2 * ks + khi) ^ x7) << 3)) * 2u, b);
#pragma unroll
                for (int mw = 0; mw < MW; mw++) {
                    mma_bf16_16816(s[mw][2 * np], a[mw], b[0], b[1]);
                    mma_bf16_16816(s[mw][2 * np + 1], a[mw], b[2], b[3]);
                }
            }
        }

        // ---- scale to log2 units, causal mask, online softmax; P -> bf16 A fragments ----
        const bool masked = t0 + BN - 1 > wq_first;  // some key of the tile is past some row
        uint32_t pk[MW][NT][2];
#pragma unroll
        for (int mw = 0; mw < MW; mw++) {
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float v = s[mw][nt][e] * sl2;
                    if (masked) {
                        const int key = t0 + nt * 8 + 2 * tq + (e & 1);
                        const int pos = wq_first + mw * 16 + g + 8 * (e >> 1);
                        if (key > pos) v = NEG_INF;
                    }
                    s[mw][nt][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
            float mu[2];
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
                const float mn = fmaxf(m_run[mw][hr], mx[hr]);
                mu[hr] = mn == NEG_INF ? 0.0f : mn;  // no finite score yet: avoid -inf - -inf
                const float alpha = fast_exp2(m_run[mw][hr] - mu[hr]);
                m_run[mw][hr] = mn;
                l_run[mw][hr] *= alpha;
#pragma unroll
                for (int j = 0; j < NV; j++) {
                    o[mw][j][2 * hr] *= alpha;
                    o[mw][j][2 * hr + 1] *= alpha;
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                float r0, r1, r2, r3;
                pk[mw][nt][0] = attn_pack(fast_exp2(s[mw][nt][0] - mu[0]), fast_exp2(s[mw][nt][1] - mu[0]), r0, r1);
                pk[mw][nt][1] = attn_pack(fast_exp2(s[mw][nt][2] - mu[1]), fast_exp2(s[mw][nt][3] - mu[1]), r2, r3);
                l_run[mw][0] += r0 + r1;
                l_run[mw][1] += r2 + r3;
            }
        }

        // ---- O += P·V ----
#pragma unroll
        for (int kt = 0; kt < BN / 16; kt++) {
            uint32_t a[MW][4];
#pragma unroll
            for (int mw = 0; mw < MW; mw++) {
                a[mw][0] = pk[mw][2 * kt][0];
                a[mw][1] = pk[mw][2 * kt][1];
                a[mw][2] = pk[mw][2 * kt + 1][0];
                a[mw][3] = pk[mw][2 * kt + 1][1];
            }
            const int vr = kt * 16 + vrow;
#pragma unroll
            for (int jp = 0; jp < NV / 2; jp++) {
                if (jp < nvj) {
                    uint32_t b[4];
                    ldsm_x4_t(vbase + (uint32_t)(vr * rsv + (((2 * jp + vhi) ^ x7) << 3)) * 2u, b);
#pragma unroll
                    for (int mw = 0; mw < MW; mw++) {
                        mma_bf16_16816(o[mw][2 * jp], a[mw], b[0], b[1]);
                        mma_bf16_16816(o[mw][2 * jp + 1], a[mw], b[2], b[3]);
                    }
                }
            }
        }
    }

    // ---- epilogue: the row sums over the quad, O / l for the valid rows ----
    if (!wactive) return;
#pragma unroll
    for (int mw = 0; mw < MW; mw++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float l = l_run[mw][hr];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int r = wrow0 + mw * 16 + g + 8 * hr;
            if (r >= nqt) continue;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            bf16* dst = p.out + (long long)(q_row0 + q0 + r) * p.ld_o + (long long)head * p.hs_o + 2 * tq;
#pragma unroll
            for (int j = 0; j < NV; j++)
                if (j < cdv)
                    *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) =
                        __floats2bfloat162_rn(o[mw][j][2 * hr] * inv, o[mw][j][2 * hr + 1] * inv);
        }
}

// Variants: attn_fwd_m<MW>d<DVT>[s<NS>] = <query rows per CTA / 64> x <largest dv> [x stages]
// (kernels/src/ops/attn.rs, ATTN_VARIANTS, picks one by dv and grid fill).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m1d64(AttnArgs p) { DSV3_PDL(); attn_fwd<1, 64, 64, 2>(p); }
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m1d128(AttnArgs p) { DSV3_PDL(); attn_fwd<1, 128, 64, 2>(p); }
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m1d256(AttnArgs p) { DSV3_PDL(); attn_fwd<1, 256, 32, 2>(p); }
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m2d64(AttnArgs p) { DSV3_PDL(); attn_fwd<2, 64, 64, 2>(p); }
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m2d128(AttnArgs p) { DSV3_PDL(); attn_fwd<2, 128, 32, 2>(p); }
// three-stage rings (A/B: DSV3_FLASH_VARIANT, kernel_bench attn)
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m2d64s3(AttnArgs p) { DSV3_PDL(); attn_fwd<2, 64, 64, 3>(p); }
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_fwd_m2d128s3(AttnArgs p) { DSV3_PDL(); attn_fwd<2, 128, 32, 3>(p); }
