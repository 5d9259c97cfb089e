//! `dsv3 bench --pipeline`: one training step of the same model and batch through 1F1B, ZB-H1,
//! DualPipe and DualPipeV on the threaded executor: measured step time and per-rank idle
//! fraction, next to the simulator's prediction from the measured per-op costs.
use dsv3_core::model::Model;
use dsv3_core::pipeline::exec::{run_step, RankTiming};
use dsv3_core::pipeline::stage::LossOptions;
use dsv3_core::pipeline::{simulate, Costs, Kind, Op, Schedule};
use dsv3_core::train::MicroBatch;
use dsv3_core::{Error, Result};
use serde_json::json;

/// Per-op durations gathered from timed steps: F, full B, input-grad-only B, W, FB.
#[derive(Default)]
struct OpTimes {
    sums: [f64; 5],
    counts: [usize; 5],
}

impl OpTimes {
    fn add(&mut self, s: &Schedule, ranks: &[RankTiming]) {
        for (ops, t) in s.ranks.iter().zip(ranks) {
            for (op, (a, b)) in ops.iter().zip(&t.ops) {
                let k = match op {
                    Op::F(_) => 0,
                    Op::B { zb: false, .. } => 1,
                    Op::B { zb: true, .. } => 2,
                    Op::W(_) => 3,
                    Op::FB { .. } => 4,
                };
                self.sums[k] += b - a;
                self.counts[k] += 1;
            }
        }
    }

    fn mean(&self, k: usize) -> f64 {
        self.sums[k] / self.counts[k].max(1) as f64
    }

    /// Simulator costs in seconds from this schedule's own ops: a full B missing (ZB-H1) is
    /// input-grad B + W; W is 0 where no weight job ran (1F1B); F&B missing is F + B.
    fn costs(&self) -> Costs {
        let has = |k: usize| self.counts[k] > 0;
        let f = self.mean(0);
        let w = if has(3) { self.mean(3) } else { 0.0 };
        let b = if has(1) { self.mean(1) } else { self.mean(2) + w };
        let fb = if has(4) { self.mean(4) } else { f + b };
        Costs { f, b, w: w.min(b), fb }
    }
}

struct Measured {
    kind: Kind,
    sched: Schedule,
    times: OpTimes,
    step_s: f64,
    idle: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    model: Model,
    pp: usize,
    micro_batches: Option<usize>,
    batch: usize,
    seq_len: usize,
    repeat: usize,
    seed: u64,
    json_out: bool,
) -> Result<()> {
    if batch == 0 || seq_len < 2 {
        return Err(Error::Input("--batch must be positive and --prompt-len >= 2".into()));
    }
    let mut model = model;
    model.make_trainable();
    let m = micro_batches.unwrap_or(2 * pp);
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = model.cfg.vocab_size as u64;
    let micro: Vec<MicroBatch> = (0..m)
        .map(|_| MicroBatch {
            seqs: (0..batch).map(|_| (0..seq_len).map(|_| rng.below(v) as u32).collect()).collect(),
            mask: None,
        })
        .collect();
    let opts = LossOptions::default();
    let mut measured = Vec::new();
    for kind in [Kind::OneFOneB, Kind::Zb1p, Kind::DualPipe, Kind::DualPipeV] {
        let sched = Schedule::new(kind, pp, m)?;
        run_step(&model, &sched, &micro, &opts)?; // warm-up
        let mut runs = Vec::new();
        let mut times = OpTimes::default();
        for _ in 0..repeat {
            let out = run_step(&model, &sched, &micro, &opts)?;
            times.add(&sched, &out.ranks);
            runs.push(out);
        }
        // the median step by wall time
        runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
        let med = &runs[runs.len() / 2];
        let step_s = med.ranks.iter().map(|r| r.end_s).fold(0.0, f64::max);
        let idle = med.ranks.iter().map(|r| 1.0 - r.busy_s / step_s.max(1e-12)).collect();
        measured.push(Measured { kind, sched, times, step_s, idle });
    }
    let threads = dsv3_core::ops::threads();
    let mut rows = Vec::new();
    if !json_out {
        println!(
            "pipeline bench: pp {pp}, {m} micro-batches of {batch} x {seq_len} tokens, {} layers, {threads} compute thread(s) per rank, median of {repeat}",
            model.layers.len()
        );
        println!(
            "{:<10} {:>8} {:>8}  {:>28}  idle fraction per rank: measured | simulated",
            "schedule", "step ms", "sim ms", "op ms: F / B / b / W / F&B"
        );
    }
    for me in &measured {
        let costs = me.times.costs();
        let sim = simulate(&me.sched, &costs)?;
        let op_ms: Vec<f64> = (0..5).map(|k| me.times.mean(k) * 1e3).collect();
        let sim_idle: Vec<f64> = sim.bubble.iter().map(|b| b / sim.makespan.max(1e-12)).collect();
        if json_out {
            rows.push(json!({
                "kind": me.kind.name(), "step_ms": me.step_s * 1e3, "sim_step_ms": sim.makespan * 1e3,
                "idle": me.idle, "sim_idle": sim_idle, "op_ms": {"F": op_ms[0], "B": op_ms[1], "B_input": op_ms[2], "W": op_ms[3], "FB": op_ms[4]},
            }));
        } else {
            let f = |v: &[f64]| v.iter().map(|x| format!("{:.2}", x)).collect::<Vec<_>>().join(" ");
            let ops = op_ms.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" / ");
            println!(
                "{:<10} {:>8.1} {:>8.1}  {:>28}  {} | {}",
                me.kind.name(),
                me.step_s * 1e3,
                sim.makespan * 1e3,
                ops,
                f(&me.idle),
                f(&sim_idle)
            );
        }
    }
    if json_out {
        println!(
            "{}",
            json!({"pp": pp, "micro_batches": m, "batch": batch, "seq_len": seq_len, "threads": threads, "schedules": rows})
        );
    }
    Ok(())
}
