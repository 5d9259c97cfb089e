//! `dsv3`: the command-line tool. Commands whose file formats are fixed contracts:
//! `logits` (input_ids i64 [B,T] → logits f32 [B,T,V]). See `dsv3 --help`.
mod cuda_cmd;
mod demo;
mod grpo_cmd;
mod pipeline_bench;
mod plot;
mod progress;
mod quantize_cmd;
mod schedule_cmd;
mod stream;
mod train_cmd;

use clap::{Parser, Subcommand};
use dsv3_core::infer::{generate, Event, SamplingParams, Session};
use dsv3_core::model::{AttnForm, Fp8Mode, LoadOptions, Model};
use dsv3_core::weights::file::{read_safetensors, write_atomic};
use dsv3_core::weights::write::{to_bytes, OutTensor};
use dsv3_core::{Error, Result};
use dsv3_ffi::tokenizer::Tok;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "dsv3", version, about = "DeepSeek-V3 / R1 engine: inference and training")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model directory (config.json + safetensors, HF layout).
    #[arg(long)]
    model: PathBuf,
    /// MLA formulation: absorbed (DeepSeek's, default) or naive (HF's). Same results.
    #[arg(long, default_value = "absorbed")]
    attn: String,
    /// Dequantize FP8 weights to f32 at load instead of keeping them as FP8 + scales.
    #[arg(long)]
    dequantize_fp8: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full uncached forward: reads `input_ids` (i64 [B,T]) and writes `logits` (f32 [B,T,V]).
    Logits {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        dev: cuda_cmd::DeviceArgs,
        /// safetensors file with tensor `input_ids` (i64 [B,T]).
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors file (tensor `logits`, f32 [B,T,V]).
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss and gradients. `--objective ce` (default): reads `input_ids` (i64 [B,T]) from `--input`;
    /// writes `loss` (f32 [1], mean next-token cross-entropy over B·(T−1) positions) and
    /// `grad.<name>` (f32) for every trainable parameter of the main model, under the checkpoint's
    /// names. `--objective grpo`: reads rollouts (`input_ids`, `completion_mask`, `rewards`,
    /// `group_size`, optional `old_logps` / `ref_logps`) from `--rollouts` and writes TRL's GRPO
    /// loss and its gradients the same way.
    Grad {
        #[command(flatten)]
        m: ModelArgs,
        /// ce (next-token cross-entropy) or grpo.
        #[arg(long, default_value = "ce")]
        objective: String,
        /// safetensors file with tensor `input_ids` (i64 [B,T]) (objective ce).
        #[arg(long, required_unless_present = "rollouts")]
        input: Option<PathBuf>,
        /// safetensors rollouts (objective grpo).
        #[arg(long)]
        rollouts: Option<PathBuf>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// GRPO: KL weight β.
        #[arg(long, default_value_t = 0.0)]
        beta: f32,
        /// GRPO: lower clip ε.
        #[arg(long, default_value_t = 0.2)]
        epsilon: f32,
        /// GRPO: upper clip (default: --epsilon).
        #[arg(long)]
        epsilon_high: Option<f32>,
        /// GRPO: grpo, bnpo, dr_grpo or dapo.
        #[arg(long, default_value = "dapo")]
        loss_type: String,
        /// GRPO: sampling temperature (logits are divided by it).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// GRPO: dr_grpo's normaliser (default: the most completion tokens in any row).
        #[arg(long)]
        max_completion_length: Option<usize>,
        /// GRPO: TRL's use_bias_correction_kl (its default since 1.10): KL term β·w·kl.
        #[arg(long)]
        kl_bias_correction: bool,
    },
    /// Generates from a prompt, streaming the output, then prints prefill and decode speed.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        dev: cuda_cmd::DeviceArgs,
        /// Prompt text (needs DIR/tokenizer.json, or a byte-level model).
        #[arg(long, conflicts_with = "ids")]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 = off.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Do not stop at the model's EOS token.
        #[arg(long)]
        ignore_eos: bool,
        /// Path to a tokenizer.json (default: MODEL/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Config summary, parameter counts, KV-cache size per token.
    Info {
        #[command(flatten)]
        m: ModelArgs,
    },
    /// Measures prefill and decode throughput on random prompts (greedy, no early stop).
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        dev: cuda_cmd::DeviceArgs,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        #[arg(long, default_value_t = 256)]
        new_tokens: usize,
        /// Timed repetitions (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Benchmark training steps (AdamW) instead of inference: batch x prompt-len tokens per step,
        /// median of --repeat steps (f32 on the CPU; with --device cuda in --dtype, with MFU).
        #[arg(long)]
        train: bool,
        /// With --train: GEMM precision of the decoder's linear layers, f32 or fp8 (DeepSeek-V3's
        /// FP8 recipe: the FP8 kernels with --device cuda, the exact emulation on the CPU).
        #[arg(long, default_value = "f32", requires = "train")]
        precision: String,
        /// With --device cuda: after the timed runs, time every kernel launch of one more run (the
        /// decode steps; with --train, 2 more steps) and print the GPU time by kernel (in --json, a
        /// "profile" field). A decode step captured in a CUDA graph is one span; DSV3_CUDA_GRAPH=0
        /// breaks it down by kernel.
        #[arg(long)]
        profile: bool,
        /// Benchmark pipeline schedules instead (1f1b, zb1p, dualpipe, dualpipev on the same model
        /// and batch): step time and per-rank idle fraction, measured and simulated. Each rank
        /// computes on one thread unless --threads is given.
        #[arg(long, conflicts_with = "train")]
        pipeline: bool,
        /// Pipeline ranks for --pipeline (even).
        #[arg(long, default_value_t = 2)]
        pp: usize,
        /// Micro-batches per step for --pipeline (default 2·PP), each of --batch x --prompt-len tokens.
        #[arg(long)]
        micro_batches: Option<usize>,
    },
    /// Prints the token ids of a text (comma-separated), with the model's tokenizer.
    Tokenize {
        /// Model directory (its tokenizer.json, or the byte tokenizer for byte-level models).
        #[arg(long, required_unless_present = "tokenizer")]
        model: Option<PathBuf>,
        /// A tokenizer.json file.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long)]
        text: String,
        /// Decode the ids back and print the text on a second line.
        #[arg(long)]
        decode: bool,
    },
    /// Trains the tiny preset from scratch on multi-digit addition and reports held-out accuracy.
    Demo(demo::DemoArgs),
    /// Trains (from a preset, a model directory, or a checkpoint to resume) on a data file.
    Train(Box<train_cmd::TrainArgs>),
    /// GRPO on JSONL prompts with reference answers: G samples per prompt, rule rewards
    /// (`--reward accuracy:1,format:0.5,...`), TRL's loss; progress bar, metrics.jsonl,
    /// checkpoints, rewards.svg.
    Grpo(Box<grpo_cmd::GrpoArgs>),
    /// Rejection sampling for SFT / distillation: samples each prompt, keeps the completions the
    /// reward accepts, writes `{"prompt","completion"}` JSONL for `dsv3 train --format sft`.
    RejectionSample(Box<grpo_cmd::RejectArgs>),
    /// Builds a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev), replays it with per-op
    /// costs, and prints each rank's ops, bubble and peak activations (`--json`: the fixed
    /// contract; `--svg FILE`: the timeline).
    Schedule(schedule_cmd::ScheduleArgs),
    /// Plots metrics.jsonl files (one curve each) into an SVG, and prints each run's final loss
    /// (mean of its last `--tail` steps) and its relative gap to the first run.
    Plot {
        /// metrics.jsonl files.
        #[arg(long, value_delimiter = ',', required = true)]
        metrics: Vec<PathBuf>,
        /// One label per file.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// The metric to plot.
        #[arg(long, default_value = "loss")]
        field: String,
        #[arg(long, default_value_t = 20)]
        tail: usize,
        #[arg(long, default_value = "")]
        title: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes DeepSeek's FP8 checkpoint format: decoder linear weights as float8_e4m3fn with
    /// 128x128 `weight_scale_inv` blocks; other tensors copied; `quantization_config` added.
    Quantize {
        /// Model directory to read.
        #[arg(long)]
        model: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a randomly initialized checkpoint (config.json + model.safetensors).
    Init {
        /// A preset name (bench-4m, bench-88m) ...
        #[arg(long, conflicts_with = "config")]
        preset: Option<String>,
        /// ... or a config.json to copy.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the weight matrices.
        #[arg(long, default_value_t = 0.02)]
        std: f32,
    },
}

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Keeps freed memory in the process instead of handing it back to the kernel after every step.
///
/// A training step allocates and frees the same activation and gradient buffers (up to a few MB
/// each) every step. With glibc's defaults, buffers above its (dynamic) mmap threshold are mapped
/// and unmapped per allocation, and its per-thread arenas trim freed tops with `madvise`, so each
/// step faults its pages in afresh: ~7,000 page faults and ~15% of a CPU training step on
/// bench-4m. Raising the trim threshold and fixing the mmap threshold at its maximum (32 MiB;
/// larger buffers, such as weights, are still mapped) makes later steps reuse the pages.
/// `DSV3_MALLOC_TUNE=0` keeps glibc's defaults (for A/B measurements).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("DSV3_MALLOC_TUNE").as_deref() != Ok("0") {
        // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    }
}

fn load(m: &ModelArgs) -> Result<Model> {
    if let Some(t) = m.threads {
        rayon_threads(t)?;
    }
    let attn = match m.attn.as_str() {
        "absorbed" => AttnForm::Absorbed,
        "naive" => AttnForm::Naive,
        o => return Err(Error::Input(format!("--attn must be absorbed or naive, got '{o}'"))),
    };
    let fp8 = if m.dequantize_fp8 { Fp8Mode::Dequantize } else { Fp8Mode::Keep };
    Model::load(&m.model, LoadOptions { fp8, attn, ..Default::default() })
}

fn rayon_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Input("--threads must be positive".into()));
    }
    dsv3_core::ops::set_threads(n).map_err(Error::Input)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Logits { m, dev, input, out } => cmd_logits(&m, &dev, &input, &out),
        Cmd::Grad {
            m,
            objective,
            input,
            rollouts,
            out,
            beta,
            epsilon,
            epsilon_high,
            loss_type,
            temperature,
            max_completion_length,
            kl_bias_correction,
        } => match (objective.as_str(), input, rollouts) {
            ("ce", Some(input), None) => cmd_grad(&m, &input, &out),
            ("grpo", None, Some(r)) => {
                let cfg = dsv3_core::grpo::GrpoConfig {
                    epsilon_low: epsilon,
                    epsilon_high: epsilon_high.unwrap_or(epsilon),
                    beta,
                    loss_type: dsv3_core::grpo::LossType::parse(&loss_type)?,
                    temperature,
                    max_completion_length,
                    kl_bias_correction,
                    ..Default::default()
                };
                cmd_grad_grpo(&m, &r, &out, &cfg)
            }
            ("ce", _, _) => Err(Error::Input("--objective ce takes --input IN.safetensors (not --rollouts)".into())),
            ("grpo", _, _) => Err(Error::Input("--objective grpo takes --rollouts R.safetensors (not --input)".into())),
            (o, _, _) => Err(Error::Input(format!("--objective must be ce or grpo, got '{o}'"))),
        },
        Cmd::Generate {
            m,
            dev,
            prompt,
            ids,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            ignore_eos,
            tokenizer,
        } => {
            let cuda = dev.cuda()?.map(|i| dev.open(i)).transpose()?;
            let model = load(&m)?;
            let tk = Tok::for_model(&m.model, tokenizer.as_deref(), model.cfg.vocab_size)?;
            let prompt_ids = match (prompt, ids) {
                (Some(p), _) => {
                    tk.as_ref().ok_or_else(|| Error::Input(dsv3_ffi::tokenizer::NO_TOKENIZER.into()))?.encode(&p)?
                }
                (None, Some(ids)) => ids,
                (None, None) => return Err(Error::Input("give --prompt TEXT or --ids 1,2,3".into())),
            };
            let stop = if ignore_eos { vec![] } else { model.cfg.eos_token_ids.clone() };
            let params = SamplingParams { temperature, top_k, top_p, seed, max_new_tokens, stop_tokens: stop };
            match cuda {
                Some((d, o)) => cuda_cmd::generate(&cuda_cmd::upload(d, &model, o)?, &prompt_ids, &params, tk.as_ref()),
                None => cmd_generate(&model, &prompt_ids, &params, tk.as_ref()),
            }
        }
        Cmd::Info { m } => cmd_info(&m),
        Cmd::Bench {
            m,
            dev,
            batch,
            prompt_len,
            new_tokens,
            repeat,
            seed,
            json,
            train,
            precision,
            pipeline,
            pp,
            micro_batches,
            profile,
        } => {
            let precision = match precision.as_str() {
                "f32" => dsv3_core::model::linear::Precision::F32,
                "fp8" => dsv3_core::model::linear::Precision::Fp8,
                o => return Err(Error::Input(format!("--precision must be f32 or fp8, got '{o}'"))),
            };
            let cuda = dev.cuda()?;
            if profile && cuda.is_none() {
                return Err(Error::Input("--profile times GPU kernels: it needs --device cuda".into()));
            }
            if let Some(i) = cuda {
                if pipeline {
                    return Err(Error::Input(
                        "--pipeline benchmarks the CPU executor; it does not combine with --device cuda".into(),
                    ));
                }
                let (d, o) = dev.open(i)?;
                let model = load(&m)?;
                if train {
                    return cuda_cmd::bench_train(
                        d,
                        o.dtype,
                        precision,
                        model,
                        batch,
                        prompt_len,
                        repeat.max(1),
                        seed,
                        json,
                        profile,
                    );
                }
                let cm = cuda_cmd::upload(d, &model, o)?;
                return cuda_cmd::bench(&cm, batch, prompt_len, new_tokens, repeat.max(1), seed, json, profile);
            }
            if pipeline && m.threads.is_none() {
                rayon_threads(1)?;
            }
            let model = load(&m)?;
            if pipeline {
                pipeline_bench::run(model, pp, micro_batches, batch, prompt_len, repeat.max(1), seed, json)
            } else if train {
                cmd_bench_train(model, precision, batch, prompt_len, repeat.max(1), seed, json)
            } else {
                cmd_bench(&model, batch, prompt_len, new_tokens, repeat.max(1), seed, json)
            }
        }
        Cmd::Train(a) => train_cmd::run(*a),
        Cmd::Grpo(a) => grpo_cmd::run(*a),
        Cmd::RejectionSample(a) => grpo_cmd::run_rejection(*a),
        Cmd::Schedule(a) => schedule_cmd::run(a),
        Cmd::Plot { metrics, labels, field, tail, title, out } => {
            cmd_plot(&metrics, &labels, &field, tail, &title, &out)
        }
        Cmd::Quantize { model, out } => quantize_cmd::run(&model, &out),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Init { preset, config, out, seed, std } => cmd_init(preset, config, &out, seed, std),
        Cmd::Tokenize { model, tokenizer, text, decode } => {
            let vocab = match &model {
                Some(d) => dsv3_core::weights::file::read_config(d)?.vocab_size,
                None => 0,
            };
            let dir = model.unwrap_or_default();
            let tk = Tok::for_model(&dir, tokenizer.as_deref(), vocab)?
                .ok_or_else(|| Error::Input(dsv3_ffi::tokenizer::NO_TOKENIZER.into()))?;
            let ids = tk.encode(&text)?;
            println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
            if decode {
                println!("{}", tk.decode(&ids)?);
            }
            Ok(())
        }
    }
}

/// Reads `input_ids` (i64 [B,T], ids in [0, vocab)) from a safetensors file.
fn read_input_ids(input: &Path, vocab: usize) -> Result<(usize, usize, Vec<u32>)> {
    let mut st = read_safetensors(input)?;
    let t = st.take("input_ids")?;
    if t.shape.len() != 2 || t.shape[0] == 0 || t.shape[1] == 0 {
        return Err(Error::Input(format!("input_ids must be [B,T] with B,T > 0, got {:?}", t.shape)));
    }
    let toks = t
        .to_i64()?
        .iter()
        .map(|&x| {
            if x < 0 || x as usize >= vocab {
                Err(Error::Input(format!("input_ids contains {x}, outside [0, {vocab})")))
            } else {
                Ok(x as u32)
            }
        })
        .collect::<Result<_>>()?;
    Ok((t.shape[0], t.shape[1], toks))
}

fn cmd_logits(m: &ModelArgs, dev: &cuda_cmd::DeviceArgs, input: &Path, out: &Path) -> Result<()> {
    let cuda = dev.cuda()?.map(|i| dev.open(i)).transpose()?;
    let model = load(m)?;
    let v = model.cfg.vocab_size;
    let (b, tl, toks) = read_input_ids(input, v)?;
    let seqs: Vec<&[u32]> = toks.chunks(tl).collect();
    let logits = match cuda {
        Some((d, o)) => cuda_cmd::logits(&cuda_cmd::upload(d, &model, o)?, &seqs)?,
        None => model.forward(&seqs)?,
    };
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!("logit {i} is {}", logits[i])));
    }
    let bytes = to_bytes(&[OutTensor::f32("logits", &[b, tl, v], &logits)])?;
    write_atomic(out, &bytes)
}

fn cmd_grad(m: &ModelArgs, input: &Path, out: &Path) -> Result<()> {
    let mut model = load(m)?;
    model.make_trainable();
    let (_, tl, toks) = read_input_ids(input, model.cfg.vocab_size)?;
    if tl < 2 {
        return Err(Error::Input("input_ids needs T >= 2 to have a next token to predict".into()));
    }
    let seqs: Vec<&[u32]> = toks.chunks(tl).collect();
    let mut grad = model.zeros_like();
    let loss = model.loss_and_grads(&seqs, &mut grad)?;
    write_grads(&mut model, &mut grad, loss, out)
}

/// Reads a `[N, T]` f32 tensor of the rollouts file, if present.
fn rollout_f32(st: &dsv3_core::weights::TensorStore, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
    match st.get(name) {
        None => Ok(None),
        Some(t) => {
            t.expect_shape(shape)?;
            t.to_f32().map(Some)
        }
    }
}

fn cmd_grad_grpo(m: &ModelArgs, path: &Path, out: &Path, cfg: &dsv3_core::grpo::GrpoConfig) -> Result<()> {
    let mut model = load(m)?;
    model.make_trainable();
    let (n, t, toks) = read_input_ids(path, model.cfg.vocab_size)?;
    let st = read_safetensors(path)?;
    let mt = st
        .get("completion_mask")
        .ok_or_else(|| Error::Input(format!("{}: missing tensor 'completion_mask'", path.display())))?;
    mt.expect_shape(&[n, t])?;
    let mask: Vec<f32> = mt.to_i64()?.iter().map(|&x| x as f32).collect();
    if mask.iter().any(|&x| x != 0.0 && x != 1.0) {
        return Err(Error::Input("completion_mask must hold 0 or 1".into()));
    }
    let rewards =
        st.get("rewards").ok_or_else(|| Error::Input(format!("{}: missing tensor 'rewards'", path.display())))?;
    rewards.expect_shape(&[n])?;
    let rewards = rewards.to_f32()?;
    let g = st
        .get("group_size")
        .ok_or_else(|| Error::Input(format!("{}: missing tensor 'group_size'", path.display())))?
        .to_i64()?;
    let group_size = match g[..] {
        [x] if x >= 2 => x as usize,
        _ => return Err(Error::Input(format!("group_size must be one integer >= 2, got {g:?}"))),
    };
    let old = rollout_f32(&st, "old_logps", &[n, t])?;
    let reference = rollout_f32(&st, "ref_logps", &[n, t])?;
    let ids: Vec<Vec<u32>> = toks.chunks(t).map(|r| r.to_vec()).collect();
    let r = dsv3_core::grpo::pass::Rollouts {
        ids: &ids,
        mask: &mask,
        rewards: &rewards,
        group_size,
        old_logps: old.as_deref(),
        ref_logps: reference.as_deref(),
    };
    let mut grad = model.zeros_like();
    let (o, _) = model.grpo_pass(&r, cfg, &mut grad)?;
    write_grads(&mut model, &mut grad, o.loss, out)
}

/// Writes `loss` and `grad.<name>` of the main model's parameters.
fn write_grads(model: &mut Model, grad: &mut Model, loss: f32, out: &Path) -> Result<()> {
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        dsv3_core::weights::init::tensor_specs(&model.cfg).into_iter().map(|(n, s, _)| (n, s)).collect();
    let main: std::collections::HashSet<String> = model.main_param_names().into_iter().collect();
    let mut tensors = vec![OutTensor::f32("loss", &[1], &[loss])];
    let mut bad = None;
    grad.visit(&mut |name, g| {
        if main.contains(name) {
            if bad.is_none() && g.iter().any(|x| !x.is_finite()) {
                bad = Some(name.to_string());
            }
            let shape = shapes.get(name).cloned().unwrap_or_else(|| vec![g.len()]);
            tensors.push(OutTensor::f32(&format!("grad.{name}"), &shape, g));
        }
    });
    if let Some(n) = bad {
        return Err(Error::NonFinite(format!("gradient of {n}")));
    }
    write_atomic(out, &to_bytes(&tensors)?)
}

fn cmd_generate(model: &Model, prompt: &[u32], params: &SamplingParams, tk: Option<&Tok>) -> Result<()> {
    let t0 = Instant::now();
    let mut t_prefill = 0.0;
    let mut stream = stream::Streamer::new(tk);
    let stdout = std::io::stdout();
    let out = generate(model, &[prompt], params, |ev| {
        match ev {
            Event::PrefillDone { .. } => t_prefill = t0.elapsed().as_secs_f64(),
            Event::Token { token, .. } => stream.push(token, &mut stdout.lock()),
        }
        true
    })?;
    let total = t0.elapsed().as_secs_f64();
    let n = out.tokens[0].len();
    println!();
    // the first token comes from the prefill logits: decode is n - 1 forward steps
    let steps = n.saturating_sub(1);
    println!(
        "prefill: {} tokens in {:.1} ms ({:.1} tokens/s); {n} tokens generated, decode: {steps} steps in {:.1} ms ({:.1} tokens/s)",
        prompt.len(),
        t_prefill * 1e3,
        prompt.len() as f64 / t_prefill.max(1e-9),
        (total - t_prefill) * 1e3,
        steps as f64 / (total - t_prefill).max(1e-9),
    );
    Ok(())
}

fn cmd_info(m: &ModelArgs) -> Result<()> {
    let model = load(m)?;
    let c = &model.cfg;
    let mt = match c.model_type {
        dsv3_core::config::ModelType::V3 => "deepseek_v3",
        dsv3_core::config::ModelType::V2 => "deepseek_v2",
    };
    println!("model            {}", m.model.display());
    println!("model_type       {mt}");
    println!("vocab            {}", c.vocab_size);
    println!("hidden           {}", c.hidden_size);
    println!(
        "layers           {} ({} dense, {} MoE) + {} MTP",
        c.num_hidden_layers,
        c.first_k_dense_replace.min(c.num_hidden_layers),
        c.num_hidden_layers - c.first_k_dense_replace.min(c.num_hidden_layers),
        c.num_nextn_predict_layers
    );
    println!(
        "attention        MLA: {} heads, q_lora {}, kv_lora {}, nope/rope/v {}/{}/{}",
        c.num_attention_heads,
        c.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim
    );
    println!("rope             theta {}, {:?}", c.rope_theta, c.rope_scaling);
    println!("softmax scale    {:.8}", dsv3_core::ops::rope::softmax_scale(c));
    if c.has_moe() {
        println!(
            "moe              {} routed (width {}) top-{} in {} groups (keep {}), {} shared, scaling {}, {:?}/{:?}",
            c.n_routed_experts,
            c.moe_intermediate_size,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.n_shared_experts,
            c.routed_scaling_factor,
            c.scoring_func,
            c.topk_method
        );
    }
    if let Some(q) = c.quantization {
        println!(
            "quantization     fp8 e4m3, {}x{} blocks{}",
            q.block[0],
            q.block[1],
            if m.dequantize_fp8 { " (dequantized at load)" } else { " (kept as FP8)" }
        );
    }
    println!("params total     {} ({})", model.params(), human(model.params() as f64));
    println!("params active    {} per token ({})", model.active_params(), human(model.active_params() as f64));
    println!("weights in RAM   {}B", human(model.weight_bytes() as f64));
    let (lat, naive) = (c.latent_cache_width(), c.naive_cache_width());
    let l = c.num_hidden_layers;
    println!(
        "kv cache/token   absorbed: {lat} values/layer = {} B (bf16) / {} B (f32) over {l} layers",
        lat * 2 * l,
        lat * 4 * l
    );
    println!(
        "                 naive:    {naive} values/layer = {} B (bf16) / {} B (f32) over {l} layers ({:.1}x)",
        naive * 2 * l,
        naive * 4 * l,
        naive as f64 / lat as f64
    );
    Ok(())
}

fn human(x: f64) -> String {
    for (s, u) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")] {
        if x >= s {
            return format!("{:.2}{u}", x / s);
        }
    }
    format!("{x}")
}

fn cmd_bench(
    model: &Model,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    repeat: usize,
    seed: u64,
    json: bool,
) -> Result<()> {
    if batch == 0 || prompt_len == 0 || new_tokens == 0 {
        return Err(Error::Input("--batch, --prompt-len and --new-tokens must be positive".into()));
    }
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = model.cfg.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..prompt_len).map(|_| rng.below(v) as u32).collect()).collect();
    let (mut best_pre, mut best_dec) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat {
        let mut sess = Session::new(model, batch);
        let t0 = Instant::now();
        let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i, &p[..])).collect();
        let mut logits = sess.step(&inputs)?;
        let pre = t0.elapsed().as_secs_f64();
        let vv = model.cfg.vocab_size;
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let next: Vec<[u32; 1]> = (0..batch)
                .map(|b| [dsv3_core::infer::sampling::argmax(&logits[b * vv..(b + 1) * vv]) as u32])
                .collect();
            let inputs: Vec<(usize, &[u32])> = next.iter().enumerate().map(|(i, t)| (i, &t[..])).collect();
            logits = sess.step(&inputs)?;
        }
        let dec = t1.elapsed().as_secs_f64();
        best_pre = best_pre.min(pre);
        best_dec = best_dec.min(dec);
    }
    let pre_tps = (batch * prompt_len) as f64 / best_pre;
    let dec_tps = (batch * new_tokens) as f64 / best_dec;
    let threads = dsv3_core::ops::threads();
    if json {
        println!(
            "{{\"batch\":{batch},\"prompt_len\":{prompt_len},\"new_tokens\":{new_tokens},\"threads\":{threads},\"prefill_tokens_per_s\":{pre_tps:.1},\"decode_tokens_per_s\":{dec_tps:.1},\"decode_ms_per_step\":{:.4}}}",
            best_dec * 1e3 / new_tokens as f64
        );
    } else {
        println!("batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, {threads} threads (best of {repeat})");
        println!("prefill  {pre_tps:>10.1} tokens/s");
        println!("decode   {dec_tps:>10.1} tokens/s  ({:.3} ms/step)", best_dec * 1e3 / new_tokens as f64);
    }
    Ok(())
}

fn cmd_bench_train(
    model: Model,
    precision: dsv3_core::model::linear::Precision,
    batch: usize,
    seq_len: usize,
    steps: usize,
    seed: u64,
    json: bool,
) -> Result<()> {
    use dsv3_core::train::{AdamW, LrSchedule, MicroBatch, TrainConfig, Trainer};
    if batch == 0 || seq_len < 2 {
        return Err(Error::Input("--batch must be positive and --prompt-len >= 2".into()));
    }
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = model.cfg.vocab_size as u64;
    let cfg = TrainConfig { schedule: LrSchedule::Constant { lr: 1e-4 }, precision, ..Default::default() };
    let flops_tok = cuda_cmd::train_flops_per_token(&model, seq_len);
    let mut tr = Trainer::new(model, AdamW::deepseek_v3(), cfg);
    let mut step = |rng: &mut dsv3_core::rng::Rng| -> Result<f64> {
        let seqs = (0..batch).map(|_| (0..seq_len).map(|_| rng.below(v) as u32).collect()).collect();
        let t0 = Instant::now();
        tr.train_step(&[MicroBatch { seqs, mask: None }])?;
        Ok(t0.elapsed().as_secs_f64())
    };
    step(&mut rng)?; // warm-up
    let mut times: Vec<f64> = (0..steps).map(|_| step(&mut rng)).collect::<Result<_>>()?;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    let tps = (batch * seq_len) as f64 / med;
    let threads = dsv3_core::ops::threads();
    // the step's arithmetic rate (6 x active parameters + causal attention per token, as the GPU's MFU)
    let gflops = tps * flops_tok / 1e9;
    if json {
        println!(
            "{{\"batch\":{batch},\"seq_len\":{seq_len},\"threads\":{threads},\"step_ms\":{:.2},\"best_step_ms\":{:.2},\"train_tokens_per_s\":{tps:.1},\"flops_per_token\":{flops_tok:.0},\"gflops\":{gflops:.1}}}",
            med * 1e3,
            times[0] * 1e3
        );
    } else {
        println!("train: batch {batch} x {seq_len} tokens, {threads} threads, median of {steps} steps");
        println!(
            "step {:.1} ms (best {:.1}), {tps:.1} tokens/s, {gflops:.1} GFLOP/s ({:.1} MFLOP/token)",
            med * 1e3,
            times[0] * 1e3,
            flops_tok / 1e6
        );
    }
    Ok(())
}

fn cmd_plot(metrics: &[PathBuf], labels: &[String], field: &str, tail: usize, title: &str, out: &Path) -> Result<()> {
    const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let mut series = Vec::new();
    let mut finals = Vec::new();
    for (i, p) in metrics.iter().enumerate() {
        let text = std::fs::read_to_string(p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
        let mut pts = Vec::new();
        for (ln, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| Error::Input(format!("{}:{}: {e}", p.display(), ln + 1)))?;
            let (Some(x), Some(y)) = (v["step"].as_f64(), v[field].as_f64()) else {
                return Err(Error::Input(format!("{}:{}: no numeric 'step' and '{field}'", p.display(), ln + 1)));
            };
            pts.push((x, y));
        }
        if pts.is_empty() {
            return Err(Error::Input(format!("{}: no metrics", p.display())));
        }
        let k = tail.max(1).min(pts.len());
        finals.push(pts[pts.len() - k..].iter().map(|p| p.1).sum::<f64>() / k as f64);
        series.push((labels.get(i).cloned().unwrap_or_else(|| p.display().to_string()), pts));
    }
    let s: Vec<plot::Series> = series
        .iter()
        .enumerate()
        .map(|(i, (l, pts))| plot::Series { label: l, color: COLORS[i % COLORS.len()], points: pts.clone() })
        .collect();
    std::fs::write(out, plot::svg(title, "step", field, &s))
        .map_err(|e| Error::Io(format!("{}: {e}", out.display())))?;
    for ((label, _), f) in series.iter().zip(&finals) {
        println!(
            "{label:<12} final {field} (mean of last {tail}) {f:.5}  relative gap vs {}: {:+.3}%",
            series[0].0,
            100.0 * (f - finals[0]) / finals[0]
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn cmd_init(preset: Option<String>, config: Option<PathBuf>, out: &Path, seed: u64, std: f32) -> Result<()> {
    let cfg = match (preset, config) {
        (Some(p), _) => dsv3_core::presets::preset(&p)?,
        (None, Some(c)) => {
            let text = std::fs::read_to_string(&c).map_err(|e| Error::Io(format!("{}: {e}", c.display())))?;
            dsv3_core::Config::from_json_str(&text, &c.display().to_string())?
        }
        (None, None) => return Err(Error::Input("give --preset NAME or --config FILE".into())),
    };
    if !(std.is_finite() && std > 0.0) {
        return Err(Error::Input(format!("--std must be positive, got {std}")));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Io(format!("{}: {e}", out.display())))?;
    let tensors = dsv3_core::weights::init::random_checkpoint(&cfg, seed, std);
    write_atomic(&out.join("model.safetensors"), &to_bytes(&tensors)?)?;
    let json = serde_json::to_string_pretty(&cfg.to_json()).map_err(|e| Error::Io(e.to_string()))?;
    write_atomic(&out.join("config.json"), json.as_bytes())?;
    let n: usize = tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    println!("wrote {} ({} tensors, {} parameters)", out.display(), tensors.len(), n);
    Ok(())
}
