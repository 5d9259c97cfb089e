// The CPU emulator's runtime (one translation unit per emulation: it defines its globals), shared by every emulation in kernels/emu/ (mla_mma_emu.cpp,
// skinny_emu.cpp, ...): the real kernel source (kernels/cuda/*.cu) is compiled as host C++
// (include/cuda_bf16.h stands in for CUDA) and run block by block, one fiber per CUDA thread.
//
// - Fibers start with makecontext/setcontext and switch with __builtin_setjmp/longjmp afterwards
//   (no signal-mask system call per switch, unlike swapcontext). The functions around a switch are
//   noipa: GCC's interprocedural register allocation would otherwise keep caller-saved registers
//   live across the call, which returns on another context.
// - Warp collectives (shuffles, __syncwarp, ldmatrix, mma.sync) complete when all 32 lanes of the
//   warp arrive with the same operation and are evaluated from the lanes' operands exactly as the
//   PTX ISA defines them; a lane that left early, or lanes in different collectives, are reported.
//   Blocks must have a multiple of 32 threads.
// - __syncthreads is a block barrier; a barrier some threads never reach is a reported deadlock.
//   Named barriers (bar.sync id, count) likewise over their count of threads.
// - Dynamic shared memory (DSV3_DYNAMIC_SMEM in kernels/cuda/common.cuh) is emu::dyn_smem. The
//   driver sets its size per launch with begin_smem(bytes): it is filled with NaN (0xff) and
//   everything past the size is a canary that end_smem() checks. ldmatrix reads are bounds- and
//   alignment-checked. Static __shared__ arrays become function statics (one per block: blocks
//   run one after another).
// - cp.async copies are deferred until the cp.async.wait_group that covers them, so a missing wait
//   or barrier reads stale or poisoned shared memory (emu::cp_async_eager: they also land at issue,
//   so a refill of a buffer still being read shows). Their sources must be 16-byte aligned and
//   inside a region registered with allow_global() (when any is registered).
// Timing means nothing here.
#pragma once
#define DSV3_EMU 1
#include <cuda_bf16.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>  // built with -fsanitize=address: the canaries are poisoned
#else
#define ASAN_POISON_MEMORY_REGION(a, n) ((void)(a), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(a, n) ((void)(a), (void)(n))
#endif

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

// what was running (the driver of kernels/emu/driver.cpp names the kernel), printed with a failure
static std::string fail_context;
[[noreturn]] inline void fail(const std::string& m) {
    std::fprintf(stderr, "EMU FAILURE: %s%s\n", m.c_str(), fail_context.c_str());
    std::exit(1);
}

namespace emu {
emu_dim3 block_idx, block_dim;
emu_dim3 grid_dim{0, 0, 0};  // set by launch() for its blocks; 0: unknown (run_block alone)
inline const emu_dim3& grid_dim_read() {
    if (grid_dim.x == 0) fail("gridDim read by a kernel run with run_block outside emu::launch");
    return grid_dim;
}
constexpr int MAXT = 1024;
constexpr size_t DYN_SMEM_BYTES = 256 * 1024;
alignas(1024) unsigned char dyn_smem[DYN_SMEM_BYTES];
static size_t smem_limit = 0;  // bytes the launcher would request for the running kernel

struct Pending {
    uint32_t dst;
    const unsigned char* src;
    int bytes, group;
};
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    void* jb[5];
    bool done = false, waiting = false, started = false;
    std::vector<Pending> pending;  // cp.async copies not yet waited for
    int committed = 0;             // cp.async groups committed
};
static Fiber fib[MAXT];
static int nthreads = 0, cur = 0, block_arrived = 0;
static void* sched_jb[5];
inline int cur_tid() { return cur; }

// A warp collective in flight: each lane's operation, operands and results.
enum Op { OP_SHFL = 1, OP_SYNCWARP, OP_LDSM, OP_LDSM_T, OP_MMA_BF16 };
enum ShflMode { SHFL_XOR, SHFL_DOWN, SHFL_UP, SHFL_IDX };
struct WarpX {
    int arrived = 0;
    int op[32], arg[32], arg2[32];
    uint32_t u[32][6];
    float f[32][4];
    uint32_t ou[32][4];
    float of[32][4];
};
static WarpX wx[MAXT / 32];
static long long collectives = 0;  // completed warp collectives (for the drivers' summaries)

// The fiber switches are not instrumented by AddressSanitizer (gpu_tests.sh --asan): its no-return
// hook would otherwise take every longjmp between fibers for a stack unwind (a system call and a
// shadow clear per switch, minutes per test).
#define EMU_SWITCH __attribute__((noinline, noipa, no_sanitize_address))
EMU_SWITCH inline void jump_to(void** jb) { __builtin_longjmp(jb, 1); }

EMU_SWITCH inline void wait_here() {
    fib[cur].waiting = true;
    if (__builtin_setjmp(fib[cur].jb) == 0) jump_to(sched_jb);
}

inline uint16_t smem16(uint32_t addr) {
    if (addr + 2 > smem_limit) fail("shared read past the launcher's size: " + std::to_string(addr));
    uint16_t v;
    std::memcpy(&v, dyn_smem + addr, 2);
    return v;
}
inline float bf(uint32_t bits16) { return __bfloat162float(__nv_bfloat16{(uint16_t)bits16}); }

// Evaluates a completed collective of warp x.
inline void compute(WarpX& x, int op) {
    if (op == OP_SHFL) {
        for (int l = 0; l < 32; l++)
            if (x.arg[l] != x.arg[0] || x.arg2[l] != x.arg2[0]) fail("shfl masks/modes differ across the warp");
        const int mode = x.arg2[0];
        for (int l = 0; l < 32; l++) {
            int src = l, a = x.arg[l];
            if (mode == SHFL_XOR) src = l ^ a;
            else if (mode == SHFL_DOWN) src = l + a < 32 ? l + a : l;
            else if (mode == SHFL_UP) src = l - a >= 0 ? l - a : l;
            else src = a & 31;
            x.ou[l][0] = x.u[src][0];
        }
    } else if (op == OP_SYNCWARP) {
    } else if (op == OP_LDSM || op == OP_LDSM_T) {
        for (int l = 0; l < 32; l++)
            if (x.u[l][0] % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
        const int nm = x.arg[0];  // matrices: 1, 2 or 4 (lanes 8j..8j+7 give matrix j's row addresses)
        for (int l = 0; l < 32; l++)
            if (x.arg[l] != nm) fail("ldmatrix .num differs across the warp");
        for (int l = 0; l < 32; l++)
            for (int j = 0; j < nm; j++) {
                uint32_t lo, hi;
                if (op == OP_LDSM) {  // lane l: row l/4 of matrix j, elements 2(l%4), +1
                    uint32_t a = x.u[8 * j + l / 4][0] + 4 * (l % 4);
                    lo = smem16(a), hi = smem16(a + 2);
                } else {  // .trans: column l/4, rows 2(l%4), +1
                    int r0 = 2 * (l % 4), col = l / 4;
                    lo = smem16(x.u[8 * j + r0][0] + 2 * col);
                    hi = smem16(x.u[8 * j + r0 + 1][0] + 2 * col);
                }
                x.ou[l][j] = lo | (hi << 16);
            }
    } else if (op == OP_MMA_BF16) {  // m16n8k16 row.col: fragments as in the PTX ISA, exact sums
        double A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            const uint32_t* a = x.u[l];
            for (int h = 0; h < 2; h++) {
                A[g][2 * t + h] = bf(a[0] >> (16 * h));
                A[g + 8][2 * t + h] = bf(a[1] >> (16 * h));
                A[g][2 * t + 8 + h] = bf(a[2] >> (16 * h));
                A[g + 8][2 * t + 8 + h] = bf(a[3] >> (16 * h));
                B[2 * t + h][g] = bf(a[4] >> (16 * h));
                B[2 * t + 8 + h][g] = bf(a[5] >> (16 * h));
                C[g][2 * t + h] = x.f[l][h];
                C[g + 8][2 * t + h] = x.f[l][2 + h];
            }
        }
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            for (int e = 0; e < 4; e++) {
                int r = g + 8 * (e >> 1), cidx = 2 * t + (e & 1);
                double s = C[r][cidx];
                for (int k = 0; k < 16; k++) s += A[r][k] * B[k][cidx];
                x.of[l][e] = (float)s;
            }
        }
    }
}

// The calling lane joins collective `op`; returns when the whole warp has arrived and it ran.
inline void collective(int op) {
    const int w = cur >> 5, lane = cur & 31;
    WarpX& x = wx[w];
    x.op[lane] = op;
    if (++x.arrived == 32) {
        x.arrived = 0;
        collectives++;
        for (int l = 0; l < 32; l++)
            if (x.op[l] != op) fail("divergent warp collective");
        compute(x, op);
        for (int l = 0; l < 32; l++)
            if (l != lane) fib[w * 32 + l].waiting = false;
    } else {
        wait_here();
    }
}

inline uint32_t shfl(uint32_t v, int arg, int mode) {
    WarpX& x = wx[cur >> 5];
    const int lane = cur & 31;
    x.u[lane][0] = v;
    x.arg[lane] = arg;
    x.arg2[lane] = mode;
    collective(OP_SHFL);
    return x.ou[lane][0];
}

inline void sync_block() {
    if (++block_arrived == nthreads) {
        block_arrived = 0;
        for (int t = 0; t < nthreads; t++)
            if (t != cur) fib[t].waiting = false;
    } else {
        wait_here();
    }
}

// Named barriers (bar.sync id, count; id 0 is __syncthreads'): `count` threads of whole warps
// arrive, then all of them go on; a barrier left with arrivals at the end of a block is reported.
struct NamedBar {
    int arrived = 0, count = 0;
    std::vector<int> waiters;
};
static NamedBar named[16];
inline void named_sync(int id, int count) {
    if (id < 1 || id > 15) fail("named barrier id " + std::to_string(id) + " (1..15 here; 0 is __syncthreads')");
    if (count <= 0 || count % 32 || count > nthreads) fail("named barrier count " + std::to_string(count));
    NamedBar& b = named[id];
    if (b.arrived && b.count != count) fail("named barrier " + std::to_string(id) + " with two thread counts");
    b.count = count;
    if (++b.arrived == count) {
        b.arrived = 0;
        for (int f : b.waiters) fib[f].waiting = false;
        b.waiters.clear();
    } else {
        b.waiters.push_back(cur);
        wait_here();
    }
}

static std::function<void()> g_body;  // the kernel call, the same for every thread
// A fiber's life: the body for one block, then parked until run_block resumes it for the next
// block (fibers are created once, so a block costs no context set-up or signal-mask system calls).
EMU_SWITCH inline void entry(int tid) {
    volatile int t = tid;
    for (;;) {
        g_body();
        fib[t].done = true;
        if (__builtin_setjmp(fib[t].jb) == 0) jump_to(sched_jb);
    }
}

// scheduler state in globals: it lives across __builtin_setjmp returns
static int s_i, s_t;
// DSV3_EMU_ORDER=reverse: each block's threads are also run last to first (thread 1023 until it
// waits, then 1022, ...). A thread runs until it reaches a barrier or warp collective, so a missing
// __syncthreads / __syncwarp between a shared-memory write and another thread's read is seen in
// one of the two orders: the reader then runs before the writer and reads NaN poison or a stale
// value. (The driver also runs the grid's blocks last to first.)
static const bool threads_reversed = [] {
    const char* v = std::getenv("DSV3_EMU_ORDER");
    return v && std::string(v) == "reverse";
}();
static bool s_all_done, s_progress;

EMU_SWITCH inline void resume(int t) {
    if (__builtin_setjmp(sched_jb) == 0) {
        if (!fib[t].started) {
            fib[t].started = true;
            setcontext(&fib[t].ctx);
        }
        jump_to(fib[t].jb);
    }
}

// Runs one block of `threads` threads (a multiple of 32) of `body` at block index `idx`.
inline void run_block(emu_dim3 idx, int threads, const std::function<void()>& body) {
    if (threads <= 0 || threads > MAXT || threads % 32 != 0) fail("block size must be a multiple of 32 up to 1024");
    block_idx = idx;
    block_dim = {(unsigned)threads, 1, 1};
    g_body = body;
    nthreads = threads;
    block_arrived = 0;
    for (auto& x : wx) x.arrived = 0;
    for (auto& b : named) b.arrived = 0, b.waiters.clear();
    for (int t = 0; t < threads; t++) {
        Fiber& f = fib[t];
        f.done = f.waiting = false;
        f.pending.clear();
        f.committed = 0;
        if (f.started) continue;  // parked in entry() after an earlier block: resumed at its jb
        if (f.stack.empty()) f.stack.resize(1 << 18);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;  // entry never returns: it jumps back to the scheduler
        makecontext(&f.ctx, (void (*)())entry, 1, t);
    }
    for (;;) {
        s_all_done = true;
        s_progress = false;
        for (s_i = 0; s_i < threads; s_i++) {
            s_t = threads_reversed ? threads - 1 - s_i : s_i;
            if (fib[s_t].done) continue;
            s_all_done = false;
            if (fib[s_t].waiting) continue;
            cur = s_t;
            s_progress = true;
            resume(s_t);
        }
        if (s_all_done) break;
        if (!s_progress) fail("deadlock: threads wait in a shuffle or barrier that others never reach");
    }
    for (auto& x : wx)
        if (x.arrived) fail("a warp collective was left incomplete");
    for (auto& b : named)
        if (b.arrived) fail("a named barrier was left with " + std::to_string(b.arrived) + " arrivals");
    for (int t = 0; t < threads; t++)
        if (!fib[t].pending.empty()) fail("cp.async copies never waited for");
}

// A kernel launch: every block of `grid` (x fastest, then y, then z; one after another) with
// `threads` threads, gridDim set for them. Refuses what CUDA refuses: an empty grid, gridDim.x
// above 2^31 - 1, gridDim.y or gridDim.z above 65535 (a launcher that puts a large count there
// fails here as it would on the GPU), more than 1024 threads.
// set_grid: the same checks and gridDim, for drivers that run the blocks themselves (per-block
// set-up around run_block); end_grid() after them.
inline void set_grid(emu_dim3 grid) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch: empty grid");
    if (grid.x > 2147483647u) fail("launch: gridDim.x = " + std::to_string(grid.x) + " exceeds CUDA's 2^31 - 1");
    if (grid.y > 65535u) fail("launch: gridDim.y = " + std::to_string(grid.y) + " exceeds CUDA's 65535");
    if (grid.z > 65535u) fail("launch: gridDim.z = " + std::to_string(grid.z) + " exceeds CUDA's 65535");
    grid_dim = grid;
}
inline void end_grid() { grid_dim = {0, 0, 0}; }
inline void launch(emu_dim3 grid, int threads, const std::function<void()>& body) {
    set_grid(grid);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) run_block({x, y, z}, threads, body);
    end_grid();
}

// Dynamic shared memory for the next launch: `bytes` of NaN, a canary after them.
inline void begin_smem(size_t bytes) {
    if (bytes > DYN_SMEM_BYTES) fail("dynamic shared memory larger than the emulator's " + std::to_string(bytes));
    smem_limit = bytes;
    std::memset(dyn_smem, 0xff, bytes);
    std::memset(dyn_smem + bytes, 0x5a, DYN_SMEM_BYTES - bytes);
    ASAN_POISON_MEMORY_REGION(dyn_smem + bytes, DYN_SMEM_BYTES - bytes);  // any access past the size stops
}
inline void end_smem() {
    ASAN_UNPOISON_MEMORY_REGION(dyn_smem + smem_limit, DYN_SMEM_BYTES - smem_limit);
    for (size_t i = smem_limit; i < DYN_SMEM_BYTES; i++)
        if (dyn_smem[i] != 0x5a) fail("shared memory written past the launcher's size");
}

// Global regions cp.async may read (none registered: any 16-byte aligned source).
struct Region {
    const unsigned char *lo, *hi;
};
static std::vector<Region> globals;
// cp.async copies land at issue as well as at their wait (default: only at the wait). The two
// extremes of the hardware's timing: deferred catches a missing wait, eager catches a copy into a
// buffer still being read (a ring slot refilled too early).
static bool cp_async_eager = false;
inline void allow_global(const void* p, size_t bytes) {
    globals.push_back({(const unsigned char*)p, (const unsigned char*)p + bytes});
}
inline void clear_globals() { globals.clear(); }
}  // namespace emu

// ---- CUDA built-ins
inline float __shfl_xor_sync(unsigned, float v, int m) {
    return __uint_as_float(emu::shfl((uint32_t)__float_as_int(v), m, emu::SHFL_XOR));
}
inline int __shfl_xor_sync(unsigned, int v, int m) { return (int)emu::shfl((uint32_t)v, m, emu::SHFL_XOR); }
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int m) { return emu::shfl(v, m, emu::SHFL_XOR); }
inline float __shfl_down_sync(unsigned, float v, int d) {
    return __uint_as_float(emu::shfl((uint32_t)__float_as_int(v), d, emu::SHFL_DOWN));
}
inline int __shfl_down_sync(unsigned, int v, int d) { return (int)emu::shfl((uint32_t)v, d, emu::SHFL_DOWN); }
inline unsigned __shfl_down_sync(unsigned, unsigned v, int d) { return emu::shfl(v, d, emu::SHFL_DOWN); }
inline float __shfl_up_sync(unsigned, float v, int d) {
    return __uint_as_float(emu::shfl((uint32_t)__float_as_int(v), d, emu::SHFL_UP));
}
inline int __shfl_up_sync(unsigned, int v, int d) { return (int)emu::shfl((uint32_t)v, d, emu::SHFL_UP); }
inline unsigned __shfl_up_sync(unsigned, unsigned v, int d) { return emu::shfl(v, d, emu::SHFL_UP); }
inline float __shfl_sync(unsigned, float v, int src) {
    return __uint_as_float(emu::shfl((uint32_t)__float_as_int(v), src, emu::SHFL_IDX));
}
inline int __shfl_sync(unsigned, int v, int src) { return (int)emu::shfl((uint32_t)v, src, emu::SHFL_IDX); }
inline unsigned __shfl_sync(unsigned, unsigned v, int src) { return emu::shfl(v, src, emu::SHFL_IDX); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::collective(emu::OP_SYNCWARP); }
inline void __syncthreads() { emu::sync_block(); }
// Blocks run one after another here, so every other block's writes are already in memory: the
// fence has nothing to order, and a load through L2 is a plain load.
inline void __threadfence() {}
template <typename T>
inline T __ldcg(const T* p) {
    return *p;
}

// ---- the inline-PTX helpers of kernels/cuda/mma.cuh (which leaves them to us under DSV3_EMU)
inline uint32_t smem_u32(const void* ptr) {
    const unsigned char* p = (const unsigned char*)ptr;
    if (p < emu::dyn_smem || p >= emu::dyn_smem + emu::DYN_SMEM_BYTES)
        fail("smem_u32 of memory outside the dynamic shared memory");
    return (uint32_t)(p - emu::dyn_smem);
}
inline void ldsm_n(int op, int num, uint32_t addr, uint32_t* r) {
    emu::WarpX& x = emu::wx[emu::cur >> 5];
    x.u[emu::cur & 31][0] = addr;
    x.arg[emu::cur & 31] = num;
    emu::collective(op);
    for (int j = 0; j < num; j++) r[j] = x.ou[emu::cur & 31][j];
}
inline void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) { ldsm_n(emu::OP_LDSM, 4, addr, r); }
inline void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) { ldsm_n(emu::OP_LDSM_T, 4, addr, r); }
inline void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) { ldsm_n(emu::OP_LDSM, 2, addr, r); }
inline void ldsm_x2_t(uint32_t addr, uint32_t (&r)[2]) { ldsm_n(emu::OP_LDSM_T, 2, addr, r); }
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::WarpX& x = emu::wx[emu::cur >> 5];
    const int l = emu::cur & 31;
    for (int j = 0; j < 4; j++) x.u[l][j] = a[j], x.f[l][j] = d[j];
    x.u[l][4] = b0;
    x.u[l][5] = b1;
    emu::collective(emu::OP_MMA_BF16);
    for (int j = 0; j < 4; j++) d[j] = x.of[l][j];
}
inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    const unsigned char* s = (const unsigned char*)src;
    if (dst % 16 != 0 || dst + 16 > emu::smem_limit) fail("cp.async destination misaligned or past the smem size");
    if (src_bytes != 0 && src_bytes != 16) fail("cp.async src-size not 0/16");
    if (src_bytes != 0) {
        if ((uintptr_t)s % 16 != 0) fail("cp.async source not 16-byte aligned");
        bool inside = emu::globals.empty();
        for (const emu::Region& r : emu::globals) inside = inside || (s >= r.lo && s + 16 <= r.hi);
        if (!inside) fail("cp.async source outside the registered buffers");
    }
    emu::Fiber& f = emu::fib[emu::cur];
    f.pending.push_back({dst, s, src_bytes, f.committed});
    if (emu::cp_async_eager) {  // also land now (the wait lands the same bytes again)
        std::memset(emu::dyn_smem + dst, 0, 16);
        if (src_bytes) std::memcpy(emu::dyn_smem + dst, s, src_bytes);
    }
}
inline void cp_async_commit() { emu::fib[emu::cur].committed++; }
template <int N>
inline void cp_async_wait() {
    emu::Fiber& f = emu::fib[emu::cur];
    std::vector<emu::Pending> keep;
    for (auto& p : f.pending) {
        if (p.group < f.committed - N) {
            std::memset(emu::dyn_smem + p.dst, 0, 16);
            if (p.bytes) std::memcpy(emu::dyn_smem + p.dst, p.src, p.bytes);
        } else {
            keep.push_back(p);
        }
    }
    f.pending.swap(keep);
}
inline float fast_exp2(float x) { return std::exp2(x); }
