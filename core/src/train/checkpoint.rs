//! Checkpoints: a directory HF transformers loads (`config.json` + `model.safetensors`, the
//! checkpoint's own tensor names) plus `optimizer.safetensors` (AdamW moments `m.<name>`,
//! `v.<name>`) and `trainer_state.json` (step, Adam step, user state such as the data cursor and
//! RNG). Written atomically: everything goes into a temporary sibling directory, each file is
//! fsynced, then the directory replaces the old one by renames; a failure at any point leaves
//! the previous checkpoint intact.
use crate::error::Result;
use crate::model::block::Ffn;
use crate::model::Model;
use crate::train::trainer::Trainer;
use crate::weights::init::tensor_specs;
use crate::weights::write::OutTensor;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

impl Model {
    /// Every tensor of the model under its checkpoint name and shape (trainable tensors,
    /// router correction biases, and the MTP modules' copies of the embedding and head).
    pub fn export_tensors(&mut self) -> Vec<OutTensor> {
        let shapes: BTreeMap<String, Vec<usize>> =
            tensor_specs(&self.cfg).into_iter().map(|(n, s, _)| (n, s)).collect();
        let mut out = Vec::new();
        self.visit(&mut |n, t| {
            let shape = shapes.get(n).cloned().unwrap_or_else(|| alloc::vec![t.len()]);
            out.push(OutTensor::f32(n, &shape, t));
        });
        for (i, l) in self.layers.iter().enumerate() {
            if let Ffn::Moe(m) = &l.ffn {
                if let Some(b) = &m.router.bias {
                    out.push(OutTensor::f32(
                        &format!("model.layers.{i}.mlp.gate.e_score_correction_bias"),
                        &[b.len()],
                        b,
                    ));
                }
            }
        }
        let (l, v, d) = (self.cfg.num_hidden_layers, self.cfg.vocab_size, self.cfg.hidden_size);
        for (k, m) in self.mtp.iter().enumerate() {
            if let Ffn::Moe(moe) = &m.block.ffn {
                if let Some(b) = &moe.router.bias {
                    out.push(OutTensor::f32(
                        &format!("model.layers.{}.mlp.gate.e_score_correction_bias", l + k),
                        &[b.len()],
                        b,
                    ));
                }
            }
            out.push(OutTensor::f32(&format!("model.layers.{}.embed_tokens.weight", l + k), &[v, d], &self.embed));
            out.push(OutTensor::f32(
                &format!("model.layers.{}.shared_head.head.weight", l + k),
                &[v, d],
                &self.lm_head.dense(),
            ));
        }
        out
    }
}

impl Trainer {
    /// The optimizer moments as tensors `m.<name>` / `v.<name>`.
    pub fn optimizer_tensors(&mut self) -> Vec<OutTensor> {
        let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        self.model.visit(&mut |n, t| {
            shapes.insert(String::from(n), alloc::vec![t.len()]);
        });
        let mut out = Vec::new();
        for (i, n) in self.opt.names.iter().enumerate() {
            out.push(OutTensor::f32(&format!("m.{n}"), &[self.opt.m[i].len()], &self.opt.m[i]));
            out.push(OutTensor::f32(&format!("v.{n}"), &[self.opt.v[i].len()], &self.opt.v[i]));
        }
        out
    }

    /// Restores the optimizer moments from `optimizer.safetensors` bytes.
    pub fn load_optimizer(&mut self, store: &mut crate::weights::TensorStore, adam_t: u64) -> Result<()> {
        let mut names = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        let mut err = None;
        self.model.visit(&mut |n, t| {
            if err.is_some() {
                return;
            }
            let mut get = |k: String| -> Result<Vec<f32>> { store.take_f32(&k, &[t.len()]) };
            match (get(format!("m.{n}")), get(format!("v.{n}"))) {
                (Ok(a), Ok(b)) => {
                    names.push(String::from(n));
                    m.push(a);
                    v.push(b);
                }
                (Err(e), _) | (_, Err(e)) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        store.expect_empty()?;
        self.opt.names = names;
        self.opt.m = m;
        self.opt.v = v;
        self.opt.t = adam_t;
        Ok(())
    }
}

/// Where a test makes [`save`] fail (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// After the model file is written into the temporary directory.
    AfterModel,
    /// Right before the final rename.
    BeforeRename,
}

/// Writes a checkpoint of `tr` to `dir` atomically. `state` is extra JSON (data cursor, RNG)
/// stored in `trainer_state.json` under `"user"`.
#[cfg(feature = "std")]
pub fn save(tr: &mut Trainer, dir: &std::path::Path, state: serde_json::Value, fault: Fault) -> Result<()> {
    use crate::error::{ierr, Error};
    use crate::weights::write::to_bytes;
    use std::fs;
    let io = |p: &std::path::Path, e: std::io::Error| Error::Io(format!("{}: {e}", p.display()));
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let name =
        dir.file_name().ok_or_else(|| ierr(format!("{}: not a directory path", dir.display())))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let write = |file: &str, bytes: &[u8]| -> Result<()> {
            let p = tmp.join(file);
            let mut f = fs::File::create(&p).map_err(|e| io(&p, e))?;
            std::io::Write::write_all(&mut f, bytes).map_err(|e| io(&p, e))?;
            f.sync_all().map_err(|e| io(&p, e))
        };
        write("model.safetensors", &to_bytes(&tr.model.export_tensors())?)?;
        if fault == Fault::AfterModel {
            return Err(Error::Io("injected failure after the model file".into()));
        }
        let cfg = serde_json::to_string_pretty(&tr.model.cfg.to_json()).map_err(|e| Error::Io(format!("{e}")))?;
        write("config.json", cfg.as_bytes())?;
        write("optimizer.safetensors", &to_bytes(&tr.optimizer_tensors())?)?;
        let ts = serde_json::json!({
            "step": tr.step,
            "adam_t": tr.opt.t,
            "adam": {"beta1": tr.opt.beta1, "beta2": tr.opt.beta2, "eps": tr.opt.eps, "weight_decay": tr.opt.weight_decay, "bf16_moments": tr.opt.bf16_moments},
            "user": state,
        });
        write("trainer_state.json", serde_json::to_string_pretty(&ts).unwrap().as_bytes())?;
        if let Ok(d) = fs::File::open(&tmp) {
            let _ = d.sync_all();
        }
        if fault == Fault::BeforeRename {
            return Err(Error::Io("injected failure before the rename".into()));
        }
        // swap: dir → old, tmp → dir, drop old
        let had_old = dir.exists();
        if had_old {
            fs::rename(dir, &old).map_err(|e| io(dir, e))?;
        }
        if let Err(e) = fs::rename(&tmp, dir) {
            if had_old {
                let _ = fs::rename(&old, dir);
            }
            return Err(io(dir, e));
        }
        if let Ok(d) = fs::File::open(&parent) {
            let _ = d.sync_all();
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Loads a checkpoint written by [`save`]: the trainer (model, optimizer, step) and the user
/// state. `cfg` supplies the training hyper-parameters.
#[cfg(feature = "std")]
pub fn load(dir: &std::path::Path, cfg: crate::train::TrainConfig) -> Result<(Trainer, serde_json::Value)> {
    use crate::error::Error;
    use crate::model::LoadOptions;
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
    let ts: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: not valid JSON: {e}", p.display())))?;
    let num = |k: &str| {
        ts.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::Io(format!("{}: missing '{k}'", p.display())))
    };
    let (step, adam_t) = (num("step")?, num("adam_t")?);
    let a = ts.get("adam").cloned().unwrap_or_default();
    let f = |k: &str, d: f64| a.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let mut opt = crate::train::AdamW::new(f("beta1", 0.9), f("beta2", 0.95), f("eps", 1e-8), f("weight_decay", 0.1));
    opt.bf16_moments = a.get("bf16_moments").and_then(|v| v.as_bool()).unwrap_or(false);
    let model = Model::load(dir, LoadOptions { attn: crate::model::AttnForm::Absorbed, ..Default::default() })?;
    let mut tr = Trainer::new(model, opt, cfg);
    tr.step = step;
    let mut store = crate::weights::file::read_safetensors(&dir.join("optimizer.safetensors"))?;
    tr.load_optimizer(&mut store, adam_t)?;
    Ok((tr, ts.get("user").cloned().unwrap_or(serde_json::Value::Null)))
}
