//! The device itself (`dsv3_kernels::Device`): what opening it sets up. Skip without a GPU.
mod common;
use common::*;
use cudarc::driver::{result, sys::CUmemPool_attribute};

/// Opening the device raises the stream-ordered allocator's release threshold (the default, 0,
/// returns every unused byte to the OS at each synchronization, so each training step would map
/// its activations anew); on a GPU, 64 MiB allocated, freed and synchronized stay reserved.
#[test]
fn the_memory_pool_keeps_its_memory_through_synchronizations() {
    let Some(dev) = device("the_memory_pool_keeps_its_memory_through_synchronizations") else { return };
    assert_eq!(dev.pool_release_threshold().unwrap(), u64::MAX);
    if emulator(&dev) {
        return; // the emulator keeps no reserve to measure
    }
    let bytes = 64usize << 20;
    let buf = dsv3_kernels::tensor::empty::<u8>(&dev, bytes).unwrap();
    drop(buf);
    dev.sync().unwrap();
    // SAFETY: the default pool of a live device; the attribute's value type is cuuint64_t
    let reserved = unsafe {
        let pool = result::device::get_default_mem_pool(dev.ctx.cu_device()).unwrap();
        let mut v = 0u64;
        result::mem_pool::get_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            (&mut v as *mut u64).cast(),
        )
        .unwrap();
        v
    };
    assert!(reserved >= bytes as u64, "{reserved} bytes reserved after freeing {bytes} and synchronizing");
}

/// A profiling window times every launch on the device and its side-stream view, by kernel name,
/// and leaves the results untouched; closing a window that is not open is an error.
#[test]
fn a_profile_times_every_launch_by_kernel() {
    use dsv3_kernels::ops::elementwise::{add, cast};
    use dsv3_kernels::{Act, DType};
    let Some(dev) = device("a_profile_times_every_launch_by_kernel") else { return };
    assert!(dev.profile_end().is_err(), "no window open");
    let mut rng = dsv3_core::rng::Rng::new(7);
    let n = 3000;
    let (xv, yv) = (randn(&mut rng, n), randn(&mut rng, n));
    let mut x = Act::from_f32(&dev, DType::F32, &xv).unwrap();
    let y = Act::from_f32(&dev, DType::F32, &yv).unwrap();
    let mut xb = poisoned(&dev, DType::Bf16, n);
    dev.profile_begin().unwrap();
    assert!(dev.profiling());
    for _ in 0..3 {
        add(&dev, &mut x, &y, n).unwrap();
    }
    let side = dev.fork().unwrap();
    cast(&side, &x, &mut xb, n).unwrap();
    dev.join(&side).unwrap();
    let p = dev.profile_end().unwrap();
    assert!(!dev.profiling());
    let calls: Vec<(&str, usize)> = p.kernels.iter().map(|k| (k.name.as_str(), k.calls)).collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.contains(&("add_f32", 3)) && calls.contains(&("cast_f32_bf16", 1)), "{calls:?}");
    assert!(p.kernels.iter().all(|k| k.ms >= 0.0 && k.ms.is_finite()), "{p:?}");
    assert!(p.busy_ms >= 0.0 && p.busy_ms <= p.wall_ms + 1e-6, "{p:?}");
    // launches after the window are not recorded, and the results are the launches' own
    add(&dev, &mut x, &y, n).unwrap();
    assert!(dev.profile_end().is_err());
    let got = x.to_f32(&dev).unwrap();
    let want: Vec<f32> = xv.iter().zip(&yv).map(|(a, b)| a + b + b + b + b).collect();
    assert_eq!(got, want);
    let cast_back = xb.to_f32(&dev).unwrap();
    let x3: Vec<f32> = xv.iter().zip(&yv).map(|(a, b)| a + b + b + b).collect();
    assert_eq!(cast_back, bf16r(&x3));
}
