//! Helpers shared by the ffi integration tests (C scenario, C++, Go, Python, Swift).
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// Prints straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a
/// skipped check must be visible in CI's output.
macro_rules! skip {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/<profile>`, where the cdylib, staticlib and the `dsv3` binary are.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Whether the tests run in the release profile.
pub fn release() -> bool {
    lib_dir().ends_with("release")
}

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// `cargo build -p <package>` in the tests' profile (`cargo test` itself only builds the ffi's
/// rlib): the C library (cdylib + staticlib) for dsv3-ffi, the `dsv3` binary for dsv3-cli.
pub fn cargo_build(package: &str) {
    let mut c = Command::new(env!("CARGO"));
    c.args(["build", "-q", "-p", package]).current_dir(root());
    if release() {
        c.arg("--release");
    }
    assert!(c.status().unwrap().success(), "cargo build -p {package}");
}

/// Builds the C library of the tests' profile.
pub fn build_c_library() {
    cargo_build("dsv3-ffi");
}

/// A command running `exe` under valgrind (no leaks, no invalid accesses: exit code 3 on any
/// error), or plainly with a visible SKIP line when valgrind is not installed.
pub fn under_valgrind(exe: &Path) -> Command {
    if have("valgrind") {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=3",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            "-q",
        ])
        .arg(exe);
        c
    } else {
        skip!("SKIP valgrind: not installed; running {} without it", exe.display());
        Command::new(exe)
    }
}
