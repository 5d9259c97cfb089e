// CPU emulation of the MoE routing kernels (kernels/cuda/moe.cu): the fused moe_route_plan (one
// block: route every token, then build the dispatch plan) against moe_route + moe_plan launched
// separately (the unfused decode path, itself checked against the CPU router on a GPU by
// kernels/tests/mla_moe.rs): the routing must be identical bit for bit, and both plans must be
// valid (row and tile offsets from the counts, slot_of a permutation grouped by expert with
// src_row pointing back to the token). V3 (sigmoid, bias, group-limited), V2 softmax greedy and
// group_limited_greedy, 1 to 40 tokens. Timing means nothing here.
#include <emu.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../cuda/moe.cu"

static std::mt19937 rng(3);
static int g_bad = 0;
static void expect(bool ok, const std::string& what) {
    if (!ok && g_bad++ < 10) std::fprintf(stderr, "  %s\n", what.c_str());
}

struct Plan {
    std::vector<int> row_offsets, tile_offsets, slot_of, src_row;
    Plan(int e, int nk) : row_offsets(e + 1, -7), tile_offsets(e + 1, -7), slot_of(nk, -7), src_row(nk, -7) {}
};

static void check_plan(const Plan& p, const std::vector<int>& idx, int n, int k, int e, const char* which) {
    const int nk = n * k;
    std::vector<int> cnt(e, 0);
    for (int x : idx) cnt[x]++;
    int r = 0, tl = 0;
    for (int i = 0; i < e; i++) {
        expect(p.row_offsets[i] == r && p.tile_offsets[i] == tl, std::string(which) + ": offsets");
        r += cnt[i];
        tl += (cnt[i] + GEMM_BM - 1) / GEMM_BM;
    }
    expect(p.row_offsets[e] == nk && p.tile_offsets[e] == tl, std::string(which) + ": last offsets");
    std::vector<int> seen(nk, 0);
    for (int j = 0; j < nk; j++) {
        int pos = p.slot_of[j];
        expect(pos >= 0 && pos < nk, std::string(which) + ": slot out of range");
        if (pos < 0 || pos >= nk) continue;
        seen[pos]++;
        int x = idx[j];
        expect(pos >= p.row_offsets[x] && pos < p.row_offsets[x + 1], std::string(which) + ": slot outside its expert");
        expect(p.src_row[pos] == j / k, std::string(which) + ": src_row");
    }
    for (int v : seen) expect(v == 1, std::string(which) + ": slot_of not a permutation");
}

static void run_case(int n, int e, int k, int n_group, int topk_group, int scoring, int method, bool bias_on) {
    std::normal_distribution<float> nd;
    std::vector<float> logits(n * e), bias(e);
    for (auto& v : logits) v = 2 * nd(rng);
    for (auto& v : bias) v = 0.3f * nd(rng);
    // a few exact ties, which the orders must break by index
    if (e >= 4) logits[1] = logits[3];
    const float* b = bias_on ? bias.data() : nullptr;
    const int norm = method == 0, nk = n * k;
    const float scaling = 2.5f;
    std::vector<int> idx1(nk, -9), idx2(nk, -9);
    std::vector<float> w1(nk, NAN), w2(nk, NAN);
    Plan p1(e, nk), p2(e, nk);
    for (int blk = 0; blk < (n + MOE_WARPS - 1) / MOE_WARPS; blk++)
        emu::run_block({(unsigned)blk, 0, 0}, 128, [&] {
            moe_route(logits.data(), n, e, b, n_group, topk_group, k, norm, scaling, scoring, method, idx1.data(),
                      w1.data());
        });
    emu::run_block({0, 0, 0}, 1024, [&] {
        moe_plan(idx1.data(), nk, k, e, p1.row_offsets.data(), p1.tile_offsets.data(), p1.slot_of.data(),
                 p1.src_row.data());
    });
    emu::run_block({0, 0, 0}, 256, [&] {
        moe_route_plan(logits.data(), n, e, b, n_group, topk_group, k, norm, scaling, scoring, method, idx2.data(),
                       w2.data(), p2.row_offsets.data(), p2.tile_offsets.data(), p2.slot_of.data(), p2.src_row.data());
    });
    for (int j = 0; j < nk; j++) {
        expect(idx1[j] == idx2[j], "fused routing differs: expert");
        expect(std::memcmp(&w1[j], &w2[j], 4) == 0, "fused routing differs: weight");
    }
    for (int t = 0; t < n; t++)
        for (int a = 0; a < k; a++)
            for (int c = a + 1; c < k; c++) expect(idx1[t * k + a] != idx1[t * k + c], "an expert chosen twice");
    check_plan(p1, idx1, n, k, e, "moe_plan");
    check_plan(p2, idx2, n, k, e, "moe_route_plan");
    std::printf("route+plan  n %-3d E %-3d k %-2d groups %d/%d %s %s: %s\n", n, e, k, topk_group, n_group,
                scoring ? "softmax" : "sigmoid", method == 0 ? "noaux_tc" : method == 1 ? "greedy" : "group_limited",
                g_bad ? "FAILED" : "fused == separate, plans valid");
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    run_case(1, 16, 4, 4, 2, 0, 0, true);    // the 88M config at batch 1
    run_case(32, 16, 4, 4, 2, 0, 0, true);   // batch 32
    run_case(5, 64, 6, 1, 1, 1, 1, false);   // V2 softmax greedy
    run_case(9, 64, 6, 8, 3, 1, 2, false);   // V2 group_limited_greedy
    if (!quick) {
        run_case(3, 256, 8, 8, 4, 0, 0, true);  // V3's router
        run_case(40, 37, 3, 1, 1, 0, 0, false);
    }
    std::printf(g_bad ? "FAILED (%d problems)\n" : "MoE routing kernels: all cases match\n", g_bad);
    return g_bad ? 1 : 0;
}
