// libcuda.so for a machine without a GPU: the CUDA driver API that dsv3 (through cudarc) calls,
// implemented over the CPU emulator (include/emu.h), so the GPU tests of kernels/tests, the CLI
// and the C ABI run unchanged, end to end, on the CPU: the Rust host code (launchers, buffer
// offsets, graphs, streams, tensor maps), the real kernel source (kernels/cuda/*.cu compiled as
// host C++) and the tests' checks. Built and used by kernels/emu/gpu_tests.sh.
//
// What it is:
// - One "GPU": compute capability 9.0 (the sm_90a PTX and its kernels: wgmma through
//   include/wgmma_emu.h, TMA and mbarriers through include/tma_emu.h), 132 SMs, 227 KiB of opt-in
//   shared memory. DSV3_EMU_SM=80 reports 8.0 instead (the sm_80 PTX's kernel set).
// - Kernels: cuModuleLoadData reads the `.entry` names of the PTX it is given and cuModuleGetFunction
//   finds each among the kernels compiled here (the generated emu_kernels.inc: every entry of
//   kernels/ptx/sm_90a). A launch copies its arguments (as the driver does) and runs the grid
//   block by block, a fiber per thread, with the emulator's checks (warp collectives, barriers,
//   wgmma/TMA/mbarrier use, shared memory bounds and the launch's dynamic shared memory size:
//   more than 48 KiB needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first, and a block larger
//   than the kernel's __launch_bounds__ (its PTX .maxntid) or than its registers per thread (ptxas's
//   count, emu_regs.inc) fit in the SM's 64K does not launch, as on a GPU).
// - Memory: device pointers are host pointers. Every allocation is poisoned with 0xff bytes (NaN
//   in f32 and bf16: a kernel that reads memory nobody wrote sees NaN) and followed by a canary that
//   is checked after every launch and copy and at free (a write past the end of a buffer is
//   reported with the kernel that did it). Copies must stay inside allocations.
// - Streams are in order and synchronous: every operation runs when it is issued, so results are
//   those of a GPU that serializes everything (PDL launches included). Stream capture records the
//   operations of the capturing stream and of every stream that joined it through an event (as
//   CUDA does); cuGraphLaunch replays them in issue order.
// - cuEventElapsedTime measures host time: the emulator's timings mean nothing.
// A misuse the emulator detects prints "EMU FAILURE: ..." with the kernel and exits the process
// (a GPU fault is sticky for the process too).
// - cuBLAS: the GEMMs the engine calls (cublasGemmStridedBatchedEx, GemmEx, Sgemm), as a reference
//   (f64 sums, one rounding; libcublas.so is a link to this library).
// Not emulated: cuBLASLt and NCCL (absent: the engine's fallbacks run or their tests skip),
// concurrency between streams, memory pools.
#include <emu.h>
#include <wgmma_emu.h>
#include <tma_emu.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#define __CUDA_ARCH_FEAT_SM90_ALL 1
#include "../cuda/attn.cu"
#include "../cuda/attn_train.cu"
#include "../cuda/elementwise.cu"
#include "../cuda/embed.cu"
#include "../cuda/fp8gemm.cu"
#include "../cuda/fp8quant.cu"
#include "../cuda/gemm.cu"
#include "../cuda/gemm_tma.cu"
#include "../cuda/mla.cu"
#include "../cuda/moe.cu"
#include "../cuda/moe_train.cu"
#include "../cuda/optim.cu"
#include "../cuda/rmsnorm.cu"
#include "../cuda/rope.cu"
#include "../cuda/sampling.cu"
#include "../cuda/train.cu"

namespace drv {
// ---- the driver API's types, as the C ABI has them
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
enum : int {
    OK = 0,
    E_INVALID_VALUE = 1,
    E_OUT_OF_MEMORY = 2,
    E_NOT_INITIALIZED = 3,
    E_NO_DEVICE = 100,
    E_INVALID_DEVICE = 101,
    E_INVALID_IMAGE = 200,
    E_INVALID_CONTEXT = 201,
    E_INVALID_HANDLE = 400,
    E_NOT_FOUND = 500,
    E_ILLEGAL_ADDRESS = 700,
    E_LAUNCH_OUT_OF_RESOURCES = 701,
    E_NOT_SUPPORTED = 801,
    E_STREAM_CAPTURE_UNSUPPORTED = 900,
    E_STREAM_CAPTURE_INVALIDATED = 901,
    E_UNKNOWN = 999,
};

using Op = std::function<void()>;
struct Stream;
// Buffers allocated inside a capture (graph memory nodes): they live as long as the graph.
struct GraphMem {
    std::vector<void*> bufs;
    ~GraphMem();
};
struct Capture {
    std::vector<Op> ops;
    std::shared_ptr<GraphMem> mem = std::make_shared<GraphMem>();
    std::vector<Stream*> members;  // the origin stream and every stream that joined it
};
struct Stream {
    std::shared_ptr<Capture> cap;  // the capture this stream records into (null: runs ops now)
    bool origin = false;           // the stream cuStreamBeginCapture was called on
};
struct Event {
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    std::shared_ptr<Capture> cap;  // recorded inside a capture: a stream waiting on it joins
};
struct Graph {
    std::vector<Op> ops;
    std::shared_ptr<GraphMem> mem;
};
struct Func {
    std::string name;
    std::function<Op(void**)> bind;  // the launch's arguments copied into a runnable call
    int max_dyn_smem = 48 * 1024;
    int max_threads = 1024;  // __launch_bounds__ and registers: a larger block fails to launch, as on a GPU
    int regs = 0;            // per thread (registers_of), 0 where not known
};
struct Module {
    std::vector<std::string> entries;
    std::map<std::string, int> maxntid;  // an entry's __launch_bounds__ (PTX .maxntid), if any
    std::map<std::string, std::unique_ptr<Func>> funcs;
};

// ---- the kernels: each argument copied from the launch's `void** params` (by the parameter's
// declared type, as the driver copies them into constant memory)
template <typename... A, size_t... I>
Op bind_args(void (*f)(A...), void** p, std::index_sequence<I...>) {
    auto args = std::make_shared<std::tuple<std::decay_t<A>...>>(*static_cast<std::decay_t<A>*>(p[I])...);
    return [f, args] { std::apply(f, *args); };
}
template <typename... A>
std::function<Op(void**)> binder(void (*f)(A...)) {
    return [f](void** p) { return bind_args(f, p, std::index_sequence_for<A...>{}); };
}
const std::unordered_map<std::string, std::function<Op(void**)>>& kernels() {
    static const std::unordered_map<std::string, std::function<Op(void**)>> k = {
#define R(name) {#name, binder(&::name)},
#include "emu_kernels.inc"
#undef R
    };
    return k;
}

// ---- state (one lock: the emulator runs one kernel at a time)
std::recursive_mutex mu;
bool inited = false;
int sm = [] {
    const char* v = std::getenv("DSV3_EMU_SM");
    return v && std::string(v) == "80" ? 80 : 90;
}();
// Registers per thread of each kernel as ptxas assembles the PTX of the reported architecture
// (gpu_tests.sh writes emu_regs.inc from `ptxas -v`: G(arch, name, regs) per entry, empty without
// ptxas). A GPU allocates registers per warp in units of 256 and refuses a block whose warps need
// more than the SM's 64K, so a kernel's largest block follows from its count: the emulator refuses
// the same launches (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES) and reports the same
// CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK and CU_FUNC_ATTRIBUTE_NUM_REGS.
int registers_of(const std::string& name) {  // 0: not known
    static const std::map<std::string, int> regs = [] {
        std::map<std::string, int> m;
#define G(arch, name, n) \
    if (arch == (sm == 80 ? 80 : 90)) m[#name] = n;
#include "emu_regs.inc"
#undef G
        return m;
    }();
    auto it = regs.find(name);
    return it == regs.end() ? 0 : it->second;
}
int threads_for_registers(int regs) {
    if (regs <= 0) return 1024;
    const int per_warp = (regs * 32 + 255) / 256 * 256;
    return std::min(1024, 65536 / per_warp * 32);
}
constexpr size_t CANARY = 256;
constexpr unsigned char CANARY_BYTE = 0xa5;
std::map<uintptr_t, size_t> allocs;  // address -> bytes
std::string last_kernel = "(none)";
int primary_ctx_tag = 0;
void* current_ctx = nullptr;

// Under AddressSanitizer (gpu_tests.sh --asan) the canary is poisoned instead: any read or write
// of it, or of ASan's redzones around the allocation, stops the process at the access with its
// stack (the kernel's source line), and the death callback names the kernel.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
constexpr bool asan = true;
const bool asan_hooked = [] {
    __sanitizer_set_death_callback([] {
        std::fprintf(stderr, "EMU FAILURE: AddressSanitizer stopped the process (above) in or after kernel %s\n", last_kernel.c_str());
    });
    return true;
}();
#else
constexpr bool asan = false;  // (emu.h: the ASAN_ macros do nothing)
#endif

// Fails if the canary after the `bytes`-byte buffer at `p` was overwritten (`when`: where found).
void check_canary(uintptr_t p, size_t bytes, const std::string& when) {
    if (asan) return;  // poisoned: ASan reports the access itself
    const unsigned char* c = (const unsigned char*)p + bytes;
    for (size_t i = 0; i < CANARY; i++)
        if (c[i] != CANARY_BYTE)
            fail("a write past the end of a " + std::to_string(bytes) + "-byte buffer (found " + when + ")");
}

void check_canaries(const std::string& after) {
    for (auto& [p, bytes] : allocs) check_canary(p, bytes, "after " + after);
}

// The allocation holding [p, p + n), or fail.
void check_range(CUdeviceptr p, size_t n, const char* what) {
    if (n == 0) return;
    auto it = allocs.upper_bound((uintptr_t)p);
    if (it == allocs.begin()) fail(std::string(what) + ": address outside every allocation");
    --it;
    if ((uintptr_t)p + n > it->first + it->second)
        fail(std::string(what) + ": " + std::to_string(n) + " bytes at offset " + std::to_string((uintptr_t)p - it->first) +
             " run past the end of a " + std::to_string(it->second) + "-byte buffer");
}

void* alloc(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes + CANARY) != 0) return nullptr;
    std::memset(p, 0xff, bytes);
    std::memset((char*)p + bytes, CANARY_BYTE, CANARY);
    ASAN_POISON_MEMORY_REGION((char*)p + bytes, CANARY);
    allocs[(uintptr_t)p] = bytes;
    return p;
}

CUresult release(void* p) {
    if (!p) return OK;
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) return E_INVALID_VALUE;
    check_canary(it->first, it->second, "at its free, after " + last_kernel);
    ASAN_UNPOISON_MEMORY_REGION((char*)p + it->second, CANARY);
    allocs.erase(it);
    std::free(p);
    return OK;
}

GraphMem::~GraphMem() {
    for (void* p : bufs) release(p);
}

// Runs `op` now, or records it into the capture `s` belongs to.
CUresult issue(void* s, Op op) {
    Stream* st = (Stream*)s;
    if (st && st->cap) {
        st->cap->ops.push_back(std::move(op));
        return OK;
    }
    op();
    return OK;
}

constexpr size_t SMEM_WINDOW = 16 * 1024;  // canary checked past a block's dynamic shared memory
const bool reverse_order = [] {
    const char* v = std::getenv("DSV3_EMU_ORDER");
    return v && std::string(v) == "reverse";
}();
// Launches per kernel, and driver and cuBLAS calls per entry point (counted where the entry
// point takes the lock). At exit each process appends, with DSV3_EMU_COVERAGE=FILE, "name count"
// lines of the launches (gpu_tests.sh --coverage lists the kernels no test launched), and with
// DSV3_EMU_PROFILE=FILE "launch NAME N" (kernels run, graph replays included) and "call NAME N"
// lines: the host round trips (cuStreamSynchronize, cuMemcpyDtoHAsync_v2), allocations and
// launches of a run, where no profiler is at hand.
std::map<std::string, long long> launches, api_calls;
struct CountsAtExit {
    static FILE* open(const char* var) {
        const char* f = std::getenv(var);
        return f && *f ? std::fopen(f, "a") : nullptr;
    }
    ~CountsAtExit() {
        if (FILE* o = open("DSV3_EMU_COVERAGE")) {
            for (auto& [k, n] : launches) std::fprintf(o, "%s %lld\n", k.c_str(), n);
            std::fclose(o);
        }
        if (FILE* o = open("DSV3_EMU_PROFILE")) {
            for (auto& [k, n] : launches) std::fprintf(o, "launch %s %lld\n", k.c_str(), n);
            for (auto& [k, n] : api_calls) std::fprintf(o, "call %s %lld\n", k.c_str(), n);
            std::fprintf(o, "tma boxes_loaded %lld\ntma boxes_stored %lld\n", emu_tma::boxes_landed,
                         emu_tma::boxes_stored);
            std::fclose(o);
        }
    }
} counts_at_exit;

void run_grid(const std::string& name, const Op& body, emu_dim3 grid, unsigned threads, size_t smem) {
    last_kernel = name;
    fail_context = " (in kernel " + name + ", grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                   std::to_string(grid.z) + ", " + std::to_string(threads) + " threads, " + std::to_string(smem) +
                   " B of dynamic shared memory)";
    emu::set_grid(grid);
    launches[name]++;
    const size_t canary_end = std::min(emu::DYN_SMEM_BYTES, smem + SMEM_WINDOW);
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long i = 0; i < nblocks; i++) {
        // DSV3_EMU_ORDER=reverse runs the blocks last to first: a kernel whose result depends on
        // the order its blocks run in (a race between blocks, a block reading another's output)
        // shows up as a difference between the two orders
        const unsigned long long b = reverse_order ? nblocks - 1 - i : i;
        const unsigned x = (unsigned)(b % grid.x), y = (unsigned)(b / grid.x % grid.y),
                       z = (unsigned)(b / ((unsigned long long)grid.x * grid.y));
        emu::smem_limit = smem;
        std::memset(emu::dyn_smem, 0xff, smem);
        std::memset(emu::dyn_smem + smem, 0x5a, canary_end - smem);
        ASAN_POISON_MEMORY_REGION(emu::dyn_smem + smem, canary_end - smem);
        wg_emu::begin_block();
        emu_tma::begin_block();
        emu::run_block({x, y, z}, (int)threads, body);
        emu_tma::end_block();
        wg_emu::end_block();
        ASAN_UNPOISON_MEMORY_REGION(emu::dyn_smem + smem, canary_end - smem);
        for (size_t i = smem; i < canary_end; i++)
            if (emu::dyn_smem[i] != 0x5a) fail("shared memory written past the launch's dynamic size");
    }
    emu::end_grid();
    fail_context.clear();
    check_canaries(name);
}

CUresult launch(Func* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem,
                void* stream, void** params, void** extra) {
    if (!f) return E_INVALID_HANDLE;
    if (extra) return E_NOT_SUPPORTED;
    if (by != 1 || bz != 1 || bx == 0 || bx > 1024) return E_INVALID_VALUE;
    if ((int)bx > f->max_threads) {
        std::fprintf(stderr,
                     "EMU: %s launched with %u threads, above the %d its __launch_bounds__ and %d registers per "
                     "thread allow (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)\n",
                     f->name.c_str(), bx, f->max_threads, f->regs);
        return E_LAUNCH_OUT_OF_RESOURCES;
    }
    if (bx % 32) fail(f->name + ": the emulator runs blocks of whole warps only (" + std::to_string(bx) + " threads)");
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return E_INVALID_VALUE;
    if ((int)smem > f->max_dyn_smem) {
        std::fprintf(stderr, "EMU: %s launched with %u B of dynamic shared memory above its limit %d B\n",
                     f->name.c_str(), smem, f->max_dyn_smem);
        return E_INVALID_VALUE;
    }
    Op body = f->bind(params);
    const std::string name = f->name;
    const emu_dim3 grid{gx, gy, gz};
    return issue(stream, [name, body, grid, bx, smem] { run_grid(name, body, grid, bx, smem); });
}

struct LaunchConfig {
    unsigned gx, gy, gz, bx, by, bz, smem;
    void* stream;
    void* attrs;
    unsigned nattrs;
};

int attribute(int a) {
    switch (a) {
        case 1: return 1024;                  // max threads per block
        case 2: return 1024;                  // max block dim x
        case 3: case 4: return 1024;          // y, z (64 on GPUs; not used)
        case 5: return 2147483647;            // max grid x
        case 6: case 7: return 65535;         // grid y, z
        case 8: return 48 * 1024;             // shared memory per block
        case 9: return 64 * 1024;             // constant memory
        case 10: return 32;                   // warp size
        case 12: return 65536;                // registers per block
        case 13: return 1980000;              // clock kHz
        case 16: return 132;                  // SMs
        case 36: return 2619000;              // memory clock kHz
        case 37: return 5120;                 // bus width
        case 38: return 50 * 1024 * 1024;     // L2
        case 39: return 2048;                 // threads per SM
        case 41: return 1;                    // unified addressing
        case 75: return sm / 10;              // compute capability
        case 76: return sm % 10;
        case 81: return 228 * 1024;           // shared memory per SM
        case 82: return 65536;                // registers per SM
        case 97: return sm == 90 ? 232448 : 166912;  // opt-in shared memory per block
        case 106: return 32;                  // max blocks per SM
        case 115: return 1;                   // memory pools (cudarc then frees with cuMemFreeAsync)
        default: return 0;
    }
}
}  // namespace drv

using namespace drv;
#define API extern "C" __attribute__((visibility("default")))
#define LOCK                                     \
    std::lock_guard<std::recursive_mutex> lock_(mu); \
    api_calls[__func__]++
#define NEED_INIT \
    if (!inited) return E_NOT_INITIALIZED

API CUresult cuInit(unsigned) {
    LOCK;
    inited = true;
    return OK;
}
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API CUresult cuDeviceGetCount(int* n) {
    LOCK;
    NEED_INIT;
    *n = 1;
    return OK;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    LOCK;
    NEED_INIT;
    if (ordinal != 0) return E_INVALID_DEVICE;
    *d = 0;
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (d != 0) return E_INVALID_DEVICE;
    *v = attribute(attr);
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "dsv3 CPU emulator");
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
    *b = 80ull << 30;
    return OK;
}
API CUresult cuDeviceGetUuid(void* u, CUdevice) {
    std::memset(u, 0x42, 16);
    return OK;
}
API CUresult cuDeviceGetUuid_v2(void* u, CUdevice) { return cuDeviceGetUuid(u, 0); }
API CUresult cuDeviceComputeCapability(int* ma, int* mi, CUdevice) {
    *ma = sm / 10, *mi = sm % 10;
    return OK;
}
API CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *total = 80ull << 30;
    *free = 64ull << 30;
    return OK;
}

// ---- contexts (one primary context)
API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    LOCK;
    NEED_INIT;
    *ctx = &primary_ctx_tag;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
API CUresult cuDevicePrimaryCtxRelease(CUdevice) { return OK; }
API CUresult cuCtxSetCurrent(void* c) {
    current_ctx = c;
    return OK;
}
API CUresult cuCtxGetCurrent(void** c) {
    *c = current_ctx;
    return OK;
}
API CUresult cuCtxPushCurrent_v2(void* c) { return cuCtxSetCurrent(c); }
API CUresult cuCtxPopCurrent_v2(void** c) {
    if (c) *c = current_ctx;
    return OK;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return OK;
}
API CUresult cuCtxSynchronize() {
    LOCK;
    return OK;
}
API CUresult cuCtxSetLimit(int, size_t) { return OK; }
API CUresult cuCtxGetLimit(size_t* v, int) {
    *v = 0;
    return OK;
}
API CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    *lo = 0, *hi = -5;
    return OK;
}
API CUresult cuCtxSetCacheConfig(int) { return OK; }
API CUresult cuCtxGetCacheConfig(int* c) {
    *c = 0;
    return OK;
}
API CUresult cuCtxSetFlags(unsigned) { return OK; }

API CUresult cuGetErrorString(CUresult e, const char** s) {
    static std::map<int, std::string> names;
    LOCK;
    auto& v = names[e];
    if (v.empty()) v = "emulated CUDA error " + std::to_string(e);
    *s = v.c_str();
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case E_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case E_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case E_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case E_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case E_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case E_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}

// ---- memory
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCK;
    void* q = alloc(bytes);
    if (!q) return E_OUT_OF_MEMORY;
    *p = (CUdeviceptr)q;
    return OK;
}
// Stream-ordered: inside a capture the buffer becomes the graph's (a memory node: allocated once
// here, kept while the graph lives, poisoned again at every replay as a fresh allocation would
// be), and a free inside the capture is left to the graph's end.
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
    LOCK;
    void* q = alloc(bytes);
    if (!q) return E_OUT_OF_MEMORY;
    *p = (CUdeviceptr)q;
    Stream* st = (Stream*)s;
    if (st && st->cap) {
        st->cap->mem->bufs.push_back(q);
        st->cap->ops.push_back([q, bytes] { std::memset(q, 0xff, bytes); });
    }
    return OK;
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    return release((void*)p);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    LOCK;
    Stream* st = (Stream*)s;
    if (st && st->cap) {
        auto& b = st->cap->mem->bufs;
        if (std::find(b.begin(), b.end(), (void*)p) == b.end()) b.push_back((void*)p);
        return OK;
    }
    return release((void*)p);
}
// The default memory pool: one handle, its release threshold kept (the engine raises it).
struct MemPool {
    unsigned long long release_threshold = 0;
} default_pool;
API CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    LOCK;
    if (d != 0) return E_INVALID_VALUE;
    *pool = &default_pool;
    return OK;
}
API CUresult cuMemPoolSetAttribute(void* pool, int attr, void* v) {
    LOCK;
    if (pool != &default_pool || !v) return E_INVALID_VALUE;
    if (attr != 4) return E_NOT_SUPPORTED;  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
    std::memcpy(&default_pool.release_threshold, v, 8);
    return OK;
}
API CUresult cuMemPoolGetAttribute(void* pool, int attr, void* v) {
    LOCK;
    if (pool != &default_pool || !v) return E_INVALID_VALUE;
    if (attr != 4) return E_NOT_SUPPORTED;
    std::memcpy(v, &default_pool.release_threshold, 8);
    return OK;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    *p = alloc(bytes);
    return *p ? OK : E_OUT_OF_MEMORY;
}
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API CUresult cuMemFreeHost(void* p) {
    LOCK;
    return release(p);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    LOCK;
    check_range(dst, n, "cuMemcpyHtoD");
    // the source is read when the copy runs (a captured copy reads it at each replay, as CUDA does)
    return issue(s, [dst, src, n] {
        std::memcpy((void*)dst, src, n);
        check_canaries("a host-to-device copy");
    });
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); }
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    LOCK;
    check_range(src, n, "cuMemcpyDtoH");
    return issue(s, [dst, src, n] { std::memcpy(dst, (const void*)src, n); });
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    LOCK;
    check_range(src, n, "cuMemcpyDtoD (source)");
    check_range(dst, n, "cuMemcpyDtoD (destination)");
    return issue(s, [dst, src, n] { std::memmove((void*)dst, (const void*)src, n); });
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); }
API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, s);
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
    LOCK;
    check_range(dst, n, "cuMemsetD8");
    return issue(s, [dst, v, n] { std::memset((void*)dst, v, n); });
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
    LOCK;
    check_range(dst, 4 * n, "cuMemsetD32");
    return issue(s, [dst, v, n] {
        for (size_t i = 0; i < n; i++) std::memcpy((char*)dst + 4 * i, &v, 4);
    });
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return cuMemsetD32Async(dst, v, n, nullptr); }
API CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, void* s) {
    LOCK;
    check_range(dst, 2 * n, "cuMemsetD16");
    return issue(s, [dst, v, n] {
        for (size_t i = 0; i < n; i++) std::memcpy((char*)dst + 2 * i, &v, 2);
    });
}
API CUresult cuPointerGetAttribute(void*, int, CUdeviceptr) { return E_NOT_SUPPORTED; }

// ---- modules and functions
API CUresult cuModuleLoadData(void** mod, const void* image) {
    LOCK;
    NEED_INIT;
    const std::string ptx((const char*)image);
    if (ptx.find(".version") == std::string::npos) return E_INVALID_IMAGE;
    auto m = new Module;
    for (size_t at = ptx.find(".entry "); at != std::string::npos; at = ptx.find(".entry ", at + 7)) {
        size_t b = at + 7, e = ptx.find('(', b);
        if (e == std::string::npos) return E_INVALID_IMAGE;
        std::string name = ptx.substr(b, e - b);
        while (!name.empty() && name.back() == ' ') name.pop_back();
        m->entries.push_back(name);
        // the directives between the parameter list and the body: .maxntid X, 1, 1
        const size_t body = ptx.find('{', e), mx = ptx.find(".maxntid", e);
        if (mx != std::string::npos && body != std::string::npos && mx < body)
            m->maxntid[name] = std::atoi(ptx.c_str() + mx + 8);
    }
    *mod = m;
    return OK;
}
API CUresult cuModuleLoadDataEx(void** mod, const void* image, unsigned, void*, void*) { return cuModuleLoadData(mod, image); }
API CUresult cuModuleUnload(void* mod) {
    LOCK;
    delete (Module*)mod;
    return OK;
}
API CUresult cuModuleGetFunction(void** f, void* mod, const char* name) {
    LOCK;
    Module* m = (Module*)mod;
    if (!m) return E_INVALID_HANDLE;
    auto have = std::find(m->entries.begin(), m->entries.end(), std::string(name));
    if (have == m->entries.end()) return E_NOT_FOUND;
    auto& slot = m->funcs[name];
    if (!slot) {
        auto k = kernels().find(name);
        if (k == kernels().end()) {
            std::fprintf(stderr, "EMU: kernel %s is in the PTX but not compiled into the emulator\n", name);
            return E_NOT_FOUND;
        }
        slot.reset(new Func{name, k->second});
        auto mx = m->maxntid.find(name);
        if (mx != m->maxntid.end()) slot->max_threads = mx->second;
        slot->regs = registers_of(name);
        slot->max_threads = std::min(slot->max_threads, threads_for_registers(slot->regs));
    }
    *f = slot.get();
    return OK;
}
API CUresult cuFuncSetAttribute(void* f, int attr, int v) {
    LOCK;
    if (!f) return E_INVALID_HANDLE;
    if (attr == 8) {  // max dynamic shared memory
        if (v < 0 || v > attribute(97)) return E_INVALID_VALUE;
        ((Func*)f)->max_dyn_smem = v;
    }
    return OK;
}
API CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    LOCK;
    if (!f) return E_INVALID_HANDLE;
    switch (attr) {
        case 0: *v = ((Func*)f)->max_threads; break;          // max threads per block
        case 4: *v = ((Func*)f)->regs ? ((Func*)f)->regs : 64; break;  // registers per thread
        case 8: *v = ((Func*)f)->max_dyn_smem; break;
        default: *v = 0;
    }
    return OK;
}
API CUresult cuFuncSetCacheConfig(void*, int) { return OK; }
API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void* f, int threads, size_t smem) {
    if (!f || threads <= 0) return E_INVALID_VALUE;
    int by_threads = 2048 / threads, by_smem = smem ? (int)((228 * 1024) / (smem + 1024)) : 32;
    const int regs = ((Func*)f)->regs, per_warp = (regs * 32 + 255) / 256 * 256;
    const int by_regs = regs ? 65536 / (per_warp * ((threads + 31) / 32)) : 32;
    *n = std::max(0, std::min({by_threads, by_smem, by_regs, 32}));
    return OK;
}
API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, void* f, int threads, size_t smem, unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, threads, smem);
}
API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void* stream, void** params, void** extra) {
    LOCK;
    return launch((Func*)f, gx, gy, gz, bx, by, bz, smem, stream, params, extra);
}
API CUresult cuLaunchKernelEx(const LaunchConfig* c, void* f, void** params, void** extra) {
    LOCK;
    // attributes (programmatic stream serialization) change only when a kernel may start: here
    // every launch runs after its predecessor, which PDL's griddepcontrol.wait guarantees anyway
    return launch((Func*)f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->smem, c->stream, params, extra);
}
API CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
    LOCK;
    return issue(s, [fn, data] { fn(data); });
}

// ---- streams, events, graphs
API CUresult cuStreamCreate(void** s, unsigned) {
    LOCK;
    *s = new Stream;
    return OK;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
API CUresult cuStreamDestroy_v2(void* s) {
    LOCK;
    Stream* st = (Stream*)s;
    if (st && st->cap) {
        auto& m = st->cap->members;
        m.erase(std::remove(m.begin(), m.end(), st), m.end());
    }
    delete st;
    return OK;
}
API CUresult cuStreamSynchronize(void* s) {
    LOCK;
    Stream* st = (Stream*)s;
    if (st && st->cap) return E_STREAM_CAPTURE_UNSUPPORTED;
    return OK;
}
API CUresult cuStreamQuery(void*) { return OK; }
API CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    LOCK;
    Stream* st = (Stream*)s;
    Event* ev = (Event*)e;
    if (!ev) return E_INVALID_HANDLE;
    if (st && ev->cap && !st->cap) {  // joins the capture (a fork inside it)
        st->cap = ev->cap;
        st->cap->members.push_back(st);
    }
    return OK;
}
API CUresult cuEventCreate(void** e, unsigned) {
    LOCK;
    *e = new Event;
    return OK;
}
API CUresult cuEventDestroy_v2(void* e) {
    LOCK;
    delete (Event*)e;
    return OK;
}
API CUresult cuEventRecord(void* e, void* s) {
    LOCK;
    Event* ev = (Event*)e;
    if (!ev) return E_INVALID_HANDLE;
    Stream* st = (Stream*)s;
    ev->cap = st ? st->cap : nullptr;
    ev->t = std::chrono::steady_clock::now();
    return OK;
}
API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuEventSynchronize(void*) { return OK; }
API CUresult cuEventQuery(void*) { return OK; }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    LOCK;
    *ms = std::chrono::duration<float, std::milli>(((Event*)b)->t - ((Event*)a)->t).count();
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API CUresult cuStreamBeginCapture_v2(void* s, int) {
    LOCK;
    Stream* st = (Stream*)s;
    if (!st) return E_STREAM_CAPTURE_UNSUPPORTED;  // the legacy stream cannot capture
    if (st->cap) return E_INVALID_VALUE;
    st->cap = std::make_shared<Capture>();
    st->cap->members.push_back(st);
    st->origin = true;
    return OK;
}
API CUresult cuStreamEndCapture(void* s, void** graph) {
    LOCK;
    Stream* st = (Stream*)s;
    if (!st || !st->cap || !st->origin) return E_INVALID_VALUE;
    auto g = new Graph;
    auto cap = st->cap;
    g->ops = std::move(cap->ops);
    g->mem = cap->mem;
    // the streams that joined through an event end with it (their next operation runs directly)
    for (Stream* m : cap->members) m->cap.reset();
    st->origin = false;
    *graph = g;
    return OK;
}
API CUresult cuStreamIsCapturing(void* s, int* status) {
    LOCK;
    Stream* st = (Stream*)s;
    *status = st && st->cap ? 1 : 0;
    return OK;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    LOCK;
    auto g = new Graph(*(Graph*)graph);
    *exec = g;
    return OK;
}
API CUresult cuGraphLaunch(void* exec, void* s) {
    LOCK;
    Graph* g = (Graph*)exec;
    if (!g) return E_INVALID_HANDLE;
    auto ops = g->ops;
    return issue(s, [ops] {
        for (auto& op : ops) op();
    });
}
API CUresult cuGraphUpload(void*, void*) { return OK; }
API CUresult cuGraphExecDestroy(void* g) {
    LOCK;
    delete (Graph*)g;
    return OK;
}
API CUresult cuGraphDestroy(void* g) {
    LOCK;
    delete (Graph*)g;
    return OK;
}

// ---- tensor maps (uint8 data, as fp8_gemm_tma's launcher encodes them)
API CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* base, const unsigned long long* dims,
                                    const unsigned long long* strides, const unsigned* box, const unsigned* estrides,
                                    int interleave, int swizzle, int, int) {
    LOCK;
    if (dtype != 0 || interleave != 0 || (swizzle != 0 && swizzle != 3) || rank < 1 || rank > 3) return E_NOT_SUPPORTED;
    for (unsigned i = 0; i < rank; i++)
        if (estrides[i] != 1) return E_NOT_SUPPORTED;
    long long d[3], st[2], b[3];
    for (unsigned i = 0; i < rank; i++) d[i] = (long long)dims[i], b[i] = box[i];
    for (unsigned i = 0; i + 1 < rank; i++) st[i] = (long long)strides[i];
    TmaDesc t = emu_tma::encode(base, (int)rank, d, st, b, swizzle == 3);
    std::memcpy(map, &t, sizeof(t));
    return OK;
}

// ---- cuBLAS (libcublas.so is a link to this library: one state, one lock): the GEMMs the
// engine calls, as a column-major reference (f64 sums, one rounding to C's type; beta = 0 never
// reads C), on the handle's stream (captured like a launch)
namespace blas {
enum : int { S_OK = 0, S_NOT_INITIALIZED = 1, S_INVALID_VALUE = 7, S_NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16BF = 14 };
struct Handle {
    void* stream = nullptr;
};
inline double ld(const void* p, int t, size_t i) {
    return t == R_32F ? (double)((const float*)p)[i] : (double)__bfloat162float(((const __nv_bfloat16*)p)[i]);
}
inline void st(void* p, int t, size_t i, double v) {
    if (t == R_32F) ((float*)p)[i] = (float)v;
    else ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn((float)v);
}
inline size_t esize(int t) { return t == R_32F ? 4 : 2; }
// C[b] (m x n, ldc) = alpha · op(A[b]) · op(B[b]) + beta · C[b], column-major
int gemm(Handle* h, int ta, int tb, int m, int n, int k, float alpha, const void* A, int at, int lda, long long sa,
         const void* B, int bt, int ldb, long long sb, float beta, void* C, int ct, int ldc, long long sc, int batch) {
    if (!h) return S_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || (ta != 0 && ta != 1) || (tb != 0 && tb != 1)) return S_INVALID_VALUE;
    for (int t : {at, bt, ct})
        if (t != R_32F && t != R_16BF) return S_NOT_SUPPORTED;
    if (ldc < std::max(1, m) || lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k)) return S_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return S_OK;
    // the extents the call reads and writes, inside allocations
    auto extent = [](int rows, int cols, int ldx, long long s, int b, int t) {
        return ((size_t)(b - 1) * (size_t)s + (size_t)(cols - 1) * ldx + rows) * esize(t);
    };
    if (k > 0) {
        check_range((CUdeviceptr)A, extent(ta ? k : m, ta ? m : k, lda, sa, batch, at), "cuBLAS GEMM: A");
        check_range((CUdeviceptr)B, extent(tb ? n : k, tb ? k : n, ldb, sb, batch, bt), "cuBLAS GEMM: B");
    }
    check_range((CUdeviceptr)C, extent(m, n, ldc, sc, batch, ct), "cuBLAS GEMM: C");
    return issue(h->stream, [=] {
        last_kernel = "cuBLAS GEMM";
        for (int b = 0; b < batch; b++) {
            const char* a = (const char*)A + (size_t)b * sa * esize(at);
            const char* bb = (const char*)B + (size_t)b * sb * esize(bt);
            char* c = (char*)C + (size_t)b * sc * esize(ct);
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    double s = 0;
                    for (int p = 0; p < k; p++) {
                        double x = ta ? ld(a, at, (size_t)i * lda + p) : ld(a, at, (size_t)p * lda + i);
                        double y = tb ? ld(bb, bt, (size_t)p * ldb + j) : ld(bb, bt, (size_t)j * ldb + p);
                        s += x * y;
                    }
                    const size_t o = (size_t)j * ldc + i;
                    st(c, ct, o, alpha * s + (beta != 0.0f ? beta * ld(c, ct, o) : 0.0));
                }
        }
        check_canaries("a cuBLAS GEMM");
    });
}
}  // namespace blas

API int cublasCreate_v2(void** h) {
    LOCK;
    *h = new blas::Handle;
    return blas::S_OK;
}
API int cublasDestroy_v2(void* h) {
    LOCK;
    delete (blas::Handle*)h;
    return blas::S_OK;
}
API int cublasSetStream_v2(void* h, void* s) {
    LOCK;
    if (!h) return blas::S_NOT_INITIALIZED;
    ((blas::Handle*)h)->stream = s;
    return blas::S_OK;
}
API int cublasGetStream_v2(void* h, void** s) {
    if (!h) return blas::S_NOT_INITIALIZED;
    *s = ((blas::Handle*)h)->stream;
    return blas::S_OK;
}
API int cublasSetMathMode(void* h, int) { return h ? blas::S_OK : blas::S_NOT_INITIALIZED; }
API int cublasSetWorkspace_v2(void* h, void*, size_t) { return h ? blas::S_OK : blas::S_NOT_INITIALIZED; }
API int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at,
                                   int lda, long long sa, const void* B, int bt, int ldb, long long sb, const void* beta,
                                   void* C, int ct, int ldc, long long sc, int batch, int /*compute*/, int /*algo*/) {
    LOCK;
    return blas::gemm((blas::Handle*)h, ta, tb, m, n, k, *(const float*)alpha, A, at, lda, sa, B, bt, ldb, sb,
                      *(const float*)beta, C, ct, ldc, sc, batch);
}
API int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda,
                     const void* B, int bt, int ldb, const void* beta, void* C, int ct, int ldc, int, int) {
    LOCK;
    return blas::gemm((blas::Handle*)h, ta, tb, m, n, k, *(const float*)alpha, A, at, lda, 0, B, bt, ldb, 0,
                      *(const float*)beta, C, ct, ldc, 0, 1);
}
API int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                       const float* B, int ldb, const float* beta, float* C, int ldc) {
    LOCK;
    return blas::gemm((blas::Handle*)h, ta, tb, m, n, k, *alpha, A, blas::R_32F, lda, 0, B, blas::R_32F, ldb, 0, *beta,
                      C, blas::R_32F, ldc, 0, 1);
}
API int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A,
                                  int lda, long long sa, const float* B, int ldb, long long sb, const float* beta,
                                  float* C, int ldc, long long sc, int batch) {
    LOCK;
    return blas::gemm((blas::Handle*)h, ta, tb, m, n, k, *alpha, A, blas::R_32F, lda, sa, B, blas::R_32F, ldb, sb,
                      *beta, C, blas::R_32F, ldc, sc, batch);
}
