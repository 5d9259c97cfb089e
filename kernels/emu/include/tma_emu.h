// The CPU emulator's sm_90a TMA and mbarriers (include it after emu.h and wgmma_emu.h): the
// emulated versions of the helpers of kernels/cuda/tma.cuh, with the checks a misuse would need to
// fail on the GPU:
//
// - mbarrier (8 bytes of shared memory, its state kept here by address): init(count) starts phase 0
//   with `count` pending arrivals and a transaction count of 0; arrive takes one arrival,
//   arrive.expect_tx(b) first adds b to the transaction count; a TMA's bytes subtract from it when
//   they land. The phase completes when both reach 0: the parity flips and the next phase expects
//   `count` arrivals again. try_wait.parity(P) is true once the phase with parity P has completed,
//   i.e. while the current phase's parity differs from P (a fresh barrier: parity 1 passes, 0
//   waits). A barrier used before its init, initialized twice, or overwritten by a TMA box is
//   reported; so is a block that ends with TMA bytes that never landed or a phase left half done by
//   an arrival (an arrive.expect_tx whose bytes never came).
// - cp.async.bulk.tensor 2D/3D loads through an emulated tensor map (emu_tma::encode: the fields
//   cuTensorMapEncodeTiled takes for uint8 data: dims, byte strides, box, swizzle none or 128B):
//   the box at the given coordinates, elements outside the tensor's dims read as zero (TMA's OOB
//   fill), in-bounds elements read from the global buffers registered with emu::allow_global; in
//   shared memory box row r (of box0 bytes) at dst + r·box0, and with the 128-byte swizzle the
//   16-byte chunk j of a row at chunk j ^ (row % 8) of its 128-byte line (the address bits [4, 7)
//   XOR bits [7, 10), dst 1024-byte aligned), which is exactly how wgmma_emu.h reads a 128B-swizzle
//   descriptor. The bytes land when some thread waits on the box's mbarrier (deferred: a consumer
//   that reads before waiting sees the slot's old bytes), and with emu::cp_async_eager also at
//   issue (a slot overwritten while a wgmma still reads it fails wgmma_emu's operand check).
// - cp.async.bulk.tensor 2D stores (tma_store_2d) join the issuing thread's current bulk group
//   (bulk_commit closes it). The box's bytes are read from the async proxy's view of shared
//   memory (the generic writes up to the last fence.proxy.async, taken when a store is issued
//   after one: a staging buffer never fenced is read stale) when the thread waits for the group
//   (bulk_wait_read / bulk_wait), so a staging buffer written and fenced again before that wait
//   stores the new bytes; with emu::cp_async_eager they are read at issue instead, so a staging
//   write not yet done (a missing barrier before the store) is left out. Elements past the
//   tensor's dims are not written; the destination must lie in the registered global buffers.
//   A store never waited for by the end of the block is reported. The source is 128-byte aligned
//   (1024 with the 128-byte swizzle, read back through the same address XOR as a load).
// - The box must fit the dynamic shared memory the launcher requests.
// Timing means nothing here.
#pragma once
#include <emu.h>
#include <wgmma_emu.h>

#include <map>
#include <vector>

// the emulated helpers tma.cuh's own device functions call (defined below)
struct TmaDesc;
inline void tma_store_2d(const TmaDesc* d, uint32_t src, int c0, int c1);
inline void bulk_commit();
template <int N>
inline void bulk_wait_read();
inline void named_bar_sync(int id, int count);
inline void mbar_init(uint32_t a, uint32_t count);
inline void mbar_fence_init();
inline void mbar_arrive_expect_tx(uint32_t a, uint32_t bytes);
inline void mbar_wait(uint32_t a, uint32_t parity);
inline void tma_load_2d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1);
inline void tma_load_3d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2);

#include <tma.cuh>  // TmaDesc (its inline-PTX helpers are left out under DSV3_EMU)

namespace emu_tma {
// The emulated tensor map inside a TmaDesc.
struct Map {
    const unsigned char* base;
    long long rank, dims[3], strides[2], box[3], swizzle128;
};
static_assert(sizeof(Map) <= sizeof(TmaDesc), "emulated tensor map too large");

// cuTensorMapEncodeTiled's checks for uint8 data (the ones the launcher must meet): base 16-byte
// aligned, byte strides multiples of 16 below 2^40, box dims 1..256, the inner box 16-byte
// multiple, with the 128B swizzle the inner box at most 128 bytes.
inline TmaDesc encode(const void* base, int rank, const long long* dims, const long long* strides,
                      const long long* box, bool swizzle128) {
    if (rank < 1 || rank > 3) fail("tensor map rank");
    if ((uintptr_t)base % 16) fail("tensor map base not 16-byte aligned");
    for (int i = 0; i + 1 < rank; i++)
        if (strides[i] % 16 || strides[i] <= 0 || strides[i] >= (1ll << 40)) fail("tensor map stride");
    for (int i = 0; i < rank; i++) {
        if (dims[i] < 1 || dims[i] > (1ll << 32)) fail("tensor map dim");
        if (box[i] < 1 || box[i] > 256) fail("tensor map box dim");
    }
    if (box[0] % 16) fail("tensor map inner box not a multiple of 16 bytes");
    if (swizzle128 && box[0] > 128) fail("tensor map: 128B swizzle needs an inner box of at most 128 bytes");
    TmaDesc d{};
    Map m{};
    m.base = (const unsigned char*)base;
    m.rank = rank;
    for (int i = 0; i < 3; i++) m.dims[i] = i < rank ? dims[i] : 1, m.box[i] = i < rank ? box[i] : 1;
    for (int i = 0; i < 2; i++) m.strides[i] = i + 1 < rank ? strides[i] : 0;
    m.swizzle128 = swizzle128;
    std::memcpy(&d, &m, sizeof(m));
    return d;
}

struct Box {
    uint32_t dst;
    Map map;
    long long c[3];
};
struct Bar {
    int count = 0, pending = 0;
    long long tx = 0;
    int phase = 0;             // the current (incomplete) phase's parity
    std::vector<Box> boxes;    // issued, not landed
    std::vector<int> waiters;  // fibers parked on it
};
static std::map<uint32_t, Bar> bars;
static long long boxes_landed = 0;

// A TMA store issued and not yet read (its group and whether it was already read at issue).
struct Store {
    Box box;
    int group;
};
static std::vector<Store> stores[emu::MAXT];
static int bulk_committed[emu::MAXT];
static long long boxes_stored = 0;
// The async proxy's view of the dynamic shared memory, what TMA stores read: NaN (0xff) until a
// store issued after a fence.proxy.async takes the generic writes so far into it (taken lazily,
// at the block's first store). A staging buffer written without a fence before its store is
// read stale.
static std::vector<unsigned char> view;
static bool view_ready = false;

inline void begin_block() {
    bars.clear();
    for (int t = 0; t < emu::MAXT; t++) stores[t].clear(), bulk_committed[t] = 0;
    view_ready = false;
    wg_emu::proxy_fence_pending = false;
}
// At a store's issue: the view, brought up to date if a fence came since it was last taken.
inline void sync_view() {
    if (!view_ready) view.assign(emu::smem_limit, 0xff), view_ready = true;
    if (wg_emu::proxy_fence_pending) {
        std::memcpy(view.data(), emu::dyn_smem, emu::smem_limit);
        wg_emu::proxy_fence_pending = false;
    }
}
inline void end_block() {
    for (int t = 0; t < emu::MAXT; t++)
        if (!stores[t].empty()) fail("a TMA store never waited for (cp.async.bulk.wait_group) by thread " + std::to_string(t));
    for (auto& [a, b] : bars) {
        if (!b.boxes.empty()) fail("a TMA box never landed (its mbarrier never waited for)");
        if (b.pending != b.count || b.tx != 0)
            fail("an mbarrier phase left incomplete at the end of the block (" + std::to_string(b.count - b.pending) +
                 " arrivals, " + std::to_string(b.tx) + " transaction bytes outstanding)");
    }
}

inline Bar& bar(uint32_t a) {
    auto it = bars.find(a);
    if (it == bars.end()) fail("mbarrier used before mbarrier.init: " + std::to_string(a));
    return it->second;
}

inline uint32_t swz(uint32_t a) { return a ^ (((a >> 7) & 7) << 4); }

// Copies box x into shared memory.
inline void copy_box(const Box& x) {
    const Map& m = x.map;
    const long long row = m.box[0];
    for (long long i2 = 0; i2 < m.box[2]; i2++)
        for (long long i1 = 0; i1 < m.box[1]; i1++)
            for (long long i0 = 0; i0 < row; i0++) {
                const long long g0 = x.c[0] + i0, g1 = x.c[1] + i1, g2 = x.c[2] + i2;
                unsigned char v = 0;
                if (g0 >= 0 && g0 < m.dims[0] && g1 >= 0 && g1 < m.dims[1] && g2 >= 0 && g2 < m.dims[2]) {
                    const unsigned char* s = m.base + g0 + g1 * m.strides[0] + g2 * m.strides[1];
                    bool inside = emu::globals.empty();
                    for (const emu::Region& r : emu::globals) inside = inside || (s >= r.lo && s < r.hi);
                    if (!inside) fail("TMA read outside the registered global buffers (tensor map dims/strides)");
                    v = *s;
                }
                const uint32_t lin = x.dst + (uint32_t)(((i2 * m.box[1]) + i1) * row + i0);
                emu::dyn_smem[m.swizzle128 ? swz(lin) : lin] = v;
            }
}

// Writes box x from shared memory into global memory (elements inside the tensor's dims only).
inline void store_box(const Box& x) {
    const Map& m = x.map;
    const long long row = m.box[0];
    for (long long i1 = 0; i1 < m.box[1]; i1++)
        for (long long i0 = 0; i0 < row; i0++) {
            const long long g0 = x.c[0] + i0, g1 = x.c[1] + i1;
            if (g0 < 0 || g0 >= m.dims[0] || g1 < 0 || g1 >= m.dims[1]) continue;
            unsigned char* d = const_cast<unsigned char*>(m.base) + g0 + g1 * m.strides[0];
            bool inside = emu::globals.empty();
            for (const emu::Region& r : emu::globals) inside = inside || (d >= r.lo && d < r.hi);
            if (!inside) fail("TMA store outside the registered global buffers (tensor map dims/strides)");
            const uint32_t lin = x.dst + (uint32_t)(i1 * row + i0);
            *d = view[m.swizzle128 ? swz(lin) : lin];  // (the async proxy's view: fenced writes)
        }
    boxes_stored++;
}

inline void complete_if_done(Bar& b) {
    if (b.pending == 0 && b.tx == 0) {
        b.phase ^= 1;
        b.pending = b.count;
        for (int f : b.waiters) emu::fib[f].waiting = false;
        b.waiters.clear();
    }
}

inline void land(Bar& b) {
    std::vector<Box> boxes;
    boxes.swap(b.boxes);
    for (const Box& x : boxes) {
        copy_box(x);
        b.tx -= x.map.box[0] * x.map.box[1] * x.map.box[2];
        boxes_landed++;
    }
    complete_if_done(b);
}

inline void load(uint32_t dst, const TmaDesc* d, uint32_t barrier, int c0, int c1, int c2, int rank) {
    Box x;
    std::memcpy(&x.map, d, sizeof(Map));
    if (x.map.rank != rank) fail("TMA load rank differs from the tensor map's");
    x.dst = dst;
    x.c[0] = c0, x.c[1] = c1, x.c[2] = c2;
    const long long bytes = x.map.box[0] * x.map.box[1] * x.map.box[2];
    if (dst % 128) fail("TMA destination not 128-byte aligned");
    if (x.map.swizzle128 && dst % 1024) fail("TMA destination of a 128B-swizzled box not 1024-byte aligned");
    if (dst + bytes > emu::smem_limit) fail("TMA box past the launcher's shared memory size");
    for (auto& [a, b] : bars)
        if (a + 8 > dst && a < dst + bytes) fail("TMA box overlaps an mbarrier");
    Bar& b = bar(barrier);
    b.boxes.push_back(x);
    for (int f : b.waiters) emu::fib[f].waiting = false;  // parked waiters poll again (and land it)
    b.waiters.clear();
    if (emu::cp_async_eager) copy_box(x);  // also at issue (landing copies the same bytes again)
}
}  // namespace emu_tma

// ---- the helpers of kernels/cuda/tma.cuh
inline void mbar_init(uint32_t a, uint32_t count) {
    if (a % 8) fail("mbarrier not 8-byte aligned");
    if (emu_tma::bars.count(a)) fail("mbarrier initialized twice");
    if (count < 1) fail("mbarrier count 0");
    emu_tma::Bar b;
    b.count = b.pending = (int)count;
    emu_tma::bars[a] = b;
}
inline void mbar_fence_init() {}
inline void mbar_arrive(uint32_t a) {
    emu_tma::Bar& b = emu_tma::bar(a);
    b.pending--;
    emu_tma::complete_if_done(b);
}
inline void mbar_arrive_expect_tx(uint32_t a, uint32_t bytes) {
    emu_tma::Bar& b = emu_tma::bar(a);
    b.tx += bytes;
    b.pending--;
    emu_tma::complete_if_done(b);
}
inline void mbar_wait(uint32_t a, uint32_t parity) {
    for (;;) {
        emu_tma::Bar& b = emu_tma::bar(a);
        if ((uint32_t)b.phase != (parity & 1)) return;  // the phase with this parity completed
        emu_tma::land(b);
        if ((uint32_t)b.phase != (parity & 1)) return;
        b.waiters.push_back(emu::cur);
        emu::wait_here();
    }
}
inline void tma_store_2d(const TmaDesc* d, uint32_t src, int c0, int c1) {
    emu_tma::Box x;
    std::memcpy(&x.map, d, sizeof(emu_tma::Map));
    if (x.map.rank != 2) fail("TMA store rank differs from the tensor map's");
    x.dst = src;  // here: the shared source
    x.c[0] = c0, x.c[1] = c1, x.c[2] = 0;
    const long long bytes = x.map.box[0] * x.map.box[1];
    if (src % 128) fail("TMA store source not 128-byte aligned");
    if (x.map.swizzle128 && src % 1024) fail("TMA store source of a 128B-swizzled box not 1024-byte aligned");
    if (src + bytes > emu::smem_limit) fail("TMA store box past the launcher's shared memory size");
    emu_tma::sync_view();
    const int t = emu::cur;
    if (emu::cp_async_eager) {
        emu_tma::store_box(x);  // read at issue
        emu_tma::stores[t].push_back({x, -1 - emu_tma::bulk_committed[t]});  // still to be waited for
    } else {
        emu_tma::stores[t].push_back({x, emu_tma::bulk_committed[t]});
    }
}
inline void bulk_commit() { emu_tma::bulk_committed[emu::cur]++; }
// Both waits: the groups older than the newest N are read (and, here, written) now.
template <int N>
inline void bulk_wait() {
    const int t = emu::cur, done_below = emu_tma::bulk_committed[t] - N;
    std::vector<emu_tma::Store> keep;
    for (const emu_tma::Store& x : emu_tma::stores[t]) {
        const int g = x.group < 0 ? -1 - x.group : x.group;
        if (g >= done_below) {
            keep.push_back(x);
            continue;
        }
        if (x.group >= 0) emu_tma::store_box(x.box);  // deferred: read at the wait
    }
    emu_tma::stores[t].swap(keep);
}
template <int N>
inline void bulk_wait_read() {
    bulk_wait<N>();
}
inline void named_bar_sync(int id, int count) { emu::named_sync(id, count); }
inline void tma_prefetch_desc(const TmaDesc*) {}
inline void tma_load_2d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1) {
    emu_tma::load(dst, d, bar, c0, c1, 0, 2);
}
inline void tma_load_3d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2) {
    emu_tma::load(dst, d, bar, c0, c1, c2, 3);
}
