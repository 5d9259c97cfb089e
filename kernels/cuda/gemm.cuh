// The argument block every GEMM kernel takes (mirrored by kernels/src/ops/gemm.rs, #[repr(C)]).
//
// C[m, n] (+)= sum_k A[m, k] * W[n, k] (+ bias[n]): x · Wᵀ with both operands K-contiguous (NT).
// The bf16 mma.sync kernels (gemm_mma_*) also take the transposed layouts of training, with `w`
// as operand B and ldw its row stride: NN, C[m, n] = A[m, k] · B[k, n] (dX = dY · W), and TN,
// C[m, n] = A[k, m]ᵀ · B[k, n] (A stored [k, m] with row stride lda; dW = dYᵀ · X). Grouped TN
// groups the K rows instead: group g sums over k in [row_offsets[g], row_offsets[g+1]) into
// C + g * stride_c (grid.z = groups; tile_offsets unused).
// Batched: blockIdx.z picks batch b; A, W, C, scale advance by their batch strides.
// Grouped (row_offsets != 0): group g owns rows [row_offsets[g], row_offsets[g+1]) of A and C,
// its weight is W + g * stride_w; the grid's y and z walk the row tiles of all groups (tile
// blockIdx.y + gridDim.y * blockIdx.z: more than 65535 tiles spill into z), tile_offsets[g] being
// the first tile of group g (tiles of GEMM_BM rows). grid.y * grid.z >= tile_offsets[groups].
// FP8 weights: W holds E4M3 codes, scale the f32 block scales [ceil(n/128), scale_ld] (128x128
// blocks); products are summed per 128-wide K block in f32 and then scaled into the accumulator.
// The skinny kernels also take gathered A rows (a_rows), a folded RMSNorm of A (norm_w) and, in
// their SwiGLU forms, a gate|up W [2n, k] with C [m, n] = silu(A·W[:n]ᵀ) ⊙ (A·W[n:]ᵀ).
#pragma once
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_VEC 1
#define GEMM_F32C 2

struct GemmArgs {
    const void* a;
    const void* w;
    void* c;
    const float* bias;
    const float* scale;
    const int* row_offsets;
    const int* tile_offsets;
    long long stride_a, stride_w, stride_c, stride_scale;
    int m, n, k, lda, ldw, ldc;
    int groups, accumulate, scale_ld;
    // mma kernels: GEMM_VEC, 16-byte cp.async loads allowed (the launcher checked the alignment);
    // GEMM_F32C, C is f32 (else bf16)
    int flags;
    // Skinny kernels only (the tiled ones are never launched with them set):
    // a_rows [m] (or null): A row r is read from row a_rows[r] (a gathered operand without the
    // copy); an index outside [0, a_rows_m) reads row 0 and writes NaN to that output row.
    const int* a_rows;
    // norm_w [k] (or null): A rows are RMS-normalized first, y = x · rsqrt(mean(x²) + norm_eps) · norm_w.
    const float* norm_w;
    float norm_eps;
    int a_rows_m;
};

// Grouped rows: the rows [row0, row_end) of group g that GEMM_BM-row tile t covers (false: past
// the last tile).
__device__ __forceinline__ bool gemm_group_tile(const GemmArgs& p, int t, int& row0, int& row_end, int& g) {
    if (t >= p.tile_offsets[p.groups]) return false;
    int lo = 0, hi = p.groups - 1;  // last g with tile_offsets[g] <= t
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (p.tile_offsets[mid] <= t) lo = mid; else hi = mid - 1;
    }
    g = lo;
    row0 = p.row_offsets[g] + (t - p.tile_offsets[g]) * GEMM_BM;
    row_end = p.row_offsets[g + 1];
    return row0 < row_end;
}

// Which rows this block computes: [row0, row_end), and the group (0 when not grouped).
__device__ __forceinline__ bool gemm_tile_rows(const GemmArgs& p, int& row0, int& row_end, int& g) {
    if (p.row_offsets) return gemm_group_tile(p, tile_yz(), row0, row_end, g);
    g = 0;
    row0 = blockIdx.y * GEMM_BM;
    row_end = p.m;
    return row0 < row_end;
}
