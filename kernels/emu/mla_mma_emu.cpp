// CPU emulation of the tensor-core MLA decode kernels (kernels/cuda/mla.cu, mla_decode_mma_*),
// for checking their fragment layouts, swizzle, pipeline, masking and splits without a GPU:
//
//   bash kernels/emu/run.sh
//
// The kernel source runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread,
// ldmatrix/mma.sync/shuffles evaluated as the PTX ISA defines them, cp.async deferred to its
// wait_group, shared memory poisoned with NaNs and guarded by a canary). Here cp.async may read
// only the cache. Outputs are compared with an f64 reference (bf16 inputs) at the GPU test's
// tolerance; output rows carry sentinels. Timing means nothing here.
#include <emu.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../cuda/mla.cu"

// ---- driver ----
struct Variant {
    const char* name;
    void (*kernel)(MlaArgs);
    int mt, t, ns;
    bool depth;     // mla_decode_mmad (depth-split S)
    int warps = 4;  // threads / 32
};
static const Variant VARIANTS[] = {
    {"mla_decode_mma_bf16 (m1t32)", mla_decode_mma_bf16, 1, 32, 2},
    {"mla_decode_mma_m1s4_bf16", mla_decode_mma_m1s4_bf16, 1, 32, 4},
    {"mla_decode_mma_m1t64_bf16", mla_decode_mma_m1t64_bf16, 1, 64, 2},
    {"mla_decode_mma_m2t32_bf16", mla_decode_mma_m2t32_bf16, 2, 32, 2},
    {"mla_decode_mma_m2t64_bf16", mla_decode_mma_m2t64_bf16, 2, 64, 2},
    {"mla_decode_mmad_t32_bf16", mla_decode_mmad_t32_bf16, 1, 32, 2, true},
    {"mla_decode_mmad_s3_bf16", mla_decode_mmad_s3_bf16, 1, 32, 3, true},
    {"mla_decode_mmad_t64_bf16", mla_decode_mmad_t64_bf16, 1, 64, 2, true},
    {"mla_decode_mmad_w8_bf16", mla_decode_mmad_w8_bf16, 1, 32, 2, true, 8},
    {"mla_decode_mmad_w8s3_bf16", mla_decode_mmad_w8s3_bf16, 1, 32, 3, true, 8},
};
// MmaVariant::smem_bytes in kernels/src/ops/mla.rs
static size_t smem_bytes(const Variant& v, int c, int dr) {
    size_t rs = (size_t)((c + dr + 63) / 64 * 64), m = 16 * v.mt;
    if (v.depth) {
        const size_t u = (std::max(2 * m * rs, 4 * (size_t)v.warps * m * (v.t + 8)) + 127) / 128 * 128;
        return u + 2 * (v.ns * v.t * rs + m * (v.t + 8)) + 4 * 3 * m;
    }
    return 2 * (m * rs + v.ns * v.t * rs + m * (v.t + 8)) + 4 * 8 * m;
}

static uint16_t b16(float f) { return __float2bfloat16_rn(f).bits; }
static float f16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// fused: the split merge inside the decode kernel (MlaArgs::counters) instead of mla_combine; the
// splits then run last to first, so the merging CTA is split 0's, and the counters must be zero
// (re-armed) afterwards.
static int run_case(const Variant& v, int h, int c, int dr, int max_len, const std::vector<int>& lens, int splits,
                    std::mt19937& rng, bool fused = false) {
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

    emu::clear_globals();
    emu::allow_global(cache.data(), cache.size() * 2);  // cp.async reads only the cache
    const size_t smem = smem_bytes(v, c, dr);
    const int hb = (h + 16 * v.mt - 1) / (16 * v.mt);
    std::vector<int> counters((size_t)n * hb, 0);
    a.counters = fused ? counters.data() : nullptr;
    for (int i = 0; i < splits; i++)
        for (int x = 0; x < n * hb; x++) {
            const int y = fused ? splits - 1 - i : i;
            emu::begin_smem(smem);  // NaN poison, canary after
            emu::run_block({(unsigned)x, (unsigned)y, 0}, 32 * v.warps, [&] { v.kernel(a); });
            emu::end_smem();
        }
    for (int cnt : counters)
        if (cnt != 0) fail("fused merge: a counter left at " + std::to_string(cnt) + " (not re-armed)");
    if (splits > 1 && !fused) {
        for (int y = 0; y < h; y++)
            for (int x = 0; x < n; x++) {
                emu::run_block({(unsigned)x, (unsigned)y, 0}, 256, [&] { mla_combine_bf16(a); });
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
    std::printf("%-30s h%-3d c%-3d dr%-3d splits %-2d%s lens", v.name, h, c, dr, splits, fused ? " fused" : "");
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
            // uneven depth splits over the warps: 64 + 32 (6 k16 steps), 64 + 0 (4)
            if (!quick || v.depth) bad += run_case(v, 17, 64, 32, 130, {130, 2, 64}, splits, rng);
            if (!quick || v.depth) bad += run_case(v, 3, 64, 0, 70, {70, 33}, splits, rng);
        }
        if (!quick) bad += run_case(v, 128, 512, 64, 200, {200, 33}, 3, rng);
        // the merge inside the kernel (DSV3_MLA_COMBINE=fused): empty splits, several head blocks
        for (int splits : {3, 40}) {
            bad += run_case(v, 16, 512, 64, 1030, {1, 63, 65, 1030}, splits, rng, true);
            bad += run_case(v, 40, 256, 32, 300, {0, 97, 300}, splits, rng, true);
        }
    }
    std::printf(bad ? "FAILED (%d bad elements)\n" : "all cases match the f64 reference\n", bad);
    return bad ? 1 : 0;
}
