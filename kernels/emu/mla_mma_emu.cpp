// CPU emulation of the tensor-core MLA decode kernels (kernels/cuda/mla.cu, mla_decode_mma_*),
// for checking their fragment layouts, swizzle, pipeline, masking and splits without a GPU:
//
//   bash kernels/emu/run.sh
//
// The kernel source is compiled as host C++ (include/cuda_bf16.h stands in for CUDA). Each CUDA
// thread is a fiber (ucontext); warp collectives (ldmatrix, mma.sync, shfl) complete when all 32
// lanes of the warp arrive and are evaluated from the lanes' operands exactly as the PTX ISA
// defines the fragments; __syncthreads is a block barrier; cp.async copies are deferred until the
// cp.async.wait_group that covers them (so a missing wait or barrier reads stale or poisoned
// shared memory). Shared memory is poisoned with NaNs before every block, a canary past the
// launcher's smem size catches overruns, ldmatrix/cp.async addresses are bounds- and
// alignment-checked, and cp.async sources must lie inside the cache. Outputs are compared with
// an f64 reference (bf16 inputs) at the GPU test's tolerance; output rows carry sentinels.
// Timing means nothing here.
#define DSV3_MMA_EMU 1
#include <cuda_bf16.h>
#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

extern unsigned char mla_smem[];
static size_t g_smem_limit = 0;  // bytes the launcher would request for the running kernel
static const unsigned char* g_src_lo = nullptr;  // cache bounds for cp.async sources
static const unsigned char* g_src_hi = nullptr;

[[noreturn]] static void fail(const std::string& m) {
    std::fprintf(stderr, "EMU FAILURE: %s\n", m.c_str());
    std::exit(1);
}

namespace emu {
emu_dim3 block_idx, block_dim;
constexpr int MAXT = 256;
struct Pending {
    uint32_t dst;
    const unsigned char* src;
    int bytes, group;
};
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false, waiting = false;
    std::vector<Pending> pending;
    int committed = 0;
};
static Fiber fib[MAXT];
static int nthreads = 0, cur = 0, block_arrived = 0;
static ucontext_t sched;
int cur_tid() { return cur; }

enum Op { OP_LDSM = 1, OP_LDSM_T, OP_MMA, OP_SHFL };
struct WarpX {
    int arrived = 0;
    int op[32], arg[32];
    uint32_t u[32][6];
    float f[32][4];
    uint32_t ou[32][4];
    float of[32][4];
};
static WarpX wx[MAXT / 32];

static void wait_here() {
    fib[cur].waiting = true;
    swapcontext(&fib[cur].ctx, &sched);
}

static uint16_t smem16(uint32_t addr) {
    if (addr + 2 > g_smem_limit) fail("shared read past the launcher's size: " + std::to_string(addr));
    uint16_t v;
    std::memcpy(&v, mla_smem + addr, 2);
    return v;
}
static float bf(uint32_t bits16) { return __bfloat162float(__nv_bfloat16{(uint16_t)bits16}); }

static void compute(WarpX& x, int op) {
    if (op == OP_LDSM || op == OP_LDSM_T) {
        for (int l = 0; l < 32; l++)
            if (x.u[l][0] % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
        for (int l = 0; l < 32; l++)
            for (int j = 0; j < 4; j++) {
                uint32_t lo, hi;
                if (op == OP_LDSM) {  // lane l: row l/4 of matrix j, elements 2(l%4), +1
                    uint32_t a = x.u[8 * j + l / 4][0] + 4 * (l % 4);
                    lo = smem16(a), hi = smem16(a + 2);
                } else {  // .trans: column l/4, rows 2(l%4), +1
                    int r0 = 2 * (l % 4), col = l / 4;
                    lo = smem16(x.u[8 * j + r0][0] + 2 * col);
                    hi = smem16(x.u[8 * j + r0 + 1][0] + 2 * col);
                }
                x.ou[l][j] = lo | (hi << 16);
            }
    } else if (op == OP_MMA) {  // m16n8k16 row.col: fragments as in the PTX ISA
        double A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            const uint32_t* a = x.u[l];
            for (int h = 0; h < 2; h++) {
                A[g][2 * t + h] = bf(a[0] >> (16 * h));
                A[g + 8][2 * t + h] = bf(a[1] >> (16 * h));
                A[g][2 * t + 8 + h] = bf(a[2] >> (16 * h));
                A[g + 8][2 * t + 8 + h] = bf(a[3] >> (16 * h));
                B[2 * t + h][g] = bf(a[4] >> (16 * h));
                B[2 * t + 8 + h][g] = bf(a[5] >> (16 * h));
                C[g][2 * t + h] = x.f[l][h];
                C[g + 8][2 * t + h] = x.f[l][2 + h];
            }
        }
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            for (int e = 0; e < 4; e++) {
                int r = g + 8 * (e >> 1), cidx = 2 * t + (e & 1);
                double s = C[r][cidx];
                for (int k = 0; k < 16; k++) s += A[r][k] * B[k][cidx];
                x.of[l][e] = (float)s;
            }
        }
    } else if (op == OP_SHFL) {
        for (int l = 0; l < 32; l++) {
            if (x.arg[l] != x.arg[0]) fail("shfl masks differ across the warp");
            x.of[l][0] = x.f[l ^ x.arg[l]][0];
        }
    }
}

static void collective(int op) {
    int w = cur >> 5, lane = cur & 31;
    WarpX& x = wx[w];
    x.op[lane] = op;
    if (++x.arrived == 32) {
        x.arrived = 0;
        for (int l = 0; l < 32; l++)
            if (x.op[l] != op) fail("divergent warp collective");
        compute(x, op);
        for (int l = 0; l < 32; l++)
            if (l != lane) fib[w * 32 + l].waiting = false;
    } else {
        wait_here();
    }
}

float shfl_xor(float v, int mask) {
    WarpX& x = wx[cur >> 5];
    x.f[cur & 31][0] = v;
    x.arg[cur & 31] = mask;
    collective(OP_SHFL);
    return x.of[cur & 31][0];
}

void sync_block() {
    if (++block_arrived == nthreads) {
        block_arrived = 0;
        for (int t = 0; t < nthreads; t++)
            if (t != cur) fib[t].waiting = false;
    } else {
        wait_here();
    }
}

static std::function<void()> g_body;  // the kernel call, the same for every thread
static void entry(int tid) {
    g_body();
    fib[tid].done = true;  // returns to sched through uc_link
}

static void run_block(int threads) {
    nthreads = threads;
    block_arrived = 0;
    for (auto& x : wx) x.arrived = 0;
    for (int t = 0; t < threads; t++) {
        Fiber& f = fib[t];
        f.done = f.waiting = false;
        f.pending.clear();
        f.committed = 0;
        if (f.stack.empty()) f.stack.resize(1 << 18);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, (void (*)())entry, 1, t);
    }
    for (;;) {
        bool all_done = true, progress = false;
        for (int t = 0; t < threads; t++) {
            if (fib[t].done) continue;
            all_done = false;
            if (fib[t].waiting) continue;
            cur = t;
            progress = true;
            swapcontext(&sched, &fib[t].ctx);
        }
        if (all_done) break;
        if (!progress) fail("deadlock: every live thread waits (barrier not reached by all?)");
    }
}
}  // namespace emu

// ---- the helpers mla.cu leaves to us under DSV3_MMA_EMU ----
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
    return (uint32_t)((const unsigned char*)ptr - mla_smem);
}
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    emu::WarpX& x = emu::wx[emu::cur >> 5];
    x.u[emu::cur & 31][0] = addr;
    emu::collective(emu::OP_LDSM);
    for (int j = 0; j < 4; j++) r[j] = x.ou[emu::cur & 31][j];
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
    emu::WarpX& x = emu::wx[emu::cur >> 5];
    x.u[emu::cur & 31][0] = addr;
    emu::collective(emu::OP_LDSM_T);
    for (int j = 0; j < 4; j++) r[j] = x.ou[emu::cur & 31][j];
}
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::WarpX& x = emu::wx[emu::cur >> 5];
    int l = emu::cur & 31;
    for (int j = 0; j < 4; j++) x.u[l][j] = a[j], x.f[l][j] = d[j];
    x.u[l][4] = b0;
    x.u[l][5] = b1;
    emu::collective(emu::OP_MMA);
    for (int j = 0; j < 4; j++) d[j] = x.of[l][j];
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    const unsigned char* s = (const unsigned char*)src;
    if (dst % 16 != 0 || dst + 16 > g_smem_limit) fail("cp.async destination misaligned or past the smem size");
    if ((uintptr_t)s % 16 != 0) fail("cp.async source not 16-byte aligned");
    if (s < g_src_lo || s + 16 > g_src_hi) fail("cp.async source outside the cache");
    if (src_bytes != 0 && src_bytes != 16) fail("cp.async src-size not 0/16");
    emu::Fiber& f = emu::fib[emu::cur];
    f.pending.push_back({dst, s, src_bytes, f.committed});
}
__device__ __forceinline__ void cp_async_commit() { emu::fib[emu::cur].committed++; }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emu::Fiber& f = emu::fib[emu::cur];
    std::vector<emu::Pending> keep;
    for (auto& p : f.pending) {
        if (p.group < f.committed - N) {
            std::memset(mla_smem + p.dst, 0, 16);
            std::memcpy(mla_smem + p.dst, p.src, p.bytes);
        } else {
            keep.push_back(p);
        }
    }
    f.pending.swap(keep);
}
__device__ __forceinline__ float fast_exp2(float x) { return std::exp2(x); }

#include "../cuda/mla.cu"

alignas(128) unsigned char mla_smem[256 * 1024];

// ---- driver ----
struct Variant {
    const char* name;
    void (*kernel)(MlaArgs);
    int mt, t, ns;
};
static const Variant VARIANTS[] = {
    {"mla_decode_mma_bf16 (m1t32)", mla_decode_mma_bf16, 1, 32, 2},
    {"mla_decode_mma_m1s4_bf16", mla_decode_mma_m1s4_bf16, 1, 32, 4},
    {"mla_decode_mma_m1t64_bf16", mla_decode_mma_m1t64_bf16, 1, 64, 2},
    {"mla_decode_mma_m2t32_bf16", mla_decode_mma_m2t32_bf16, 2, 32, 2},
    {"mla_decode_mma_m2t64_bf16", mla_decode_mma_m2t64_bf16, 2, 64, 2},
};
// MmaVariant::smem_bytes in kernels/src/ops/mla.rs
static size_t smem_bytes(const Variant& v, int c, int dr) {
    size_t rs = (size_t)((c + dr + 63) / 64 * 64), m = 16 * v.mt;
    return 2 * (m * rs + v.ns * v.t * rs + m * (v.t + 8)) + 4 * 8 * m;
}

static uint16_t b16(float f) { return __float2bfloat16_rn(f).bits; }
static float f16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

static int run_case(const Variant& v, int h, int c, int dr, int max_len, const std::vector<int>& lens, int splits,
                    std::mt19937& rng) {
    const int w = c + dr, n = (int)lens.size(), slots = n, dq = 8 + dr, sent = 64;
    std::normal_distribution<float> nd;
    std::vector<uint16_t> cache((size_t)slots * max_len * w), qt((size_t)n * h * c), q((size_t)n * h * dq);
    for (auto& x : cache) x = b16(nd(rng));
    for (auto& x : qt) x = b16(nd(rng));
    for (auto& x : q) x = b16(nd(rng));
    // rows: row i in slot n-1-i (slots in a different order than rows)
    std::vector<int> row_slot(n), row_len(lens);
    for (int i = 0; i < n; i++) row_slot[i] = n - 1 - i;
    const int ld_out = h * c + sent;
    const uint16_t SENT = 0x7fa1, POISON = 0x7fc0;  // a NaN payload never produced, and NaN
    std::vector<uint16_t> out((size_t)n * ld_out, SENT);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < h * c; j++) out[(size_t)r * ld_out + j] = POISON;
    std::vector<float> part_o((size_t)splits * n * h * c, NAN), part_ml((size_t)splits * n * h * 2, NAN);
    const float scale = 1.0f / std::sqrt((float)w);

    MlaArgs a{};
    a.qt = qt.data();
    a.qpe = q.data() + 8;
    a.cache = cache.data();
    a.out = out.data();
    a.row_slot = row_slot.data();
    a.row_len = row_len.data();
    a.part_o = splits > 1 ? part_o.data() : nullptr;
    a.part_ml = splits > 1 ? part_ml.data() : nullptr;
    a.slot_stride = (long long)max_len * w;
    a.n = n, a.h = h, a.c = c, a.dr = dr, a.ld_qt = h * c, a.ld_qpe = h * dq, a.hs_qpe = dq, a.ld_out = ld_out;
    a.splits = splits, a.split_len = (max_len + splits - 1) / splits, a.scale = scale, a.max_len = max_len;

    g_src_lo = (const unsigned char*)cache.data();
    g_src_hi = g_src_lo + cache.size() * 2;
    const size_t smem = smem_bytes(v, c, dr);
    const int hb = (h + 16 * v.mt - 1) / (16 * v.mt);
    for (int y = 0; y < splits; y++)
        for (int x = 0; x < n * hb; x++) {
            emu::block_idx = {(unsigned)x, (unsigned)y, 0};
            emu::block_dim = {128, 1, 1};
            g_smem_limit = smem;
            std::memset(mla_smem, 0xff, smem);                      // NaN poison
            std::memset(mla_smem + smem, 0x5a, sizeof(mla_smem) - smem);  // canary
            emu::g_body = [&] { v.kernel(a); };
            emu::run_block(128);
            for (size_t i = smem; i < sizeof(mla_smem); i++)
                if (mla_smem[i] != 0x5a) fail("shared memory written past the launcher's size");
        }
    if (splits > 1) {
        for (int y = 0; y < h; y++)
            for (int x = 0; x < n; x++) {
                emu::block_idx = {(unsigned)x, (unsigned)y, 0};
                emu::block_dim = {256, 1, 1};
                emu::g_body = [&] { mla_combine_bf16(a); };
                emu::run_block(256);
            }
    }
    // reference (f64) and comparison
    double worst = 0;
    int bad = 0;
    for (int r = 0; r < n; r++) {
        const int len = std::min(lens[r], max_len);
        const uint16_t* cs = cache.data() + (size_t)row_slot[r] * max_len * w;
        for (int hh = 0; hh < h; hh++) {
            std::vector<double> s(len);
            double mx = -INFINITY;
            for (int t = 0; t < len; t++) {
                double acc = 0;
                for (int j = 0; j < c; j++) acc += (double)f16(qt[((size_t)r * h + hh) * c + j]) * f16(cs[(size_t)t * w + j]);
                for (int j = 0; j < dr; j++)
                    acc += (double)f16(q[(size_t)r * h * dq + hh * dq + 8 + j]) * f16(cs[(size_t)t * w + c + j]);
                s[t] = acc * scale;
                mx = std::max(mx, s[t]);
            }
            double z = 0;
            for (int t = 0; t < len; t++) z += (s[t] = std::exp(s[t] - mx));
            for (int j = 0; j < c; j++) {
                double want = 0;
                for (int t = 0; t < len; t++) want += s[t] * f16(cs[(size_t)t * w + j]);
                want = len > 0 ? want / z : 0.0;
                float got = f16(out[(size_t)r * ld_out + hh * c + j]);
                double err = std::fabs(got - want);
                if (!(err <= 1.6e-2 + 1.6e-2 * std::fabs(want))) {
                    if (bad++ < 5)
                        std::fprintf(stderr, "  row %d head %d col %d: got %g want %g\n", r, hh, j, got, want);
                }
                if (!std::isnan(err)) worst = std::max(worst, err);
                else worst = INFINITY;
            }
        }
        for (int j = h * c; j < ld_out; j++)
            if (out[(size_t)r * ld_out + j] != SENT) fail("output written past h*c (sentinel clobbered)");
    }
    std::printf("%-30s h%-3d c%-3d dr%-3d splits %-2d lens", v.name, h, c, dr, splits);
    for (int l : lens) std::printf(" %d", l);
    std::printf(": max |err| %.3g%s\n", worst, bad ? "  FAILED" : "");
    std::fflush(stdout);
    return bad;
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::mt19937 rng(7);
    int bad = 0;
    for (const Variant& v : VARIANTS) {
        for (int splits : {1, 3, 40}) {
            bad += run_case(v, 16, 512, 64, 1030, {1, 63, 65, 1030}, splits, rng);
            bad += run_case(v, 5, 128, 32, 1100, {65, 1, 1030, 63}, splits, rng);
            if (!quick) bad += run_case(v, 40, 256, 32, 300, {0, 97, 300}, splits, rng);
        }
        if (!quick) bad += run_case(v, 128, 512, 64, 200, {200, 33}, 3, rng);
    }
    std::printf(bad ? "FAILED (%d bad elements)\n" : "all cases match the f64 reference\n", bad);
    return bad ? 1 : 0;
}
