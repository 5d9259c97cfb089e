//! Kernel benchmarks on a GPU: `cargo build --release -p dsv3-kernels --example kernel_bench`, copy
//! `target/release/examples/kernel_bench` to the GPU machine and run it. Prints achieved TFLOP/s /
//! GB/s next to cuBLAS and the device-copy ceiling measured in the same run. `kernel_bench attn`
//! runs only the prefill attention lines (flash vs the absorbed per-row path); `kernel_bench
//! grouped [ROWS]` only the MoE experts' grouped products (32768 routed rows by default); `kernel_bench
//! ce [ROWS]` only the training head's cross-entropy (8192 x 32000 by default).
fn main() {
    let dev = match dsv3_kernels::Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("attn") => dsv3_kernels::bench::run_prefill_attn(&dev).map(drop),
        Some("grouped") => {
            let rows = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(32768);
            println!("{}", dev.name);
            dsv3_kernels::bench::run_grouped(&dev, rows).map(drop)
        }
        Some("ce") => {
            let rows = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(8192);
            println!("{}", dev.name);
            dsv3_kernels::bench::run_ce(&dev, rows, 32000).map(drop)
        }
        _ => dsv3_kernels::bench::run_all(&dev).map(drop),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
