//! The executor: one training step of a [`Schedule`] over a model split into stages
//! ([`Stage`]), one thread per rank, boundary tensors through a [`Transport`].
//!
//! - Placement: the schedule's ([`Schedule::rank_of`]): DualPipe's rank `r` holds stage `r` (for
//!   direction 0) and stage `PP−1−r` (for direction 1), each with its own gradient buffer; the
//!   two copies of a stage are summed after the step, as a data-parallel pair would all-reduce
//!   them. DualPipeV's rank `r` holds stages `r` and `2·PP−1−r`.
//! - Ops: F runs a stage forward (the last stage computes the loss), B a backward (full, or
//!   input-grad only with the linear layers' weight gradients queued in a FIFO), W pops the
//!   oldest queued job, FB runs its forward then its backward (DeepSeek's reference without a
//!   custom `overlapped_forward_backward` does the same) after receiving both inputs.
//! - Communication overlaps compute: a send hands the tensor over and returns at once; a
//!   receive waits only for data its producer has not finished.
//!
//! Every micro-batch goes through exactly the computations of [`Model::train_pass`], and each
//! stage accumulates its gradients in micro-batch order, so the losses are bit-identical to
//! [`serial_step`] and so are the gradients of schedules with one copy per stage (DualPipe's
//! pair sum reorders the additions: equal to rounding).
use crate::error::{ierr, Error, Result};
use crate::model::train::PassOptions;
use crate::model::Model;
use crate::pipeline::schedule::{Chunk, Op, Schedule};
use crate::pipeline::stage::{add_stage_grad, store_stage_grad, Activation, LossOptions, Stage, StageGrad, WeightJobs};
use crate::pipeline::transport::{channel_mesh, Tag, Transport};
use crate::train::{MicroBatch, StepMetrics, Trainer};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use std::collections::HashMap;
use std::time::Instant;

/// Wall-clock account of one rank in a step (seconds from the step's start).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RankTiming {
    /// Time spent computing (receives that had to wait are not counted).
    pub busy_s: f64,
    /// When the rank finished its last op.
    pub end_s: f64,
    /// `(start, end)` of each op's compute, in list order.
    pub ops: Vec<(f64, f64)>,
}

/// What a pipelined step produces.
#[derive(Debug)]
pub struct StepOutput {
    /// Mean cross-entropy of each micro-batch (global order: DualPipe's direction 1 holds the
    /// second half).
    pub losses: Vec<f32>,
    /// Balance loss of each micro-batch, summed over MoE layers.
    pub balance: Vec<f32>,
    /// Tokens routed to each expert, per MoE layer (in layer order), summed over the step.
    pub loads: Vec<Vec<u32>>,
    /// Gradients of the step (the micro-batches weighted by their share of counted positions),
    /// shaped like [`Model::zeros_like`].
    pub grad: Model,
    pub ranks: Vec<RankTiming>,
    /// The step's wall time.
    pub wall_s: f64,
}

/// Each micro-batch's weight: its share of the step's counted positions (as [`Trainer`]).
fn weights(micro: &[MicroBatch]) -> Result<Vec<f32>> {
    let total: f32 = micro.iter().map(MicroBatch::counted).sum();
    if let Some(j) = micro.iter().position(|m| m.counted() == 0.0) {
        return Err(ierr(format!("micro-batch {j} has no position that counts in the loss")));
    }
    Ok(micro.iter().map(|m| m.counted() / total).collect())
}

fn check(model: &Model) -> Result<()> {
    if model.cfg.tie_word_embeddings {
        return Err(Error::Unsupported("pipeline training with tied embeddings".into()));
    }
    Ok(())
}

/// The reference: every micro-batch through [`Model::train_pass`] in order, gradients
/// accumulated into one buffer. Returns (per-micro-batch losses, gradients).
pub fn serial_step(model: &Model, micro: &[MicroBatch], opts: &LossOptions) -> Result<(Vec<f32>, Model)> {
    check(model)?;
    let w = weights(micro)?;
    let mut grad = model.zeros_like();
    let mut losses = Vec::with_capacity(micro.len());
    for (mb, &scale) in micro.iter().zip(&w) {
        let seqs: Vec<&[u32]> = mb.seqs.iter().map(|s| &s[..]).collect();
        let o = PassOptions {
            scale,
            seq_alpha: opts.seq_alpha,
            aux_alpha: opts.aux_alpha,
            mask: mb.mask.clone(),
            mtp_lambda: 0.0,
        };
        losses.push(model.train_pass(&seqs, &mut grad, &o)?.ce_loss);
    }
    Ok((losses, grad))
}

/// One stage copy on a rank.
struct Module {
    dir: usize,
    stage: usize,
    grad: StageGrad,
    acts: HashMap<usize, Activation>,
}

/// What a rank hands back.
struct RankOut {
    modules: Vec<Module>,
    losses: Vec<(usize, f32)>,
    balance: Vec<(usize, f32)>,
    loads: Vec<(usize, Vec<u32>)>,
    timing: RankTiming,
}

/// One rank's state while it runs its list.
struct Rank<'a, T: Transport> {
    r: usize,
    s: &'a Schedule,
    stages: &'a [Stage<'a>],
    micro: &'a [MicroBatch],
    scales: &'a [f32],
    opts: &'a LossOptions,
    t: &'a mut T,
    t0: Instant,
    out: RankOut,
    fifo: VecDeque<(Chunk, WeightJobs)>,
}

impl<T: Transport> Rank<'_, T> {
    fn module(&mut self, c: &Chunk) -> Result<&mut Module> {
        let r = self.r;
        self.out
            .modules
            .iter_mut()
            .find(|m| m.dir == c.dir && m.stage == c.stage)
            .ok_or_else(|| ierr(format!("rank {r} does not hold stage {} of direction {}", c.stage, c.dir)))
    }

    /// The input a forward of `c` needs (from the previous stage's rank).
    fn recv_f(&mut self, c: &Chunk) -> Result<Option<Vec<f32>>> {
        if c.stage == 0 {
            return Ok(None);
        }
        let prev = Chunk { stage: c.stage - 1, ..*c };
        self.t.recv(self.s.rank_of(c.dir, prev.stage), Tag { chunk: prev, forward: true }).map(Some)
    }

    /// The output gradient a backward of `c` needs (from the next stage's rank).
    fn recv_b(&mut self, c: &Chunk) -> Result<Option<Vec<f32>>> {
        if c.stage + 1 == self.s.stages() {
            return Ok(None);
        }
        let next = Chunk { stage: c.stage + 1, ..*c };
        self.t.recv(self.s.rank_of(c.dir, next.stage), Tag { chunk: next, forward: false }).map(Some)
    }

    fn forward(&mut self, c: &Chunk, input: Option<Vec<f32>>) -> Result<()> {
        let g = self.s.global_mb(c.dir, c.mb);
        let mb = self.micro.get(g).ok_or_else(|| ierr(format!("no micro-batch {g}")))?;
        let (act, fo) = self.stages[c.stage].forward(mb, self.scales[g], input)?;
        self.module(c)?.acts.insert(c.mb, act);
        if let Some(l) = fo.loss {
            self.out.losses.push((g, l));
        }
        self.out.loads.extend(fo.loads);
        if let Some(x) = fo.out {
            self.t.send(self.s.rank_of(c.dir, c.stage + 1), Tag { chunk: *c, forward: true }, x)?;
        }
        Ok(())
    }

    fn backward(&mut self, c: &Chunk, dout: Option<Vec<f32>>, zb: bool) -> Result<()> {
        let (st, opts) = (self.stages[c.stage], self.opts);
        let m = self.module(c)?;
        let act = m.acts.remove(&c.mb).ok_or_else(|| ierr(format!("backward of {c:?} before its forward")))?;
        let (dx, jobs, bal) = st.backward(act, dout, &mut m.grad, opts, zb)?;
        let g = self.s.global_mb(c.dir, c.mb);
        self.out.balance.push((g, bal));
        if zb {
            self.fifo.push_back((*c, jobs));
        }
        if let Some(dx) = dx {
            self.t.send(self.s.rank_of(c.dir, c.stage - 1), Tag { chunk: *c, forward: false }, dx)?;
        }
        Ok(())
    }

    fn weight(&mut self, c: &Chunk) -> Result<()> {
        let (qc, jobs) =
            self.fifo.pop_front().ok_or_else(|| ierr(format!("rank {}: W with no deferred job", self.r)))?;
        if qc != *c {
            return Err(ierr(format!("rank {}: W of {c:?} but the oldest deferred job is {qc:?}", self.r)));
        }
        let st = self.stages[c.stage];
        st.weight(&jobs, &mut self.module(c)?.grad)
    }

    fn run(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            // receive first (waiting is idle time), then compute
            let (fin, bin) = match op {
                Op::F(c) => (self.recv_f(c)?, None),
                Op::B { c, .. } => (None, self.recv_b(c)?),
                Op::W(_) => (None, None),
                Op::FB { f, b, .. } => (self.recv_f(f)?, self.recv_b(b)?),
            };
            let start = self.t0.elapsed().as_secs_f64();
            match op {
                Op::F(c) => self.forward(c, fin)?,
                Op::B { c, zb } => self.backward(c, bin, *zb)?,
                Op::W(c) => self.weight(c)?,
                Op::FB { f, b, zb } => {
                    self.forward(f, fin)?;
                    self.backward(b, bin, *zb)?;
                }
            }
            let end = self.t0.elapsed().as_secs_f64();
            self.out.timing.ops.push((start, end));
            self.out.timing.busy_s += end - start;
            self.out.timing.end_s = end;
        }
        if !self.fifo.is_empty() {
            return Err(ierr(format!("rank {}: {} weight jobs never ran", self.r, self.fifo.len())));
        }
        Ok(())
    }
}

/// Runs one step of `s` over `micro` (`s.micro_batches` of them) with one thread per rank and
/// the in-process transport. The model's weights must be f32 ([`Model::make_trainable`]).
pub fn run_step(model: &Model, s: &Schedule, micro: &[MicroBatch], opts: &LossOptions) -> Result<StepOutput> {
    run_step_on(model, s, micro, opts, &mut channel_mesh(s.pp))
}

/// [`run_step`] over the given transports, one per rank (`mesh[r].rank() == r`).
pub fn run_step_on<T: Transport>(
    model: &Model,
    s: &Schedule,
    micro: &[MicroBatch],
    opts: &LossOptions,
    mesh: &mut [T],
) -> Result<StepOutput> {
    check(model)?;
    if mesh.len() != s.pp || mesh.iter().enumerate().any(|(r, t)| t.rank() != r) {
        return Err(ierr(format!("{} transports for {} ranks (or out of rank order)", mesh.len(), s.pp)));
    }
    if micro.len() != s.micro_batches {
        return Err(ierr(format!("the schedule has {} micro-batches, the step {}", s.micro_batches, micro.len())));
    }
    let scales = weights(micro)?;
    let stages = Stage::all(model, s.stages());
    let zeros = model.zeros_like();
    let t0 = Instant::now();
    let results: Vec<Result<RankOut>> = std::thread::scope(|sc| {
        let handles: Vec<_> = mesh
            .iter_mut()
            .enumerate()
            .map(|(r, t)| {
                let (stages, scales, zeros) = (&stages, &scales, &zeros);
                sc.spawn(move || {
                    // the stage copies this rank holds, in order of first use
                    let mut modules: Vec<Module> = Vec::new();
                    for op in &s.ranks[r] {
                        let cs: Vec<Chunk> = match op {
                            Op::F(c) | Op::B { c, .. } | Op::W(c) => vec![*c],
                            Op::FB { f, b, .. } => vec![*f, *b],
                        };
                        for c in cs {
                            if !modules.iter().any(|m| m.dir == c.dir && m.stage == c.stage) {
                                let grad = stages[c.stage].zero_grad(zeros);
                                modules.push(Module { dir: c.dir, stage: c.stage, grad, acts: HashMap::new() });
                            }
                        }
                    }
                    let out = RankOut {
                        modules,
                        losses: Vec::new(),
                        balance: Vec::new(),
                        loads: Vec::new(),
                        timing: RankTiming::default(),
                    };
                    let mut rk = Rank { r, s, stages, micro, scales, opts, t, t0, out, fifo: VecDeque::new() };
                    match rk.run(&s.ranks[r]) {
                        Ok(()) => Ok(rk.out),
                        Err(e) => {
                            rk.t.abort();
                            Err(e)
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Io(format!("pipeline rank {r} panicked")))))
            .collect()
    });
    let wall_s = t0.elapsed().as_secs_f64();
    // report the root cause, not the ranks that stopped because another failed
    if results.iter().any(|r| r.is_err()) {
        let errs: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
        let root = errs.iter().position(|e| !matches!(e, Error::Io(_))).unwrap_or(0);
        return Err(errs.into_iter().nth(root).unwrap_or_else(|| Error::Io("pipeline failed".into())));
    }
    let outs: Vec<RankOut> = results.into_iter().filter_map(|r| r.ok()).collect();
    let mut losses = vec![f32::NAN; micro.len()];
    let mut balance = vec![0f32; micro.len()];
    let mut loads: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    let mut copies: Vec<Vec<(usize, StageGrad)>> = (0..s.stages()).map(|_| Vec::new()).collect();
    let mut ranks = Vec::with_capacity(outs.len());
    for o in outs {
        for (g, l) in o.losses {
            losses[g] = l;
        }
        for (g, b) in o.balance {
            balance[g] += b;
        }
        for (layer, l) in o.loads {
            let e = loads.entry(layer).or_insert_with(|| vec![0; l.len()]);
            e.iter_mut().zip(&l).for_each(|(a, b)| *a += b);
        }
        for m in o.modules {
            copies[m.stage].push((m.dir, m.grad));
        }
        ranks.push(o.timing);
    }
    if let Some(j) = losses.iter().position(|l| l.is_nan()) {
        return Err(ierr(format!("micro-batch {j} never reached the loss")));
    }
    // the copies of a stage (DualPipe: one per direction) reduced as a data-parallel pair
    let mut grad = zeros;
    for (st, mut cs) in stages.iter().zip(copies) {
        cs.sort_by_key(|c| c.0);
        let mut it = cs.into_iter().map(|c| c.1);
        let Some(mut first) = it.next() else { continue };
        for mut other in it {
            add_stage_grad(&mut first, &mut other);
        }
        store_stage_grad(st, first, &mut grad);
    }
    Ok(StepOutput { losses, balance, loads: loads.into_values().collect(), grad, ranks, wall_s })
}

/// A [`Trainer`] step through the pipeline: the gradients of [`run_step`], then the trainer's
/// clipping, AdamW and bias update. The MTP loss is not run by the pipeline (an error when the
/// model has MTP modules and `mtp_lambda > 0`).
pub fn train_step(tr: &mut Trainer, s: &Schedule, micro: &[MicroBatch]) -> Result<(StepMetrics, Vec<RankTiming>)> {
    if tr.cfg.mtp_lambda > 0.0 && !tr.model.mtp.is_empty() {
        return Err(Error::Unsupported("the MTP loss in pipeline training (use --mtp-lambda 0)".into()));
    }
    let opts = LossOptions { seq_alpha: tr.cfg.seq_aux_alpha, aux_alpha: tr.cfg.aux_loss_alpha };
    let out = run_step(&tr.model, s, micro, &opts)?;
    let w = weights(micro)?;
    let mut m = StepMetrics { step: tr.step, ..Default::default() };
    m.loss = out.losses.iter().zip(&w).map(|(l, w)| (l * w) as f64).sum::<f64>() as f32;
    m.balance_loss = out.balance.iter().zip(&w).map(|(l, w)| (l * w) as f64).sum::<f64>() as f32;
    m.tokens = micro.iter().map(|mb| mb.seqs.iter().map(|s| s.len()).sum::<usize>()).sum();
    m.predicted = micro.iter().map(|mb| mb.seqs.iter().map(|s| s.len().saturating_sub(1)).sum::<usize>()).sum();
    m.expert_load = out.loads;
    tr.grad = out.grad;
    tr.finish_step(&mut m)?;
    Ok((m, out.ranks))
}
