//! Per-rank pipeline schedules: 1F1B, ZB-H1, DualPipe and DualPipeV as op lists.
//!
//! A micro-batch travels along a path of `S` stages in a direction `dir` (0, or 1 for
//! DualPipe's second half of the micro-batches, which enters at the last rank). A [`Chunk`]
//! names one micro-batch at one stage. Rank placement ([`Schedule::rank_of`]):
//! - 1F1B, ZB-H1: `S = PP`, stage `s` on rank `s`.
//! - DualPipe: `S = PP`; rank `r` holds model stage `r` (direction 0's stage `r`) and model
//!   stage `PP−1−r` (direction 1's stage `r` counted from its entry at rank `PP−1`).
//! - DualPipeV: `S = 2·PP`; rank `r` holds stage `r` and stage `2·PP−1−r` (the V).
//!
//! The DualPipe and DualPipeV lists follow DeepSeek's `dualpipe.py` / `dualpipev.py` `step`
//! (8 named phases), the baselines the usual warmup / steady / cooldown.
use crate::error::{ierr, Result};
use alloc::collections::VecDeque;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One forward, one backward (PipeDream-flush).
    OneFOneB,
    /// Zero Bubble ZB-H1: 1F1B with the weight gradient deferred to fill the cooldown.
    Zb1p,
    /// DeepSeek-V3's bidirectional DualPipe (two chunks per rank, two directions).
    DualPipe,
    /// DualPipe "cut in half": one direction through a V of `2·PP` stages on `PP` ranks.
    DualPipeV,
}

impl Kind {
    /// Parses `1f1b`, `zb1p`, `dualpipe`, `dualpipev`.
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "1f1b" => Ok(Kind::OneFOneB),
            "zb1p" => Ok(Kind::Zb1p),
            "dualpipe" => Ok(Kind::DualPipe),
            "dualpipev" => Ok(Kind::DualPipeV),
            o => Err(ierr(format!("schedule kind must be 1f1b, zb1p, dualpipe or dualpipev, got '{o}'"))),
        }
    }

    /// The name [`Kind::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Kind::OneFOneB => "1f1b",
            Kind::Zb1p => "zb1p",
            Kind::DualPipe => "dualpipe",
            Kind::DualPipeV => "dualpipev",
        }
    }

    /// Stages along a micro-batch's path for `pp` ranks.
    pub fn stages(self, pp: usize) -> usize {
        if self == Kind::DualPipeV {
            2 * pp
        } else {
            pp
        }
    }

    /// Directions micro-batches travel in (2 for DualPipe).
    pub fn dirs(self) -> usize {
        if self == Kind::DualPipe {
            2
        } else {
            1
        }
    }
}

/// One micro-batch at one stage: direction, stage along its path (0 = embedding side), and the
/// micro-batch's index within its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub dir: usize,
    pub stage: usize,
    pub mb: usize,
}

/// One op of a rank's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward of a chunk (receives its input from the previous stage, sends its output on).
    F(Chunk),
    /// Backward of a chunk: full (`zb: false`), or only the input gradient (`zb: true`) with the
    /// weight gradient left to a later [`Op::W`].
    B { c: Chunk, zb: bool },
    /// Runs the oldest deferred weight-gradient job of the rank (FIFO); it is `c`'s.
    W(Chunk),
    /// A forward of one chunk overlapped with the backward of another.
    FB { f: Chunk, b: Chunk, zb: bool },
}

/// A point-to-point transfer an op implies: `to`/`from` rank and the chunk whose boundary tensor
/// moves (an activation for forwards, a gradient for backwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub peer: usize,
    pub chunk: Chunk,
    /// true: activation (forward), false: gradient (backward).
    pub forward: bool,
}

/// Per-rank op lists, each in execution order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub pp: usize,
    pub micro_batches: usize,
    pub ranks: Vec<Vec<Op>>,
}

/// Most ranks or micro-batches a schedule is built for (keeps op lists to a sane size).
pub const MAX_PP: usize = 1024;
pub const MAX_MICRO_BATCHES: usize = 1 << 16;

impl Schedule {
    /// Builds the schedule. Preconditions (clear errors): `pp >= 1`, `micro_batches >= 1`;
    /// DualPipe: `pp` even, `micro_batches` even and `>= 2·pp`; DualPipeV: `micro_batches >= 2·pp`.
    pub fn new(kind: Kind, pp: usize, micro_batches: usize) -> Result<Schedule> {
        let k = kind.name();
        if pp == 0 || pp > MAX_PP {
            return Err(ierr(format!("{k}: pp must be in 1..={MAX_PP}, got {pp}")));
        }
        if micro_batches == 0 || micro_batches > MAX_MICRO_BATCHES {
            return Err(ierr(format!("{k}: micro-batches must be in 1..={MAX_MICRO_BATCHES}, got {micro_batches}")));
        }
        let ranks = match kind {
            Kind::OneFOneB => (0..pp).map(|i| one_f_one_b(pp, micro_batches, i)).collect(),
            Kind::Zb1p => (0..pp).map(|i| zb_h1(pp, micro_batches, i)).collect(),
            Kind::DualPipe => {
                if !pp.is_multiple_of(2) {
                    return Err(ierr(format!("dualpipe: pp must be even, got {pp}")));
                }
                if !micro_batches.is_multiple_of(2) || micro_batches < 2 * pp {
                    return Err(ierr(format!(
                        "dualpipe: micro-batches must be even and >= 2*pp = {}, got {micro_batches}",
                        2 * pp
                    )));
                }
                (0..pp).map(|r| dual(kind, pp, micro_batches, r)).collect()
            }
            Kind::DualPipeV => {
                if micro_batches < 2 * pp {
                    return Err(ierr(format!(
                        "dualpipev: micro-batches must be >= 2*pp = {}, got {micro_batches}",
                        2 * pp
                    )));
                }
                (0..pp).map(|r| dual(kind, pp, micro_batches, r)).collect()
            }
        };
        Ok(Schedule { kind, pp, micro_batches, ranks })
    }

    /// Stages along a path (`S`).
    pub fn stages(&self) -> usize {
        self.kind.stages(self.pp)
    }

    /// Directions (2 for DualPipe, else 1).
    pub fn dirs(&self) -> usize {
        self.kind.dirs()
    }

    /// Micro-batches per direction.
    pub fn per_dir(&self) -> usize {
        self.micro_batches / self.dirs()
    }

    /// The global micro-batch index of `mb` in direction `dir` (direction 1 holds the second half).
    pub fn global_mb(&self, dir: usize, mb: usize) -> usize {
        dir * self.per_dir() + mb
    }

    /// The rank holding stage `stage` of direction `dir`.
    pub fn rank_of(&self, dir: usize, stage: usize) -> usize {
        let (p, s) = (self.pp, stage);
        match self.kind {
            Kind::OneFOneB | Kind::Zb1p => s,
            Kind::DualPipe => {
                if dir == 0 {
                    s
                } else {
                    p - 1 - s
                }
            }
            Kind::DualPipeV => {
                if s < p {
                    s
                } else {
                    2 * p - 1 - s
                }
            }
        }
    }

    /// The sends an op's forward / backward part implies after it runs (none when the
    /// neighbour stage is on the same rank, as at the bottom of DualPipeV's V).
    pub fn sends(&self, rank: usize, op: &Op) -> Vec<Transfer> {
        let mut out = Vec::new();
        let s_n = self.stages();
        let mut fwd = |c: &Chunk| {
            if c.stage + 1 < s_n {
                let peer = self.rank_of(c.dir, c.stage + 1);
                if peer != rank {
                    out.push(Transfer { peer, chunk: *c, forward: true });
                }
            }
        };
        match op {
            Op::F(c) => fwd(c),
            Op::FB { f, .. } => fwd(f),
            _ => {}
        }
        if let Op::B { c, .. } | Op::FB { b: c, .. } = op {
            if c.stage > 0 {
                let peer = self.rank_of(c.dir, c.stage - 1);
                if peer != rank {
                    out.push(Transfer { peer, chunk: *c, forward: false });
                }
            }
        }
        out
    }

    /// The receives an op needs before it runs (the previous stage's activation for a forward,
    /// the next stage's gradient for a backward), when that stage lives on another rank.
    pub fn recvs(&self, rank: usize, op: &Op) -> Vec<Transfer> {
        let mut out = Vec::new();
        let s_n = self.stages();
        if let Op::F(c) | Op::FB { f: c, .. } = op {
            if c.stage > 0 {
                let peer = self.rank_of(c.dir, c.stage - 1);
                if peer != rank {
                    out.push(Transfer { peer, chunk: *c, forward: true });
                }
            }
        }
        if let Op::B { c, .. } | Op::FB { b: c, .. } = op {
            if c.stage + 1 < s_n {
                let peer = self.rank_of(c.dir, c.stage + 1);
                if peer != rank {
                    out.push(Transfer { peer, chunk: *c, forward: false });
                }
            }
        }
        out
    }

    /// Checks the lists: every chunk's F and B appear exactly once, on the rank that holds the
    /// chunk's stage; every input-grad-only B has exactly one W after it on its rank, and the
    /// W's of a rank come in the order of their B's (FIFO). Dependencies are checked by the
    /// simulator ([`crate::pipeline::sim::simulate`]).
    pub fn validate(&self) -> Result<()> {
        let (dirs, s_n, c_n) = (self.dirs(), self.stages(), self.per_dir());
        let idx = |c: &Chunk| (c.dir * s_n + c.stage) * c_n + c.mb;
        let n = dirs * s_n * c_n;
        let (mut f_seen, mut b_seen, mut w_seen) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
        let mut zb = vec![false; n];
        if self.ranks.len() != self.pp {
            return Err(ierr(format!("{} rank lists for pp = {}", self.ranks.len(), self.pp)));
        }
        for (r, ops) in self.ranks.iter().enumerate() {
            let mut fifo: VecDeque<Chunk> = VecDeque::new();
            let check = |c: &Chunk| -> Result<()> {
                if c.dir >= dirs || c.stage >= s_n || c.mb >= c_n {
                    return Err(ierr(format!("rank {r}: chunk {c:?} out of range")));
                }
                if self.rank_of(c.dir, c.stage) != r {
                    return Err(ierr(format!(
                        "rank {r}: chunk {c:?} belongs to rank {}",
                        self.rank_of(c.dir, c.stage)
                    )));
                }
                Ok(())
            };
            for op in ops {
                let mut fwd = |c: &Chunk| -> Result<()> {
                    check(c)?;
                    f_seen[idx(c)] += 1;
                    Ok(())
                };
                match op {
                    Op::F(c) => fwd(c)?,
                    Op::FB { f, .. } => fwd(f)?,
                    _ => {}
                }
                match op {
                    Op::B { c, zb: z } | Op::FB { b: c, zb: z, .. } => {
                        check(c)?;
                        b_seen[idx(c)] += 1;
                        zb[idx(c)] = *z;
                        if *z {
                            fifo.push_back(*c);
                        }
                    }
                    Op::W(c) => {
                        check(c)?;
                        w_seen[idx(c)] += 1;
                        if fifo.pop_front() != Some(*c) {
                            return Err(ierr(format!("rank {r}: W of {c:?} is not the oldest deferred job")));
                        }
                    }
                    Op::F(_) => {}
                }
            }
            if let Some(c) = fifo.front() {
                return Err(ierr(format!("rank {r}: the weight gradient of {c:?} is never run")));
            }
        }
        for d in 0..dirs {
            for s in 0..s_n {
                for j in 0..c_n {
                    let c = Chunk { dir: d, stage: s, mb: j };
                    let i = idx(&c);
                    if f_seen[i] != 1 || b_seen[i] != 1 || w_seen[i] != zb[i] as u8 {
                        return Err(ierr(format!(
                            "chunk {c:?}: {} forwards, {} backwards, {} weight jobs (zb: {})",
                            f_seen[i], b_seen[i], w_seen[i], zb[i]
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// 1F1B on stage `i` of `p`: warmup `min(p−1−i, m)` forwards, then F,B pairs, then the
/// remaining backwards.
fn one_f_one_b(p: usize, m: usize, i: usize) -> Vec<Op> {
    let c = |mb| Chunk { dir: 0, stage: i, mb };
    let w = (p - 1 - i).min(m);
    let mut ops: Vec<Op> = (0..w).map(|j| Op::F(c(j))).collect();
    for k in 0..m - w {
        ops.push(Op::F(c(w + k)));
        ops.push(Op::B { c: c(k), zb: false });
    }
    ops.extend((m - w..m).map(|k| Op::B { c: c(k), zb: false }));
    ops
}

/// ZB-H1 on stage `i` of `p`: 1F1B's warmup, then forwards and input-grad backwards; a weight
/// job runs only while more than `i` are pending (stage `i` defers `i` of them into the
/// cooldown), and the rest are flushed at the end.
fn zb_h1(p: usize, m: usize, i: usize) -> Vec<Op> {
    let c = |mb| Chunk { dir: 0, stage: i, mb };
    let w = (p - 1 - i).min(m);
    let mut ops: Vec<Op> = (0..w).map(|j| Op::F(c(j))).collect();
    let mut pending: VecDeque<usize> = VecDeque::new();
    let b = |ops: &mut Vec<Op>, k: usize, pending: &mut VecDeque<usize>| {
        ops.push(Op::B { c: c(k), zb: true });
        pending.push_back(k);
        while pending.len() > i {
            let j = pending.pop_front().unwrap_or_default();
            ops.push(Op::W(c(j)));
        }
    };
    for k in 0..m - w {
        ops.push(Op::F(c(w + k)));
        b(&mut ops, k, &mut pending);
    }
    for k in m - w..m {
        b(&mut ops, k, &mut pending);
    }
    ops.extend(pending.into_iter().map(|j| Op::W(c(j))));
    ops
}

/// The op builder of one DualPipe / DualPipeV rank: per-chunk counters and the W FIFO.
struct Builder {
    ops: Vec<Op>,
    /// The chunk (direction, stage) of module 0 and module 1.
    module: [(usize, usize); 2],
    /// Phase p uses module `p ^ flip`.
    flip: usize,
    f_next: [usize; 2],
    b_next: [usize; 2],
    fifo: VecDeque<Chunk>,
}

impl Builder {
    fn chunk(&self, phase: usize, mb: usize) -> Chunk {
        let (dir, stage) = self.module[phase ^ self.flip];
        Chunk { dir, stage, mb }
    }
    fn next_f(&mut self, phase: usize) -> Chunk {
        let m = phase ^ self.flip;
        let c = self.chunk(phase, self.f_next[m]);
        self.f_next[m] += 1;
        c
    }
    fn next_b(&mut self, phase: usize) -> Chunk {
        let m = phase ^ self.flip;
        let c = self.chunk(phase, self.b_next[m]);
        self.b_next[m] += 1;
        c
    }
    fn f(&mut self, phase: usize) {
        let c = self.next_f(phase);
        self.ops.push(Op::F(c));
    }
    fn b(&mut self, phase: usize, zb: bool) {
        let c = self.next_b(phase);
        if zb {
            self.fifo.push_back(c);
        }
        self.ops.push(Op::B { c, zb });
    }
    fn w(&mut self) {
        if let Some(c) = self.fifo.pop_front() {
            self.ops.push(Op::W(c));
        }
    }
    fn fb(&mut self, f_phase: usize, b_phase: usize) {
        let f = self.next_f(f_phase);
        let b = self.next_b(b_phase);
        self.ops.push(Op::FB { f, b, zb: false });
    }
}

/// DualPipe (`kind` DualPipe: `n` = PP ranks, `m` micro-batches in two directions) or DualPipeV
/// (`n` ranks, `2n` stages, one direction), rank `r`: DeepSeek's 8 steps.
fn dual(kind: Kind, n: usize, m: usize, r: usize) -> Vec<Op> {
    // (half-)rank count, position, chunks per phase, and the rank that does not overlap its
    // first main-step pair
    let (big_h, h, c, special, flip, module) = match kind {
        Kind::DualPipe => {
            let big_h = n / 2;
            let second = usize::from(r >= big_h);
            (big_h, r.min(n - 1 - r), m / 2, r.min(n - 1 - r) == big_h - 1, second, [(0, r), (1, n - 1 - r)])
        }
        _ => (n, r, m, r == n - 1, 0, [(0, r), (0, 2 * n - 1 - r)]),
    };
    let mut bd = Builder { ops: Vec::new(), module, flip, f_next: [0; 2], b_next: [0; 2], fifo: VecDeque::new() };
    // step 1: nF0
    for _ in 0..2 * (big_h - h - 1) {
        bd.f(0);
    }
    // step 2: nF0F1
    for _ in 0..h + 1 {
        bd.f(0);
        bd.f(1);
    }
    // step 3: nB1W1F1 (zero bubble)
    for _ in 0..big_h - h - 1 {
        bd.b(1, true);
        bd.w();
        bd.f(1);
    }
    // step 4 (main): nF0B1F1B0; the special rank's first F0/B1 pair is not overlapped
    // DualPipe: C − PP + h + 1 iterations (C per direction); DualPipeV: M − 2N + r + 1
    let stages = kind.stages(n);
    for i in 0..c + h + 1 - stages {
        if i == 0 && special {
            bd.f(0);
            bd.b(1, false);
        } else {
            bd.fb(0, 1);
        }
        bd.fb(1, 0);
    }
    // step 5: nB1F1B0
    for _ in 0..big_h - h - 1 {
        bd.b(1, false);
        bd.fb(1, 0);
    }
    // step 6: nB1B0, zero bubble from iteration (h+1)/2 on
    let step6 = h + 1;
    let mut zb = false;
    for i in 0..step6 {
        if i == step6 / 2 && h % 2 == 1 {
            zb = true;
        }
        bd.b(1, zb);
        if i == step6 / 2 && h % 2 == 0 {
            zb = true;
        }
        bd.b(0, zb);
    }
    // step 7: nWB0
    for _ in 0..big_h - h - 1 {
        bd.w();
        bd.b(0, true);
    }
    // step 8: nW
    for _ in 0..h + 1 {
        bd.w();
    }
    bd.ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn every_schedule_validates() {
        for (kind, pps, ms) in [
            (Kind::OneFOneB, &[1usize, 2, 3, 4, 8][..], &[1usize, 2, 5, 8, 16][..]),
            (Kind::Zb1p, &[1, 2, 3, 4, 8], &[1, 2, 5, 8, 16]),
            (Kind::DualPipe, &[2, 4, 6, 8, 16], &[32, 40, 64]),
            (Kind::DualPipeV, &[1, 2, 3, 4, 8], &[16, 17, 20, 32]),
        ] {
            for &p in pps {
                for &m in ms {
                    let s = Schedule::new(kind, p, m).unwrap();
                    s.validate().unwrap_or_else(|e| panic!("{kind:?} pp={p} m={m}: {e}"));
                    let n_ops: usize = s.ranks.iter().map(|r| r.len()).sum();
                    assert!(n_ops >= 2 * p * m / kind.dirs());
                }
            }
        }
    }

    #[test]
    fn dualpipe_counts_per_rank() {
        // each rank: C forwards and C backwards per phase; zb B's = W's = 2(H−h−1) + (h+1)
        let (p, m) = (8, 20);
        let s = Schedule::new(Kind::DualPipe, p, m).unwrap();
        for (r, ops) in s.ranks.iter().enumerate() {
            let h = r.min(p - 1 - r);
            let (mut f, mut b, mut zb, mut w) = ([0usize; 2], [0usize; 2], 0, 0);
            for op in ops {
                match op {
                    Op::F(c) => f[c.dir] += 1,
                    Op::B { c, zb: z } => {
                        b[c.dir] += 1;
                        zb += *z as usize;
                    }
                    Op::W(_) => w += 1,
                    Op::FB { f: a, b: bb, .. } => {
                        f[a.dir] += 1;
                        b[bb.dir] += 1;
                    }
                }
            }
            assert_eq!((f, b), ([m / 2; 2], [m / 2; 2]), "rank {r}");
            assert_eq!(zb, 2 * (p / 2 - h - 1) + h + 1, "rank {r}");
            assert_eq!(w, zb, "rank {r}");
        }
        // ranks r and PP−1−r run mirrored lists
        for r in 0..p / 2 {
            assert_eq!(s.ranks[r].len(), s.ranks[p - 1 - r].len());
        }
    }

    #[test]
    fn preconditions_are_clear_errors() {
        let msg = |k, p, m| Schedule::new(k, p, m).unwrap_err().to_string();
        assert!(msg(Kind::DualPipe, 3, 12).contains("pp must be even"));
        assert!(msg(Kind::DualPipe, 4, 7).contains("micro-batches must be even and >= 2*pp = 8"));
        assert!(msg(Kind::DualPipe, 4, 6).contains(">= 2*pp"));
        assert!(msg(Kind::DualPipeV, 4, 7).contains(">= 2*pp = 8"));
        assert!(msg(Kind::OneFOneB, 0, 4).contains("pp must be"));
        assert!(msg(Kind::Zb1p, 2, 0).contains("micro-batches must be"));
        assert!(Kind::parse("gpipe").unwrap_err().to_string().contains("1f1b, zb1p, dualpipe or dualpipev"));
    }

    #[test]
    fn transfers_follow_placement() {
        let s = Schedule::new(Kind::DualPipeV, 2, 4).unwrap();
        // rank 1 holds stages 1 and 2: the hand-over between them is local
        let f1 = Op::F(Chunk { dir: 0, stage: 1, mb: 0 });
        assert!(s.sends(1, &f1).is_empty());
        let f2 = Op::F(Chunk { dir: 0, stage: 2, mb: 0 });
        assert!(s.recvs(1, &f2).is_empty());
        assert_eq!(
            s.sends(1, &f2),
            vec![Transfer { peer: 0, chunk: Chunk { dir: 0, stage: 2, mb: 0 }, forward: true }]
        );
        let d = Schedule::new(Kind::DualPipe, 4, 8).unwrap();
        // direction 1 enters at rank 3 and flows to rank 0
        let b = Op::B { c: Chunk { dir: 1, stage: 1, mb: 0 }, zb: false };
        assert_eq!(d.rank_of(1, 1), 2);
        assert_eq!(d.recvs(2, &b)[0].peer, 1);
        assert_eq!(d.sends(2, &b)[0].peer, 3);
    }
}
