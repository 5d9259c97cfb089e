//! NCCL transport smoke test on one GPU (a world of one rank): communicator setup through the
//! dlopened libnccl, messages to itself by tag in any order, and an all-reduce. Skips without a
//! GPU or without libnccl.
#![cfg(feature = "nccl")]
mod common;
use common::device;
use dsv3_core::pipeline::schedule::Chunk;
use dsv3_core::pipeline::transport::{Tag, Transport};
use dsv3_kernels::nccl::{nccl_present, NcclTransport};

#[test]
fn single_rank_nccl_transport() {
    let Some(dev) = device("single_rank_nccl_transport") else { return };
    if !nccl_present() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIP single_rank_nccl_transport: libnccl.so not found");
        return;
    }
    let id = NcclTransport::new_id().unwrap();
    let mut t = NcclTransport::new(&dev, 0, 1, id).unwrap();
    let tag = |mb| Tag { chunk: Chunk { dir: 0, stage: 1, mb }, forward: true };
    t.send(0, tag(0), vec![1.0, 2.0]).unwrap();
    t.send(0, tag(1), vec![3.0]).unwrap();
    assert_eq!(t.recv(0, tag(1)).unwrap(), vec![3.0]);
    assert_eq!(t.recv(0, tag(0)).unwrap(), vec![1.0, 2.0]);
    assert!(t.recv(0, tag(2)).is_err(), "a message never sent is an error, not a hang");
    assert!(t.send(1, tag(0), vec![]).is_err(), "no rank 1");
    let mut v = vec![1.5f32, -2.0, 3.25];
    t.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, vec![1.5, -2.0, 3.25], "a world of one: the sum is the input");
    t.flush().unwrap();
    t.abort();
    assert!(t.send(0, tag(0), vec![1.0]).is_err());
}
