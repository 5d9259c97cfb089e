//! Kernel benchmarks on a GPU: `cargo build --release -p dsv3-kernels --example kernel_bench`, copy
//! `target/release/examples/kernel_bench` to the GPU machine and run it. Prints achieved TFLOP/s /
//! GB/s next to cuBLAS and the device-copy ceiling measured in the same run.
fn main() {
    let dev = match dsv3_kernels::Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = dsv3_kernels::bench::run_all(&dev) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
