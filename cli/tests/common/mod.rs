//! Helpers shared by the CLI tests: the binary, the fixtures, success / failure checks.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `tests/fixtures/<name>` (or under `$DSV3_FIXTURES`, when the tests run on another machine).
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("DSV3_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join(name)
}

/// Runs the `dsv3` binary (or `$DSV3_BIN`).
pub fn dsv3(args: &[&str]) -> Output {
    let bin = std::env::var_os("DSV3_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_dsv3").into());
    Command::new(bin).args(args).output().expect("running dsv3")
}

/// Runs `dsv3 args`, which must succeed; returns (stdout, stderr).
pub fn ok(args: &[&str]) -> (String, String) {
    let o = dsv3(args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "dsv3 {args:?} failed:\n{out}\n{err}");
    (out, err)
}

/// Runs `dsv3 args`, which must fail cleanly: exit 1, `error: ...`, no panic. Returns stderr.
pub fn fails(args: &[&str]) -> String {
    let o = dsv3(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "dsv3 {args:?} should fail with exit 1: {err}");
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    err
}

/// A fresh temporary directory for one test.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
