// CPU emulation of the flash prefill attention kernels (kernels/cuda/attn.cu, attn_fwd_*), for
// checking their fragment layouts, swizzle, pipeline, causal masking with an offset, ragged
// segments and head-dim padding without a GPU:
//
//   bash kernels/emu/run.sh flash        (--quick first for the short list CI runs)
//
// The kernel source runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread,
// ldmatrix/mma.sync/shuffles evaluated as the PTX ISA defines them, cp.async deferred to its
// wait_group, shared memory poisoned with NaNs and guarded by a canary). cp.async may read only
// the query, key/value and cache buffers. The layout is the session's: queries [N, H, dn + dr]
// (plus padding), decompressed keys/values [keys, H, dn + dv] (plus padding), the rope key read
// from a latent cache [slots, max_len, C + dr] at column C. Outputs are compared with an f64
// reference (from the same bf16 inputs) at the GPU test's tolerance; output rows carry sentinel
// columns and every output element starts as NaN. Timing means nothing here.
#include <emu.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../cuda/attn.cu"

struct Variant {
    const char* name;
    void (*kernel)(AttnArgs);
    int mw, dvt, bn, ns;
};
static const Variant VARIANTS[] = {
    {"attn_fwd_m1d64", attn_fwd_m1d64, 1, 64, 64, 2},    {"attn_fwd_m1d128", attn_fwd_m1d128, 1, 128, 64, 2},
    {"attn_fwd_m1d256", attn_fwd_m1d256, 1, 256, 32, 2}, {"attn_fwd_m2d64", attn_fwd_m2d64, 2, 64, 64, 2},
    {"attn_fwd_m2d128", attn_fwd_m2d128, 2, 128, 32, 2},
    {"attn_fwd_m2d64s3", attn_fwd_m2d64s3, 2, 64, 64, 3},   {"attn_fwd_m2d128s3", attn_fwd_m2d128s3, 2, 128, 32, 3},
};
// AttnVariant::smem_bytes in kernels/src/ops/attn.rs
static size_t smem_bytes(const Variant& v, int dk, int dv) {
    const size_t rsk = ((dk + 15) / 16 * 16 + 63) / 64 * 64, rsv = ((dv + 15) / 16 * 16 + 63) / 64 * 64;
    return 2 * (64 * v.mw * rsk + (size_t)v.ns * v.bn * (rsk + rsv));
}

static uint16_t b16(float f) { return __float2bfloat16_rn(f).bits; }
static float f16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

struct Seg {
    int nq, p0;  // new query rows, keys cached before them
};

// One call: segments (one per slot, slots in reverse order), h heads, dims dn/dr/dv, latent C.
static int run_case(const Variant& v, int h, int dn, int dr, int dv, int c, const std::vector<Seg>& segs,
                    std::mt19937& rng) {
    const int dk = dn + dr, nseg = (int)segs.size();
    const int qpad = 8, kvpad = 16, sent = 24;  // extra columns in each buffer's rows
    int n = 0, keys = 0, max_len = 1;
    for (const Seg& s : segs) n += s.nq, keys += s.p0 + s.nq, max_len = std::max(max_len, s.p0 + s.nq + 3);
    const int ld_q = h * dk + qpad, ld_kv = h * (dn + dv) + kvpad, w = c + dr, ld_o = h * dv + sent;
    std::normal_distribution<float> nd;
    std::vector<uint16_t> q((size_t)n * ld_q), kv((size_t)keys * ld_kv), cache((size_t)nseg * max_len * w);
    for (auto& x : q) x = b16(nd(rng));
    for (auto& x : kv) x = b16(nd(rng));
    for (auto& x : cache) x = b16(nd(rng));
    // segment table: q rows in order, k rows in order, slot = nseg-1-i
    std::vector<int> segt, tiles;
    {
        int qr = 0, kr = 0;
        for (int i = 0; i < nseg; i++) {
            segt.insert(segt.end(), {qr, segs[i].nq, segs[i].p0, kr, (nseg - 1 - i) * max_len});
            qr += segs[i].nq;
            kr += segs[i].p0 + segs[i].nq;
        }
        // tiles, longest first (as the launcher orders them)
        const int bm = 64 * v.mw;
        std::vector<std::pair<int, std::pair<int, int>>> t;
        for (int i = 0; i < nseg; i++)
            for (int q0 = 0; q0 < segs[i].nq; q0 += bm)
                t.push_back({segs[i].p0 + std::min(q0 + bm, segs[i].nq), {i, q0}});
        std::stable_sort(t.begin(), t.end(), [](auto& a, auto& b) { return a.first > b.first; });
        for (auto& x : t) tiles.insert(tiles.end(), {x.second.first, x.second.second});
    }
    const uint16_t SENT = 0x7fa1, POISON = 0x7fc0;  // a NaN payload never produced, and NaN
    std::vector<uint16_t> out((size_t)n * ld_o, SENT);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < h * dv; j++) out[(size_t)r * ld_o + j] = POISON;
    const float scale = 0.7f / std::sqrt((float)dk);

    AttnArgs a{};
    a.q = (const bf16*)q.data();
    a.k = (const bf16*)kv.data();
    a.kpe = (const bf16*)cache.data() + c;
    a.v = (const bf16*)kv.data() + dn;
    a.out = (bf16*)out.data();
    a.segs = segt.data();
    a.tiles = tiles.data();
    a.ld_q = ld_q, a.hs_q = dk, a.ld_k = ld_kv, a.hs_k = dn + dv, a.ld_kpe = w, a.ld_v = ld_kv, a.hs_v = dn + dv;
    a.ld_o = ld_o, a.hs_o = dv, a.h = h, a.dn = dn, a.dr = dr, a.dv = dv, a.ntiles = (int)tiles.size() / 2;
    a.scale = scale;

    emu::clear_globals();
    emu::allow_global(q.data(), q.size() * 2);
    emu::allow_global(kv.data(), kv.size() * 2);
    emu::allow_global(cache.data(), cache.size() * 2);
    const size_t smem = smem_bytes(v, dk, dv);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < a.ntiles; x++) {
            emu::begin_smem(smem);  // NaN poison, canary after
            emu::run_block({(unsigned)x, (unsigned)y, 0}, ATTN_THREADS, [&] { v.kernel(a); });
            emu::end_smem();
        }

    // f64 reference from the same bf16 inputs
    double worst = 0;
    int bad = 0;
    for (int i = 0; i < nseg; i++) {
        const int* st = &segt[5 * i];
        for (int qi = 0; qi < st[1]; qi++) {
            const int row = st[0] + qi, nk = st[2] + qi + 1;
            for (int hh = 0; hh < h; hh++) {
                std::vector<double> sc(nk);
                double mx = -INFINITY;
                for (int t = 0; t < nk; t++) {
                    const uint16_t* kr = &kv[(size_t)(st[3] + t) * ld_kv + hh * (dn + dv)];
                    const uint16_t* pr = &cache[(size_t)(st[4] + t) * w + c];
                    const uint16_t* qr = &q[(size_t)row * ld_q + hh * dk];
                    double acc = 0;
                    for (int j = 0; j < dn; j++) acc += (double)f16(qr[j]) * f16(kr[j]);
                    for (int j = 0; j < dr; j++) acc += (double)f16(qr[dn + j]) * f16(pr[j]);
                    sc[t] = acc * scale;
                    mx = std::max(mx, sc[t]);
                }
                double z = 0;
                for (int t = 0; t < nk; t++) z += (sc[t] = std::exp(sc[t] - mx));
                for (int j = 0; j < dv; j++) {
                    double want = 0;
                    for (int t = 0; t < nk; t++) want += sc[t] * f16(kv[(size_t)(st[3] + t) * ld_kv + hh * (dn + dv) + dn + j]);
                    want /= z;
                    const float got = f16(out[(size_t)row * ld_o + hh * dv + j]);
                    const double err = std::fabs(got - want);
                    if (!(err <= 1.6e-2 + 1.6e-2 * std::fabs(want))) {
                        if (bad++ < 5)
                            std::fprintf(stderr, "  seg %d row %d head %d col %d: got %g want %g\n", i, qi, hh, j, got,
                                         want);
                    }
                    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
                }
            }
        }
    }
    for (int r = 0; r < n; r++)
        for (int j = h * dv; j < ld_o; j++)
            if (out[(size_t)r * ld_o + j] != SENT) fail("output written past h*dv (sentinel clobbered)");
    std::printf("%-16s h%-2d dn%-3d dr%-3d dv%-3d segs(nq@p0)", v.name, h, dn, dr, dv);
    for (const Seg& s : segs) std::printf(" %d@%d", s.nq, s.p0);
    std::printf(": max |err| %.3g%s\n", worst, bad ? "  FAILED" : "");
    std::fflush(stdout);
    return bad;
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::mt19937 rng(11);
    int bad = 0;
    const Variant &m1d64 = VARIANTS[0], &m1d128 = VARIANTS[1], &m1d256 = VARIANTS[2], &m2d64 = VARIANTS[3],
                  &m2d128 = VARIANTS[4];
    // 88M (dn 64, dr 32, dv 64, C 128): fresh prefill, ragged, a chunk after a cached prefix
    bad += run_case(m1d64, 2, 64, 32, 64, 128, {{70, 0}, {1, 0}, {129, 0}}, rng);
    bad += run_case(m2d64, 2, 64, 32, 64, 128, {{70, 0}, {200, 37}, {5, 130}}, rng);
    // V3 (dn 128, dr 64, dv 128, C 512)
    bad += run_case(m2d128, 1, 128, 64, 128, 512, {{150, 0}, {40, 90}}, rng);
    bad += run_case(m1d128, 2, 128, 64, 128, 512, {{66, 0}, {17, 100}}, rng);
    // odd small dims: dk 24 -> padded to 32, dv 16 (the v3_group fixture); dk 48 / dv 32; no rope part
    bad += run_case(m1d64, 3, 16, 8, 16, 32, {{19, 0}, {3, 5}, {33, 64}}, rng);
    bad += run_case(m2d64, 2, 32, 16, 32, 64, {{9, 0}, {130, 1}}, rng);
    bad += run_case(m1d128, 1, 40, 0, 120, 32, {{65, 2}}, rng);
    // dk 256 / dv 256, the largest
    bad += run_case(m1d256, 1, 192, 64, 256, 64, {{70, 3}}, rng);
    // three-stage rings
    bad += run_case(VARIANTS[5], 2, 64, 32, 64, 128, {{150, 0}, {70, 100}}, rng);
    bad += run_case(VARIANTS[6], 1, 128, 64, 128, 512, {{140, 0}, {3, 70}}, rng);
    if (!quick) {
        for (const Variant& v : VARIANTS) {
            const int dv = std::min(v.dvt, 128);
            bad += run_case(v, 3, 64, 32, dv == 128 ? 128 : 64, 128, {{1, 0}, {255, 0}, {64, 64}, {63, 200}}, rng);
            bad += run_case(v, 2, 24, 8, 48, 32, {{130, 7}, {2, 300}}, rng);
        }
        bad += run_case(m2d128, 4, 128, 64, 128, 512, {{300, 0}, {129, 257}}, rng);
        bad += run_case(m1d256, 2, 128, 64, 256, 64, {{140, 60}, {1, 5}}, rng);
        bad += run_case(m1d256, 1, 248, 8, 248, 64, {{65, 0}}, rng);
    }
    std::printf(bad ? "FAILED (%d bad elements)\n" : "all cases match the f64 reference\n", bad);
    return bad ? 1 : 0;
}
