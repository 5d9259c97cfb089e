// Training kernels: AdamW on f32 master weights (moments f32 or bf16, DeepSeek-V3's choice) and
// the backward passes of RMSNorm, SwiGLU, RoPE/YaRN, the embedding (scatter-add) and softmax
// cross-entropy, mirroring the CPU oracle (core/src/train/optim.rs, core/src/ops/*.rs).
// AdamW and RoPE use explicitly rounded f32 operations (no FMA contraction) in the CPU's order,
// so they match it bit for bit in f32; the reductions (RMSNorm statistics and dw, the embedding
// gradient's sums per id, log-sum-exp) sum in another order and match to rounding. No kernel here
// uses floating-point atomics: the results are the same bits from run to run.
#include "common.cuh"

// ---- AdamW (core::train::optim::AdamW::step_scaled, per element):
//   g = g*gscale (the clip factor, 1 without clipping; g itself is not written)
//   m = rnd(b1*m + (1-b1)*g); v = rnd(b2*v + (1-b2)*g*g)   (rnd: bf16 rounding with bf16 moments)
//   p = p*decay - lr*(m/bc1) / (sqrt(v/bc2) + eps); wcopy (optional) = bf16(p), the working copy
// bc1 = 1 - b1^t, bc2 = 1 - b2^t and decay = 1 - lr*wd (or 1) come from the host, as core computes
// them. grid: (ceil(n / 256)), block: 256.
// dmask (optional): one byte per 64 elements, 0 where the tensor there is not decayed (its
// decay is 1): the whole parameter arena in one launch (tensors start at multiples of 64).
template <typename TM>
__device__ void adamw(float* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, TM* __restrict__ v,
                      long long n, float lr, float b1, float b2, float eps, float decay, float bc1, float bc2,
                      const unsigned char* __restrict__ dmask, float gscale, bf16* __restrict__ wcopy) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (dmask && !dmask[i >> 6]) decay = 1.0f;
    float gi = __fmul_rn(g[i], gscale);
    TM mq = from_f32<TM>(__fadd_rn(__fmul_rn(b1, to_f32(m[i])), __fmul_rn(__fsub_rn(1.0f, b1), gi)));
    TM vq = from_f32<TM>(__fadd_rn(__fmul_rn(b2, to_f32(v[i])), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, b2), gi), gi)));
    m[i] = mq;
    v[i] = vq;
    float mi = to_f32(mq), vi = to_f32(vq);
    float mh = __fdiv_rn(mi, bc1), vh = __fdiv_rn(vi, bc2);
    float upd = __fdiv_rn(__fmul_rn(lr, mh), __fadd_rn(__fsqrt_rn(vh), eps));
    float pn = __fsub_rn(__fmul_rn(p[i], decay), upd);
    p[i] = pn;
    if (wcopy) wcopy[i] = __float2bfloat16_rn(pn);
}
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, long long n, float lr, float b1,
                                     float b2, float eps, float decay, float bc1, float bc2, const unsigned char* dmask,
                                     float gscale, bf16* wcopy) {
    DSV3_PDL();
    adamw<float>(p, g, m, v, n, lr, b1, b2, eps, decay, bc1, bc2, dmask, gscale, wcopy);
}
extern "C" __global__ void adamw_bf16m(float* p, const float* g, bf16* m, bf16* v, long long n, float lr, float b1,
                                       float b2, float eps, float decay, float bc1, float bc2,
                                       const unsigned char* dmask, float gscale, bf16* wcopy) {
    DSV3_PDL();
    adamw<bf16>(p, g, m, v, n, lr, b1, b2, eps, decay, bc1, bc2, dmask, gscale, wcopy);
}

// ---- RMSNorm backward (core::ops::norm::rmsnorm_backward): r = (mean(x²)+eps)^-½,
// dx = r·w·dy − x·r³/d·Σ(w·dy·x), dw += Σ_rows dy·x·r (f32). Deterministic and without atomics:
// block b takes rows [b·per, b·per + per) in order and writes its columns' sums to part[b, :]
// (each thread owns columns j, j + blockDim.x, ...: no two threads touch one partial), then
// rmsnorm_dw_reduce adds the blocks' partials to dw in block order. grid: (ceil(rows / per)),
// block: 256; part [gridDim.x, d].
template <typename T>
__device__ void rmsnorm_bwd(const T* x, int ldx, const float* __restrict__ w, const T* dy, int lddy, T* dx, int lddx,
                            float* __restrict__ part, int d, float eps, int rows, int per) {
    const int r0 = blockIdx.x * per, r1 = min(rows, r0 + per);
    float* pb = part + (long long)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) pb[j] = 0.0f;
    for (int r = r0; r < r1; r++) {  // uniform over the block (block_sum syncs)
        const T* xr = x + (long long)r * ldx;
        const T* dyr = dy + (long long)r * lddy;
        T* dxr = dx + (long long)r * lddx;
        float ss = 0.0f, dot = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float xv = to_f32(xr[j]), dv = to_f32(dyr[j]);
            ss += xv * xv;
            dot += w[j] * dv * xv;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        float c = inv * inv * inv * dot / (float)d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float xv = to_f32(xr[j]), dv = to_f32(dyr[j]);
            pb[j] += dv * xv * inv;
            dxr[j] = from_f32<T>(inv * w[j] * dv - c * xv);
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_f32(const float* x, int ldx, const float* w,
    const float* dy, int lddy, float* dx, int lddx, float* part, int d, float eps, int rows, int per) {
    DSV3_PDL();
    rmsnorm_bwd<float>(x, ldx, w, dy, lddy, dx, lddx, part, d, eps, rows, per);
}
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_bf16(const bf16* x, int ldx, const float* w,
    const bf16* dy, int lddy, bf16* dx, int lddx, float* part, int d, float eps, int rows, int per) {
    DSV3_PDL();
    rmsnorm_bwd<bf16>(x, ldx, w, dy, lddy, dx, lddx, part, d, eps, rows, per);
}
// dw[j] += Σ_b part[b, j] (b = 0, 1, ... in order). grid: (ceil(d / 256)), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_dw_reduce(const float* __restrict__ part, int blocks, int d, float* __restrict__ dw) {
    DSV3_PDL();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; b++) s += part[(long long)b * d + j];
    dw[j] += s;
}

// ---- SwiGLU backward over a fused gate|up row (the forward's layout, elementwise.cu):
// s = σ(g); dgu[r, i] = da·u·s·(1 + g·(1 − s)); dgu[r, inter + i] = da·g·s
// (core::ops::swiglu::swiglu_backward). grid: (ceil(inter / 256), min(rows, 65535)), block: 256;
// rows grid-stride over y.
template <typename T>
__device__ void swiglu_bwd(const T* gu, int ld, const T* da, int ldda, T* dgu, int lddgu, int inter, int rows) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= inter) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float g = to_f32(gu[(long long)r * ld + i]), u = to_f32(gu[(long long)r * ld + inter + i]);
        float a = to_f32(da[(long long)r * ldda + i]);
        float s = dsv3_sigmoid(g);
        dgu[(long long)r * lddgu + i] =
            from_f32<T>(__fmul_rn(__fmul_rn(__fmul_rn(a, u), s), __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)))));
        dgu[(long long)r * lddgu + inter + i] = from_f32<T>(__fmul_rn(__fmul_rn(a, g), s));
    }
}
extern "C" __global__ void swiglu_bwd_f32(const float* gu, int ld, const float* da, int ldda, float* dgu, int lddgu,
                                          int inter, int rows) {
    DSV3_PDL();
    swiglu_bwd<float>(gu, ld, da, ldda, dgu, lddgu, inter, rows);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gu, int ld, const bf16* da, int ldda, bf16* dgu, int lddgu,
                                           int inter, int rows) {
    DSV3_PDL();
    swiglu_bwd<bf16>(gu, ld, da, ldda, dgu, lddgu, inter, rows);
}

// ---- RoPE backward (core::ops::rope::Rope::apply_backward), in place over rope.cu's layout: the
// gradient arrives de-interleaved (d[i] real, d[half + i] imaginary) and leaves interleaved:
// dx[2i] = dre·c + dim·s, dx[2i+1] = dim·c − dre·s. grid: (rows, ceil(heads / 64)), block: 64.
template <typename T>
__device__ void rope_bwd(T* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                         const int* __restrict__ pos, const float* __restrict__ inv_freq, float attn_factor) {
    int r = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || h >= heads || half > 128) return;
    T* v = x + (long long)r * ld_row + (long long)h * ld_head + offset;
    float buf[256];
    for (int j = 0; j < 2 * half; j++) buf[j] = to_f32(v[j]);
    float p = (float)pos[r];
    for (int i = 0; i < half; i++) {
        float a = __fmul_rn(p, inv_freq[i]);
        float c = __fmul_rn((float)cos((double)a), attn_factor);
        float s = __fmul_rn((float)sin((double)a), attn_factor);
        float dre = buf[i], dim = buf[half + i];
        v[2 * i] = from_f32<T>(__fadd_rn(__fmul_rn(dre, c), __fmul_rn(dim, s)));
        v[2 * i + 1] = from_f32<T>(__fsub_rn(__fmul_rn(dim, c), __fmul_rn(dre, s)));
    }
}
extern "C" __global__ void rope_bwd_f32(float* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                                        const int* pos, const float* inv_freq, float attn_factor) {
    DSV3_PDL();
    rope_bwd<float>(x, rows, ld_row, heads, ld_head, offset, half, pos, inv_freq, attn_factor);
}
extern "C" __global__ void rope_bwd_bf16(bf16* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                                         const int* pos, const float* inv_freq, float attn_factor) {
    DSV3_PDL();
    rope_bwd<bf16>(x, rows, ld_row, heads, ld_head, offset, half, pos, inv_freq, attn_factor);
}

// ---- Embedding backward: dtable[id, :] += Σ_{t: ids[t] = id} dy[t, :], deterministic and
// without atomics: the host groups the tokens by id (EmbedRows: rows = [order [m], start [S + 1],
// id [S]]: segment s lists its tokens order[start[s] .. start[s + 1]) in token order, all with
// id[s], distinct ids), each thread sums one column of a segment's rows in four interleaved f32
// partials (combined in a fixed order) and adds it to the table once.
// grid: (ceil(d / 256), min(S, 65535)), block: 256; segments grid-stride over y.
template <typename T>
__device__ void embed_bwd(const int* __restrict__ rows, int m, int segs, const T* dy, int lddy, float* dtable, int d) {
    const int* order = rows;
    const int* start = rows + m;
    const int* id = start + segs + 1;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    for (int s = blockIdx.y; s < segs; s += gridDim.y) {
        const int i0 = start[s], i1 = start[s + 1];
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int i = i0;
        for (; i + 4 <= i1; i += 4) {
#pragma unroll
            for (int u = 0; u < 4; u++) a[u] += to_f32(dy[(long long)order[i + u] * lddy + j]);
        }
        for (int u = 0; i < i1; i++, u++) a[u] += to_f32(dy[(long long)order[i] * lddy + j]);
        dtable[(long long)id[s] * d + j] += (a[0] + a[1]) + (a[2] + a[3]);
    }
}
extern "C" __global__ void __launch_bounds__(256) embed_bwd_f32(const int* rows, int m, int segs, const float* dy,
                                                                int lddy, float* dtable, int d) {
    DSV3_PDL();
    embed_bwd<float>(rows, m, segs, dy, lddy, dtable, d);
}
extern "C" __global__ void __launch_bounds__(256) embed_bwd_bf16(const int* rows, int m, int segs, const bf16* dy,
                                                                 int lddy, float* dtable, int d) {
    DSV3_PDL();
    embed_bwd<bf16>(rows, m, segs, dy, lddy, dtable, d);
}

// ---- Softmax cross-entropy, forward and backward together (core::ops::loss::cross_entropy): per
// row with weight wgt = mask ? mask[r] : 1 and lse = max + log(Σ exp(z − max)):
// row_loss[r] = wgt·(lse − z[target]); dz = exp(z − lse)·wgt/denom, dz[target] −= wgt/denom; rows
// with wgt == 0 (or denom == 0) get dz = 0 and loss 0. The host sums row_loss / denom. dz may be
// narrower than z (f32 logits, bf16 gradient: the f32 gradient rounded once, as a cast would).
// CACHE: the row is kept in shared memory (in T: vocab·sizeof(T) bytes of dynamic shared memory,
// where the GPU allows that much), so the logits (a training step's largest tensor, [tokens,
// vocab]) are read from global memory once instead of three times.
// grid: (rows), block: any (256 without the cache, 1024 with it; the sums' tree follows it).
template <typename T, typename G, bool CACHE>
__device__ void cross_entropy(const T* z, int ldz, const int* __restrict__ targets, const float* __restrict__ mask,
                              float denom, G* dz, int lddz, float* __restrict__ row_loss, int vocab, int rows) {
    DSV3_DYNAMIC_SMEM(zs_raw);
    T* zs = reinterpret_cast<T*>(zs_raw);
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* zr = z + (long long)r * ldz;
    G* dr = dz + (long long)r * lddz;
    float wgt = mask ? mask[r] : 1.0f;
    if (wgt == 0.0f || denom == 0.0f) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = from_f32<G>(0.0f);
        if (threadIdx.x == 0) row_loss[r] = 0.0f;
        return;
    }
    auto at = [&](int j) { return to_f32(CACHE ? zs[j] : zr[j]); };
    float m = -__int_as_float(0x7f800000);
    int j0 = 0;
    if constexpr (CACHE) {
        // 16-byte loads (4 f32 or 8 bf16) where the row is 16-byte aligned (uniform over the block)
        constexpr int PER = 16 / sizeof(T);
        if (((unsigned long long)zr & 15) == 0) {
            j0 = vocab / PER * PER;
            const uint4* z16 = reinterpret_cast<const uint4*>(zr);
            uint4* s16 = reinterpret_cast<uint4*>(zs);
#pragma unroll 4
            for (int q = threadIdx.x; q < j0 / PER; q += blockDim.x) {
                uint4 v = z16[q];
                s16[q] = v;
                const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
                for (int u = 0; u < PER; u++) m = fmaxf(m, to_f32(e[u]));
            }
        }
    }
    for (int j = j0 + threadIdx.x; j < vocab; j += blockDim.x) {
        T v = zr[j];
        if (CACHE) zs[j] = v;
        m = fmaxf(m, to_f32(v));
    }
    m = block_max(m);  // its barriers also publish zs
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += dsv3_exp(at(j) - m);
    s = block_sum(s);
    float lse = m + logf(s);
    int t = targets[r];
    float scale = __fdiv_rn(wgt, denom);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float g = __fdiv_rn(__fmul_rn(dsv3_exp(__fsub_rn(at(j), lse)), wgt), denom);
        if (j == t) g = __fsub_rn(g, scale);
        dr[j] = from_f32<G>(g);
    }
    if (threadIdx.x == 0) row_loss[r] = (t >= 0 && t < vocab) ? wgt * (lse - at(t)) : __int_as_float(0x7fc00000);
}
#define DSV3_CE(name, T, G, CACHE)                                                                                 \
    extern "C" __global__ void name(const T* z, int ldz, const int* targets, const float* mask, float denom, G* dz, \
                                    int lddz, float* row_loss, int vocab, int rows) {                            \
        DSV3_PDL();                                                                                              \
        cross_entropy<T, G, CACHE>(z, ldz, targets, mask, denom, dz, lddz, row_loss, vocab, rows);               \
    }
DSV3_CE(cross_entropy_f32, float, float, false)
DSV3_CE(cross_entropy_bf16, bf16, bf16, false)
DSV3_CE(cross_entropy_f32_bf16, float, bf16, false)
DSV3_CE(cross_entropy_smem_f32, float, float, true)
DSV3_CE(cross_entropy_smem_bf16, bf16, bf16, true)
DSV3_CE(cross_entropy_smem_f32_bf16, float, bf16, true)
#undef DSV3_CE

// ---- Attention probabilities for training (core::model::mla::Mla::forward_train): scores
// S [mats, T, T] (row stride ld, matrix stride mstride; mats = batch·heads), causal: query row i
// sees keys t <= i. In place: P[i, t] = softmax_t(scale·S[i, t]) for t <= i, 0 above the
// diagonal (core's softmax_inplace with −inf there). grid: (T, min(mats, 65535)), block: 128;
// matrices grid-stride over y (the loop is uniform over the block: its barriers stay uniform).
extern "C" __global__ void attn_softmax_causal_f32(float* s, int t_len, int ld, long long mstride, int mats,
                                                   float scale) {
    DSV3_PDL();
    const int i = blockIdx.x;
    for (int mat = blockIdx.y; mat < mats; mat += gridDim.y) {
        float* row = s + (long long)mat * mstride + (long long)i * ld;
        float m = -__int_as_float(0x7f800000);
        for (int t = threadIdx.x; t <= i; t += blockDim.x) m = fmaxf(m, row[t] * scale);
        m = block_max(m);
        float z = 0.0f;
        for (int t = threadIdx.x; t <= i; t += blockDim.x) z += dsv3_exp(row[t] * scale - m);
        z = block_sum(z);
        const float inv = 1.0f / z;
        for (int t = threadIdx.x; t < t_len; t += blockDim.x) row[t] = t <= i ? dsv3_exp(row[t] * scale - m) * inv : 0.0f;
    }
}

// ---- Its backward (softmax_backward_inplace, then × scale): with P from the forward and the
// probabilities' gradient dP, in place over dP: dS[i, t] = scale·P[i, t]·(dP[i, t] − Σ_u P[i, u]·dP[i, u])
// (0 above the diagonal, where P is 0). Same layout and grid as the forward.
extern "C" __global__ void attn_softmax_bwd_f32(const float* p, float* dp, int t_len, int ld, long long mstride,
                                                int mats, float scale) {
    DSV3_PDL();
    const int i = blockIdx.x;
    for (int mat = blockIdx.y; mat < mats; mat += gridDim.y) {
        const long long off = (long long)mat * mstride + (long long)i * ld;
        const float* pr = p + off;
        float* dr = dp + off;
        float dot = 0.0f;
        for (int t = threadIdx.x; t <= i; t += blockDim.x) dot += pr[t] * dr[t];
        dot = block_sum(dot);
        for (int t = threadIdx.x; t < t_len; t += blockDim.x) dr[t] = t <= i ? pr[t] * (dr[t] - dot) * scale : 0.0f;
    }
}
