//! Device buffers: [`Act`] (activations, f32 or bf16) and [`DWeight`] (a GEMM weight `[groups, n, k]`
//! in f32, bf16, or FP8 E4M3 codes with 128x128 block scales).
use crate::device::{cuda_err, Device};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use dsv3_core::{Error, Result};
use half::bf16;

/// Element type of activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// The raw device address of element `offset` of `s` (checked against its length).
pub fn dptr<T>(dev: &Device, s: &CudaSlice<T>, offset: usize) -> Result<u64> {
    if offset > s.len() {
        return Err(Error::Input(format!("device offset {offset} past a buffer of {}", s.len())));
    }
    let (p, _sync) = s.device_ptr(&dev.stream);
    Ok(p + (offset * std::mem::size_of::<T>()) as u64)
}

/// Uploads `v`.
pub fn upload<T: DeviceRepr>(dev: &Device, v: &[T]) -> Result<CudaSlice<T>> {
    dev.stream.clone_htod(v).map_err(|e| cuda_err("upload", e))
}

/// Downloads `s`.
pub fn download<T: DeviceRepr + Default + Clone>(dev: &Device, s: &CudaSlice<T>) -> Result<Vec<T>> {
    dev.stream.clone_dtoh(s).map_err(|e| cuda_err("download", e))
}

/// Downloads every buffer of `bufs` with one host round trip: device-to-device copies into one
/// staging buffer, then one download (the training pass's per-step scalars: one wait for the
/// stream instead of one per buffer).
pub fn download_all<T: DeviceRepr + Default + Clone>(dev: &Device, bufs: &[&CudaSlice<T>]) -> Result<Vec<Vec<T>>> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if total == 0 {
        return Ok(bufs.iter().map(|_| Vec::new()).collect());
    }
    let mut stage = empty::<T>(dev, total)?;
    let mut at = 0;
    for b in bufs {
        let n = b.len();
        dev.stream.memcpy_dtod(*b, &mut stage.slice_mut(at..at + n)).map_err(|e| cuda_err("gathering downloads", e))?;
        at += n;
    }
    let host = download(dev, &stage)?;
    let mut out = Vec::with_capacity(bufs.len());
    let mut at = 0;
    for b in bufs {
        out.push(host[at..at + b.len()].to_vec());
        at += b.len();
    }
    Ok(out)
}

/// `n` zeroed elements.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &Device, n: usize) -> Result<CudaSlice<T>> {
    dev.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| cuda_err(&format!("allocating {n} elements"), e))
}

/// `n` elements left unwritten: for buffers a kernel overwrites in full before anything reads
/// them (saves the memset, a node of its own in a captured CUDA graph).
pub fn empty<T: DeviceRepr>(dev: &Device, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is only handed to kernels that write every element before any read
    // (each such kernel's test runs it on a NaN-poisoned output); the host never reads it first.
    unsafe { dev.stream.alloc::<T>(n.max(1)) }.map_err(|e| cuda_err(&format!("allocating {n} elements"), e))
}

/// An activation buffer.
pub enum Act {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Act {
    /// `n` zeros of `dtype`.
    pub fn zeros(dev: &Device, dtype: DType, n: usize) -> Result<Act> {
        Ok(match dtype {
            DType::F32 => Act::F32(zeros(dev, n)?),
            DType::Bf16 => Act::Bf16(zeros(dev, n)?),
        })
    }

    /// `n` unwritten elements of `dtype` (see [`empty`]): only for outputs a kernel fills in full.
    pub fn empty(dev: &Device, dtype: DType, n: usize) -> Result<Act> {
        Ok(match dtype {
            DType::F32 => Act::F32(empty(dev, n)?),
            DType::Bf16 => Act::Bf16(empty(dev, n)?),
        })
    }

    /// Uploads `v` as `dtype` (bf16: round to nearest even).
    pub fn from_f32(dev: &Device, dtype: DType, v: &[f32]) -> Result<Act> {
        Ok(match dtype {
            DType::F32 => Act::F32(upload(dev, v)?),
            DType::Bf16 => Act::Bf16(upload(dev, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?),
        })
    }

    /// The values as f32 on the host.
    pub fn to_f32(&self, dev: &Device) -> Result<Vec<f32>> {
        Ok(match self {
            Act::F32(s) => download(dev, s)?,
            Act::Bf16(s) => download(dev, s)?.into_iter().map(|x| x.to_f32()).collect(),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Act::F32(_) => DType::F32,
            Act::Bf16(_) => DType::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Act::F32(s) => s.len(),
            Act::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device address of element `offset`.
    pub fn ptr(&self, dev: &Device, offset: usize) -> Result<u64> {
        match self {
            Act::F32(s) => dptr(dev, s, offset),
            Act::Bf16(s) => dptr(dev, s, offset),
        }
    }

    /// Checks that elements `[0, need)` exist.
    pub fn check(&self, need: usize, what: &str) -> Result<()> {
        if need > self.len() {
            return Err(Error::Input(format!("{what}: needs {need} elements, the buffer has {}", self.len())));
        }
        Ok(())
    }
}

/// Storage of a [`DWeight`].
pub enum WeightBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
    /// E4M3 codes `[groups, n, k]` and f32 scales `[groups, ceil(n/128), ceil(k/128)]`.
    Fp8 {
        q: CudaSlice<u8>,
        scale: CudaSlice<f32>,
    },
}

/// A GEMM weight: `groups` matrices `[n, k]` (row-major, `y = x · Wᵀ`).
pub struct DWeight {
    pub groups: usize,
    pub n: usize,
    pub k: usize,
    pub buf: WeightBuf,
}

impl DWeight {
    /// Uploads f32 values `[groups, n, k]` as f32 or bf16.
    pub fn from_f32(dev: &Device, dtype: DType, groups: usize, n: usize, k: usize, w: &[f32]) -> Result<DWeight> {
        if w.len() != groups * n * k {
            return Err(Error::Input(format!("weight of {} values is not [{groups}, {n}, {k}]", w.len())));
        }
        let buf = match Act::from_f32(dev, dtype, w)? {
            Act::F32(s) => WeightBuf::F32(s),
            Act::Bf16(s) => WeightBuf::Bf16(s),
        };
        Ok(DWeight { groups, n, k, buf })
    }

    /// Uploads E4M3 codes `[groups, n, k]` with their 128x128 block scales
    /// `[groups, ceil(n/128), ceil(k/128)]`.
    pub fn from_fp8(dev: &Device, groups: usize, n: usize, k: usize, q: &[u8], scale: &[f32]) -> Result<DWeight> {
        let sl = groups * n.div_ceil(128) * k.div_ceil(128);
        if q.len() != groups * n * k || scale.len() != sl {
            return Err(Error::Input(format!(
                "FP8 weight [{groups}, {n}, {k}] needs {} codes and {sl} scales, got {} and {}",
                groups * n * k,
                q.len(),
                scale.len()
            )));
        }
        Ok(DWeight { groups, n, k, buf: WeightBuf::Fp8 { q: upload(dev, q)?, scale: upload(dev, scale)? } })
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        match &self.buf {
            WeightBuf::F32(s) => s.len() * 4,
            WeightBuf::Bf16(s) => s.len() * 2,
            WeightBuf::Fp8 { q, scale } => q.len() + scale.len() * 4,
        }
    }
}
