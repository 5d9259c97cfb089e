// RoPE / YaRN (core/src/ops/rope.rs): angle = f32(pos) * inv_freq[i] rounded to f32, cos/sin of it
// in f64 rounded to f32, times the YaRN attention factor. Pairs (x[2i], x[2i+1]) in, the result
// de-interleaved (real parts, then imaginary parts) as HF's rope_interleave path writes it.
// x: [rows, heads] vectors of `2*half` values at x + row*ld_row + head*ld_head + offset.
// grid: (rows, heads), block: half rounded up to a warp (one thread per pair i; every thread
// reads its pair before any writes, as the output overwrites the input in another order);
// half <= 128.
#include "common.cuh"

template <typename T>
__device__ void rope(T* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                     const int* __restrict__ pos, const float* __restrict__ inv_freq, float attn_factor) {
    int r = blockIdx.x, h = blockIdx.y;
    if (r >= rows || h >= heads || half > 128) return;
    rope_head_inplace(x + (long long)r * ld_row + (long long)h * ld_head + offset, half, pos[r], inv_freq, attn_factor);
}

extern "C" __global__ void rope_f32(float* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                                    const int* pos, const float* inv_freq, float attn_factor) {
    DSV3_PDL();
    rope<float>(x, rows, ld_row, heads, ld_head, offset, half, pos, inv_freq, attn_factor);
}
extern "C" __global__ void rope_bf16(bf16* x, int rows, int ld_row, int heads, int ld_head, int offset, int half,
                                     const int* pos, const float* inv_freq, float attn_factor) {
    DSV3_PDL();
    rope<bf16>(x, rows, ld_row, heads, ld_head, offset, half, pos, inv_freq, attn_factor);
}
