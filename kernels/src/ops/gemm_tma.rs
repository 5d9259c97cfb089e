//! The bf16 grouped GEMM on wgmma + TMA, `gemm_tma_grouped_bf16` (kernels/cuda/gemm_tma.cu;
//! sm_90a): the MoE experts' row-grouped products of training, `C[rows of g] (+)= A · W_gᵀ` (NT)
//! and `dX = dY · W_g` (NN, on `W_gᵀ` written by `transpose_groups_bf16` first). The structure of
//! the FP8 TMA kernel (a producer warp, 4-stage mbarrier ring, two consumer warpgroups, persistent)
//! with wgmma m64n128k16 bf16 and no promotion. [`super::gemm::gemm_mat`] sends grouped NT / NN
//! calls here on sm_90a where the operands fit TMA's rules ([`fits`]); `DSV3_BF16_GROUPED=mma`
//! keeps them on the mma.sync kernel. Emulator-verified; not yet run on a GPU.
use super::fp8_tma::encode_u8;
use super::gemm::{GemmArgs, Layout, MatShape, FLAG_F32C};
use super::{dim, int, launch, launch_smem, KArg};
use crate::device::Device;
use crate::tensor::{dptr, empty};
use cudarc::driver::DeviceRepr;
use dsv3_core::Result;

/// Threads of `gemm_tma_grouped_bf16`: 2 consumer warpgroups and 1 producer warp.
pub const GEMM_TMA_THREADS: u32 = 288;
/// Its dynamic shared memory: 4 stages of A (2 x 64 rows x 64 K) and two B tiles (128 x 64 K),
/// 8 mbarriers in the next KiB, the TMA-store staging (16 KiB per consumer warpgroup), 1 KiB of
/// slack to align the ring to 1024 bytes.
pub const GEMM_TMA_SMEM: u32 = 4 * 3 * 16384 + 1024 + 2 * 16384 + 1024;

/// `struct GemmTmaArgs` of gemm_tma.cu: the tensor maps of A and W, the GEMM arguments, and the
/// TMA-store epilogue's switch and tensor map of C.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct GemmTmaArgs {
    pub ta: [u64; 16],
    pub tb: [u64; 16],
    pub p: GemmArgs,
    /// 1: C (bf16, written, not accumulated, no bias) leaves by TMA stores through `tc`
    /// ([`store_by_tma`]).
    pub store_c: i32,
    /// Up to the tensor map's 64-byte alignment (`TmaDesc` is `__align__(64)` in CUDA).
    pub _pad: [i32; 9],
    /// C: uint8 dims `{2n, m}`, stride `2·ldc`, box `{128, 64}`, 128-byte swizzle (zeros when
    /// `store_c == 0`).
    pub tc: [u64; 16],
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct (offsets 0, 128, 256, 408, 448).
unsafe impl DeviceRepr for GemmTmaArgs {}

/// `DSV3_BF16_GROUPED=mma` (read once): grouped products stay on the mma.sync kernel.
fn disabled() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_is(&V, "DSV3_BF16_GROUPED", "mma")
}

/// `DSV3_BF16_GROUPED=tma-regs` (read once): the wgmma + TMA kernel stores every C from registers.
fn store_from_registers() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_is(&V, "DSV3_BF16_GROUPED", "tma-regs")
}

/// Whether `gemm_tma_grouped_bf16` stores C by TMA (a 16 KiB staging buffer per warpgroup tile,
/// two 64-column boxes; the partial tiles of a group that another group's rows follow still store
/// from registers): a bf16 C written, not accumulated, without a bias (the experts' products
/// have none; adding it in the epilogue made ptxas spill), its base and rows 16-byte aligned,
/// and not switched off (`DSV3_BF16_GROUPED=tma-regs`).
pub fn store_by_tma(p: &GemmArgs) -> bool {
    p.flags & FLAG_F32C == 0
        && p.accumulate == 0
        && p.bias == 0
        && p.ldc % 8 == 0
        && p.c.is_multiple_of(16)
        && !store_from_registers()
}

/// Whether grouped products on `dev` go to `gemm_tma_grouped_bf16` where their shapes allow
/// (sm_90a, not switched off).
pub fn enabled(dev: &Device) -> bool {
    dev.arch == crate::ptx::Arch::Sm90a && !disabled()
}

/// Whether `gemm_tma_grouped_bf16` takes a row-grouped `layout` product of shape `s` with A and
/// B at device addresses `a_ptr`, `b_ptr` (the operands' first elements): sm_90a, not switched
/// off, NT or NN, k > 0, and TMA's rules: every row stride and the group stride a multiple of 8
/// elements (16 bytes) and both operands 16-byte aligned (NN: k too, the row stride of the
/// transposed B); groups do not share one weight (a group stride of 0).
pub fn fits(dev: &Device, layout: Layout, s: &MatShape, a_ptr: u64, b_ptr: u64) -> bool {
    enabled(dev)
        && layout != Layout::TN
        && s.grouped.is_some()
        && s.k > 0
        && [s.lda, s.ldb, s.stride_b].iter().all(|v| v.is_multiple_of(8))
        && (s.batch == 1 || s.stride_b > 0)
        && (layout == Layout::NT || s.k.is_multiple_of(8))
        && a_ptr.is_multiple_of(16)
        && b_ptr.is_multiple_of(16)
}

/// Launches the grouped product for `gemm_mat` (which checked every buffer and built `p` as for
/// the mma kernel; `p.w` is B's first element). NN: B `[k, n]` per group (rows `ldb`, groups
/// `stride_b` apart) is first transposed into `[groups][n][k]`.
pub(crate) fn grouped(dev: &Device, layout: Layout, s: &MatShape, mut p: GemmArgs, max_tiles: usize) -> Result<()> {
    let (n, k, groups) = (s.n, s.k, s.batch);
    // NN: Wᵀ, alive until the launch is queued (its free is stream-ordered after it)
    let _wt = if layout == Layout::NN {
        let wt = empty::<u16>(dev, groups * n * k)?;
        launch(
            dev,
            "gemm_tma",
            "transpose_groups_bf16",
            (dim(n.div_ceil(32), "transpose cols")?, dim(k.div_ceil(32), "transpose rows")?, dim(groups, "groups")?),
            256,
            &[
                KArg::Ptr(p.w),
                KArg::I64(s.ldb as i64),
                KArg::I64(s.stride_b as i64),
                KArg::I32(int(k, "k")?),
                KArg::I32(int(n, "n")?),
                KArg::Ptr(dptr(dev, &wt, 0)?),
                KArg::I64(k as i64),
                KArg::I64((n * k) as i64),
            ],
        )?;
        p.w = dptr(dev, &wt, 0)?;
        p.ldw = int(k, "k")?;
        p.stride_w = (n * k) as i64;
        Some(wt)
    } else {
        None
    };
    let e = 2u64; // bytes per element
    let ta = encode_u8(p.a, &[k as u64 * e, s.m as u64], &[p.lda as u64 * e], &[128, 64])?;
    let tb = encode_u8(
        p.w,
        &[k as u64 * e, n as u64, groups as u64],
        &[p.ldw as u64 * e, if groups > 1 { p.stride_w as u64 * e } else { (n * p.ldw as usize) as u64 * e }],
        &[128, 128, 1],
    )?;
    let store_c = store_by_tma(&p);
    let tc =
        if store_c { encode_u8(p.c, &[n as u64 * e, s.m as u64], &[p.ldc as u64 * e], &[128, 64])? } else { [0; 16] };
    let blocks = max_tiles.max(1).div_ceil(2) * n.div_ceil(128);
    let grid = blocks.min(dev.sms.max(1));
    launch_smem(
        dev,
        "gemm_tma",
        "gemm_tma_grouped_bf16",
        (dim(grid, "gemm_tma blocks")?, 1, 1),
        GEMM_TMA_THREADS,
        GEMM_TMA_SMEM,
        &[KArg::GemmTma(Box::new(GemmTmaArgs { ta, tb, p, store_c: i32::from(store_c), _pad: [0; 9], tc }))],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_block_is_laid_out_as_the_cuda_struct() {
        assert_eq!(std::mem::offset_of!(GemmTmaArgs, tb), 128);
        assert_eq!(std::mem::offset_of!(GemmTmaArgs, p), 256);
        assert_eq!(std::mem::offset_of!(GemmTmaArgs, store_c), 408);
        assert_eq!(std::mem::offset_of!(GemmTmaArgs, tc), 448);
        assert_eq!(std::mem::size_of::<GemmTmaArgs>(), 576);
        assert_eq!(std::mem::align_of::<GemmTmaArgs>(), 64);
        const { assert!(GEMM_TMA_SMEM <= 232_448) };
        assert!(crate::ops::KERNELS.contains(&("gemm_tma", "gemm_tma_grouped_bf16")));
        assert!(crate::ops::KERNELS.contains(&("gemm_tma", "transpose_groups_bf16")));
    }
}
