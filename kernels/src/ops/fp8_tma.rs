//! The TMA form of the FP8 GEMM, `fp8_gemm_tma_*` (kernels/cuda/fp8gemm.cu; sm_90a): DeepGEMM's
//! structure — a producer warp streaming 128-K groups of A and B by TMA (tensor maps, 128-byte
//! swizzle, zero fill past m, n and k) into a 4-stage ring guarded by mbarriers, two consumer
//! warpgroups on wgmma m64n128k32 with the per-128-K promotion, persistent over the block tiles.
//! The tensor maps are encoded here with the driver's `cuTensorMapEncodeTiled` and passed in the
//! kernel's `__grid_constant__` argument block ([`Fp8TmaArgs`]). Emulator-verified
//! (kernels/emu/fp8gemm_emu.cpp) and correct on the H100 (kernels/tests/fp8.rs, dense and
//! grouped, with and without split-K; 2026-11-24), not yet timed; [`super::fp8::fp8_gemm`] picks it.
//! The K-grouped mode (the expert Wgrad) has not run on a GPU yet.
use super::fp8::{Fp8Gemm, Fp8GemmArgs};
use super::{dim, int, launch, launch_smem, KArg};
use crate::device::{cuda_err, Device};
use crate::tensor::{dptr, empty, DType};
use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::DeviceRepr;
use dsv3_core::Result;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Threads of `fp8_gemm_tma_*`: 2 consumer warpgroups and 1 producer warp.
pub const FP8_TMA_THREADS: u32 = 288;
/// Dynamic shared memory of `fp8_gemm_tma_*`: 4 stages of A (2 x 64 x 128) and two B tiles
/// (128 x 128), 8 mbarriers in the next KiB, the TMA-store staging (16 KiB per consumer
/// warpgroup) and 1 KiB of slack to align the ring to 1024 bytes.
pub const FP8_TMA_SMEM: u32 = 4 * 3 * 16384 + 1024 + 2 * 16384 + 1024;

/// The argument block of `fp8_gemm_tma_*` (`struct Fp8TmaArgs` in fp8gemm.cu): the tensor maps
/// of A and B (each a 128-byte, 64-byte aligned `CUtensorMap`) and the common FP8 GEMM arguments.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct Fp8TmaArgs {
    pub ta: [u64; 16],
    pub tb: [u64; 16],
    pub p: Fp8GemmArgs,
    /// Split-K's f32 partials (0 when `splits == 1`): with `counters`, a 128 x 128 slab per split
    /// of each split tile, `[(tiles - split_from) · splits, 128, 128]`; else `[splits, m, n]`.
    pub work: u64,
    /// K-grouped (the MoE expert Wgrad): `[kgroups + 1]` segment starts along K (multiples of
    /// 128), 0 when not grouped along K.
    pub k_seg: u64,
    /// D elements between the K groups' outputs.
    pub stride_d: i64,
    pub splits: i32,
    pub kgroups: i32,
    /// 1: D (bf16, written, not accumulated, not K-grouped) leaves by TMA stores through `td`
    /// ([`store_by_tma`]), from the tiles that are not split.
    pub store_d: i32,
    /// Block tiles `split_from..` are split `splits` ways along K, the ones before it run whole
    /// ([`SplitPlan`]; more than 0 needs `counters`).
    pub split_from: i32,
    /// Split-K summed in the kernel: `[2 · block tiles]` zeroed arrival counters
    /// (`Device::counters`; the kernel re-arms them), 0 for the separate reduce launch.
    pub counters: u64,
    /// D: uint8 dims `{2n, m}`, stride `2·ldd`, box `{128, 64}`, 128-byte swizzle (zeros when
    /// `store_d == 0`).
    pub td: [u64; 16],
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct (offsets 0, 128, 256, 448).
unsafe impl DeviceRepr for Fp8TmaArgs {}

/// Whether `fp8_gemm_tma_*` can run `g`: TMA's global strides (lda, ldb, the grouped weight
/// stride) and base addresses must be multiples of 16 bytes; k, m and n may be anything.
pub fn tma_fits(g: &Fp8Gemm, a_ptr: u64, b_ptr: u64) -> bool {
    g.a.ld.is_multiple_of(16)
        && g.b.ld.is_multiple_of(16)
        && (g.groups == 1 || g.stride_b.is_multiple_of(16))
        && a_ptr.is_multiple_of(16)
        && b_ptr.is_multiple_of(16)
}

/// Whether `fp8_gemm_tma_*` stores D by TMA (its staging buffer and two 64-column boxes per
/// warpgroup tile, DeepGEMM's epilogue) rather than from registers: a bf16 D written, not
/// accumulated, with some tiles not split along K (`plan`), its base and rows 16-byte aligned
/// (TMA's rules). The split tiles' sums are stored from registers.
pub fn store_by_tma(dt: DType, g: &Fp8Gemm, d_ptr: u64, plan: SplitPlan) -> bool {
    dt == DType::Bf16
        && !g.accumulate
        && (plan.splits == 1 || plan.split_from > 0)
        && g.ldd.is_multiple_of(8)
        && d_ptr.is_multiple_of(16)
}

/// A uint8 tensor map over `dims` (innermost first) with byte `strides` for the outer dims,
/// boxes of `boxd`, 128-byte swizzle, zero fill out of bounds.
pub(crate) fn encode_u8(base: u64, dims: &[u64], strides: &[u64], boxd: &[u32]) -> Result<[u64; 16]> {
    let rank = dims.len();
    debug_assert!(strides.len() + 1 == rank && boxd.len() == rank);
    let elem = [1u32; 3];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array holds `rank` (strides: rank - 1) entries; the driver writes 128 bytes
    // into `map`; the base address is a live device allocation (the launcher's operand).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            rank as u32,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            elem.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(cuda_err(&format!("cuTensorMapEncodeTiled (dims {dims:?}, strides {strides:?}, box {boxd:?})"), r));
    }
    Ok(map.opaque)
}

/// `DSV3_FP8_SPLITK_REDUCE=separate` (read once): split-K partials summed by the separate
/// `fp8_splitk_reduce_*` launch instead of inside the GEMM.
fn separate_reduce() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    super::env_is(&V, "DSV3_FP8_SPLITK_REDUCE", "separate")
}

/// Splits along K for `tiles` block tiles of `kgroups` 128-K groups on `sms` SMs: 1 when the
/// tiles alone fill at least half the SMs; else enough splits to fill them, each at least 2
/// K groups, at most 16. `DSV3_FP8_SPLITK=<n>` forces n (1: off), capped at `kgroups`.
pub fn splitk_for(tiles: usize, kgroups: usize, sms: usize) -> usize {
    if let Some(s) = forced_splits() {
        return s.clamp(1, kgroups.max(1));
    }
    if tiles == 0 || tiles * 2 > sms {
        return 1;
    }
    (sms / tiles).min(kgroups / 2).clamp(1, 16)
}

fn forced_splits() -> Option<usize> {
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("DSV3_FP8_SPLITK").ok().and_then(|v| v.parse().ok()))
}

/// How `fp8_gemm_tma_*` splits K over its block tiles: tiles `split_from..` run as `splits` work
/// units each, the ones before whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    pub split_from: usize,
    pub splits: usize,
}

impl SplitPlan {
    /// The work units of `tiles` block tiles (the persistent blocks' walk).
    pub fn units(&self, tiles: usize) -> usize {
        self.split_from + (tiles - self.split_from) * self.splits
    }
    /// The walk's estimated length in tiles' times on `sms` persistent blocks (`kgroups` 128-K
    /// groups per tile): its waves of whole tiles, plus its waves of split units at
    /// [`split_cost`] each.
    pub fn waves(&self, tiles: usize, sms: usize, kgroups: usize) -> f64 {
        let sms = sms.max(1);
        let split_units = self.units(tiles) - self.split_from;
        let unit = if self.splits > 1 { split_cost(kgroups, self.splits) / kgroups.max(1) as f64 } else { 1.0 };
        self.split_from.div_ceil(sms) as f64 + split_units.div_ceil(sms) as f64 * unit
    }
}

/// The time of a tile of `kgroups` 128-K groups split `splits` ways along K, in one K group's MMA
/// time (~512 cycles for 128 x 128 x 128 FP8 on an SM): its share of the K groups, plus writing
/// its 64 KiB of f32 partials (~2 groups' time at ~64 bytes a cycle) and the last split's reads
/// of every split's partials (~2 groups each). An estimate to choose by, not a measurement.
pub fn split_cost(kgroups: usize, splits: usize) -> f64 {
    if splits <= 1 {
        return kgroups as f64;
    }
    kgroups as f64 / splits as f64 + 2.0 + 2.0 * splits as f64
}

/// Whether [`split_plan`] splits the tiles of a last, partly filled wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailSplit {
    /// Never (`DSV3_FP8_TAIL_SPLIT=0`).
    Off,
    /// Where [`split_cost`] says it shortens the walk by a quarter of the tail tiles' time or more
    /// (the default).
    Auto,
    /// Whenever the last wave is at most half full (`DSV3_FP8_TAIL_SPLIT=always`; tests).
    Always,
}

/// 0: not yet read from the environment, else 1 + the `TailSplit` discriminant.
static TAIL_SPLIT: AtomicU8 = AtomicU8::new(0);

/// The [`TailSplit`] mode: `DSV3_FP8_TAIL_SPLIT` (`0`: off, `always`; else auto), or as
/// [`set_tail_split`] last set it.
pub fn tail_split() -> TailSplit {
    match TAIL_SPLIT.load(Ordering::Relaxed) {
        1 => TailSplit::Off,
        2 => TailSplit::Auto,
        3 => TailSplit::Always,
        _ => {
            let mode = match std::env::var("DSV3_FP8_TAIL_SPLIT").as_deref() {
                Ok("0") => TailSplit::Off,
                Ok("always") => TailSplit::Always,
                _ => TailSplit::Auto,
            };
            set_tail_split(mode);
            mode
        }
    }
}

/// Sets [`split_plan`]'s tail-split mode for the process (`fp8_bench` times with and without it;
/// the tests force it).
pub fn set_tail_split(mode: TailSplit) {
    let v = match mode {
        TailSplit::Off => 1,
        TailSplit::Auto => 2,
        TailSplit::Always => 3,
    };
    TAIL_SPLIT.store(v, Ordering::Relaxed);
}

/// [`SplitPlan`] for `tiles` block tiles of `kgroups` 128-K groups on `sms` SMs. Too few tiles to
/// fill half the SMs: every tile split ([`splitk_for`]). Otherwise, with `tail` (the in-kernel
/// sum, which the tail split needs), the tiles of the walk's last wave when they fill at most half
/// of it and K is long enough ([`TailSplit::Auto`]): split into the count (2 to 16, each split at
/// least 2 K groups, units at most the SMs) that [`split_cost`] says is fastest, where that is
/// at most 3/4 of a whole tile's time. M = 4096, N = 2112, K = 7168 (56 K groups): 544 tiles on
/// 132 SMs are 4 full waves and 16 tiles, which run as 16 x 5 units, ~0.41 of a tile's time
/// instead of a whole one. The tail tiles' sums then add their K splits' partials (a different
/// f32 rounding than the whole tiles', fixed by the shape and the SM count). `DSV3_FP8_SPLITK`
/// (forced splits) and `DSV3_FP8_TAIL_SPLIT=0` turn the tail split off.
pub fn split_plan(tiles: usize, kgroups: usize, sms: usize, tail: bool) -> SplitPlan {
    let uniform = SplitPlan { split_from: 0, splits: splitk_for(tiles, kgroups, sms) };
    let mode = tail_split();
    if !tail || uniform.splits > 1 || forced_splits().is_some() || mode == TailSplit::Off {
        return uniform;
    }
    let left = tiles % sms.max(1);
    if left == 0 || left * 2 > sms {
        return uniform;
    }
    let most = (sms / left).min(kgroups / 2).min(16);
    let best = (2..=most).min_by(|&a, &b| split_cost(kgroups, a).total_cmp(&split_cost(kgroups, b)));
    match best {
        Some(splits) if mode == TailSplit::Always || split_cost(kgroups, splits) <= 0.75 * kgroups as f64 => {
            SplitPlan { split_from: tiles - left, splits }
        }
        _ => uniform,
    }
}

/// Launches `fp8_gemm_tma_<kernel suffix>` for `g` with the common arguments `p` already built
/// by `fp8_gemm` (which checked the buffers; `dt` is D's type); `tiles64` is the bound on 64-row
/// tiles (grouped: the plan's `max_tiles`). Dense calls with too few tiles to fill the GPU split
/// K ([`splitk_for`]), or with a last wave of few tiles split those ([`split_plan`]): the partials
/// go to a temporary f32 buffer and the warpgroup finishing each tile's last split adds them
/// into D in split order (per-tile arrival counters, `Device::counters`). `fused: false`
/// launches `fp8_splitk_reduce_*` for that instead (so does `DSV3_FP8_SPLITK_REDUCE=separate`;
/// no tail split then) and stores D from registers where `fused` stores it by TMA
/// ([`store_by_tma`]). Both forms sum in the same order: the same bits.
pub(crate) fn launch_tma(
    dev: &Device,
    kernel: &'static str,
    dt: DType,
    g: &Fp8Gemm,
    p: Fp8GemmArgs,
    tiles64: usize,
    fused: bool,
) -> Result<()> {
    let ta = encode_u8(p.a, &[g.k as u64, g.m as u64], &[g.a.ld as u64], &[128, 64])?;
    let stride_b = if g.groups > 1 { g.stride_b } else { g.n * g.b.ld };
    let tb =
        encode_u8(p.b, &[g.k as u64, g.n as u64, g.groups as u64], &[g.b.ld as u64, stride_b as u64], &[128, 128, 1])?;
    let block_tiles = tiles64.div_ceil(2) * g.n.div_ceil(128);
    let in_kernel = fused && !separate_reduce();
    let plan = if g.grouped.is_some() {
        SplitPlan { split_from: 0, splits: 1 }
    } else {
        split_plan(block_tiles, g.k.div_ceil(128), dev.sms, in_kernel)
    };
    let splits = plan.splits;
    let work_len = match (splits, in_kernel) {
        (1, _) => 0,
        (_, true) => (block_tiles - plan.split_from) * splits * 128 * 128,
        (_, false) => splits * g.m * g.n,
    };
    let work = if work_len > 0 { Some(empty::<f32>(dev, work_len)?) } else { None };
    let work_ptr = match &work {
        Some(w) => dptr(dev, w, 0)?,
        None => 0,
    };
    let grid = plan.units(block_tiles).min(dev.sms.max(1));
    let store_d = fused && store_by_tma(dt, g, p.d, plan);
    let counters = if splits > 1 && in_kernel { dev.counters(2 * block_tiles)? } else { 0 };
    let td =
        if store_d { encode_u8(p.d, &[2 * g.n as u64, g.m as u64], &[2 * g.ldd as u64], &[128, 64])? } else { [0; 16] };
    let args = Fp8TmaArgs {
        ta,
        tb,
        p,
        work: work_ptr,
        k_seg: 0,
        stride_d: 0,
        splits: int(splits, "splits")?,
        kgroups: 1,
        store_d: i32::from(store_d),
        split_from: int(plan.split_from, "split_from")?,
        counters,
        td,
    };
    launch_smem(
        dev,
        "fp8gemm",
        kernel,
        (dim(grid, "fp8_gemm_tma blocks")?, 1, 1),
        FP8_TMA_THREADS,
        FP8_TMA_SMEM,
        &[KArg::Fp8Tma(Box::new(args))],
    )?;
    if splits == 1 || counters != 0 {
        return Ok(());
    }
    let reduce = match dt {
        DType::Bf16 => "fp8_splitk_reduce_bf16",
        DType::F32 => "fp8_splitk_reduce_f32",
    };
    let blocks = (g.m * g.n).div_ceil(256).min(dev.sms.max(1) * 8);
    // `work` is freed when it drops below, stream-ordered after both launches
    launch(
        dev,
        "fp8gemm",
        reduce,
        (dim(blocks, "fp8 split-K reduce")?, 1, 1),
        256,
        &[
            KArg::Ptr(work_ptr),
            KArg::I32(args.splits),
            KArg::I32(p.m),
            KArg::I32(p.n),
            KArg::Ptr(p.d),
            KArg::I32(p.ldd),
            KArg::I32(p.accumulate),
        ],
    )
}

/// The K segments of [`fp8_gemm_kgrouped`]: `groups + 1` offsets on the device at `dev[off..]`
/// (multiples of 128, non-decreasing, the last within the GEMM's `k`: as
/// `ops::moe_train::plan_token_order` builds them). The kernel trusts them; a wrong table can
/// make wrong products but no access outside the operands (TMA fills past `k` with zeros) or D.
pub struct KSegments<'a> {
    pub dev: &'a cudarc::driver::CudaSlice<i32>,
    pub off: usize,
    pub groups: usize,
}

/// The K-grouped FP8 GEMM (sm_90a, `fp8_gemm_tma_*` with `k_seg`; the MoE expert Wgrad in one
/// launch): `g` spans all groups along K (`g.k` = the segments' total or more, operands 1x128
/// along K, `g.groups == 1`, not grouped by rows), group `e` multiplies the 128-K groups
/// `[k_seg[e]/128, k_seg[e+1]/128)` into `D + e·stride_d` (`d` covers all `kgroups` outputs);
/// an empty group leaves its D untouched. Errors where it cannot run (not sm_90a, TMA's 16-byte
/// rules); the caller falls back to one `fp8_gemm` per group.
pub fn fp8_gemm_kgrouped(
    dev: &Device,
    g: &Fp8Gemm,
    d: &mut crate::tensor::Act,
    segs: KSegments,
    stride_d: usize,
) -> Result<()> {
    let kgroups = segs.groups;
    let k_seg = segs.dev;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    if dev.arch != crate::ptx::Arch::Sm90a {
        return Err(dsv3_core::Error::Unsupported("fp8_gemm_kgrouped: needs sm_90a (H100/H200)".into()));
    }
    if kgroups == 0
        || k_seg.len() < segs.off + kgroups + 1
        || g.grouped.is_some()
        || g.groups != 1
        || (kgroups > 1 && stride_d < (g.m - 1) * g.ldd + g.n)
    {
        return Err(dsv3_core::Error::Input(format!(
            "fp8_gemm_kgrouped: {kgroups} groups (a table of {} from {}), stride_d {stride_d}",
            k_seg.len(),
            segs.off
        )));
    }
    if g.k == 0 {
        return Ok(());
    }
    // every group's output inside d; the rest is fp8_gemm's validation of the whole-K call
    d.check((kgroups - 1) * stride_d + (g.m - 1) * g.ldd + g.n, "fp8_gemm_kgrouped D")?;
    let p = super::fp8::gemm_args(dev, g, d)?;
    if !tma_fits(g, p.a, p.b) {
        return Err(dsv3_core::Error::Input(
            "fp8_gemm_kgrouped: lda, ldb and the addresses must be multiples of 16".into(),
        ));
    }
    let kernel = match d.dtype() {
        DType::Bf16 => "fp8_gemm_tma_bf16",
        DType::F32 => "fp8_gemm_tma_f32",
    };
    let ta = encode_u8(p.a, &[g.k as u64, g.m as u64], &[g.a.ld as u64], &[128, 64])?;
    let tb = encode_u8(p.b, &[g.k as u64, g.n as u64, 1], &[g.b.ld as u64, (g.n * g.b.ld) as u64], &[128, 128, 1])?;
    let units = g.m.div_ceil(128) * g.n.div_ceil(128) * kgroups;
    let args = Fp8TmaArgs {
        ta,
        tb,
        p,
        work: 0,
        k_seg: dptr(dev, k_seg, segs.off)?,
        stride_d: stride_d as i64,
        splits: 1,
        kgroups: int(kgroups, "kgroups")?,
        store_d: 0,
        split_from: 0,
        counters: 0,
        td: [0; 16],
    };
    launch_smem(
        dev,
        "fp8gemm",
        kernel,
        (dim(units.min(dev.sms.max(1)), "fp8_gemm_kgrouped blocks")?, 1, 1),
        FP8_TMA_THREADS,
        FP8_TMA_SMEM,
        &[KArg::Fp8Tma(Box::new(args))],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn fp8_tma_args_match_the_cuda_struct_layout() {
        use super::Fp8TmaArgs;
        assert_eq!(std::mem::align_of::<Fp8TmaArgs>(), 64);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, tb), 128);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, p), 256);
        // 256 + 144 bytes of Fp8GemmArgs + work, k_seg, stride_d, splits, kgroups, padded to 64
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, work), 400);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, k_seg), 408);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, stride_d), 416);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, splits), 424);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, kgroups), 428);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, store_d), 432);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, split_from), 436);
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, counters), 440);
        // the D tensor map 64-byte aligned
        assert_eq!(std::mem::offset_of!(Fp8TmaArgs, td), 448);
        assert_eq!(std::mem::size_of::<Fp8TmaArgs>(), 576);
    }

    #[test]
    fn split_k_only_when_the_tiles_leave_sms_idle() {
        if std::env::var("DSV3_FP8_SPLITK").is_ok() {
            return;
        }
        use super::splitk_for;
        // M = 4096 x N = 7168: 32 x 56 block tiles fill 132 SMs
        assert_eq!(splitk_for(32 * 56, 16, 132), 1);
        // M = 128, N = 2112, K = 7168: 17 tiles -> 7 splits of 56 K groups
        assert_eq!(splitk_for(17, 56, 132), 7);
        // M = 128, N = 7168, K = 2048: 56 tiles -> 2 splits
        assert_eq!(splitk_for(56, 16, 132), 2);
        // too few K groups to split (each split keeps >= 2)
        assert_eq!(splitk_for(1, 3, 132), 1);
        assert_eq!(splitk_for(1, 1000, 132), 16);
        assert_eq!(splitk_for(0, 8, 132), 1);
    }

    #[test]
    fn the_last_wave_is_split_when_few_tiles_are_left_for_it_and_k_is_long() {
        if std::env::var("DSV3_FP8_SPLITK").is_ok() || std::env::var("DSV3_FP8_TAIL_SPLIT").is_ok() {
            return;
        }
        use super::{split_cost, split_plan, SplitPlan};
        // (the default mode; no test of this binary changes it)
        // M = 4096, N = 2112, K = 7168: 32 x 17 = 544 tiles = 4 waves of 132 + 16, 56 K groups:
        // 16 x 5 units (56/5 + 2 + 10 = 23.2 groups' time, the least of 2..=8 splits)
        let p = split_plan(544, 56, 132, true);
        assert_eq!(p, SplitPlan { split_from: 528, splits: 5 });
        assert_eq!(p.units(544), 528 + 80);
        assert!((split_cost(56, 5) - 23.2).abs() < 1e-9);
        assert!((p.waves(544, 132, 56) - (4.0 + 23.2 / 56.0)).abs() < 1e-9, "{}", p.waves(544, 132, 56));
        // without the in-kernel sum: whole tiles, 5 waves
        let whole = split_plan(544, 56, 132, false);
        assert_eq!(whole, SplitPlan { split_from: 0, splits: 1 });
        assert_eq!(whole.waves(544, 132, 56), 5.0);
        // a last wave over half full (M = 4096, N = 7168: 1792 = 13 x 132 + 76): whole tiles
        assert_eq!(split_plan(1792, 16, 132, true).splits, 1);
        // full waves: nothing to split
        assert_eq!(split_plan(264, 56, 132, true).splits, 1);
        // short K: the partials cost more than the split saves (88M training's 8192 x 1408 x 512
        // Fprop, 704 = 5 x 132 + 44 tiles of 4 K groups; M = 128 x N = 24576 x K = 1536, 192 =
        // 132 + 60 tiles of 12)
        assert_eq!(split_plan(704, 4, 132, true).splits, 1);
        assert_eq!(split_plan(192, 12, 132, true).splits, 1);
        // K = 4096 (32 groups) over 136 tiles: 4 left, 4 splits (8 + 2 + 8 = 18 <= 24)
        assert_eq!(split_plan(136, 32, 132, true), SplitPlan { split_from: 132, splits: 4 });
        // too few K groups to split (each split keeps >= 2)
        assert_eq!(split_plan(140, 3, 132, true).splits, 1);
        // few tiles: every tile split, as before
        assert_eq!(split_plan(17, 56, 132, true), SplitPlan { split_from: 0, splits: 7 });
        assert!((split_plan(17, 56, 132, true).waves(17, 132, 56) - split_cost(56, 7) / 56.0).abs() < 1e-9);
    }

    #[test]
    fn shared_memory_fits_the_h100_and_the_ring_layout() {
        // 4 stages x 48 KiB, the mbarriers' KiB, 2 x 16 KiB of store staging, 1 KiB of alignment
        // slack: under the 227 KiB opt-in limit
        assert_eq!(super::FP8_TMA_SMEM, 196_608 + 1024 + 32_768 + 1024);
        const { assert!(super::FP8_TMA_SMEM <= 232_448) };
    }
}
