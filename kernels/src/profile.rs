//! GPU time by kernel, measured on the device: while a device is profiling
//! ([`Device::profile_begin`]), every kernel launch and cuBLAS call on its streams (the side stream
//! of [`Device::fork`] included) is bracketed by two timing events; [`Device::profile_end`] waits
//! for them and sums the time per kernel (`dsv3 bench --device cuda --profile` prints the table).
//!
//! What the numbers mean:
//! - a kernel's time runs from the event before its launch to the event after it, on its stream:
//!   its execution, plus any wait for the GPU to start it;
//! - `busy` is the union of those intervals on the wall clock (two streams overlapping count
//!   once); `wall - busy` is time the GPU sat idle between launches: the host not keeping up, or
//!   its synchronizations;
//! - work that is not a launch (memsets, copies, graph launches other than the labelled ones)
//!   counts as idle;
//! - launches into a CUDA graph being captured are not bracketed (a captured event has no time);
//!   the captured decode step's graph launch is timed as one span instead.
//!
//! The events serialize nothing, but each costs the host two driver calls: a profiled run is a
//! breakdown, not a throughput figure (time the same run without `--profile`).
use crate::device::{cuda_err, Device};
use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use cudarc::driver::{CudaEvent, CudaStream};
use dsv3_core::{Error, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One bracketed launch.
struct Span {
    label: Cow<'static, str>,
    start: CudaEvent,
    end: CudaEvent,
}

/// The spans of one profiling window and the event that opened it (shared by a device and its
/// side-stream views).
#[derive(Default)]
pub(crate) struct Recorder {
    on: AtomicBool,
    state: Mutex<Option<(CudaEvent, Vec<Span>)>>,
}

/// A launch's opening event (`None`: not profiling, or the stream is capturing).
pub(crate) struct Mark(Option<CudaEvent>);

fn timing_event(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
    // timing enabled (cudarc's default disables it)
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| cuda_err("recording a profile event", e))
}

/// Opens a span on `dev`'s stream before a launch (nothing when not profiling).
pub(crate) fn start(dev: &Device) -> Result<Mark> {
    if !dev.profile.on.load(Ordering::Relaxed) {
        return Ok(Mark(None));
    }
    let capturing = dev.stream.capture_status().map_err(|e| cuda_err("querying the stream's capture status", e))?;
    if capturing != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(Mark(None));
    }
    Ok(Mark(Some(timing_event(&dev.stream)?)))
}

/// Closes the span `m` opened, after the launch, under `label()` (called only when profiling).
pub(crate) fn finish(dev: &Device, m: Mark, label: impl FnOnce() -> Cow<'static, str>) -> Result<()> {
    let Some(start) = m.0 else { return Ok(()) };
    let end = timing_event(&dev.stream)?;
    let mut st = dev.profile.state.lock().map_err(|_| Error::Io("CUDA: profile state poisoned".into()))?;
    // a window closed between the two events drops the span
    if let Some((_, spans)) = st.as_mut() {
        spans.push(Span { label: label(), start, end });
    }
    Ok(())
}

/// One kernel's (or cuBLAS shape's) share of a profiling window.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's name, or `cublas <op> MxNxK[xbatch]` for a cuBLAS product.
    pub name: String,
    pub calls: usize,
    /// Summed span time, milliseconds.
    pub ms: f64,
}

/// What [`Device::profile_end`] measured.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Per kernel, most time first.
    pub kernels: Vec<KernelTime>,
    /// From [`Device::profile_begin`] to [`Device::profile_end`] on the main stream, ms.
    pub wall_ms: f64,
    /// The union of every span on the wall clock, ms (≤ `wall_ms`).
    pub busy_ms: f64,
}

impl Profile {
    /// The sum of every kernel's time, ms (more than `busy_ms` where streams overlapped).
    pub fn kernel_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.ms).sum()
    }

    /// The table, `per` windows' worth averaged (calls and times divided by `per`, e.g. the
    /// steps a window covered), the `top` largest rows and one for the rest.
    pub fn table(&self, per: usize, top: usize) -> String {
        use std::fmt::Write;
        let per = per.max(1) as f64;
        let total = self.kernel_ms().max(1e-12);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "GPU time by kernel, per step ({per} steps profiled): wall {:.3} ms, kernels busy {:.3} ms ({:.1}%), idle {:.3} ms",
            self.wall_ms / per,
            self.busy_ms / per,
            100.0 * self.busy_ms / self.wall_ms.max(1e-12),
            (self.wall_ms - self.busy_ms).max(0.0) / per
        );
        let _ = writeln!(s, "{:>9} {:>6} {:>7} {:>9}  kernel", "ms", "%", "calls", "us/call");
        let row = |s: &mut String, ms: f64, calls: usize, name: &str| {
            let _ = writeln!(
                s,
                "{:>9.3} {:>5.1}% {:>7.1} {:>9.2}  {name}",
                ms / per,
                100.0 * ms / total,
                calls as f64 / per,
                1e3 * ms / calls.max(1) as f64
            );
        };
        for k in self.kernels.iter().take(top) {
            row(&mut s, k.ms, k.calls, &k.name);
        }
        if self.kernels.len() > top {
            let rest = &self.kernels[top..];
            let (ms, calls) = rest.iter().fold((0.0, 0), |(m, c), k| (m + k.ms, c + k.calls));
            row(&mut s, ms, calls, &format!("({} more kernels)", rest.len()));
        }
        s
    }
}

impl Profile {
    /// The profile as a JSON object, times per step as in [`Profile::table`] (all kernels).
    pub fn json(&self, per: usize) -> String {
        let per_f = per.max(1) as f64;
        let ks: Vec<String> = self
            .kernels
            .iter()
            .map(|k| {
                format!("{{\"name\":{:?},\"calls\":{},\"ms\":{:.6}}}", k.name, k.calls as f64 / per_f, k.ms / per_f)
            })
            .collect();
        format!(
            "{{\"steps\":{per},\"wall_ms\":{:.6},\"busy_ms\":{:.6},\"kernels\":[{}]}}",
            self.wall_ms / per_f,
            self.busy_ms / per_f,
            ks.join(",")
        )
    }
}

/// The length of the union of `iv` (start, end pairs; sorted in place).
fn union_len(iv: &mut [(f64, f64)]) -> f64 {
    iv.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for &(s, e) in iv.iter() {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

impl Device {
    /// Starts timing every launch on this device (and its side-stream views) from here; a window
    /// already open is discarded.
    pub fn profile_begin(&self) -> Result<()> {
        let origin = timing_event(&self.stream)?;
        let mut st = self.profile.state.lock().map_err(|_| Error::Io("CUDA: profile state poisoned".into()))?;
        *st = Some((origin, Vec::new()));
        self.profile.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a profiling window is open.
    pub fn profiling(&self) -> bool {
        self.profile.on.load(Ordering::Relaxed)
    }

    /// Ends the window [`Device::profile_begin`] opened: waits for its work, returns the time per
    /// kernel. An error if no window is open.
    pub fn profile_end(&self) -> Result<Profile> {
        self.profile.on.store(false, Ordering::Relaxed);
        let taken = self.profile.state.lock().map_err(|_| Error::Io("CUDA: profile state poisoned".into()))?.take();
        let (origin, spans) = taken.ok_or_else(|| Error::Input("profile_end: no profiling window is open".into()))?;
        let fin = timing_event(&self.stream)?;
        let el = |a: &CudaEvent, b: &CudaEvent| -> Result<f64> {
            a.elapsed_ms(b).map(f64::from).map_err(|e| cuda_err("reading a profile event", e))
        };
        let wall_ms = el(&origin, &fin)?;
        let mut by: HashMap<Cow<'static, str>, (usize, f64)> = HashMap::new();
        let mut iv = Vec::with_capacity(spans.len());
        for sp in spans {
            let (s, e) = (el(&origin, &sp.start)?, el(&origin, &sp.end)?);
            iv.push((s, e.max(s)));
            let v = by.entry(sp.label).or_insert((0, 0.0));
            v.0 += 1;
            v.1 += (e - s).max(0.0);
        }
        let busy_ms = union_len(&mut iv).min(wall_ms.max(0.0));
        let mut kernels: Vec<KernelTime> =
            by.into_iter().map(|(name, (calls, ms))| KernelTime { name: name.into_owned(), calls, ms }).collect();
        kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(Profile { kernels, wall_ms, busy_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_union_of_intervals_counts_overlap_once() {
        let mut iv = vec![(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (10.0, 10.0)];
        assert_eq!(union_len(&mut iv), 5.0);
        assert_eq!(union_len(&mut []), 0.0);
    }

    #[test]
    fn the_table_averages_per_step_and_folds_the_tail() {
        let p = Profile {
            kernels: vec![
                KernelTime { name: "a".into(), calls: 4, ms: 6.0 },
                KernelTime { name: "b".into(), calls: 2, ms: 3.0 },
                KernelTime { name: "c".into(), calls: 2, ms: 1.0 },
            ],
            wall_ms: 20.0,
            busy_ms: 10.0,
        };
        assert_eq!(p.kernel_ms(), 10.0);
        let t = p.table(2, 1);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("wall 10.000 ms") && lines[0].contains("busy 5.000 ms (50.0%)"), "{t}");
        assert!(lines[2].ends_with("  a") && lines[2].contains("3.000") && lines[2].contains("60.0%"), "{t}");
        // 2 calls a step, 1.5 ms a call
        assert!(lines[2].contains("2.0") && lines[2].contains("1500.00"), "{t}");
        assert!(
            lines[3].ends_with("(2 more kernels)") && lines[3].contains("2.000") && lines[3].contains("40.0%"),
            "{t}"
        );
        assert_eq!(lines.len(), 4);
        assert_eq!(
            p.json(2),
            "{\"steps\":2,\"wall_ms\":10.000000,\"busy_ms\":5.000000,\"kernels\":[{\"name\":\"a\",\"calls\":2,\"ms\":3.000000},\
             {\"name\":\"b\",\"calls\":1,\"ms\":1.500000},{\"name\":\"c\",\"calls\":1,\"ms\":0.500000}]}"
        );
    }
}
