// CPU emulation of the per-row training kernels of kernels/cuda/train.cu that train_emu.cpp does
// not cover: RMSNorm, SwiGLU, RoPE (as the adjoint of rope.cu's forward) and embedding backward,
// softmax cross-entropy (masked, padded rows, denominator 0), against f64 transcriptions of the CPU
// oracle (core/src/ops/{norm,swiglu,rope,loss}.rs), without a GPU:
//
//   bash kernels/emu/run.sh train_rows
#include <emu.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../cuda/train.cu"
#include "../cuda/rope.cu"
#include "../cuda/elementwise.cu"

static std::mt19937 rng(7);
static float randn() {
    static std::normal_distribution<float> nd;
    return nd(rng);
}
static int g_bad = 0, g_checked = 0;
static void check(double got, double want, double atol, double rtol, const std::string& what) {
    g_checked++;
    if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
        if (g_bad++ < 20) std::fprintf(stderr, "  %s: got %.8g want %.8g\n", what.c_str(), got, want);
    }
}

static void rmsnorm_case(int rows, int d, int ldx, int lddy, int lddx) {
    std::vector<float> x(rows * ldx + 3, NAN), dy(rows * lddy + 3, NAN), dx(rows * lddx + 3, 777.0f), w(d), dw(d);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < d; j++) x[r * ldx + j] = randn(), dy[r * lddy + j] = randn();
    for (int j = 0; j < d; j++) w[j] = randn(), dw[j] = randn();
    std::vector<float> dw0 = dw;
    const float eps = 1e-6f;
    // the launcher's split (ops::train::rmsnorm_backward): `per` rows a block for 2 x 132 blocks,
    // the blocks' partials then summed into dw in block order
    const int per = (rows + 263) / 264, blocks = (rows + per - 1) / per;
    std::vector<float> part((size_t)blocks * d, NAN);
    for (int b = 0; b < blocks; b++)
        emu::run_block({(unsigned)b, 0, 0}, 256, [&] {
            rmsnorm_bwd_f32(x.data(), ldx, w.data(), dy.data(), lddy, dx.data(), lddx, part.data(), d, eps, rows, per);
        });
    emu::launch({(unsigned)((d + 255) / 256), 1, 1}, 256, [&] { rmsnorm_dw_reduce(part.data(), blocks, d, dw.data()); });
    std::vector<double> dwr(d, 0.0);
    for (int r = 0; r < rows; r++) {
        double ss = 0, dot = 0;
        for (int j = 0; j < d; j++) ss += (double)x[r * ldx + j] * x[r * ldx + j];
        double inv = 1.0 / std::sqrt(ss / d + eps);
        for (int j = 0; j < d; j++) dot += (double)w[j] * dy[r * lddy + j] * x[r * ldx + j];
        double c = inv * inv * inv * dot / d;
        for (int j = 0; j < d; j++) {
            check(dx[r * lddx + j], inv * w[j] * dy[r * lddy + j] - c * x[r * ldx + j], 1e-5, 1e-4, "rmsnorm_bwd dx");
            dwr[j] += (double)dy[r * lddy + j] * x[r * ldx + j] * inv;
        }
        for (int j = d; j < lddx && r < rows - 1; j++) check(dx[r * lddx + j], 777.0, 0, 0, "rmsnorm_bwd dx padding");
    }
    for (int j = 0; j < d; j++) check(dw[j], dw0[j] + dwr[j], 1e-4, 1e-4, "rmsnorm_bwd dw");
    std::printf("rmsnorm bwd      rows %-3d d %-4d ok so far (%d bad)\n", rows, d, g_bad);
}

static void swiglu_case(int rows, int inter, int ld, int ldda, int lddgu) {
    std::vector<float> gu(rows * ld, NAN), da(rows * ldda, NAN), dgu(rows * lddgu, 777.0f);
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < 2 * inter; i++) gu[r * ld + i] = 2 * randn();
        for (int i = 0; i < inter; i++) da[r * ldda + i] = randn();
    }
    // the launchers' grid (ops::train::swiglu_backward, ops::elementwise::swiglu): rows capped at
    // 65535 in y, walked grid-stride
    const emu_dim3 grid{(unsigned)((inter + 255) / 256), (unsigned)std::min(rows, 65535), 1};
    emu::launch(grid, 256, [&] { swiglu_bwd_f32(gu.data(), ld, da.data(), ldda, dgu.data(), lddgu, inter, rows); });
    std::vector<float> fwd(rows * ldda, 777.0f);
    emu::launch(grid, 256, [&] { swiglu_f32(gu.data(), ld, fwd.data(), ldda, inter, rows); });
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < inter; i++) {
            double g = gu[r * ld + i], u = gu[r * ld + inter + i], a = da[r * ldda + i];
            double s = 1 / (1 + std::exp(-g));
            // d/dg (g·σ(g)·u) and d/du
            check(dgu[r * lddgu + i], a * u * s * (1 + g * (1 - s)), 1e-5, 1e-4, "swiglu_bwd dg");
            check(dgu[r * lddgu + inter + i], a * g * s, 1e-5, 1e-4, "swiglu_bwd du");
            check(fwd[(size_t)r * ldda + i], g * s * u, 1e-5, 1e-4, "swiglu forward");
        }
    std::printf("swiglu bwd       rows %-3d inter %-4d ok so far (%d bad)\n", rows, inter, g_bad);
}

// rope_bwd is the transpose of rope: <rope(x), g> = <x, rope_bwd(g)> for every x, g; and
// rope_bwd(rope(x)) = attn_factor² · x (a rotation scaled by the factor).
static void rope_case(int rows, int heads, int ld_head, int offset, int half, float af) {
    const int ld_row = heads * ld_head + 5;
    const size_t len = (size_t)rows * ld_row;
    std::vector<float> x(len), g(len), inv_freq(half);
    std::vector<int> pos(rows);
    for (auto& v : x) v = randn();
    for (auto& v : g) v = randn();
    for (int i = 0; i < half; i++) inv_freq[i] = std::pow(10000.0f, -2.0f * i / (2 * half));
    for (int r = 0; r < rows; r++) pos[r] = 3 * r + 1;
    std::vector<float> rx = x, bg = g;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++)
            emu::run_block({(unsigned)r, (unsigned)h, 0}, ((half + 31) / 32) * 32, [&] {
                rope_f32(rx.data(), rows, ld_row, heads, ld_head, offset, half, pos.data(), inv_freq.data(), af);
            });
    for (int r = 0; r < rows; r++)
        for (unsigned hb = 0; hb < (unsigned)((heads + 63) / 64); hb++)
            emu::run_block({(unsigned)r, hb, 0}, 64, [&] {
                rope_bwd_f32(bg.data(), rows, ld_row, heads, ld_head, offset, half, pos.data(), inv_freq.data(), af);
            });
    std::vector<float> brx = rx;
    for (int r = 0; r < rows; r++)
        for (unsigned hb = 0; hb < (unsigned)((heads + 63) / 64); hb++)
            emu::run_block({(unsigned)r, hb, 0}, 64, [&] {
                rope_bwd_f32(brx.data(), rows, ld_row, heads, ld_head, offset, half, pos.data(), inv_freq.data(), af);
            });
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            const size_t o = (size_t)r * ld_row + (size_t)h * ld_head + offset;
            double lhs = 0, rhs = 0;
            for (int j = 0; j < 2 * half; j++) {
                lhs += (double)rx[o + j] * g[o + j];
                rhs += (double)x[o + j] * bg[o + j];
                check(brx[o + j], (double)af * af * x[o + j], 1e-5, 1e-4, "rope_bwd(rope(x))");
            }
            check(lhs, rhs, 1e-4, 1e-4, "rope adjoint");
        }
    // outside the rotated dims nothing changes
    for (size_t i = 0; i < len; i++) {
        size_t in_row = i % ld_row;
        bool rotated = in_row < (size_t)heads * ld_head && (int)(in_row % ld_head) >= offset &&
                       (int)(in_row % ld_head) < offset + 2 * half;
        if (!rotated) check(bg[i], g[i], 0, 0, "rope_bwd untouched");
    }
    std::printf("rope bwd         rows %-3d heads %-2d half %-3d ok so far (%d bad)\n", rows, heads, half, g_bad);
}

static void embed_case(int tokens, int vocab, int d, int lddy) {
    std::vector<int> ids(tokens);
    for (auto& v : ids) v = (int)(rng() % (vocab + 2)) - 1;  // some out of range: skipped
    std::vector<float> dy(tokens * lddy), t(vocab * d);
    for (auto& v : dy) v = randn();
    for (auto& v : t) v = randn();
    if (tokens > 1000)  // thousands of rows per id: multiples of 1/64, so every f32 partial sum is exact
        for (auto* w : {&dy, &t})
            for (auto& v : *w) v = std::round(v * 64) / 64;
    std::vector<double> want(t.begin(), t.end());
    for (int k = 0; k < tokens; k++)
        if (ids[k] >= 0 && ids[k] < vocab)
            for (int j = 0; j < d; j++) want[(size_t)ids[k] * d + j] += dy[k * lddy + j];
    // the host's grouping (ops::train::EmbedRows): [order, start, id], tokens by id in token order
    std::vector<int> order;
    for (int k = 0; k < tokens; k++)
        if (ids[k] >= 0 && ids[k] < vocab) order.push_back(k);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[a] < ids[b]; });
    std::vector<int> start, seg_id;
    for (size_t i = 0; i < order.size(); i++)
        if (seg_id.empty() || seg_id.back() != ids[order[i]]) start.push_back((int)i), seg_id.push_back(ids[order[i]]);
    start.push_back((int)order.size());
    const int m = (int)order.size(), segs = (int)seg_id.size();
    std::vector<int> rows(order);
    rows.insert(rows.end(), start.begin(), start.end());
    rows.insert(rows.end(), seg_id.begin(), seg_id.end());
    // the launcher's grid (ops::train::embedding_backward): ids capped at 65535 in y, grid-stride
    const emu_dim3 grid{(unsigned)((d + 255) / 256), (unsigned)std::min(std::max(segs, 1), 65535), 1};
    if (segs > 0) emu::launch(grid, 256, [&] { embed_bwd_f32(rows.data(), m, segs, dy.data(), lddy, t.data(), d); });
    for (size_t i = 0; i < t.size(); i++) check(t[i], want[i], 1e-5, 1e-5, "embed_bwd");
    std::printf("embedding bwd    tokens %-3d vocab %-4d d %-3d ok so far (%d bad)\n", tokens, vocab, d, g_bad);
}

static void ce_case(int rows, int vocab, int ldz, bool masked, float denom) {
    std::vector<float> z(rows * ldz, NAN), dz(rows * ldz, 777.0f), loss(rows, NAN), mask(rows);
    std::vector<int> tg(rows);
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < vocab; j++) z[r * ldz + j] = 3 * randn();
        tg[r] = (int)(rng() % vocab);
        mask[r] = masked ? (float)(r % 3 != 1) * 0.75f : 1.0f;
    }
    for (int r = 0; r < rows; r++)
        emu::run_block({(unsigned)r, 0, 0}, 256, [&] {
            cross_entropy_f32(z.data(), ldz, tg.data(), masked ? mask.data() : nullptr, denom, dz.data(), ldz,
                              loss.data(), vocab, rows);
        });
    for (int r = 0; r < rows; r++) {
        const float* zr = &z[r * ldz];
        double m = -INFINITY, s = 0;
        for (int j = 0; j < vocab; j++) m = std::max(m, (double)zr[j]);
        for (int j = 0; j < vocab; j++) s += std::exp(zr[j] - m);
        double lse = m + std::log(s), wgt = mask[r];
        bool off = wgt == 0 || denom == 0;
        check(loss[r], off ? 0.0 : wgt * (lse - zr[tg[r]]), 1e-5, 1e-5, "cross_entropy row loss");
        for (int j = 0; j < vocab; j++) {
            double want = off ? 0.0 : (std::exp(zr[j] - lse) - (j == tg[r])) * wgt / denom;
            check(dz[r * ldz + j], want, 1e-7, 1e-4, "cross_entropy dz");
        }
        for (int j = vocab; j < ldz && r < rows - 1; j++) check(dz[r * ldz + j], 777.0, 0, 0, "cross_entropy padding");
    }
    std::printf("cross-entropy    rows %-3d vocab %-5d mask %d ok so far (%d bad)\n", rows, vocab, masked, g_bad);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    rmsnorm_case(5, 37, 40, 37, 41);
    rmsnorm_case(3, 512, 512, 1024, 512);
    rmsnorm_case(1000, 33, 35, 33, 34);  // 4 rows a block, the last block fewer
    if (!quick) rmsnorm_case(4, 1000, 1003, 1000, 1001);
    swiglu_case(4, 300, 600, 300, 600);
    swiglu_case(3, 17, 40, 20, 34);
    rope_case(4, 3, 96, 64, 16, 1.0f);   // queries: heads of dn + dr, rope on the last dr
    rope_case(5, 1, 160, 128, 16, 1.3f); // the shared key after the latent
    if (!quick) rope_case(3, 70, 40, 8, 16, 0.9f);
    embed_case(9, 11, 300, 301);
    embed_case(4, 3, 8, 8);
    // row counts past CUDA's 65535 grid.y (batch 8 x 8192 tokens and more): the y cap and its
    // stride, tiny rows so the 65535 blocks stay cheap
    swiglu_case(65536 + 7, 3, 6, 3, 7);
    embed_case(65536 + 9, 5, 2, 3);
    embed_case(70010, 70000, 3, 3);  // more ids than grid.y's 65535
    ce_case(4, 700, 703, false, 4.0f);
    ce_case(5, 300, 300, true, 2.25f);
    ce_case(2, 50, 50, false, 0.0f);
    std::printf(g_bad ? "FAILED (%d of %d checks)\n" : "train.cu row kernels: %d checks against the oracle's math: all match\n",
                g_bad ? g_bad : g_checked, g_checked);
    return g_bad ? 1 : 0;
}
