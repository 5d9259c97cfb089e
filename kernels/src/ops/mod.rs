//! Host-side launchers, one file per kernel family (`kernels/cuda/<family>.cu`). Each checks
//! shapes and buffer lengths (a bad call is an [`dsv3_core::Error::Input`], never an
//! out-of-bounds access), picks the kernel for the dtypes and enqueues it on the device stream.
//!
//! - [`gather`]: row gathers (embedding lookup, last-row picks, MoE dispatch copies).
//! - [`norm`]: RMSNorm. [`rope`]: RoPE/YaRN. [`elementwise`]: SwiGLU, add, casts.
//! - [`fp8`]: DeepSeek's FP8 recipe: quantization (1x128, 128x128, 128x1 transposed) and the
//!   promoted FP8 GEMM (wgmma on sm_90a) for Fprop, Dgrad, Wgrad and MoE groups.
//! - [`gemm`]: `C = A · Wᵀ` in f32 / bf16 / FP8-weights, batched or grouped by rows; bf16 also
//!   `A · B` and `Aᵀ · B` (the backward products). [`gemm_tma`]: the experts' grouped bf16
//!   products on wgmma + TMA (sm_90a).
//! - [`mla`]: absorbed MLA attention over the latent cache, cache append.
//! - [`attn`]: flash attention for prefill (causal, query-tiled, bf16 tensor cores).
//! - [`attn_train`]: flash attention for training: the forward with the log-sum-exp and the
//!   deterministic FlashAttention-2 backward (dQ, dK, dV).
//! - [`moe`]: router, dispatch plan, combine. [`sampling`]: argmax, softmax, sampling
//!   (temperature / top-k / top-p, as the CPU `Sampler`).
//! - [`moe_train`]: MoE backward (combine, dispatch, routing weights into the router logits), the
//!   balance losses, expert loads and the auxiliary-loss-free bias update.
//! - [`optim`]: the optimizer step's global gradient norm (f64 sums of squares) and clip scale.
//! - [`train`]: AdamW (f32 master weights, f32 or bf16 moments) and the backward passes of
//!   RMSNorm, SwiGLU, RoPE, the embedding and softmax cross-entropy; causal attention
//!   probabilities and their backward.
pub mod attn;
pub mod attn_train;
pub mod elementwise;
pub mod fp8;
pub mod fp8_tma;
pub mod gather;
pub mod gemm;
pub mod gemm_tma;
pub mod mla;
pub mod moe;
pub mod moe_train;
pub mod norm;
pub mod optim;
pub mod rope;
pub mod sampling;
pub mod train;

use crate::device::{cuda_err, Device};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, DriverError, LaunchConfig, PushKernelArg};
use dsv3_core::{Error, Result};

/// Every `(module, kernel)` a launcher uses (checked against the embedded PTX in a unit test).
pub const KERNELS: &[(&str, &str)] = &[
    ("embed", "gather_rows_f32"),
    ("embed", "gather_rows_bf16"),
    ("rmsnorm", "rmsnorm_f32"),
    ("rmsnorm", "rmsnorm_bf16"),
    ("rope", "rope_f32"),
    ("rope", "rope_bf16"),
    ("elementwise", "swiglu_f32"),
    ("elementwise", "swiglu_bf16"),
    ("elementwise", "add_f32"),
    ("elementwise", "add_bf16"),
    ("elementwise", "cast_f32_bf16"),
    ("elementwise", "cast_bf16_f32"),
    ("gemm", "gemm_f32"),
    ("gemm_tma", "gemm_tma_grouped_bf16"),
    ("gemm_tma", "transpose_groups_bf16"),
    ("gemm", "gemm_mma_nt_w"),
    ("gemm", "gemm_mma_nt_l"),
    ("gemm", "gemm_mma_nt_s"),
    ("gemm", "gemm_mma_nn_w"),
    ("gemm", "gemm_mma_nn_l"),
    ("gemm", "gemm_mma_nn_s"),
    ("gemm", "gemm_mma_tn_w"),
    ("gemm", "gemm_mma_tn_l"),
    ("gemm", "gemm_mma_tn_s"),
    ("gemm", "gemm_fp8_bf16"),
    ("gemm", "gemm_fp8_f32"),
    ("gemm", "gemm_skinny_f32"),
    ("gemm", "gemm_skinny_bf16_bf16"),
    ("gemm", "gemm_skinny_bf16_f32"),
    ("gemm", "gemm_skinny_fp8_bf16"),
    ("gemm", "gemm_skinny_fp8_f32"),
    ("gemm", "gemm_skinny_bf16_f32w"),
    ("gemm", "gemm_skinny1_bf16_bf16"),
    ("gemm", "gemm_skinny1_bf16_f32"),
    ("gemm", "gemm_skinny1_fp8_bf16"),
    ("gemm", "gemm_skinny1_fp8_f32"),
    ("gemm", "gemm_skinny_swiglu_f32"),
    ("gemm", "gemm_skinny_swiglu_bf16"),
    ("gemm", "gemm_skinny_swiglu_fp8"),
    ("gemm", "gemm_skinny1_swiglu_bf16"),
    ("gemm", "gemm_skinny1_swiglu_fp8"),
    ("gemm", "gemm_skinny_combine_f32"),
    ("gemm", "gemm_skinny_combine_bf16_bf16"),
    ("gemm", "gemm_skinny_combine_fp8_bf16"),
    ("gemm", "gemm_skinny_prep_f32"),
    ("gemm", "gemm_skinny_prep_bf16_bf16"),
    ("gemm", "gemm_skinny_prep_fp8_bf16"),
    ("fp8quant", "quant_1x128_f32"),
    ("fp8quant", "quant_1x128_bf16"),
    ("fp8quant", "quant_1x128w_f32"),
    ("fp8quant", "quant_1x128w_bf16"),
    ("fp8quant", "quant_block128_f32"),
    ("fp8quant", "quant_block128_bf16"),
    ("fp8quant", "quant_t128_f32"),
    ("fp8quant", "quant_t128_bf16"),
    ("fp8gemm", "fp8_gemm_wgmma_bf16"),
    ("fp8gemm", "fp8_gemm_wgmma_f32"),
    ("fp8gemm", "fp8_gemm_wgmma2_bf16"),
    ("fp8gemm", "fp8_gemm_wgmma2_f32"),
    ("fp8gemm", "fp8_gemm_simt_bf16"),
    ("fp8gemm", "fp8_gemm_simt_f32"),
    ("mla", "mla_decode_f32"),
    ("mla", "mla_decode_bf16"),
    ("mla", "mla_decode_mma_bf16"),
    ("mla", "mla_decode_mma_m1s4_bf16"),
    ("mla", "mla_decode_mma_m1t64_bf16"),
    ("mla", "mla_decode_mma_m2t32_bf16"),
    ("mla", "mla_decode_mma_m2t64_bf16"),
    ("mla", "mla_decode_mmad_t32_bf16"),
    ("mla", "mla_decode_mmad_s3_bf16"),
    ("mla", "mla_decode_mmad_t64_bf16"),
    ("mla", "mla_decode_mmad_w8_bf16"),
    ("mla", "mla_decode_mmad_w8s3_bf16"),
    ("mla", "mla_combine_f32"),
    ("mla", "mla_combine_bf16"),
    ("mla", "mla_prep_f32"),
    ("mla", "mla_prep_bf16"),
    ("mla", "cache_append_f32"),
    ("mla", "cache_append_bf16"),
    ("attn", "attn_fwd_m1d64"),
    ("attn", "attn_fwd_m1d128"),
    ("attn", "attn_fwd_m1d256"),
    ("attn", "attn_fwd_m2d64"),
    ("attn", "attn_fwd_m2d128"),
    ("attn", "attn_fwd_m2d64s3"),
    ("attn", "attn_fwd_m2d128s3"),
    ("attn_train", "flash_fwd_train_bf16_k64v64"),
    ("attn_train", "flash_bwd_dkdv_bf16_k64v64"),
    ("attn_train", "flash_bwd_dq_bf16_k64v64"),
    ("attn_train", "flash_fwd_train_bf16_k128v128"),
    ("attn_train", "flash_bwd_dkdv_bf16_k128v128"),
    ("attn_train", "flash_bwd_dq_bf16_k128v128"),
    ("attn_train", "flash_fwd_train_bf16_k192v128"),
    ("attn_train", "flash_bwd_dkdv_bf16_k192v128"),
    ("attn_train", "flash_bwd_dq_bf16_k192v128"),
    ("attn_train", "flash_bwd_preprocess"),
    ("attn_train", "flash_bwd_dkpe_reduce"),
    ("moe", "moe_route"),
    ("moe", "moe_plan"),
    ("moe", "moe_route_plan"),
    ("moe", "moe_router_route_plan"),
    ("moe", "moe_combine_f32"),
    ("moe", "moe_combine_bf16"),
    ("sampling", "argmax_rows_f32"),
    ("sampling", "softmax_rows_f32"),
    ("sampling", "sample_rows_f32"),
    ("train", "adamw_f32"),
    ("train", "adamw_bf16m"),
    ("train", "rmsnorm_bwd_f32"),
    ("train", "rmsnorm_bwd_bf16"),
    ("train", "rmsnorm_dw_reduce"),
    ("train", "swiglu_bwd_f32"),
    ("train", "swiglu_bwd_bf16"),
    ("train", "rope_bwd_f32"),
    ("train", "rope_bwd_bf16"),
    ("train", "embed_bwd_f32"),
    ("train", "embed_bwd_bf16"),
    ("train", "cross_entropy_f32"),
    ("train", "cross_entropy_bf16"),
    ("train", "cross_entropy_f32_bf16"),
    ("train", "cross_entropy_smem_f32"),
    ("train", "cross_entropy_smem_bf16"),
    ("train", "cross_entropy_smem_f32_bf16"),
    ("train", "attn_softmax_causal_f32"),
    ("train", "attn_softmax_bwd_f32"),
    ("moe_train", "moe_combine_bwd_f32"),
    ("moe_train", "moe_combine_bwd_bf16"),
    ("moe_train", "moe_dispatch_bwd_f32"),
    ("moe_train", "moe_dispatch_bwd_bf16"),
    ("moe_train", "moe_router_bwd"),
    ("moe_train", "moe_expert_freq"),
    ("moe_train", "moe_balance_bwd"),
    ("moe_train", "moe_bias_update"),
    ("moe_train", "moe_plan_count"),
    ("moe_train", "moe_plan_offsets"),
    ("moe_train", "moe_plan_place"),
    ("optim", "sumsq_f32"),
    ("optim", "sum_f64"),
];

/// One kernel argument, passed by value (device addresses as `u64`).
pub(crate) enum KArg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    Gemm(gemm::GemmArgs),
    MoeCombine(moe::CombineArgs),
    MlaPrep(mla::PrepArgs),
    Fp8Gemm(fp8::Fp8GemmArgs),
    Fp8Tma(Box<fp8_tma::Fp8TmaArgs>),
    GemmTma(Box<gemm_tma::GemmTmaArgs>),
    Mla(mla::MlaArgs),
    Attn(attn::AttnArgs),
    AttnTrain(attn_train::FlashTrainArgs),
}

/// A size as a kernel's `int`.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Input(format!("{what} = {v} does not fit a 32-bit kernel argument")))
}

/// CUDA's largest `gridDim.x` (2^31 − 1).
pub const MAX_GRID_X: usize = i32::MAX as usize;
/// CUDA's largest `gridDim.y` and `gridDim.z`.
pub const MAX_GRID_YZ: usize = 65535;
/// CUDA's largest block.
pub const MAX_BLOCK: u32 = 1024;

/// A grid dimension.
pub(crate) fn dim(v: usize, what: &str) -> Result<u32> {
    if v == 0 {
        return Err(Error::Input(format!("{what}: empty launch")));
    }
    u32::try_from(v).map_err(|_| Error::Input(format!("{what}: grid of {v} blocks is too large")))
}

/// `grid.y` for a kernel that walks its `v` rows grid-stride over y (`for (r = blockIdx.y; r <
/// rows; r += gridDim.y)`): `v` capped at [`MAX_GRID_YZ`].
pub(crate) fn grid_y(v: usize, what: &str) -> Result<u32> {
    dim(v.min(MAX_GRID_YZ), what)
}

/// `tiles` row tiles spread over `(grid.y, grid.z)` for the kernels that index them as
/// `blockIdx.y + gridDim.y · blockIdx.z` (`tile_yz()` in `kernels/cuda/common.cuh`): y up to
/// [`MAX_GRID_YZ`], z the rest (`y · z >= tiles`; the blocks past the last tile exit). Beyond
/// 65535² tiles z is too large and the launch is refused ([`check_launch`]).
pub(crate) fn split_yz(tiles: usize) -> (usize, usize) {
    let y = tiles.clamp(1, MAX_GRID_YZ);
    (y, tiles.div_ceil(y).max(1))
}

/// Refuses a launch CUDA would refuse for its geometry (an empty grid, `grid.x` > 2^31 − 1,
/// `grid.y` or `grid.z` > 65535, a block of 0 or more than 1024 threads) with an
/// [`Error::Input`] naming the kernel, instead of the driver's bare `CUDA_ERROR_INVALID_VALUE`.
pub(crate) fn check_launch(kernel: &str, grid: (u32, u32, u32), block: u32) -> Result<()> {
    let (x, y, z) = (grid.0 as usize, grid.1 as usize, grid.2 as usize);
    if x == 0 || y == 0 || z == 0 || block == 0 {
        return Err(Error::Input(format!("{kernel}: empty launch (grid {grid:?}, block {block})")));
    }
    if x > MAX_GRID_X || y > MAX_GRID_YZ || z > MAX_GRID_YZ || block > MAX_BLOCK {
        return Err(Error::Input(format!(
            "{kernel}: grid {grid:?} x block {block} exceeds CUDA's limits (grid.x <= {MAX_GRID_X}, \
             grid.y and grid.z <= {MAX_GRID_YZ}, block <= {MAX_BLOCK}): the problem is too large for one launch"
        )));
    }
    Ok(())
}

/// Enqueues `module::kernel` on the device stream.
pub(crate) fn launch(
    dev: &Device,
    module: &'static str,
    kernel: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    args: &[KArg],
) -> Result<()> {
    launch_smem(dev, module, kernel, grid, block, 0, args)
}

/// Dynamic shared memory a kernel may use without opting in (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
pub(crate) const DEFAULT_MAX_DYNAMIC_SMEM: u32 = 48 * 1024;

/// The most dynamic shared memory a block may opt into on `dev` (0 if the driver cannot say).
pub(crate) fn max_smem_optin(dev: &Device) -> usize {
    dev.ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |v| v.max(0) as usize)
}

/// [`launch`] with `smem` bytes of dynamic shared memory (`extern __shared__`). Above 48 KiB the
/// kernel's limit is raised first (the caller checks the device's opt-in maximum).
pub(crate) fn launch_smem(
    dev: &Device,
    module: &'static str,
    kernel: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[KArg],
) -> Result<()> {
    check_launch(kernel, grid, block)?;
    let f = dev.function_with_smem(module, kernel, smem)?;
    let mark = crate::profile::start(dev)?;
    if pdl_enabled(dev) {
        launch_pdl(dev, &f, kernel, grid, block, smem, args)?;
    } else {
        launch_plain(dev, &f, kernel, grid, block, smem, args)?;
    }
    crate::profile::finish(dev, mark, || kernel.into())
}

/// `cuLaunchKernel` through cudarc's builder.
fn launch_plain(
    dev: &Device,
    f: &CudaFunction,
    kernel: &str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[KArg],
) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
    let mut b = dev.stream.launch_builder(f);
    for a in args {
        match a {
            KArg::Ptr(v) => b.arg(v),
            KArg::I32(v) => b.arg(v),
            KArg::I64(v) => b.arg(v),
            KArg::F32(v) => b.arg(v),
            KArg::Gemm(v) => b.arg(v),
            KArg::MoeCombine(v) => b.arg(v),
            KArg::MlaPrep(v) => b.arg(v),
            KArg::Fp8Gemm(v) => b.arg(v),
            KArg::Fp8Tma(v) => b.arg(v.as_ref()),
            KArg::GemmTma(v) => b.arg(v.as_ref()),
            KArg::Mla(v) => b.arg(v),
            KArg::Attn(v) => b.arg(v),
            KArg::AttnTrain(v) => b.arg(v),
        };
    }
    // SAFETY: the launchers check every buffer length against the shapes the kernel reads and
    // writes, and pass arguments in the kernel's declared order and types.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {kernel}"), e))?;
    Ok(())
}

/// Whether environment variable `var` is `want` (surrounding blanks ignored), read once into
/// `cell` (the caller's static: one per switch).
pub(crate) fn env_is(cell: &'static std::sync::OnceLock<bool>, var: &str, want: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).is_ok_and(|v| v.trim() == want))
}

/// `DSV3_PDL=1` (read once): launches on sm_90a with programmatic dependent launch.
fn pdl_requested() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    env_is(&V, "DSV3_PDL", "1")
}

/// Whether launches on `dev` carry the programmatic-stream-serialization attribute: asked for
/// (`DSV3_PDL=1`) on an sm_90a device (where the kernels' `DSV3_PDL()` is `griddepcontrol`; their
/// sm_80 PTX has no wait, so elsewhere it stays off).
pub fn pdl_enabled(dev: &Device) -> bool {
    dev.arch == crate::ptx::Arch::Sm90a && pdl_requested()
}

/// [`launch_smem`] through `cuLaunchKernelEx` with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`:
/// the kernel may be scheduled before the previous kernel on the stream has finished; every
/// kernel's first statement (`DSV3_PDL()`, `griddepcontrol.wait`) then waits for it, so the
/// results are those of plain stream order (kernels/cuda/common.cuh). Captured into a CUDA graph
/// it becomes a programmatic edge.
fn launch_pdl(
    dev: &Device,
    f: &CudaFunction,
    kernel: &str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[KArg],
) -> Result<()> {
    use cudarc::driver::sys;
    use std::ffi::c_void;
    fn p<T>(v: &T) -> *mut c_void {
        v as *const T as *mut c_void
    }
    // pointers to the argument values, as cuLaunchKernel wants them (valid for the call: `args`
    // outlives it)
    let mut params: Vec<*mut c_void> = args
        .iter()
        .map(|a| match a {
            KArg::Ptr(v) => p(v),
            KArg::I32(v) => p(v),
            KArg::I64(v) => p(v),
            KArg::F32(v) => p(v),
            KArg::Gemm(v) => p(v),
            KArg::MoeCombine(v) => p(v),
            KArg::MlaPrep(v) => p(v),
            KArg::Fp8Gemm(v) => p(v),
            KArg::Fp8Tma(v) => p(v.as_ref()),
            KArg::GemmTma(v) => p(v.as_ref()),
            KArg::Mla(v) => p(v),
            KArg::Attn(v) => p(v),
            KArg::AttnTrain(v) => p(v),
        })
        .collect();
    // SAFETY: a plain-old-data struct of the driver API; zero is a valid bit pattern
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: dev.stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    dev.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
    // SAFETY: as in launch_smem (arguments checked by the launchers, in the kernel's order and
    // types); `params` and `attr` live through the call; a driver without cuLaunchKernelEx makes
    // the binding panic, which `guard` turns into an error.
    let r = crate::device::guard("cuLaunchKernelEx", || unsafe {
        sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
    })?;
    r.result().map_err(|e| cuda_err(&format!("launching {kernel} (programmatic dependent launch)"), e))
}

/// Lets `f` use `smem` bytes of dynamic shared memory (the function attribute; cheap, idempotent).
pub(crate) fn allow_dynamic_smem(f: &CudaFunction, smem: u32) -> std::result::Result<(), DriverError> {
    let v = i32::try_from(smem).unwrap_or(i32::MAX);
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instructions of `kernel`'s body in `ptx` (from its `.entry` to the next entry).
    fn entry_body<'a>(ptx: &'a str, kernel: &str) -> &'a str {
        let at = ptx.find(&format!(".entry {kernel}(")).unwrap_or_else(|| panic!("{kernel} not in its PTX"));
        let rest = &ptx[at + 7..];
        &rest[..rest.find(".entry ").unwrap_or(rest.len())]
    }

    #[test]
    fn every_sm90a_kernel_waits_for_its_predecessor_before_touching_memory() {
        // DSV3_PDL=1 launches every kernel with programmatic dependent launch: each must run
        // griddepcontrol.wait before any load or store other than its parameters (shared memory
        // included: a conservative textual check on the PTX, whose first block holds the wait)
        let mem = ["ld.", "st.", "atom.", "red.", "cp.", "prefetch", "tex.", "suld", "sust", "mbarrier", "wgmma"];
        for (m, k) in KERNELS {
            let src = crate::ptx::source(crate::ptx::Arch::Sm90a, m).unwrap();
            let body = entry_body(src, k);
            let wait = body.find("griddepcontrol.wait").unwrap_or_else(|| panic!("{m}::{k}: no griddepcontrol.wait"));
            let first_mem = body
                .lines()
                .map(str::trim_start)
                .filter(|l| !l.starts_with("ld.param") && !l.starts_with("//"))
                .filter(|l| {
                    mem.iter()
                        .any(|p| l.starts_with(p) || l.split_whitespace().nth(1).is_some_and(|i| i.starts_with(p)))
                })
                .map(|l| body.find(l).unwrap())
                .min();
            if let Some(pos) = first_mem {
                assert!(wait < pos, "{m}::{k}: a memory access before griddepcontrol.wait");
            }
            assert!(body.contains("griddepcontrol.launch_dependents"), "{m}::{k}: never triggers its dependents");
            // sm_80 PTX (JIT on other GPUs, where PDL stays off) has neither
            let src80 = crate::ptx::source(crate::ptx::Arch::Sm80, m).unwrap();
            assert!(!entry_body(src80, k).contains("griddepcontrol"), "{m}::{k}: griddepcontrol in sm_80 PTX");
        }
    }

    #[test]
    fn grid_helpers_stay_within_cudas_limits() {
        // rows grid-stride over y: capped at 65535
        assert_eq!(grid_y(65536, "t").unwrap(), 65535);
        assert_eq!(grid_y(7, "t").unwrap(), 7);
        assert!(grid_y(0, "t").is_err());
        // tiles over y and z: y * z covers them, both within the limit
        for tiles in [1usize, 65535, 65536, 131328, 8_388_608, 65535 * 65535] {
            let (y, z) = split_yz(tiles);
            assert!(y <= MAX_GRID_YZ && z <= MAX_GRID_YZ && y * z >= tiles && y * (z - 1) < tiles, "{tiles}");
        }
        assert_eq!(split_yz(0), (1, 1));
    }

    #[test]
    fn launches_past_the_limits_are_refused_with_an_error() {
        assert!(check_launch("k", (1, 65535, 65535), 1024).is_ok());
        assert!(check_launch("k", (i32::MAX as u32, 1, 1), 256).is_ok());
        for (grid, block) in [
            ((1, 65536, 1), 256),
            ((1, 1, 65536), 256),
            ((1u32 << 31, 1, 1), 256),
            ((1, 1, 1), 1025),
            ((0, 1, 1), 256),
            ((1, 1, 1), 0),
        ] {
            let e = check_launch("swiglu_bwd_f32", grid, block).unwrap_err();
            assert!(matches!(e, Error::Input(ref m) if m.contains("swiglu_bwd_f32")), "{grid:?}: {e}");
        }
        // the grid of 65535 x 65536 tiles is past y * z: refused at launch, not wrapped
        let (y, z) = split_yz(65535 * 65536);
        assert!(check_launch("k", (1, y as u32, z as u32), 128).is_err());
    }
}
