//! The Go binding (bindings/go) and the Go example (examples/finetune), against the C library of
//! the profile the tests run in: `go test ./...` runs the binding scenario (bindings/go/
//! dsv3_test.go: expected.json's ids and losses, errors, callbacks), linking target/<profile>/
//! libdsv3.so with an rpath; the example is built with the static library (-tags dsv3_static)
//! and fine-tunes a tiny model made by `dsv3 init` for 3 steps.
//!
//! Needs only Go's standard library (GOPROXY=off, no module downloads). Prints
//! "SKIP: go not installed" (and passes) without a `go` on PATH.
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

#[macro_use]
mod common;
use common::*;

/// Serializes the two tests' Go builds: the second reuses the build cache the first filled
/// (a cold cache compiles the standard library once, not twice at the same time).
static GO_BUILD: Mutex<()> = Mutex::new(());

/// Whether a usable Go is installed; if not (missing, or older than go.mod's 1.21), prints the
/// SKIP line.
fn go_available() -> bool {
    let out = match Command::new("go").args(["env", "GOVERSION"]).env("GOTOOLCHAIN", "local").output() {
        Ok(o) if o.status.success() => o,
        _ => {
            skip!("SKIP: go not installed (the Go binding and example are not tested)");
            return false;
        }
    };
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let minor = v.strip_prefix("go1.").and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok());
    match minor {
        Some(m) if m < 21 => {
            skip!("SKIP: {v} is older than go 1.21 (the Go binding and example are not tested)");
            false
        }
        _ => true,
    }
}

/// A `go` command for `dir`: the local toolchain only, no network, no workspace, cgo on, linking
/// this profile's libdsv3 (its -L comes before the package's default target/release).
fn go(dir: &Path, args: &[&str]) -> Command {
    let lib = lib_dir();
    let mut c = Command::new("go");
    c.args(args)
        .current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOWORK", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "1")
        .env("CGO_LDFLAGS", format!("-L{0} -Wl,-rpath,{0}", lib.display()));
    // a build cache and GOPATH where the environment gives Go no home for them
    let unset = |k: &str| std::env::var_os(k).is_none_or(|v| v.is_empty());
    if unset("HOME") {
        if unset("GOCACHE") && unset("XDG_CACHE_HOME") {
            c.env("GOCACHE", lib.join("go-cache"));
        }
        if unset("GOPATH") {
            c.env("GOPATH", lib.join("go-path"));
        }
    }
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn go_binding_scenario() {
    if !go_available() {
        return;
    }
    cargo_build("dsv3-ffi");
    let _serial = GO_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let o = go(&root().join("bindings/go"), &["test", "-count=1", "-v", "-timeout", "300s", "./..."]).output().unwrap();
    let t = text(&o);
    eprintln!("{t}");
    assert!(o.status.success(), "go test ./... in bindings/go failed:\n{t}");
    assert!(t.contains("--- PASS: TestGenerate") && t.contains("--- PASS: TestTrain"), "Go tests did not run:\n{t}");
}

#[test]
fn go_example_finetune() {
    if !go_available() {
        return;
    }
    cargo_build("dsv3-ffi");
    cargo_build("dsv3-cli");
    let (r, lib) = (root(), lib_dir());
    let tmp = std::env::temp_dir().join(format!("dsv3-go-finetune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    // a tiny model with the fixture tokenizer
    let model = tmp.join("model");
    let o = Command::new(lib.join("dsv3"))
        .args(["init", "--config"])
        .arg(r.join("tests/fixtures/tokenizer/config.json"))
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "dsv3 init:\n{}", text(&o));
    std::fs::copy(r.join("tests/fixtures/tokenizer/tokenizer.json"), model.join("tokenizer.json")).unwrap();

    // build the example statically linked, then fine-tune for 3 steps on the README
    let exe = tmp.join("finetune");
    let exe_s = exe.to_str().unwrap();
    let serial = GO_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let o = go(&r.join("examples/finetune"), &["build", "-tags", "dsv3_static", "-o", exe_s, "."]).output().unwrap();
    drop(serial);
    assert!(o.status.success(), "go build in examples/finetune failed:\n{}", text(&o));
    let ckpt = tmp.join("ckpt");
    let o = Command::new(&exe)
        .arg("-model")
        .arg(&model)
        .arg("-data")
        .arg(r.join("README.md"))
        .args(["-steps", "3", "-out"])
        .arg(&ckpt)
        .current_dir(&r)
        .output()
        .unwrap();
    let t = text(&o);
    eprintln!("{t}");
    assert!(o.status.success(), "the finetune example failed:\n{t}");
    assert!(t.contains("step    3  loss") && t.contains("sample:"), "unexpected output:\n{t}");
    assert!(ckpt.join("model.safetensors").is_file(), "no model.safetensors in {}", ckpt.display());
    assert!(ckpt.join("tokenizer.json").is_file(), "no tokenizer.json in {}", ckpt.display());
    let _ = std::fs::remove_dir_all(&tmp);
}
