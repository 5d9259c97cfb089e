//! The Swift binding (bindings/swift), checked as far as the machine allows.
//!
//! - Always: the Swift sources against include/dsv3.h: every C function, type, constant and
//!   struct field they name exists, every C call has the header's number of arguments, every C
//!   function is wrapped, and `struct_size` is set from `MemoryLayout.stride` (C's sizeof).
//! - With clang: the SwiftPM system-library module (Sources/CDsv3/module.modulemap + shim.h)
//!   builds as a Clang module (`-fmodules`, the mechanism Swift's Clang importer uses), in C and
//!   Objective-C, exports the whole API, carries `link "dsv3"`, falls back to `<dsv3.h>` outside
//!   the repository, and a C program that only imports the module links and runs against libdsv3.
//!   Otherwise: "SKIP: clang not installed (module map check)".
//! - With a Swift toolchain: `swift test` on the package, i.e. the binding scenario of
//!   bindings/testdata/expected.json in Swift (Tests/Dsv3Tests). The flags:
//!   `-Xcc -I<repo>/include` (only needed when the shim's relative include is gone),
//!   `-Xlinker -L<repo>/target/<profile> -Xlinker -rpath -Xlinker <repo>/target/<profile>`.
//!   Otherwise: "SKIP: no Swift compiler on this machine (swift test)".
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

#[macro_use]
mod common;
use common::*;

fn swift_dir() -> PathBuf {
    root().join("bindings/swift")
}

fn module_map() -> PathBuf {
    swift_dir().join("Sources/CDsv3/module.modulemap")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifiers starting with `prefix` in `text` (whole words).
fn idents_with_prefix(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(k) = text[i..].find(prefix) {
        let start = i + k;
        let before_ok = start == 0 || !text[..start].chars().next_back().is_some_and(is_ident);
        let end = start + text[start..].find(|c: char| !is_ident(c)).unwrap_or(text.len() - start);
        if before_ok && end > start + prefix.len() {
            out.push(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// The number of top-level comma-separated arguments in the parenthesized list starting at
/// `open` (the index of '('), skipping string literals; `(void)` and `()` count 0.
fn count_args(text: &str, open: usize) -> usize {
    let b = text.as_bytes();
    assert_eq!(b[open], b'(');
    let (mut depth, mut commas, mut in_str) = (0usize, 0usize, false);
    let mut i = open;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                b',' if depth == 1 => commas += 1,
                _ => {}
            }
        }
        i += 1;
    }
    let inner = text[open + 1..i].trim();
    if inner.is_empty() || inner == "void" {
        0
    } else {
        commas + 1
    }
}

/// What include/dsv3.h declares.
struct Header {
    /// function name -> number of parameters
    functions: BTreeMap<String, usize>,
    /// typedef'd struct, enum and function-pointer names
    types: BTreeSet<String>,
    /// DSV3_* constants (enum values and macros)
    constants: BTreeSet<String>,
    /// field names of the structs
    fields: BTreeSet<String>,
}

fn parse_header() -> Header {
    let text = std::fs::read_to_string(root().join("include/dsv3.h")).unwrap();
    // drop comments: the banner block and `//` lines
    let code: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("/*") || t.starts_with('*'))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut h = Header {
        functions: BTreeMap::new(),
        types: BTreeSet::new(),
        constants: idents_with_prefix(&code, "DSV3_").into_iter().filter(|c| c != "DSV3_H").collect(),
        fields: BTreeSet::new(),
    };
    let mut in_struct = false;
    for line in code.lines() {
        let t = line.trim();
        if t.starts_with("typedef") {
            // `typedef struct X {`, `typedef struct X X;`, `typedef enum X {`, `typedef T (*X)(...)`
            let name = if let Some(p) = t.find("(*") {
                idents_with_prefix(&t[p..], "dsv3_").into_iter().next()
            } else {
                idents_with_prefix(t, "dsv3_").into_iter().next()
            };
            h.types.extend(name);
            in_struct = t.starts_with("typedef struct") && t.ends_with('{');
            continue;
        }
        if in_struct {
            if t.starts_with('}') {
                in_struct = false;
            } else if let Some(decl) = t.strip_suffix(';') {
                let field: String = decl.chars().rev().take_while(|&c| is_ident(c)).collect();
                h.fields.insert(field.chars().rev().collect());
            }
        }
    }
    for name in idents_with_prefix(&code, "dsv3_") {
        let Some(pos) = code.find(&format!("{name}(")) else { continue };
        // a declaration, not a use inside a typedef: the name starts the declarator
        let line_start = code[..pos].rfind('\n').map_or(0, |i| i + 1);
        if code[line_start..pos].contains("typedef") {
            continue;
        }
        h.functions.insert(name.clone(), count_args(&code, pos + name.len()));
    }
    h
}

/// Swift code with its line comments removed and the contents of its string literals blanked
/// (so that names in comments and strings, like the DSV3_ROOT variable, are not taken for C names).
fn swift_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let (mut in_str, mut escaped) = (false, false);
        let mut prev = ' ';
        for c in line.chars() {
            if in_str {
                if escaped {
                    escaped = false;
                    out.push(' ');
                } else if c == '\\' {
                    escaped = true;
                    out.push(' ');
                } else if c == '"' {
                    in_str = false;
                    out.push(c);
                } else {
                    out.push(' ');
                }
            } else if c == '/' && prev == '/' {
                // a line comment: drop it (and the first '/', already pushed)
                out.pop();
                break;
            } else {
                in_str = c == '"';
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The Swift files of the package under `under`, as `swift_code`.
fn swift_sources(under: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "swift") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&swift_dir().join(under), &mut files);
    files.sort();
    files.into_iter().map(|p| (p.clone(), swift_code(&std::fs::read_to_string(&p).unwrap()))).collect()
}

#[test]
fn swift_sources_match_the_header() {
    let h = parse_header();
    assert!(h.functions.len() >= 30, "parsed only {} functions from include/dsv3.h", h.functions.len());
    assert!(h.functions.get("dsv3_generate") == Some(&9), "dsv3_generate takes 9 parameters");
    assert!(h.functions.get("dsv3_version") == Some(&0));
    assert!(h.types.contains("dsv3_token_fn") && h.types.contains("dsv3_model") && h.fields.contains("struct_size"));
    let mut problems = Vec::new();
    for (path, code) in swift_sources("Sources").into_iter().chain(swift_sources("Tests")) {
        let file = path.strip_prefix(root()).unwrap().display().to_string();
        for name in idents_with_prefix(&code, "dsv3_") {
            if !h.functions.contains_key(&name) && !h.types.contains(&name) {
                problems.push(format!("{file}: `{name}` is not declared in include/dsv3.h"));
            }
        }
        for name in idents_with_prefix(&code, "DSV3_") {
            if !h.constants.contains(&name) {
                problems.push(format!("{file}: `{name}` is not a constant of include/dsv3.h"));
            }
        }
        for (name, &arity) in &h.functions {
            let pat = format!("{name}(");
            for (pos, _) in code.match_indices(&pat) {
                if pos > 0 && code[..pos].chars().next_back().is_some_and(is_ident) {
                    continue;
                }
                let n = count_args(&code, pos + name.len());
                if n != arity {
                    problems.push(format!("{file}: {name} called with {n} arguments, the header declares {arity}"));
                }
            }
        }
        // `.snake_case` member accesses are C struct fields (the Swift API is camelCase)
        let b = code.as_bytes();
        for (pos, _) in code.match_indices('.') {
            let rest = &code[pos + 1..];
            let member: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            let starts_lower = member.chars().next().is_some_and(|c| c.is_ascii_lowercase());
            if starts_lower && member.contains('_') && (pos == 0 || b[pos - 1] != b'.') && !h.fields.contains(&member) {
                problems.push(format!("{file}: `.{member}` is not a field of a struct in include/dsv3.h"));
            }
        }
        if code.contains("MemoryLayout") && code.contains(">.size") {
            problems.push(format!(
                "{file}: use MemoryLayout<T>.stride for struct_size (C's sizeof includes the tail padding; .size does not)"
            ));
        }
    }
    // the wrapper (Sources/) covers the whole C API
    let (_, wrapper): (Vec<_>, Vec<_>) = swift_sources("Sources").into_iter().unzip();
    let wrapper = wrapper.join("\n");
    for name in h.functions.keys() {
        if !wrapper.contains(&format!("{name}(")) {
            problems.push(format!("bindings/swift/Sources: {name} is not wrapped"));
        }
    }
    // the package layout SwiftPM needs
    let manifest = std::fs::read_to_string(swift_dir().join("Package.swift")).unwrap();
    let tools = manifest.lines().next().unwrap_or_default();
    let version = tools.strip_prefix("// swift-tools-version:").unwrap_or_default();
    let minor: u32 = version.strip_prefix("5.").and_then(|v| v.parse().ok()).unwrap_or(0);
    if !(minor >= 7 || version.starts_with('6')) {
        problems.push(format!("Package.swift: first line `{tools}`, want swift-tools-version 5.7 or later"));
    }
    for needle in [".systemLibrary(name: \"CDsv3\"", ".target(name: \"Dsv3\"", ".testTarget(name: \"Dsv3Tests\""] {
        if !manifest.contains(needle) {
            problems.push(format!("Package.swift lacks {needle}"));
        }
    }
    let map = std::fs::read_to_string(module_map()).unwrap();
    for needle in ["module CDsv3", "header \"shim.h\"", "link \"dsv3\""] {
        if !map.contains(needle) {
            problems.push(format!("module.modulemap lacks {needle}"));
        }
    }
    assert!(problems.is_empty(), "the Swift binding disagrees with include/dsv3.h:\n{}", problems.join("\n"));
    eprintln!(
        "swift sources: {} C functions (all wrapped, arities match), {} types, {} constants, {} fields checked",
        h.functions.len(),
        h.types.len(),
        h.constants.len(),
        h.fields.len()
    );
}

/// Runs a command, returning (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// clang with the module map and a fresh module cache in `dir`.
fn clang_modules(dir: &Path, map: &Path) -> Command {
    let mut c = Command::new("clang");
    c.arg("-fmodules")
        .arg(format!("-fmodules-cache-path={}", dir.join("module-cache").display()))
        .arg(format!("-fmodule-map-file={}", map.display()))
        .args(["-Wall", "-Wextra", "-Werror"]);
    c
}

#[test]
fn module_map_builds_with_clang() {
    if !have("clang") {
        skip!("SKIP: clang not installed (module map check)");
        return;
    }
    build_c_library();
    let h = parse_header();
    let dir = lib_dir().join("swift-module-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let map = module_map();

    // 1. Without the module map there is no CDsv3 module: what follows is really its doing.
    let bare = dir.join("bare.c");
    std::fs::write(&bare, "#pragma clang module import CDsv3\nint main(void) { return dsv3_version() == 0; }\n")
        .unwrap();
    let (ok, out) = run(Command::new("clang")
        .arg("-fmodules")
        .arg(format!("-fmodules-cache-path={}", dir.join("bare-cache").display()))
        .arg("-fsyntax-only")
        .arg(&bare));
    assert!(!ok && out.contains("module 'CDsv3' not found"), "CDsv3 resolved without the module map:\n{out}");

    // 2. The module exports the whole API (every function, type, constant), in C and in
    //    Objective-C (`@import`, as Swift's Clang importer sees it), with no -I: the shim finds
    //    include/dsv3.h by its relative path.
    let mut body = String::from("int use_everything(void);\nint use_everything(void) {\n    int n = 0;\n");
    body += "    const void *functions[] = {\n";
    for f in h.functions.keys() {
        body += &format!("        (const void *)&{f},\n");
    }
    body += "    };\n    n += (int)(sizeof functions / sizeof functions[0]);\n";
    for t in &h.types {
        if t == "dsv3_status" {
            body += "    n += (int)sizeof(dsv3_status);\n";
        } else if t.ends_with("_fn") {
            body += &format!("    n += (int)sizeof({t});\n");
        } else {
            body += &format!("    n += (int)sizeof({t} *);\n");
        }
    }
    for c in &h.constants {
        body += &format!("    n += (int){c};\n");
    }
    body +=
        "    n += (int)sizeof(struct dsv3_step_metrics) + (int)sizeof(struct dsv3_train_params);\n    return n;\n}\n";
    let c_file = dir.join("api.c");
    std::fs::write(&c_file, format!("#pragma clang module import CDsv3\n{body}")).unwrap();
    let (ok, out) = run(clang_modules(&dir, &map).args(["-std=c11", "-Rmodule-build", "-fsyntax-only"]).arg(&c_file));
    assert!(ok, "the CDsv3 module (C) does not compile:\n{out}");
    assert!(out.contains("building module 'CDsv3'"), "clang did not build the CDsv3 module:\n{out}");
    let m_file = dir.join("api.m");
    std::fs::write(&m_file, format!("@import CDsv3;\n{body}")).unwrap();
    let (ok, out) = run(clang_modules(&dir, &map).args(["-x", "objective-c", "-fsyntax-only"]).arg(&m_file));
    assert!(ok, "the CDsv3 module (Objective-C @import) does not compile:\n{out}");

    // 3. `link "dsv3"` reaches the object file (Swift autolinks libdsv3 from it).
    let (ok, ir) = run(clang_modules(&dir, &map).args(["-S", "-emit-llvm", "-o", "-"]).arg(&c_file));
    assert!(ok, "emitting IR:\n{ir}");
    assert!(
        ir.contains("!{!\"lib\", !\"dsv3\"}") || ir.contains("!{!\"-ldsv3\"}"),
        "no autolink entry for dsv3 in the IR (module.modulemap `link \"dsv3\"`)"
    );

    // 4. Outside the repository the shim falls back to <dsv3.h>: it needs -I<include>.
    let copy = dir.join("pkg/Sources/CDsv3");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["module.modulemap", "shim.h"] {
        std::fs::copy(swift_dir().join("Sources/CDsv3").join(f), copy.join(f)).unwrap();
    }
    assert!(!copy.join("../../../../include/dsv3.h").exists());
    let copied_map = copy.join("module.modulemap");
    let (ok, out) = run(clang_modules(&dir.join("copy-noinc"), &copied_map).arg("-fsyntax-only").arg(&c_file));
    assert!(!ok && out.contains("dsv3.h"), "the copied shim compiled without the header:\n{out}");
    let (ok, out) = run(clang_modules(&dir.join("copy-inc"), &copied_map)
        .arg("-I")
        .arg(root().join("include"))
        .arg("-fsyntax-only")
        .arg(&c_file));
    assert!(ok, "the copied shim with -I include/ does not compile:\n{out}");

    // 5. A program that only imports the module links against libdsv3 and runs.
    let main_c = dir.join("main.c");
    std::fs::write(
        &main_c,
        r#"#pragma clang module import CDsv3
#include <stdio.h>
#include <string.h>
int main(void) {
    dsv3_model *m = NULL;
    printf("dsv3 %s, ABI %u (header %d)\n", dsv3_version(), dsv3_abi_version(), DSV3_ABI_VERSION);
    if (dsv3_abi_version() != DSV3_ABI_VERSION) return 1;
    if (dsv3_model_load("/nonexistent/dsv3-model", NULL, &m) != DSV3_ERR_IO || m != NULL) return 2;
    if (!strstr(dsv3_last_error(), "/nonexistent/dsv3-model/config.json")) return 3;
    printf("module CDsv3: ok\n");
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.join("main");
    let (ok, out) = run(clang_modules(&dir, &map)
        .arg(&main_c)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(lib_dir())
        .arg("-ldsv3")
        .arg(format!("-Wl,-rpath,{}", lib_dir().display())));
    assert!(ok, "compiling and linking through the CDsv3 module:\n{out}");
    let (ok, out) = run(&mut Command::new(&exe));
    eprintln!("{out}");
    assert!(ok && out.contains("module CDsv3: ok"), "the program built through CDsv3 failed:\n{out}");
}

/// `swift --version` when `swift` is a Swift compiler (Debian's `swift` is an object-store client).
fn swift_compiler() -> Option<String> {
    if !have("swift") {
        return None;
    }
    let (_, out) = run(Command::new("swift").arg("--version"));
    out.contains("Swift version").then(|| out.lines().find(|l| l.contains("Swift version")).unwrap().trim().to_string())
}

#[test]
fn swift_package_tests() {
    let Some(version) = swift_compiler() else {
        skip!("SKIP: no Swift compiler on this machine (swift test)");
        return;
    };
    eprintln!("{version}");
    build_c_library();
    let lib = lib_dir();
    let prepend = |var: &str| match std::env::var(var) {
        Ok(v) if !v.is_empty() => format!("{}:{v}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut cmd = Command::new("swift");
    cmd.arg("test")
        .arg("--package-path")
        .arg(swift_dir())
        .arg("--scratch-path")
        .arg(lib.join("swift-build"))
        .arg("-Xcc")
        .arg(format!("-I{}", root().join("include").display()))
        .arg("-Xlinker")
        .arg(format!("-L{}", lib.display()))
        .args(["-Xlinker", "-rpath", "-Xlinker"])
        .arg(&lib)
        .env("DSV3_ROOT", root())
        .env("LD_LIBRARY_PATH", prepend("LD_LIBRARY_PATH"))
        .env("DYLD_LIBRARY_PATH", prepend("DYLD_LIBRARY_PATH"))
        .current_dir(root());
    let (ok, out) = run(&mut cmd);
    eprintln!("{out}");
    assert!(ok, "swift test failed");
}
