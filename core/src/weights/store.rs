//! [`TensorStore`]: the named tensors of a checkpoint, zero-copy views into the file bytes.
use crate::error::{werr, Error, Result};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use safetensors::{Dtype, SafeTensors};

/// The bytes of one whole safetensors file (a memory map, or an owned buffer).
pub type Blob = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// The element types dsv3 reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// `float8_e4m3fn`.
    F8E4M3,
    I64,
    I32,
    U32,
    U16,
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::BF16 | DType::F16 | DType::U16 => 2,
            DType::F8E4M3 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }
    fn from_st(d: Dtype) -> Option<DType> {
        Some(match d {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F8_E4M3 => DType::F8E4M3,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::U32 => DType::U32,
            Dtype::U16 => DType::U16,
            Dtype::U8 => DType::U8,
            _ => return None,
        })
    }
    /// The safetensors dtype.
    pub fn to_st(self) -> Dtype {
        match self {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            DType::F8E4M3 => Dtype::F8_E4M3,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::U32 => Dtype::U32,
            DType::U16 => Dtype::U16,
            DType::U8 => Dtype::U8,
        }
    }
}

/// One tensor: dtype, shape, and a byte range of a shared [`Blob`].
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The file it came from (for messages).
    pub file: String,
    blob: Blob,
    off: usize,
    len: usize,
}

impl core::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "RawTensor({} {:?} {:?} in {})", self.name, self.dtype, self.shape, self.file)
    }
}

impl RawTensor {
    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.blob).as_ref()[self.off..self.off + self.len]
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Errors unless the shape is exactly `want`.
    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(werr(
                &self.name,
                format!("expected shape {:?}, found {:?} in {}", want, self.shape, self.file),
            ));
        }
        Ok(())
    }
    /// Converts a float tensor (f32, bf16, f16) to f32; NaN or infinity is an error.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes();
        let v: Vec<f32> = match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => {
                return Err(werr(
                    &self.name,
                    format!("dtype {d:?} cannot be read as floats here (expected F32, BF16 or F16) in {}", self.file),
                ))
            }
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(werr(&self.name, format!("non-finite value {} at flat index {i} in {}", v[i], self.file)));
        }
        Ok(v)
    }
    /// Converts an integer tensor (i64, i32, u32, u16) to i64.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::U8 => b.iter().map(|&c| c as i64).collect(),
            d => return Err(werr(&self.name, format!("expected an integer dtype, found {d:?} in {}", self.file))),
        })
    }
}

/// The tensors of one checkpoint (all shards), by name.
#[derive(Default)]
pub struct TensorStore {
    map: BTreeMap<String, RawTensor>,
}

impl TensorStore {
    /// An empty store.
    pub fn new() -> TensorStore {
        TensorStore::default()
    }

    /// Parses one safetensors file's bytes and adds its tensors. `file` names it in errors.
    /// A truncated or malformed file, an unsupported dtype, or a name already present is an error.
    pub fn add_file(&mut self, blob: Blob, file: &str) -> Result<()> {
        let bytes: &[u8] = (*blob).as_ref();
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Weights {
            tensor: file.to_string(),
            msg: format!("malformed safetensors file: {e}"),
        })?;
        let base = bytes.as_ptr() as usize;
        for (name, view) in st.iter() {
            let dtype = DType::from_st(view.dtype())
                .ok_or_else(|| werr(name, format!("unsupported dtype {:?} in {file}", view.dtype())))?;
            let data = view.data();
            if self.map.contains_key(name) {
                return Err(werr(name, format!("appears twice (again in {file})")));
            }
            let t = RawTensor {
                name: name.to_string(),
                dtype,
                shape: view.shape().to_vec(),
                file: file.to_string(),
                blob: blob.clone(),
                off: data.as_ptr() as usize - base,
                len: data.len(),
            };
            self.map.insert(name.to_string(), t);
        }
        Ok(())
    }

    /// Adds an owned buffer holding a whole safetensors file.
    pub fn add_bytes(&mut self, bytes: Vec<u8>, file: &str) -> Result<()> {
        self.add_file(Arc::new(bytes), file)
    }

    /// Looks a tensor up without removing it.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.map.get(name)
    }

    /// Whether the store has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Removes and returns a tensor; a missing one is an error naming it.
    pub fn take(&mut self, name: &str) -> Result<RawTensor> {
        self.map.remove(name).ok_or_else(|| werr(name, "missing from the checkpoint"))
    }

    /// Removes a tensor and converts it to f32, checking its shape.
    pub fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.take(name)?;
        t.expect_shape(shape)?;
        t.to_f32()
    }

    /// Names still in the store.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    /// Number of tensors still in the store.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Errors if any tensor was not taken (an extra tensor the model does not use).
    pub fn expect_empty(&self) -> Result<()> {
        match self.map.values().next() {
            None => Ok(()),
            Some(t) => {
                let n = self.map.len();
                Err(werr(&t.name, format!("unexpected tensor in {} ({n} unused tensor(s) in the checkpoint)", t.file)))
            }
        }
    }
}
