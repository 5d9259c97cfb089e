//! `dsv3 schedule`: the fixed JSON contract, checked by an independent replay of the op lists
//! (every op once, dependencies, bubbles, peak activations), the closed-form bubbles, the SVG,
//! and clear errors for the preconditions.
use serde_json::Value;
use std::collections::HashMap;
mod common;
use common::*;

fn schedule_json(kind: &str, pp: usize, m: usize, costs: Option<&str>) -> Value {
    let (pp, m) = (pp.to_string(), m.to_string());
    let mut args = vec!["schedule", "--kind", kind, "--pp", &pp, "--micro-batches", &m, "--json"];
    if let Some(c) = costs {
        args.extend(["--costs", c]);
    }
    let o = dsv3(&args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}

type Key = (u64, u64, u64);

fn key(v: &Value) -> Key {
    (v["dir"].as_u64().unwrap(), v["stage"].as_u64().unwrap(), v["mb"].as_u64().unwrap())
}

/// What the replay found: bubble per rank, peak activations per rank, makespan.
struct Replay {
    bubble: Vec<f64>,
    peak: Vec<usize>,
    makespan: f64,
}

/// Replays the contract's op lists with costs (f, b, w, fb) and the dependency rules,
/// checking that every (dir, stage, mb) has one F and one B, a W exactly for each zb B, and that
/// a stage lives on one rank.
fn replay(v: &Value, stages: u64, c: (f64, f64, f64, f64)) -> Replay {
    let ranks = v["ranks"].as_array().unwrap();
    // one entry per op: (rank, F chunks, B chunks with zb, W chunk, cost)
    struct O {
        f: Option<Key>,
        b: Option<(Key, bool)>,
        w: Option<Key>,
        cost: f64,
    }
    let mut lists: Vec<Vec<O>> = Vec::new();
    let (mut nf, mut nb, mut nw): (HashMap<Key, u32>, HashMap<Key, u32>, HashMap<Key, u32>) = Default::default();
    let mut zbs: HashMap<Key, bool> = HashMap::new();
    let mut owner: HashMap<(u64, u64), usize> = HashMap::new();
    for (r, ops) in ranks.iter().enumerate() {
        let mut list = Vec::new();
        for op in ops.as_array().unwrap() {
            let mut own = |k: Key| assert_eq!(*owner.entry((k.0, k.1)).or_insert(r), r, "stage {k:?} on two ranks");
            let o = match op["op"].as_str().unwrap() {
                "F" => O { f: Some(key(op)), b: None, w: None, cost: c.0 },
                "B" => {
                    let zb = op.get("zb").map(|z| z.as_bool().unwrap()).unwrap_or(false);
                    O { f: None, b: Some((key(op), zb)), w: None, cost: if zb { c.1 - c.2 } else { c.1 } }
                }
                "W" => O { f: None, b: None, w: Some(key(op)), cost: c.2 },
                "FB" => {
                    let zb = op["b"]["zb"].as_bool().expect("FB's b has zb");
                    O { f: Some(key(&op["f"])), b: Some((key(&op["b"]), zb)), w: None, cost: c.3 }
                }
                o => panic!("unknown op {o}"),
            };
            if let Some(k) = o.f {
                own(k);
                *nf.entry(k).or_default() += 1;
            }
            if let Some((k, zb)) = o.b {
                own(k);
                *nb.entry(k).or_default() += 1;
                zbs.insert(k, zb);
            }
            if let Some(k) = o.w {
                own(k);
                *nw.entry(k).or_default() += 1;
            }
            list.push(o);
        }
        lists.push(list);
    }
    for (k, n) in &nf {
        assert_eq!(*n, 1, "F{k:?}");
        assert_eq!(nb.get(k), Some(&1), "B{k:?}");
        assert!(k.1 < stages);
        assert_eq!(nw.get(k).copied().unwrap_or(0), zbs[k] as u32, "W{k:?}");
    }
    assert_eq!(nf.len(), nb.len());
    let (mut fe, mut be): (HashMap<Key, f64>, HashMap<Key, f64>) = Default::default();
    let mut next = vec![0usize; lists.len()];
    let mut free = vec![0f64; lists.len()];
    loop {
        let mut progress = false;
        for r in 0..lists.len() {
            while let Some(o) = lists[r].get(next[r]) {
                let mut t = free[r];
                let mut ok = true;
                let mut need = |m: &HashMap<Key, f64>, k: Key| match m.get(&k) {
                    Some(x) => t = t.max(*x),
                    None => ok = false,
                };
                if let Some(k) = o.f {
                    if k.1 > 0 {
                        need(&fe, (k.0, k.1 - 1, k.2));
                    }
                }
                if let Some((k, _)) = o.b {
                    if o.f != Some(k) {
                        need(&fe, k);
                    }
                    if k.1 + 1 < stages {
                        need(&be, (k.0, k.1 + 1, k.2));
                    }
                }
                if let Some(k) = o.w {
                    need(&be, k);
                }
                if !ok {
                    break;
                }
                let end = t + o.cost;
                if let Some(k) = o.f {
                    fe.insert(k, end);
                }
                if let Some((k, _)) = o.b {
                    be.insert(k, end);
                }
                free[r] = end;
                next[r] += 1;
                progress = true;
            }
        }
        if next.iter().zip(&lists).all(|(n, l)| *n == l.len()) {
            break;
        }
        assert!(progress, "the schedule deadlocks");
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let bubble = lists.iter().map(|l| makespan - l.iter().map(|o| o.cost).sum::<f64>()).collect();
    let peak = lists
        .iter()
        .map(|l| {
            let (mut live, mut peak) = (0i64, 0i64);
            for o in l {
                if o.f.is_some() {
                    live += 1;
                    peak = peak.max(live);
                }
                // an F adds one, its B (full or zb) frees it; W changes nothing
                if o.b.is_some() {
                    live -= 1;
                }
            }
            peak as usize
        })
        .collect();
    Replay { bubble, peak, makespan }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

fn check(kind: &str, pp: usize, m: usize, costs: (f64, f64, f64, f64)) -> (Value, Replay) {
    let cs = format!("{},{},{},{}", costs.0, costs.1, costs.2, costs.3);
    let v = schedule_json(kind, pp, m, Some(&cs));
    assert_eq!(v["kind"], kind);
    assert_eq!(v["pp"], pp);
    assert_eq!(v["micro_batches"], m);
    assert_eq!(v["ranks"].as_array().unwrap().len(), pp);
    let stages = if kind == "dualpipev" { 2 * pp } else { pp } as u64;
    let r = replay(&v, stages, costs);
    // the command's numbers equal the independent replay's
    let got: Vec<f64> = v["bubble"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(got, r.bubble, "{kind} pp {pp} m {m}");
    let peaks: Vec<usize> =
        v["peak_activations"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(peaks, r.peak, "{kind} pp {pp} m {m}");
    assert_eq!(v["makespan"].as_f64().unwrap(), r.makespan);
    // every micro-batch of every direction appears at every stage
    let dirs = if kind == "dualpipe" { 2 } else { 1 };
    let n_f: usize = v["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|ops| ops.as_array().unwrap())
        .map(|o| if o["op"] == "F" || o["op"] == "FB" { 1 } else { 0 })
        .sum();
    assert_eq!(n_f as u64, (m / dirs * dirs) as u64 * stages);
    (v, r)
}

#[test]
fn schedule_json_contract_and_closed_form_bubbles() {
    let d = (1.0, 2.0, 1.0, 3.0);
    for (pp, m) in [(2, 4), (4, 8), (4, 13), (8, 20)] {
        for c in [d, (1.0, 1.5, 0.5, 2.0)] {
            let (_, r) = check("1f1b", pp, m, c);
            assert!(r.bubble.iter().all(|&b| b == (pp - 1) as f64 * (c.0 + c.1)), "{:?}", r.bubble);
            let (_, r) = check("zb1p", pp, m, c);
            assert_eq!(max(&r.bubble), (pp - 1) as f64 * (c.0 + c.1 - 2.0 * c.2));
        }
    }
    for (pp, m) in [(4, 8), (4, 10), (8, 20), (8, 40), (16, 32)] {
        for fb in [3.0, 2.0] {
            let (v, r) = check("dualpipe", pp, m, (1.0, 2.0, 1.0, fb));
            assert_eq!(max(&r.bubble), (pp / 2 - 1) as f64 * (fb + 2.0 - 3.0), "dualpipe pp {pp} m {m}");
            assert_eq!(r.peak, vec![pp + 1; pp]);
            // direction 1 enters at the last rank: its first op is a forward of stage 0, dir 1
            let last = &v["ranks"][pp - 1][0];
            assert_eq!((last["op"].as_str(), key(last)), (Some("F"), (1, 0, 0)));
        }
    }
    for (pp, m) in [(1, 2), (2, 4), (3, 7), (4, 8), (4, 20)] {
        let (_, r) = check("dualpipev", pp, m, d);
        assert_eq!(max(&r.bubble), (pp - 1) as f64 * (3.0 + 2.0 - 3.0), "dualpipev pp {pp} m {m}");
        assert_eq!(r.peak.iter().max(), Some(&(2 * pp + 1)));
    }
    // default costs are 1,2,1,3
    let v = schedule_json("dualpipe", 8, 20, None);
    assert_eq!(max(&v["bubble"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()), 6.0);
}

#[test]
fn schedule_text_and_svg() {
    let dir = std::env::temp_dir().join(format!("dsv3-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("dp.svg");
    let o =
        dsv3(&["schedule", "--kind", "dualpipe", "--pp", "4", "--micro-batches", "8", "--svg", svg.to_str().unwrap()]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("makespan") && text.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).count() == 4,
        "{text}"
    );
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    assert!(s.matches("<rect").count() > 4 * 8, "one box per op");
    // --json keeps stdout pure JSON even with --svg
    let o = dsv3(&[
        "schedule",
        "--kind",
        "1f1b",
        "--pp",
        "2",
        "--micro-batches",
        "2",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    serde_json::from_slice::<Value>(&o.stdout).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn schedule_preconditions_are_clear_errors() {
    let run = |k: &str, pp: &str, m: &str| fails(&["schedule", "--kind", k, "--pp", pp, "--micro-batches", m]);
    assert!(run("dualpipe", "3", "12").contains("pp must be even"));
    assert!(run("dualpipe", "4", "6").contains(">= 2*pp"));
    assert!(run("dualpipe", "4", "9").contains("even"));
    assert!(run("dualpipev", "4", "7").contains(">= 2*pp"));
    assert!(run("gpipe", "4", "8").contains("1f1b, zb1p, dualpipe or dualpipev"));
    assert!(run("1f1b", "0", "8").contains("pp"));
    assert!(run("zb1p", "2", "0").contains("micro-batches"));
    let c = |costs: &str| fails(&["schedule", "--kind", "1f1b", "--pp", "2", "--micro-batches", "2", "--costs", costs]);
    assert!(c("1,2,1").contains("4 numbers"));
    assert!(c("1,-2,1,3").contains("B"));
    assert!(c("1,2,3,3").contains("W"));
}

#[test]
fn train_and_bench_through_the_pipeline() {
    let d = std::env::temp_dir().join(format!("dsv3-pipeline-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let data = d.join("data.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let (s, o1, o2) = (data.to_str().unwrap(), d.join("pp"), d.join("serial"));
    let common =
        ["train", "--preset", "tiny", "--data", s, "--batch", "2", "--seq-len", "16", "--steps", "3", "--quiet"];
    // dualpipe --pp 4 needs 8 micro-batches: --accumulate is raised to that, with a note
    let r = dsv3(&[&common[..], &["--out", o1.to_str().unwrap(), "--pipeline", "dualpipe", "--pp", "4"]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("8 micro-batches"));
    let r = dsv3(&[&common[..], &["--out", o2.to_str().unwrap(), "--accumulate", "8", "--threads", "1"]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let losses = |p: &std::path::Path| -> Vec<f64> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (losses(&o1), losses(&o2));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y, "pipeline loss {x} vs serial {y}");
    }
    let bad = fails(&[&common[..], &["--out", o1.to_str().unwrap(), "--pipeline", "dualpipe", "--pp", "3"]].concat());
    assert!(bad.contains("pp must be even"), "{bad}");
    // bench --pipeline: every schedule, measured next to the simulator
    let m = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v3_group");
    let r = dsv3(&["bench", "--model", m.to_str().unwrap(), "--pipeline", "--pp", "2", "--repeat", "1", "--json"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    let kinds: Vec<&str> = v["schedules"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["1f1b", "zb1p", "dualpipe", "dualpipev"]);
    for s in v["schedules"].as_array().unwrap() {
        assert_eq!(s["idle"].as_array().unwrap().len(), 2);
        assert!(s["step_ms"].as_f64().unwrap() > 0.0 && s["sim_step_ms"].as_f64().unwrap() > 0.0);
    }
    let _ = std::fs::remove_dir_all(&d);
}
