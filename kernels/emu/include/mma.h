// Host stand-in for <mma.h> (WMMA), so kernels/cuda/gemm.cu compiles in the CPU emulation
// (kernels/emu/skinny_emu.cpp). Only the skinny kernels run there; the tiled WMMA kernels compile
// against these declarations and abort if ever called.
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
    enum { num_elements = 8 };
    float x[8];
};
[[noreturn]] inline void not_emulated() {
    std::fprintf(stderr, "EMU FAILURE: a WMMA (tiled) kernel ran; only the skinny kernels are emulated\n");
    std::exit(1);
}
template <typename F, typename V>
void fill_fragment(F&, V) { not_emulated(); }
template <typename F, typename P>
void load_matrix_sync(F&, const P*, unsigned) { not_emulated(); }
template <typename D, typename A, typename B, typename C>
void mma_sync(D&, const A&, const B&, const C&) { not_emulated(); }
template <typename P, typename F>
void store_matrix_sync(P*, const F&, unsigned, layout_t) { not_emulated(); }
}  // namespace wmma
}  // namespace nvcuda
