// CPU emulation of the device sampler (kernels/cuda/sampling.cu, sample_rows_f32) against a C++
// transcription of core::infer::sampling::Sampler::sample (given the uniform u it would draw),
// without a GPU:
//
//   bash kernels/emu/run.sh [--quick] sampling
//
// The kernel source runs on the emulator's runtime (include/emu.h: a fiber per CUDA thread,
// shuffles and barriers emulated, static __shared__ shared by the block). Buffers sit against
// PROT_NONE guard pages. Rows: normal logits at several scales, coarse grids (ties), -inf
// sprinkled, a NaN, all -inf, +inf; vocab 1..129280; (temperature, top_k, top_p) over greedy,
// full-vocabulary, top-k, top-p, both, top_k > vocab, tiny top_p; u random and at the ends.
// Every row must give the reference's token (status 0), an error for NaN (-1), or hand the row
// back to the host (-2) only where the kernel documents it; status 1 (top-p normalizer rounded
// differently) is counted and its agreement reported. The expf port is checked bit for bit against
// vectors from the Rust libm crate (expf_vectors.txt, written and checked by
// kernels/tests/sampling.rs). Timing means nothing here.
#include <emu.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../cuda/sampling.cu"

// ---- guarded buffers
template <class T>
struct GBuf {
    unsigned char* base = nullptr;
    size_t maplen = 0;
    T* data = nullptr;
    explicit GBuf(size_t n) {
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE), bytes = n * sizeof(T);
        size_t body = (bytes + pg - 1) / pg * pg;
        if (body == 0) body = pg;
        maplen = body + 2 * pg;
        void* p = mmap(nullptr, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) fail("mmap");
        base = (unsigned char*)p;
        mprotect(base, pg, PROT_NONE);
        mprotect(base + pg + body, pg, PROT_NONE);
        data = (T*)(base + pg + body - (bytes + 15) / 16 * 16);
        std::memset(base + pg, 0xff, body);
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

// ---- the reference: Sampler::sample with its uniform given (core/src/infer/sampling.rs).
// Returns the token, or -1 for NaN logits. expf is the kernel's port (checked against libm below).
static int ref_sample(const float* l, int n, float t, long long top_k, float top_p, float u) {
    for (int i = 0; i < n; i++)
        if (std::isnan(l[i])) return -1;
    if (t == 0.0f || top_k == 1) {
        int best = 0;
        for (int i = 0; i < n; i++)
            if (l[i] > l[best]) best = i;
        return best;
    }
    if (top_k == 0 && top_p >= 1.0f) {
        float m = -INFINITY;
        for (int i = 0; i < n; i++) m = std::max(m, l[i]);
        m = m / t;
        std::vector<float> probs(n);
        for (int i = 0; i < n; i++) probs[i] = libm_expf(l[i] / t - m);
        float z = 0;
        for (float p : probs) z += p;
        const float target = u * z;
        float cum = 0;
        for (int i = 0; i < n; i++) {
            cum += probs[i];
            if (target < cum) return i;
        }
        for (int i = n - 1; i >= 0; i--)
            if (probs[i] > 0.0f) return i;
        return 0;
    }
    std::vector<std::pair<uint32_t, float>> cand(n);
    for (int i = 0; i < n; i++) cand[i] = {(uint32_t)i, l[i] / t};
    auto order = [](const std::pair<uint32_t, float>& a, const std::pair<uint32_t, float>& b) {
        if (b.second < a.second) return true;  // partial_cmp: a first when a is larger
        if (a.second < b.second) return false;
        return a.first < b.first;
    };
    std::stable_sort(cand.begin(), cand.end(), order);
    if (top_k > 0 && top_k < n) cand.resize(top_k);
    const float m = cand[0].second;
    std::vector<float> probs(cand.size());
    for (size_t i = 0; i < cand.size(); i++) probs[i] = libm_expf(cand[i].second - m);
    float z = 0;
    for (float p : probs) z += p;
    for (float& p : probs) p /= z;
    if (top_p < 1.0f) {
        float cum = 0;
        size_t keep = probs.size();
        for (size_t i = 0; i < probs.size(); i++) {
            cum += probs[i];
            if (cum >= top_p) {
                keep = i + 1;
                break;
            }
        }
        probs.resize(keep);
        float z2 = 0;
        for (float p : probs) z2 += p;
        for (float& p : probs) p /= z2;
    }
    float cum = 0;
    for (size_t i = 0; i < probs.size(); i++) {
        cum += probs[i];
        if (u < cum) return (int)cand[i].first;
    }
    return (int)cand[probs.size() - 1].first;
}

static void check_expf() {
    std::ifstream f("expf_vectors.txt");
    if (!f) fail("expf_vectors.txt missing (cargo test -p dsv3-kernels --test sampling writes it)");
    unsigned x, y;
    int n = 0;
    while (f >> std::hex >> x >> y) {
        const float got = libm_expf(__uint_as_float(x));
        if (__float_as_uint(got) != y) {
            char m[128];
            std::snprintf(m, sizeof m, "libm_expf(%08x) = %08x, Rust libm %08x", x, __float_as_uint(got), y);
            fail(m);
        }
        n++;
    }
    if (n < 1000) fail("expf_vectors.txt too short");
    std::printf("libm_expf: %d vectors bit for bit as the Rust libm crate\n", n);
}

// ---- rows
static std::mt19937 rng(7);
static float randn() {
    static std::normal_distribution<float> nd;
    return nd(rng);
}
enum Kind { NORMAL1, NORMAL3, NORMAL8, GRID, NEGINF, ONE_NAN, ALL_NEGINF, POSINF, PEAKED };
static const char* kind_name(Kind k) {
    static const char* n[] = {"normal(1)", "normal(3)", "normal(8)", "grid", "-inf", "nan", "all -inf", "+inf", "peaked"};
    return n[k];
}
static std::vector<float> make_row(Kind k, int n) {
    std::vector<float> v(n);
    for (int i = 0; i < n; i++) {
        switch (k) {
            case NORMAL3: v[i] = 3.0f * randn(); break;
            case NORMAL8: v[i] = 8.0f * randn(); break;
            case GRID: v[i] = (float)(rng() % 24) * 0.25f - 2.0f; break;
            case PEAKED: v[i] = randn() - 6.0f; break;
            default: v[i] = randn();
        }
    }
    if (k == NEGINF)
        for (int i = 0; i < n; i++)
            if (rng() % 3 == 0) v[i] = -INFINITY;
    if (k == ONE_NAN) v[rng() % n] = NAN;
    if (k == ALL_NEGINF) std::fill(v.begin(), v.end(), -INFINITY);
    if (k == POSINF) v[rng() % n] = INFINITY;
    if (k == PEAKED)
        for (int j = 0; j < 3; j++) v[rng() % n] = 4.0f + (float)j;
    return v;
}

struct Params {
    float t;
    long long k;
    float p;
};
struct Stats {
    long rows = 0, exact = 0, nan_err = 0, host = 0, approx = 0, approx_agree = 0;
};

// Runs `rows` rows of one (kind, n, params); returns false on a mismatch.
static bool run_case(Kind kind, int n, Params pr, int rows, Stats& st) {
    GBuf<float> x((size_t)rows * n), prm((size_t)rows * 4), ebuf((size_t)rows * n);
    GBuf<int> out((size_t)rows * 2);
    std::vector<float> us(rows);
    for (int r = 0; r < rows; r++) {
        std::vector<float> row = make_row(kind, n);
        std::memcpy(x.data + (size_t)r * n, row.data(), (size_t)n * 4);
        // the CPU's uniform: 24 bits; the ends too
        const uint32_t bits = r == 0 ? 0u : r == 1 ? (1u << 24) - 1 : (uint32_t)(rng() >> 8);
        us[r] = (float)bits * (1.0f / 16777216.0f);
        const int kk = pr.k > 0x7fffffffLL ? 0x7fffffff : (int)pr.k;
        prm.data[4 * r] = pr.t;
        prm.data[4 * r + 1] = __int_as_float(kk);
        prm.data[4 * r + 2] = pr.p;
        prm.data[4 * r + 3] = us[r];
    }
    for (int r = 0; r < rows; r++)
        emu::run_block({(unsigned)r, 0, 0}, SMP_T,
                       [&] { sample_rows_f32(x.data, rows, n, prm.data, ebuf.data, out.data); });
    bool ok = true;
    for (int r = 0; r < rows; r++) {
        const int want = ref_sample(x.data + (size_t)r * n, n, pr.t, pr.k, pr.p, us[r]);
        const int tok = out.data[2 * r], status = out.data[2 * r + 1];
        st.rows++;
        char where[200];
        std::snprintf(where, sizeof where, "%s n=%d t=%g k=%lld p=%g u=%.8g row %d", kind_name(kind), n, pr.t, pr.k,
                      pr.p, us[r], r);
        if (want == -1) {
            if (status != -1) std::printf("MISMATCH %s: NaN row gave status %d\n", where, status), ok = false;
            else st.nan_err++;
            continue;
        }
        if (status == -2) {
            // allowed: a +-inf maximum, or more candidates than SMP_CAP
            const float* l = x.data + (size_t)r * n;
            float mx = -INFINITY;
            for (int i = 0; i < n; i++) mx = std::max(mx, l[i]);
            const bool inf_max = std::isinf(mx / pr.t);
            const bool many = n > SMP_CAP && !(pr.k == 0 && pr.p >= 1.0f);
            if (!inf_max && !many) std::printf("MISMATCH %s: handed to the host unexpectedly\n", where), ok = false;
            st.host++;
            continue;
        }
        if (status == 1) {
            st.approx++;
            st.approx_agree += tok == want;
            continue;
        }
        if (status != 0 || tok != want) {
            std::printf("MISMATCH %s: kernel %d (status %d), reference %d\n", where, tok, status, want);
            if (n <= 16)
                for (int i = 0; i < n; i++) std::printf("  l[%d] = %a\n", i, x.data[(size_t)r * n + i]);
            ok = false;
        } else {
            st.exact++;
        }
    }
    return ok;
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    signal(SIGSEGV, on_segv);
    signal(SIGBUS, on_segv);
    check_expf();
    const Params P[] = {
        {0.0f, 0, 1.0f},     {1.0f, 1, 1.0f},      {0.8f, 0, 1.0f},  {1.0f, 0, 1.0f},   {0.7f, 50, 1.0f},
        {1.3f, 40, 0.95f},   {1.0f, 0, 0.9f},      {0.6f, 0, 0.5f},  {1.0f, 0, 1e-4f},  {1.0f, 1000000, 1.0f},
        {1.0f, 1000000, 0.8f}, {0.9f, 5000, 0.9f}, {1.0f, 2, 0.5f},  {0.25f, 200, 0.99f}, {2.0f, 4096, 1.0f},
    };
    const Kind kinds[] = {NORMAL1, NORMAL3, NORMAL8, GRID, NEGINF, ONE_NAN, ALL_NEGINF, POSINF, PEAKED};
    std::vector<int> sizes = quick ? std::vector<int>{1, 7, 1000, 4097, 32000} : std::vector<int>{1, 2, 7, 33, 1000, 4096, 4097, 9999, 32000, 129280};
    Stats st;
    bool ok = true;
    for (int n : sizes)
        for (Kind kind : kinds)
            for (const Params& pr : P) {
                const bool big = n >= 32000;
                if (quick && big && kind != GRID && kind != PEAKED) continue;
                ok &= run_case(kind, n, pr, quick ? (big ? 2 : 3) : (big ? 3 : 4), st);
            }
    if (quick) {
        // one pass at the DeepSeek-V3 vocabulary: full-vocabulary sampling and top-k/top-p
        for (const Params& pr : {Params{0.8f, 0, 1.0f}, Params{1.0f, 50, 0.9f}, Params{0.7f, 0, 0.9f}})
            ok &= run_case(PEAKED, 129280, pr, 2, st);
        ok &= run_case(NORMAL1, 129280, Params{1.0f, 0, 1.0f}, 2, st);
    }
    std::printf(
        "sampling: %ld rows: %ld exactly the CPU sampler's token, %ld NaN errors, %ld handed to the host, "
        "%ld with the rounded top-p normalizer (%ld of them the CPU's token)\n",
        st.rows, st.exact, st.nan_err, st.host, st.approx, st.approx_agree);
    if (!ok) fail("the device sampler differs from the CPU sampler");
    return 0;
}
