// Host stand-in for <mma.h> (WMMA) in the CPU emulations (include emu.h first): the 16x16x16
// bf16 -> f32 fragments kernels/cuda/gemm.cu's tiled FP8-weight kernel (gemm_tc) uses.
//
// The hardware's fragment layout is opaque, so any fixed one is faithful as long as kernels only
// touch fragment elements elementwise (which CUDA requires of them): here lane l holds the
// flat elements 8l .. 8l + 7 of the 16x16 tile (A: [row][k], B: [k][col], accumulator:
// [row][col]). load/store/mma are warp collectives (every lane must arrive, __syncwarp); mma_sync
// gathers the warp's fragments, each lane computes its 8 outputs with exact products summed in
// f64 and one rounding to f32.
#pragma once
#include <cstdio>
#include <cstdlib>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 fragments are emulated");
    enum { num_elements = 8 };
    float x[8];
};

inline float wmma_to_f(float v) { return v; }
inline float wmma_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline int wmma_lane() { return emu::cur_tid() & 31; }

template <typename F, typename V>
void fill_fragment(F& f, V v) {
    for (float& e : f.x) e = wmma_to_f(v);
}
// Lane l's 8 elements of a fragment, flat tile index i read from p[at(i)]
template <typename F, typename P, typename At>
void load_frag(F& f, const P* p, At at) {
    __syncwarp();
    for (int e = 0; e < 8; e++) f.x[e] = wmma_to_f(p[at(8 * wmma_lane() + e)]);
    __syncwarp();
}
// A, row-major in memory: element (r, k) = flat i = 16r + k at p[r·ld + k]
template <typename T, typename P>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const P* p, unsigned ld) {
    load_frag(f, p, [ld](int i) { return (size_t)(i / 16) * ld + i % 16; });
}
// B, column-major in memory: element (k, n) = flat i = 16k + n at p[n·ld + k]
template <typename T, typename P>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const P* p, unsigned ld) {
    load_frag(f, p, [ld](int i) { return (size_t)(i % 16) * ld + i / 16; });
}
template <typename TA, typename TB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, TB, col_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    static float A[emu::MAXT / 32][256], B[emu::MAXT / 32][256], C[emu::MAXT / 32][256];
    const int w = emu::cur_tid() >> 5, l = wmma_lane();
    for (int e = 0; e < 8; e++) A[w][8 * l + e] = a.x[e], B[w][8 * l + e] = b.x[e], C[w][8 * l + e] = c.x[e];
    __syncwarp();
    float out[8];
    for (int e = 0; e < 8; e++) {
        const int i = 8 * l + e, r = i / 16, n = i % 16;
        double s = C[w][i];
        for (int k = 0; k < 16; k++) s += (double)A[w][r * 16 + k] * (double)B[w][k * 16 + n];
        out[e] = (float)s;
    }
    __syncwarp();  // every lane has read the gathered fragments before any next mma overwrites them
    for (int e = 0; e < 8; e++) d.x[e] = out[e];
}
template <typename P>
void store_matrix_sync(P* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t layout) {
    __syncwarp();
    for (int e = 0; e < 8; e++) {
        const int i = 8 * wmma_lane() + e, r = i / 16, n = i % 16;
        p[layout == mem_row_major ? (size_t)r * ld + n : (size_t)n * ld + r] = f.x[e];
    }
    __syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda
