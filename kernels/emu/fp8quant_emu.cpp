// CPU emulation of the FP8 quantization kernels that walk their rows grid-stride
// (kernels/cuda/fp8quant.cu: quant_1x128_* per token, quant_t128_* along the tokens, transposed)
// and quant_block128_* batched over grid.z (weights, with their transpose), and
// quant_t128_groups_* (every MoE expert's Wgrad operand in one launch, 128-aligned segments)
// on the launcher's grid (kernels/src/ops/fp8.rs: the row count capped at 65535 in grid.y),
// against a plain host loop over the same rounding helpers (fp8.cuh's fp8_scale, encode_e4m3:
// their match with the CPU oracle is the GPU tests' part, kernels/tests/fp8.rs). Bit for bit,
// NaN-filled padding and scale slots untouched past the tensor. Without a GPU:
//
//   bash kernels/emu/run.sh fp8quant
//
// quant_1x128w_* (a warp per group) is compared bit for bit against quant_1x128_* on the same input.
// Cases: ragged shapes, a row count past 65535 for quant_1x128 (tiny rows keep it cheap), and
// forced small grid.y (2, 3) so the grid-stride loops take several turns (quant_t128 would need
// 8.4M rows to pass 65535 row blocks). quant_t128_groups is compared bit for bit against the
// existing quant_t128 kernel run per expert (f32 and bf16 inputs; empty experts, counts not
// multiples of 128, experts over 128 tokens, a first row past 0, forced small grid.y), its
// segment padding zero and everything past the segments untouched. Timing means nothing here.
#include <emu.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda/fp8quant.cu"

static std::mt19937 rng(13);
static float randn() {
    static std::normal_distribution<float> nd;
    return nd(rng);
}
static int g_bad = 0, g_checked = 0;
static void check(bool ok, const std::string& what) {
    g_checked++;
    if (!ok && g_bad++ < 10) std::fprintf(stderr, "  %s\n", what.c_str());
}
static bool same(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

static std::vector<float> input(int rows, int cols, int ldx) {
    std::vector<float> x((size_t)rows * ldx, NAN);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) x[(size_t)r * ldx + c] = randn() * (1 + r % 5) * (c % 7 == 3 ? 40.0f : 1.0f);
    return x;
}

// grid_y: 0 = the launcher's min(rows, 65535), else forced
static void q1x128_case(int rows, int cols, int ldx, int pow2, unsigned grid_y) {
    const int cb = (cols + 127) / 128, ldq = cols + 3;
    std::vector<float> x = input(rows, cols, ldx);
    std::vector<uint8_t> q((size_t)rows * ldq, 0xAB);
    std::vector<float> sc((size_t)rows * cb + 1, NAN);
    const unsigned gy = grid_y ? grid_y : (unsigned)std::min(rows, 65535);
    emu::launch({(unsigned)cb, gy, 1}, 128,
                [&] { quant_1x128_f32(x.data(), ldx, q.data(), ldq, sc.data(), cb, 1, rows, cols, pow2); });
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < cb; b++) {
            float amax = 0.0f;
            for (int c = b * 128; c < std::min(cols, b * 128 + 128); c++) amax = std::max(amax, std::fabs(x[(size_t)r * ldx + c]));
            const float s = fp8_scale(amax, pow2);
            check(same(sc[(size_t)r * cb + b], s), "quant_1x128 scale row " + std::to_string(r));
            for (int c = b * 128; c < std::min(cols, b * 128 + 128); c++)
                check(q[(size_t)r * ldq + c] == encode_e4m3(__fdiv_rn(x[(size_t)r * ldx + c], s)),
                      "quant_1x128 code row " + std::to_string(r) + " col " + std::to_string(c));
            if (b == cb - 1)
                for (int c = cols; c < ldq; c++) check(q[(size_t)r * ldq + c] == 0xAB, "quant_1x128 padding written");
        }
    check(std::isnan(sc[(size_t)rows * cb]), "quant_1x128 scale past the tensor written");
    std::printf("quant_1x128      rows %-6d cols %-4d pow2 %d grid.y %-5u ok so far (%d bad)\n", rows, cols, pow2, gy,
                g_bad);
}

// quant_1x128w (a warp per 128-column group) against quant_1x128 (a block per group) on the same
// input, bit for bit: codes, scales, padding and the slot past the scales untouched. T: float or
// bf16; ldx, ldq and the offsets of x and q choose the vector path (all multiples of 4) or the
// element path; `blocks` forces a small grid so the grid-stride loop takes several turns.
template <typename T>
static void q1x128w_case(int rows, int cols, int ldx, int ldq, int x_off, int q_off, int pow2, unsigned blocks) {
    const int cb = (cols + 127) / 128;
    std::vector<float> xf = input(rows, cols, ldx);
    if (rows > 1 && cols > 5) xf[(size_t)1 * ldx + 5] = NAN;  // a NaN input: its code and its group's scale
    std::vector<T> x(xf.size() + x_off);
    for (size_t i = 0; i < xf.size(); i++) x[i + x_off] = from_f32<T>(xf[i]);
    std::vector<uint8_t> q1((size_t)rows * ldq + q_off, 0xAB), q2(q1);
    std::vector<float> s1((size_t)rows * cb + 1, NAN), s2(s1);
    const T* xp = x.data() + x_off;
    emu::launch({(unsigned)cb, (unsigned)std::min(rows, 65535), 1}, 128, [&] {
        if constexpr (std::is_same<T, float>::value)
            quant_1x128_f32(xp, ldx, q1.data() + q_off, ldq, s1.data(), cb, 1, rows, cols, pow2);
        else
            quant_1x128_bf16(xp, ldx, q1.data() + q_off, ldq, s1.data(), cb, 1, rows, cols, pow2);
    });
    const long long groups = (long long)rows * cb;
    const unsigned gx = blocks ? blocks : (unsigned)std::min<long long>((groups + 7) / 8, 132 * 8);
    emu::launch({gx, 1, 1}, 256, [&] {
        if constexpr (std::is_same<T, float>::value)
            quant_1x128w_f32(xp, ldx, q2.data() + q_off, ldq, s2.data(), cb, 1, rows, cols, pow2);
        else
            quant_1x128w_bf16(xp, ldx, q2.data() + q_off, ldq, s2.data(), cb, 1, rows, cols, pow2);
    });
    for (size_t i = 0; i < q1.size(); i++) check(q1[i] == q2[i], "quant_1x128w code byte " + std::to_string(i));
    for (size_t i = 0; i < s1.size(); i++) check(same(s1[i], s2[i]), "quant_1x128w scale " + std::to_string(i));
    check(std::isnan(s2[(size_t)rows * cb]), "quant_1x128w scale past the tensor written");
    std::printf("quant_1x128w %-4s rows %-6d cols %-4d ldx %-4d ldq %-4d offs %d/%d pow2 %d blocks %-4u ok so far (%d bad)\n",
                std::is_same<T, float>::value ? "f32" : "bf16", rows, cols, ldx, ldq, x_off, q_off, pow2, gx, g_bad);
}

// ldq_pad: the transposed output's row padding (5: byte stores; a multiple of 4 with rows % 4 == 0:
// the 32-bit stores)
static void qt128_case(int rows, int cols, int ldx, int pow2, unsigned grid_y, int ldq_pad = 5) {
    const int rb = (rows + 127) / 128, ldq = rows + ldq_pad;
    std::vector<float> x = input(rows, cols, ldx);
    std::vector<uint8_t> qt((size_t)cols * ldq, 0xAB);
    std::vector<float> sc((size_t)cols * rb + 1, NAN);
    const unsigned gy = grid_y ? grid_y : (unsigned)std::min(rb, 65535);
    emu::launch({(unsigned)((cols + 31) / 32), gy, 1}, 256,
                [&] { quant_t128_f32(x.data(), ldx, qt.data(), ldq, sc.data(), rb, 1, rows, cols, pow2); });
    for (int c = 0; c < cols; c++)
        for (int b = 0; b < rb; b++) {
            float amax = 0.0f;
            for (int r = b * 128; r < std::min(rows, b * 128 + 128); r++) amax = std::max(amax, std::fabs(x[(size_t)r * ldx + c]));
            const float s = fp8_scale(amax, pow2);
            check(same(sc[(size_t)c * rb + b], s), "quant_t128 scale col " + std::to_string(c));
            for (int r = b * 128; r < std::min(rows, b * 128 + 128); r++)
                check(qt[(size_t)c * ldq + r] == encode_e4m3(__fdiv_rn(x[(size_t)r * ldx + c], s)),
                      "quant_t128 code col " + std::to_string(c) + " row " + std::to_string(r));
        }
    for (int c = 0; c < cols; c++)
        for (int r = rows; r < ldq; r++) check(qt[(size_t)c * ldq + r] == 0xAB, "quant_t128 padding written");
    check(std::isnan(sc[(size_t)cols * rb]), "quant_t128 scale past the tensor written");
    std::printf("quant_t128       rows %-6d cols %-4d pow2 %d grid.y %-5u ok so far (%d bad)\n", rows, cols, pow2, gy,
                g_bad);
}

// quant_block128 batched over grid.z (the experts of a grouped weight in one launch, the training
// pass's Fp8Weights::refresh): matrix z at x + z * bx, outputs packed per matrix, with the transpose.
static void qb128_case(int rows, int cols, int ldx, int batch, long long bx, int pow2) {
    const int rb = (rows + 127) / 128, cb = (cols + 127) / 128;
    const size_t nc = (size_t)rows * cols, ns = (size_t)rb * cb;
    std::vector<float> x((size_t)(batch - 1) * bx + (size_t)rows * ldx, NAN);
    for (int z = 0; z < batch; z++)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                x[(size_t)z * bx + (size_t)r * ldx + c] = randn() * (1 + (r / 128 + z) % 4) * (c % 11 == 5 ? 30.0f : 1.0f);
    std::vector<uint8_t> q(batch * nc + 3, 0xAB), qt(batch * nc + 3, 0xAB);
    std::vector<float> sc(batch * ns + 1, NAN), st(batch * ns + 1, NAN);
    emu::launch({(unsigned)cb, (unsigned)rb, (unsigned)batch}, 256, [&] {
        quant_block128_f32(x.data(), ldx, q.data(), sc.data(), qt.data(), st.data(), rows, cols, pow2, bx);
    });
    for (int z = 0; z < batch; z++)
        for (int br = 0; br < rb; br++)
            for (int bc = 0; bc < cb; bc++) {
                float amax = 0.0f;
                for (int r = br * 128; r < std::min(rows, br * 128 + 128); r++)
                    for (int c = bc * 128; c < std::min(cols, bc * 128 + 128); c++)
                        amax = std::max(amax, std::fabs(x[(size_t)z * bx + (size_t)r * ldx + c]));
                const float s = fp8_scale(amax, pow2);
                const std::string at = "matrix " + std::to_string(z) + " block " + std::to_string(br) + "," + std::to_string(bc);
                check(same(sc[z * ns + (size_t)br * cb + bc], s), "quant_block128 scale " + at);
                check(same(st[z * ns + (size_t)bc * rb + br], s), "quant_block128 transposed scale " + at);
                for (int r = br * 128; r < std::min(rows, br * 128 + 128); r++)
                    for (int c = bc * 128; c < std::min(cols, bc * 128 + 128); c++) {
                        const uint8_t want = encode_e4m3(__fdiv_rn(x[(size_t)z * bx + (size_t)r * ldx + c], s));
                        check(q[z * nc + (size_t)r * cols + c] == want, "quant_block128 code " + at);
                        check(qt[z * nc + (size_t)c * rows + r] == want, "quant_block128 transposed code " + at);
                    }
            }
    check(q[batch * nc] == 0xAB && qt[batch * nc] == 0xAB, "quant_block128 codes past the batch written");
    check(std::isnan(sc[batch * ns]) && std::isnan(st[batch * ns]), "quant_block128 scales past the batch written");
    std::printf("quant_block128   rows %-6d cols %-4d pow2 %d batch %-3d ok so far (%d bad)\n", rows, cols, pow2, batch,
                g_bad);
}

// quant_t128_groups (one launch over the experts' rows; segments 128-aligned, as the launcher's
// t128_segments) against quant_t128 run per expert on its rows alone, bit for bit. T: float or bf16.
template <typename T>
static void qt128_groups_case(const std::vector<int>& counts, int first, int cols, int ldx, int pow2, unsigned grid_y,
                              int ldq_pad = 7) {
    const int G = (int)counts.size();
    std::vector<int> offs(2 * G + 2);
    offs[0] = first;
    offs[G + 1] = 0;
    for (int e = 0; e < G; e++) {
        offs[e + 1] = offs[e] + counts[e];
        offs[G + 2 + e] = offs[G + 1 + e] + (counts[e] + 127) / 128 * 128;
    }
    const int rows = offs[G], total = offs[2 * G + 1], nb = total / 128, ldq = total + ldq_pad;
    // never zeros: the random input of every case, NaN in the row padding and before `first`
    std::vector<float> xf = input(rows, cols, ldx);
    for (int r = 0; r < first; r++)
        for (int c = 0; c < ldx; c++) xf[(size_t)r * ldx + c] = NAN;
    std::vector<T> x(xf.size());
    for (size_t i = 0; i < xf.size(); i++) x[i] = from_f32<T>(xf[i]);
    std::vector<uint8_t> qt((size_t)cols * ldq, 0xAB);
    std::vector<float> sc((size_t)cols * nb + 1, NAN);
    const unsigned gy = grid_y ? grid_y : (unsigned)std::max(1, std::min(nb, 65535));
    if (nb > 0)
        emu::launch({(unsigned)((cols + 31) / 32), gy, 1}, 256, [&] {
            if constexpr (std::is_same<T, float>::value)
                quant_t128_groups_f32(x.data(), ldx, qt.data(), ldq, sc.data(), nb, 1, offs.data(), G, cols, pow2);
            else
                quant_t128_groups_bf16(x.data(), ldx, qt.data(), ldq, sc.data(), nb, 1, offs.data(), G, cols, pow2);
        });
    for (int e = 0; e < G; e++) {
        const int n = counts[e], rb = (n + 127) / 128, s0 = offs[G + 1 + e];
        const std::string at = "quant_t128_groups expert " + std::to_string(e) + " (" + std::to_string(n) + " rows)";
        if (n == 0) continue;
        // the existing kernel on this expert's rows alone: codes [cols, n], scales [cols, rb]
        std::vector<uint8_t> qe((size_t)cols * n, 0xCD);
        std::vector<float> se((size_t)cols * rb, NAN);
        const T* xe = x.data() + (size_t)offs[e] * ldx;
        emu::launch({(unsigned)((cols + 31) / 32), (unsigned)std::min(rb, 65535), 1}, 256, [&] {
            if constexpr (std::is_same<T, float>::value)
                quant_t128_f32(xe, ldx, qe.data(), n, se.data(), rb, 1, n, cols, pow2);
            else
                quant_t128_bf16(xe, ldx, qe.data(), n, se.data(), rb, 1, n, cols, pow2);
        });
        for (int c = 0; c < cols; c++) {
            for (int b = 0; b < rb; b++)
                check(same(sc[(size_t)c * nb + s0 / 128 + b], se[(size_t)c * rb + b]),
                      at + " scale col " + std::to_string(c) + " block " + std::to_string(b));
            for (int t = 0; t < n; t++)
                check(qt[(size_t)c * ldq + s0 + t] == qe[(size_t)c * n + t],
                      at + " code col " + std::to_string(c) + " token " + std::to_string(t));
            for (int t = n; t < offs[G + 2 + e] - s0; t++)
                check(qt[(size_t)c * ldq + s0 + t] == 0, at + " segment padding not zero");
        }
    }
    for (int c = 0; c < cols; c++)
        for (int t = total; t < ldq; t++) check(qt[(size_t)c * ldq + t] == 0xAB, "quant_t128_groups past the segments written");
    check(std::isnan(sc[(size_t)cols * nb]), "quant_t128_groups scale past the tensor written");
    std::printf("quant_t128_groups %-4s experts %-3d rows %-5d segments %-5d cols %-4d pow2 %d grid.y %-4u ok so far (%d bad)\n",
                std::is_same<T, float>::value ? "f32" : "bf16", G, rows, total, cols, pow2, gy, g_bad);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    q1x128_case(5, 300, 301, 0, 0);
    q1x128_case(7, 128, 128, 1, 3);   // grid-stride: 3 blocks in y walk 7 rows
    q1x128_case(65536 + 5, 3, 3, 0, 0);  // tokens past CUDA's 65535 grid.y: the launcher caps y
    if (!quick) q1x128_case(9, 1000, 1003, 1, 2);
    // the warp-per-group form: vector path (everything 4-aligned), element path (odd ldx, ldq or
    // offsets), ragged cols (a partial last group and a partial last lane), grid-stride turns
    q1x128w_case<float>(7, 300, 300, 300, 0, 0, 0, 0);
    q1x128w_case<bf16>(7, 300, 304, 304, 0, 0, 1, 0);
    q1x128w_case<bf16>(5, 301, 305, 303, 0, 0, 0, 0);
    q1x128w_case<float>(6, 256, 260, 256, 1, 0, 0, 0);  // x offset by one element: element path
    q1x128w_case<bf16>(6, 256, 256, 256, 0, 2, 1, 0);   // q offset by two bytes: element path
    q1x128w_case<float>(33, 130, 132, 132, 0, 0, 1, 3);  // 66 groups over 3 blocks of 8 warps
    q1x128w_case<bf16>(65536 + 5, 3, 4, 4, 0, 0, 0, 0);  // many rows, a one-lane group
    if (!quick) q1x128w_case<float>(9, 1000, 1003, 1001, 0, 0, 1, 2);
    qt128_case(300, 70, 71, 0, 0);
    qt128_case(700, 33, 40, 1, 2);  // 6 row blocks over grid.y 2 (the shared tiles refilled per turn)
    qt128_case(129, 5, 5, 0, 1);
    if (!quick) qt128_case(1100, 64, 64, 0, 3);
    qt128_case(256, 40, 40, 1, 0, 4);  // 4-byte aligned output rows: the 32-bit code stores
    qt128_case(301, 9, 12, 0, 2, 3);   // rows + 3 = 304: aligned rows, a ragged last block
    qb128_case(300, 200, 203, 3, 300 * 203 + 17, 0);  // ragged blocks, padded rows, gaps between matrices
    qb128_case(128, 256, 256, 1, 0, 1);
    if (!quick) qb128_case(257, 130, 130, 4, 257 * 130, 1);
    // experts: empty ones (first, middle, last), counts below / at / past 128 and ragged
    qt128_groups_case<float>({0, 5, 128, 0, 300, 1, 129, 0}, 0, 70, 71, 0, 0);
    qt128_groups_case<bf16>({3, 0, 257, 127, 0}, 2, 33, 40, 1, 0);  // rows start past 0 (x's row 2)
    qt128_groups_case<float>({200, 0, 0, 61, 400}, 0, 64, 64, 0, 2);  // 9 token blocks over grid.y 2
    qt128_groups_case<float>({0, 0}, 0, 5, 5, 0, 0);  // no rows at all: nothing launched, nothing written
    qt128_groups_case<bf16>({3, 0, 257, 127, 0}, 0, 33, 40, 1, 0, 8);  // aligned output rows (32-bit stores)
    if (!quick) {
        qt128_groups_case<bf16>({1000, 1, 0, 333, 128, 256, 7}, 0, 97, 100, 0, 3);
        std::vector<int> many(40);
        for (int e = 0; e < 40; e++) many[e] = (e * 37) % 11 == 0 ? 0 : (e * 53) % 190;
        qt128_groups_case<float>(many, 1, 40, 41, 1, 0);
    }
    std::printf(g_bad ? "FAILED (%d of %d checks)\n" : "fp8quant kernels: %d checks bit for bit: all match\n",
                g_bad ? g_bad : g_checked, g_checked);
    return g_bad ? 1 : 0;
}
