//! Model directories on disk (std): `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped; atomic file writes.
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::TensorStore;
use alloc::sync::Arc;
use std::collections::BTreeSet;
use std::format;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

fn io_err(path: &Path, e: impl core::fmt::Display) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

/// Reads and parses `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<Config> {
    let p = dir.join("config.json");
    let text = fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
    Config::from_json_str(&text, &p.display().to_string())
}

/// Memory-maps (or, for an empty file, reads) one file.
pub fn map_file(path: &Path) -> Result<crate::weights::Blob> {
    let f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    if len == 0 {
        return Ok(Arc::new(Vec::<u8>::new()));
    }
    // SAFETY: the map is read-only; a file truncated by another process while mapped is
    // outside what we can guard against (as for every mmap-based loader).
    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io_err(path, e))?;
    Ok(Arc::new(m))
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| io_err(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| io_err(&index, "missing object 'weight_map'"))?;
        let mut files = BTreeSet::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| io_err(&index, format!("weight_map['{name}'] is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(io_err(&index, format!("weight_map['{name}'] = '{f}' is not a plain file name")));
            }
            files.insert(f.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(std::vec![single]);
    }
    let mut all: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(io_err(dir, "no model.safetensors, model.safetensors.index.json or *.safetensors file"));
    }
    Ok(all)
}

/// Opens every weight file of `dir` into one [`TensorStore`]. With an index, each tensor the
/// index names must be in the shard it names.
pub fn open_store(dir: &Path) -> Result<TensorStore> {
    let mut store = TensorStore::new();
    for f in weight_files(dir)? {
        let blob = map_file(&f)?;
        store.add_file(blob, &f.display().to_string())?;
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| io_err(&index, e))?;
        if let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) {
            for (name, f) in map {
                match store.get(name) {
                    None => {
                        return Err(Error::Weights {
                            tensor: name.clone(),
                            msg: format!("listed in {} but missing from {}", index.display(), f),
                        })
                    }
                    Some(t) if !t.file.ends_with(f.as_str().unwrap_or("")) => {
                        return Err(Error::Weights {
                            tensor: name.clone(),
                            msg: format!("index says {} but found in {}", f, t.file),
                        })
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(store)
}

/// Reads one safetensors file into a store (for inputs such as `input_ids`).
pub fn read_safetensors(path: &Path) -> Result<TensorStore> {
    let mut s = TensorStore::new();
    s.add_file(map_file(path)?, &path.display().to_string())?;
    Ok(s)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, and
/// fsync of the directory. On failure the previous file (if any) is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| io_err(path, "not a file path"))?;
    let mut tmp_name = String::from(".");
    tmp_name.push_str(&name.to_string_lossy());
    tmp_name.push_str(&format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}
