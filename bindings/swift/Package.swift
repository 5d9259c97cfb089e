// swift-tools-version:5.7
// The Swift binding of dsv3 over its C ABI (include/dsv3.h, library libdsv3 from
// `cargo build --release -p dsv3-ffi`). Build and test from the repository root:
//
//   cargo build --release -p dsv3-ffi
//   swift test --package-path bindings/swift \
//       -Xlinker -L$PWD/target/release -Xlinker -rpath -Xlinker $PWD/target/release
//
// See README.md for the flags (and -Xcc -I<dir> when dsv3.h lives outside this repository).
import PackageDescription

let package = Package(
    name: "Dsv3",
    products: [
        .library(name: "Dsv3", targets: ["Dsv3"]),
    ],
    targets: [
        // The C API as a Clang module: Sources/CDsv3/module.modulemap + shim.h, `link "dsv3"`.
        .systemLibrary(name: "CDsv3", path: "Sources/CDsv3"),
        // The Swift wrapper: Model, Session, Tokenizer, Trainer, Grpo, Dsv3Error.
        .target(name: "Dsv3", dependencies: ["CDsv3"], path: "Sources/Dsv3"),
        // The binding scenario (bindings/testdata/expected.json) and API tests.
        .testTarget(name: "Dsv3Tests", dependencies: ["Dsv3"], path: "Tests/Dsv3Tests"),
    ]
)
