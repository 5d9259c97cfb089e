// The CPU emulator's sm_90a warpgroup MMA (include it after emu.h): the emulated versions of the
// helpers of kernels/cuda/wgmma.cuh, evaluated as the PTX ISA defines them, with the checks a
// misuse would need to fail on the GPU:
//
// - wgmma.mma_async .m64nNk32 .f32.e4m3.e4m3 (N = 128, 256) and .m64n128k16 .f32.bf16.bf16 (both
//   operands K-major, no transpose; 32 bytes of each row per instruction as in the e4m3 form, so
//   the same descriptor modes; products of bf16 values exact in f64): a warpgroup collective (the 128
//   threads 128w..128w+127 must all arrive with the same descriptors, N and scale-d). A and B are
//   read through shared-memory matrix descriptors in the one mode the kernels use and that the
//   hardware-verified fp8_gemm_wgmma validates: no swizzle, K-major, 8-row x 16-byte core matrices,
//   element (r, k) at start + (k / 16)·LBO + (r / 8)·SBO + (r % 8)·16 + k % 16 (start, LBO, SBO
//   encoded >> 4 in bits 0-13, 16-29, 32-45); and the 128-byte swizzle (layout type 1 in bits
//   62-63, fp8_gemm_tma's TMA-written operands): row r's 128-byte line at start + (r/8)·SBO +
//   (r%8)·128, the k32 step 32 bytes into the line, the physical byte at the linear address with
//   bits [4, 7) XOR bits [7, 10) (CUTLASS's Swizzle<3,4,3>; the pattern 1024-byte aligned, SBO
//   1024). Other layouts or bits (64B/32B swizzle, base offset, reserved) are reported as not
//   emulated. E4M3 codes decode exactly (0x7f / 0xff NaN).
// - Accumulator fragment (f32, per thread t of the warpgroup, warp w = t / 32, lane l):
//   d[4i + e] is D[16w + l/4 + 8·(e >> 1)][8i + 2·(l % 4) + (e & 1)], i < N / 8.
// - Arithmetic: D = (scale-d ? C : 0) + Σ_{k<32} A·B with the 32 products summed exactly and one
//   rounding to f32 (acc_bits = 0, the default), or Hopper's limited accumulator as V3 §3.5.2
//   describes it (acc_bits = 14: the products and C aligned to the largest exponent and truncated
//   to acc_bits bits, core::fp8::gemm::fp8_gemm_limited_accumulator's model).
// - Asynchrony: the result is computed at issue but lands in the registers only at the
//   wgmma.wait_group that covers its commit group; meanwhile the accumulator registers hold a NaN
//   poison (reading them early propagates NaN) and must not be written (checked at completion),
//   and the shared-memory operands must not change (re-read and compared at completion). A
//   wgmma.mma_async must follow a wgmma.fence issued since the warpgroup's last wait_group;
//   uncommitted or unwaited operations at the end of a block are reported (wg_emu::end_block()).
// - Shared addresses: __cvta_generic_to_shared maps the dynamic shared memory (emu::dyn_smem, as
//   smem_u32, bounds-checked against the launcher's size) or the static __shared__ arrays (host
//   statics: a fixed 256 KiB window around them, not poisoned); a block may use one window only. fence.proxy.async only matters to the TMA stores of tma_emu.h
//   (their source is read from the async proxy's view of shared memory, which a fence brings up
//   to date); wgmma operands are read without a proxy check.
#pragma once
#include <emu.h>

#include <cmath>
#include <vector>

namespace wg_emu {
constexpr uint32_t POISON = 0x7fc0dead;  // a quiet NaN
static int acc_bits = 0;                 // 0: exact sums; else Hopper's truncated accumulator
static long long mmas = 0;               // completed wgmma.mma_async (for the drivers' summaries)
static bool proxy_fence_pending = false; // a fence.proxy.async since the async proxy's view was taken

// shared window of the running block: 0 unknown, 1 dynamic, 2 static. Static __shared__ arrays
// are host statics (function-local statics of templates, which GCC will not place in a section):
// their window is a 256 KiB range of host memory fixed at the first static pointer seen, with that
// pointer 64-128 KiB inside it (every static array must lie in the range; they are not poisoned).
static int window = 0;
static unsigned char* static_base = nullptr;
constexpr size_t STATIC_WINDOW = 0x40000;
inline unsigned char* win_base() { return window == 2 ? static_base : emu::dyn_smem; }
inline size_t win_size() { return window == 2 ? STATIC_WINDOW : emu::smem_limit; }

enum Kind { K_FENCE = 1, K_MMA, K_COMMIT, K_WAIT, K_MMA_BF16 };
struct Mma {
    int n, group;
    bool bf16;                       // bf16 x bf16 k16 (else e4m3 x e4m3 k32)
    uint64_t da, db;
    std::vector<uint8_t> a, b;       // operands as read at issue (m64 x k32, n x k32)
    float* d[128];                   // each thread's accumulator registers
    std::vector<float> res;          // [128][n / 2] results
};
struct Group {
    int arrived = 0;
    int kind[128], n[128], arg[128];
    uint64_t da[128], db[128];
    float* d[128];
    std::vector<Mma> pending;        // issued, not yet complete (committed or not)
    int committed = 0;               // commit groups closed so far
    bool fenced = false;
};
static Group grp[emu::MAXT / 128];

inline void begin_block() {
    for (auto& g : grp) {
        g.arrived = 0;
        g.pending.clear();
        g.committed = 0;
        g.fenced = false;
    }
    window = 0;
}
inline void end_block() {
    for (auto& g : grp) {
        if (g.arrived) fail("a warpgroup collective was left incomplete");
        if (!g.pending.empty()) fail("wgmma.mma_async never waited for (or never committed)");
    }
}

inline double e4m3(uint8_t c) {
    const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    const double v = e == 0 ? std::ldexp((double)m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}

// rows x 32 bytes of a K-major operand through descriptor `desc`
inline std::vector<uint8_t> read_operand(uint64_t desc, int rows) {
    if (desc & ((3ull << 14) | (3ull << 30) | (0xffffull << 46)))
        fail("wgmma descriptor: base offset / reserved bits set (not emulated)");
    const int layout = (int)(desc >> 62);
    if (layout != 0 && layout != 1)
        fail("wgmma descriptor: 64B / 32B swizzle (only no swizzle and 128B swizzle are emulated)");
    const uint32_t start = (uint32_t)(desc & 0x3fff) << 4, lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4,
                   sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    const unsigned char* base = win_base();
    const size_t size = win_size();
    std::vector<uint8_t> v((size_t)rows * 32);
    if (layout == 1) {
        // 128B swizzle, K-major: row r's 128-byte line at start + (r/8)·SBO + (r%8)·128 (the k32
        // step: start advanced by 32 bytes inside the line), the physical address the linear one
        // with bits [4, 7) XOR bits [7, 10). Base offset 0: the start's line bits [7, 10) must be 0
        // (the 8-line pattern 1024-byte aligned); the 32 bytes must stay inside the line.
        if ((start >> 7) & 7) fail("wgmma 128B-swizzle descriptor: pattern not 1024-byte aligned (base offset)");
        if ((start & 127) + 32 > 128) fail("wgmma 128B-swizzle descriptor: the k32 step crosses the 128-byte line");
        if (sbo != 1024) fail("wgmma 128B-swizzle descriptor: SBO " + std::to_string(sbo) + " (8 lines of 128 B = 1024)");
        for (int r = 0; r < rows; r++)
            for (int kb = 0; kb < 32; kb++) {
                const uint32_t lin = start + (r / 8) * sbo + (r % 8) * 128 + kb;
                const uint32_t at = lin ^ (((lin >> 7) & 7) << 4);
                if (at + 1 > size) fail("wgmma operand past the shared memory: " + std::to_string(at));
                v[(size_t)r * 32 + kb] = base[at];
            }
        return v;
    }
    for (int r = 0; r < rows; r++)
        for (int kc = 0; kc < 2; kc++) {
            const size_t at = (size_t)start + kc * lbo + (r / 8) * sbo + (r % 8) * 16;
            if (at + 16 > size) fail("wgmma operand past the shared memory: " + std::to_string(at));
            std::memcpy(&v[(size_t)r * 32 + kc * 16], base + at, 16);
        }
    return v;
}

// the sum c + Σ p, exact then rounded to f32, or through the truncated accumulator
inline float accumulate(double c, const double* p, int cnt) {
    if (acc_bits == 0) {
        double s = c;  // 32 products of 4-bit mantissas and an f32: exact in f64 unless exponents are far apart
        for (int i = 0; i < cnt; i++) s += p[i];
        return (float)s;
    }
    double emax = -1e300;
    bool any = false;
    auto see = [&](double v) {
        if (v != 0.0 && !std::isnan(v)) emax = std::max(emax, std::floor(std::log2(std::fabs(v)))), any = true;
    };
    see(c);
    for (int i = 0; i < cnt; i++) see(p[i]);
    if (!any) {
        double s = c;
        for (int i = 0; i < cnt; i++) s += p[i];
        return (float)s;
    }
    const double ulp = std::exp2(emax - (acc_bits - 1));
    auto tr = [&](double v) { return std::trunc(v / ulp) * ulp; };
    double s = tr(c);
    for (int i = 0; i < cnt; i++) s += tr(p[i]);
    return (float)s;
}

// element k of a 32-byte operand row: an E4M3 code (k < 32) or a little-endian bf16 (k < 16)
inline double elem(const std::vector<uint8_t>& v, size_t row, int k, bool bf16) {
    if (!bf16) return e4m3(v[row * 32 + k]);
    const uint32_t bits = (uint32_t)v[row * 32 + 2 * k] | ((uint32_t)v[row * 32 + 2 * k + 1] << 8);
    const uint32_t f = bits << 16;
    float x;
    std::memcpy(&x, &f, 4);
    return (double)x;
}

inline void compute(Mma& op, const Group& g, bool scale_d) {
    const int n = op.n, per = n / 2, kn = op.bf16 ? 16 : 32;
    op.res.assign((size_t)128 * per, 0.0f);
    double A[64][32], p[32];
    std::vector<double> B((size_t)n * 32);
    for (int r = 0; r < 64; r++)
        for (int k = 0; k < kn; k++) A[r][k] = elem(op.a, r, k, op.bf16);
    for (int c = 0; c < n; c++)
        for (int k = 0; k < kn; k++) B[(size_t)c * 32 + k] = elem(op.b, c, k, op.bf16);
    for (int t = 0; t < 128; t++) {
        const int w = t / 32, l = t % 32;
        // C: the registers, or the result of an earlier pending MMA into the same registers
        const float* cin = op.d[t];
        for (auto it = g.pending.rbegin(); it != g.pending.rend(); ++it)
            if (&*it != &op && it->d[t] == op.d[t]) {
                if (it->n != n || it->bf16 != op.bf16) fail("wgmma chain with different N or types on the same registers");
                cin = &it->res[(size_t)t * per];
                break;
            }
        for (int i = 0; i < per; i++) {
            const int r = 16 * w + l / 4 + 8 * ((i & 3) >> 1), c = 8 * (i / 4) + 2 * (l % 4) + (i & 1);
            for (int k = 0; k < kn; k++) p[k] = A[r][k] * B[(size_t)c * 32 + k];
            op.res[(size_t)t * per + i] = accumulate(scale_d ? (double)cin[i] : 0.0, p, kn);
        }
    }
}

inline void complete(Group& g, int keep) {
    // complete every MMA of the oldest committed groups, leaving `keep` committed groups pending
    std::vector<Mma> rest, done;
    for (Mma& op : g.pending) (op.group < 0 || op.group >= g.committed - keep ? rest : done).push_back(std::move(op));
    for (Mma& op : done) {  // first every check, then the results in issue order (chains)
        if (read_operand(op.da, 64) != op.a || read_operand(op.db, op.n) != op.b)
            fail("shared memory operand of a wgmma changed before its wait_group");
        for (int t = 0; t < 128; t++)
            for (int i = 0; i < op.n / 2; i++) {
                uint32_t bits;
                std::memcpy(&bits, &op.d[t][i], 4);
                if (bits != POISON) fail("accumulator register written while its wgmma was in flight");
            }
    }
    for (Mma& op : done) {
        const int per = op.n / 2;
        for (int t = 0; t < 128; t++)
            for (int i = 0; i < per; i++) op.d[t][i] = op.res[(size_t)t * per + i];
        mmas++;
    }
    g.pending.swap(rest);
    // registers still targeted by a pending MMA stay poisoned
    for (Mma& op : g.pending)
        for (int t = 0; t < 128; t++)
            for (int i = 0; i < op.n / 2; i++) std::memcpy(&op.d[t][i], &POISON, 4);
}

// The calling thread joins warpgroup collective `kind`.
inline void collective(int kind, int n, int arg, uint64_t da, uint64_t db, float* d) {
    const int t = emu::cur, wgi = t / 128, l = t % 128;
    if ((wgi + 1) * 128 > emu::nthreads) fail("warpgroup collective in a partial warpgroup");
    Group& g = grp[wgi];
    g.kind[l] = kind, g.n[l] = n, g.arg[l] = arg, g.da[l] = da, g.db[l] = db, g.d[l] = d;
    if (++g.arrived < 128) {
        emu::wait_here();
        return;
    }
    g.arrived = 0;
    for (int i = 0; i < 128; i++)
        if (g.kind[i] != kind || g.n[i] != n || g.arg[i] != arg || g.da[i] != da || g.db[i] != db)
            fail("warpgroup threads in different wgmma operations or with different operands");
    if (kind == K_FENCE) {
        g.fenced = true;
    } else if (kind == K_MMA || kind == K_MMA_BF16) {
        if (!g.fenced) fail("wgmma.mma_async without a wgmma.fence since the last wait_group");
        if (window == 0) fail("wgmma descriptor built without __cvta_generic_to_shared");
        g.pending.emplace_back();
        Mma& op = g.pending.back();
        op.n = n, op.group = -1, op.da = da, op.db = db, op.bf16 = kind == K_MMA_BF16;
        for (int i = 0; i < 128; i++) op.d[i] = g.d[i];
        op.a = read_operand(da, 64);
        op.b = read_operand(db, n);
        compute(op, g, arg != 0);
        for (int i = 0; i < 128; i++)
            for (int j = 0; j < n / 2; j++) std::memcpy(&op.d[i][j], &POISON, 4);
    } else if (kind == K_COMMIT) {
        for (Mma& op : g.pending)
            if (op.group < 0) op.group = g.committed;
        g.committed++;
    } else if (kind == K_WAIT) {
        complete(g, arg);
        g.fenced = false;
    }
    for (int i = 0; i < 128; i++)
        if (i != l) emu::fib[wgi * 128 + i].waiting = false;
}
}  // namespace wg_emu

// ---- the helpers of kernels/cuda/wgmma.cuh
inline uint32_t __cvta_generic_to_shared(const void* ptr) {
    const unsigned char* p = (const unsigned char*)ptr;
    int w = 0;
    uint32_t a = 0;
    if (p >= emu::dyn_smem && p < emu::dyn_smem + emu::DYN_SMEM_BYTES) w = 1, a = (uint32_t)(p - emu::dyn_smem);
    else {
        if (!wg_emu::static_base) wg_emu::static_base = (unsigned char*)(((uintptr_t)p & ~(uintptr_t)0xffff) - 0x10000);
        if (p < wg_emu::static_base || p >= wg_emu::static_base + wg_emu::STATIC_WINDOW)
            fail("static __shared__ arrays too far apart for the emulated window");
        w = 2, a = (uint32_t)(p - wg_emu::static_base);
    }
    if (wg_emu::window && wg_emu::window != w) fail("a block uses both static and dynamic shared memory with wgmma");
    wg_emu::window = w;
    return a;
}
inline void wgmma_m64n128k32_e4m3(float* d, uint64_t da, uint64_t db, int scale_d) {
    wg_emu::collective(wg_emu::K_MMA, 128, scale_d != 0, da, db, d);
}
inline void wgmma_m64n256k32_e4m3(float* d, uint64_t da, uint64_t db, int scale_d) {
    wg_emu::collective(wg_emu::K_MMA, 256, scale_d != 0, da, db, d);
}
inline void wgmma_m64n128k16_bf16(float* d, uint64_t da, uint64_t db, int scale_d) {
    wg_emu::collective(wg_emu::K_MMA_BF16, 128, scale_d != 0, da, db, d);
}
inline void fence_acc(float*) {}
// fence.proxy.async: marks the generic-proxy shared-memory writes so far visible to the async
// proxy (tma_emu.h's TMA stores read the async proxy's view, brought up to date at a store issued
// after a fence; wgmma operands are read as they are)
inline void fence_proxy_async() { wg_emu::proxy_fence_pending = true; }
inline void wgmma_fence() { wg_emu::collective(wg_emu::K_FENCE, 0, 0, 0, 0, nullptr); }
inline void wgmma_commit() { wg_emu::collective(wg_emu::K_COMMIT, 0, 0, 0, 0, nullptr); }
template <int N>
inline void wgmma_wait() {
    wg_emu::collective(wg_emu::K_WAIT, 0, N, 0, 0, nullptr);
}
