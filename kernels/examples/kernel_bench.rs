//! Kernel benchmarks on a GPU: `cargo build --release -p dsv3-kernels --example kernel_bench`, copy
//! `target/release/examples/kernel_bench` to the GPU machine and run it. Prints achieved TFLOP/s /
//! GB/s next to cuBLAS and the device-copy ceiling measured in the same run. `kernel_bench attn`
//! runs only the prefill attention lines (flash vs the absorbed per-row path).
fn main() {
    let dev = match dsv3_kernels::Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let only_attn = std::env::args().nth(1).as_deref() == Some("attn");
    let run = if only_attn { dsv3_kernels::bench::run_prefill_attn } else { dsv3_kernels::bench::run_all };
    if let Err(e) = run(&dev) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
