// CPU emulation of the skinny GEMM kernels (kernels/cuda/gemm.cu, gemm_skinny*): the plain 8-row
// and 1-row forms, the SwiGLU forms, gathered A rows (a_rows) and the folded RMSNorm (norm_w), on
// f32, bf16 and FP8 weights, plain, batched and grouped (empty and ragged groups), against f64
// references, without a GPU:
//
//   bash kernels/emu/run.sh            (runs this and mla_mma_emu)
//
// The real gemm.cu runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread; a
// shuffle completes when all 32 lanes of the warp reach it with the same mask, a lane that left
// early is a reported deadlock; include/mma.h emulates the WMMA fragments of the tiled FP8-weight kernel; the CUDA driver stand-in, driver.cpp, runs it). Blocks run one after another over the grid the launcher (kernels/src/ops/gemm.rs,
// gemm_via) computes, mirrored in launch() below with the same GemmArgs fields. Every device
// buffer sits against a PROT_NONE guard page at both ends (an out-of-bounds read or write
// faults and is reported), row tails / batch gaps / unowned rows of C carry sentinels that must
// survive, and outputs are checked:
// - against an f64 reference (inputs as stored: bf16-rounded, E4M3 x block scale), within a
//   bound from the f32 summation (1e-5 x sum of |products|), the output rounding, and for
//   SwiGLU the derivative of silu(g)·u times the errors of g and u;
// - bit for bit where the design says so: SwiGLU = the plain kernel over the 2n gate|up rows +
//   elementwise.cu's swiglu (host copy of its math); a_rows = the plain kernel on rows gathered
//   on the host; the 1-row form = the 8-row form (same per-lane sums, same butterfly tree);
// - the folded RMSNorm also against rmsnorm.cu's math on the host + the plain kernel.
// Timing means nothing here.
#include <emu.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../cuda/gemm.cu"

// ---- guarded device memory
struct GBuf {
    unsigned char* base = nullptr;
    size_t maplen = 0;
    unsigned char* data = nullptr;
    size_t bytes = 0;
    explicit GBuf(size_t n) : bytes(n) {
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        size_t body = ((n + 15) / 16 * 16 + pg - 1) / pg * pg;
        if (body == 0) body = pg;
        maplen = body + 2 * pg;
        void* p = mmap(nullptr, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) fail("mmap");
        base = (unsigned char*)p;
        mprotect(base, pg, PROT_NONE);
        mprotect(base + pg + body, pg, PROT_NONE);
        data = base + pg + body - (n + 15) / 16 * 16;  // ends (16-byte padded) at the guard page
        std::memset(base + pg, 0xff, body);             // the padding reads as NaN if touched
    }
    GBuf(const GBuf&) = delete;
    GBuf& operator=(const GBuf&) = delete;
    ~GBuf() { munmap(base, maplen); }
};
static void on_segv(int) {
    const char m[] = "EMU FAILURE: out-of-bounds access (a guard page was touched)\n";
    ssize_t r = write(2, m, sizeof(m) - 1);
    (void)r;
    _exit(1);
}

// ---- element types
enum DT { F32, BF16, FP8 };
static const char* dt_name(DT d) { return d == F32 ? "f32" : d == BF16 ? "bf16" : "fp8"; }
static size_t dt_size(DT d) { return d == F32 ? 4 : d == BF16 ? 2 : 1; }
static float bfr(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
static double e4m3(uint8_t b) { return (double)e4m3_to_f32(b); }

// values (as f32) into a typed buffer at element offset `off`
static void put(GBuf& g, DT d, size_t off, float v) {
    if (d == F32) std::memcpy(g.data + 4 * off, &v, 4);
    else if (d == BF16) {
        __nv_bfloat16 b = __float2bfloat16_rn(v);
        std::memcpy(g.data + 2 * off, &b, 2);
    } else fail("put fp8");
}
static float get(const GBuf& g, DT d, size_t off) {
    if (d == F32) {
        float v;
        std::memcpy(&v, g.data + 4 * off, 4);
        return v;
    }
    __nv_bfloat16 b;
    std::memcpy(&b, g.data + 2 * off, 2);
    return __bfloat162float(b);
}
static uint32_t bits(const GBuf& g, DT d, size_t off) {
    if (d == F32) {
        uint32_t v;
        std::memcpy(&v, g.data + 4 * off, 4);
        return v;
    }
    uint16_t v;
    std::memcpy(&v, g.data + 2 * off, 2);
    return v;
}
static void put_bits(GBuf& g, DT d, size_t off, uint32_t v) {
    if (d == F32) std::memcpy(g.data + 4 * off, &v, 4);
    else {
        uint16_t h = (uint16_t)v;
        std::memcpy(g.data + 2 * off, &h, 2);
    }
}
static const uint32_t SENT32 = 0x7fa00123u;  // a NaN payload no kernel writes
static const uint32_t SENT16 = 0x7fa1u;
static uint32_t sentinel(DT d) { return d == F32 ? SENT32 : SENT16; }

// ---- kernels
struct Kernel {
    const char* name;
    void (*fn)(GemmArgs);
    DT a, w, c;
    int rows;  // 8 or 1
    bool swiglu;
};
static const Kernel KERNELS[] = {
    {"gemm_skinny_f32", gemm_skinny_f32, F32, F32, F32, 8, false},
    {"gemm_skinny_bf16_bf16", gemm_skinny_bf16_bf16, BF16, BF16, BF16, 8, false},
    {"gemm_skinny_bf16_f32", gemm_skinny_bf16_f32, BF16, BF16, F32, 8, false},
    {"gemm_skinny_fp8_bf16", gemm_skinny_fp8_bf16, BF16, FP8, BF16, 8, false},
    {"gemm_skinny_fp8_f32", gemm_skinny_fp8_f32, BF16, FP8, F32, 8, false},
    {"gemm_skinny_bf16_f32w", gemm_skinny_bf16_f32w, BF16, F32, F32, 8, false},
    {"gemm_skinny1_bf16_bf16", gemm_skinny1_bf16_bf16, BF16, BF16, BF16, 1, false},
    {"gemm_skinny1_bf16_f32", gemm_skinny1_bf16_f32, BF16, BF16, F32, 1, false},
    {"gemm_skinny1_fp8_bf16", gemm_skinny1_fp8_bf16, BF16, FP8, BF16, 1, false},
    {"gemm_skinny1_fp8_f32", gemm_skinny1_fp8_f32, BF16, FP8, F32, 1, false},
    {"gemm_skinny_swiglu_f32", gemm_skinny_swiglu_f32, F32, F32, F32, 8, true},
    {"gemm_skinny_swiglu_bf16", gemm_skinny_swiglu_bf16, BF16, BF16, BF16, 8, true},
    {"gemm_skinny_swiglu_fp8", gemm_skinny_swiglu_fp8, BF16, FP8, BF16, 8, true},
    {"gemm_skinny1_swiglu_bf16", gemm_skinny1_swiglu_bf16, BF16, BF16, BF16, 1, true},
    {"gemm_skinny1_swiglu_fp8", gemm_skinny1_swiglu_fp8, BF16, FP8, BF16, 1, true},
};
static const Kernel& kernel(const std::string& name) {
    for (const Kernel& k : KERNELS)
        if (name == k.name) return k;
    fail("no kernel " + name);
}

// ---- one problem: operands on the host (as stored) and in guarded buffers
struct Problem {
    // shape
    int m = 1, n = 1, k = 8;  // n = output columns (SwiGLU: W has 2n rows)
    int batch = 1, wgroups = 1;  // weight matrices (grouped: the groups; batched: batch or 1)
    bool grouped = false;
    std::vector<int> counts;  // grouped: rows per group
    int lda = 8, ldc = 1, a_off = 0, c_off = 0;
    long long stride_a = 0, stride_c = 0;
    int src_m = 0;  // rows of A per batch (the gathered rows index these)
    bool bias = false, accumulate = false, norm = false;
    float eps = 1e-6f;
    std::vector<int> a_rows;  // empty: none
};

struct Data {
    DT a, w, c;
    int nw;  // weight rows per matrix
    std::vector<float> A;  // a_len values (as stored)
    std::vector<uint8_t> Wq;  // FP8 codes
    std::vector<float> W;  // weights as f32 values (FP8: unused)
    std::vector<float> S;  // FP8 block scales
    std::vector<float> bias, normw, prev;
    std::vector<int> ro;
    size_t a_len, w_len, s_len, c_len;
};

static double dot_ref(const Problem& p, const Data& d, int b, int gsel, int arow, int wrow, double* sabs,
                      const std::vector<double>& x) {
    (void)b;
    double s = 0, sa = 0;
    const int sl = (p.k + 127) / 128, nb = (d.nw + 127) / 128;
    for (int kk = 0; kk < p.k; kk++) {
        double wv;
        size_t at = (size_t)gsel * d.nw * p.k + (size_t)wrow * p.k + kk;
        if (d.w == FP8) wv = e4m3(d.Wq[at]) * d.S[(size_t)gsel * nb * sl + (size_t)(wrow / 128) * sl + kk / 128];
        else wv = d.W[at];
        s += x[kk] * wv;
        sa += std::fabs(x[kk] * wv);
    }
    (void)arow;
    *sabs = sa;
    return s;
}

static std::mt19937 rng(11);
static float randn() {
    static std::normal_distribution<float> nd;
    return nd(rng);
}
static int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

static Data make_data(const Kernel& kn, const Problem& p) {
    Data d;
    d.a = kn.a, d.w = kn.w, d.c = kn.c;
    d.nw = kn.swiglu ? 2 * p.n : p.n;
    const int last = p.grouped ? 0 : p.batch - 1;
    d.a_len = p.a_off + (size_t)last * p.stride_a + (size_t)(p.src_m - 1) * p.lda + p.k;
    d.A.resize(d.a_len);
    // A rows of different scales (the norm must undo them); bf16 A rounded as stored
    for (size_t i = 0; i < d.a_len; i++) {
        float v = randn() * (1.0f + (float)((i / std::max(p.lda, 1)) % 5));
        d.A[i] = kn.a == BF16 ? bfr(v) : v;
    }
    d.w_len = (size_t)p.wgroups * d.nw * p.k;
    if (kn.w == FP8) {
        d.Wq.resize(d.w_len);
        for (auto& q : d.Wq) {
            do q = (uint8_t)randint(0, 255);
            while ((q & 0x7f) == 0x7f);
        }
        const int sl = (p.k + 127) / 128, nb = (d.nw + 127) / 128;
        d.s_len = (size_t)p.wgroups * nb * sl;
        d.S.resize(d.s_len);
        for (auto& s : d.S) s = 0.001f + 0.01f * (float)randint(0, 1000) / 1000.0f;
    } else {
        d.W.resize(d.w_len);
        for (auto& w : d.W) w = kn.w == BF16 ? bfr(randn()) : randn();
        d.s_len = 0;
    }
    d.bias.resize(d.nw);
    for (auto& b : d.bias) b = randn();
    d.normw.resize(p.k);
    for (auto& g : d.normw) g = 0.5f + (float)randint(0, 1000) / 1000.0f;
    if (p.grouped) {
        d.ro.push_back(0);
        for (int c : p.counts) d.ro.push_back(d.ro.back() + c);
    }
    d.c_len = p.c_off + (size_t)(p.grouped ? 0 : p.batch - 1) * p.stride_c + (size_t)(p.m - 1) * p.ldc + p.n;
    d.prev.resize(d.c_len);
    for (auto& v : d.prev) v = kn.c == BF16 ? bfr(randn()) : randn();
    return d;
}

struct Bufs {
    GBuf A, W, S, C, bias, normw, ro, arows;
    Bufs(const Data& d, const Problem& p)
        : A(d.a_len * dt_size(d.a)),
          W(d.w_len * dt_size(d.w)),
          S(std::max<size_t>(d.s_len, 1) * 4),
          C(d.c_len * dt_size(d.c)),
          bias(d.bias.size() * 4),
          normw(d.normw.size() * 4),
          ro(std::max<size_t>(d.ro.size(), 1) * 4),
          arows(std::max<size_t>(p.a_rows.size(), 1) * 4) {
        for (size_t i = 0; i < d.a_len; i++) put(A, d.a, i, d.A[i]);
        if (d.w == FP8) {
            std::memcpy(W.data, d.Wq.data(), d.w_len);
            std::memcpy(S.data, d.S.data(), d.s_len * 4);
        } else {
            for (size_t i = 0; i < d.w_len; i++) put(W, d.w, i, d.W[i]);
        }
        std::memcpy(bias.data, d.bias.data(), d.bias.size() * 4);
        std::memcpy(normw.data, d.normw.data(), d.normw.size() * 4);
        if (!d.ro.empty()) std::memcpy(ro.data, d.ro.data(), d.ro.size() * 4);
        if (!p.a_rows.empty()) std::memcpy(arows.data, p.a_rows.data(), p.a_rows.size() * 4);
        reset_c(d, p);
    }
    void reset_c(const Data& d, const Problem& p) {
        for (size_t i = 0; i < d.c_len; i++) put_bits(C, d.c, i, sentinel(d.c));
        if (p.accumulate) {
            // prev only where the kernel owns C: the rest keeps its sentinel
            for_each_out(d, p, [&](int, int, int row, size_t at) {
                (void)row;
                put(C, d.c, at, d.prev[at]);
            });
        }
    }
    template <typename F>
    static void for_each_out(const Data& d, const Problem& p, F f) {
        for (int b = 0; b < (p.grouped ? 1 : p.batch); b++)
            for (int r = 0; r < p.m; r++) {
                if (p.grouped && r >= d.ro.back()) continue;  // rows of no group
                for (int j = 0; j < p.n; j++) f(b, j, r, p.c_off + (size_t)b * p.stride_c + (size_t)r * p.ldc + j);
            }
    }
};

// The launcher (kernels/src/ops/gemm.rs gemm_via) for this call: GemmArgs and grid.
static void launch(const Kernel& kn, const Problem& p, const Data& d, Bufs& B) {
    if (p.k % 8 || p.lda % 8 || p.a_off % 8 || p.stride_a % 8) fail("case breaks the skinny kernels' alignment rules");
    GemmArgs a{};
    a.a = (const void*)((const unsigned char*)B.A.data + p.a_off * dt_size(kn.a));
    a.w = B.W.data;
    a.c = (void*)(B.C.data + p.c_off * dt_size(kn.c));
    a.bias = p.bias ? (const float*)B.bias.data : nullptr;
    a.scale = kn.w == FP8 ? (const float*)B.S.data : nullptr;
    a.row_offsets = p.grouped ? (const int*)B.ro.data : nullptr;
    a.tile_offsets = nullptr;  // the skinny kernels never read it
    const bool share_w = !p.grouped && p.wgroups == 1;
    const int nw = d.nw, sl = (p.k + 127) / 128;
    a.stride_a = p.stride_a;
    a.stride_w = share_w ? 0 : (long long)nw * p.k;
    a.stride_c = p.stride_c;
    a.stride_scale = kn.w == FP8 && !share_w ? (long long)((nw + 127) / 128) * sl : 0;
    a.m = p.m;
    a.n = p.n;
    a.k = p.k;
    a.lda = p.lda;
    a.ldw = p.k;
    a.ldc = p.ldc;
    a.groups = p.grouped ? p.wgroups : 1;
    a.accumulate = p.accumulate;
    a.scale_ld = sl;
    a.a_rows = p.a_rows.empty() ? nullptr : (const int*)B.arows.data;
    a.norm_w = p.norm ? (const float*)B.normw.data : nullptr;
    a.norm_eps = p.eps;
    // rows of A the indices may name: what the buffer holds past the last batch's offset
    const long long last = p.grouped ? 0 : p.batch - 1;
    a.a_rows_m = (int)(((long long)d.a_len - (p.a_off + last * p.stride_a + p.k)) / p.lda + 1);
    unsigned gx, gy, gz;
    if (kn.rows == 1) {
        if (p.m != 1 || p.grouped) fail("1-row kernel with m != 1 or grouped");
        gx = (unsigned)((p.n + (kn.swiglu ? 64 : 128) - 1) / (kn.swiglu ? 64 : 128));
        gy = 1;
        gz = p.batch;
    } else {
        gx = (unsigned)((p.n + (kn.swiglu ? 8 : 16) - 1) / (kn.swiglu ? 8 : 16));
        const unsigned tiles = (unsigned)((p.m + 7) / 8);
        gy = p.grouped ? (unsigned)p.wgroups : tiles;
        gz = p.grouped ? tiles : (unsigned)p.batch;
    }
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                emu::run_block({x, y, z}, 128, [&] { kn.fn(a); });
            }
}

// host copies of the elementwise math (elementwise.cu swiglu, rmsnorm.cu) for the exact checks
static float host_swiglu(float g, float u) { return g * dsv3_sigmoid(g) * u; }

static int g_cases = 0;
static long long g_checked = 0;

// The f64 reference of every output element the kernel owns.
struct Ref {
    size_t at;
    double want, tol, sabs;  // sabs: sum of |products| (the scale of the f32 summation error)
    bool nan;  // a gathered row with an index out of range: NaN
};
static std::vector<Ref> reference(const Kernel& kn, const Problem& p, const Data& d) {
    std::vector<Ref> refs;
    const int nb = p.grouped ? 1 : p.batch;
    const double out_r = d.c == BF16 ? 1.0 / 256 : 1e-6;
    for (int b = 0; b < nb; b++) {
        for (int r = 0; r < p.m; r++) {
            int gsel = p.wgroups == 1 ? 0 : b;
            if (p.grouped) {
                if (r >= d.ro.back()) continue;
                gsel = 0;
                while (d.ro[gsel + 1] <= r) gsel++;
            }
            // the A row this C row reads
            int src = r;
            bool bad_row = false;
            if (!p.a_rows.empty()) {
                src = p.a_rows[r];
                if (src < 0 || src >= p.src_m) bad_row = true, src = 0;
            }
            size_t a0 = p.a_off + (size_t)b * (p.grouped ? 0 : p.stride_a) + (size_t)src * p.lda;
            std::vector<double> x(p.k);
            for (int kk = 0; kk < p.k; kk++) x[kk] = d.A[a0 + kk];
            if (p.norm) {
                double ss = 0;
                for (double v : x) ss += v * v;
                double inv = 1.0 / std::sqrt(ss / p.k + (double)p.eps);
                for (int kk = 0; kk < p.k; kk++) x[kk] *= inv * d.normw[kk];
            }
            for (int j = 0; j < p.n; j++) {
                Ref f;
                f.at = p.c_off + (size_t)b * p.stride_c + (size_t)r * p.ldc + j;
                f.nan = bad_row;
                if (!kn.swiglu) {
                    double v = dot_ref(p, d, b, gsel, src, j, &f.sabs, x);
                    if (p.bias) v += d.bias[j];
                    if (p.accumulate) v += d.prev[f.at];
                    f.want = v;
                    f.tol = 1e-5 * f.sabs + out_r * std::fabs(v) + 1e-30;
                } else {
                    double sg, su;
                    double g = dot_ref(p, d, b, gsel, src, j, &sg, x), u = dot_ref(p, d, b, gsel, src, p.n + j, &su, x);
                    if (p.bias) g += d.bias[j], u += d.bias[p.n + j];
                    const double sig = 1.0 / (1.0 + std::exp(-g)), silu = g * sig;
                    const double dsilu = sig * (1.0 + g * (1.0 - sig));
                    // errors of g and u: f32 sums, and their rounding to C's type before the SwiGLU
                    const double eg = 1e-5 * sg + out_r * std::fabs(g), eu = 1e-5 * su + out_r * std::fabs(u);
                    f.want = silu * u;
                    f.sabs = std::fabs(dsilu * u) * sg + std::fabs(silu) * su;
                    f.tol = std::fabs(dsilu * u) * eg + std::fabs(silu) * eu + eg * eu +
                            (out_r + 1e-6) * std::fabs(f.want) + 1e-30;
                }
                refs.push_back(f);
            }
        }
    }
    return refs;
}

// Runs the problem and checks it against the f64 reference; returns C's raw bits (for the
// exact comparisons).
static std::vector<uint32_t> run_checked(const Kernel& kn, const Problem& p, const Data& d, const std::string& what) {
    Bufs B(d, p);
    launch(kn, p, d, B);
    g_cases++;
    std::vector<char> owned(d.c_len, 0);
    int bad = 0;
    for (const Ref& f : reference(kn, p, d)) {
        owned[f.at] = 1;
        g_checked++;
        float got = get(B.C, d.c, f.at);
        bool ok = f.nan ? std::isnan(got) && bits(B.C, d.c, f.at) != sentinel(d.c)
                        : std::fabs((double)got - f.want) <= f.tol;
        if (!ok && bad++ < 5)
            std::fprintf(stderr, "  %s: C element %zu: got %.9g want %s%.9g (tol %.3g)\n", what.c_str(), f.at, got,
                         f.nan ? "NaN, not " : "", f.want, f.tol);
    }
    // everything the kernel does not own keeps its sentinel
    for (size_t i = 0; i < d.c_len; i++)
        if (!owned[i] && bits(B.C, d.c, i) != sentinel(d.c)) {
            if (bad++ < 5) std::fprintf(stderr, "  %s: C element %zu outside the output was written\n", what.c_str(), i);
        }
    if (bad) fail(what + ": " + std::to_string(bad) + " bad elements");
    std::vector<uint32_t> out(d.c_len);
    for (size_t i = 0; i < d.c_len; i++) out[i] = bits(B.C, d.c, i);
    return out;
}

static std::string describe(const Kernel& kn, const Problem& p) {
    char s[400];
    std::snprintf(s, sizeof s, "%s m%d n%d k%d %s%s%s%s%s%s", kn.name, p.m, p.n, p.k,
                  p.grouped ? "grouped" : (p.batch > 1 ? (p.wgroups > 1 ? "batched" : "batched/shared-W") : "plain"),
                  p.bias ? " +bias" : "", p.accumulate ? " +acc" : "", p.norm ? " +norm" : "",
                  p.a_rows.empty() ? "" : " +a_rows", p.eps > 1e-3f ? " (eps 0.5)" : "");
    return s;
}

// ---- exact comparisons
// Bit for bit, except that any two NaNs of C's type d are equal: a gathered row out of range is
// NaN in every form, but which NaN is not (a GPU writes its canonical NaN; here x86 propagates an
// operand's sign, and the compiler may swap the operands of a product, as it did for the SwiGLU
// of one form at -O1).
static bool is_nan_bits(uint32_t v, DT d) {
    return d == F32 ? (v & 0x7fffffffu) > 0x7f800000u : (v & 0x7fffu) > 0x7f80u;
}
static void exact_eq(const std::vector<uint32_t>& x, const std::vector<uint32_t>& y, DT d, const std::string& what) {
    if (x.size() != y.size()) fail(what + ": sizes differ");
    for (size_t i = 0; i < x.size(); i++)
        if (x[i] != y[i] && !(is_nan_bits(x[i], d) && is_nan_bits(y[i], d))) {
            char s[200];
            std::snprintf(s, sizeof s, ": element %zu differs (%08x vs %08x)", i, x[i], y[i]);
            fail(what + s);
        }
}

// The same problem without a_rows, with A's rows gathered on the host: bit-equal output.
static void check_gather_equivalence(const Kernel& kn, const Problem& p, const Data& d,
                                     const std::vector<uint32_t>& fused) {
    Problem q = p;
    Data e = d;
    q.a_rows.clear();
    q.src_m = p.m;
    const int nb = p.grouped ? 1 : p.batch;
    q.stride_a = p.grouped ? 0 : (long long)p.m * p.lda;  // batches one after another
    q.a_off = 0;
    e.a_len = (size_t)(nb - 1) * q.stride_a + (size_t)(p.m - 1) * p.lda + p.k;
    e.A.assign(e.a_len, 0.0f);
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < p.m; r++) {
            int s = p.a_rows[r];
            if (s < 0 || s >= p.src_m) s = 0;  // (its output is NaN in the fused run: skipped below)
            for (int kk = 0; kk < p.k; kk++)
                e.A[(size_t)b * q.stride_a + (size_t)r * p.lda + kk] =
                    d.A[p.a_off + (size_t)b * (p.grouped ? 0 : p.stride_a) + (size_t)s * p.lda + kk];
        }
    std::vector<uint32_t> plain = run_checked(kn, q, e, describe(kn, q) + " (host-gathered)");
    std::vector<uint32_t> f = fused;
    for (int r = 0; r < p.m; r++)
        if (p.a_rows[r] < 0 || p.a_rows[r] >= p.src_m)
            for (int b = 0; b < nb; b++)
                for (int j = 0; j < p.n; j++) {
                    size_t at = p.c_off + (size_t)b * p.stride_c + (size_t)r * p.ldc + j;
                    f[at] = plain[at];
                }
    exact_eq(f, plain, d.c, describe(kn, p) + " vs host gather + plain kernel");
}

// SwiGLU kernel == plain kernel over the 2n gate|up rows + elementwise.cu's swiglu, bit for bit.
static void check_swiglu_equivalence(const Kernel& kn, const Problem& p, const Data& d,
                                     const std::vector<uint32_t>& fused) {
    std::string plain_name = kn.rows == 1 ? "gemm_skinny1_" : "gemm_skinny_";
    plain_name += kn.w == F32 ? (kn.rows == 1 ? "" : "f32") : kn.w == BF16 ? "bf16_bf16" : "fp8_bf16";
    const Kernel& pk = kernel(plain_name);
    Problem q = p;
    Data e = d;
    q.n = 2 * p.n;
    q.ldc = 2 * p.n;
    const int nb = p.grouped ? 1 : p.batch;
    q.stride_c = p.grouped ? 0 : (long long)p.m * q.ldc;
    q.c_off = 0;
    q.accumulate = false;
    e.nw = 2 * p.n;
    e.c_len = (size_t)(nb - 1) * q.stride_c + (size_t)(p.m - 1) * q.ldc + q.n;
    e.prev.assign(e.c_len, 0.0f);
    Bufs B(e, q);
    launch(pk, q, e, B);
    std::vector<uint32_t> f = fused;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < p.m; r++) {
            if (p.grouped && r >= e.ro.back()) continue;
            for (int j = 0; j < p.n; j++) {
                size_t gat = (size_t)b * q.stride_c + (size_t)r * q.ldc + j;
                float g = get(B.C, d.c, gat), u = get(B.C, d.c, gat + p.n);
                size_t at = p.c_off + (size_t)b * p.stride_c + (size_t)r * p.ldc + j;
                float want = host_swiglu(g, u);
                uint32_t wb;
                if (d.c == F32) std::memcpy(&wb, &want, 4);
                else wb = __float2bfloat16_rn(want).bits;
                bool nan_row = !p.a_rows.empty() && (p.a_rows[r] < 0 || p.a_rows[r] >= p.src_m);
                if (nan_row) continue;
                if (f[at] != wb) {
                    char s[200];
                    std::snprintf(s, sizeof s, ": row %d col %d: fused %08x, gemm + swiglu %08x", r, j, f[at], wb);
                    fail(describe(kn, p) + " vs plain kernel + swiglu" + s);
                }
            }
        }
}

// The folded norm against the unfused path: rmsnorm.cu's math on the host (f32, rounded to A's
// type as the unfused path stores h) + the plain kernel. Not bit-equal (the 1/rms multiplies the
// finished sum instead of every x; bf16 h is rounded): within both runs' bounds plus, for bf16,
// h's rounding (2^-9 relative per element). Returns the largest difference relative to the
// summation scale.
static double g_norm_f32_worst = 0;
static void check_norm_vs_unfused(const Kernel& kn, const Problem& p, const Data& d, const std::vector<uint32_t>& fused) {
    Problem q = p;
    Data e = d;
    q.norm = false;
    const int nb = p.grouped ? 1 : p.batch;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < p.src_m; r++) {
            size_t a0 = p.a_off + (size_t)b * (p.grouped ? 0 : p.stride_a) + (size_t)r * p.lda;
            float s = 0.0f;
            for (int kk = 0; kk < p.k; kk++) s += d.A[a0 + kk] * d.A[a0 + kk];
            float inv = 1.0f / sqrtf(s / (float)p.k + p.eps);
            for (int kk = 0; kk < p.k; kk++) {
                float y = d.A[a0 + kk] * inv * d.normw[kk];
                e.A[a0 + kk] = kn.a == BF16 ? bfr(y) : y;
            }
        }
    std::vector<uint32_t> unf = run_checked(kn, q, e, describe(kn, q) + " (host rmsnorm + plain kernel)");
    std::vector<Ref> rf = reference(kn, p, d), ru = reference(kn, q, e);
    for (size_t i = 0; i < rf.size(); i++) {
        if (rf[i].nan) continue;
        float x, y;
        if (d.c == F32) std::memcpy(&x, &fused[rf[i].at], 4), std::memcpy(&y, &unf[rf[i].at], 4);
        else x = __bfloat162float(__nv_bfloat16{(uint16_t)fused[rf[i].at]}), y = __bfloat162float(__nv_bfloat16{(uint16_t)unf[rf[i].at]});
        double diff = std::fabs((double)x - y);
        double tol = rf[i].tol + ru[i].tol + (kn.a == BF16 ? rf[i].sabs / 256 : 0);
        if (!(diff <= tol)) {
            char s[200];
            std::snprintf(s, sizeof s, ": C element %zu: fused %.9g, unfused %.9g (tol %.3g)", rf[i].at, x, y, tol);
            fail(describe(kn, p) + " folded norm vs rmsnorm + GEMM" + s);
        }
        if (kn.a == F32 && kn.c == F32) g_norm_f32_worst = std::max(g_norm_f32_worst, diff / std::max(rf[i].sabs, 1e-30));
    }
}

struct Mode {
    const char* name;
    int m, batch;  // plain / batched
    std::vector<int> counts;  // grouped when non-empty
    bool shared_w;
};

static void run_all(bool quick) {
    std::vector<Mode> modes8 = {
        {"m1", 1, 1, {}, false},
        {"m5", 5, 1, {}, false},
        {"m8", 8, 1, {}, false},
        {"m13", 13, 1, {}, false},
        {"batched", 5, 3, {}, false},
        {"batched-shared", 9, 2, {}, true},
        {"grouped", 0, 1, {0, 1, 8, 9, 0, 3, 17}, false},
        {"grouped-decode", 0, 1, {1, 0, 1, 1, 0, 0, 1, 0}, false},
    };
    std::vector<Mode> modes1 = {{"m1", 1, 1, {}, false}, {"batched", 1, 3, {}, false}, {"batched-shared", 1, 2, {}, true}};
    struct Shape {
        int n, k;
    };
    // columns not a multiple of a block's (16 / 8 SwiGLU, 128 / 64 one-row), K ragged against the
    // 256-wide lane stride, FP8 blocks crossed in both n (the up half starts mid-block) and K
    std::vector<Shape> shapes8 = {{37, 264}, {100, 296}, {5, 8}};
    std::vector<Shape> shapes1 = {{37, 264}, {300, 1000}, {130, 8}};
    if (!quick) {
        shapes8.push_back({64, 1032});
        shapes1.push_back({64, 520});
    }
    struct Feat {
        bool bias, acc, norm, arows, badrow;
        float eps;
    };
    std::vector<Feat> feats = {
        {false, false, false, false, false, 1e-6f}, {true, true, false, false, false, 1e-6f},
        {false, false, true, false, false, 1e-6f},  {false, false, false, true, false, 1e-6f},
        {true, false, true, true, false, 1e-6f},    {false, false, true, true, true, 0.5f},
    };
    for (const Kernel& kn : KERNELS) {
        const auto& modes = kn.rows == 1 ? modes1 : modes8;
        const auto& shapes = kn.rows == 1 ? shapes1 : shapes8;
        int before = g_cases;
        for (const Shape& sh : shapes)
            for (const Mode& md : modes)
                for (const Feat& ft : feats) {
                    if (kn.swiglu && ft.acc) continue;  // the launcher refuses accumulate with SwiGLU
                    if (quick && ft.bias && !ft.norm && &sh != &shapes[0]) continue;
                    Problem p;
                    p.n = sh.n;
                    p.k = sh.k;
                    p.bias = ft.bias;
                    p.accumulate = ft.acc;
                    p.norm = ft.norm;
                    p.eps = ft.eps;
                    if (!md.counts.empty()) {
                        p.grouped = true;
                        p.counts = md.counts;
                        p.wgroups = (int)md.counts.size();
                        p.m = 0;
                        for (int c : md.counts) p.m += c;
                        p.m += 2;  // rows past the last group: never written
                        p.batch = 1;
                    } else {
                        p.m = md.m;
                        p.batch = md.batch;
                        p.wgroups = md.shared_w ? 1 : md.batch;
                    }
                    // strides: batched operands interleaved per row (MLA's head layout), padded
                    // rows (lda > k), C rows with a tail and batches with gaps
                    const bool batched = !p.grouped && p.batch > 1;
                    p.lda = batched ? p.batch * (p.k + 8) : p.k + 16;
                    p.stride_a = batched ? p.k + 8 : 0;
                    p.a_off = 8;
                    p.ldc = batched ? p.batch * (p.n + 3) : p.n + 5;
                    p.stride_c = batched ? p.n + 3 : 0;
                    p.c_off = 2;
                    p.src_m = p.m;
                    if (ft.arows) {
                        // a permutation with repeats of a smaller source (MoE: tokens into
                        // expert-ordered rows), optionally one index out of range each way
                        p.src_m = std::max(1, p.m / 2 + 1);
                        for (int r = 0; r < p.m; r++) p.a_rows.push_back(randint(0, p.src_m - 1));
                        if (ft.badrow && p.m >= 2) {
                            p.a_rows[p.m / 2] = p.src_m;
                            p.a_rows[0] = -1;
                        } else if (ft.badrow) {
                            p.a_rows[0] = p.src_m;
                        }
                    }
                    Data d = make_data(kn, p);
                    std::string what = describe(kn, p) + " [" + md.name + "]";
                    std::vector<uint32_t> out = run_checked(kn, p, d, what);
                    if (ft.arows) check_gather_equivalence(kn, p, d, out);
                    if (kn.swiglu) check_swiglu_equivalence(kn, p, d, out);
                    if (ft.norm && !ft.arows) check_norm_vs_unfused(kn, p, d, out);
                    // one row: the 1-row kernel = the 8-row kernel, bit for bit
                    if (kn.rows == 1) {
                        std::string eight = std::string(kn.name).replace(0, std::strlen("gemm_skinny1"), "gemm_skinny");
                        exact_eq(out, run_checked(kernel(eight), p, d, what + " (8-row form)"), d.c, what + " vs the 8-row form");
                    }
                }
        std::printf("%-26s %4d cases ok\n", kn.name, g_cases - before);
        std::fflush(stdout);
    }
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    stack_t ss;
    ss.ss_sp = std::malloc(1 << 16);
    ss.ss_size = 1 << 16;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa {};
    sa.sa_handler = on_segv;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    run_all(quick);
    std::printf("folded RMSNorm vs rmsnorm + GEMM in f32: largest difference %.3g of the sum of |products|\n",
                g_norm_f32_worst);
    std::printf("skinny GEMMs: %d runs, %lld outputs checked against the f64 reference, %lld warp shuffles: all match\n",
                g_cases, g_checked, emu::collectives);
    return 0;
}
