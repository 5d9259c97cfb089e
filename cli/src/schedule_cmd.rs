//! `dsv3 schedule`: builds a pipeline schedule, replays it in the simulator, and prints the
//! per-rank op lists with bubbles and peak activations (text or the fixed JSON contract), and
//! optionally an SVG timeline like the DualPipe paper's figure.
use dsv3_core::pipeline::{simulate, Chunk, Costs, Kind, Op, Schedule, SimResult};
use dsv3_core::{Error, Result};
use serde_json::{json, Value};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// 1f1b, zb1p, dualpipe or dualpipev.
    #[arg(long)]
    kind: String,
    /// Pipeline ranks (DualPipe: even; DualPipeV runs 2·PP stages on PP ranks).
    #[arg(long)]
    pp: usize,
    /// Micro-batches per step (DualPipe: even and >= 2·PP; DualPipeV: >= 2·PP).
    #[arg(long)]
    micro_batches: usize,
    /// Op costs F,B,W,FB: forward, full backward, weight-gradient part, overlapped F&B
    /// (an input-grad-only backward costs B−W).
    #[arg(long, value_delimiter = ',', default_value = "1,2,1,3")]
    costs: Vec<f64>,
    /// Print one JSON object (the op lists, bubbles, peak activations, makespan).
    #[arg(long)]
    json: bool,
    /// Also write the timeline as an SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn run(a: ScheduleArgs) -> Result<()> {
    let kind = Kind::parse(&a.kind)?;
    let costs = parse_costs(&a.costs)?;
    let s = Schedule::new(kind, a.pp, a.micro_batches)?;
    let r = simulate(&s, &costs)?;
    if let Some(p) = &a.svg {
        std::fs::write(p, svg(&s, &r, &costs)).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
    }
    if a.json {
        println!("{}", to_json(&s, &r));
    } else {
        print!("{}", summary(&s, &r, &costs));
        if let Some(p) = &a.svg {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// `F,B,W,FB` as [`Costs`].
pub fn parse_costs(v: &[f64]) -> Result<Costs> {
    let [f, b, w, fb] = v[..] else {
        return Err(Error::Input(format!("--costs takes 4 numbers F,B,W,FB, got {}", v.len())));
    };
    let c = Costs { f, b, w, fb };
    c.check()?;
    Ok(c)
}

fn chunk_json(c: &Chunk) -> Value {
    json!({"dir": c.dir, "stage": c.stage, "mb": c.mb})
}

/// One op in the contract's form.
pub fn op_json(op: &Op) -> Value {
    let tagged = |name: &str, c: &Chunk| {
        let mut v = chunk_json(c);
        v["op"] = json!(name);
        v
    };
    match op {
        Op::F(c) => tagged("F", c),
        Op::B { c, zb } => {
            let mut v = tagged("B", c);
            if *zb {
                v["zb"] = json!(true);
            }
            v
        }
        Op::W(c) => tagged("W", c),
        Op::FB { f, b, zb } => {
            let mut bj = chunk_json(b);
            bj["zb"] = json!(zb);
            json!({"op": "FB", "f": chunk_json(f), "b": bj})
        }
    }
}

/// The contract: `{"kind","pp","micro_batches","ranks","bubble","peak_activations","makespan"}`.
pub fn to_json(s: &Schedule, r: &SimResult) -> Value {
    json!({
        "kind": s.kind.name(),
        "pp": s.pp,
        "micro_batches": s.micro_batches,
        "ranks": s.ranks.iter().map(|ops| ops.iter().map(op_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "bubble": r.bubble,
        "peak_activations": r.peak_activations,
        "makespan": r.makespan,
    })
}

/// Whether `c` is the second chunk its rank holds (DualPipe's direction 1, DualPipeV's way back up).
fn second(s: &Schedule, c: &Chunk) -> bool {
    match s.kind {
        Kind::DualPipe => c.dir == 1,
        Kind::DualPipeV => c.stage >= s.pp,
        _ => false,
    }
}

/// A short label: `F3`, `B3` (full backward), `b3` (input gradient only), `W3`, `F4B2` (F&B);
/// `'` marks the rank's second chunk.
fn label(s: &Schedule, op: &Op) -> String {
    let n = |c: &Chunk| format!("{}{}", c.mb, if second(s, c) { "'" } else { "" });
    match op {
        Op::F(c) => format!("F{}", n(c)),
        Op::B { c, zb: false } => format!("B{}", n(c)),
        Op::B { c, zb: true } => format!("b{}", n(c)),
        Op::W(c) => format!("W{}", n(c)),
        Op::FB { f, b, .. } => format!("F{}B{}", n(f), n(b)),
    }
}

fn summary(s: &Schedule, r: &SimResult, c: &Costs) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} schedule: pp {}, {} micro-batches, {} stages; costs F {} B {} W {} F&B {}",
        s.kind.name(),
        s.pp,
        s.micro_batches,
        s.stages(),
        c.f,
        c.b,
        c.w,
        c.fb
    );
    let _ = writeln!(o, "makespan {}  max bubble {}", r.makespan, r.bubble.iter().copied().fold(0f64, f64::max));
    let _ = writeln!(o, "rank   ops     busy   bubble  idle%  peak-act  op order (b = input-grad only, W = weight job, ' = second chunk)");
    for (i, ops) in s.ranks.iter().enumerate() {
        let labels: Vec<String> = ops.iter().map(|op| label(s, op)).collect();
        let _ = writeln!(
            o,
            "{i:>4} {:>5} {:>8} {:>8} {:>6.1} {:>9}  {}",
            ops.len(),
            r.busy[i],
            r.bubble[i],
            100.0 * r.bubble[i] / r.makespan.max(1e-30),
            r.peak_activations[i],
            labels.join(" ")
        );
    }
    o
}

/// Fill colours by op and chunk (first chunk, second chunk).
fn color(op: &str, second: bool) -> &'static str {
    match (op, second) {
        ("F", false) => "#fbd38d",
        ("F", true) => "#ed8936",
        ("B", false) => "#9ae6b4",
        ("B", true) => "#38a169",
        ("b", false) => "#90cdf4",
        ("b", true) => "#3182ce",
        (_, false) => "#d6bcfa",
        (_, true) => "#805ad5",
    }
}

/// The timeline: one row per rank, a box per op (F&B split in two halves), micro-batch numbers.
pub fn svg(s: &Schedule, r: &SimResult, c: &Costs) -> String {
    let (l, top, row, gap) = (70.0, 44.0, 30.0, 6.0);
    let scale = (1100.0 / r.makespan.max(1e-9)).clamp(4.0, 40.0);
    let width = l + r.makespan * scale + 20.0;
    let height = top + s.ranks.len() as f64 * (row + gap) + 50.0;
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        o,
        r#"<rect width="{width:.0}" height="{height:.0}" fill="white"/><text x="{l}" y="22" font-size="14">{} — pp {}, {} micro-batches, F {} B {} W {} F&amp;B {}: makespan {}, max bubble {}</text>"#,
        s.kind.name(),
        s.pp,
        s.micro_batches,
        c.f,
        c.b,
        c.w,
        c.fb,
        r.makespan,
        r.bubble.iter().copied().fold(0f64, f64::max)
    );
    let rect = |o: &mut String, x: f64, y: f64, w: f64, h: f64, fill: &str, text: &str| {
        let _ = write!(
            o,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{fill}" stroke="#333" stroke-width="0.6"/>"##,
            w.max(0.5)
        );
        if w >= 9.0 {
            let _ = write!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{}">{text}</text>"#,
                x + w / 2.0,
                y + h / 2.0 + 4.0,
                if h < row { 9 } else { 11 }
            );
        }
    };
    for (i, tl) in r.timelines.iter().enumerate() {
        let y = top + i as f64 * (row + gap);
        let _ = write!(o, r#"<text x="{}" y="{:.1}" text-anchor="end">rank {i}</text>"#, l - 8.0, y + row / 2.0 + 4.0);
        for sp in tl {
            let x = l + sp.start * scale;
            let w = (sp.end - sp.start) * scale;
            let op = &s.ranks[i][sp.op];
            let n = |c: &Chunk| c.mb.to_string();
            match op {
                Op::F(c) => rect(&mut o, x, y, w, row, color("F", second(s, c)), &n(c)),
                Op::B { c, zb } => rect(&mut o, x, y, w, row, color(if *zb { "b" } else { "B" }, second(s, c)), &n(c)),
                Op::W(c) => rect(&mut o, x, y, w, row, color("W", second(s, c)), &n(c)),
                Op::FB { f, b, .. } => {
                    rect(&mut o, x, y, w, row / 2.0, color("F", second(s, f)), &n(f));
                    rect(&mut o, x, y + row / 2.0, w, row / 2.0, color("B", second(s, b)), &n(b));
                }
            }
        }
    }
    let ly = top + s.ranks.len() as f64 * (row + gap) + 14.0;
    let mut x = l;
    for (name, key) in [("forward", "F"), ("backward", "B"), ("backward (input only)", "b"), ("weight", "W")] {
        for sec in [false, true] {
            let _ = write!(
                o,
                r##"<rect x="{x:.1}" y="{ly:.1}" width="14" height="14" fill="{}" stroke="#333" stroke-width="0.6"/>"##,
                color(key, sec)
            );
            x += 16.0;
        }
        let _ = write!(o, r#"<text x="{x:.1}" y="{:.1}">{name}</text>"#, ly + 11.0);
        x += 8.0 + 7.0 * name.len() as f64;
    }
    let _ = write!(
        o,
        r#"<text x="{x:.1}" y="{:.1}">(darker: the rank's second chunk; split box: overlapped F&amp;B)</text>"#,
        ly + 11.0
    );
    o.push_str("</svg>\n");
    o
}
