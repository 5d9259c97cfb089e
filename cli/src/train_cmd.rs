//! `dsv3 train`: data loading, the training loop with a progress bar, metrics JSONL, periodic
//! atomic checkpoints, and a loss-curve SVG at the end. `--device cuda[:N]` runs the steps on a
//! GPU (dsv3-kernels' `CudaTrainer`); checkpoints still go through core (`CudaTrainer::to_core`,
//! then `checkpoint::save`), so they are the same files as the CPU path writes.
use crate::cuda_cmd::DeviceArgs;
use crate::plot;
use dsv3_core::model::linear::Precision;
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::rng::Rng;
use dsv3_core::train::checkpoint::{self, Fault};
use dsv3_core::train::data::{Dataset, Loader};
use dsv3_core::train::{AdamW, LrSchedule, StepMetrics, TrainConfig, Trainer};
use dsv3_core::{Error, Result};
use dsv3_ffi::tokenizer::Tok;
use dsv3_kernels::train::CudaTrainer;
use dsv3_kernels::DType;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Start from a preset with random weights (tiny, bench-4m, bench-88m) ...
    #[arg(long, conflicts_with_all = ["model", "resume"])]
    pub preset: Option<String>,
    /// ... or from a model directory (fine-tuning) ...
    #[arg(long, conflicts_with = "resume")]
    pub model: Option<PathBuf>,
    /// ... or resume a checkpoint written by dsv3 train (model, optimizer, data position).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Training data file.
    #[arg(long)]
    pub data: PathBuf,
    /// text (whole file), jsonl ({"text"} per line), sft ({"prompt","completion"} per line:
    /// loss on completion tokens only), u16 / u32 (pre-tokenized little-endian ids), or auto (by extension).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// tokenizer.json (default: MODEL/tokenizer.json; byte-level models use the built-in one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory: checkpoint/, metrics.jsonl, loss.svg.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Final learning rate of the cosine schedule (default lr/10).
    #[arg(long)]
    pub min_lr: Option<f32>,
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// cosine (warmup + cosine), constant, or v3 (DeepSeek-V3's step schedule).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// Auxiliary-loss-free bias update speed γ (0 = off).
    #[arg(long, default_value_t = 0.001)]
    pub bias_update_speed: f32,
    /// Complementary sequence-wise balance loss α.
    #[arg(long, default_value_t = 0.0001)]
    pub seq_aux_alpha: f32,
    /// Conventional auxiliary balance loss weight (0 = off; compare with the bias update).
    #[arg(long, default_value_t = 0.0)]
    pub aux_loss_alpha: f32,
    /// GEMM precision of the decoder's linear layers: f32, bf16, or fp8 (DeepSeek-V3's recipe,
    /// emulated exactly on CPU; with --device cuda the FP8 kernels, same recipe: f32 or fp8 there,
    /// the GPU's bf16 being --dtype bf16). Master weights and gradients stay f32.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// AdamW moment storage: f32 or bf16 (DeepSeek-V3).
    #[arg(long, default_value = "f32")]
    pub adam_moments: String,
    /// MTP modules to add to a fresh `--preset` model (DeepSeek-V3 uses 1).
    #[arg(long, default_value_t = 0)]
    pub mtp_depth: usize,
    /// MTP loss weight λ (used when the model has MTP modules).
    #[arg(long, default_value_t = 0.3)]
    pub mtp_lambda: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar (one log line every `--log-every` steps instead).
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Train through a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev): the model split
    /// into stages, one thread per rank; the `--accumulate` micro-batches of a step flow through
    /// it (raised to the schedule's minimum, e.g. 2·PP for DualPipe). Same gradients as without.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Pipeline ranks for `--pipeline`.
    #[arg(long, default_value_t = 2)]
    pub pp: usize,
    /// `--device cuda[:N]` trains on a GPU; `--dtype bf16` (bf16 activations and GEMMs, f32
    /// master weights and gradients) or f32 (the CPU oracle's math).
    #[command(flatten)]
    pub dev: DeviceArgs,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let min_lr = self.min_lr.unwrap_or(self.lr / 10.0);
        let schedule = match self.schedule.as_str() {
            "cosine" => LrSchedule::WarmupCosine { lr: self.lr, min_lr, warmup: self.warmup, total: self.steps },
            "constant" => LrSchedule::Constant { lr: self.lr },
            "v3" => LrSchedule::DeepSeekV3 { lr: self.lr, warmup: self.warmup, total: self.steps },
            o => return Err(Error::Input(format!("--schedule must be cosine, constant or v3, got '{o}'"))),
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Input(format!("--lr must be positive, got {}", self.lr)));
        }
        if self.batch == 0 || self.accumulate == 0 || self.seq_len < 2 || self.steps == 0 {
            return Err(Error::Input("--batch, --accumulate, --steps must be positive and --seq-len >= 2".into()));
        }
        Ok(TrainConfig {
            schedule,
            clip_norm: (self.clip > 0.0).then_some(self.clip),
            bias_update_speed: self.bias_update_speed,
            seq_aux_alpha: self.seq_aux_alpha,
            aux_loss_alpha: self.aux_loss_alpha,
            mtp_lambda: self.mtp_lambda,
            precision: match self.precision.as_str() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16,
                "fp8" => Precision::Fp8,
                o => return Err(Error::Input(format!("--precision must be f32, bf16 or fp8, got '{o}'"))),
            },
        })
    }

    fn adam(&self) -> Result<AdamW> {
        let mut o = AdamW::new(0.9, 0.95, 1e-8, self.weight_decay);
        o.bf16_moments = match self.adam_moments.as_str() {
            "f32" => false,
            "bf16" => true,
            x => return Err(Error::Input(format!("--adam-moments must be f32 or bf16, got '{x}'"))),
        };
        Ok(o)
    }
}

/// Reads and tokenizes the training data.
pub fn load_data(path: &Path, format: &str, tk: Option<&Tok>, cfg: &dsv3_core::Config) -> Result<Dataset> {
    let io = |e: std::io::Error| Error::Io(format!("{}: {e}", path.display()));
    let fmt = match format {
        "auto" => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => "jsonl",
            Some("u16") => "u16",
            Some("u32") | Some("bin") => "u32",
            _ => "text",
        },
        f => f,
    };
    let eos = cfg.eos_token_ids.first().copied();
    let need_tok = || tk.ok_or_else(|| Error::Input(dsv3_ffi::tokenizer::NO_TOKENIZER.into()));
    let with_eos = |mut v: Vec<u32>| {
        v.extend(eos);
        v
    };
    match fmt {
        "u16" | "u32" => {
            Dataset::tokens_from_bytes(&std::fs::read(path).map_err(io)?, if fmt == "u16" { 2 } else { 4 })
                .map(Dataset::Stream)
        }
        "text" => Ok(Dataset::Stream(with_eos(need_tok()?.encode(&std::fs::read_to_string(path).map_err(io)?)?))),
        "jsonl" | "sft" => {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let t = need_tok()?;
            let mut stream = Vec::new();
            let mut sft = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::Input(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1)))?;
                let field = |k: &str| {
                    v.get(k).and_then(|x| x.as_str()).ok_or_else(|| {
                        Error::Input(format!("{}:{}: missing string field \"{k}\"", path.display(), i + 1))
                    })
                };
                if fmt == "jsonl" && v.get("prompt").is_none() {
                    stream.extend(with_eos(t.encode(field("text")?)?));
                } else {
                    sft.push((t.encode(field("prompt")?)?, with_eos(t.encode_plain(field("completion")?)?)));
                }
            }
            match (sft.is_empty(), stream.is_empty()) {
                (false, true) => Ok(Dataset::Sft(sft)),
                (true, false) => Ok(Dataset::Stream(stream)),
                (true, true) => Err(Error::Input(format!("{}: no examples", path.display()))),
                _ => Err(Error::Input(format!(
                    "{}: mixes {{\"text\"}} and {{\"prompt\",\"completion\"}} lines",
                    path.display()
                ))),
            }
        }
        o => Err(Error::Input(format!("--format must be auto, text, jsonl, sft, u16 or u32, got '{o}'"))),
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    if let Some(t) = a.threads {
        dsv3_core::ops::set_threads(t).map_err(Error::Input)?;
    }
    let cfg = a.config()?;
    let cuda = match a.dev.cuda()? {
        Some(i) => {
            if a.pipeline.is_some() {
                return Err(Error::Input(
                    "--pipeline runs on the CPU executor; it does not combine with --device cuda".into(),
                ));
            }
            if cfg.precision == Precision::Bf16 {
                return Err(Error::Input(
                    "--precision bf16 is the CPU's bf16 GEMM emulation; with --device cuda use --dtype bf16 (with --precision f32 or fp8)".into(),
                ));
            }
            let (dev, o) = a.dev.open(i)?;
            Some((dev, o.dtype))
        }
        None => None,
    };
    let ckpt_dir = a.out.join("checkpoint");
    let (mut tr, user, model_dir) = match (&a.preset, &a.model, &a.resume) {
        (Some(p), _, _) => {
            let mut c = dsv3_core::presets::preset(p)?;
            c.num_nextn_predict_layers = a.mtp_depth;
            let mut store = dsv3_core::weights::TensorStore::new();
            let tensors = dsv3_core::weights::init::random_checkpoint(&c, a.seed, 0.02);
            store.add_bytes(dsv3_core::weights::write::to_bytes(&tensors)?, "<init>")?;
            let m = Model::from_store(c, store, LoadOptions::default())?;
            (Trainer::new(m, a.adam()?, cfg), serde_json::Value::Null, None)
        }
        (None, Some(dir), _) => {
            let m = Model::load(dir, LoadOptions::default())?;
            (Trainer::new(m, a.adam()?, cfg), serde_json::Value::Null, Some(dir.clone()))
        }
        (None, None, Some(dir)) => {
            let (t, u) = checkpoint::load(dir, cfg)?;
            (t, u, Some(dir.clone()))
        }
        _ => return Err(Error::Input("give --preset NAME, --model DIR or --resume DIR".into())),
    };
    let tk =
        Tok::for_model(model_dir.as_deref().unwrap_or(Path::new("")), a.tokenizer.as_deref(), tr.model.cfg.vocab_size)?;
    let data = load_data(&a.data, &a.format, tk.as_ref(), &tr.model.cfg)?;
    data.validate(tr.model.cfg.vocab_size, a.seq_len)?;
    let mut loader = Loader::new(data, a.seq_len, a.batch, a.seed ^ 0x5eed);
    if let Some(s) = user.get("rng").and_then(|v| v.as_array()) {
        let s: Vec<u64> = s.iter().filter_map(|x| x.as_u64()).collect();
        if s.len() == 4 {
            loader.rng = Rng::from_state([s[0], s[1], s[2], s[3]]);
        }
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(tr.step > 0)
        .write(true)
        .truncate(tr.step == 0)
        .open(&metrics_path)
        .map_err(|e| Error::Io(format!("{}: {e}", metrics_path.display())))?;
    let mut gpu = match cuda {
        Some((dev, dtype)) => Some(upload(dev, &tr, dtype)?),
        None => None,
    };
    let bar = crate::progress::bar(a.steps, tr.step, a.quiet);
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let t_start = Instant::now();
    let save = |tr: &mut Trainer, gpu: &Option<CudaTrainer>, loader: &Loader| {
        if let Some(g) = gpu {
            g.to_core(tr)?;
        }
        checkpoint::save(tr, &ckpt_dir, serde_json::json!({"rng": loader.rng.state(), "seed": a.seed}), Fault::None)
    };
    let sched = pipeline_schedule(&a)?;
    let step_of = |tr: &Trainer, gpu: &Option<CudaTrainer>| gpu.as_ref().map_or(tr.step, |g| g.step);
    while step_of(&tr, &gpu) < a.steps {
        let n_micro = sched.as_ref().map_or(a.accumulate, |s| s.micro_batches);
        let micro: Vec<_> = (0..n_micro).map(|_| loader.next_batch()).collect();
        let t0 = Instant::now();
        let m = match (&sched, &mut gpu) {
            (_, Some(g)) => g.train_step(&micro)?,
            (Some(s), None) => dsv3_core::pipeline::exec::train_step(&mut tr, s, &micro)?.0,
            (None, None) => tr.train_step(&micro)?,
        };
        let dt = t0.elapsed().as_secs_f64();
        let tps = m.tokens as f64 / dt;
        writeln!(metrics, "{}", metrics_json(&m, tps))
            .map_err(|e| Error::Io(format!("{}: {e}", metrics_path.display())))?;
        curve.push((m.step as f64, m.loss as f64));
        let bal = m.max_over_mean.iter().copied().fold(0f32, f32::max);
        let mtp = if m.mtp_loss > 0.0 { format!(" | mtp {:.4}", m.mtp_loss) } else { String::new() };
        let msg = format!("loss {:.4}{mtp} | {:.0} tok/s | lr {:.2e} | max/mean load {:.2}", m.loss, tps, m.lr, bal);
        if a.quiet {
            if m.step % a.log_every.max(1) == 0 || step_of(&tr, &gpu) == a.steps {
                eprintln!("step {:>6} {msg}", m.step);
            }
        } else {
            bar.set_message(msg);
            bar.inc(1);
        }
        if a.save_every > 0 && step_of(&tr, &gpu) % a.save_every == 0 {
            save(&mut tr, &gpu, &loader)?;
        }
    }
    bar.finish();
    save(&mut tr, &gpu, &loader)?;
    let svg = plot::svg(
        "dsv3 train: loss",
        "step",
        "cross-entropy",
        &[plot::Series { label: "train loss", color: "#1f77b4", points: curve }],
    );
    std::fs::write(a.out.join("loss.svg"), svg).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    println!(
        "trained to step {} in {:.1} s; checkpoint {}, metrics {}, curve {}",
        tr.step,
        t_start.elapsed().as_secs_f64(),
        ckpt_dir.display(),
        metrics_path.display(),
        a.out.join("loss.svg").display()
    );
    Ok(())
}

/// Uploads the core trainer (model, optimizer state of a resumed run, step) to the GPU.
fn upload(dev: std::sync::Arc<dsv3_kernels::Device>, tr: &Trainer, dtype: DType) -> Result<CudaTrainer> {
    let t0 = Instant::now();
    let g = CudaTrainer::new(dev, tr, dtype)?;
    let fp8 = match g.model.fp8_bytes() {
        0 => String::new(),
        b => format!(", FP8 linears ({:.1} MB of FP8 weight copies)", b as f64 / 1e6),
    };
    eprintln!(
        "training on the GPU ({dtype:?}{fp8}): {} tensors uploaded in {:.0} ms",
        g.model.params.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(g)
}

/// The `--pipeline` schedule, with `--accumulate` raised to the schedule's minimum.
fn pipeline_schedule(a: &TrainArgs) -> Result<Option<dsv3_core::pipeline::Schedule>> {
    use dsv3_core::pipeline::{Kind, Schedule};
    let Some(k) = &a.pipeline else { return Ok(None) };
    let kind = Kind::parse(k)?;
    let min = match kind {
        Kind::DualPipe | Kind::DualPipeV => 2 * a.pp,
        _ => 1,
    };
    let mut m = a.accumulate.max(min);
    if kind == Kind::DualPipe && !m.is_multiple_of(2) {
        m += 1;
    }
    let s = Schedule::new(kind, a.pp, m)?;
    if m != a.accumulate {
        eprintln!("note: --pipeline {k} --pp {} runs {m} micro-batches per step (--accumulate {})", a.pp, a.accumulate);
    }
    Ok(Some(s))
}

fn metrics_json(m: &StepMetrics, tps: f64) -> String {
    serde_json::json!({
        "step": m.step, "loss": m.loss, "balance_loss": m.balance_loss, "mtp_loss": m.mtp_loss, "grad_norm": m.grad_norm, "lr": m.lr,
        "tokens": m.tokens, "tokens_per_s": (tps * 10.0).round() / 10.0, "expert_load": m.expert_load,
        "max_over_mean_load": m.max_over_mean,
    })
    .to_string()
}
