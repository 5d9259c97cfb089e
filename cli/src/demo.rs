//! `dsv3 demo`: trains the `tiny` preset from scratch on CPU on multi-digit addition
//! ("47+85=132\n", byte tokenizer, loss on the answer), shows the loss falling, and reports
//! greedy accuracy on a fixed held-out set of problems never seen in training. Then a GRPO stage
//! (R1-style, rule reward: exact answer) continues from the supervised model and reports the
//! held-out accuracy again.
use crate::plot;
use dsv3_core::grpo::reward::{ExactMatch, Reward};
use dsv3_core::grpo::{GrpoConfig, GrpoTrainConfig, GrpoTrainer, LossType, Prompt};
use dsv3_core::infer::{generate, SamplingParams};
use dsv3_core::model::Model;
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
    /// Supervised optimizer steps.
    #[arg(long, default_value_t = 900)]
    pub steps: u64,
    /// GRPO steps after the supervised stage (0 = skip). Each samples `--group` answers to
    /// `--prompts` problems and takes one optimizer step.
    #[arg(long, default_value_t = 800)]
    pub grpo_steps: u64,
    /// GRPO: problems per step.
    #[arg(long, default_value_t = 32)]
    pub prompts: usize,
    /// GRPO: answers sampled per problem (G).
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// GRPO: weight of the partial-credit reward (share of answer digits right, aligned from the
    /// units digit) next to the exact-answer reward (weight 1); 0 = exact answer only.
    #[arg(long, default_value_t = 0.0)]
    pub partial_credit: f32,
    /// GRPO: sampling temperature (log-probs use the same).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// GRPO: peak learning rate (warmup over the first 5% of steps, then cosine to a tenth).
    #[arg(long, default_value_t = 1e-4)]
    pub grpo_lr: f32,
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

/// Points of a plotted curve.
type Curve = Vec<(f64, f64)>;

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

    /// `n` training problems as GRPO prompts (text `a+b=`, reference answer `a+b`).
    pub fn grpo_prompts(&self, n: usize, rng: &mut Rng) -> Vec<Prompt> {
        let t = ByteTokenizer;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let p = (rng.below(self.max), rng.below(self.max));
            if !self.held.contains(&p) {
                let (q, _) = problem(p.0, p.1);
                out.push(Prompt { ids: t.encode(&q), text: q, answer: Some((p.0 + p.1).to_string()) });
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
    let model = Model::random(cfg, a.seed, 0.02)?;
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
        "held-out accuracy after supervised training: {:.1}% ({} problems; before: {:.1}%)",
        acc * 100.0,
        task.held_out.len(),
        acc0 * 100.0
    );
    let sft_secs = t_train.elapsed().as_secs_f64();
    let mut grpo_curve: Vec<(f64, f64)> = Vec::new();
    let mut eval_curve: Vec<(f64, f64)> = vec![(0.0, acc * 100.0)];
    if a.grpo_steps > 0 {
        let (t2, acc_rl, c) = grpo_stage(&a, &task, tr, acc, &mut eval_curve)?;
        tr = t2;
        grpo_curve = c;
        println!(
            "\nheld-out accuracy: {:.1}% after supervised training ({:.0} s), {:.1}% after GRPO ({:+.1} points)",
            acc * 100.0,
            sft_secs,
            acc_rl * 100.0,
            (acc_rl - acc) * 100.0
        );
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    checkpoint::save(
        &mut tr,
        &a.out.join("checkpoint"),
        serde_json::json!({"demo": "addition", "digits": a.digits, "sft_steps": a.steps, "grpo_steps": a.grpo_steps}),
        Fault::None,
    )?;
    let svg = plot::svg(
        "dsv3 demo: addition, training loss",
        "step",
        "cross-entropy (answer tokens)",
        &[plot::Series { label: "train loss", color: "#1f77b4", points: curve }],
    );
    std::fs::write(a.out.join("loss.svg"), svg).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    if !grpo_curve.is_empty() {
        let svg = plot::svg(
            "dsv3 demo: GRPO stage (rule reward: exact answer)",
            "GRPO step",
            "percent",
            &[
                plot::Series { label: "sampled reward x100", color: "#1f77b4", points: grpo_curve },
                plot::Series { label: "held-out accuracy", color: "#d62728", points: eval_curve },
            ],
        );
        std::fs::write(a.out.join("grpo.svg"), svg).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
        println!("reward curve: {}", a.out.join("grpo.svg").display());
    }
    println!(
        "saved {} and {} ({:.0} s in all)",
        a.out.join("checkpoint").display(),
        a.out.join("loss.svg").display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The GRPO stage: `--grpo-steps` steps of G sampled answers to `--prompts` training problems,
/// rewarded 1 for the exact sum; held-out greedy accuracy every few steps. Returns the model, the
/// final accuracy and the reward curve (step, mean reward × 100).
fn grpo_stage(
    a: &DemoArgs,
    task: &Task,
    mut tr: Trainer,
    acc_sft: f64,
    eval_curve: &mut Vec<(f64, f64)>,
) -> Result<(Trainer, f64, Curve)> {
    let digits = task.max.to_string().len() + 1;
    let cfg = GrpoTrainConfig {
        loss: GrpoConfig { loss_type: LossType::Dapo, temperature: a.temperature, ..Default::default() },
        num_generations: a.group,
        max_completion_length: digits + 1,
        stop_tokens: vec![b'\n' as u32],
        seed: a.seed,
        ..Default::default()
    };
    // the supervised trainer's model and AdamW moments carry over; a new schedule starts
    tr.step = 0;
    tr.cfg = TrainConfig {
        schedule: LrSchedule::WarmupCosine {
            lr: a.grpo_lr,
            min_lr: a.grpo_lr / 10.0,
            warmup: (a.grpo_steps / 20).max(1),
            total: a.grpo_steps,
        },
        bias_update_speed: 0.0,
        ..Default::default()
    };
    let mut g = GrpoTrainer::from_trainer(tr, cfg)?;
    println!(
        "\nGRPO: {} steps x {} problems x {} samples (temperature {}), reward = exact answer, from {:.1}%",
        a.grpo_steps,
        a.prompts,
        a.group,
        a.temperature,
        acc_sft * 100.0
    );
    let exact = ExactMatch;
    let digits = DigitCredit;
    let mut rewards: Vec<(&dyn Reward, f32)> = vec![(&exact, 1.0)];
    if a.partial_credit != 0.0 {
        rewards.push((&digits, a.partial_credit));
    }
    let decode = |t: &[u32]| ByteTokenizer.decode(t);
    let mut rng = Rng::new(a.seed ^ 0x6e90);
    let (mut t_sample, mut t_learn, mut gen_tokens) = (0f64, 0f64, 0usize);
    let mut curve = Vec::new();
    let every = (a.grpo_steps / 6).max(1);
    let mut acc = acc_sft;
    for s in 0..a.grpo_steps {
        let prompts = task.grpo_prompts(a.prompts, &mut rng);
        let t0 = Instant::now();
        let batch = g.sample(&prompts, &rewards, &decode)?;
        let t1 = Instant::now();
        let m = g.learn(&batch)?;
        t_sample += (t1 - t0).as_secs_f64();
        t_learn += t1.elapsed().as_secs_f64();
        gen_tokens += m.completion_tokens;
        curve.push((s as f64 + 1.0, m.reward as f64 * 100.0));
        if (s + 1) % every == 0 || s + 1 == a.grpo_steps {
            acc = task.evaluate(g.model())?.0;
            eval_curve.push((s as f64 + 1.0, acc * 100.0));
            println!(
                "grpo step {:>4}  reward {:.3}  groups with no signal {:>3.0}%  held-out {:.1}%  \
                 (sampling {:.0}% of step time, {:.0} rollout tokens/s)",
                s + 1,
                curve.iter().rev().take(every as usize).map(|p| p.1).sum::<f64>() / 100.0 / every.min(s + 1) as f64,
                m.frac_reward_zero_std * 100.0,
                acc * 100.0,
                100.0 * t_sample / (t_sample + t_learn),
                gen_tokens as f64 / t_sample
            );
        }
    }
    // plain generation of one step's batch (same prompts x G, same sampling settings), to compare
    // the rollout rate with
    let prompts = task.grpo_prompts(a.prompts, &mut rng);
    // (what `dsv3 generate` does: every row prefilled, no prefix sharing)
    let rows: Vec<&[u32]> = prompts.iter().flat_map(|p| std::iter::repeat_n(&p.ids[..], a.group)).collect();
    let params = SamplingParams {
        temperature: a.temperature,
        seed: a.seed,
        max_new_tokens: g.cfg.max_completion_length,
        stop_tokens: g.cfg.stop_tokens.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let plain = generate(g.model(), &rows, &params, |_| true)?;
    let plain_rate = plain.tokens.iter().map(Vec::len).sum::<usize>() as f64 / t0.elapsed().as_secs_f64();
    println!(
        "GRPO time: sampling {:.1} s ({:.0}%), learning {:.1} s ({:.0}%); {} rollout tokens at {:.0} tokens/s \
         (plain batched generation of the same {} rows: {:.0} tokens/s)",
        t_sample,
        100.0 * t_sample / (t_sample + t_learn),
        t_learn,
        100.0 * t_learn / (t_sample + t_learn),
        gen_tokens,
        gen_tokens as f64 / t_sample,
        a.prompts * a.group,
        plain_rate
    );
    g.trainer.step += a.steps;
    Ok((g.trainer, acc, curve))
}

/// Partial credit for an addition answer: the share of digit positions (aligned from the units
/// digit, over the longer of the two numbers) that are right; 0 for a non-number.
pub struct DigitCredit;

impl Reward for DigitCredit {
    fn name(&self) -> &str {
        "digits"
    }
    fn score(&self, _prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32> {
        let want = answer?.trim();
        let got = completion.split('\n').next().unwrap_or("").trim();
        if got.is_empty() || !got.bytes().all(|b| b.is_ascii_digit()) {
            return Some(0.0);
        }
        let n = got.len().max(want.len());
        let same = got.bytes().rev().zip(want.bytes().rev()).filter(|(x, y)| x == y).count();
        Some(same as f32 / n as f32)
    }
}
