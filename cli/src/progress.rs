//! The step progress bar shared by `dsv3 train` and `dsv3 grpo`.

/// A bar over `steps` optimizer steps starting at `done`, or a hidden one when `quiet` (the
/// commands then log a line every few steps instead).
pub fn bar(steps: u64, done: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(steps);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_position(done.min(steps));
    b
}
