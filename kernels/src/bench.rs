//! Kernel benchmarks for a GPU session: each prints achieved TFLOP/s or GB/s next to the
//! ceiling measured in the same run (device-to-device copy bandwidth) and, for GEMMs, cuBLAS on
//! the same shape. Timed with CUDA events over repeated launches after a warm-up.
use crate::device::{cuda_err, Device};
use crate::ops::gemm::{gemm, gemm_mat_with, gemm_via, GemmPath, GemmShape, Layout, MatShape, Operand, Tile};
use crate::ops::mla::{
    mla_decode_with, mla_kernel, mla_splits_for, mma_fits, MlaCall, MlaKernel, MlaWork, MMA_VARIANTS,
};
use crate::tensor::{dptr, upload, zeros, Act, DType, DWeight};
use cudarc::driver::sys::CUevent_flags;
use dsv3_core::{Error, Result};

/// Milliseconds per call of `f`, averaged over `iters` calls after `warmup` (CUDA events).
pub fn time_ms(dev: &Device, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let ev =
        |d: &Device| d.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| cuda_err("event", e));
    let start = ev(dev)?;
    for _ in 0..iters {
        f()?;
    }
    let end = ev(dev)?;
    end.synchronize().map_err(|e| cuda_err("event sync", e))?;
    Ok(start.elapsed_ms(&end).map_err(|e| cuda_err("elapsed", e))? as f64 / iters.max(1) as f64)
}

/// Device-to-device copy bandwidth in GB/s (read + write bytes), over a `bytes`-sized buffer.
pub fn copy_bandwidth(dev: &Device, bytes: usize) -> Result<f64> {
    let n = bytes / 4;
    let src = zeros::<f32>(dev, n)?;
    let mut dst = zeros::<f32>(dev, n)?;
    let ms = time_ms(dev, 3, 20, || dev.stream.memcpy_dtod(&src, &mut dst).map_err(|e| cuda_err("copy", e)))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// One result line.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub ms: f64,
    /// Achieved TFLOP/s or GB/s.
    pub value: f64,
    pub unit: &'static str,
    /// The ceiling it is compared with (cuBLAS's TFLOP/s, or the copy bandwidth).
    pub ceiling: f64,
    pub ceiling_name: &'static str,
    /// Printed after the line (e.g. the MLA lines' TFLOP/s); empty for none.
    pub note: String,
}

impl core::fmt::Display for Line {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:<44} {:>9.3} ms  {:>8.1} {}  ({:>5.1}% of {} {:.1}){}",
            self.name,
            self.ms,
            self.value,
            self.unit,
            100.0 * self.value / self.ceiling.max(1e-9),
            self.ceiling_name,
            self.ceiling,
            if self.note.is_empty() { String::new() } else { format!("  {}", self.note) }
        )
    }
}

/// `n` random E4M3 codes (a hash of the index and `seed`), every code but the two NaNs (0x7f,
/// 0xff): the whole range of magnitudes and signs, as real operands have (not a short periodic
/// pattern; never zeros).
fn random_e4m3(n: usize, seed: u64) -> Vec<u8> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i ^ seed.rotate_left(32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let b = (z ^ (z >> 31)) as u8;
            if b & 0x7f == 0x7f {
                b - 1
            } else {
                b
            }
        })
        .collect()
}

/// `n` standard normal values, generated in 4M-value chunks on all cores (the benchmarks' large
/// operands, e.g. the 300M-value MLA cache, took most of a GPU session's minutes on one core);
/// chunk `i` from seed `seed + i`, so the values depend on `n` and `seed` only.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 22;
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).max(1);
    let chunks: Vec<(usize, &mut [f32])> = out.chunks_mut(CHUNK).enumerate().collect();
    let per = chunks.len().div_ceil(threads).max(1);
    let mut chunks = chunks.into_iter();
    std::thread::scope(|sc| loop {
        let batch: Vec<(usize, &mut [f32])> = chunks.by_ref().take(per).collect();
        if batch.is_empty() {
            break;
        }
        sc.spawn(move || {
            for (i, c) in batch {
                let mut r = dsv3_core::rng::Rng::new(seed.wrapping_add(i as u64));
                c.iter_mut().for_each(|v| *v = r.normal());
            }
        });
    });
    out
}

/// cuBLAS bf16 GEMM (f32 compute) TFLOP/s on `C[m,n] = A[m,k]·W[n,k]ᵀ`; `None` without libcublas.
pub fn cublas_bf16_tflops(dev: &Device, m: usize, n: usize, k: usize) -> Result<Option<f64>> {
    cublas_bf16_layout_tflops(dev, Layout::NT, m, n, k)
}

/// cuBLAS bf16 GEMM (f32 compute, bf16 C) TFLOP/s on the row-major product of `layout` (see
/// [`Layout`]: NT `A·Bᵀ`, NN `A·B`, TN `Aᵀ·B`); `None` without libcublas. Row-major `C = X·Y` is
/// the column-major `Cᵀ = Yᵀ·Xᵀ`, so B goes first.
pub fn cublas_bf16_layout_tflops(dev: &Device, layout: Layout, m: usize, n: usize, k: usize) -> Result<Option<f64>> {
    use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
    // SAFETY: only tries to dlopen the library
    if !std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false) {
        return Ok(None);
    }
    let blas = CudaBlas::new(dev.stream.clone()).map_err(|e| cuda_err("cuBLAS", e))?;
    // random operands (never time on zeros: power and clocks depend on the data)
    let bf =
        |n: usize, seed: u64| upload(dev, &randn(n, seed).iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>());
    let a = bf(m * k, 11)?;
    let w = bf(n * k, 12)?;
    let mut c = zeros::<half::bf16>(dev, m * n)?;
    // (op of B, op of A, ld of B, ld of A) in column-major terms
    let (tb, ta, ldb, lda) = match layout {
        Layout::NT => (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N, k, k),
        Layout::NN => (Op::CUBLAS_OP_N, Op::CUBLAS_OP_N, n, k),
        Layout::TN => (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T, n, m),
    };
    let cfg = GemmConfig {
        transa: tb,
        transb: ta,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: half::bf16::ONE,
        lda: ldb as i32,
        ldb: lda as i32,
        beta: half::bf16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: buffers sized for the column-major view of the row-major product above
    let ms = time_ms(dev, 3, 10, || unsafe { blas.gemm(cfg, &w, &a, &mut c) }.map_err(|e| cuda_err("cuBLAS gemm", e)))?;
    Ok(Some(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12))
}

/// The bf16 mma kernel in `layout` at `m x n x k` (`tile`: forced, or the launcher's choice),
/// bf16 C (`f32_acc`: f32 C accumulated, the gradient form), against `peer` TFLOP/s (cuBLAS bf16
/// in the same layout, [`cublas_bf16_layout_tflops`]).
#[allow(clippy::too_many_arguments)]
pub fn mma_line(
    dev: &Device,
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
    tile: Option<Tile>,
    f32_acc: bool,
    peer: f64,
) -> Result<Line> {
    let a = Act::from_f32(dev, DType::Bf16, &randn(m * k, 1))?;
    let b = Act::from_f32(dev, DType::Bf16, &randn(n * k, 2))?;
    let mut c = Act::zeros(dev, if f32_acc { DType::F32 } else { DType::Bf16 }, m * n)?;
    let s = MatShape { accumulate: f32_acc, ..MatShape::plain(layout, m, n, k) };
    let ms = time_ms(dev, 3, 10, || gemm_mat_with(dev, layout, &a, Operand::Act(&b), &mut c, &s, tile))?;
    Ok(Line {
        name: format!(
            "mma {layout:?} {m}x{n}x{k}{}{}",
            match tile {
                None => "",
                Some(Tile::Wide) => " 128x256",
                Some(Tile::Large) => " 128x128",
                Some(Tile::Small) => " 64x128",
            },
            if f32_acc { " f32 C +=" } else { "" }
        ),
        ms,
        value: 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12,
        unit: "TFLOP/s",
        ceiling: peer,
        ceiling_name: "cuBLAS bf16",
        note: String::new(),
    })
}

/// The MoE experts' grouped bf16 product in `layout` (NT: the forward `x_e·W_eᵀ`, NN: the
/// backward `dY_e·W_e`) over `rows` routed rows split unevenly among `experts` (the counts of a
/// random top-k routing: each row to an expert drawn with weights 1..=2), `n x k` per expert: the
/// kernel `gemm_mat` picks (`gemm_tma_grouped_bf16` on sm_90a; `mma` forces the mma.sync kernel),
/// against cuBLAS bf16 on one dense `rows x n x k` product (the same FLOPs with a single weight:
/// what a perfect grouped GEMM could reach).
#[allow(clippy::too_many_arguments)]
pub fn grouped_line(
    dev: &Device,
    layout: Layout,
    rows: usize,
    experts: usize,
    n: usize,
    k: usize,
    mma: bool,
    peer: f64,
) -> Result<Line> {
    use crate::ops::gemm::{Grouped, GEMM_BM};
    let mut rng = dsv3_core::rng::Rng::new(5);
    let weights: Vec<u64> = (0..experts).map(|e| 1 + (e as u64 * 7919) % 2).collect();
    let total: u64 = weights.iter().sum();
    let mut counts = vec![0usize; experts];
    for _ in 0..rows {
        let mut r = rng.below(total);
        let mut e = 0;
        while r >= weights[e] {
            r -= weights[e];
            e += 1;
        }
        counts[e] += 1;
    }
    let (mut ro, mut to) = (vec![0i32], vec![0i32]);
    for &c in &counts {
        ro.push(ro[ro.len() - 1] + c as i32);
        to.push(to[to.len() - 1] + c.div_ceil(GEMM_BM) as i32);
    }
    let (ro_d, to_d) = (upload(dev, &ro)?, upload(dev, &to)?);
    let a = Act::from_f32(dev, DType::Bf16, &randn(rows * k, 1))?;
    let w = DWeight::from_f32(dev, DType::Bf16, experts, n, k, &randn(experts * n * k, 2))?;
    let mut c = Act::zeros(dev, DType::Bf16, rows * n)?;
    let grouped = Grouped { row_offsets: &ro_d, tile_offsets: &to_d, max_tiles: rows.div_ceil(GEMM_BM) + experts };
    let s = MatShape { stride_b: n * k, batch: experts, grouped: Some(grouped), ..MatShape::plain(layout, rows, n, k) };
    let tile = if mma { Some(Tile::Small) } else { None };
    let ms = time_ms(dev, 3, 10, || gemm_mat_with(dev, layout, &a, Operand::Weight(&w), &mut c, &s, tile))?;
    // which kernels ran (the profile of one more call)
    dev.profile_begin()?;
    gemm_mat_with(dev, layout, &a, Operand::Weight(&w), &mut c, &s, tile)?;
    let kernel: Vec<String> = dev.profile_end()?.kernels.into_iter().map(|k| k.name).collect();
    let kernel = kernel.join(" + ");
    Ok(Line {
        name: format!("grouped {layout:?} {rows}x{n}x{k} / {experts} ({kernel})"),
        ms,
        value: 2.0 * (rows * n * k) as f64 / (ms * 1e-3) / 1e12,
        unit: "TFLOP/s",
        ceiling: peer,
        ceiling_name: "cuBLAS bf16 dense",
        note: String::new(),
    })
}

/// dsv3's GEMM (bf16 or FP8 weights) at `m x n x k`, against cuBLAS bf16 on the same shape.
pub fn gemm_line(dev: &Device, m: usize, n: usize, k: usize, fp8: bool) -> Result<Line> {
    let a = Act::from_f32(dev, DType::Bf16, &randn(m * k, 1))?;
    let w = if fp8 {
        let q: Vec<u8> = (0..n * k).map(|i| (i * 37 % 120) as u8).collect();
        let s = vec![0.01f32; n.div_ceil(128) * k.div_ceil(128)];
        DWeight::from_fp8(dev, 1, n, k, &q, &s)?
    } else {
        DWeight::from_f32(dev, DType::Bf16, 1, n, k, &randn(n * k, 2))?
    };
    let mut c = Act::zeros(dev, DType::Bf16, m * n)?;
    let ms = time_ms(dev, 3, 10, || gemm(dev, &a, &w, &mut c, &GemmShape::plain(m, k, n)))?;
    let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    let peer = cublas_bf16_tflops(dev, m, n, k)?.unwrap_or(f64::NAN);
    // few rows: time both kernel families (the line's time is what `gemm` picks) and the
    // weight bandwidth of the skinny one
    let note = if m <= crate::ops::gemm::SKINNY_MAX_M && k.is_multiple_of(8) {
        let plain = GemmShape::plain(m, k, n);
        let tiled = time_ms(dev, 3, 10, || gemm_via(dev, &a, &w, &mut c, &plain, GemmPath::Tiled))?;
        let skinny = time_ms(dev, 3, 10, || gemm_via(dev, &a, &w, &mut c, &plain, GemmPath::Skinny))?;
        let wbytes = (n * k * if fp8 { 1 } else { 2 }) as f64;
        format!(" (tiled {tiled:.3} ms, skinny {skinny:.3} ms = W {:.0} GB/s)", wbytes / (skinny * 1e-3) / 1e9)
    } else {
        String::new()
    };
    Ok(Line {
        name: format!("gemm {} {m}x{n}x{k}{note}", if fp8 { "fp8-weights" } else { "bf16" }),
        ms,
        value: tflops,
        unit: "TFLOP/s",
        ceiling: peer,
        ceiling_name: "cuBLAS bf16",
        note: String::new(),
    })
}

/// Absorbed MLA decode at FlashMLA's shapes: `batch` sequences of `len` cached tokens, `h` heads,
/// latent `c` + rope `dr`, with `kernel` (`None`: the one `mla_decode` picks) and the splits
/// `mla_splits` suggests for it; bandwidth counts the cache bytes read once per step, and the
/// note gives TFLOP/s (2·(C+dr)·len + 2·C·len per head and row: compute-bound with many heads).
#[allow(clippy::too_many_arguments)]
pub fn mla_line(
    dev: &Device,
    batch: usize,
    len: usize,
    h: usize,
    c: usize,
    dr: usize,
    copy_gbs: f64,
    kernel: Option<MlaKernel>,
) -> Result<Line> {
    mla_line_on(dev, &MlaBench::new(dev, batch, len, h, c, dr)?, copy_gbs, kernel)
}

/// The random inputs of [`mla_line`]'s shape, made once for every kernel timed on it.
pub struct MlaBench {
    batch: usize,
    len: usize,
    h: usize,
    c: usize,
    dr: usize,
    cache: Act,
    qt: Act,
    qpe: Act,
    rs: cudarc::driver::CudaSlice<i32>,
    rl: cudarc::driver::CudaSlice<i32>,
}

impl MlaBench {
    /// `batch` rows of `h` heads, each attending `len` cached entries of width `c + dr` (bf16).
    pub fn new(dev: &Device, batch: usize, len: usize, h: usize, c: usize, dr: usize) -> Result<MlaBench> {
        let slot: Vec<i32> = (0..batch as i32).collect();
        Ok(MlaBench {
            batch,
            len,
            h,
            c,
            dr,
            cache: Act::from_f32(dev, DType::Bf16, &randn(batch * len * (c + dr), 3))?,
            qt: Act::from_f32(dev, DType::Bf16, &randn(batch * h * c, 4))?,
            qpe: Act::from_f32(dev, DType::Bf16, &randn(batch * h * dr, 5))?,
            rs: upload(dev, &slot)?,
            rl: upload(dev, &vec![len as i32; batch])?,
        })
    }
}

/// [`mla_line`] on inputs made beforehand.
pub fn mla_line_on(dev: &Device, b: &MlaBench, copy_gbs: f64, kernel: Option<MlaKernel>) -> Result<Line> {
    let (batch, len, h, c, dr) = (b.batch, b.len, b.h, b.c, b.dr);
    let w = c + dr;
    let kernel = kernel.unwrap_or_else(|| mla_kernel(dev, DType::Bf16, h, c, dr));
    let splits = mla_splits_for(dev, kernel, batch, h, c, dr, len);
    let mut work = MlaWork::new(dev, splits, batch, h, c)?;
    let mut out = Act::zeros(dev, DType::Bf16, batch * h * c)?;
    let call = MlaCall {
        n: batch,
        h,
        c,
        dr,
        qt: &b.qt,
        ld_qt: h * c,
        qpe: &b.qpe,
        qpe_off: 0,
        ld_qpe: h * dr,
        hs_qpe: dr,
        cache: &b.cache,
        slots: batch,
        max_len: len,
        row_slot: &b.rs,
        row_len: &b.rl,
        scale: 0.1,
        splits,
    };
    let ms = time_ms(dev, 3, 20, || mla_decode_with(dev, kernel, &call, &mut out, h * c, Some(&mut work)))?;
    let bytes = (batch * len * w * 2) as f64;
    let flop = (batch * h * len * (2 * w + 2 * c)) as f64;
    Ok(Line {
        name: format!("mla decode b{batch} len{len} h{h} d{w}/{c} {} ({splits} splits)", kernel.name()),
        ms,
        value: bytes / (ms * 1e-3) / 1e9,
        unit: "GB/s",
        ceiling: copy_gbs,
        ceiling_name: "copy GB/s",
        note: format!("{:.1} TFLOP/s", flop / (ms * 1e-3) / 1e12),
    })
}

/// Runs every benchmark and prints one line each.
pub fn run_all(dev: &Device) -> Result<Vec<Line>> {
    if dev.sms == 0 {
        return Err(Error::Unsupported("no SMs reported".into()));
    }
    println!("{}", dev.name);
    let copy = copy_bandwidth(dev, 1 << 30)?;
    println!("device-to-device copy: {copy:.1} GB/s (the bandwidth ceiling below)");
    let mut lines = Vec::new();
    let shapes =
        [(8192, 8192, 8192), (4096, 7168, 2048), (128, 7168, 2048), (1, 32000, 512), (32, 32000, 512), (1, 4096, 7168)];
    for (m, n, k) in shapes {
        for fp8 in [false, true] {
            let l = gemm_line(dev, m, n, k, fp8)?;
            println!("{l}");
            lines.push(l);
        }
    }
    // the bf16 mma kernel in every layout at prefill / training shapes (the 88M lm_head forward
    // 2048 x 32000 x 512 and its backward NN 2048 x 512 x 32000, TN 32000 x 512 x 2048), the tile
    // the launcher picks, then the other one (A/B)
    let mma_shapes = [(8192, 8192, 8192), (4096, 7168, 2048), (8192, 512, 1408), (2048, 32000, 512)];
    for (m, n, k) in mma_shapes {
        for layout in [Layout::NT, Layout::NN, Layout::TN] {
            let peer = cublas_bf16_layout_tflops(dev, layout, m, n, k)?.unwrap_or(f64::NAN);
            for tile in [None, Some(Tile::Wide), Some(Tile::Large), Some(Tile::Small)] {
                let l = mma_line(dev, layout, m, n, k, tile, false, peer)?;
                println!("{l}");
                lines.push(l);
            }
        }
    }
    for (layout, m, n, k, f32_acc) in [
        (Layout::NN, 2048, 512, 32000, false),
        (Layout::TN, 32000, 512, 2048, false),
        (Layout::TN, 32000, 512, 2048, true),
    ] {
        let peer = cublas_bf16_layout_tflops(dev, layout, m, n, k)?.unwrap_or(f64::NAN);
        let l = mma_line(dev, layout, m, n, k, None, f32_acc, peer)?;
        println!("{l}");
        lines.push(l);
    }
    lines.extend(run_grouped(dev, 32768)?);
    // the kernel mla_decode picks, then (A/B) every other tensor-core variant that fits and the
    // SIMT kernel
    for h in [16usize, 128] {
        let auto = mla_kernel(dev, DType::Bf16, h, 512, 64);
        let others = MMA_VARIANTS
            .iter()
            .filter(|v| mma_fits(dev, v, 512, 64))
            .map(|v| MlaKernel::Mma(*v))
            .chain([MlaKernel::Simple])
            .filter(|k| *k != auto);
        let inputs = MlaBench::new(dev, 128, 4096, h, 512, 64)?;
        for k in [auto].into_iter().chain(others) {
            let l = mla_line_on(dev, &inputs, copy, Some(k))?;
            println!("{l}");
            lines.push(l);
        }
    }
    let l = mla_line(dev, 1, 4096, 16, 512, 64, copy, None)?;
    println!("{l}");
    lines.push(l);
    lines.extend(run_prefill_attn(dev)?);
    lines.extend(run_ce(dev, 8192, 32000)?);
    Ok(lines)
}

/// The 88M model's expert products over `rows` routed rows (issue 7's 8 x 1024 tokens, top-4 of
/// 16 experts: 32768): forward gate|up and down (NT), their input gradients (NN); the launcher's
/// kernel (wgmma + TMA on sm_90a), then the mma.sync kernel (`kernel_bench grouped [ROWS]`).
pub fn run_grouped(dev: &Device, rows: usize) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    for (layout, n, k) in
        [(Layout::NT, 512, 512), (Layout::NT, 512, 256), (Layout::NN, 512, 512), (Layout::NN, 256, 512)]
    {
        let peer = cublas_bf16_layout_tflops(dev, Layout::NT, rows, n, k)?.unwrap_or(f64::NAN);
        for mma in [false, true] {
            let l = grouped_line(dev, layout, rows, 16, n, k, mma, peer)?;
            println!("{l}");
            lines.push(l);
        }
    }
    Ok(lines)
}

/// The training head's softmax cross-entropy over `rows` x `vocab` logits (random, scale 3; bf16
/// as the bf16 training pass has them, and f32) writing the bf16 gradient (`kernel_bench ce
/// [ROWS]`; issue 7's step: 8192 x 32000): the row cached in shared memory (where it fits), then
/// read three times. GB/s counts the logits read once and the gradient written, against the
/// device-copy ceiling measured first.
pub fn run_ce(dev: &Device, rows: usize, vocab: usize) -> Result<Vec<Line>> {
    use crate::ops::train::cross_entropy_with;
    let copy = copy_bandwidth(dev, 1 << 30)?;
    let host: Vec<f32> = randn(rows * vocab, 7).iter().map(|x| 3.0 * x).collect();
    let targets = upload(dev, &(0..rows).map(|r| ((r * 7919) % vocab) as i32).collect::<Vec<i32>>())?;
    let mut dz = Act::zeros(dev, DType::Bf16, rows * vocab)?;
    let mut loss = zeros::<f32>(dev, rows)?;
    let mut lines = Vec::new();
    for dt in [DType::Bf16, DType::F32] {
        let z = Act::from_f32(dev, dt, &host)?;
        for cache in [true, false] {
            let mut run = || {
                let (l, t) = (&mut loss, &targets);
                cross_entropy_with(dev, Some(cache), &z, vocab, t, None, rows as f32, &mut dz, vocab, l, vocab, rows)
            };
            let ms = match time_ms(dev, 2, 10, &mut run) {
                Ok(ms) => ms,
                Err(e) => {
                    println!("  (cross-entropy {dt:?} cached {cache}: {e})");
                    continue;
                }
            };
            let bytes = (rows * vocab * (dt.size() + 2)) as f64;
            let how = if cache { "row in smem" } else { "3 reads" };
            let l = Line {
                name: format!("cross_entropy {rows}x{vocab} {dt:?}->bf16 {how}"),
                ms,
                value: bytes / (ms * 1e-3) / 1e9,
                unit: "GB/s",
                ceiling: copy,
                ceiling_name: "copy GB/s",
                note: String::new(),
            };
            println!("{l}");
            lines.push(l);
        }
    }
    Ok(lines)
}

/// cuBLASLt FP8 E4M3 GEMM with DeepSeek's block scaling — 128x128 blocks on the weight
/// (`BLK128x128_32F`), 1x128 per token on the activations (`VEC128_32F`), f32 compute, bf16 out —
/// TFLOP/s on `D[m,n] = A[m,k]·W[n,k]ᵀ`. `Ok(None)` (the reason printed) without libcublasLt or
/// when it offers no algorithm (block scaling needs cuBLAS 12.9+ on sm_90). Timing only: the
/// scale buffers hold ones in whatever layout cuBLASLt expects.
pub fn cublaslt_fp8_blockwise_tflops(dev: &Device, m: usize, n: usize, k: usize) -> Result<Option<f64>> {
    use cudarc::cublaslt::sys::{self as lt, cublasStatus_t::CUBLAS_STATUS_SUCCESS};
    use std::ffi::c_void;
    // SAFETY: only tries to dlopen the library
    if !std::panic::catch_unwind(|| unsafe { lt::is_culib_present() }).unwrap_or(false) {
        println!("  (cuBLASLt not found: no FP8 blockwise peer)");
        return Ok(None);
    }
    let fail = |what: &str, s: lt::cublasStatus_t| Error::Io(format!("cuBLASLt {what}: {s:?}"));
    let a = upload(dev, &(0..m * k).map(|i| (i * 37 % 120) as u8).collect::<Vec<u8>>())?;
    let w = upload(dev, &(0..n * k).map(|i| (i * 53 % 120) as u8).collect::<Vec<u8>>())?;
    let d = zeros::<half::bf16>(dev, m * n)?;
    let kb = k.div_ceil(128);
    let sa = upload(dev, &vec![1.0f32; 2 * (m.div_ceil(4) * 4) * kb])?;
    let sw = upload(dev, &vec![1.0f32; 2 * n.div_ceil(128) * kb])?;
    let ws_bytes = 32usize << 20;
    let ws = zeros::<u8>(dev, ws_bytes)?;
    let (pa, pw, pd) = (dptr(dev, &a, 0)?, dptr(dev, &w, 0)?, dptr(dev, &d, 0)?);
    let (psa, psw, pws) = (dptr(dev, &sa, 0)?, dptr(dev, &sw, 0)?, dptr(dev, &ws, 0)?);
    // Column-major view: D^T[n, m] = op(W)[n, k] · A^T[k, m]; cuBLASLt's "A" is W (transposed,
    // K-major: the TN layout Hopper FP8 requires), its "B" is the activation.
    // SAFETY: plain cuBLASLt calls on buffers sized above; every handle is created before use
    // and destroyed after the timed loop.
    unsafe {
        let mut h: lt::cublasLtHandle_t = std::ptr::null_mut();
        let s = lt::cublasLtCreate(&mut h);
        if s != CUBLAS_STATUS_SUCCESS {
            return Err(fail("create", s));
        }
        let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
        let s = lt::cublasLtMatmulDescCreate(
            &mut desc,
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType_t::CUDA_R_32F,
        );
        if s != CUBLAS_STATUS_SUCCESS {
            return Err(fail("matmul desc", s));
        }
        let set = |attr: lt::cublasLtMatmulDescAttributes_t, p: *const c_void, size: usize| {
            let s = lt::cublasLtMatmulDescSetAttribute(desc, attr, p, size);
            if s != CUBLAS_STATUS_SUCCESS {
                Err(fail(&format!("set {attr:?}"), s))
            } else {
                Ok(())
            }
        };
        use lt::cublasLtMatmulDescAttributes_t as A;
        let (op_t, op_n) = (1i32, 0i32); // CUBLAS_OP_T, CUBLAS_OP_N
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op_t as *const i32 as *const c_void, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op_n as *const i32 as *const c_void, 4)?;
        let blk = lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32;
        let vec = lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32;
        set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &blk as *const i32 as *const c_void, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec as *const i32 as *const c_void, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &psw as *const u64 as *const c_void, 8)?;
        set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &psa as *const u64 as *const c_void, 8)?;
        let layout = |t: lt::cudaDataType_t, rows: usize, cols: usize, ld: usize| {
            let mut l: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
            let s = lt::cublasLtMatrixLayoutCreate(&mut l, t, rows as u64, cols as u64, ld as i64);
            if s != CUBLAS_STATUS_SUCCESS {
                Err(fail("matrix layout", s))
            } else {
                Ok(l)
            }
        };
        use lt::cudaDataType_t::{CUDA_R_16BF, CUDA_R_8F_E4M3};
        let la = layout(CUDA_R_8F_E4M3, k, n, k)?;
        let lb = layout(CUDA_R_8F_E4M3, k, m, k)?;
        let ld = layout(CUDA_R_16BF, n, m, n)?;
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        let s = lt::cublasLtMatmulPreferenceCreate(&mut pref);
        if s != CUBLAS_STATUS_SUCCESS {
            return Err(fail("preference", s));
        }
        let wsb = ws_bytes as u64;
        lt::cublasLtMatmulPreferenceSetAttribute(
            pref,
            lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &wsb as *const u64 as *const c_void,
            8,
        );
        let mut heur: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
        let mut found = 0i32;
        let s = lt::cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld, ld, pref, 1, &mut heur, &mut found);
        let result = if s != CUBLAS_STATUS_SUCCESS || found == 0 {
            println!("  (cuBLASLt offers no FP8 blockwise algorithm for {m}x{n}x{k}: {s:?}, {found} found)");
            Ok(None)
        } else {
            let (alpha, beta) = (1.0f32, 0.0f32);
            let stream = dev.stream.cu_stream() as lt::cudaStream_t;
            let ms = time_ms(dev, 3, 10, || {
                let s = lt::cublasLtMatmul(
                    h,
                    desc,
                    &alpha as *const f32 as *const c_void,
                    pw as *const c_void,
                    la,
                    pa as *const c_void,
                    lb,
                    &beta as *const f32 as *const c_void,
                    pd as *const c_void,
                    ld,
                    pd as *mut c_void,
                    ld,
                    &heur.algo,
                    pws as *mut c_void,
                    ws_bytes,
                    stream,
                );
                if s != CUBLAS_STATUS_SUCCESS {
                    Err(fail("matmul", s))
                } else {
                    Ok(())
                }
            });
            ms.map(|ms| Some(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12))
        };
        lt::cublasLtMatmulPreferenceDestroy(pref);
        for l in [la, lb, ld] {
            lt::cublasLtMatrixLayoutDestroy(l);
        }
        lt::cublasLtMatmulDescDestroy(desc);
        lt::cublasLtDestroy(h);
        result
    }
}

/// dsv3's FP8 GEMM (1x128 activations x 128x128 weights, bf16 out; the kernel `Fp8Kernel::Auto`
/// picks: fp8_gemm_tma on sm_90a, SIMT elsewhere; on sm_90a fp8_gemm_wgmma2 and the first form
/// fp8_gemm_wgmma are timed too) at `m x n x k`, printed next to cuBLASLt FP8 blockwise and cuBLAS bf16 from the same
/// process. Returns (dsv3, cuBLASLt FP8, cuBLAS bf16) TFLOP/s (NaN where a peer is missing).
pub fn fp8_gemm_line(dev: &Device, m: usize, n: usize, k: usize) -> Result<(f64, f64, f64)> {
    use crate::ops::fp8::{fp8_gemm, BScales, Fp8Gemm, Fp8Kernel, Fp8Operand};
    let kb = k.div_ceil(128);
    let aq = upload(dev, &random_e4m3(m * k, 11))?;
    let wq = upload(dev, &random_e4m3(n * k, 12))?;
    let sa = upload(dev, &vec![0.01f32; m * kb])?;
    let sw = upload(dev, &vec![0.01f32; n.div_ceil(128) * kb])?;
    let mut d = Act::zeros(dev, DType::Bf16, m * n)?;
    let g = Fp8Gemm {
        m,
        n,
        k,
        a: Fp8Operand { q: &aq, ld: k, scale: &sa, s_rs: kb, s_ks: 1 },
        b: Fp8Operand { q: &wq, ld: k, scale: &sw, s_rs: kb, s_ks: 1 },
        b_scales: BScales::Block128,
        ldd: n,
        accumulate: false,
        groups: 1,
        stride_b: 0,
        stride_sb: 0,
        grouped: None,
    };
    let ms = time_ms(dev, 3, 10, || fp8_gemm(dev, &g, &mut d, Fp8Kernel::Auto))?;
    let ours = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    // on sm_90a also the other forms (A/B of the TMA kernel fp8_gemm_tma with its TMA-store
    // epilogue, which Auto runs): the same kernel storing D from registers (and summing split-K
    // partials in a separate launch, no last-wave split), the cp.async-pipelined
    // fp8_gemm_wgmma2 and the first form fp8_gemm_wgmma
    let mut v1 = String::new();
    if dev.arch == crate::ptx::Arch::Sm90a {
        for (name, which) in
            [("tma plain-epilogue", Fp8Kernel::TmaPlain), ("wgmma2", Fp8Kernel::Wgmma2), ("wgmma v1", Fp8Kernel::Wgmma)]
        {
            match time_ms(dev, 3, 10, || fp8_gemm(dev, &g, &mut d, which)) {
                Ok(ms1) => v1 += &format!("  ({name} {:>7.1})", 2.0 * (m * n * k) as f64 / (ms1 * 1e-3) / 1e12),
                Err(e) => v1 += &format!("  ({name} failed: {e})"),
            }
        }
    }
    // where the walk's last wave is split along K, the same kernel with that wave whole
    {
        use crate::ops::fp8_tma::{set_tail_split, split_plan, tail_split, TailSplit};
        let tiles = m.div_ceil(128) * n.div_ceil(128);
        let mode = tail_split();
        if dev.arch == crate::ptx::Arch::Sm90a && split_plan(tiles, kb, dev.sms, true).split_from > 0 {
            set_tail_split(TailSplit::Off);
            let r = time_ms(dev, 3, 10, || fp8_gemm(dev, &g, &mut d, Fp8Kernel::Tma));
            set_tail_split(mode);
            match r {
                Ok(ms1) => {
                    v1 += &format!("  (last wave whole {:>7.1})", 2.0 * (m * n * k) as f64 / (ms1 * 1e-3) / 1e12)
                }
                Err(e) => v1 += &format!("  (last wave whole failed: {e})"),
            }
        }
    }
    // a failing peer is reported, not fatal: dsv3's own numbers still print
    let lt = cublaslt_fp8_blockwise_tflops(dev, m, n, k)
        .unwrap_or_else(|e| {
            println!("  (cuBLASLt FP8 blockwise failed: {e})");
            None
        })
        .unwrap_or(f64::NAN);
    let bf16 = cublas_bf16_tflops(dev, m, n, k)?.unwrap_or(f64::NAN);
    // the TMA kernel's schedule: 128 x 128 block tiles, split-K where they leave SMs idle (all
    // tiles, or those of a last wave they fill at most half of where K is long), and the walk's
    // estimated length in tile times (wave quantization: 4.12 waves of whole tiles run as 5)
    let tiles = m.div_ceil(128) * n.div_ceil(128);
    let plan = crate::ops::fp8_tma::split_plan(tiles, kb, dev.sms, true);
    let sched = match (plan.splits, plan.split_from) {
        (1, _) => format!("{tiles} tiles"),
        (s, 0) => format!("{tiles} tiles x {s} splits"),
        (s, f) => format!("{f} tiles + {} x {s} splits", tiles - f),
    };
    let waves = plan.waves(tiles, dev.sms, kb);
    println!(
        "fp8 gemm {m:>5}x{n:>5}x{k:>5}  {ms:>8.3} ms  dsv3 {ours:>7.1} TFLOP/s  cuBLASLt fp8 blockwise {lt:>7.1} ({:>4.2}x)  cuBLAS bf16 {bf16:>6.1} ({:>4.2}x)  [{sched} = {waves:.2} waves]{v1}",
        ours / lt,
        ours / bf16
    );
    Ok((ours, lt, bf16))
}

/// DeepGEMM's dense shapes (M = 4096 and M = 128 with its N x K pairs), plus the quantize kernels'
/// bandwidth on a 4096 x 7168 bf16 activation against the device copy.
pub fn run_fp8(dev: &Device) -> Result<()> {
    use crate::ops::fp8::{quant_1x128_form, quant_t128, Fp8Out};
    println!("{}", dev.name);
    let copy = copy_bandwidth(dev, 1 << 30)?;
    println!("device-to-device copy: {copy:.1} GB/s");
    for m in [4096usize, 128] {
        for (n, k) in [(7168usize, 2048usize), (2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168)] {
            fp8_gemm_line(dev, m, n, k)?;
        }
    }
    let (rows, cols) = (4096usize, 7168usize);
    let x = Act::from_f32(dev, DType::Bf16, &randn(rows * cols, 7))?;
    let mut q = zeros::<u8>(dev, rows * cols)?;
    let mut s = zeros::<f32>(dev, rows * cols.div_ceil(128))?;
    let bytes = (rows * cols * 3 + rows * cols.div_ceil(128) * 4) as f64; // bf16 in, e4m3 out, scales

    // the warp-per-group kernel quant_1x128 runs, then the block-per-group one (DSV3_FP8_QUANT=v1)
    for (warp, name) in [(true, "quant_1x128w"), (false, "quant_1x128 (v1)")] {
        let ms = time_ms(dev, 3, 20, || {
            quant_1x128_form(dev, &x, cols, rows, cols, Fp8Out::dense(&mut q, &mut s, cols), false, warp)
        })?;
        println!(
            "{name} {rows}x{cols} bf16: {ms:.3} ms, {:.1} GB/s ({:.1}% of copy)",
            bytes / (ms * 1e-3) / 1e9,
            100.0 * bytes / (ms * 1e-3) / 1e9 / copy
        );
    }
    let mut st = zeros::<f32>(dev, cols * rows.div_ceil(128))?;
    let ms = time_ms(dev, 3, 20, || {
        let out = Fp8Out { q: &mut q, ld: rows, scale: &mut st, s_rs: rows.div_ceil(128), s_cs: 1 };
        quant_t128(dev, &x, cols, rows, cols, out, false)
    })?;
    println!(
        "quant_t128 {rows}x{cols} bf16 (transposed): {ms:.3} ms, {:.1} GB/s ({:.1}% of copy)",
        bytes / (ms * 1e-3) / 1e9,
        100.0 * bytes / (ms * 1e-3) / 1e9 / copy
    );
    Ok(())
}

/// One head shape of the prefill attention benchmark.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub name: &'static str,
    pub h: usize,
    pub c: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
}

/// The 88M benchmark model's and DeepSeek-V3's attention shapes.
pub const ATTN_SHAPES: [AttnShape; 2] = [
    AttnShape { name: "88M", h: 8, c: 128, dn: 64, dr: 32, dv: 64 },
    AttnShape { name: "V3", h: 128, c: 512, dn: 128, dr: 64, dv: 128 },
];

/// Prefill attention of `batch` fresh sequences of `t` tokens (causal) at shape `s`: the flash
/// kernel (MHA form) and the per-row absorbed path it replaces, in the same run. Each kernel's
/// TFLOP/s counts its own FLOPs per (query, key) pair and head, `2·(dk + dv)` for flash and
/// `2·(C + dr) + 2·C` for the absorbed kernel, against `ceiling` (cuBLAS bf16 on a large GEMM in
/// this run). The notes give each path's whole time: the flash path with its `kv_b` decompression
/// GEMM (one per sequence), the absorbed one with its `q_nope·W_UK` and `ō·W_UVᵀ` GEMMs.
pub fn prefill_attn_lines(dev: &Device, s: &AttnShape, batch: usize, t: usize, ceiling: f64) -> Result<Vec<Line>> {
    use crate::ops::attn::{
        flash_attention, flash_attention_with, flash_fits, flash_variant, FlashCall, Segment, ATTN_VARIANTS,
    };
    let AttnShape { h, c, dn, dr, dv, .. } = *s;
    let (dk, w, wkv, n) = (dn + dr, c + dr, h * (dn + dv), batch * t);
    let bf = |len: usize, seed: u64| {
        Act::from_f32(dev, DType::Bf16, &randn(len, seed).iter().map(|x| 0.5 * x).collect::<Vec<_>>())
    };
    let cache = bf(batch * t * w, 21)?;
    let q = bf(n * h * dk, 22)?;
    let kv_b = DWeight::from_f32(
        dev,
        DType::Bf16,
        1,
        wkv,
        c,
        &randn(wkv * c, 23).iter().map(|x| 0.05 * x).collect::<Vec<_>>(),
    )?;
    let w_uk = DWeight::from_f32(
        dev,
        DType::Bf16,
        h,
        c,
        dn,
        &randn(h * c * dn, 24).iter().map(|x| 0.05 * x).collect::<Vec<_>>(),
    )?;
    let w_uv = DWeight::from_f32(
        dev,
        DType::Bf16,
        h,
        dv,
        c,
        &randn(h * dv * c, 25).iter().map(|x| 0.05 * x).collect::<Vec<_>>(),
    )?;
    let pairs = batch * t * (t + 1) / 2;
    let (iters, warm) = if pairs * h > 1 << 31 { (3, 1) } else { (10, 2) };
    let label = format!("prefill attn {} b{batch} t{t}", s.name);
    let mut lines = Vec::new();

    // flash: kv_b decompression per sequence, then the kernel
    let segs: Vec<Segment> =
        (0..batch).map(|b| Segment { q_row0: b * t, nq: t, p0: 0, k_row0: b * t, pe_row0: b * t }).collect();
    let mut kv = Act::empty(dev, DType::Bf16, n * wkv)?;
    let decompress = |kv: &mut Act| -> Result<()> {
        for b in 0..batch {
            let shape = GemmShape { a_off: b * t * w, lda: w, c_off: b * t * wkv, ..GemmShape::plain(t, c, wkv) };
            gemm(dev, &cache, &kv_b, kv, &shape)?;
        }
        Ok(())
    };
    let gemm_ms = time_ms(dev, warm, iters, || decompress(&mut kv))?;
    let mut out = Act::empty(dev, DType::Bf16, n * h * dv)?;
    let call = FlashCall {
        h,
        dn,
        dr,
        dv,
        q: &q,
        q_off: 0,
        ld_q: h * dk,
        hs_q: dk,
        k: &kv,
        k_off: 0,
        ld_k: wkv,
        hs_k: dn + dv,
        kpe: &cache,
        kpe_off: c,
        ld_kpe: w,
        v: &kv,
        v_off: dn,
        ld_v: wkv,
        hs_v: dn + dv,
        scale: 1.0 / (dk as f32).sqrt(),
        segs: &segs,
    };
    let auto = flash_variant(dev, &call);
    let var = auto.map_or("none", |v| v.name);
    let flash_ms = time_ms(dev, warm, iters, || flash_attention(dev, &call, &mut out, 0, h * dv, dv))?;
    let flash_tf = call.flops() / (flash_ms * 1e-3) / 1e12;
    lines.push(Line {
        name: format!("{label} flash {var}"),
        ms: flash_ms,
        value: flash_tf,
        unit: "TFLOP/s",
        ceiling,
        ceiling_name: "cuBLAS bf16",
        note: format!(
            "+ kv_b GEMM {gemm_ms:.3} ms ({:.1} TFLOP/s) = {:.3} ms",
            2.0 * (n * c * wkv) as f64 / (gemm_ms * 1e-3) / 1e12,
            flash_ms + gemm_ms
        ),
    });
    // A/B: every other variant that runs these dims
    for v in ATTN_VARIANTS.iter().filter(|v| Some(**v) != auto && flash_fits(dev, v, dn, dr, dv)) {
        let ms = time_ms(dev, warm, iters, || flash_attention_with(dev, v, &call, &mut out, 0, h * dv, dv))?;
        lines.push(Line {
            name: format!("{label} flash {}", v.name),
            ms,
            value: call.flops() / (ms * 1e-3) / 1e12,
            unit: "TFLOP/s",
            ceiling,
            ceiling_name: "cuBLAS bf16",
            note: String::new(),
        });
    }

    // the absorbed path, a query row at a time over its prefix (what prefill ran before)
    let kernel = mla_kernel(dev, DType::Bf16, h, c, dr);
    let slot: Vec<i32> = (0..n).map(|r| (r / t) as i32).collect();
    let lens: Vec<i32> = (0..n).map(|r| (r % t + 1) as i32).collect();
    let (rs, rl) = (upload(dev, &slot)?, upload(dev, &lens)?);
    let splits = mla_splits_for(dev, kernel, n, h, c, dr, t);
    let mut work = if splits > 1 { Some(MlaWork::new(dev, splits, n, h, c)?) } else { None };
    let mut qt = Act::empty(dev, DType::Bf16, n * h * c)?;
    let mut ob = Act::empty(dev, DType::Bf16, n * h * c)?;
    let mut oh = Act::empty(dev, DType::Bf16, n * h * dv)?;
    let sq = GemmShape { lda: h * dk, stride_a: dk, ldc: h * c, stride_c: c, batch: h, ..GemmShape::plain(n, dn, c) };
    let so = GemmShape { lda: h * c, stride_a: c, ldc: h * dv, stride_c: dv, batch: h, ..GemmShape::plain(n, c, dv) };
    let gemms_ms = time_ms(dev, warm, iters, || {
        gemm(dev, &q, &w_uk, &mut qt, &sq)?;
        gemm(dev, &ob, &w_uv, &mut oh, &so)
    })?;
    let mla = MlaCall {
        n,
        h,
        c,
        dr,
        qt: &qt,
        ld_qt: h * c,
        qpe: &q,
        qpe_off: dn,
        ld_qpe: h * dk,
        hs_qpe: dk,
        cache: &cache,
        slots: batch,
        max_len: t,
        row_slot: &rs,
        row_len: &rl,
        scale: 1.0 / (dk as f32).sqrt(),
        splits,
    };
    let abs_ms = time_ms(dev, warm, iters, || mla_decode_with(dev, kernel, &mla, &mut ob, h * c, work.as_mut()))?;
    let abs_flops = 2.0 * (pairs * h * (w + c)) as f64;
    lines.push(Line {
        name: format!("{label} absorbed per-row {} ({splits} splits)", kernel.name()),
        ms: abs_ms,
        value: abs_flops / (abs_ms * 1e-3) / 1e12,
        unit: "TFLOP/s",
        ceiling,
        ceiling_name: "cuBLAS bf16",
        note: format!(
            "+ W_UK/W_UV GEMMs {gemms_ms:.3} ms = {:.3} ms; flash is {:.2}x faster (kernels), {:.2}x (with GEMMs)",
            abs_ms + gemms_ms,
            abs_ms / flash_ms,
            (abs_ms + gemms_ms) / (flash_ms + gemm_ms)
        ),
    });
    Ok(lines)
}

/// Training flash attention (`ops::attn_train`) over `batch` sequences of `t` tokens at shape
/// `s`, the pass's layout: the forward (O and the log-sum-exp) and the deterministic backward
/// (preprocess, dK/dV, dQ, the rope key's reduction). TFLOP/s at FlashAttention-2's count:
/// `2·(dk + dv)` per causal (query, key) pair and head forward, 2.5x that backward (this backward
/// computes S and dP in both of its kernels, so it does more work than it is credited with).
pub fn train_attn_lines(dev: &Device, s: &AttnShape, batch: usize, t: usize, ceiling: f64) -> Result<Vec<Line>> {
    use crate::ops::attn::{FlashCall, Segment};
    use crate::ops::attn_train::{
        flash_train_backward, flash_train_fits, flash_train_forward, flash_train_variant, FlashGrads, Strided,
        StridedMut,
    };
    let AttnShape { h, c, dn, dr, dv, .. } = *s;
    if !flash_train_fits(dev, dn, dr, dv) {
        return Ok(Vec::new());
    }
    let (dk, w, wkv, n) = (dn + dr, c + dr, h * (dn + dv), batch * t);
    let bf = |len: usize, seed: u64| {
        Act::from_f32(dev, DType::Bf16, &randn(len, seed).iter().map(|x| 0.5 * x).collect::<Vec<_>>())
    };
    let (q, kv, ckv, dout) = (bf(n * h * dk, 41)?, bf(n * wkv, 42)?, bf(n * w, 43)?, bf(n * h * dv, 44)?);
    let segs: Vec<Segment> =
        (0..batch).map(|b| Segment { q_row0: b * t, nq: t, p0: 0, k_row0: b * t, pe_row0: b * t }).collect();
    let call = FlashCall {
        h,
        dn,
        dr,
        dv,
        q: &q,
        q_off: 0,
        ld_q: h * dk,
        hs_q: dk,
        k: &kv,
        k_off: 0,
        ld_k: wkv,
        hs_k: dn + dv,
        kpe: &ckv,
        kpe_off: c,
        ld_kpe: w,
        v: &kv,
        v_off: dn,
        ld_v: wkv,
        hs_v: dn + dv,
        scale: 1.0 / (dk as f32).sqrt(),
        segs: &segs,
    };
    let mut o = Act::empty(dev, DType::Bf16, n * h * dv)?;
    let mut lse = crate::tensor::zeros::<f32>(dev, n * h)?;
    let mut dq = Act::empty(dev, DType::Bf16, n * h * dk)?;
    let mut dkv = Act::empty(dev, DType::Bf16, n * wkv)?;
    let mut dckv = Act::empty(dev, DType::Bf16, n * w)?;
    let pairs = batch * t * (t + 1) / 2;
    let (iters, warm) = if pairs * h > 1 << 31 { (3, 1) } else { (10, 2) };
    let fwd_flops = 2.0 * (pairs * h * (dk + dv)) as f64;
    let var = flash_train_variant(dn, dr, dv).map_or("none", |v| v.name);
    let fwd_ms = time_ms(dev, warm, iters, || flash_train_forward(dev, &call, &mut o, 0, h * dv, dv, &mut lse))?;
    let bwd_ms = time_ms(dev, warm, iters, || {
        let g = FlashGrads {
            dq: StridedMut { buf: &mut dq, off: 0, ld: h * dk, hs: dk },
            dkv: &mut dkv,
            dk_off: 0,
            ld_dk: wkv,
            hs_dk: dn + dv,
            dv_off: dn,
            ld_dv: wkv,
            hs_dv: dn + dv,
            dkpe: if dr > 0 { Some((&mut dckv, c, w)) } else { None },
        };
        let os = Strided { buf: &o, off: 0, ld: h * dv, hs: dv };
        let ds = Strided { buf: &dout, off: 0, ld: h * dv, hs: dv };
        flash_train_backward(dev, &call, os, ds, &lse, g)
    })?;
    let label = format!("train attn {} b{batch} t{t} {var}", s.name);
    let line = |what: &str, ms: f64, flops: f64| Line {
        name: format!("{label} {what}"),
        ms,
        value: flops / (ms * 1e-3) / 1e12,
        unit: "TFLOP/s",
        ceiling,
        ceiling_name: "cuBLAS bf16",
        note: String::new(),
    };
    Ok(vec![line("forward", fwd_ms, fwd_flops), line("backward", bwd_ms, 2.5 * fwd_flops)])
}

/// The prefill attention benchmark: both head shapes at batch 1, 4, 8 x 1,024-4,096 tokens,
/// flash against the absorbed per-row path, then the training flash attention's forward and
/// backward ([`train_attn_lines`]); the ceiling is cuBLAS bf16 at 8192^3 in this run (H100
/// datasheet: 989 TFLOP/s dense bf16).
pub fn run_prefill_attn(dev: &Device) -> Result<Vec<Line>> {
    let ceiling = cublas_bf16_tflops(dev, 8192, 8192, 8192)?.unwrap_or(f64::NAN);
    println!("cuBLAS bf16 8192^3: {ceiling:.1} TFLOP/s (the TFLOP/s ceiling of the attention lines)");
    let mut lines = Vec::new();
    for s in &ATTN_SHAPES {
        for (batch, t) in [(1usize, 1024usize), (1, 4096), (4, 2048), (8, 1024), (8, 4096)] {
            for l in prefill_attn_lines(dev, s, batch, t, ceiling)? {
                println!("{l}");
                lines.push(l);
            }
        }
        // the training flash attention (forward with lse, backward)
        for (batch, t) in [(1usize, 4096usize), (4, 2048)] {
            for l in train_attn_lines(dev, s, batch, t, ceiling)? {
                println!("{l}");
                lines.push(l);
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_e4m3_codes_cover_the_range_without_nans() {
        let c = super::random_e4m3(1 << 16, 11);
        assert!(c.iter().all(|&b| b & 0x7f != 0x7f), "a NaN code");
        let mut seen = [false; 256];
        c.iter().for_each(|&b| seen[b as usize] = true);
        // all 254 non-NaN codes appear in 64k draws, and the seed matters
        assert_eq!(seen.iter().filter(|&&s| s).count(), 254);
        assert_ne!(c[..64], super::random_e4m3(64, 12)[..]);
    }
}
