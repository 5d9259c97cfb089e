//! `dsv3 demo`: trains the `tiny` preset from scratch on CPU on multi-digit addition
//! ("47+85=132\n", byte tokenizer, loss on the answer), shows the loss falling, and reports
//! greedy accuracy on a fixed held-out set of problems never seen in training.
use crate::plot;
use dsv3_core::infer::{generate, SamplingParams};
use dsv3_core::model::{LoadOptions, Model};
use dsv3_core::rng::Rng;
use dsv3_core::tokenizer::ByteTokenizer;
use dsv3_core::train::checkpoint::{self, Fault};
use dsv3_core::train::data::{Dataset, Loader};
use dsv3_core::train::{AdamW, LrSchedule, TrainConfig, Trainer};
use dsv3_core::{Error, Result};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 1500)]
    pub steps: u64,
    /// Largest number of digits per operand.
    #[arg(long, default_value_t = 2)]
    pub digits: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the checkpoint, metrics and loss curve go.
    #[arg(long, default_value = "dsv3-demo")]
    pub out: PathBuf,
    /// Held-out problems to evaluate.
    #[arg(long, default_value_t = 200)]
    pub eval: usize,
}

/// A shown evaluation sample: the problem, the model's answer, whether it is right.
pub type Sample = (String, String, bool);

/// A problem `a+b=` and its answer `a+b` followed by a newline.
pub fn problem(a: u64, b: u64) -> (String, String) {
    (format!("{a}+{b}="), format!("{}\n", a + b))
}

/// The held-out set (fixed by the seed) and a sampler of training problems that avoids it.
pub struct Task {
    pub max: u64,
    pub held_out: Vec<(u64, u64)>,
    held: HashSet<(u64, u64)>,
}

impl Task {
    pub fn new(digits: u32, n_eval: usize, seed: u64) -> Result<Task> {
        if !(1..=6).contains(&digits) {
            return Err(Error::Input(format!("--digits must be in 1..=6, got {digits}")));
        }
        let max = 10u64.pow(digits);
        if (n_eval as u64) * 4 > max * max {
            return Err(Error::Input(format!("--eval {n_eval} is too many for {digits}-digit problems")));
        }
        let mut rng = Rng::new(seed ^ 0xe7a1);
        let mut held = HashSet::new();
        let mut held_out = Vec::new();
        while held_out.len() < n_eval {
            let p = (rng.below(max), rng.below(max));
            if held.insert(p) {
                held_out.push(p);
            }
        }
        Ok(Task { max, held_out, held })
    }

    /// `n` training problems (prompt tokens, answer tokens), none from the held-out set.
    pub fn training_set(&self, n: usize, seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
        let t = ByteTokenizer;
        let mut rng = Rng::new(seed ^ 0x7a1);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let p = (rng.below(self.max), rng.below(self.max));
            if !self.held.contains(&p) {
                let (q, a) = problem(p.0, p.1);
                out.push((t.encode(&q), t.encode(&a)));
            }
        }
        out
    }

    /// Greedy answers to the held-out problems: (accuracy, a few `(problem, answer, correct)`).
    pub fn evaluate(&self, model: &Model) -> Result<(f64, Vec<Sample>)> {
        let t = ByteTokenizer;
        let prompts: Vec<Vec<u32>> = self.held_out.iter().map(|&(a, b)| t.encode(&problem(a, b).0)).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        let digits = self.max.to_string().len() + 1;
        let params =
            SamplingParams { max_new_tokens: digits + 1, stop_tokens: vec![b'\n' as u32], ..Default::default() };
        let out = generate(model, &refs, &params, |_| true)?;
        let mut correct = 0;
        let mut shown = Vec::new();
        for (&(a, b), toks) in self.held_out.iter().zip(&out.tokens) {
            let got = t.decode(toks);
            let ok = got.trim_end() == (a + b).to_string();
            correct += ok as usize;
            if shown.len() < 8 {
                shown.push((problem(a, b).0, got.trim_end().to_string(), ok));
            }
        }
        Ok((correct as f64 / self.held_out.len() as f64, shown))
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let task = Task::new(a.digits, a.eval, a.seed)?;
    let cfg = dsv3_core::presets::preset("tiny")?;
    println!(
        "dsv3 demo: learning {}-digit addition from scratch on CPU ({} threads)",
        a.digits,
        dsv3_core::ops::threads()
    );
    let tensors = dsv3_core::weights::init::random_checkpoint(&cfg, a.seed, 0.02);
    let mut store = dsv3_core::weights::TensorStore::new();
    store.add_bytes(dsv3_core::weights::write::to_bytes(&tensors)?, "<init>")?;
    let model = Model::from_store(cfg, store, LoadOptions::default())?;
    println!(
        "model: `tiny` preset, {} parameters ({} active per token), MLA + {} experts top-{}",
        model.params(),
        model.active_params(),
        model.cfg.n_routed_experts,
        model.cfg.num_experts_per_tok
    );
    let (acc0, _) = task.evaluate(&model)?;
    println!("held-out accuracy before training: {:.1}% ({} problems)", acc0 * 100.0, task.held_out.len());
    let train = TrainConfig {
        schedule: LrSchedule::WarmupCosine { lr: 3e-3, min_lr: 3e-4, warmup: 50, total: a.steps },
        ..Default::default()
    };
    let mut tr = Trainer::new(model, AdamW::new(0.9, 0.95, 1e-8, 0.01), train);
    let mut loader = Loader::new(Dataset::Sft(task.training_set(50_000, a.seed)), 16, 64, a.seed);
    let mut curve = Vec::new();
    let log_every = (a.steps / 10).max(1);
    let mut tokens = 0usize;
    let t_train = Instant::now();
    while tr.step < a.steps {
        let m = tr.train_step(&[loader.next_batch()])?;
        tokens += m.tokens;
        curve.push((m.step as f64, m.loss as f64));
        if m.step % log_every == 0 || tr.step == a.steps {
            let avg: f64 = curve.iter().rev().take(log_every as usize).map(|p| p.1).sum::<f64>()
                / curve.len().min(log_every as usize) as f64;
            println!(
                "step {:>5}  loss {:.4}  ({:.0} tokens/s, lr {:.1e}, max/mean expert load {:.2})",
                m.step,
                avg,
                tokens as f64 / t_train.elapsed().as_secs_f64(),
                m.lr,
                m.max_over_mean.iter().copied().fold(0f32, f32::max)
            );
        }
    }
    let (acc, shown) = task.evaluate(&tr.model)?;
    println!("\nsamples from the held-out set (greedy):");
    for (q, ans, ok) in shown {
        println!("  {q:>14}{ans:<8} {}", if ok { "correct" } else { "wrong" });
    }
    println!(
        "held-out accuracy after training: {:.1}% ({} problems; before: {:.1}%)",
        acc * 100.0,
        task.held_out.len(),
        acc0 * 100.0
    );
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    checkpoint::save(
        &mut tr,
        &a.out.join("checkpoint"),
        serde_json::json!({"demo": "addition", "digits": a.digits}),
        Fault::None,
    )?;
    let svg = plot::svg(
        "dsv3 demo: addition, training loss",
        "step",
        "cross-entropy (answer tokens)",
        &[plot::Series { label: "train loss", color: "#1f77b4", points: curve }],
    );
    std::fs::write(a.out.join("loss.svg"), svg).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    println!(
        "saved {} and {} ({:.0} s in all)",
        a.out.join("checkpoint").display(),
        a.out.join("loss.svg").display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
