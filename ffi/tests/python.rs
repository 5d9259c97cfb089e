//! The Python binding (bindings/python, ctypes over the C ABI): builds the C library of this test
//! profile and runs `python3 -m pytest -q bindings/python/tests` against it (DSV3_LIBRARY), so the
//! binding's scenario (bindings/testdata/expected.json) and the rest of its tests run with
//! `cargo test`. Skipped, visibly, when python3 with pytest is not installed ($PYTHON picks another
//! interpreter).
use std::process::Command;

#[macro_use]
mod common;
use common::*;

/// The shared library's file name on this platform.
fn lib_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libdsv3.dylib"
    } else if cfg!(windows) {
        "dsv3.dll"
    } else {
        "libdsv3.so"
    }
}

fn python_with_pytest() -> Option<String> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import pytest"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(py)
}

#[test]
fn python_binding_scenario() {
    let Some(py) = python_with_pytest() else {
        skip!("SKIP: python3 with pytest not available");
        return;
    };
    build_c_library();
    let lib = lib_dir().join(lib_name());
    assert!(lib.exists(), "{} was not built", lib.display());
    let o = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "bindings/python/tests"])
        .current_dir(root())
        .env("DSV3_LIBRARY", &lib)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running python3 -m pytest");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{text}");
    assert!(o.status.success(), "the Python binding's tests failed ({}):\n{text}", o.status);
    assert!(text.contains(" passed"), "pytest ran no test:\n{text}");
}
