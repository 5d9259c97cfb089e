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
