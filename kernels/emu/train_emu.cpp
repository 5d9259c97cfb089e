// CPU emulation of the MoE training kernels (kernels/cuda/moe_train.cu: combine and dispatch
// backward, routing-weights backward, expert frequencies, balance loss, bias update) and the
// causal attention softmax forward/backward of kernels/cuda/train.cu, against transcriptions of
// the CPU oracle (core/src/model/moe.rs, core/src/model/mla.rs, core/src/ops/softmax.rs) in f64
// (f32 where the oracle's own rounding decides, e.g. sigmoid of the logits), without a GPU:
//
//   bash kernels/emu/run.sh train
//
// The kernels run on the emulator's runtime (include/emu.h: a fiber per CUDA thread, shuffles,
// __syncwarp and barriers emulated). Outputs start as NaN (every element a kernel must write and
// does not stays NaN) and rows past the launch carry sentinels. Timing means nothing here.
#include <emu.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../cuda/train.cu"
#include "../cuda/moe_train.cu"

static std::mt19937 rng(5);
static float randn() {
    static std::normal_distribution<float> nd;
    return nd(rng);
}
static int g_bad = 0, g_checked = 0;
static void check(double got, double want, double atol, double rtol, const std::string& what) {
    g_checked++;
    if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
        if (g_bad++ < 10) std::fprintf(stderr, "  %s: got %.8g want %.8g\n", what.c_str(), got, want);
    }
}
static float bfr(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// core's fastmath exp/sigmoid are the kernels' dsv3_exp/dsv3_sigmoid (common.cuh), used as is
static std::vector<double> scores(const float* l, int e, int scoring) {
    std::vector<double> s(e);
    if (scoring == 0) {
        for (int j = 0; j < e; j++) s[j] = dsv3_sigmoid(l[j]);
    } else {
        double m = -INFINITY, z = 0;
        for (int j = 0; j < e; j++) m = std::max(m, (double)l[j]);
        for (int j = 0; j < e; j++) z += s[j] = std::exp(l[j] - m);
        for (int j = 0; j < e; j++) s[j] /= z;
    }
    return s;
}
static std::vector<double> scores_bwd(const std::vector<double>& s, const std::vector<double>& ds, int scoring) {
    std::vector<double> dl(s.size());
    double dot = 0;
    for (size_t j = 0; j < s.size(); j++) dot += ds[j] * s[j];
    for (size_t j = 0; j < s.size(); j++) dl[j] = scoring == 0 ? ds[j] * s[j] * (1 - s[j]) : s[j] * (ds[j] - dot);
    return dl;
}

// routed rows: idx [n, k] distinct experts; slot_of a permutation of n·k rows (grouped by expert)
static void routing(int n, int e, int k, std::vector<int>& idx, std::vector<int>& slot_of) {
    idx.assign(n * k, 0);
    for (int t = 0; t < n; t++) {
        std::vector<int> p(e);
        for (int j = 0; j < e; j++) p[j] = j;
        std::shuffle(p.begin(), p.end(), rng);
        for (int q = 0; q < k; q++) idx[t * k + q] = p[q];
    }
    std::vector<int> order(n * k);
    for (int r = 0; r < n * k; r++) order[r] = r;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return idx[a] < idx[b]; });
    slot_of.assign(n * k, 0);
    for (int j = 0; j < n * k; j++) slot_of[order[j]] = j;
}

template <typename T>
static void combine_dispatch_case(int n, int k, int d, bool bf16) {
    const int e = 2 * k + 3, nk = n * k;
    std::vector<int> idx, slot_of;
    routing(n, e, k, idx, slot_of);
    std::vector<T> dy(n * d), ye(nk * d), dye(nk * d), dxe(nk * d), dx(n * d), dx0(n * d);
    std::vector<float> w(nk), dw(nk, NAN);
    auto put = [&](T& dst, float v) { dst = from_f32<T>(v); };
    for (auto& v : dy) put(v, randn());
    for (auto& v : ye) put(v, randn());
    for (auto& v : dxe) put(v, randn());
    for (auto& v : dx0) put(v, randn());
    for (auto& v : w) v = std::fabs(randn());
    for (auto& v : dye) put(v, NAN);
    for (int acc = 0; acc < 2; acc++) {
        dx = dx0;
        for (int b = 0; b < n; b++)
            emu::run_block({(unsigned)b, 0, 0}, 128, [&] {
                dispatch_bwd<T>(dxe.data(), slot_of.data(), n, k, d, dx.data(), acc);
            });
        for (int t = 0; t < n; t++)
            for (int j = 0; j < d; j++) {
                double want = acc ? to_f32(dx0[t * d + j]) : 0.0;
                for (int q = 0; q < k; q++) want += to_f32(dxe[(size_t)slot_of[t * k + q] * d + j]);
                check(to_f32(dx[t * d + j]), want, 1e-5, bf16 ? 8e-3 : 1e-5, "dispatch_bwd");
            }
    }
    for (int b = 0; b < (nk + 3) / 4; b++)
        emu::run_block({(unsigned)b, 0, 0}, 128, [&] {
            combine_bwd<T>(dy.data(), ye.data(), slot_of.data(), w.data(), nk, k, d, dye.data(), dw.data());
        });
    for (int r = 0; r < nk; r++) {
        const int t = r / k, s = slot_of[r];
        double dot = 0, mag = 0;
        for (int j = 0; j < d; j++) {
            double g = to_f32(dy[t * d + j]);
            dot += g * to_f32(ye[(size_t)s * d + j]);
            mag += std::fabs(g * to_f32(ye[(size_t)s * d + j]));
            check(to_f32(dye[(size_t)s * d + j]), w[r] * g, 1e-6, bf16 ? 8e-3 : 1e-6, "combine_bwd dye");
        }
        check(dw[r], dot, 1e-5 * mag, 0, "combine_bwd dw");
    }
    std::printf("combine/dispatch backward %-4s n %-3d k %d d %-4d ok so far (%d bad)\n", bf16 ? "bf16" : "f32", n, k,
                d, g_bad);
}

static void router_case(int n, int e, int k, int scoring, bool norm, float scaling) {
    std::vector<float> logits(n * e), dw(n * k), dl(n * e, NAN);
    for (auto& v : logits) v = 2 * randn();
    for (auto& v : dw) v = randn();
    std::vector<int> idx, slot_of;
    routing(n, e, k, idx, slot_of);
    for (int b = 0; b < (n + 3) / 4; b++)
        emu::run_block({(unsigned)b, 0, 0}, 128, [&] {
            moe_router_bwd(logits.data(), idx.data(), dw.data(), n, e, k, norm, scaling, scoring, dl.data());
        });
    for (int t = 0; t < n; t++) {
        auto sc = scores(&logits[t * e], e, scoring);
        std::vector<double> ds(e, 0.0);
        if (norm) {
            double z = 1e-20, dot = 0;
            for (int q = 0; q < k; q++) z += sc[idx[t * k + q]], dot += dw[t * k + q] * sc[idx[t * k + q]];
            for (int q = 0; q < k; q++) ds[idx[t * k + q]] += scaling * (dw[t * k + q] / z - dot / (z * z));
        } else {
            for (int q = 0; q < k; q++) ds[idx[t * k + q]] += scaling * dw[t * k + q];
        }
        auto want = scores_bwd(sc, ds, scoring);
        for (int j = 0; j < e; j++) check(dl[t * e + j], want[j], 1e-6, 1e-4, "router_bwd");
    }
    std::printf("router backward  n %-3d E %-3d k %-2d %s%s ok so far (%d bad)\n", n, e, k,
                scoring ? "softmax" : "sigmoid", norm ? " norm" : "", g_bad);
}

static void balance_case(const std::vector<int>& lens, int e, int k, int scoring, float alpha, float scale) {
    const int s_n = (int)lens.size();
    std::vector<int> start(1, 0), row_span;
    for (int s = 0; s < s_n; s++) {
        start.push_back(start.back() + lens[s]);
        for (int i = 0; i < lens[s]; i++) row_span.push_back(s);
    }
    const int n = start.back();
    std::vector<int> idx, slot_of;
    routing(n, e, k, idx, slot_of);
    std::vector<float> logits(n * e), f(s_n * e, NAN), row_loss(n, NAN), dl(n * e), dl0;
    std::vector<int> load(s_n * e, -1);
    for (auto& v : logits) v = randn();
    for (auto& v : dl) v = randn();
    dl0 = dl;
    for (int s = 0; s < s_n; s++)
        emu::run_block({(unsigned)s, 0, 0}, 256, [&] {
            moe_expert_freq(idx.data(), start.data(), e, k, f.data(), load.data());
        });
    int groups = 0;
    for (int l : lens) groups += l > 0;
    for (int b = 0; b < (n + 3) / 4; b++)
        emu::run_block({(unsigned)b, 0, 0}, 128, [&] {
            moe_balance_bwd(logits.data(), row_span.data(), start.data(), f.data(), n, e, scoring, alpha, scale,
                            groups, row_loss.data(), dl.data());
        });
    double total = 0, got = 0;
    for (int s = 0; s < s_n; s++) {
        if (!lens[s]) continue;
        const double t = lens[s];
        std::vector<double> fr(e, 0.0);
        std::vector<int> cnt(e, 0);
        for (int r = start[s]; r < start[s + 1]; r++)
            for (int q = 0; q < k; q++) cnt[idx[r * k + q]]++;
        for (int j = 0; j < e; j++) {
            fr[j] = cnt[j] * (double)e / (k * t);
            check(load[s * e + j], cnt[j], 0, 0, "expert_freq load");
            check(f[s * e + j], fr[j], 1e-6, 1e-5, "expert_freq f");
        }
        for (int r = start[s]; r < start[s + 1]; r++) {
            auto sc = scores(&logits[r * e], e, scoring);
            double sum = 0, fs = 0;
            for (int j = 0; j < e; j++) sum += sc[j], fs += fr[j] * sc[j];
            total += alpha * fs / (sum * t);
            got += row_loss[r];
            const double c = scale * alpha / (t * groups);
            std::vector<double> ds(e);
            for (int j = 0; j < e; j++) ds[j] = c * (fr[j] / sum - fs / (sum * sum));
            auto d = scores_bwd(sc, ds, scoring);
            for (int j = 0; j < e; j++) check(dl[r * e + j], dl0[r * e + j] + d[j], 1e-6, 1e-5, "balance dlogits");
        }
    }
    check(got / std::max(groups, 1), total / std::max(groups, 1), 1e-7, 1e-5, "balance loss");
    std::printf("balance loss     spans %-2d rows %-3d E %-3d k %d %s: loss %.6g ok so far (%d bad)\n", s_n, n, e, k,
                scoring ? "softmax" : "sigmoid", total / std::max(groups, 1), g_bad);
}

static void bias_case(int e) {
    std::vector<int> load(e);
    for (auto& v : load) v = (int)(rng() % 7);
    std::vector<float> bias(e), b0;
    for (auto& v : bias) v = randn();
    b0 = bias;
    emu::run_block({0, 0, 0}, 256, [&] { moe_bias_update(load.data(), e, 0.001f, bias.data()); });
    double mean = 0;
    for (int v : load) mean += v;
    mean /= e;
    for (int j = 0; j < e; j++) {
        double sg = mean > load[j] ? 1 : mean < load[j] ? -1 : 0;
        check(bias[j], b0[j] + 0.001 * sg, 1e-7, 0, "bias_update");
    }
    std::printf("bias update      E %-3d ok so far (%d bad)\n", e, g_bad);
}

static void attn_case(int mats, int t, int ld_pad, int mstride_pad) {
    const int ld = t + ld_pad;
    const long long ms = (long long)(t - 1) * ld + t + mstride_pad;
    const size_t len = (size_t)(mats - 1) * ms + (size_t)(t - 1) * ld + t + 16;
    std::vector<float> s(len, 12345.0f), dp(len, 12345.0f);
    const float scale = 0.125f;
    for (int m = 0; m < mats; m++)
        for (int i = 0; i < t; i++)
            for (int u = 0; u < t; u++) {
                size_t o = m * ms + (size_t)i * ld + u;
                s[o] = u <= i ? 3 * randn() : NAN;  // above the diagonal: never read
                dp[o] = u <= i ? randn() : NAN;
            }
    std::vector<float> s0 = s, dp0 = dp;
    // the launcher's grid (kernels/src/ops/train.rs): (T, min(mats, 65535)), matrices grid-stride
    const emu_dim3 grid{(unsigned)t, (unsigned)std::min(mats, 65535), 1};
    emu::launch(grid, 128, [&] { attn_softmax_causal_f32(s.data(), t, ld, ms, mats, scale); });
    std::vector<float> p = s;
    emu::launch(grid, 128, [&] { attn_softmax_bwd_f32(p.data(), dp.data(), t, ld, ms, mats, scale); });
    for (int m = 0; m < mats; m++)
        for (int i = 0; i < t; i++) {
            size_t o = (size_t)m * ms + (size_t)i * ld;
            double mx = -INFINITY, z = 0, dot = 0;
            for (int u = 0; u <= i; u++) mx = std::max(mx, (double)s0[o + u] * scale);
            std::vector<double> pr(t, 0.0);
            for (int u = 0; u <= i; u++) z += pr[u] = std::exp(s0[o + u] * scale - mx);
            for (int u = 0; u <= i; u++) pr[u] /= z, dot += pr[u] * dp0[o + u];
            for (int u = 0; u < t; u++) {
                check(p[o + u], pr[u], 1e-6, 1e-5, "attn softmax");
                double want = u <= i ? scale * pr[u] * (dp0[o + u] - dot) : 0.0;
                check(dp[o + u], want, 1e-6, 1e-4, "attn softmax backward");
            }
            for (int u = t; u < ld && i < t - 1; u++)  // row padding (the last row's may be the next matrix)
                if (s[o + u] != 12345.0f) check(1, 0, 0, 0, "attn padding written");
        }
    std::printf("attn softmax     mats %d t %-3d ld %-3d ok so far (%d bad)\n", mats, t, ld, g_bad);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    combine_dispatch_case<float>(7, 3, 70, false);
    combine_dispatch_case<bf16>(5, 4, 33, true);
    if (!quick) combine_dispatch_case<float>(33, 8, 257, false);
    router_case(9, 16, 4, 0, true, 2.5f);
    router_case(6, 64, 6, 1, false, 1.0f);
    router_case(5, 37, 3, 0, false, 1.5f);
    if (!quick) router_case(7, 256, 8, 0, true, 2.5f);
    balance_case({5, 0, 9, 3}, 16, 4, 0, 0.01f, 0.5f);
    balance_case({11}, 12, 2, 1, 0.1f, 1.0f);
    bias_case(16);
    bias_case(300);
    attn_case(3, 5, 2, 7);
    attn_case(2, 37, 0, 0);
    if (!quick) attn_case(2, 150, 3, 1);
    attn_case(65537, 2, 1, 0);  // heads x sequences past CUDA's 65535 grid.y: the y cap and its stride
    std::printf(g_bad ? "FAILED (%d of %d checks)\n" : "training kernels: %d checks against the oracle's math: all match\n",
                g_bad ? g_bad : g_checked, g_checked);
    return g_bad ? 1 : 0;
}
