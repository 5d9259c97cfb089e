//! FP8 GEMM benchmark on a GPU at DeepGEMM's shapes: `cargo build --release -p dsv3-kernels
//! --example fp8_bench`, run `target/release/examples/fp8_bench` on the GPU machine. Prints dsv3's
//! FP8 GEMM TFLOP/s next to cuBLASLt FP8 with 1x128/128x128 block scaling and cuBLAS bf16 measured
//! in the same process, and the quantize kernels' bandwidth against the device copy.
fn main() {
    let dev = match dsv3_kernels::Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = dsv3_kernels::bench::run_fp8(&dev) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
