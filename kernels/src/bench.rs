//! Kernel benchmarks for a GPU session: each prints achieved TFLOP/s or GB/s next to the
//! ceiling measured in the same run (device-to-device copy bandwidth) and, for GEMMs, cuBLAS on
//! the same shape. Timed with CUDA events over repeated launches after a warm-up.
use crate::device::{cuda_err, Device};
use crate::ops::gemm::{gemm, GemmShape};
use crate::ops::mla::{mla_decode, MlaCall, MlaWork};
use crate::tensor::{upload, zeros, Act, DType, DWeight};
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
}

impl core::fmt::Display for Line {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:<44} {:>9.3} ms  {:>8.1} {}  ({:>5.1}% of {} {:.1})",
            self.name,
            self.ms,
            self.value,
            self.unit,
            100.0 * self.value / self.ceiling.max(1e-9),
            self.ceiling_name,
            self.ceiling
        )
    }
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = dsv3_core::rng::Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// cuBLAS bf16 GEMM (f32 compute) TFLOP/s on `C[m,n] = A[m,k]·W[n,k]ᵀ`; `None` without libcublas.
pub fn cublas_bf16_tflops(dev: &Device, m: usize, n: usize, k: usize) -> Result<Option<f64>> {
    use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
    // SAFETY: only tries to dlopen the library
    if !std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false) {
        return Ok(None);
    }
    let blas = CudaBlas::new(dev.stream.clone()).map_err(|e| cuda_err("cuBLAS", e))?;
    let a = zeros::<half::bf16>(dev, m * k)?;
    let w = zeros::<half::bf16>(dev, n * k)?;
    let mut c = zeros::<half::bf16>(dev, m * n)?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: half::bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: half::bf16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: buffers sized for the column-major view of the row-major product above
    let ms = time_ms(dev, 3, 10, || unsafe { blas.gemm(cfg, &w, &a, &mut c) }.map_err(|e| cuda_err("cuBLAS gemm", e)))?;
    Ok(Some(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12))
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
    Ok(Line {
        name: format!("gemm {} {m}x{n}x{k}", if fp8 { "fp8-weights" } else { "bf16" }),
        ms,
        value: tflops,
        unit: "TFLOP/s",
        ceiling: peer,
        ceiling_name: "cuBLAS bf16",
    })
}

/// Absorbed MLA decode at FlashMLA's shapes: `batch` sequences of `len` cached tokens, `h` heads,
/// latent `c` + rope `dr`; bandwidth counts the cache bytes read once per step.
pub fn mla_line(dev: &Device, batch: usize, len: usize, h: usize, c: usize, dr: usize, copy_gbs: f64) -> Result<Line> {
    let w = c + dr;
    let cache = Act::from_f32(dev, DType::Bf16, &randn(batch * len * w, 3))?;
    let qt = Act::from_f32(dev, DType::Bf16, &randn(batch * h * c, 4))?;
    let qpe = Act::from_f32(dev, DType::Bf16, &randn(batch * h * dr, 5))?;
    let slot: Vec<i32> = (0..batch as i32).collect();
    let lens = vec![len as i32; batch];
    let (rs, rl) = (upload(dev, &slot)?, upload(dev, &lens)?);
    let blocks = batch * h.div_ceil(crate::ops::mla::MLA_HB);
    let splits = (2 * dev.sms).div_ceil(blocks).clamp(1, len.div_ceil(256).max(1));
    let mut work = MlaWork::new(dev, splits, batch, h, c)?;
    let mut out = Act::zeros(dev, DType::Bf16, batch * h * c)?;
    let call = MlaCall {
        n: batch,
        h,
        c,
        dr,
        qt: &qt,
        ld_qt: h * c,
        qpe: &qpe,
        qpe_off: 0,
        ld_qpe: h * dr,
        hs_qpe: dr,
        cache: &cache,
        slots: batch,
        max_len: len,
        row_slot: &rs,
        row_len: &rl,
        scale: 0.1,
        splits,
    };
    let ms = time_ms(dev, 3, 20, || mla_decode(dev, &call, &mut out, h * c, Some(&mut work)))?;
    let bytes = (batch * len * w * 2) as f64;
    Ok(Line {
        name: format!("mla decode b{batch} len{len} h{h} d{w}/{c} ({splits} splits)"),
        ms,
        value: bytes / (ms * 1e-3) / 1e9,
        unit: "GB/s",
        ceiling: copy_gbs,
        ceiling_name: "copy GB/s",
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
    for (m, n, k) in [(8192, 8192, 8192), (4096, 7168, 2048), (128, 7168, 2048), (1, 32000, 512)] {
        for fp8 in [false, true] {
            let l = gemm_line(dev, m, n, k, fp8)?;
            println!("{l}");
            lines.push(l);
        }
    }
    for h in [16usize, 128] {
        let l = mla_line(dev, 128, 4096, h, 512, 64, copy)?;
        println!("{l}");
        lines.push(l);
    }
    let l = mla_line(dev, 1, 4096, 16, 512, 64, copy)?;
    println!("{l}");
    lines.push(l);
    Ok(lines)
}
