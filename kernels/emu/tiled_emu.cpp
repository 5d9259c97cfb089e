// CPU emulation of the tiled bf16 tensor-core GEMMs (kernels/cuda/gemm.cu, gemm_mma_*): the NT
// (C = A·Wᵀ), NN (C = A·B) and TN (C = Aᵀ·B) layouts, every block tile (128x256, 128x128, 64x128),
// the cp.async path and the element-by-element path for unaligned operands, plain, batched with
// strides, grouped by rows (NT/NN, moe_plan's 64-row tiles, empty and ragged groups) and grouped
// by K (TN: one C per group, empty groups give 0), bias, accumulate, bf16 and f32 C, ragged m, n
// and k — against an f64 reference, without a GPU:
//
//   bash kernels/emu/run.sh tiled          (--quick for the short list CI runs)
//
// The real gemm.cu runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread,
// ldmatrix / mma.sync / cp.async evaluated as the PTX ISA defines them, cp.async copies deferred
// to the wait_group that covers them, shared memory poisoned with NaN before every block and a
// canary past the launcher's size). Blocks run one after another over the grid the launcher
// (kernels/src/ops/gemm.rs, mma_choice) computes, mirrored below. Every buffer sits against a
// PROT_NONE guard page (an out-of-bounds access faults and is reported), cp.async sources must lie
// in the operand buffers, and every C element the kernel does not own (row tails past n, batch
// gaps, rows of no group) carries a sentinel that must survive.
// Timing means nothing here.
#include <emu.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

// Shared-memory bank conflicts of ldmatrix: every call is recorded per lane (two slots by call
// parity: a lane can be at most one collective ahead of lane 0, which checks the call once the
// warp has completed it). A phase of 8 row addresses is conflict-free when the 16-byte bank
// groups ((addr / 16) % 8) of its distinct addresses differ.
namespace bank {
static uint32_t rec[emu::MAXT / 32][2][32];
static int calls[emu::MAXT];
static long long checked = 0, conflicts = 0;
template <typename R, typename F>
inline void wrap(uint32_t addr, R& r, F real) {
    const int t = emu::cur, w = t >> 5, l = t & 31, c = calls[t]++ & 1;
    rec[w][c][l] = addr;
    real(addr, r);
    if (l != 0) return;
    for (int ph = 0; ph < 4; ph++) {
        checked++;
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < i; j++) {
                const uint32_t a = rec[w][c][8 * ph + i], b = rec[w][c][8 * ph + j];
                if (a != b && (a / 16) % 8 == (b / 16) % 8) {
                    conflicts++;
                    i = j = 8;  // one per phase
                }
            }
    }
}
}  // namespace bank
inline void ldsm_x4_checked(uint32_t a, uint32_t (&r)[4]) {
    bank::wrap(a, r, [](uint32_t x, uint32_t(&y)[4]) { ldsm_x4(x, y); });
}
inline void ldsm_x4_t_checked(uint32_t a, uint32_t (&r)[4]) {
    bank::wrap(a, r, [](uint32_t x, uint32_t(&y)[4]) { ldsm_x4_t(x, y); });
}
#define ldsm_x4 ldsm_x4_checked
#define ldsm_x4_t ldsm_x4_t_checked
#include "../cuda/gemm.cu"
#undef ldsm_x4
#undef ldsm_x4_t

// ---- guarded memory: the buffer ends (16-byte padded) at a PROT_NONE page, another precedes it
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
        data = base + pg + body - (n + 15) / 16 * 16;
        std::memset(base + pg, 0xff, body);  // padding reads as NaN if touched
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

static uint16_t b16(float f) { return __float2bfloat16_rn(f).bits; }
static float f16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

enum Layout { NT, NN, TN };
static const char* lay_name(Layout l) { return l == NT ? "NT" : l == NN ? "NN" : "TN"; }

struct Problem {
    Layout lay;
    int m, n, k;
    int batch = 1;
    std::vector<int> counts;  // grouped: rows (NT/NN) or K rows (TN) per group
    int lda = 0, ldb = 0, ldc = 0;  // 0: dense
    long long stride_a = 0, stride_b = 0, stride_c = 0;  // 0: dense (batched / grouped weights)
    int a_off = 0, c_off = 0;
    bool bias = false, accumulate = false, f32c = false;
    char cfg = 0;  // 'l' / 's': force a tile (0: the launcher's choice)
};

// The launcher's rules (kernels/src/ops/gemm.rs): tile by grid fill (grouped rows: 64-row tiles),
// 16-byte loads when every row start and chunk of both operands is 16-byte aligned.
static const int SMS = 132;
struct Launch {
    void (*fn)(GemmArgs);
    int bm, bn;
    size_t smem;
    const char* name;
};
static size_t mma_smem(int bm, int bn) {
    return std::max<size_t>((size_t)GM_STAGES * (bm + bn) * GBK * 2, (size_t)bm * (bn + 8) * 4);  // Tile::smem
}
static Launch pick(const Problem& p) {
    const bool grouped_rows = !p.counts.empty() && p.lay != TN;
    const int blocks = std::max(p.batch, (int)p.counts.size());
    auto tiles = [&](int bm, int bn) { return ((p.m + bm - 1) / bm) * ((p.n + bn - 1) / bn) * blocks; };
    int t = tiles(128, 256) >= SMS ? 0 : tiles(128, 128) >= SMS ? 1 : 2;  // w, l, s
    if (grouped_rows) t = 2;
    if (p.cfg == 'w') t = 0;
    if (p.cfg == 'l') t = 1;
    if (p.cfg == 's') t = 2;
    if (grouped_rows && t != 2) fail("grouped rows run in 64-row tiles only");
    const int bm = t == 2 ? 64 : 128, bn = t == 0 ? 256 : 128;
    static void (*const fns[3][3])(GemmArgs) = {{gemm_mma_nt_w, gemm_mma_nt_l, gemm_mma_nt_s},
                                                {gemm_mma_nn_w, gemm_mma_nn_l, gemm_mma_nn_s},
                                                {gemm_mma_tn_w, gemm_mma_tn_l, gemm_mma_tn_s}};
    static const char* names[3][3] = {
        {"nt_w", "nt_l", "nt_s"}, {"nn_w", "nn_l", "nn_s"}, {"tn_w", "tn_l", "tn_s"}};
    return {fns[p.lay][t], bm, bn, mma_smem(bm, bn), names[p.lay][t]};
}

struct Run {
    Problem p;
    int lda, ldb, ldc;
    long long sa, sb, sc;
    int groups = 0, ktot = 0;  // grouped
    std::vector<int> ro, to;
    size_t a_len, b_len, c_len;
    std::vector<uint16_t> A, B;
    std::vector<float> bias, prev;
};

static std::mt19937 rng(7);
static float randn() { return std::normal_distribution<float>()(rng); }

static Run make(const Problem& p) {
    Run r;
    r.p = p;
    const bool g = !p.counts.empty();
    r.groups = (int)p.counts.size();
    if (g) {
        r.ro.push_back(0);
        r.to.push_back(0);
        for (int c : p.counts) {
            r.ro.push_back(r.ro.back() + c);
            r.to.push_back(r.to.back() + (c + GEMM_BM - 1) / GEMM_BM);
        }
    }
    // dims of the stored operands: A [ar][ac], B [br][bc]
    const int M = p.m, N = p.n, K = p.k;
    const int ktot = g && p.lay == TN ? r.ro.back() : K;
    r.ktot = ktot;
    const int ac = p.lay == TN ? M : K, ar_ = p.lay == TN ? ktot : M;
    const int bc = p.lay == NT ? K : N, br = p.lay == NT ? N : ktot;
    r.lda = p.lda ? p.lda : ac;
    r.ldb = p.ldb ? p.ldb : bc;
    r.ldc = p.ldc ? p.ldc : N;
    const bool per_b = !g;  // batched operands
    r.sa = per_b ? (p.stride_a ? p.stride_a : (long long)ar_ * r.lda) : 0;
    r.sb = p.stride_b ? p.stride_b : (long long)br * r.ldb;  // batched or per group (rows)
    if (g && p.lay == TN) r.sb = 0;
    r.sc = p.stride_c ? p.stride_c : (long long)M * r.ldc;
    if (g && p.lay != TN) r.sc = 0;
    const int nb = g ? 1 : p.batch;
    const int nbw = g ? (p.lay == TN ? 1 : r.groups) : p.batch;
    const int ncb = g && p.lay == TN ? r.groups : nb;
    r.a_len = p.a_off + (size_t)(nb - 1) * r.sa + (size_t)(ar_ - 1) * r.lda + ac;
    r.b_len = (size_t)(nbw - 1) * r.sb + (size_t)(br - 1) * r.ldb + bc;
    r.c_len = p.c_off + (size_t)(ncb - 1) * r.sc + (size_t)(M - 1) * r.ldc + N;
    if (ar_ == 0) r.a_len = p.a_off + 8;  // all groups empty: keep the buffers non-empty
    if (br == 0) r.b_len = 8;
    r.A.resize(r.a_len);
    r.B.resize(r.b_len);
    for (auto& x : r.A) x = b16(randn());
    for (auto& x : r.B) x = b16(randn());
    r.bias.resize(N);
    for (auto& x : r.bias) x = randn();
    r.prev.resize(r.c_len);
    for (auto& x : r.prev) x = p.f32c ? randn() : f16(b16(randn()));
    return r;
}

static const uint32_t SENT32 = 0x7fa00001u;
static const uint16_t SENT16 = 0x7fa1;

// Whether C element `at` belongs to the call, and its (batch-or-group, row, column).
static bool owned(const Run& r, size_t at, int& b, int& row, int& col) {
    const Problem& p = r.p;
    if (at < (size_t)p.c_off) return false;
    size_t e = at - p.c_off;
    const bool g = !p.counts.empty();
    const int ncb = g && p.lay == TN ? r.groups : g ? 1 : p.batch;
    b = r.sc ? (int)(e / r.sc) : 0;
    if (b >= ncb) return false;
    e -= (size_t)b * r.sc;
    row = (int)(e / r.ldc);
    col = (int)(e % r.ldc);
    if (row >= p.m || col >= p.n) return false;
    if (g && p.lay != TN && row >= r.ro.back()) return false;  // rows of no group
    return true;
}

static int g_cases = 0;
static long long g_checked = 0;

static int run_case(const Problem& p) {
    Run r = make(p);
    const bool g = !p.counts.empty();
    const Launch L = pick(p);
    GBuf A(r.a_len * 2), B(r.b_len * 2), C(r.c_len * (p.f32c ? 4 : 2)), bias(p.n * 4 + 4),
        ro(std::max<size_t>(r.ro.size(), 1) * 4), to(std::max<size_t>(r.to.size(), 1) * 4);
    std::memcpy(A.data, r.A.data(), r.a_len * 2);
    std::memcpy(B.data, r.B.data(), r.b_len * 2);
    std::memcpy(bias.data, r.bias.data(), p.n * 4);
    if (g) {
        std::memcpy(ro.data, r.ro.data(), r.ro.size() * 4);
        std::memcpy(to.data, r.to.data(), r.to.size() * 4);
    }
    for (size_t i = 0; i < r.c_len; i++) {
        int b, row, col;
        const bool own = owned(r, i, b, row, col);
        if (p.f32c) {
            uint32_t v = SENT32;
            if (own) std::memcpy(&v, &r.prev[i], 4);
            if (own && !p.accumulate) v = 0x7fc00000u;
            std::memcpy(C.data + 4 * i, &v, 4);
        } else {
            uint16_t v = own ? (p.accumulate ? b16(r.prev[i]) : (uint16_t)0x7fc0) : SENT16;
            std::memcpy(C.data + 2 * i, &v, 2);
        }
    }
    // the launcher: GemmArgs, flags, grid
    GemmArgs a{};
    a.a = A.data + 2 * p.a_off;
    a.w = B.data;
    a.c = C.data + (p.f32c ? 4 : 2) * p.c_off;
    a.bias = p.bias ? (const float*)bias.data : nullptr;
    a.row_offsets = g ? (const int*)ro.data : nullptr;
    a.tile_offsets = g ? (const int*)to.data : nullptr;
    a.stride_a = r.sa;
    a.stride_w = r.sb;
    a.stride_c = r.sc;
    a.m = p.m, a.n = p.n, a.k = p.k;
    a.lda = r.lda, a.ldw = r.ldb, a.ldc = r.ldc;
    a.groups = g ? r.groups : 1;
    a.accumulate = p.accumulate;
    // 16-byte loads: the contiguous dimension of each operand and every row/batch start
    const int a_cont = p.lay == TN ? p.m : p.k, b_cont = p.lay == NT ? p.k : p.n;
    const bool vec = a_cont % 8 == 0 && b_cont % 8 == 0 && r.lda % 8 == 0 && r.ldb % 8 == 0 && p.a_off % 8 == 0 &&
                     r.sa % 8 == 0 && r.sb % 8 == 0;
    a.flags = (vec ? GEMM_VEC : 0) | (p.f32c ? GEMM_F32C : 0);
    unsigned gx = (p.n + L.bn - 1) / L.bn, gy, gz;
    if (g && p.lay != TN) {
        // max_tiles as the session sizes it, over grid y and z as ops::split_yz spreads it (y up to
        // 65535, z the rest; the kernel's tile is blockIdx.y + gridDim.y * blockIdx.z). Capped at 2
        // here so the z spill runs cheaply (y * z past the last tile: those blocks exit).
        const unsigned tiles = (unsigned)((p.m + GEMM_BM - 1) / GEMM_BM + r.groups), cap = 2;
        gy = std::min(tiles, cap);
        gz = (tiles + gy - 1) / gy;
    } else {
        gy = (p.m + L.bm - 1) / L.bm;
        gz = g ? r.groups : p.batch;
    }
    emu::clear_globals();
    emu::allow_global(A.data, r.a_len * 2);
    emu::allow_global(B.data, r.b_len * 2);
    emu::set_grid({gx, gy, gz});
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                emu::begin_smem(L.smem);
                std::memset(bank::calls, 0, sizeof(bank::calls));
                emu::run_block({x, y, z}, GM_THREADS, [&] { L.fn(a); });
                emu::end_smem();
            }
    emu::end_grid();
    // check
    g_cases++;
    int bad = 0;
    double worst = 0;
    const double out_r = p.f32c ? 1e-6 : 1.0 / 256;
    for (size_t i = 0; i < r.c_len; i++) {
        int b, row, col;
        float got;
        uint32_t bits;
        if (p.f32c) {
            std::memcpy(&got, C.data + 4 * i, 4);
            std::memcpy(&bits, &got, 4);
        } else {
            uint16_t h;
            std::memcpy(&h, C.data + 2 * i, 2);
            got = f16(h);
            bits = h;
        }
        if (!owned(r, i, b, row, col)) {
            if (bits != (p.f32c ? SENT32 : SENT16)) {
                if (bad++ < 5) std::fprintf(stderr, "  C element %zu (not the call's) overwritten\n", i);
            }
            continue;
        }
        // the sum over k of op(A)[row, k] · op(B)[k, col]
        int k0 = 0, k1 = p.k;
        long long ab = (long long)b * r.sa, bb = (long long)b * r.sb;
        if (g && p.lay == TN) k0 = r.ro[b], k1 = r.ro[b + 1], ab = bb = 0;
        if (g && p.lay != TN) {
            int e = 0;
            while (r.ro[e + 1] <= row) e++;
            ab = 0;
            bb = (long long)e * r.sb;
        }
        double s = 0, sabs = 0;
        for (int kk = k0; kk < k1; kk++) {
            const double av = f16(r.A[p.a_off + ab + (p.lay == TN ? (long long)kk * r.lda + row : (long long)row * r.lda + kk)]);
            const double bv = f16(r.B[bb + (p.lay == NT ? (long long)col * r.ldb + kk : (long long)kk * r.ldb + col)]);
            s += av * bv;
            sabs += std::fabs(av * bv);
        }
        double tol = 1e-5 * sabs;
        if (p.bias) s += r.bias[col], tol += 1e-6 * std::fabs(r.bias[col]);
        if (p.accumulate) {
            const double pv = p.f32c ? r.prev[i] : f16(b16(r.prev[i]));
            s += pv;
            tol += 1e-6 * std::fabs(pv);
        }
        tol += out_r * std::fabs(s) + 1e-30;
        const double err = std::fabs((double)got - s);
        g_checked++;
        if (!(err <= tol)) {
            if (bad++ < 5)
                std::fprintf(stderr, "  batch/group %d row %d col %d: got %.9g want %.9g (tol %.3g)\n", b, row, col, got,
                             s, tol);
            worst = INFINITY;
        } else {
            worst = std::max(worst, err / (tol > 0 ? tol : 1));
        }
    }
    std::printf("%-5s %s %4dx%-4dx%-4d", L.name, lay_name(p.lay), p.m, p.n, p.k);
    if (p.batch > 1) std::printf(" batch %d", p.batch);
    if (g) {
        std::printf(" groups");
        for (int c : p.counts) std::printf(" %d", c);
    }
    std::printf("%s%s%s%s ld %d/%d/%d%s: worst err/tol %.3f%s\n", p.bias ? " bias" : "", p.accumulate ? " acc" : "",
                p.f32c ? " ->f32" : " ->bf16", (a.flags & GEMM_VEC) ? " cp.async" : " scalar", r.lda, r.ldb, r.ldc,
                p.c_off ? " c_off" : "", worst, bad ? "  FAILED" : "");
    std::fflush(stdout);
    return bad;
}

int main(int argc, char** argv) {
    // every case is cheap (whole warps' mma.sync at once): --quick runs the same list (~2 s)
    (void)argc, (void)argv;
    const bool quick = false;
    signal(SIGSEGV, on_segv);
    signal(SIGBUS, on_segv);
    int bad = 0;
    for (Layout lay : {NT, NN, TN}) {
        // both tiles, ragged in m, n and k, bias + accumulate, bf16 and f32 C, padded rows of C
        Problem p{lay, 152, 136, 72};
        p.cfg = 'l';
        p.bias = true;
        p.accumulate = true;
        p.f32c = true;
        p.ldc = 144;
        bad += run_case(p);
        p.cfg = 'w';
        p.n = 264;  // ragged against 256 columns
        p.ldc = 270;
        p.f32c = lay == TN;
        bad += run_case(p);
        p.cfg = 's';
        p.f32c = false;
        p.accumulate = false;
        p.m = 72, p.n = 200, p.k = 40;
        p.ldc = 0;
        bad += run_case(p);
        // the element-by-element path: a K (NT/NN) or an M/N (TN) not a multiple of 8
        Problem q{lay, 67, 133, 45};
        q.cfg = 's';
        q.f32c = true;
        q.accumulate = true;
        bad += run_case(q);
        // batched with strides (operands inside wider rows, C with gaps between batches)
        Problem bt{lay, 40, 48, 64};
        bt.batch = 3;
        bt.lda = lay == TN ? 56 : 80;
        bt.ldb = lay == NT ? 72 : 64;
        bt.ldc = 56;
        bt.stride_c = 40 * 56 + 24;
        bt.a_off = 8;
        bt.c_off = 3;
        bt.bias = true;
        bad += run_case(bt);
        // grouped: rows (NT/NN: empty, 1 row, a whole 64-row tile, a tile + 1, empty, 3) or K
        // rows (TN: empty and ragged groups, one C per group)
        Problem gp{lay, lay == TN ? 72 : 0, 80, lay == TN ? 0 : 48};
        gp.counts = lay == TN ? std::vector<int>{0, 5, 40, 0, 33} : std::vector<int>{0, 1, 64, 65, 0, 3};
        if (lay != TN) {
            for (int c : gp.counts) gp.m += c;
            gp.m += 5;  // rows past the last group: not the call's
        }
        gp.f32c = true;
        gp.accumulate = lay == TN;  // the gradient use: accumulate into f32
        gp.bias = lay != TN;
        bad += run_case(gp);
        // more row tiles than a raster band (8): bands of 8, 8, 2 (64-row tiles) and 8, 1 (128), ragged
        for (char cfg : {'s', 'l', 'w'}) {
            if (quick && (lay != NT || cfg != 's')) continue;
            Problem tall{lay, 1096, 264, 32};
            tall.cfg = cfg;
            bad += run_case(tall);
        }
        if (!quick) {
            Problem big{lay, 300, 520, 200};
            big.cfg = 'w';
            big.bias = true;
            bad += run_case(big);
            Problem odd{lay, 129, 129, 33};
            odd.cfg = 'l';
            odd.f32c = true;
            odd.ldc = 131;
            bad += run_case(odd);
            Problem tiny{lay, 1, 1, 1};
            bad += run_case(tiny);
            Problem gq = gp;
            gq.f32c = false;
            gq.accumulate = !gp.accumulate;
            bad += run_case(gq);
        }
    }
    std::printf("%d cases, %lld outputs: %s\n", g_cases, g_checked,
                bad ? "FAILED" : "all match the f64 reference, sentinels intact");
    std::printf("ldmatrix: %lld phases, %lld with a shared-memory bank conflict\n", bank::checked, bank::conflicts);
    if (bank::conflicts) bad++;
    return bad ? 1 : 0;
}
