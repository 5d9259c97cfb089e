// Row gathers: the token embedding lookup, picking rows (last token of each sequence), and the
// MoE dispatch copy. out[i, :] = table[ids[i], :]; an id >= rows writes NaN (the host checks ids
// first; NaN makes a slip visible instead of reading out of bounds).
// grid: (n), block: 256.
#include "common.cuh"

template <typename T>
__device__ void gather_rows(const T* __restrict__ table, int rows, int ld_table, const int* __restrict__ ids,
                            T* __restrict__ out, int ld_out, int n, int d) {
    int i = blockIdx.x;
    if (i >= n) return;
    int id = ids[i];
    T* o = out + (long long)i * ld_out;
    if (id < 0 || id >= rows) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = from_f32<T>(__int_as_float(0x7fc00000));
        return;
    }
    const T* src = table + (long long)id * ld_table;
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = src[j];
}

extern "C" __global__ void gather_rows_f32(const float* table, int rows, int ld_table, const int* ids, float* out,
                                           int ld_out, int n, int d) {
    DSV3_PDL();
    gather_rows<float>(table, rows, ld_table, ids, out, ld_out, n, d);
}
extern "C" __global__ void gather_rows_bf16(const bf16* table, int rows, int ld_table, const int* ids, bf16* out,
                                            int ld_out, int n, int d) {
    DSV3_PDL();
    gather_rows<bf16>(table, rows, ld_table, ids, out, ld_out, n, d);
}
