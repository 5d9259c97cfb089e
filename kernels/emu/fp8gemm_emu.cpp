// CPU emulation of the FP8 GEMMs of DeepSeek's training recipe (kernels/cuda/fp8gemm.cu): the
// sm_90a wgmma kernels (fp8_gemm_wgmma_*: m64n128k32 e4m3 from no-swizzle K-major shared-memory
// descriptors; fp8_gemm_wgmma2_*: the pipelined form, 2 warpgroups fed by a 4-stage cp.async ring,
// on the cases its 16-byte alignment admits; fp8_gemm_tma_*: TMA boxes with the 128-byte swizzle
// into an mbarrier ring, a producer warp, persistent blocks — 1 to 4 of them, so blocks walk
// several tiles — on include/tma_emu.h, where its 16-byte leading dimensions admit, also with
// split-K and its reduce pass on the dense cases, and K-grouped over 128-aligned expert token
// segments with empty experts, run_kgrouped; and with the TMA-store epilogue on the bf16 cases it
// admits, its D bit for bit the register epilogue's) and the SIMT form (fp8_gemm_simt_*), bf16 and f32 D, in the recipe's three forms —
// Fprop/Dgrad (A 1x128 x B 128x128 blocks), Wgrad (1x128 x 1x128 along K, f32 D, accumulate) and
// grouped-contiguous (MoE: moe_plan's 64-row tiles, empty and ragged groups) — with ragged m, n
// and k (k not a multiple of 16 included), padded leading dimensions and both scale layouts, against
// an f64 reference of the promoted product (core/src/fp8/gemm.rs: per 128-K group the exact
// products summed, times sa·sb, added into the f32 result), without a GPU:
//
//   bash kernels/emu/run.sh fp8gemm          (--quick for the short list CI runs)
//
// The real fp8gemm.cu runs on the emulator's runtime (include/emu.h, a fiber per CUDA thread) with
// the wgmma helpers of kernels/cuda/wgmma.cuh replaced by include/wgmma_emu.h (warpgroup
// collectives, descriptors decoded as the PTX ISA defines them, results landing at wait_group,
// accumulators poisoned while in flight, operands checked unchanged). fp8_gemm_wgmma_* was
// verified on an H100, so its agreement here validates the emulated wgmma modes it uses. Buffers
// sit against PROT_NONE guard pages; every D element a call does not own carries a sentinel that
// must survive; cp.async copies land at their wait in half the blocks and also at issue in the
// other half (a ring slot refilled too early shows). Every case also runs with Hopper's limited (14-bit) accumulator model, where the
// error grows but stays within the recipe's bound. Timing means nothing here.
#include <emu.h>
#include <wgmma_emu.h>
#include <tma_emu.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#define __CUDA_ARCH_FEAT_SM90_ALL 1
#include "../cuda/fp8gemm.cu"

// ---- guarded memory: the buffer ends (16-byte padded) at a PROT_NONE page, another precedes it
// A pointer into a buffer, read as typed elements (D at an offset into its GBuf).
struct BufAt {
    unsigned char* data;
    template <typename T>
    T* as() {
        return (T*)data;
    }
};

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
        std::memset(base + pg, 0xff, body);
    }
    GBuf(const GBuf&) = delete;
    GBuf& operator=(const GBuf&) = delete;
    ~GBuf() { munmap(base, maplen); }
    template <typename T>
    T* as() {
        return (T*)data;
    }
};
static void on_segv(int) {
    const char m[] = "EMU FAILURE: out-of-bounds access (a guard page was touched)\n";
    ssize_t r = write(2, m, sizeof(m) - 1);
    (void)r;
    _exit(1);
}

struct Problem {
    const char* name;
    int m, n, k;
    bool b_block;      // 128x128 B scales (Fprop/Dgrad); else one per row of B (Wgrad)
    bool f32d, accumulate;
    std::vector<int> counts;  // grouped-contiguous: rows per group (empty: dense)
    int lda_pad = 0, ldb_pad = 0, ldd_pad = 3;
    bool sa_mcontig = true;   // A scales M-contiguous (sa_rs 1, sa_ks m) or row-major
    int d_off = 0;            // D starts this many elements into its buffer (a gradient arena's slice)
};

enum Which { SIMT, WGMMA, WGMMA2, TMA, TMA_SPLITK, TMA_STORE, TMA_TAIL };
static const char* which_name[] = {"simt", "wgmma", "wgmma2", "tma", "tma-splitk", "tma-store", "tma-tail"};

// the launcher's rule for fp8_gemm_wgmma2 (kernels/src/ops/fp8.rs): 16-byte cp.async of every chunk
static bool v2_ok(const Problem& P) {
    const int ldb = P.k + P.ldb_pad, n = P.n;
    const long long stride_b = (long long)n * ldb + 32;
    return P.k % 16 == 0 && (P.k + P.lda_pad) % 16 == 0 && ldb % 16 == 0 && (P.counts.empty() || stride_b % 16 == 0);
}
// the launcher's rule for fp8_gemm_tma (tma_fits): TMA's 16-byte global strides (k may be ragged)
static bool tma_ok(const Problem& P) {
    const int ldb = P.k + P.ldb_pad, n = P.n;
    const long long stride_b = (long long)n * ldb + 32;
    return (P.k + P.lda_pad) % 16 == 0 && ldb % 16 == 0 && (P.counts.empty() || stride_b % 16 == 0);
}
// the launcher's rule for fp8_gemm_tma's TMA-store epilogue: bf16 D written (not accumulated),
// 16-byte aligned, rows a multiple of 16 bytes apart
static bool tma_store_ok(const Problem& P) {
    return tma_ok(P) && !P.f32d && !P.accumulate && (P.n + P.ldd_pad) % 8 == 0 && P.d_off % 8 == 0;
}
static int tma_sms = 3;  // persistent blocks (the launcher: min(tiles, SMs)); cases vary it

// The SM counts for which the launcher's split_plan (kernels/src/ops/fp8_tma.rs) may split the
// last wave of `tiles` block tiles of `kg` K groups (TailSplit::Always; Auto also weighs the
// partials' cost): tiles % sms in [1, sms / 2] and room for at least 2 splits of at least 2 K
// groups (min(sms / left, kg / 2, 16), the most it may pick, which the tma-tail case runs).
static std::vector<int> tail_sms(int tiles, int kg) {
    std::vector<int> v;
    for (int s = 2; s < tiles; s++) {
        const int left = tiles % s;
        if (left > 0 && 2 * left <= s && std::min({s / left, kg / 2, 16}) >= 2) v.push_back(s);
    }
    return v;
}

// fp8_gemm_tma's persistent blocks 0..grid-1, each on fresh (NaN) shared memory, with the wgmma and
// TMA/mbarrier end-of-block checks; TMA boxes land at the wait, in odd blocks also at issue.
static void run_tma(void (*kernel)(Fp8TmaArgs), const Fp8TmaArgs& q, unsigned grid) {
    emu::set_grid({grid, 1, 1});
    for (unsigned bx = 0; bx < grid; bx++) {
        emu::cp_async_eager = bx & 1;
        emu::begin_smem(FP8T_SMEM);
        wg_emu::begin_block();
        emu_tma::begin_block();
        emu::run_block({bx, 0, 0}, FP8T_THREADS, [&] { kernel(q); });
        emu_tma::end_block();
        wg_emu::end_block();
        emu::end_smem();
    }
    emu::end_grid();
}

struct Result {
    double worst = 0;  // max |err| / bound
    long long checked = 0;
};

static Result run(const Problem& P, Which which, std::mt19937& rng) {
    const int m = P.m, n = P.n, k = P.k, kg = (k + 127) / 128;
    const int groups = P.counts.empty() ? 1 : (int)P.counts.size();
    const int lda = k + P.lda_pad, ldb = k + P.ldb_pad, ldd = n + P.ldd_pad;
    const int b_rows = P.b_block ? (n + 127) / 128 : n;
    const long long stride_b = (long long)n * ldb + 32, stride_sb = (long long)b_rows * kg + 1;
    std::uniform_int_distribution<int> code(0, 253);
    auto rcode = [&]() { int c = code(rng); return (uint8_t)(c >= 0x7f ? c + 1 : c); };  // no NaN codes
    std::uniform_real_distribution<float> u(0.5f, 2.0f);
    std::uniform_int_distribution<int> ex(-12, 2);
    auto rscale = [&]() { return std::ldexp(u(rng), ex(rng)); };

    GBuf A((size_t)m * lda), B((size_t)groups * stride_b), SA((size_t)m * kg * 4), SB((size_t)groups * stride_sb * 4);
    const size_t esz = P.f32d ? 4 : 2;
    GBuf Dbuf(((size_t)m * ldd + P.d_off) * esz);
    BufAt D{Dbuf.data + P.d_off * esz};
    for (size_t i = 0; i < A.bytes; i++) A.data[i] = rcode();
    for (size_t i = 0; i < B.bytes; i++) B.data[i] = rcode();
    for (size_t i = 0; i < SA.bytes / 4; i++) SA.as<float>()[i] = rscale();
    for (size_t i = 0; i < SB.bytes / 4; i++) SB.as<float>()[i] = rscale();
    const long long sa_rs = P.sa_mcontig ? 1 : kg, sa_ks = P.sa_mcontig ? m : 1;
    const long long sb_rs = kg, sb_ks = 1;
    // D: random initial values (accumulate) and sentinels where the call owns nothing
    std::vector<int> owner(m, 0), row_offsets(groups + 1, 0), tile_offsets(groups + 1, 0);
    if (!P.counts.empty()) {
        for (int g = 0; g < groups; g++) {
            row_offsets[g + 1] = row_offsets[g] + P.counts[g];
            tile_offsets[g + 1] = tile_offsets[g] + (P.counts[g] + 63) / 64;
            for (int r = row_offsets[g]; r < row_offsets[g + 1]; r++) owner[r] = g;
        }
        for (int r = row_offsets[groups]; r < m; r++) owner[r] = -1;  // rows past the groups
    }
    const float SENT = 1234.5f;
    std::vector<double> d0((size_t)m * ldd);
    for (int r = 0; r < m; r++)
        for (int c = 0; c < ldd; c++) {
            const bool own = owner[r] >= 0 && c < n;
            const float v = own && P.accumulate ? std::ldexp(u(rng) - 1.25f, ex(rng) + 4) : SENT;
            const size_t i = (size_t)r * ldd + c;
            if (P.f32d) D.as<float>()[i] = v;
            else D.as<bf16>()[i] = __float2bfloat16_rn(v);
            d0[i] = P.f32d ? v : __bfloat162float(__float2bfloat16_rn(v));
        }
    GBuf RO((groups + 1) * 4), TO((groups + 1) * 4);
    std::memcpy(RO.data, row_offsets.data(), RO.bytes);
    std::memcpy(TO.data, tile_offsets.data(), TO.bytes);

    Fp8GemmArgs p{};
    p.a = A.data, p.b = B.data, p.d = D.data, p.sa = SA.as<float>(), p.sb = SB.as<float>();
    p.row_offsets = P.counts.empty() ? nullptr : RO.as<int>();
    p.tile_offsets = P.counts.empty() ? nullptr : TO.as<int>();
    p.stride_b = stride_b, p.stride_sb = stride_sb;
    p.sa_rs = sa_rs, p.sa_ks = sa_ks, p.sb_rs = sb_rs, p.sb_ks = sb_ks;
    p.m = m, p.n = n, p.k = k, p.lda = lda, p.ldb = ldb, p.ldd = ldd;
    p.groups = groups, p.accumulate = P.accumulate, p.b_block = P.b_block;

    // the launcher's grid (kernels/src/ops/fp8.rs): grouped runs over the plan's 64-row tiles
    const int tiles64 = P.counts.empty() ? (m + 63) / 64 : tile_offsets[groups] + 1;  // + 1: an extra block exits
    void (*fn)(Fp8GemmArgs) = nullptr;
    int bn = 0, threads = 0, gy = tiles64;
    size_t smem = 0;
    if (which == SIMT) fn = P.f32d ? fp8_gemm_simt_f32 : fp8_gemm_simt_bf16, bn = 64, threads = 256;
    else if (which == WGMMA) fn = P.f32d ? fp8_gemm_wgmma_f32 : fp8_gemm_wgmma_bf16, bn = 128, threads = 128;
    else {
        fn = P.f32d ? fp8_gemm_wgmma2_f32 : fp8_gemm_wgmma2_bf16, bn = 128, threads = 256;
        gy = (tiles64 + 1) / 2, smem = FP8V2_SMEM;
        emu::allow_global(A.data, A.bytes);  // cp.async may read the operands only
        emu::allow_global(B.data, B.bytes);
    }
    if (which == TMA || which == TMA_SPLITK || which == TMA_STORE || which == TMA_TAIL) {
        // the launcher (kernels/src/ops/fp8.rs): tensor maps of A [m, k] and B [groups, n, k]
        // (128 x 64 and 128 x 128 boxes, 128B swizzle), min(block tiles, SMs) persistent blocks
        Fp8TmaArgs q{};
        const long long da[2] = {k, m}, sa_[1] = {lda}, ba[2] = {128, 64};
        const long long db[3] = {k, n, groups}, sb_[2] = {ldb, stride_b}, bb[3] = {128, 128, 1};
        q.ta = emu_tma::encode(A.data, 2, da, sa_, ba, true);
        q.tb = emu_tma::encode(B.data, 3, db, sb_, bb, true);
        q.p = p;
        // split-K (dense only, as the launcher): 2..4 splits of the K groups, partials in a work buffer
        const int splits = which == TMA_SPLITK ? std::min(kg, 2 + (int)(rng() % 3)) : 1;
        GBuf W((size_t)splits * m * n * 4);
        for (size_t i = 0; i < W.bytes / 4; i++) W.as<float>()[i] = NAN;  // every partial must be written
        q.work = W.as<float>(), q.splits = splits;
        emu::allow_global(A.data, A.bytes);  // TMA may read the operands only
        emu::allow_global(B.data, B.bytes);
        // D through the TMA store's tensor map (uint8 dims {2n, m}, stride 2·ldd, box {128, 64})
        auto store_into = [&](Fp8TmaArgs& qq, unsigned char* d) {
            const long long dd[2] = {2ll * n, m}, sd[1] = {2ll * ldd}, bd[2] = {128, 64};
            qq.td = emu_tma::encode(d, 2, dd, sd, bd, true);
            qq.store_d = 1;
        };
        if (which == TMA_STORE || (which == TMA_TAIL && tma_store_ok(P))) {
            store_into(q, D.data);
            emu::allow_global(Dbuf.data, Dbuf.bytes);
        }
        if (which == TMA_TAIL) {
            // the last wave's tiles split along K (split_plan on a GPU of `sms` SMs), the others
            // whole: each tile's D bit for bit that of the same kernel splitting every tile
            // `splits` ways (split tiles) or none (whole ones)
            const int mtiles = (tiles64 + 1) / 2, ntiles = (n + 127) / 128, T = mtiles * ntiles;
            const std::vector<int> cands = tail_sms(T, kg);
            if (cands.empty()) fail(std::string(P.name) + ": no SM count splits a last wave");
            const int sms = cands[rng() % cands.size()], left = T % sms;
            const int splits = std::min({sms / left, kg / 2, 16}), split_from = T - left;
            std::vector<int> cnt(2 * T, 0);
            GBuf Dw(Dbuf.bytes), Ds(Dbuf.bytes);
            std::memcpy(Dw.data, Dbuf.data, Dbuf.bytes);
            std::memcpy(Ds.data, Dbuf.data, Dbuf.bytes);
            emu::allow_global(Dw.data, Dw.bytes);
            emu::allow_global(Ds.data, Ds.bytes);
            auto run_plan = [&](unsigned char* dbase, int from, int sp) {
                Fp8TmaArgs qq = q;
                qq.p.d = dbase + P.d_off * esz;
                if (q.store_d) store_into(qq, dbase + P.d_off * esz);
                GBuf Wk((size_t)(T - from) * sp * 16384 * 4);
                for (size_t i = 0; i < Wk.bytes / 4; i++) Wk.as<float>()[i] = NAN;
                qq.splits = sp, qq.split_from = from, qq.work = Wk.as<float>(), qq.counters = cnt.data();
                const int units = from + (T - from) * sp;
                run_tma(P.f32d ? fp8_gemm_tma_f32 : fp8_gemm_tma_bf16, qq, (unsigned)std::min(units, sms));
                for (int c : cnt)
                    if (c != 0) fail(std::string(P.name) + ": a split-K counter left at " + std::to_string(c));
            };
            run_plan(Dw.data, 0, 1);
            run_plan(Ds.data, 0, splits);
            run_plan(Dbuf.data, split_from, splits);
            int wrong = 0;
            for (int t = 0; t < T; t++) {
                int mt, nt;
                tma_raster(t, mtiles, ntiles, mt, nt);
                const unsigned char* want = t >= split_from ? Ds.data : Dw.data;
                for (int r = mt * 128; r < std::min(m, mt * 128 + 128); r++)
                    for (int c = nt * 128; c < std::min(n, nt * 128 + 128); c++) {
                        const size_t o = ((size_t)r * ldd + c + P.d_off) * esz;
                        if (std::memcmp(Dbuf.data + o, want + o, esz) != 0 && wrong++ < 5)
                            std::fprintf(stderr, "  D[%d][%d] of tile %d (%s) differs\n", r, c, t,
                                         t >= split_from ? "split" : "whole");
                    }
            }
            if (wrong)
                fail(std::string(P.name) + ": " + std::to_string(wrong) + " D elements of the tail-split walk (" +
                     std::to_string(T) + " tiles on " + std::to_string(sms) + " SMs, " + std::to_string(left) + " x " +
                     std::to_string(splits) + " split) differ from the uniform walks'");
            std::printf("  tail split: %d tiles on %d SMs: %d whole + %d x %d splits\n", T, sms, split_from, left, splits);
        } else {
        const int block_tiles = (tiles64 + 1) / 2 * ((n + 127) / 128) * splits;
        const unsigned grid = (unsigned)std::max(1, std::min(block_tiles, tma_sms));
        // the register epilogue's D (TMA_STORE) or the in-kernel split-K sum's (TMA_SPLITK), to compare
        const bool twice = which == TMA_STORE || (which == TMA_SPLITK && splits > 1);
        GBuf D2(twice ? Dbuf.bytes : 0);
        if (twice) std::memcpy(D2.data, Dbuf.data, Dbuf.bytes);
        run_tma(P.f32d ? fp8_gemm_tma_f32 : fp8_gemm_tma_bf16, q, grid);
        if (which == TMA_STORE) {  // the same kernel storing from registers: bit for bit the same D
            Fp8TmaArgs q2 = q;
            q2.store_d = 0;
            q2.p.d = D2.data + P.d_off * esz;
            emu::allow_global(D2.data, D2.bytes);
            run_tma(fp8_gemm_tma_bf16, q2, grid);
            if (std::memcmp(D2.data, Dbuf.data, Dbuf.bytes) != 0)
                fail(std::string(P.name) + ": the TMA-store epilogue's D differs from the register epilogue's");
        }
        if (splits > 1) {  // the reduce pass: 2 blocks of 64 threads, grid-stride
            emu::launch({2, 1, 1}, 64, [&] {
                if (P.f32d) fp8_splitk_reduce_f32(q.work, splits, m, n, D.as<float>(), ldd, P.accumulate);
                else fp8_splitk_reduce_bf16(q.work, splits, m, n, D.as<bf16>(), ldd, P.accumulate);
            });
            // the same splits summed inside the GEMM (per-tile arrival counters, re-armed): the
            // same D bit for bit, and the counters back at zero
            // (their partials: a 128 x 128 slab per tile and split)
            Fp8TmaArgs q2 = q;
            q2.p.d = D2.data + P.d_off * esz;
            std::vector<int> cnt(2 * block_tiles / splits, 0);
            q2.counters = cnt.data();
            GBuf W2((size_t)block_tiles * 16384 * 4);
            for (size_t i = 0; i < W2.bytes / 4; i++) W2.as<float>()[i] = NAN;
            q2.work = W2.as<float>();
            run_tma(P.f32d ? fp8_gemm_tma_f32 : fp8_gemm_tma_bf16, q2, grid);
            if (std::memcmp(D2.data, Dbuf.data, Dbuf.bytes) != 0)
                fail(std::string(P.name) + ": the in-kernel split-K sum differs from fp8_splitk_reduce's");
            for (int c : cnt)
                if (c != 0) fail(std::string(P.name) + ": a split-K counter left at " + std::to_string(c));
        }
        }
    } else {
    // the row tiles over grid y and z (ops::split_yz: y up to 65535, z the rest; the kernels' tile is
    // blockIdx.y + gridDim.y * blockIdx.z). Grouped cases cap y at 3 here so z > 1 runs cheaply.
    const unsigned cap = P.counts.empty() ? 65535u : 3u;
    const unsigned gyy = std::min((unsigned)gy, cap), gz = (gy + gyy - 1) / gyy;
    emu::set_grid({(unsigned)((n + bn - 1) / bn), gyy, gz});
    for (unsigned bz = 0; bz < gz; bz++)
        for (unsigned by = 0; by < gyy; by++)
            for (int bx = 0; bx < (n + bn - 1) / bn; bx++) {
                emu::cp_async_eager = (bx + by + bz) & 1;  // both cp.async timings, alternating by block
                emu::begin_smem(smem);  // NaN (E4M3 0xff) before every block
                wg_emu::begin_block();
                emu::run_block({(unsigned)bx, by, bz}, threads, [&] { fn(p); });
                wg_emu::end_block();
                emu::end_smem();
            }
    }
    emu::end_grid();
    emu::clear_globals();
    emu::cp_async_eager = false;

    // f64 reference of the promoted product and the error bound
    auto dec = [](uint8_t c) { return wg_emu::e4m3(c); };
    Result res;
    const double tol = wg_emu::acc_bits ? std::ldexp(1.0, -(wg_emu::acc_bits - 5)) : 3e-6;
    int bad = 0;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < ldd; c++) {
            const size_t i = (size_t)r * ldd + c;
            const double got = P.f32d ? D.as<float>()[i] : __bfloat162float(D.as<bf16>()[i]);
            const int g = owner[r];
            if (g < 0 || c >= n) {
                if (got != d0[i]) {
                    if (bad++ < 5) std::fprintf(stderr, "  D[%d][%d] (not the call's) overwritten: %g\n", r, c, got);
                }
                continue;
            }
            const uint8_t* Bg = B.data + g * stride_b;
            const float* SBg = SB.as<float>() + g * stride_sb;
            double ref = P.accumulate ? d0[i] : 0.0, bound = std::fabs(ref);
            for (int kb = 0; kb < kg; kb++) {
                double part = 0, apart = 0;
                for (int kk = kb * 128; kk < std::min(k, kb * 128 + 128); kk++) {
                    const double pr = dec(A.data[(size_t)r * lda + kk]) * dec(Bg[(size_t)c * ldb + kk]);
                    part += pr, apart += std::fabs(pr);
                }
                const double s = (double)SA.as<float>()[r * sa_rs + kb * sa_ks] *
                                 SBg[(P.b_block ? c / 128 : c) * sb_rs + kb * sb_ks];
                ref += s * part, bound += s * apart;
            }
            double lim = tol * bound + 1e-30;
            if (!P.f32d) lim += std::ldexp(std::fabs(ref), -8);
            const double e = std::fabs(got - ref) / lim;
            if (!(e <= 1.0)) {
                if (bad++ < 5) std::fprintf(stderr, "  D[%d][%d]: got %.9g want %.9g (bound %.3g)\n", r, c, got, ref, lim);
            }
            res.worst = std::max(res.worst, std::isnan(e) ? 1e30 : e);
            res.checked++;
        }
    if (bad) fail(std::string(P.name) + " (" + which_name[which] + "): " + std::to_string(bad) + " bad D elements");
    return res;
}

// K-grouped Wgrad (fp8_gemm_tma with k_seg, the MoE expert Wgrad): A = dYᵀ codes [m, total] and
// B = Xᵀ codes [n, total] with expert e's tokens in the 128-aligned segment [seg[e], seg[e+1])
// (zero codes in the padding, as quant_t128_groups writes them), 1x128 scales along the tokens,
// D_e (f32, +=) at e·stride_d; empty experts' D untouched. Against the f64 reference per expert.
static void run_kgrouped(const std::vector<int>& counts, int m, int n, std::mt19937& rng) {
    const int E = (int)counts.size();
    std::vector<int> seg(E + 1, 0);
    for (int e = 0; e < E; e++) seg[e + 1] = seg[e] + (counts[e] + 127) / 128 * 128;
    const int total = std::max(seg[E], 128), tb = total / 128, ld = total + 16;
    const long long stride_d = (long long)m * n + 5;
    std::uniform_int_distribution<int> code(0, 253);
    auto rcode = [&]() { int c = code(rng); return (uint8_t)(c >= 0x7f ? c + 1 : c); };
    std::uniform_real_distribution<float> u(0.5f, 2.0f);
    std::uniform_int_distribution<int> ex(-12, 2);
    GBuf A((size_t)m * ld), B((size_t)n * ld), SA((size_t)m * tb * 4), SB((size_t)n * tb * 4), D((size_t)E * stride_d * 4);
    auto fill = [&](GBuf& q, int rows) {  // expert tokens random, segment padding zero, past total random
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < ld; c++) {
                bool pad = false;
                for (int e = 0; e < E; e++) pad = pad || (c >= seg[e] + counts[e] && c < seg[e + 1]);
                q.data[(size_t)r * ld + c] = pad ? 0 : rcode();
            }
    };
    fill(A, m), fill(B, n);
    for (size_t i = 0; i < SA.bytes / 4; i++) SA.as<float>()[i] = std::ldexp(u(rng), ex(rng));
    for (size_t i = 0; i < SB.bytes / 4; i++) SB.as<float>()[i] = std::ldexp(u(rng), ex(rng));
    std::vector<double> d0(D.bytes / 4);
    for (size_t i = 0; i < d0.size(); i++) d0[i] = D.as<float>()[i] = std::ldexp(u(rng) - 1.25f, ex(rng) + 4);
    GBuf KS((E + 1) * 4);
    std::memcpy(KS.data, seg.data(), KS.bytes);

    Fp8GemmArgs p{};
    p.a = A.data, p.b = B.data, p.d = D.data, p.sa = SA.as<float>(), p.sb = SB.as<float>();
    p.sa_rs = tb, p.sa_ks = 1, p.sb_rs = tb, p.sb_ks = 1;
    p.m = m, p.n = n, p.k = total, p.lda = ld, p.ldb = ld, p.ldd = n;
    p.groups = 1, p.accumulate = 1, p.b_block = 0;
    Fp8TmaArgs q{};
    const long long da[2] = {total, m}, sa_[1] = {ld}, ba[2] = {128, 64};
    const long long db[3] = {total, n, 1}, sb_[2] = {ld, (long long)n * ld}, bb[3] = {128, 128, 1};
    q.ta = emu_tma::encode(A.data, 2, da, sa_, ba, true);
    q.tb = emu_tma::encode(B.data, 3, db, sb_, bb, true);
    q.p = p, q.splits = 1, q.k_seg = KS.as<int>(), q.kgroups = E, q.stride_d = stride_d;
    emu::allow_global(A.data, A.bytes);
    emu::allow_global(B.data, B.bytes);
    const int units = (m + 127) / 128 * ((n + 127) / 128) * E;
    const unsigned grid = (unsigned)std::min(units, 1 + (int)(rng() % 4));
    run_tma(fp8_gemm_tma_f32, q, grid);
    emu::clear_globals();
    emu::cp_async_eager = false;

    const double tol = wg_emu::acc_bits ? std::ldexp(1.0, -(wg_emu::acc_bits - 5)) : 3e-6;
    int bad = 0;
    double worst = 0;
    for (size_t i = 0; i < d0.size(); i++) {
        const long long e = (long long)i / stride_d, w = (long long)i % stride_d;
        const double got = D.as<float>()[i];
        if (w >= (long long)m * n || counts[e] == 0) {
            if (got != d0[i] && bad++ < 5) std::fprintf(stderr, "  D[%zu] (no expert rows there) written: %g\n", i, got);
            continue;
        }
        const int r = (int)(w / n), c = (int)(w % n);
        double ref = d0[i], bound = std::fabs(ref);
        for (int kb = seg[e] / 128; kb < seg[e + 1] / 128; kb++) {
            double part = 0, apart = 0;
            for (int kk = kb * 128; kk < kb * 128 + 128; kk++) {
                const double pr = wg_emu::e4m3(A.data[(size_t)r * ld + kk]) * wg_emu::e4m3(B.data[(size_t)c * ld + kk]);
                part += pr, apart += std::fabs(pr);
            }
            const double sc = (double)SA.as<float>()[r * tb + kb] * SB.as<float>()[c * tb + kb];
            ref += sc * part, bound += sc * apart;
        }
        const double err = std::fabs(got - ref) / (tol * bound + 1e-30);
        if (!(err <= 1.0) && bad++ < 5) std::fprintf(stderr, "  D_%lld[%d][%d]: got %.9g want %.9g\n", e, r, c, got, ref);
        worst = std::max(worst, std::isnan(err) ? 1e30 : err);
    }
    if (bad) fail("k-grouped Wgrad (tma): " + std::to_string(bad) + " bad D elements");
    std::printf("kgrouped-wgrad  tma    %d experts, %4dx%-4d total K %d acc=%s: worst err/bound %.3f\n", E, m, n, total,
                wg_emu::acc_bits ? "14-bit" : "exact", worst);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    signal(SIGSEGV, on_segv);
    std::mt19937 rng(8);
    std::vector<Problem> ps = {
        // name, m, n, k, b_block, f32d, accumulate, counts, pads
        {"fprop", 200, 300, 400, true, false, false, {}, 16, 0, 3, true},
        {"dgrad-k-ragged", 70, 130, 300, true, true, false, {}, 5, 3, 1, false},
        {"wgrad-acc", 129, 257, 520, false, true, true, {}, 0, 16, 2, true},
        {"grouped", 0, 200, 384, true, false, false, {70, 0, 130, 5, 64}, 0, 0, 3, true},
        {"grouped-wgrad", 0, 136, 130, false, true, true, {1, 65, 0, 128}, 8, 8, 0, false},
        {"tiny", 1, 1, 1, true, false, false, {}, 0, 0, 0, true},
        // aligned for wgmma2: a long K (the ring wraps), odd 64-row tile counts (warpgroup 1 idle),
        // groups that split a block between two experts (two B tiles staged)
        {"fprop-longk", 130, 260, 1040, true, false, false, {}, 0, 16, 1, true},
        {"grouped-2b", 0, 264, 272, true, true, false, {64, 1, 63, 0, 129, 64}, 16, 0, 0, true},
        {"grouped-wgrad16", 0, 130, 400, false, true, true, {3, 64, 0, 100}, 0, 0, 5, false},
        // TMA: k not a multiple of 16 with 16-byte leading dimensions (the box's K past k and the
        // padding bytes read as zero), more block tiles than persistent blocks
        {"fprop-kragged", 200, 390, 300, true, false, false, {}, 20, 4, 2, true},
        {"grouped-kragged", 0, 140, 200, true, true, false, {0, 66, 129, 1}, 8, 8, 1, false},
        // Wgrad form (f32 D, +=) with 16-byte leading dimensions: TMA and its split-K
        {"wgrad-tma", 150, 200, 700, false, true, true, {}, 4, 20, 2, false},
        // D one f32 into its buffer (4-byte aligned: a parameter's slice of the gradient arena;
        // the H100 faulted on the paired stores until fp8_store2 checked the address), and bf16 D
        // one element in (2-byte aligned)
        {"wgrad-d-odd", 150, 200, 300, false, true, true, {}, 4, 20, 0, false, 1},
        {"fprop-d-odd", 70, 130, 256, true, false, false, {}, 0, 0, 0, true, 1},
        // the TMA-store epilogue (bf16 D, 16-byte rows): n past a 64-column box (clipped) and n
        // ending in the first half of a tile (the second box skipped), a partial last row tile
        // (clipped at m); grouped: full tiles by TMA, partial ones not at m from registers
        {"fprop-store", 200, 200, 400, true, false, false, {}, 0, 0, 8, true},
        {"dgrad-store", 130, 130, 270, true, false, false, {}, 2, 18, 14, false, 8},
        {"grouped-store", 0, 264, 272, true, false, false, {64, 1, 63, 0, 129, 60}, 16, 0, 16, true},
        // more than one band of the persistent walk's L2 order (9 row tiles of 128: 8 + 1)
        {"fprop-bands", 1100, 300, 128, true, false, false, {}, 0, 0, 4, true},
    };
    for (auto& p : ps)
        if (!p.counts.empty()) {
            p.m = 7;  // rows past the last group: never written
            for (int c : p.counts) p.m += c;
        }
    if (quick) ps = {ps[0], ps[3], ps[4], ps[5], ps[7], ps[6], ps[9], ps[10], ps[11], ps[12], ps[13], ps[14], ps[16], ps[17]};
    for (int bits : {0, 14}) {
        if (quick && bits) ps = {ps[0]};
        wg_emu::acc_bits = bits;
        for (const Problem& p : ps)
            for (Which w : {WGMMA, WGMMA2, TMA, TMA_SPLITK, TMA_STORE, TMA_TAIL, SIMT}) {
                if (bits && w == SIMT) continue;
                if (w == TMA_STORE && !tma_store_ok(p)) continue;
                if (w == WGMMA2 && !v2_ok(p)) continue;
                if ((w == TMA || w == TMA_SPLITK || w == TMA_TAIL) && !tma_ok(p)) continue;
                if (w == TMA_SPLITK && (!p.counts.empty() || (p.k + 127) / 128 < 2)) continue;
                if (w == TMA_TAIL &&
                    (!p.counts.empty() || tail_sms((p.m + 127) / 128 * ((p.n + 127) / 128), (p.k + 127) / 128).empty()))
                    continue;
                tma_sms = 1 + (int)(rng() % 4);
                if (quick && w == SIMT && &p != &ps[0]) continue;
                const long long before = wg_emu::mmas;
                Result r = run(p, w, rng);
                std::printf("%-15s %-5s %4dx%-4dx%-4d %s%s%s acc=%s: %lld D checked, worst err/bound %.3f, %lld wgmma\n",
                            p.name, which_name[w], p.m, p.n, p.k, p.b_block ? "B128x128" : "B1x128",
                            p.f32d ? " f32" : " bf16", p.accumulate ? " +=" : "", bits ? "14-bit" : "exact", r.checked,
                            r.worst, wg_emu::mmas - before);
            }
    }
    for (int bits : {0, 14}) {
        wg_emu::acc_bits = bits;
        run_kgrouped({0, 5, 300, 0, 128, 129, 1, 0}, 150, 200, rng);
        if (!quick) run_kgrouped({0, 0}, 64, 128, rng);
    }
    std::printf("fp8gemm: all cases agree with the f64 reference\n");
    return 0;
}
