// CPU emulation of the optimizer-step kernels (kernels/cuda/optim.cu: the gradient norm's f64
// partial sums of squares and their final reduction) against the trainer's host math (core's
// Trainer::apply_gradients: Σ g² in f64; the clip factor is applied inside AdamW, tested in
// kernels/tests/train.rs), without a GPU:
//
//   bash kernels/emu/run.sh optim
//
// Partial slots start as NaN and a sentinel follows the tensor's slots (a block that does not
// write its slot, or writes past it, shows). Timing means nothing here.
#include <emu.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../cuda/optim.cu"

static std::mt19937 rng(11);
static int g_bad = 0, g_checked = 0;
static void check(bool ok, const std::string& what) {
    g_checked++;
    if (!ok && g_bad++ < 10) std::fprintf(stderr, "  %s\n", what.c_str());
}

// the launcher's chunking (kernels/src/ops/optim.rs uses 16 Ki elements per block; smaller
// chunks here exercise several blocks, ragged last ones and empty threads)
static void sumsq_case(long long n, long long chunk, float scale_in) {
    std::normal_distribution<float> nd(0.0f, scale_in);
    std::vector<float> x(n);
    for (auto& v : x) v = nd(rng);
    long long blocks = (n + chunk - 1) / chunk;
    std::vector<double> partial(blocks + 1, NAN);
    partial[blocks] = 12345.0;
    for (long long b = 0; b < blocks; b++)
        emu::run_block({(unsigned)b, 0, 0}, 256, [&] { sumsq_f32(x.data(), n, chunk, partial.data()); });
    check(partial[blocks] == 12345.0, "sumsq wrote past its slots");
    long double want = 0;
    for (long long b = 0; b < blocks; b++) {
        long double pw = 0;
        for (long long i = b * chunk; i < std::min(n, (b + 1) * chunk); i++) pw += (long double)x[i] * x[i];
        want += pw;
        check(std::fabs(partial[b] - (double)pw) <= 1e-13 * (double)pw, "sumsq partial " + std::to_string(b));
    }
    double out = NAN;
    emu::run_block({0, 0, 0}, 1024, [&] { sum_f64(partial.data(), (int)blocks, &out); });
    check(std::fabs(out - (double)want) <= 1e-13 * (double)want, "sum_f64 n " + std::to_string(n));
    // the norm the trainer reports: sqrt in f64, then f32 (core's libm::sqrt(sq) as f32)
    float norm = (float)std::sqrt(out), wantn = (float)std::sqrt((double)want);
    check(norm == wantn || std::fabs(norm - wantn) <= 1e-7f * wantn, "norm n " + std::to_string(n));
    std::printf("sumsq            n %-8lld chunk %-6lld blocks %-4lld norm %.6g ok so far (%d bad)\n", n, chunk, blocks,
                norm, g_bad);
}

static void nonfinite_case() {
    std::vector<float> x(3000, 0.5f);
    x[1777] = NAN;
    std::vector<double> partial(3, NAN);
    for (unsigned b = 0; b < 3; b++) emu::run_block({b, 0, 0}, 256, [&] { sumsq_f32(x.data(), 3000, 1024, partial.data()); });
    double out = 0;
    emu::run_block({0, 0, 0}, 1024, [&] { sum_f64(partial.data(), 3, &out); });
    check(std::isnan(out), "a NaN gradient gives a NaN sum");
    x[1777] = INFINITY;
    for (unsigned b = 0; b < 3; b++) emu::run_block({b, 0, 0}, 256, [&] { sumsq_f32(x.data(), 3000, 1024, partial.data()); });
    emu::run_block({0, 0, 0}, 1024, [&] { sum_f64(partial.data(), 3, &out); });
    check(std::isinf(out), "an infinite gradient gives an infinite sum");
    double empty = NAN;
    emu::run_block({0, 0, 0}, 1024, [&] { sum_f64(partial.data(), 0, &empty); });
    check(empty == 0.0, "sum of no partials is 0");
    std::printf("non-finite sums  ok so far (%d bad)\n", g_bad);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    sumsq_case(1, 16384, 1.0f);
    sumsq_case(1000, 256, 3.0f);
    sumsq_case(5000, 1024, 1e-3f);
    sumsq_case(40000, 16384, 10.0f);
    if (!quick) sumsq_case(300000, 1000, 1.0f);
    nonfinite_case();
    std::printf(g_bad ? "FAILED (%d of %d checks)\n" : "optimizer kernels: %d checks against the host math: all match\n",
                g_bad ? g_bad : g_checked, g_checked);
    return g_bad ? 1 : 0;
}
