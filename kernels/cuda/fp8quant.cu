// FP8 E4M3 quantization for DeepSeek's FP8 training recipe, bit for bit as core/src/fp8/quant.rs
// (quantize_values / quantize_unchecked): scale = max(amax, 1e-4) / 448 (pow2: rounded up to a
// power of two), code = e4m3(x / scale) (IEEE division, RNE, saturating). Inputs f32 or bf16.
// - quant_1x128_*: per token, one scale per row per 128 columns (activations, activation grads).
// - quant_block128_*: one scale per 128x128 block (weights), optionally also writing the
//   transposed codes and scales (the Dgrad operand Wᵀ; a block's scale is unchanged by transpose).
// - quant_t128_*: 128x1 tiles along the rows (tokens) written transposed: X [rows, cols] becomes
//   codes [cols, rows] with 1x128 scales along the new K (= tokens): the Wgrad operands.
// - quant_t128_groups_*: quant_t128 of every expert's rows in one launch (the MoE experts' Wgrad
//   operands), each expert's tokens in its own 128-aligned segment of one transposed output.
#include "common.cuh"
#include "fp8.cuh"

// grid: (ceil(cols / 128), min(rows, 65535)), block: 128, rows grid-stride over y. x[r * ldx + c]; q[r * ldq + c];
// scale[r * s_rs + b * s_cs] (s_rs = ceil(cols/128), s_cs = 1 is the CPU's layout; s_rs = 1,
// s_cs = rows is DeepGEMM's M-contiguous layout).
template <typename T>
__device__ void quant_1x128(const T* __restrict__ x, long long ldx, uint8_t* __restrict__ q, long long ldq,
                            float* __restrict__ scale, long long s_rs, long long s_cs, int rows, int cols, int pow2) {
    const int c = blockIdx.x * 128 + threadIdx.x;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {  // uniform over the block (block_max syncs)
        float v = (c < cols) ? to_f32(x[(long long)r * ldx + c]) : 0.0f;
        float s = fp8_scale(block_max(fabsf(v)), pow2);
        if (c < cols) q[(long long)r * ldq + c] = encode_e4m3(__fdiv_rn(v, s));
        if (threadIdx.x == 0) scale[(long long)r * s_rs + (long long)blockIdx.x * s_cs] = s;
    }
}
// The 1x128 kernels' entry points: NAME_f32 / NAME_bf16 running BODY<T> with THREADS threads.
#define QUANT_1X128(NAME, BODY, THREADS)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME##_f32(const float* x, long long ldx, uint8_t* q, \
        long long ldq, float* scale, long long s_rs, long long s_cs, int rows, int cols, int pow2) {      \
        DSV3_PDL();                                                                                       \
        BODY<float>(x, ldx, q, ldq, scale, s_rs, s_cs, rows, cols, pow2);                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME##_bf16(const bf16* x, long long ldx, uint8_t* q, \
        long long ldq, float* scale, long long s_rs, long long s_cs, int rows, int cols, int pow2) {      \
        DSV3_PDL();                                                                                       \
        BODY<bf16>(x, ldx, q, ldq, scale, s_rs, s_cs, rows, cols, pow2);                                  \
    }
QUANT_1X128(quant_1x128, quant_1x128, 128)

// quant_1x128 with a warp per 128-column group (quant_1x128w_*, what the launcher runs;
// DSV3_FP8_QUANT=v1 keeps quant_1x128_*, the form measured on the H100 at 21% of the copy
// bandwidth: a 128-thread block per group, one element per thread, two barriers per row). Lane l
// holds the group's columns 4l .. 4l+3: one 8-byte load (bf16) or two (f32) where x's and q's rows
// are 4-element aligned (`vec`, uniform over the launch), else element by element; the group's
// amax by warp shuffles (no barriers), its 4 codes stored as one 32-bit word. Bit for bit
// quant_1x128: the same values enter the max (zeros for columns past cols; fmaxf ignores NaN in
// any order, and the 1e-4 floor covers the all-NaN group either way), the same scale and encoding.
// grid: (blocks, 1, 1), block: 256 = 8 warps; the G = rows * ceil(cols / 128) groups walked
// grid-stride (group g: row g / ceil(cols / 128), column block g % ceil(cols / 128)).
__device__ __forceinline__ void q_load4(const float* p, int valid, bool vec, float (&v)[4]) {
    if (vec && valid == 4) {
        const float2 a = reinterpret_cast<const float2*>(p)[0], b = reinterpret_cast<const float2*>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = j < valid ? p[j] : 0.0f;
    }
}
__device__ __forceinline__ void q_load4(const bf16* p, int valid, bool vec, float (&v)[4]) {
    if (vec && valid == 4) {
        const unsigned long long w = *reinterpret_cast<const unsigned long long*>(p);
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = __uint_as_float((uint32_t)((w >> (16 * j)) & 0xffffu) << 16);
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = j < valid ? __bfloat162float(p[j]) : 0.0f;
    }
}
template <typename T>
__device__ void quant_1x128w(const T* __restrict__ x, long long ldx, uint8_t* __restrict__ q, long long ldq,
                             float* __restrict__ scale, long long s_rs, long long s_cs, int rows, int cols, int pow2) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const int cb = (cols + 127) >> 7;
    const long long groups = (long long)rows * cb;
    const bool vec = ldx % 4 == 0 && ldq % 4 == 0 && (uintptr_t)x % (4 * sizeof(T)) == 0 && (uintptr_t)q % 4 == 0;
    for (long long gi = (long long)blockIdx.x * wpb + (threadIdx.x >> 5); gi < groups; gi += (long long)gridDim.x * wpb) {
        const int r = (int)(gi / cb), b = (int)(gi % cb);
        const int c = b * 128 + lane * 4, valid = max(0, min(4, cols - c));
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (valid > 0) q_load4(x + (long long)r * ldx + c, valid, vec, v);
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) a = fmaxf(a, fabsf(v[j]));
        const float s = fp8_scale(warp_max(a), pow2);
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) word |= (uint32_t)encode_e4m3(__fdiv_rn(v[j], s)) << (8 * j);
        uint8_t* qp = q + (long long)r * ldq + c;
        if (vec && valid == 4) {
            *reinterpret_cast<uint32_t*>(qp) = word;
        } else {
            for (int j = 0; j < valid; j++) qp[j] = (uint8_t)(word >> (8 * j));
        }
        if (lane == 0) scale[(long long)r * s_rs + (long long)b * s_cs] = s;
    }
}
QUANT_1X128(quant_1x128w, quant_1x128w, 256)

// grid: (ceil(cols / 128), ceil(rows / 128), batch), block: 256. x [rows, cols] (stride ldx) -> q [rows, cols]
// (stride cols), scale [ceil(rows/128), ceil(cols/128)]; when qt != 0 also qt [cols, rows] (stride
// rows) and scale_t [ceil(cols/128), ceil(rows/128)]. Batched over blockIdx.z (the experts of a
// grouped weight in one launch): matrix z reads x + z * bx and writes its outputs packed one after
// the other (codes at z * rows * cols, scales at z * ceil(rows/128) * ceil(cols/128)).
template <typename T>
__device__ void quant_block128(const T* __restrict__ x, long long ldx, uint8_t* __restrict__ q, float* __restrict__ scale,
                               uint8_t* __restrict__ qt, float* __restrict__ scale_t, int rows, int cols, int pow2,
                               long long bx) {
    int r0 = blockIdx.y * 128, c0 = blockIdx.x * 128;
    int cb = (cols + 127) / 128, rb = (rows + 127) / 128;
    {
        const long long z = blockIdx.z, nc = (long long)rows * cols, ns = (long long)rb * cb;
        x += z * bx;
        q += z * nc;
        scale += z * ns;
        if (qt) {
            qt += z * nc;
            scale_t += z * ns;
        }
    }
    float m = 0.0f;
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {
        int r = r0 + (i >> 7), c = c0 + (i & 127);
        if (r < rows && c < cols) m = fmaxf(m, fabsf(to_f32(x[(long long)r * ldx + c])));
    }
    float s = fp8_scale(block_max(m), pow2);
    if (threadIdx.x == 0) {
        scale[(long long)blockIdx.y * cb + blockIdx.x] = s;
        if (qt) scale_t[(long long)blockIdx.x * rb + blockIdx.y] = s;
    }
    __shared__ uint8_t tile[128][129];
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {
        int rr = i >> 7, cc = i & 127, r = r0 + rr, c = c0 + cc;
        if (r < rows && c < cols) {
            uint8_t code = encode_e4m3(__fdiv_rn(to_f32(x[(long long)r * ldx + c]), s));
            q[(long long)r * cols + c] = code;
            tile[cc][rr] = code;
        }
    }
    if (!qt) return;
    __syncthreads();
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {
        int cc = i >> 7, rr = i & 127, r = r0 + rr, c = c0 + cc;
        if (r < rows && c < cols) qt[(long long)c * rows + r] = tile[cc][rr];
    }
}
extern "C" __global__ void __launch_bounds__(256) quant_block128_f32(const float* x, long long ldx, uint8_t* q,
    float* scale, uint8_t* qt, float* scale_t, int rows, int cols, int pow2, long long bx) {
    DSV3_PDL();
    quant_block128<float>(x, ldx, q, scale, qt, scale_t, rows, cols, pow2, bx);
}
extern "C" __global__ void __launch_bounds__(256) quant_block128_bf16(const bf16* x, long long ldx, uint8_t* q,
    float* scale, uint8_t* qt, float* scale_t, int rows, int cols, int pow2, long long bx) {
    DSV3_PDL();
    quant_block128<bf16>(x, ldx, q, scale, qt, scale_t, rows, cols, pow2, bx);
}

// grid: (ceil(cols / 32), min(ceil(rows / 128), 65535)), block: 256 (32 columns x 8 row lanes),
// 128-row blocks grid-stride over y. x [rows, cols]
// (stride ldx); per column c and 128-row block b: scale s = fp8_scale(amax of x[128b.., c]);
// qt[c * ldq + r] = e4m3(x[r, c] / s) (ldq >= rows), scale_t[c * s_rs + b * s_cs] = s (s_rs =
// ceil(rows/128), s_cs = 1 is QValues::transposed()'s layout of the CPU's 128x1 scales).
// One block of 128 tokens along x's rows for columns [c0, c0 + 32) (all 256 threads call it):
// rows [r0, r0 + n) of x (n <= 128; the rest reads as 0), each column's scale at
// scale_t[c * s_rs + b * s_cs], its codes at qt[c * ldq + q0 + rr] for rr < n and zero codes for
// n <= rr < wn (a caller's padding).
template <typename T>
__device__ __forceinline__ void quant_t128_block(const T* __restrict__ x, long long ldx, int r0, int n,
                                                 uint8_t* __restrict__ qt, long long ldq, long long q0, int wn,
                                                 float* __restrict__ scale_t, long long s_rs, long long s_cs, int b,
                                                 int c0, int cols, int pow2) {
    __shared__ float tile[128][33];
    __shared__ float part[8][32];
    __shared__ float sc[32];
    const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
    float m = 0.0f;
    for (int rr = ly; rr < 128; rr += 8) {
        const int c = c0 + lx;
        const float v = (rr < n && c < cols) ? to_f32(x[(long long)(r0 + rr) * ldx + c]) : 0.0f;
        tile[rr][lx] = v;
        m = fmaxf(m, fabsf(v));
    }
    part[ly][lx] = m;
    __syncthreads();
    if (ly == 0) {
        for (int j = 1; j < 8; j++) m = fmaxf(m, part[j][lx]);
        float s = fp8_scale(m, pow2);
        sc[lx] = s;
        if (c0 + lx < cols) scale_t[(long long)(c0 + lx) * s_rs + (long long)b * s_cs] = s;
    }
    __syncthreads();
    // write: each warp covers one column's 128 tokens as 32 lanes x 4 consecutive tokens, as one
    // 32-bit store where the output rows and q0 are 4-byte aligned (`vec`, uniform) and all 4 lie
    // before wn, else byte by byte (the same bytes either way)
    const bool vec = ldq % 4 == 0 && q0 % 4 == 0 && (uintptr_t)qt % 4 == 0;
    for (int cc = ly; cc < 32; cc += 8) {
        const int c = c0 + cc;
        if (c >= cols) continue;
        uint8_t* dst = qt + (long long)c * ldq + q0 + lx * 4;
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int rr = lx * 4 + j;
            if (rr < n) word |= (uint32_t)encode_e4m3(__fdiv_rn(tile[rr][cc], sc[cc])) << (8 * j);
        }
        if (vec && lx * 4 + 4 <= wn) {
            *reinterpret_cast<uint32_t*>(dst) = word;
        } else {
            for (int j = 0; j < 4 && lx * 4 + j < wn; j++) dst[j] = (uint8_t)(word >> (8 * j));
        }
    }
    __syncthreads();  // tile, part and sc are refilled by the next block
}

template <typename T>
__device__ void quant_t128(const T* __restrict__ x, long long ldx, uint8_t* __restrict__ qt, long long ldq,
                           float* __restrict__ scale_t, long long s_rs, long long s_cs, int rows, int cols, int pow2) {
    const int c0 = blockIdx.x * 32, rblocks = (rows + 127) / 128;
    for (int b = blockIdx.y; b < rblocks; b += gridDim.y) {  // uniform over the block
        const int r0 = b * 128, n = min(128, rows - r0);
        quant_t128_block(x, ldx, r0, n, qt, ldq, r0, n, scale_t, s_rs, s_cs, b, c0, cols, pow2);
    }
}
extern "C" __global__ void __launch_bounds__(256) quant_t128_f32(const float* x, long long ldx, uint8_t* qt,
    long long ldq, float* scale_t, long long s_rs, long long s_cs, int rows, int cols, int pow2) {
    DSV3_PDL();
    quant_t128<float>(x, ldx, qt, ldq, scale_t, s_rs, s_cs, rows, cols, pow2);
}
extern "C" __global__ void __launch_bounds__(256) quant_t128_bf16(const bf16* x, long long ldx, uint8_t* qt,
    long long ldq, float* scale_t, long long s_rs, long long s_cs, int rows, int cols, int pow2) {
    DSV3_PDL();
    quant_t128<bf16>(x, ldx, qt, ldq, scale_t, s_rs, s_cs, rows, cols, pow2);
}

// quant_t128 of G groups (MoE experts) in one launch. offs = [ro[0..G], seg[0..G]] (2G + 2 ints):
// group e's rows [ro[e], ro[e+1]) of x (stride ldx), its tokens written transposed at columns
// [seg[e], seg[e] + n_e) of qt (n_e = ro[e+1] - ro[e]; seg[e] a multiple of 128, seg[e+1] >=
// seg[e] + n_e, the host's t128_segments: n_e rounded up to 128), zero codes in the segment's
// padding up to seg[e+1]. Token block b (columns [128b, 128b + 128)) belongs to the group with
// seg[e] <= 128b < seg[e+1]; its scale of column c at scale_t[c * s_rs + b * s_cs]. So the
// segment of group e, read from column seg[e] (scales from block seg[e]/128), holds exactly
// quant_t128's output of the group's rows alone. grid: (ceil(cols / 32), min(nb, 65535)), block:
// 256, nb = seg[G] / 128 token blocks grid-stride over y. ldq >= seg[G].
template <typename T>
__device__ void quant_t128_groups(const T* __restrict__ x, long long ldx, uint8_t* __restrict__ qt, long long ldq,
                                  float* __restrict__ scale_t, long long s_rs, long long s_cs,
                                  const int* __restrict__ offs, int groups, int cols, int pow2) {
    const int* ro = offs;
    const int* seg = offs + groups + 1;
    const int c0 = blockIdx.x * 32, nb = seg[groups] / 128;
    for (int b = blockIdx.y; b < nb; b += gridDim.y) {  // uniform over the block
        // the last group starting at or before token column 128b: a non-empty one (an empty group
        // shares its start with the next)
        const int p = b * 128;
        int lo = 0, hi = groups - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (seg[mid] <= p) lo = mid;
            else hi = mid - 1;
        }
        const int r0 = ro[lo] + (p - seg[lo]);      // the block's first row of x
        const int n = min(128, ro[lo + 1] - r0);    // its rows (the rest is the segment's padding)
        quant_t128_block(x, ldx, r0, n, qt, ldq, p, 128, scale_t, s_rs, s_cs, b, c0, cols, pow2);
    }
}
extern "C" __global__ void __launch_bounds__(256) quant_t128_groups_f32(const float* x, long long ldx, uint8_t* qt,
    long long ldq, float* scale_t, long long s_rs, long long s_cs, const int* offs, int groups, int cols, int pow2) {
    DSV3_PDL();
    quant_t128_groups<float>(x, ldx, qt, ldq, scale_t, s_rs, s_cs, offs, groups, cols, pow2);
}
extern "C" __global__ void __launch_bounds__(256) quant_t128_groups_bf16(const bf16* x, long long ldx, uint8_t* qt,
    long long ldq, float* scale_t, long long s_rs, long long s_cs, const int* offs, int groups, int cols, int pow2) {
    DSV3_PDL();
    quant_t128_groups<bf16>(x, ldx, qt, ldq, scale_t, s_rs, s_cs, offs, groups, cols, pow2);
}
