//! Helpers shared by the integration tests.
#![allow(dead_code)]
use dsv3::model::{LoadOptions, Model};
use dsv3::weights::file::read_safetensors;
use std::path::PathBuf;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn load(name: &str, opts: LoadOptions) -> Model {
    Model::load(&fixture(name), opts).unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

/// A tensor of `tests/fixtures/<name>/golden.safetensors` as (shape, f32 values), if present.
pub fn golden_f32(name: &str, tensor: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    let st = read_safetensors(&fixture(name).join("golden.safetensors")).unwrap();
    st.get(tensor).map(|t| (t.shape.clone(), t.to_f32().unwrap()))
}

/// An integer tensor of the golden file as rows of token ids.
pub fn golden_ids(name: &str, tensor: &str) -> Option<Vec<Vec<u32>>> {
    let st = read_safetensors(&fixture(name).join("golden.safetensors")).unwrap();
    st.get(tensor).map(|t| {
        let v = t.to_i64().unwrap();
        v.chunks(t.shape[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect()
    })
}

/// `max |a - b| / max |b|`: the error measure.
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    err / scale.max(1e-30)
}
