//! `dsv3 grpo` (GRPO on the user's prompts with rule rewards: progress bar, metrics JSONL,
//! checkpoints, a reward-curve SVG) and `dsv3 rejection-sample` (R1-style SFT data: keep the
//! sampled completions a reward accepts, written as `{"prompt","completion"}` JSONL for
//! `dsv3 train`).
use crate::plot;
use dsv3_core::grpo::rejection::{rejection_sample, RejectionConfig};
use dsv3_core::grpo::reward::{builtin, Reward, BUILTIN_NAMES};
use dsv3_core::grpo::{GrpoConfig, GrpoMetrics, GrpoTrainConfig, GrpoTrainer, LossType, Prompt, ScaleRewards};
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::rng::Rng;
use dsv3_core::train::checkpoint::{self, Fault};
use dsv3_core::train::{AdamW, LrSchedule, TrainConfig, Trainer};
use dsv3_core::{Error, Result};
use dsv3_ffi::tokenizer::Tok;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sampling and reward options shared by `grpo` and `rejection-sample`.
#[derive(clap::Args, Clone)]
pub struct SampleArgs {
    /// Prompts: JSONL with `"prompt"` (text) and an optional reference `"answer"` (or
    /// `"solution"`) per line.
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json (default: MODEL/tokenizer.json; byte-level models use the built-in one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Reward functions and weights, `name[:weight],...`: accuracy (`\boxed{}` / `<answer>` vs the
    /// reference), exact (whole first line vs the reference), format (R1's
    /// `<think>…</think><answer>…</answer>`), language (English reasoning), language-zh.
    #[arg(long, default_value = "accuracy")]
    pub reward: String,
    /// Completions per prompt (GRPO's G).
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    #[arg(long, default_value_t = 256)]
    pub max_completion_length: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Extra stop strings, each one token (the model's EOS always stops), e.g. `--stop "\n"`.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(clap::Args)]
pub struct GrpoArgs {
    /// The policy to start from (HF-format directory) ...
    #[arg(long, conflicts_with = "resume")]
    pub model: Option<PathBuf>,
    /// ... or a checkpoint written by `dsv3 grpo` / `dsv3 train` to continue.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub s: SampleArgs,
    /// Output directory: checkpoint/, metrics.jsonl, rewards.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// GRPO steps (generation batches).
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Prompts per step (each sampled `--group` times).
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// μ: optimizer steps per generation batch (old log-probs stored at sampling time).
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f32,
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// constant (after warmup) or cosine (to lr/10).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// KL weight β (0: no reference model).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f32,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f32,
    /// Upper clip (default: --epsilon; DAPO uses 0.28).
    #[arg(long)]
    pub epsilon_high: Option<f32>,
    /// grpo, bnpo, dr_grpo or dapo (TRL's default).
    #[arg(long, default_value = "dapo")]
    pub loss_type: String,
    /// group (TRL's default), batch or none (Dr. GRPO).
    #[arg(long, default_value = "group")]
    pub scale_rewards: String,
    /// Importance ratio per sequence (GSPO) instead of per token.
    #[arg(long)]
    pub sequence_level: bool,
    /// Added to the std in the advantage denominator (TRL 1e-4; verl 1e-6, OpenRLHF 1e-9).
    #[arg(long, default_value_t = 1e-4)]
    pub std_eps: f32,
    /// Reset the reference to the policy every K optimizer steps (needs --beta > 0).
    #[arg(long)]
    pub ref_sync_steps: Option<u64>,
    /// At a reset: reference = α·policy + (1−α)·reference.
    #[arg(long, default_value_t = 1.0)]
    pub ref_mixup_alpha: f32,
    /// Held-out prompts (same JSONL) scored with greedy decoding every --eval-every steps.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub eval_every: u64,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// No progress bar (a log line every --log-every steps).
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
}

#[derive(clap::Args)]
pub struct RejectArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub s: SampleArgs,
    /// Output JSONL of accepted `{"prompt","completion","reward"}` lines (`dsv3 train --format sft`).
    #[arg(long)]
    pub out: PathBuf,
    /// Keep a completion when its weighted reward is >= this.
    #[arg(long, default_value_t = 1.0)]
    pub threshold: f32,
    /// At most this many distinct completions per prompt (0 = all accepted).
    #[arg(long, default_value_t = 1)]
    pub max_per_prompt: usize,
    /// Prompts per batched generation.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Also keep completions cut at --max-completion-length (default: only those that ended
    /// with a stop token).
    #[arg(long)]
    pub keep_truncated: bool,
}

/// A named built-in reward function.
pub fn reward_fn(name: &str) -> Result<Box<dyn Reward>> {
    builtin(name).ok_or_else(|| Error::Input(format!("unknown reward '{name}' ({BUILTIN_NAMES})")))
}

/// `name[:weight],...` → reward functions with weights.
pub fn parse_rewards(spec: &str) -> Result<Vec<(Box<dyn Reward>, f32)>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = match part.split_once(':') {
            Some((n, w)) => {
                let w: f32 =
                    w.parse().map_err(|_| Error::Input(format!("--reward: '{w}' is not a weight (in '{part}')")))?;
                if !w.is_finite() {
                    return Err(Error::Input(format!("--reward: weight of '{n}' must be finite")));
                }
                (n, w)
            }
            None => (part, 1.0),
        };
        out.push((reward_fn(name)?, w));
    }
    if out.is_empty() {
        return Err(Error::Input("--reward needs at least one function".into()));
    }
    Ok(out)
}

/// Reads prompts (`"prompt"` + optional `"answer"` / `"solution"`) from JSONL.
pub fn load_prompts(path: &Path, tk: &Tok) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", at())))?;
        let prompt = v
            .get("prompt")
            .and_then(|x| x.as_str())
            .ok_or_else(|| Error::Input(format!("{}: missing string field \"prompt\"", at())))?;
        let answer = match v.get("answer").or_else(|| v.get("solution")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(Error::Input(format!("{}: \"answer\" must be a string or a number", at()))),
        };
        let ids = tk.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::Input(format!("{}: the prompt has no tokens", at())));
        }
        out.push(Prompt { ids, text: prompt.to_string(), answer });
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

impl SampleArgs {
    fn tokenizer(&self, dir: &Path, vocab: usize) -> Result<Tok> {
        Tok::for_model(dir, self.tokenizer.as_deref(), vocab)?
            .ok_or_else(|| Error::Input(dsv3_ffi::tokenizer::NO_TOKENIZER.into()))
    }

    /// The sampling part of a GRPO configuration.
    fn config(&self, model: &Model, tk: &Tok, loss: GrpoConfig) -> Result<GrpoTrainConfig> {
        let mut stop = model.cfg.eos_token_ids.clone();
        for s in &self.stop {
            let s = s.replace("\\n", "\n").replace("\\t", "\t");
            let ids = tk.encode_plain(&s)?;
            if ids.len() != 1 {
                return Err(Error::Input(format!("--stop {s:?} is {} tokens; it must be one", ids.len())));
            }
            stop.push(ids[0]);
        }
        if self.group == 0 || self.max_completion_length == 0 {
            return Err(Error::Input("--group and --max-completion-length must be positive".into()));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("--top-p must be in (0, 1], got {}", self.top_p)));
        }
        let pad = model.cfg.eos_token_ids.first().copied().unwrap_or(0).min(model.cfg.vocab_size as u32 - 1);
        Ok(GrpoTrainConfig {
            loss: GrpoConfig { temperature: self.temperature, ..loss },
            num_generations: self.group,
            max_completion_length: self.max_completion_length,
            top_p: self.top_p,
            top_k: self.top_k,
            stop_tokens: stop,
            pad_token: pad,
            seed: self.seed,
            ..Default::default()
        })
    }
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io(format!("{}: {e}", p.display()))
}

pub fn run(a: GrpoArgs) -> Result<()> {
    if let Some(t) = a.s.threads {
        dsv3_core::ops::set_threads(t).map_err(Error::Input)?;
    }
    if !(a.lr.is_finite() && a.lr > 0.0) || a.steps == 0 || a.prompts == 0 {
        return Err(Error::Input("--lr, --steps and --prompts must be positive".into()));
    }
    let schedule = match a.schedule.as_str() {
        "constant" if a.warmup == 0 => LrSchedule::Constant { lr: a.lr },
        "constant" => LrSchedule::WarmupCosine { lr: a.lr, min_lr: a.lr, warmup: a.warmup, total: a.steps },
        "cosine" => LrSchedule::WarmupCosine { lr: a.lr, min_lr: a.lr / 10.0, warmup: a.warmup, total: a.steps },
        o => return Err(Error::Input(format!("--schedule must be constant or cosine, got '{o}'"))),
    };
    let train = TrainConfig {
        schedule,
        clip_norm: (a.clip > 0.0).then_some(a.clip),
        bias_update_speed: 0.0,
        mtp_lambda: 0.0,
        ..Default::default()
    };
    let loss = GrpoConfig {
        epsilon_low: a.epsilon,
        epsilon_high: a.epsilon_high.unwrap_or(a.epsilon),
        beta: a.beta,
        loss_type: LossType::parse(&a.loss_type)?,
        scale_rewards: match a.scale_rewards.as_str() {
            "group" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            "none" => ScaleRewards::None,
            o => return Err(Error::Input(format!("--scale-rewards must be group, batch or none, got '{o}'"))),
        },
        sequence_level: a.sequence_level,
        std_eps: a.std_eps,
        ..Default::default()
    };
    if !(a.std_eps.is_finite() && a.std_eps >= 0.0) {
        return Err(Error::Input(format!("--std-eps must be >= 0, got {}", a.std_eps)));
    }
    if a.ref_sync_steps.is_some() && a.beta == 0.0 {
        return Err(Error::Input("--ref-sync-steps needs a reference model: set --beta > 0".into()));
    }
    let rewards = parse_rewards(&a.s.reward)?;
    let rw: Vec<(&dyn Reward, f32)> = rewards.iter().map(|(r, w)| (r.as_ref(), *w)).collect();
    let (tr, state, dir) = match (&a.model, &a.resume) {
        (Some(d), _) => {
            let m = Model::load(d, LoadOptions::default())?;
            (Trainer::new(m, AdamW::new(0.9, 0.99, 1e-8, a.weight_decay), train), serde_json::Value::Null, d.clone())
        }
        (None, Some(d)) => {
            let (t, u) = checkpoint::load(d, train)?;
            (t, u, d.clone())
        }
        _ => return Err(Error::Input("give --model DIR or --resume CHECKPOINT".into())),
    };
    let tk = a.s.tokenizer(&dir, tr.model.cfg.vocab_size)?;
    let data = load_prompts(&a.s.data, &tk)?;
    let eval = a.eval.as_deref().map(|p| load_prompts(p, &tk)).transpose()?;
    let mut cfg = a.s.config(&tr.model, &tk, loss)?;
    cfg.num_iterations = a.num_iterations;
    cfg.ref_sync_steps = a.ref_sync_steps;
    cfg.ref_mixup_alpha = a.ref_mixup_alpha;
    let start_step = state.get("grpo_step").and_then(|v| v.as_u64()).unwrap_or(0);
    let mut g = GrpoTrainer::from_trainer(tr, cfg)?;
    g.step = start_step;
    if a.beta != 0.0 {
        // the reference is the model the run started from (recorded in the checkpoint)
        if let Some(r) = state.get("reference").and_then(|v| v.as_str()) {
            g.reference = Some(Model::load(Path::new(r), LoadOptions::default())?);
        }
    }
    let reference_dir = state.get("reference").and_then(|v| v.as_str()).map(PathBuf::from).unwrap_or(dir.clone());
    let mut rng = Rng::new(a.s.seed ^ 0x9e90);
    if let Some(s) = state.get("rng").and_then(|v| v.as_array()) {
        let s: Vec<u64> = s.iter().filter_map(|x| x.as_u64()).collect();
        if s.len() == 4 {
            rng = Rng::from_state([s[0], s[1], s[2], s[3]]);
        }
    }
    std::fs::create_dir_all(&a.out).map_err(io(&a.out))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(start_step > 0)
        .write(true)
        .truncate(start_step == 0)
        .open(&metrics_path)
        .map_err(io(&metrics_path))?;
    let ckpt = a.out.join("checkpoint");
    let decode = |t: &[u32]| tk.decode(t).unwrap_or_default();
    let acc_fn = rewards.iter().position(|(r, _)| matches!(r.name(), "accuracy" | "exact"));
    let greedy = dsv3_core::infer::SamplingParams {
        max_new_tokens: g.cfg.max_completion_length,
        stop_tokens: g.cfg.stop_tokens.clone(),
        ..Default::default()
    };
    let evaluate = |m: &Model| -> Result<Option<f64>> {
        let (Some(ev), Some(f)) = (&eval, acc_fn) else { return Ok(None) };
        let prompts: Vec<&[u32]> = ev.iter().map(|p| &p.ids[..]).collect();
        let params = greedy.clone();
        let out = dsv3_core::infer::generate(m, &prompts, &params, |_| true)?;
        let r = &rewards[f].0;
        let ok = ev
            .iter()
            .zip(&out.tokens)
            .filter(|(p, t)| r.score(&p.text, &decode(t), p.answer.as_deref()) == Some(1.0))
            .count();
        Ok(Some(ok as f64 / ev.len() as f64))
    };
    let bar = crate::progress::bar(a.steps, g.step, a.quiet);
    let mut reward_curve = Vec::new();
    let mut acc_curve = Vec::new();
    let mut eval_curve = Vec::new();
    if g.step == 0 {
        if let Some(e) = evaluate(g.model())? {
            eval_curve.push((0.0, e * 100.0));
            let line = format!("held-out greedy accuracy before GRPO: {:.1}%", e * 100.0);
            if a.quiet {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    }
    let (mut t_sample, mut t_learn, mut gen_tokens) = (0f64, 0f64, 0usize);
    let t_start = Instant::now();
    let save = |g: &mut GrpoTrainer, rng: &Rng| {
        let st = serde_json::json!({
            "grpo_step": g.step,
            "rng": rng.state(),
            "seed": a.s.seed,
            "reference": reference_dir.display().to_string(),
        });
        checkpoint::save(&mut g.trainer, &ckpt, st, Fault::None)
    };
    while g.step < a.steps {
        let prompts: Vec<Prompt> =
            (0..a.prompts).map(|_| data[rng.below(data.len() as u64) as usize].clone()).collect();
        let t0 = Instant::now();
        let batch = g.sample(&prompts, &rw, &decode)?;
        let t1 = Instant::now();
        let m = g.learn(&batch)?;
        let (ds, dl) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
        t_sample += ds;
        t_learn += dl;
        gen_tokens += m.completion_tokens;
        let acc = acc_fn.map(|f| m.rewards[f].mean);
        let ev = if eval.is_some() && (g.step % a.eval_every.max(1) == 0 || g.step == a.steps) {
            evaluate(g.model())?
        } else {
            None
        };
        if let Some(e) = ev {
            eval_curve.push((g.step as f64, e * 100.0));
        }
        writeln!(metrics, "{}", metrics_json(&m, ds, dl, ev)).map_err(io(&metrics_path))?;
        reward_curve.push((g.step as f64, m.reward as f64));
        if let Some(acc) = acc {
            acc_curve.push((g.step as f64, acc as f64));
        }
        let msg = format!(
            "reward {:.3}{}{} | len {:.1} | kl {:.4} | sampling {:.0}% | {:.0} rollout tok/s",
            m.reward,
            acc.map(|x| format!(" | acc {:.1}%", x * 100.0)).unwrap_or_default(),
            ev.map(|x| format!(" | held-out {:.1}%", x * 100.0)).unwrap_or_default(),
            m.completion_length_mean,
            m.kl,
            100.0 * ds / (ds + dl),
            m.completion_tokens as f64 / ds
        );
        if a.quiet {
            if g.step % a.log_every.max(1) == 0 || g.step == a.steps {
                eprintln!("step {:>5} {msg}", g.step);
            }
        } else {
            bar.set_message(msg);
            bar.inc(1);
        }
        if a.save_every > 0 && g.step % a.save_every == 0 {
            save(&mut g, &rng)?;
        }
    }
    bar.finish();
    save(&mut g, &rng)?;
    let mut series = vec![plot::Series { label: "mean reward", color: "#1f77b4", points: reward_curve }];
    if !acc_curve.is_empty() {
        series.push(plot::Series { label: "sampled accuracy", color: "#2ca02c", points: acc_curve });
    }
    if !eval_curve.is_empty() {
        let pts = eval_curve.iter().map(|&(s, e)| (s, e / 100.0)).collect();
        series.push(plot::Series { label: "held-out greedy accuracy", color: "#d62728", points: pts });
    }
    let svg = plot::svg("dsv3 grpo: rewards", "GRPO step", "reward / accuracy", &series);
    std::fs::write(a.out.join("rewards.svg"), svg).map_err(io(&a.out))?;
    println!(
        "GRPO to step {} in {:.1} s (sampling {:.0}%, {:.0} rollout tokens/s); checkpoint {}, metrics {}, curve {}",
        g.step,
        t_start.elapsed().as_secs_f64(),
        100.0 * t_sample / (t_sample + t_learn).max(1e-9),
        gen_tokens as f64 / t_sample.max(1e-9),
        ckpt.display(),
        metrics_path.display(),
        a.out.join("rewards.svg").display()
    );
    Ok(())
}

/// One metrics line (TRL's metric names).
fn metrics_json(m: &GrpoMetrics, sample_s: f64, learn_s: f64, eval: Option<f64>) -> serde_json::Value {
    let mut o = serde_json::json!({
        "step": m.step + 1,
        "loss": m.loss,
        "reward": m.reward,
        "reward_std": m.reward_std,
        "frac_reward_zero_std": m.frac_reward_zero_std,
        "kl": m.kl,
        "clip_ratio/low_mean": m.clip_ratio_low,
        "clip_ratio/high_mean": m.clip_ratio_high,
        "clip_ratio/region_mean": m.clip_ratio_region,
        "completions/mean_length": m.completion_length_mean,
        "completions/min_length": m.completion_length_min,
        "completions/max_length": m.completion_length_max,
        "completions/clipped_ratio": m.clipped_ratio,
        "grad_norm": m.grad_norm,
        "learning_rate": m.lr,
        "num_tokens": m.completion_tokens,
        "time/sampling_s": sample_s,
        "time/learning_s": learn_s,
    });
    for r in &m.rewards {
        o[format!("rewards/{}/mean", r.name)] = nan_null(r.mean);
        o[format!("rewards/{}/std", r.name)] = nan_null(r.std);
    }
    if let Some(e) = eval {
        o["eval/accuracy"] = serde_json::json!(e);
    }
    o
}

fn nan_null(x: f32) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

pub fn run_rejection(a: RejectArgs) -> Result<()> {
    if let Some(t) = a.s.threads {
        dsv3_core::ops::set_threads(t).map_err(Error::Input)?;
    }
    let model = Model::load(&a.model, LoadOptions::default())?;
    let tk = a.s.tokenizer(&a.model, model.cfg.vocab_size)?;
    let data = load_prompts(&a.s.data, &tk)?;
    let rewards = parse_rewards(&a.s.reward)?;
    let rw: Vec<(&dyn Reward, f32)> = rewards.iter().map(|(r, w)| (r.as_ref(), *w)).collect();
    let sampling = a.s.config(&model, &tk, GrpoConfig::default())?;
    let cfg = RejectionConfig {
        sampling,
        threshold: a.threshold,
        max_per_prompt: a.max_per_prompt,
        require_stop: !a.keep_truncated,
        seed: a.s.seed,
    };
    let t0 = Instant::now();
    let decode = |t: &[u32]| tk.decode(t).unwrap_or_default();
    let kept = rejection_sample(&model, &data, &rw, &decode, &cfg, a.batch)?;
    let mut out = String::new();
    for k in &kept {
        let line = serde_json::json!({"prompt": data[k.prompt].text, "completion": k.text, "reward": k.reward});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    dsv3_core::weights::file::write_atomic(&a.out, out.as_bytes())?;
    let covered = {
        let mut p: Vec<usize> = kept.iter().map(|k| k.prompt).collect();
        p.dedup();
        p.len()
    };
    println!(
        "kept {} completions for {} of {} prompts ({} sampled each) in {:.1} s -> {} (train on it: dsv3 train --format sft --data {})",
        kept.len(),
        covered,
        data.len(),
        a.s.group,
        t0.elapsed().as_secs_f64(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
