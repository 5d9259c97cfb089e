// CPU emulation of the training flash attention kernels (kernels/cuda/attn_train.cu): the forward
// with the log-sum-exp, the backward's preprocess (D), dK/dV, dQ and the rope-key reduction, run
// as the launcher (kernels/src/ops/attn_train.rs) chains them, against an f64 reference:
//
//   bash kernels/emu/run.sh attn_train        (--quick: the short list CI runs)
//
// The kernel source runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread,
// ldmatrix/mma.sync/shuffles as the PTX ISA defines them, cp.async deferred to its wait_group,
// shared memory poisoned with NaNs and guarded by a canary; cp.async may read only q, kv, the
// latent rows and dO). Layout as the training pass (kernels/src/train/block.rs): queries
// [N, H, dn + dr] (+ padding), keys/values [keys, H·(dn + dv)] (+ padding), the rope key at column
// C of [keys, C + dr]; the gradients land in the same layouts (dQ like q, dK/dV like kv, the
// rope key's gradient in column C of a [keys, C + dr] buffer). Every output starts as NaN; the
// columns around them carry sentinels that must survive. The reference (f64, from the same bf16
// inputs): O, lse; D from the kernel's bf16 O (as the GPU pipeline); P = softmax, dV = Pᵀ·dO,
// dS = P ∘ (dO·Vᵀ − D), dQ = scale·dS·K, dK = scale·dSᵀ·Q (rope part summed over heads).
// Errors are reported relative to each tensor's largest |value|. Timing means nothing here.
#include <emu.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../cuda/attn_train.cu"

struct Variant {
    const char* name;
    void (*fwd)(FlashTrainArgs);
    void (*dkdv)(FlashTrainArgs);
    void (*dq)(FlashTrainArgs);
    int dkt, dvt, fbn, bmq, qbn;
};
static const Variant VARIANTS[] = {
    {"k64v64", flash_fwd_train_bf16_k64v64, flash_bwd_dkdv_bf16_k64v64, flash_bwd_dq_bf16_k64v64, 64, 64, 64, 64, 64},
    {"k128v128", flash_fwd_train_bf16_k128v128, flash_bwd_dkdv_bf16_k128v128, flash_bwd_dq_bf16_k128v128, 128, 128,
     64, 32, 64},
    {"k192v128", flash_fwd_train_bf16_k192v128, flash_bwd_dkdv_bf16_k192v128, flash_bwd_dq_bf16_k192v128, 192, 128,
     64, 32, 32},
};
// FlashTrainVariant::smem_* in kernels/src/ops/attn_train.rs
static size_t rs(int d) { return (size_t)((d + 15) / 16 * 16 + 63) / 64 * 64; }
static size_t smem_fwd(const Variant& v, int dk, int dv) { return 2 * (64 * rs(dk) + 2 * v.fbn * (rs(dk) + rs(dv))); }
static size_t smem_dq(const Variant& v, int dk, int dv) {
    return 2 * (64 * (rs(dk) + rs(dv)) + 2 * v.qbn * (rs(dk) + rs(dv)));
}
static size_t smem_dkdv(const Variant& v, int dk, int dv) {
    return 2 * (64 * (rs(dk) + rs(dv)) + 2 * v.bmq * (rs(dk) + rs(dv))) + 8 * 2 * v.bmq;
}

static uint16_t b16(float f) { return __float2bfloat16_rn(f).bits; }
static float f16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

struct Seg {
    int nq, p0;  // query rows, keys before them (0 in training)
};

struct Err {
    const char* what;
    double worst = 0, ref = 0;  // max |got - want|, max |want|
    int bad = 0, n = 0;
    std::vector<std::pair<double, double>> pairs;
    void add(double got, double want) { pairs.push_back({got, want}), ref = std::max(ref, std::fabs(want)); }
    // |got - want| <= tol·(max |want| + |want|)
    int finish(double tol) {
        for (auto& p : pairs) {
            const double e = std::fabs(p.first - p.second);
            n++;
            if (std::isnan(e)) {
                worst = INFINITY;
                if (bad++ < 3) std::fprintf(stderr, "  %s: NaN (want %g)\n", what, p.second);
                continue;
            }
            worst = std::max(worst, e);
            if (!(e <= tol * (ref + std::fabs(p.second)))) {
                if (bad++ < 3) std::fprintf(stderr, "  %s: got %g want %g\n", what, p.first, p.second);
            }
        }
        return bad;
    }
};

static void run_blocks(int nx, int ny, size_t smem, void (*k)(FlashTrainArgs), const FlashTrainArgs& a) {
    for (int y = 0; y < ny; y++)
        for (int x = 0; x < nx; x++) {
            emu::begin_smem(smem);
            emu::run_block({(unsigned)x, (unsigned)y, 0}, FT_THREADS, [&] { k(a); });
            emu::end_smem();
        }
}

static int run_case(const Variant& v, int h, int dn, int dr, int dv, int c, const std::vector<Seg>& segs,
                    std::mt19937& rng) {
    const int dk = dn + dr, nseg = (int)segs.size(), wkv = dn + dv;
    const int qpad = 8, kvpad = 16;
    int n = 0, keys = 0;
    for (const Seg& s : segs) n += s.nq, keys += s.p0 + s.nq;
    const int ld_q = h * dk + qpad, ld_kv = h * wkv + kvpad, lc = c + dr, ld_o = h * dv + 8;
    std::normal_distribution<float> nd;
    std::vector<uint16_t> q((size_t)n * ld_q), kv((size_t)keys * ld_kv), ckv((size_t)keys * lc), dout((size_t)n * ld_o);
    for (auto& x : q) x = b16(nd(rng));
    for (auto& x : kv) x = b16(nd(rng));
    for (auto& x : ckv) x = b16(nd(rng));
    for (auto& x : dout) x = b16(nd(rng));
    std::vector<int> segt, qtiles, ktiles;
    {
        int qr = 0, kr = 0;
        for (int i = 0; i < nseg; i++) {
            segt.insert(segt.end(), {qr, segs[i].nq, segs[i].p0, kr, kr});
            qr += segs[i].nq;
            kr += segs[i].p0 + segs[i].nq;
        }
        // longest first (as the launcher orders them)
        std::vector<std::pair<int, std::pair<int, int>>> t, u;
        for (int i = 0; i < nseg; i++) {
            for (int q0 = 0; q0 < segs[i].nq; q0 += 64) t.push_back({segs[i].p0 + std::min(q0 + 64, segs[i].nq), {i, q0}});
            for (int k0 = 0; k0 < segs[i].p0 + segs[i].nq; k0 += 64)
                u.push_back({segs[i].nq - std::max(0, k0 - segs[i].p0), {i, k0}});
        }
        auto by = [](auto& a, auto& b) { return a.first > b.first; };
        std::stable_sort(t.begin(), t.end(), by);
        std::stable_sort(u.begin(), u.end(), by);
        for (auto& x : t) qtiles.insert(qtiles.end(), {x.second.first, x.second.second});
        for (auto& x : u) ktiles.insert(ktiles.end(), {x.second.first, x.second.second});
    }
    const uint16_t SENT = 0x7fa1, POISON = 0x7fc0;
    const float FPOISON = NAN;
    // outputs: O [n, ld_o], lse [n, h]; dQ like q, dK/dV like kv, dkpe in column c of [keys, lc]
    std::vector<uint16_t> o((size_t)n * ld_o, SENT), gq((size_t)n * ld_q, SENT), gkv((size_t)keys * ld_kv, SENT),
        gc((size_t)keys * lc, SENT);
    for (int r = 0; r < n; r++) {
        for (int j = 0; j < h * dv; j++) o[(size_t)r * ld_o + j] = POISON;
        for (int j = 0; j < h * dk; j++) gq[(size_t)r * ld_q + j] = POISON;
    }
    for (int r = 0; r < keys; r++) {
        for (int j = 0; j < h * wkv; j++) gkv[(size_t)r * ld_kv + j] = POISON;
        for (int j = 0; j < dr; j++) gc[(size_t)r * lc + c + j] = POISON;
    }
    std::vector<float> lse((size_t)n * h, FPOISON), dd((size_t)n * h, FPOISON), part((size_t)keys * h * dr, FPOISON);
    const float scale = 0.9f / std::sqrt((float)dk);

    FlashTrainArgs a{};
    a.q = (const bf16*)q.data();
    a.k = (const bf16*)kv.data();
    a.kpe = (const bf16*)ckv.data() + c;
    a.v = (const bf16*)kv.data() + dn;
    a.o = (bf16*)o.data();
    a.dout = (const bf16*)dout.data();
    a.lse = lse.data();
    a.dd = dd.data();
    a.gq = (bf16*)gq.data();
    a.gk = (bf16*)gkv.data();
    a.gkpe_part = part.data();
    a.gkpe = (bf16*)gc.data() + c;
    a.gv = (bf16*)gkv.data() + dn;
    a.segs = segt.data();
    a.ld_q = ld_q, a.hs_q = dk, a.ld_k = ld_kv, a.hs_k = wkv, a.ld_kpe = lc, a.ld_v = ld_kv, a.hs_v = wkv;
    a.ld_o = ld_o, a.hs_o = dv, a.ld_do = ld_o, a.hs_do = dv;
    a.ld_dq = ld_q, a.hs_dq = dk, a.ld_dk = ld_kv, a.hs_dk = wkv, a.ld_dkpe = lc, a.ld_dv = ld_kv, a.hs_dv = wkv;
    a.h = h, a.dn = dn, a.dr = dr, a.dv = dv, a.scale = scale;

    emu::clear_globals();
    emu::allow_global(q.data(), q.size() * 2);
    emu::allow_global(kv.data(), kv.size() * 2);
    emu::allow_global(ckv.data(), ckv.size() * 2);
    emu::allow_global(dout.data(), dout.size() * 2);
    // the launcher's sequence: forward; preprocess; dK/dV; dQ; the rope-key reduction
    FlashTrainArgs aq = a, ak = a;
    aq.tiles = qtiles.data(), aq.ntiles = (int)qtiles.size() / 2;
    ak.tiles = ktiles.data(), ak.ntiles = (int)ktiles.size() / 2;
    run_blocks(aq.ntiles, h, smem_fwd(v, dk, dv), v.fwd, aq);
    run_blocks(aq.ntiles, h, 0, flash_bwd_preprocess, aq);
    run_blocks(ak.ntiles, h, smem_dkdv(v, dk, dv), v.dkdv, ak);
    run_blocks(aq.ntiles, h, smem_dq(v, dk, dv), v.dq, aq);
    if (dr > 0) run_blocks(ak.ntiles, 1, 0, flash_bwd_dkpe_reduce, ak);

    // f64 reference
    Err eo{"O"}, el{"lse"}, eq{"dQ"}, ek{"dK"}, ev{"dV"}, ep{"dK_rope"};
    std::vector<double> rdkv((size_t)keys * ld_kv, 0.0), rdc((size_t)keys * dr, 0.0);
    for (int i = 0; i < nseg; i++) {
        const int* st = &segt[5 * i];
        const int nk = st[2] + st[1];
        for (int hh = 0; hh < h; hh++) {
            auto K = [&](int t, int j) {
                return j < dn ? (double)f16(kv[(size_t)(st[3] + t) * ld_kv + hh * wkv + j])
                              : (double)f16(ckv[(size_t)(st[4] + t) * lc + c + j - dn]);
            };
            auto V = [&](int t, int j) { return (double)f16(kv[(size_t)(st[3] + t) * ld_kv + hh * wkv + dn + j]); };
            for (int qi = 0; qi < st[1]; qi++) {
                const int row = st[0] + qi, nv = st[2] + qi + 1;
                const uint16_t* qr = &q[(size_t)row * ld_q + hh * dk];
                const uint16_t* dor = &dout[(size_t)row * ld_o + hh * dv];
                std::vector<double> p(nv), dp(nv);
                double mx = -INFINITY;
                for (int t = 0; t < nv; t++) {
                    double acc = 0;
                    for (int j = 0; j < dk; j++) acc += (double)f16(qr[j]) * K(t, j);
                    p[t] = acc * scale;
                    mx = std::max(mx, p[t]);
                }
                double z = 0;
                for (int t = 0; t < nv; t++) z += (p[t] = std::exp(p[t] - mx));
                for (int t = 0; t < nv; t++) p[t] /= z;
                el.add(lse[(size_t)row * h + hh], mx + std::log(z));
                double dsum = 0;  // D from the kernel's bf16 O
                for (int j = 0; j < dv; j++) {
                    double want = 0;
                    for (int t = 0; t < nv; t++) want += p[t] * V(t, j);
                    const float got = f16(o[(size_t)row * ld_o + hh * dv + j]);
                    eo.add(got, want);
                    dsum += (double)got * f16(dor[j]);
                }
                for (int t = 0; t < nv; t++) {
                    double acc = 0;
                    for (int j = 0; j < dv; j++) acc += (double)f16(dor[j]) * V(t, j);
                    dp[t] = p[t] * (acc - dsum);  // dS
                }
                for (int j = 0; j < dk; j++) {
                    double acc = 0;
                    for (int t = 0; t < nv; t++) acc += dp[t] * K(t, j);
                    eq.add(f16(gq[(size_t)row * ld_q + hh * dk + j]), scale * acc);
                }
                for (int t = 0; t < nv; t++) {
                    double* dkr = &rdkv[(size_t)(st[3] + t) * ld_kv + hh * wkv];
                    for (int j = 0; j < dn; j++) dkr[j] += scale * dp[t] * f16(qr[j]);
                    for (int j = 0; j < dr; j++) rdc[(size_t)(st[4] + t) * dr + j] += scale * dp[t] * f16(qr[dn + j]);
                    for (int j = 0; j < dv; j++) dkr[dn + j] += p[t] * f16(dor[j]);
                }
            }
        }
    }
    for (int r = 0; r < keys; r++) {
        for (int hh = 0; hh < h; hh++)
            for (int j = 0; j < wkv; j++) {
                const size_t at = (size_t)r * ld_kv + hh * wkv + j;
                (j < dn ? ek : ev).add(f16(gkv[at]), rdkv[at]);
            }
        for (int j = 0; j < dr; j++) ep.add(f16(gc[(size_t)r * lc + c + j]), rdc[(size_t)r * dr + j]);
    }
    int bad = eo.finish(1.2e-2) + el.finish(1e-3) + eq.finish(1e-2) + ek.finish(1e-2) + ev.finish(1e-2) +
              (dr > 0 ? ep.finish(1e-2) : 0);
    // sentinels
    for (int r = 0; r < n; r++) {
        for (int j = h * dv; j < ld_o; j++)
            if (o[(size_t)r * ld_o + j] != SENT) fail("O written past h*dv");
        for (int j = h * dk; j < ld_q; j++)
            if (gq[(size_t)r * ld_q + j] != SENT) fail("dQ written past h*dk");
    }
    for (int r = 0; r < keys; r++) {
        for (int j = h * wkv; j < ld_kv; j++)
            if (gkv[(size_t)r * ld_kv + j] != SENT) fail("dK/dV written past h*(dn+dv)");
        for (int j = 0; j < c; j++)
            if (gc[(size_t)r * lc + j] != SENT) fail("dK_rope written before column C");
    }
    std::printf("%-9s h%d dn%-3d dr%-3d dv%-3d segs(nq@p0)", v.name, h, dn, dr, dv);
    for (const Seg& s : segs) std::printf(" %d@%d", s.nq, s.p0);
    std::printf(": rel err O %.2g lse %.2g dQ %.2g dK %.2g dV %.2g dKr %.2g%s\n", eo.worst / eo.ref,
                el.worst / el.ref, eq.worst / eq.ref, ek.worst / ek.ref, ev.worst / ev.ref,
                dr > 0 ? ep.worst / ep.ref : 0.0, bad ? "  FAILED" : "");
    std::fflush(stdout);
    return bad;
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::mt19937 rng(7);
    int bad = 0;
    const Variant &k64 = VARIANTS[0], &k128 = VARIANTS[1], &k192 = VARIANTS[2];
    // V3 (dn 128, dr 64, dv 128): ragged sequences, a length not a multiple of the tiles, length 1
    bad += run_case(k192, 2, 128, 64, 128, 64, {{70, 0}, {1, 0}, {37, 0}}, rng);
    // tiny configs: v3_group (16 + 8, dv 16), the tokenizer fixture (8 + 8, dv 8), v3_tiny (32 + 16, 32)
    bad += run_case(k64, 4, 16, 8, 16, 32, {{19, 0}, {1, 0}, {67, 0}}, rng);
    bad += run_case(k64, 2, 8, 8, 8, 16, {{5, 0}, {33, 0}}, rng);
    bad += run_case(k64, 3, 32, 16, 32, 64, {{130, 0}, {2, 0}}, rng);
    // 88M (64 + 32, dv 64), a cached prefix (p0 > 0), no rope part
    bad += run_case(k128, 2, 64, 32, 64, 128, {{66, 0}, {20, 45}}, rng);
    bad += run_case(k128, 1, 40, 0, 120, 32, {{65, 2}}, rng);
    if (!quick) {
        bad += run_case(k192, 3, 128, 64, 128, 512, {{200, 0}, {64, 0}, {129, 0}, {1, 0}}, rng);
        bad += run_case(k192, 1, 128, 64, 128, 64, {{90, 100}, {3, 61}}, rng);
        bad += run_case(k128, 4, 64, 32, 64, 128, {{257, 0}, {63, 0}}, rng);
        bad += run_case(k128, 2, 96, 32, 128, 32, {{100, 0}, {31, 0}}, rng);
        bad += run_case(k64, 4, 16, 16, 16, 32, {{150, 0}, {1, 0}, {16, 0}, {17, 0}}, rng);
        bad += run_case(k64, 2, 48, 16, 64, 64, {{80, 10}, {128, 0}}, rng);
        bad += run_case(k192, 2, 176, 16, 8, 32, {{70, 0}}, rng);
    }
    std::printf(bad ? "FAILED (%d bad elements)\n" : "all cases match the f64 reference\n", bad);
    return bad ? 1 : 0;
}
