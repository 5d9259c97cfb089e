//! Writing safetensors files.
use crate::error::{Error, Result};
use crate::weights::DType;
use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OutTensor {
    /// An f32 tensor.
    pub fn f32(name: &str, shape: &[usize], v: &[f32]) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }
    /// An i64 tensor.
    pub fn i64(name: &str, shape: &[usize], v: &[i64]) -> OutTensor {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        OutTensor { name: name.into(), dtype: DType::I64, shape: shape.to_vec(), data }
    }
}

impl safetensors::View for &OutTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_st()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serializes tensors into the bytes of a safetensors file.
pub fn to_bytes(tensors: &[OutTensor]) -> Result<Vec<u8>> {
    for t in tensors {
        if t.shape.iter().product::<usize>() * t.dtype.size() != t.data.len() {
            return Err(Error::Input(format!("tensor '{}': data length does not match shape {:?}", t.name, t.shape)));
        }
    }
    safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), None)
        .map_err(|e| Error::Io(format!("serializing safetensors: {e}")))
}
