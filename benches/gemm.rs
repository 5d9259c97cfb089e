//! GEMM crate comparison for the shapes dsv3 runs on CPU (the choice behind `core/src/ops/gemm.rs`).
//!
//! `y[m,n] = x[m,k] · W[n,k]ᵀ` with W row-major `[out, in]` as checkpoints store it.
//! Shapes: the ~4M bench config's projections at M = 1 (decode), 8 (batched decode) and 256 (prefill).
//! Run: `cargo bench --bench gemm`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    // (n, k): q_a 128x256, kv_a 80x256, q_b 192x128, o 256x128, dense up 704x256, down 256x704, lm_head 512x256.
    let shapes = [(128usize, 256usize), (192, 128), (704, 256), (256, 704), (512, 256)];
    for &m in &[1usize, 8, 256] {
        let mut g = c.benchmark_group(format!("gemm_m{m}"));
        for &(n, k) in &shapes {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let mut y = vec![0f32; m * n];
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = format!("{n}x{k}");
            g.bench_with_input(BenchmarkId::new("dsv3_core", &id), &(), |b, _| {
                b.iter(|| dsv3::ops::gemm::matmul_t(m, n, k, black_box(&x), k, black_box(&w), k, &mut y, n, false))
            });
            for (label, par) in
                [("gemm_crate_1t", gemm::Parallelism::None), ("gemm_crate_2t", gemm::Parallelism::Rayon(2))]
            {
                g.bench_with_input(BenchmarkId::new(label, &id), &(), |b, _| {
                    b.iter(|| unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            y.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            black_box(x.as_ptr()),
                            1,
                            k as isize,
                            black_box(w.as_ptr()),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            par,
                        )
                    })
                });
            }
            g.bench_with_input(BenchmarkId::new("matrixmultiply", &id), &(), |b, _| {
                b.iter(|| unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        black_box(x.as_ptr()),
                        k as isize,
                        1,
                        black_box(w.as_ptr()),
                        1,
                        k as isize,
                        0.0,
                        y.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_millis(800));
    targets = bench
}
criterion_main!(benches);
