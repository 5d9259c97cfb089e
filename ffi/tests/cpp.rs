//! The C++ binding (bindings/cpp/dsv3.hpp) and the C example (examples/generate.c):
//! - compiles bindings/cpp/test_scenario.cpp with `-Wall -Wextra -Werror` and runs it from the
//!   repository root under valgrind (no leaks, no invalid accesses) when valgrind is installed;
//! - compiles include/dsv3.h alone as C99 and C++17, and dsv3.hpp alone as C++17;
//! - compiles examples/generate.c and runs it on a random model with the tokenizer fixture.
//!
//! Each test prints a visible SKIP when its compiler is missing.
use std::path::{Path, PathBuf};
use std::process::Command;

#[macro_use]
mod common;
use common::*;

/// A scratch directory under target/<profile>, emptied.
fn scratch(name: &str) -> PathBuf {
    let d = lib_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a compiler command; panics with its output on failure.
fn compile(mut cmd: Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `exe` with `args` from the repository root (under valgrind when installed); returns its
/// stdout + stderr, asserting a zero exit.
fn run(exe: &Path, args: &[&str], valgrind: bool) -> String {
    let mut cmd = if valgrind { under_valgrind(exe) } else { Command::new(exe) };
    let o = cmd.args(args).current_dir(root()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{text}");
    assert!(o.status.success(), "{} failed ({}):\n{text}", exe.display(), o.status);
    text
}

#[test]
fn cpp_scenario_under_valgrind() {
    if !have("g++") {
        skip!("SKIP C++ scenario: g++ not installed");
        return;
    }
    cargo_build("dsv3-ffi");
    let r = root();
    let exe = lib_dir().join("cpp_scenario");
    let mut c = Command::new("g++");
    c.args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(r.join("bindings/cpp/test_scenario.cpp"))
        .arg("-I")
        .arg(r.join("include"))
        .arg("-I")
        .arg(r.join("bindings/cpp"))
        .arg("-L")
        .arg(lib_dir())
        .args(["-ldsv3", "-o"])
        .arg(&exe)
        .arg(format!("-Wl,-rpath,{}", lib_dir().display()));
    compile(c, "compiling bindings/cpp/test_scenario.cpp");
    let text = run(&exe, &[], true);
    assert!(text.contains("C++ scenario: ok"));
}

#[test]
fn headers_compile_alone() {
    let r = root();
    let dir = scratch("header_checks");
    let checks: [(&str, &str, &[&str], &str); 3] = [
        ("gcc", "dsv3_h.c", &["-std=c99"], "dsv3.h"),
        ("g++", "dsv3_h.cpp", &["-std=c++17"], "dsv3.h"),
        ("g++", "dsv3_hpp.cpp", &["-std=c++17"], "dsv3.hpp"),
    ];
    for (cc, file, std, header) in checks {
        if !have(cc) {
            skip!("SKIP {header} as {}: {cc} not installed", std[0]);
            continue;
        }
        let src = dir.join(file);
        std::fs::write(&src, format!("#include \"{header}\"\n")).unwrap();
        let mut c = Command::new(cc);
        c.args(std)
            .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only"])
            .arg("-I")
            .arg(r.join("include"))
            .arg("-I")
            .arg(r.join("bindings/cpp"))
            .arg(&src);
        compile(c, &format!("{cc} {} on {header} alone", std[0]));
    }
}

#[test]
fn c_example_generates() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if !have(&cc) {
        skip!("SKIP examples/generate.c: no C compiler ({cc})");
        return;
    }
    cargo_build("dsv3-ffi");
    cargo_build("dsv3-cli");
    let r = root();
    let exe = lib_dir().join("generate_example");
    let mut c = Command::new(&cc);
    c.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(r.join("examples/generate.c"))
        .arg("-I")
        .arg(r.join("include"))
        .arg("-L")
        .arg(lib_dir())
        .args(["-ldsv3", "-o"])
        .arg(&exe)
        .arg(format!("-Wl,-rpath,{}", lib_dir().display()));
    compile(c, "compiling examples/generate.c");

    // tests/fixtures/tokenizer has a config and a tokenizer but no weights: make random ones.
    let model = scratch("example_model");
    let fixture = r.join("tests/fixtures/tokenizer");
    let o = Command::new(lib_dir().join("dsv3"))
        .arg("init")
        .arg("--config")
        .arg(fixture.join("config.json"))
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "dsv3 init: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(fixture.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();

    let text = run(&exe, &[model.to_str().unwrap(), "Hello world", "5"], false);
    assert!(text.contains("loading 100%"), "progress is reported");
    assert!(text.starts_with("Hello world"), "the prompt is echoed");
    assert!(text.contains("[5 tokens") || text.contains(", EOS]"), "5 tokens or an early EOS");
    // a failure prints the library's message
    let o = Command::new(&exe).args(["/nonexistent/dsv3-model", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/dsv3-model/config.json"));
}
