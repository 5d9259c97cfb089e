//! The GRPO loop: it raises the reward of a rule it is trained on, stores old log-probs for
//! μ > 1 (ratio exactly 1 at the first step), resets the reference every K steps, is
//! reproducible from the seed, and rejection sampling keeps only what the reward accepts.
use dsv3::grpo::rejection::{rejection_sample, RejectionConfig};
use dsv3::grpo::reward::{ExactMatch, Reward};
use dsv3::grpo::{GrpoConfig, GrpoTrainConfig, GrpoTrainer, Prompt};
use dsv3::model::Model;
use dsv3::tokenizer::ByteTokenizer;
use dsv3::train::{AdamW, LrSchedule, TrainConfig};

fn tiny(seed: u64) -> Model {
    Model::random(dsv3::presets::preset("tiny").unwrap(), seed, 0.02).unwrap()
}

/// Rewards completions by the fraction of their characters that are `c` (`'*'`: any ASCII
/// lowercase letter, which a random byte-level model writes ~10% of the time).
struct Share(char);

impl Reward for Share {
    fn name(&self) -> &str {
        "share"
    }
    fn score(&self, _p: &str, completion: &str, _a: Option<&str>) -> Option<f32> {
        let n = completion.chars().count();
        Some(if n == 0 {
            0.0
        } else {
            completion.chars().filter(|&x| x == self.0 || (self.0 == '*' && x.is_ascii_lowercase())).count() as f32
                / n as f32
        })
    }
}

fn prompts() -> Vec<Prompt> {
    ["ab", "xyz", "q", "hello"]
        .iter()
        .map(|t| Prompt { ids: ByteTokenizer.encode(t), text: t.to_string(), answer: None })
        .collect()
}

fn decode(t: &[u32]) -> String {
    ByteTokenizer.decode(t)
}

fn trainer(cfg: GrpoTrainConfig, lr: f32) -> GrpoTrainer {
    let train = TrainConfig { schedule: LrSchedule::Constant { lr }, bias_update_speed: 0.0, ..Default::default() };
    GrpoTrainer::new(tiny(1), AdamW::new(0.9, 0.99, 1e-8, 0.0), train, cfg).unwrap()
}

fn weights(m: &mut Model) -> Vec<f32> {
    let mut w = Vec::new();
    m.visit(&mut |_, t| w.extend_from_slice(t));
    w
}

#[test]
fn reward_rises_on_a_rule() {
    let cfg = GrpoTrainConfig { num_generations: 8, max_completion_length: 6, seed: 3, ..Default::default() };
    let mut tr = trainer(cfg, 3e-3);
    let share = Share('*');
    let rewards: [(&dyn Reward, f32); 1] = [(&share, 1.0)];
    let mut curve = Vec::new();
    for _ in 0..40 {
        let (m, b) = tr.step(&prompts(), &rewards, &decode).unwrap();
        assert_eq!(b.ids.len(), 32);
        assert!(m.loss.is_finite() && m.grad_norm.is_finite());
        assert_eq!(m.completion_length_max, 6); // no stop tokens: every completion is cut at the cap
        assert_eq!(m.clipped_ratio, 1.0);
        curve.push(m.reward);
    }
    let first: f32 = curve[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = curve[35..].iter().sum::<f32>() / 5.0;
    assert!(first < 0.2, "a random model writes few lowercase letters: {first}");
    assert!(last > first + 0.3, "GRPO should raise the share of lowercase letters: {first} -> {last} ({curve:?})");
}

#[test]
fn old_logps_give_ratio_one_and_mu_steps_run() {
    let cfg = GrpoTrainConfig { num_generations: 4, max_completion_length: 4, num_iterations: 3, ..Default::default() };
    let mut tr = trainer(cfg, 1e-2);
    let share = Share('*');
    let rewards: [(&dyn Reward, f32); 1] = [(&share, 1.0)];
    let b = tr.sample(&prompts(), &rewards, &decode).unwrap();
    let old = b.old_logps.clone().expect("μ > 1 stores the sampling policy's log-probs");
    let now = tr.model().rollout_logps(&b.ids, &b.mask, 1.0).unwrap();
    assert_eq!(old, now, "the policy scoring its own batch: ratio exactly 1");
    assert!(old.iter().zip(&b.mask).all(|(l, m)| (*m == 0.0) == (*l == 0.0) && *l <= 0.0));
    let m = tr.learn(&b).unwrap();
    assert_eq!(tr.trainer.step, 3, "μ optimizer steps per generation batch");
    assert_eq!(tr.step, 1);
    assert!(m.loss.is_finite());
    // μ = 1 stores nothing: the detached policy is the old one
    let one = trainer(GrpoTrainConfig { num_generations: 4, max_completion_length: 4, ..Default::default() }, 1e-2);
    assert!(one.sample(&prompts(), &rewards, &decode).unwrap().old_logps.is_none());
}

#[test]
fn reference_resets_every_k_steps() {
    let loss = GrpoConfig { beta: 0.04, ..Default::default() };
    let cfg = GrpoTrainConfig {
        loss,
        num_generations: 4,
        max_completion_length: 4,
        ref_sync_steps: Some(2),
        ..Default::default()
    };
    let mut tr = trainer(cfg, 1e-2);
    let share = Share('*');
    let rewards: [(&dyn Reward, f32); 1] = [(&share, 1.0)];
    let w0 = weights(tr.reference.as_mut().unwrap());
    let (m1, _) = tr.step(&prompts(), &rewards, &decode).unwrap();
    assert_eq!(m1.kl, 0.0, "first step: policy == reference");
    assert_eq!(weights(tr.reference.as_mut().unwrap()), w0, "frozen until step K");
    let (m2, _) = tr.step(&prompts(), &rewards, &decode).unwrap();
    assert!(m2.kl > 0.0, "after an update the policy has moved from the reference");
    let pol = weights(&mut tr.trainer.model);
    assert_eq!(weights(tr.reference.as_mut().unwrap()), pol, "reset to the policy at step K");
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut tr = trainer(
            GrpoTrainConfig { num_generations: 4, max_completion_length: 5, seed: 9, ..Default::default() },
            1e-2,
        );
        let share = Share('*');
        let rewards: [(&dyn Reward, f32); 1] = [(&share, 1.0)];
        (0..3).map(|_| tr.step(&prompts(), &rewards, &decode).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn bad_settings_and_rewards_are_errors() {
    let t = || TrainConfig::default();
    let opt = || AdamW::deepseek_v3();
    let bad = [
        GrpoTrainConfig { num_generations: 1, ..Default::default() },
        GrpoTrainConfig { loss: GrpoConfig { temperature: 0.0, ..Default::default() }, ..Default::default() },
        GrpoTrainConfig { pad_token: 100_000, ..Default::default() },
        GrpoTrainConfig { num_iterations: 0, ..Default::default() },
    ];
    for c in bad {
        assert!(GrpoTrainer::new(tiny(1), opt(), t(), c).is_err());
    }
    struct Nan;
    impl Reward for Nan {
        fn name(&self) -> &str {
            "nan"
        }
        fn score(&self, _: &str, _: &str, _: Option<&str>) -> Option<f32> {
            Some(f32::NAN)
        }
    }
    let tr = trainer(GrpoTrainConfig { num_generations: 2, max_completion_length: 2, ..Default::default() }, 1e-3);
    let e = tr.sample(&prompts(), &[(&Nan, 1.0)], &decode).unwrap_err();
    assert!(e.to_string().contains("nan"), "{e}");
    assert!(tr.sample(&[], &[(&Nan, 1.0)], &decode).is_err());
    assert!(tr.sample(&prompts(), &[], &decode).is_err());
}

#[test]
fn rejection_sampling_keeps_only_accepted_distinct_samples() {
    let model = tiny(2);
    let prompts: Vec<Prompt> = ["1+1=", "2+2="]
        .iter()
        .map(|t| Prompt { ids: ByteTokenizer.encode(t), text: t.to_string(), answer: Some("x".into()) })
        .collect();
    // accept completions that are at least 30% lowercase letters
    let share = Share('*');
    let cfg = RejectionConfig {
        sampling: GrpoTrainConfig { num_generations: 16, max_completion_length: 3, ..Default::default() },
        threshold: 0.3,
        max_per_prompt: 0,
        require_stop: false,
        seed: 5,
    };
    let kept = rejection_sample(&model, &prompts, &[(&share, 1.0)], &decode, &cfg, 1).unwrap();
    assert!(!kept.is_empty() && kept.len() < 32, "some but not all of 32 samples pass: {}", kept.len());
    for k in &kept {
        assert!(k.reward >= 0.3 && share.score("", &k.text, None).unwrap() >= 0.3);
        assert_eq!(kept.iter().filter(|o| o.prompt == k.prompt && o.completion == k.completion).count(), 1);
    }
    // a threshold nothing meets keeps nothing; the exact-match reward rejects wrong answers
    let none = RejectionConfig { threshold: 2.0, ..cfg.clone() };
    assert!(rejection_sample(&model, &prompts, &[(&share, 1.0)], &decode, &none, 2).unwrap().is_empty());
    let exact = rejection_sample(&model, &prompts, &[(&ExactMatch, 1.0)], &decode, &cfg, 2).unwrap();
    assert!(exact.iter().all(|k| k.text.trim() == "x"));
    let capped = RejectionConfig { threshold: 0.0, max_per_prompt: 2, ..cfg };
    let k = rejection_sample(&model, &prompts, &[(&share, 1.0)], &decode, &capped, 2).unwrap();
    assert_eq!(k.len(), 4, "two per prompt when every sample passes");
}

#[test]
fn sharded_learning_pass_equals_one_grpo_pass() {
    // with β > 0, μ = 2 (old log-probs), and rows of different lengths; the trainer splits the
    // rows over the worker threads (2 on CI), the plain pass does not
    let loss = GrpoConfig { beta: 0.04, epsilon_high: 0.28, ..Default::default() };
    let cfg = GrpoTrainConfig {
        loss: loss.clone(),
        num_generations: 4,
        max_completion_length: 6,
        num_iterations: 2,
        stop_tokens: (b'a'..=b'z').map(u32::from).collect(),
        seed: 1,
        ..Default::default()
    };
    let mut tr = trainer(cfg, 1e-2);
    let share = Share('*');
    let rewards: [(&dyn Reward, f32); 1] = [(&share, 1.0)];
    let (_, _) = tr.step(&prompts(), &rewards, &decode).unwrap(); // move the policy off the reference
    let b = tr.sample(&prompts(), &rewards, &decode).unwrap();
    assert!(b.completions.iter().any(|c| c.len() < 6), "some rows end early");
    let out = tr.gradients(&b).unwrap();
    let ref_logps = tr.reference.as_ref().unwrap().rollout_logps(&b.ids, &b.mask, 1.0).unwrap();
    let r = dsv3::grpo::pass::Rollouts {
        ids: &b.ids,
        mask: &b.mask,
        rewards: &b.rewards,
        group_size: 4,
        old_logps: b.old_logps.as_deref(),
        ref_logps: Some(&ref_logps),
    };
    let mut g = tr.trainer.model.zeros_like();
    let (want, _) = tr.trainer.model.grpo_pass(&r, &loss, &mut g).unwrap();
    assert!((out.loss - want.loss).abs() <= 1e-6 * want.loss.abs().max(1e-3), "{} vs {}", out.loss, want.loss);
    assert!((out.kl - want.kl).abs() <= 1e-5 * want.kl.abs(), "{} vs {}", out.kl, want.kl);
    let (got, exp) = (weights(&mut tr.trainer.grad), weights(&mut g));
    let num: f64 = got.iter().zip(&exp).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = exp.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!(den > 0.0 && (num / den).sqrt() < 1e-6, "relative L2 {}", (num / den).sqrt());
}
