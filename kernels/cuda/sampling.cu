// Sampling helpers: argmax per row (greedy decoding; first index on ties, as
// core::infer::sampling::argmax) and an in-place softmax with temperature.
#include "common.cuh"

// out[r] = argmax_j x[r, j]. grid: (rows), block: 1024. NaN never wins (a row of NaN gives 0).
// Each thread scans its elements in index order (4 at a time with 16-byte loads when n % 4 == 0,
// so a 32000-wide row takes 8 rounds); the candidates (value, index) are merged by warp shuffles
// and then across warps, always preferring the larger value and then the lower index.
__device__ __forceinline__ void am_take(float v, int j, float& best, int& bi) {
    if (v > best || (v == best && j < bi)) {
        best = v;
        bi = j;
    }
}
extern "C" __global__ void __launch_bounds__(1024)
    argmax_rows_f32(const float* __restrict__ x, int rows, int n, int* __restrict__ out) {
    DSV3_PDL();
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * n;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    if ((n & 3) == 0) {
        const float4* x4 = (const float4*)xr;
        for (int q = threadIdx.x; q < n / 4; q += blockDim.x) {
            float4 v = x4[q];
            am_take(v.x, 4 * q, best, bi);
            am_take(v.y, 4 * q + 1, best, bi);
            am_take(v.z, 4 * q + 2, best, bi);
            am_take(v.w, 4 * q + 3, best, bi);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) am_take(xr[j], j, best, bi);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, best, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        am_take(v, i, best, bi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? sv[lane] : -__int_as_float(0x7f800000);
        bi = lane < warps ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float v = __shfl_xor_sync(0xffffffffu, best, o);
            int i = __shfl_xor_sync(0xffffffffu, bi, o);
            am_take(v, i, best, bi);
        }
        if (lane == 0) out[r] = bi == 0x7fffffff ? 0 : bi;
    }
}

// x[r, :] = softmax(x[r, :] / temperature) in place (core/src/ops/softmax.rs; -inf -> 0).
// grid: (rows), block: 256.
extern "C" __global__ void softmax_rows_f32(float* x, int rows, int n, float temperature) {
    DSV3_PDL();
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

// ============================================================================================
// Sampling on the device, bit for bit as core::infer::sampling::Sampler::sample.
//
// sample_rows_f32: grid (rows), block 1024. Row r reads logits x[r, :n] and params
// prm[4r..4r+4] = (temperature, top_k as int bits, top_p, u), where u is the uniform the CPU
// sampler would draw for this token (drawn on the host). Writes out[2r] = token and
// out[2r+1] = status: 0 = done exactly as the CPU; 1 = done, but the normalizer of a top-p over
// the whole vocabulary is the exactly rounded sum instead of the CPU's sorted f32 running sum (see
// below); -1 = NaN in the logits (the CPU returns an error); -2 = not done on the device (the host
// samples the row with the same u): a ±inf maximum, or more than SMP_CAP candidates.
// ebuf [rows, n] is scratch (the row's exp values).
//
// The modes (as the CPU): temperature 0 or top_k 1: argmax (first index on ties). top_k 0 and
// top_p >= 1: e_i = expf(l_i/t - max/t), z = their f32 running sum in index order, the first i
// whose running sum exceeds u*z. Otherwise: candidates = the top_k (all if 0 or >= n) by
// (l/t desc, index asc), sorted; e_i, z = running sum in sorted order, p_i = e_i/z; top_p < 1:
// keep the shortest prefix whose running sum of p_i reaches top_p, z2 = its running sum,
// p_i /= z2; the first kept i whose running sum of p_i exceeds u (else the last kept).
//
// Exactness. expf is libm's (the FreeBSD algorithm of the Rust libm crate, ported with
// non-contracted f32 operations), divisions are IEEE. An f32 running sum is sequential, but inside
// one binade of the running value c (ulp U) each step is c + U*rne(e/U), so a whole stretch of
// steps is an integer sum of per-element roundings, order-free except for exact halves (ties to
// even: the parity of c decides, carried through the block scan as a two-state transducer). The
// block runs windows of 1024 x SMP_PER elements: per-element roundings, a block scan, and the
// first element whose step leaves the binade is done as a real f32 add by its thread. So the
// running sums, and every comparison against them, are the CPU's exactly (seq_run).
// Candidates for top-k / top-p: a histogram of the exp values' top bits (1024 buckets, monotone in
// the logit) picks the smallest set of buckets that must hold them; when that set has at most
// SMP_CAP elements (all of them when n <= SMP_CAP) they are gathered, sorted in shared memory (bitonic, key = order-preserving
// bits of l/t, then the index) and summed exactly. Only top-p without top-k needs the sum over the
// whole sorted vocabulary: the gathered head exactly, the tail as one stretch in the head's binade
// (exact when the tail holds no tie and leaves the binade; else status 1).
// ============================================================================================
#define SMP_T 1024
#define SMP_PER 8
#define SMP_CAP 4096
#define SMP_NB 1024
#define SMP_MAXCK 64
#define SMP_SAT (1u << 25)
#define SMP_TOP (1u << 24)

__device__ __forceinline__ uint32_t smp_sat(uint32_t a) { return a < SMP_SAT ? a : SMP_SAT; }

// scalbnf as the Rust libm crate (generic scalbn for f32): prescale out of range exponents
__device__ __forceinline__ float smp_scalbnf(float x, int n) {
    if (n > 127) {
        x = __fmul_rn(x, __uint_as_float(0x7f000000u));  // 2^127
        n -= 127;
        if (n > 127) {
            x = __fmul_rn(x, __uint_as_float(0x7f000000u));
            n -= 127;
            if (n > 127) n = 127;
        }
    } else if (n < -126) {
        const float mul = __uint_as_float(0x0c800000u);  // 2^-126 * 2^24 = 2^-102
        x = __fmul_rn(x, mul);
        n += 102;
        if (n < -126) {
            x = __fmul_rn(x, mul);
            n += 102;
            if (n < -126) n = -126;
        }
    }
    return __fmul_rn(x, __uint_as_float((uint32_t)(127 + n) << 23));
}

// expf of the Rust libm crate (FreeBSD e_expf.c), every operation rounded on its own
__device__ __forceinline__ float libm_expf(float x) {
    const float LN2_HI = 6.9314575195e-01f, LN2_LO = 1.4286067653e-06f, INV_LN2 = 1.4426950216e+00f;
    const float P1 = 1.6666625440e-1f, P2 = -2.7667332906e-3f;
    uint32_t hx = __float_as_uint(x);
    const int sign = (int)(hx >> 31);
    hx &= 0x7fffffffu;
    if (hx >= 0x42aeac50u) {
        if (hx > 0x7f800000u) return x;
        if (hx >= 0x42b17218u && !sign) return __fmul_rn(x, __uint_as_float(0x7f000000u));
        if (sign && hx >= 0x42cff1b5u) return 0.0f;
    }
    int k;
    float hi, lo;
    if (hx > 0x3eb17218u) {
        if (hx > 0x3f851592u) {
            k = (int)__fadd_rn(__fmul_rn(INV_LN2, x), sign ? -0.5f : 0.5f);
        } else {
            k = 1 - sign - sign;
        }
        const float kf = (float)k;
        hi = __fsub_rn(x, __fmul_rn(kf, LN2_HI));
        lo = __fmul_rn(kf, LN2_LO);
        x = __fsub_rn(hi, lo);
    } else if (hx > 0x39000000u) {
        k = 0;
        hi = x;
        lo = 0.0f;
    } else {
        return __fadd_rn(1.0f, x);
    }
    const float xx = __fmul_rn(x, x);
    const float c = __fsub_rn(x, __fmul_rn(xx, __fadd_rn(P1, __fmul_rn(xx, P2))));
    const float y =
        __fadd_rn(1.0f, __fadd_rn(__fsub_rn(__fdiv_rn(__fmul_rn(x, c), __fsub_rn(2.0f, c)), lo), hi));
    return k == 0 ? y : smp_scalbnf(y, k);
}

// Order-preserving key of x (larger x, larger key; -0 as +0: the CPU's partial_cmp ties them).
__device__ __forceinline__ uint32_t smp_key(float x) {
    uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// Histogram bucket of an exp value in [0, 1]: 8 per binade, 0 for the largest, monotone.
__device__ __forceinline__ int smp_bucket(float e) {
    return min(SMP_NB - 1, (int)((0x3f800000u - __float_as_uint(e)) >> 20));
}

// v (>= 0, finite) in units of U = 2^ku, rounded to nearest; an exact half returns the floor and
// sets `tie` (the running value's parity decides). Saturates at SMP_SAT.
__device__ __forceinline__ uint32_t smp_units(float v, int ku, bool& tie) {
    tie = false;
    const uint32_t b = __float_as_uint(v), E = b >> 23;
    const uint32_t m = E ? ((b & 0x7fffffu) | 0x800000u) : b;
    if (m == 0) return 0;
    const int sh = (E ? (int)E - 150 : -149) - ku;
    if (sh >= 2) return SMP_SAT;
    if (sh >= 0) return m << sh;
    const int d = -sh;
    if (d >= 25) return 0;
    const uint32_t fl = m >> d, rem = m & ((1u << d) - 1u), half = 1u << (d - 1);
    if (rem == half) {
        tie = true;
        return fl;
    }
    return fl + (rem > half ? 1u : 0u);
}
// The step's increment in units when the running value (in units) has parity `par`.
__device__ __forceinline__ uint32_t smp_add(uint32_t r, bool tie, uint32_t par) {
    return tie ? r + ((par + r) & 1u) : r;
}
// (c's binade) ulp exponent and c in units of it (c >= 0 finite).
__device__ __forceinline__ void smp_binade(float c, int& ku, uint32_t& q) {
    const uint32_t b = __float_as_uint(c), E = b >> 23;
    ku = E ? (int)E - 150 : -149;
    q = E ? ((b & 0x7fffffu) | 0x800000u) : b;
}
// Q * 2^ku as f32 (Q < 2^24, and Q >= 2^23 unless ku = -149): exact.
__device__ __forceinline__ float smp_value(int ku, uint32_t Q) {
    return __uint_as_float(((uint32_t)(ku + 149) << 23) + Q);
}
// Composition of two transducers (b before a): increments for each starting parity.
__device__ __forceinline__ void smp_comp(uint32_t b0, uint32_t b1, uint32_t& a0, uint32_t& a1) {
    const uint32_t n0 = smp_sat(b0 + ((b0 & 1u) ? a1 : a0));
    const uint32_t n1 = smp_sat(b1 + ((b1 & 1u) ? a0 : a1));
    a0 = n0;
    a1 = n1;
}

struct SmpSeq {
    int p, found, cand, nck;
    float c;
    uint32_t t0, t1;
    uint32_t w0[32], w1[32];
    int ckp[SMP_MAXCK];
    float ckc[SMP_MAXCK];
};

// The CPU's f32 running sum c_0 = c0, c_{i+1} = c_i + get(i) over i in [p0, n), exactly.
// mode 0: to the end (s.c = the sum); records checkpoints (p, c) at window starts when `record`.
// mode 1: stops at the first i with T < c_{i+1}; mode 2: the first i with c_{i+1} >= T
// (s.found = i, or -1 with s.c the sum). Uniform control flow: every thread calls it.
template <class G>
__device__ void seq_run(SmpSeq& s, G get, int n, int mode, float T, int p0, float c0, bool record) {
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    __syncthreads();
    if (tid == 0) {
        s.p = p0;
        s.c = c0;
        s.found = -1;
        if (record) s.nck = 0;
    }
    __syncthreads();
    for (;;) {
        const int p = s.p;
        const float c = s.c;
        if (p >= n || s.found >= 0) break;
        int ku;
        uint32_t q;
        smp_binade(c, ku, q);
        const int lo = p + tid * SMP_PER, hi = min(lo + SMP_PER, n);
        // pass A: this thread's stretch as a transducer (increment for each starting parity)
        uint32_t a0 = 0, a1 = 0;
        for (int i = lo; i < hi; i++) {
            bool tie;
            const uint32_t r = smp_units(get(i), ku, tie);
            a0 = smp_sat(a0 + smp_add(r, tie, a0 & 1u));
            a1 = smp_sat(a1 + smp_add(r, tie, (1u + a1) & 1u));
        }
        // block exclusive scan of the transducers
        uint32_t i0 = a0, i1 = a1;
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t b0 = __shfl_up_sync(0xffffffffu, i0, o), b1 = __shfl_up_sync(0xffffffffu, i1, o);
            if (lane >= o) smp_comp(b0, b1, i0, i1);
        }
        if (tid == 0) {
            s.cand = 0x7fffffff;
            if (record && s.nck < SMP_MAXCK) {
                s.ckp[s.nck] = p;
                s.ckc[s.nck] = c;
                s.nck++;
            }
        }
        if (lane == 31) {
            s.w0[w] = i0;
            s.w1[w] = i1;
        }
        __syncthreads();
        if (w == 0) {
            uint32_t x0 = s.w0[lane], x1 = s.w1[lane];
            for (int o = 1; o < 32; o <<= 1) {
                const uint32_t b0 = __shfl_up_sync(0xffffffffu, x0, o), b1 = __shfl_up_sync(0xffffffffu, x1, o);
                if (lane >= o) smp_comp(b0, b1, x0, x1);
            }
            const uint32_t e0 = __shfl_up_sync(0xffffffffu, x0, 1), e1 = __shfl_up_sync(0xffffffffu, x1, 1);
            if (lane == 31) {
                s.t0 = x0;
                s.t1 = x1;
            }
            __syncwarp();
            s.w0[lane] = lane ? e0 : 0u;
            s.w1[lane] = lane ? e1 : 0u;
        }
        __syncthreads();
        uint32_t x0 = __shfl_up_sync(0xffffffffu, i0, 1), x1 = __shfl_up_sync(0xffffffffu, i1, 1);
        if (lane == 0) x0 = x1 = 0;
        smp_comp(s.w0[w], s.w1[w], x0, x1);
        const uint32_t P = (q & 1u) ? x1 : x0;
        // pass B: this thread's steps from its actual start; the first event (the step leaves the
        // binade: done as a real add) or hit (the target condition) of the window wins
        uint32_t Qb = 0;
        float vb = 0.0f;
        int code = 0x7fffffff;
        if (q + P < SMP_TOP) {
            uint32_t Q = q + P;
            for (int i = lo; i < hi; i++) {
                const float v = get(i);
                bool tie;
                const uint32_t r = smp_units(v, ku, tie);  // (sets tie: not in the same call)
                const uint32_t add = smp_add(r, tie, Q & 1u);
                if (Q + add >= SMP_TOP) {
                    code = 2 * i + 1;
                    Qb = Q;
                    vb = v;
                    break;
                }
                Q += add;
                if (mode != 0) {
                    const float cv = smp_value(ku, Q);
                    if (mode == 1 ? T < cv : cv >= T) {
                        code = 2 * i;
                        break;
                    }
                }
            }
            if (code != 0x7fffffff) atomicMin(&s.cand, code);
        }
        __syncthreads();
        const int cand = s.cand;
        if (cand == 0x7fffffff) {
            if (tid == 0) {
                s.c = smp_value(ku, q + ((q & 1u) ? s.t1 : s.t0));
                s.p = min(p + SMP_T * SMP_PER, n);
            }
        } else if (cand == code) {
            const int i = code >> 1;

            if (code & 1) {
                const float cn = __fadd_rn(smp_value(ku, Qb), vb);
                s.c = cn;
                s.p = i + 1;
                if (mode != 0 && (mode == 1 ? T < cn : cn >= T)) s.found = i;
            } else {
                s.found = i;
            }
        }
        __syncthreads();
    }
}

// Where a search for T can start: the last recorded checkpoint before the answer.
__device__ __forceinline__ void seq_start(const SmpSeq& s, int mode, float T, int& p0, float& c0) {
    int j = 0;
    for (int k = 1; k < s.nck; k++)
        if (mode == 1 ? s.ckc[k] <= T : s.ckc[k] < T) j = k;
    p0 = s.ckp[j];
    c0 = s.ckc[j];
}

// Block-wide helpers (every thread gets the result).
__device__ __forceinline__ uint32_t smp_or(uint32_t v) {
    __shared__ uint32_t part[32];
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    v = part[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int smp_maxi(int v) {
    __shared__ int part[32];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    v = part[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ uint32_t smp_sumu(uint32_t v) {
    __shared__ uint32_t part[32];
    for (int o = 16; o > 0; o >>= 1) v = smp_sat(v + __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    v = part[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) v = smp_sat(v + __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// (max, first index) over the block
__device__ __forceinline__ void smp_argmax(float& best, int& bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, best, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        am_take(v, i, best, bi);
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        sv[threadIdx.x >> 5] = best;
        si[threadIdx.x >> 5] = bi;
    }
    __syncthreads();
    best = sv[threadIdx.x & 31];
    bi = si[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, best, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        am_take(v, i, best, bi);
    }
}

extern "C" __global__ void __launch_bounds__(SMP_T) sample_rows_f32(const float* __restrict__ x, int rows, int n,
                                                                      const float* __restrict__ prm,
                                                                      float* __restrict__ ebuf, int* __restrict__ out) {
    DSV3_PDL();
    __shared__ SmpSeq s;
    __shared__ unsigned long long cand[SMP_CAP];
    __shared__ uint32_t cnt[SMP_NB];
    __shared__ unsigned long long mass[SMP_NB];
    __shared__ int gcount, beta;
    const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    if (r >= rows) return;
    const float* xr = x + (long long)r * n;
    float* er = ebuf + (long long)r * n;
    const float t = prm[4 * r], top_p = prm[4 * r + 2], u = prm[4 * r + 3];
    const int top_k = __float_as_int(prm[4 * r + 1]);
    // pass 1: NaN, max and its first index
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    uint32_t nan = 0;
    for (int j = tid; j < n; j += SMP_T) {
        const float v = xr[j];
        if (isnan(v)) nan = 1;
        am_take(v, j, best, bi);
    }
    nan = smp_or(nan);
    smp_argmax(best, bi);
    if (nan) {
        if (tid == 0) out[2 * r] = 0, out[2 * r + 1] = -1;
        return;
    }
    if (t == 0.0f || top_k == 1) {
        if (tid == 0) out[2 * r] = bi == 0x7fffffff ? 0 : bi, out[2 * r + 1] = 0;
        return;
    }
    const float M = __fdiv_rn(best, t);
    if (isnan(M) || M == __int_as_float(0x7f800000) || M == -__int_as_float(0x7f800000)) {
        if (tid == 0) out[2 * r] = 0, out[2 * r + 1] = -2;
        return;
    }
    const bool full = top_k == 0 && top_p >= 1.0f;
    const int keff = (top_k > 0 && top_k < n) ? top_k : n;
    const bool by_mass = !full && keff == n && top_p < 1.0f;
    int lg = 0;
    while ((1 << lg) < n) lg++;
    const float mscale = __uint_as_float((uint32_t)(127 + 63 - lg) << 23);  // 2^(63 - ceil(log2 n))
    for (int b = tid; b < SMP_NB; b += SMP_T) cnt[b] = 0, mass[b] = 0;
    __syncthreads();
    // pass 2: the exp values (the CPU's, bit for bit), the last index with mass, the histogram
    int last = -1;
    for (int j = tid; j < n; j += SMP_T) {
        const float e = libm_expf(__fsub_rn(__fdiv_rn(xr[j], t), M));
        er[j] = e;
        if (e > 0.0f) last = j;
        if (!full) {
            const int b = smp_bucket(e);
            atomicAdd(&cnt[b], 1u);
            if (by_mass) atomicAdd(&mass[b], (unsigned long long)(e * mscale));
        }
    }
    last = smp_maxi(last);
    __syncthreads();
    if (full) {
        auto get = [&](int i) { return er[i]; };
        seq_run(s, get, n, 0, 0.0f, 0, 0.0f, true);
        const float T = __fmul_rn(u, s.c);
        int p0;
        float c0;
        seq_start(s, 1, T, p0, c0);
        seq_run(s, get, n, 1, T, p0, c0, false);
        if (tid == 0) out[2 * r] = s.found >= 0 ? s.found : max(last, 0), out[2 * r + 1] = 0;
        return;
    }
    // the buckets that hold every candidate: inclusive scans of counts and masses (one bucket
    // per thread); the need is top_k tokens, or (top-p over everything) the mass p + 1/128 of the
    // total (the CPU's cut lies inside it unless its sums are off by that much: checked below)
    uint32_t c_in = tid < SMP_NB ? cnt[tid] : 0u;
    unsigned long long m_in = tid < SMP_NB ? mass[tid] : 0ull;
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t cb = __shfl_up_sync(0xffffffffu, c_in, o);
        const uint32_t mlo = __shfl_up_sync(0xffffffffu, (uint32_t)m_in, o);
        const uint32_t mhi = __shfl_up_sync(0xffffffffu, (uint32_t)(m_in >> 32), o);
        if (lane >= o) c_in += cb, m_in += ((unsigned long long)mhi << 32) | mlo;
    }
    __shared__ uint32_t wc[32];
    __shared__ unsigned long long wm[32];
    if (lane == 31) wc[w] = c_in, wm[w] = m_in;
    __syncthreads();
    for (int k = 0; k < w; k++) c_in += wc[k], m_in += wm[k];
    unsigned long long mtot = 0;
    for (int k = 0; k < 32; k++) mtot += wm[k];
    if (tid == 0) beta = SMP_NB - 1;
    __syncthreads();
    if (tid < SMP_NB) {
        const uint32_t c_ex = c_in - cnt[tid];
        const unsigned long long m_ex = m_in - mass[tid];
        if (keff < n) {
            if (c_ex < (uint32_t)keff && c_in >= (uint32_t)keff) beta = tid;
        } else if (by_mass && n > SMP_CAP) {
            const double want = (double)mtot * fmin(1.0, (double)top_p + 1.0 / 128.0);
            if ((double)m_ex < want && (double)m_in >= want) beta = tid;
        }
    }
    __syncthreads();
    const int bsel = beta;
    const int G = (int)smp_sumu(tid <= bsel && tid < SMP_NB ? cnt[tid] : 0u);
    if (G > SMP_CAP) {
        if (tid == 0) out[2 * r] = 0, out[2 * r + 1] = -2;
        return;
    }
    // gather the candidates (key of l/t, then the index ascending) and sort them descending
    if (tid == 0) gcount = 0;
    __syncthreads();
    for (int j = tid; j < n; j += SMP_T) {
        if (smp_bucket(er[j]) <= bsel) {
            const int slot = atomicAdd(&gcount, 1);
            cand[slot] = ((unsigned long long)smp_key(__fdiv_rn(xr[j], t)) << 32) | (0xffffffffu - (uint32_t)j);
        }
    }
    int P2 = 2;
    while (P2 < G) P2 <<= 1;
    __syncthreads();
    for (int j = G + tid; j < P2; j += SMP_T) cand[j] = 0;
    __syncthreads();
    for (int size = 2; size <= P2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int k = tid; k < P2 / 2; k += SMP_T) {
                const int a = 2 * k - (k & (stride - 1)), b = a + stride;
                const unsigned long long va = cand[a], vb = cand[b];
                if (((a & size) == 0) ? va < vb : va > vb) cand[a] = vb, cand[b] = va;
            }
            __syncthreads();
        }
    }
    const int K = keff < n ? keff : G;
    auto idx = [&](int i) { return (int)(0xffffffffu - (uint32_t)cand[i]); };
    auto get_e = [&](int i) { return er[idx(i)]; };
    seq_run(s, get_e, K, 0, 0.0f, 0, 0.0f, false);
    float z = s.c;
    int status = 0;
    if (keff == n && G < n) {
        // the tail (every non-gathered token, all after the head in sorted order) in z's binade
        int ku;
        uint32_t q;
        smp_binade(z, ku, q);
        uint32_t R = 0, ties = 0;
        for (int j = tid; j < n; j += SMP_T) {
            const float e = er[j];
            if (smp_bucket(e) > bsel) {
                bool tie;
                R = smp_sat(R + smp_units(e, ku, tie));
                ties |= tie ? 1u : 0u;
            }
        }
        R = smp_sumu(R);
        ties = smp_or(ties);
        if (!ties && q + R < SMP_TOP) {
            z = smp_value(ku, q + R);
        } else {
            unsigned long long mh = 0;
            for (int k = 0; k <= bsel; k++) mh += mass[k];
            z = __fadd_rn(z, (float)((double)(mtot - mh) / (double)mscale));
            status = 1;
        }
    }
    auto get_p = [&](int i) { return __fdiv_rn(get_e(i), z); };
    int keep = K;
    float z2 = 1.0f;
    if (top_p < 1.0f) {
        seq_run(s, get_p, K, 2, top_p, 0, 0.0f, false);
        if (s.found >= 0) {
            keep = s.found + 1;
        } else if (keff == n && G < n) {
            if (tid == 0) out[2 * r] = 0, out[2 * r + 1] = -2;
            return;
        }
        seq_run(s, get_p, keep, 0, 0.0f, 0, 0.0f, false);
        z2 = s.c;
    }
    const bool twice = top_p < 1.0f;
    auto get_f = [&](int i) { return twice ? __fdiv_rn(get_p(i), z2) : get_p(i); };
    seq_run(s, get_f, keep, 1, u, 0, 0.0f, false);
    if (tid == 0) out[2 * r] = idx(s.found >= 0 ? s.found : keep - 1), out[2 * r + 1] = status;
}
