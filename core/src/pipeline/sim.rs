//! A discrete-event replay of a [`Schedule`]: each rank runs its ops in order; an op starts when
//! its rank is free and its inputs exist — `F(d,s,j)` needs `F(d,s−1,j)`, `B(d,s,j)` needs
//! `F(d,s,j)` and `B(d,s+1,j)`, `W` needs its input-grad-only `B` — whichever rank produced them
//! (the implied sends and receives cost nothing). Reports each rank's timeline, its bubble
//! (makespan − busy time), the peak number of live forward activations, and deadlocks.
use crate::error::{ierr, Result};
use crate::pipeline::schedule::{Chunk, Op, Schedule};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Per-op costs. A full backward costs `b`; an input-grad-only backward `b − w`; a weight job
/// `w`; an overlapped forward+backward `fb`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub f: f64,
    pub b: f64,
    pub w: f64,
    pub fb: f64,
}

impl Default for Costs {
    /// F:B:W = 1:2:1 with F&B = 3 (the DualPipe README's figure).
    fn default() -> Self {
        Costs { f: 1.0, b: 2.0, w: 1.0, fb: 3.0 }
    }
}

impl Costs {
    /// Checks that every cost is finite and non-negative and `w <= b`.
    pub fn check(&self) -> Result<()> {
        for (n, v) in [("F", self.f), ("B", self.b), ("W", self.w), ("FB", self.fb)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ierr(format!("cost {n} must be finite and >= 0, got {v}")));
            }
        }
        if self.w > self.b {
            return Err(ierr(format!("cost W ({}) must not exceed B ({}): a zb backward costs B − W", self.w, self.b)));
        }
        Ok(())
    }

    /// The cost of `op`.
    pub fn of(&self, op: &Op) -> f64 {
        match op {
            Op::F(_) => self.f,
            Op::B { zb: false, .. } => self.b,
            Op::B { zb: true, .. } => self.b - self.w,
            Op::W(_) => self.w,
            Op::FB { .. } => self.fb,
        }
    }
}

/// One op on a rank's timeline: `ops[rank][op]` ran from `start` to `end`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub op: usize,
    pub start: f64,
    pub end: f64,
}

/// What a replay reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// Finish time of the last op.
    pub makespan: f64,
    /// Per rank, its ops in order with their times.
    pub timelines: Vec<Vec<Span>>,
    /// Per rank, the sum of its ops' costs.
    pub busy: Vec<f64>,
    /// Per rank, `makespan − busy`.
    pub bubble: Vec<f64>,
    /// Per rank, the most forward activations alive at once: an F adds one; a full B frees
    /// its chunk's; an input-grad-only B keeps it for its W, which frees it. An FB allocates
    /// its forward's activation before its backward frees one.
    pub peak_activations: Vec<usize>,
}

/// Replays `s` with `costs`. Errors: an invalid schedule ([`Schedule::validate`]) or a deadlock
/// (the message names each stuck rank, its next op and the input it waits for).
pub fn simulate(s: &Schedule, costs: &Costs) -> Result<SimResult> {
    costs.check()?;
    s.validate()?;
    let (s_n, c_n) = (s.stages(), s.per_dir());
    let idx = |c: &Chunk| (c.dir * s_n + c.stage) * c_n + c.mb;
    let n = s.dirs() * s_n * c_n;
    let (mut f_done, mut b_done): (Vec<Option<f64>>, Vec<Option<f64>>) = (vec![None; n], vec![None; n]);
    let p = s.ranks.len();
    let mut next = vec![0usize; p];
    let mut free = vec![0f64; p];
    let mut timelines: Vec<Vec<Span>> = s.ranks.iter().map(|r| Vec::with_capacity(r.len())).collect();
    // the time an op's inputs are ready, or the input it still waits for
    let ready = |op: &Op, f_done: &[Option<f64>], b_done: &[Option<f64>]| -> core::result::Result<f64, String> {
        let mut t = 0f64;
        for (is_f, c) in deps(op, s_n) {
            match if is_f { f_done[idx(&c)] } else { b_done[idx(&c)] } {
                Some(x) => t = t.max(x),
                None => {
                    return Err(format!(
                        "{}(dir {}, stage {}, mb {})",
                        if is_f { "F" } else { "B" },
                        c.dir,
                        c.stage,
                        c.mb
                    ))
                }
            }
        }
        Ok(t)
    };
    let total: usize = s.ranks.iter().map(|r| r.len()).sum();
    let mut done = 0;
    loop {
        let mut progress = false;
        for r in 0..p {
            while let Some(op) = s.ranks[r].get(next[r]) {
                let Ok(t) = ready(op, &f_done, &b_done) else { break };
                let start = t.max(free[r]);
                let end = start + costs.of(op);
                match op {
                    Op::F(c) => f_done[idx(c)] = Some(end),
                    Op::B { c, .. } => b_done[idx(c)] = Some(end),
                    Op::W(_) => {}
                    Op::FB { f, b, .. } => {
                        f_done[idx(f)] = Some(end);
                        b_done[idx(b)] = Some(end);
                    }
                }
                timelines[r].push(Span { op: next[r], start, end });
                free[r] = end;
                next[r] += 1;
                done += 1;
                progress = true;
            }
        }
        if done == total {
            break;
        }
        if !progress {
            let stuck: Vec<String> = (0..p)
                .filter_map(|r| {
                    let op = s.ranks[r].get(next[r])?;
                    let waits = ready(op, &f_done, &b_done).err().unwrap_or_default();
                    Some(format!("rank {r} at op {} {op:?} waits for {waits}", next[r]))
                })
                .collect();
            return Err(ierr(format!("{} schedule deadlocks: {}", s.kind.name(), stuck.join("; "))));
        }
    }
    let makespan = free.iter().copied().fold(0f64, f64::max);
    let busy: Vec<f64> = s.ranks.iter().map(|ops| ops.iter().map(|o| costs.of(o)).sum()).collect();
    let bubble = busy.iter().map(|b| makespan - b).collect();
    let peak_activations = s.ranks.iter().map(|ops| peak_live(ops)).collect();
    Ok(SimResult { makespan, timelines, busy, bubble, peak_activations })
}

/// The inputs of `op` on a path of `s_n` stages: `(true, c)` = `F(c)`, `(false, c)` = `B(c)`.
fn deps(op: &Op, s_n: usize) -> Vec<(bool, Chunk)> {
    let mut d = Vec::new();
    let fwd = |c: &Chunk, d: &mut Vec<(bool, Chunk)>| {
        if c.stage > 0 {
            d.push((true, Chunk { stage: c.stage - 1, ..*c }));
        }
    };
    let bwd = |c: &Chunk, d: &mut Vec<(bool, Chunk)>| {
        d.push((true, *c));
        if c.stage + 1 < s_n {
            d.push((false, Chunk { stage: c.stage + 1, ..*c }));
        }
    };
    match op {
        Op::F(c) => fwd(c, &mut d),
        Op::B { c, .. } => bwd(c, &mut d),
        Op::W(c) => d.push((false, *c)),
        Op::FB { f, b, .. } => {
            fwd(f, &mut d);
            bwd(b, &mut d);
        }
    }
    d
}

/// The most forward activations alive at once on a rank running `ops` in order, as the
/// `dsv3 schedule` contract defines it: an F adds one, its B (full or input-grad-only) frees it;
/// a W changes nothing. (A deferred W still reads the layer inputs it saved, so real memory under
/// ZB-H1 is higher than this count: PP on every rank rather than PP − r.)
pub fn peak_live(ops: &[Op]) -> usize {
    let (mut live, mut peak) = (0usize, 0usize);
    for op in ops {
        match op {
            Op::F(_) => live += 1,
            Op::B { .. } => live = live.saturating_sub(1),
            Op::W(_) => {}
            Op::FB { .. } => {
                // the forward's activation exists before the overlapped backward frees another
                live += 1;
                peak = peak.max(live);
                live -= 1;
            }
        }
        peak = peak.max(live);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedule::Kind;
    use alloc::string::ToString;

    fn run(kind: Kind, p: usize, m: usize, c: Costs) -> SimResult {
        simulate(&Schedule::new(kind, p, m).unwrap(), &c).unwrap_or_else(|e| panic!("{kind:?} pp={p} m={m}: {e}"))
    }

    fn max(v: &[f64]) -> f64 {
        v.iter().copied().fold(f64::MIN, f64::max)
    }

    fn costs(f: f64, b: f64, w: f64, fb: f64) -> Costs {
        Costs { f, b, w, fb }
    }

    #[test]
    fn one_f_one_b_bubble_and_memory() {
        for (p, m) in [(2, 4), (4, 8), (8, 20), (8, 40), (16, 64)] {
            for c in [costs(1.0, 2.0, 1.0, 3.0), costs(1.0, 1.5, 0.5, 2.0), costs(2.0, 3.0, 1.0, 4.0)] {
                let r = run(Kind::OneFOneB, p, m, c);
                let want = (p - 1) as f64 * (c.f + c.b);
                for (i, b) in r.bubble.iter().enumerate() {
                    assert_eq!(*b, want, "pp={p} m={m} rank {i}");
                }
                let peaks: Vec<usize> = (0..p).map(|i| p - i).collect();
                assert_eq!(r.peak_activations, peaks);
                assert_eq!(r.makespan, (m + p - 1) as f64 * (c.f + c.b));
            }
        }
    }

    #[test]
    fn zb_h1_bubble_and_memory() {
        for (p, m) in [(2, 4), (4, 8), (8, 20), (8, 40), (16, 64)] {
            for c in [costs(1.0, 2.0, 1.0, 3.0), costs(1.0, 2.0, 0.5, 3.0), costs(1.0, 1.8, 0.9, 2.0)] {
                let r = run(Kind::Zb1p, p, m, c);
                let want = (p - 1) as f64 * (c.f + c.b - 2.0 * c.w);
                assert!((max(&r.bubble) - want).abs() < 1e-9, "pp={p} m={m} {c:?}: {:?} vs {want}", r.bubble);
                // the contract's count (an F adds one, its B frees it): PP − r, as 1F1B
                let peaks: Vec<usize> = (0..p).map(|i| p - i).collect();
                assert_eq!(r.peak_activations, peaks, "pp={p} m={m}");
            }
        }
    }

    #[test]
    fn dualpipe_bubble_and_memory() {
        // (PP/2 − 1)(F&B + B − 3W) at F:B:W = 1:2:1, F&B = 3 (and 2), independent of M
        for p in [4, 6, 8, 16] {
            for m in [2 * p, 20.max(2 * p), 40.max(2 * p), 64] {
                for fb in [3.0, 2.0] {
                    let c = costs(1.0, 2.0, 1.0, fb);
                    let r = run(Kind::DualPipe, p, m, c);
                    let want = (p / 2 - 1) as f64 * (fb + c.b - 3.0 * c.w);
                    assert_eq!(max(&r.bubble), want, "pp={p} m={m} fb={fb}: {:?}", r.bubble);
                    assert_eq!(r.peak_activations, vec![p + 1; p], "pp={p} m={m}");
                }
            }
        }
        // the spec's numbers: 6 (PP 8) and 14 (PP 16) at F&B = 3; 3 and 7 at F&B = 2
        assert_eq!(max(&run(Kind::DualPipe, 8, 20, Costs::default()).bubble), 6.0);
        assert_eq!(max(&run(Kind::DualPipe, 16, 40, Costs::default()).bubble), 14.0);
        assert_eq!(max(&run(Kind::DualPipe, 8, 40, costs(1.0, 2.0, 1.0, 2.0)).bubble), 3.0);
        assert_eq!(max(&run(Kind::DualPipe, 16, 64, costs(1.0, 2.0, 1.0, 2.0)).bubble), 7.0);
        // at other ratios the closed form is only approximate (spec §3.3)
        assert_eq!(max(&run(Kind::DualPipe, 8, 40, costs(1.0, 2.0, 0.5, 3.0)).bubble), 9.5);
    }

    #[test]
    fn dualpipev_bubble_and_memory() {
        // PP = 2N stages on N ranks: bubble (PP/2 − 1)(F&B + B − 3W) = (N − 1)(...), PP + 1
        // activations
        for n in [2, 4, 8] {
            for m in [2 * n, 20.max(2 * n), 40] {
                let c = Costs::default();
                let r = run(Kind::DualPipeV, n, m, c);
                let want = (n - 1) as f64 * (c.fb + c.b - 3.0 * c.w);
                assert_eq!(max(&r.bubble), want, "N={n} m={m}: {:?}", r.bubble);
                assert_eq!(r.peak_activations.iter().max(), Some(&(2 * n + 1)), "N={n} m={m}");
            }
        }
    }

    #[test]
    fn dependencies_hold_on_the_timeline() {
        for (kind, p, m) in
            [(Kind::OneFOneB, 4, 8), (Kind::Zb1p, 4, 9), (Kind::DualPipe, 4, 10), (Kind::DualPipeV, 3, 7)]
        {
            let s = Schedule::new(kind, p, m).unwrap();
            let r = simulate(&s, &Costs::default()).unwrap();
            let mut f_end = alloc::collections::BTreeMap::new();
            let mut b_end = alloc::collections::BTreeMap::new();
            let mut spans = Vec::new();
            for (rank, tl) in r.timelines.iter().enumerate() {
                assert_eq!(tl.len(), s.ranks[rank].len());
                let mut t = 0.0;
                for sp in tl {
                    assert!(sp.start >= t, "ops of a rank overlap");
                    t = sp.end;
                    let op = s.ranks[rank][sp.op];
                    let key = |c: &Chunk| (c.dir, c.stage, c.mb);
                    match op {
                        Op::F(c) => {
                            f_end.insert(key(&c), sp.end);
                        }
                        Op::B { c, .. } => {
                            b_end.insert(key(&c), sp.end);
                        }
                        Op::FB { f, b, .. } => {
                            f_end.insert(key(&f), sp.end);
                            b_end.insert(key(&b), sp.end);
                        }
                        Op::W(_) => {}
                    }
                    spans.push((op, sp.start));
                }
            }
            let sn = s.stages();
            for (op, start) in spans {
                let fwd = |c: Chunk| c.stage == 0 || f_end[&(c.dir, c.stage - 1, c.mb)] <= start;
                let bwd = |c: Chunk| {
                    f_end[&(c.dir, c.stage, c.mb)] <= start
                        && (c.stage + 1 == sn || b_end[&(c.dir, c.stage + 1, c.mb)] <= start)
                };
                let ok = match op {
                    Op::F(c) => fwd(c),
                    Op::B { c, .. } => bwd(c),
                    Op::W(c) => b_end[&(c.dir, c.stage, c.mb)] <= start,
                    Op::FB { f, b, .. } => fwd(f) && bwd(b),
                };
                assert!(ok, "{kind:?}: {op:?} starts before its inputs");
            }
        }
    }

    #[test]
    fn deadlock_is_a_clear_error() {
        let mut s = Schedule::new(Kind::OneFOneB, 2, 2).unwrap();
        // rank 0 runs B(mb 0) before its own F(mb 0); rank 1 waits for that F
        s.ranks[0].swap(0, 2);
        let e = simulate(&s, &Costs::default()).unwrap_err().to_string();
        assert!(e.contains("deadlocks") && e.contains("rank 0"), "{e}");
        // a missing op is caught before replaying
        let mut s = Schedule::new(Kind::Zb1p, 2, 2).unwrap();
        s.ranks[1].pop();
        assert!(simulate(&s, &Costs::default()).is_err());
        let bad = Costs { w: 3.0, ..Costs::default() };
        assert!(simulate(&Schedule::new(Kind::Zb1p, 2, 2).unwrap(), &bad).unwrap_err().to_string().contains("W"));
    }
}
