//! [`NcclTransport`]: the pipeline executor's [`Transport`] over NCCL point-to-point (cudarc's
//! `nccl`; libnccl is dlopened at first use), for one process per GPU.
//!
//! A message is two NCCL sends on the transport's own communication stream: a header
//! `[dir, stage, mb, forward | len << 1]` (4 x u64) then `len` f32 values. Sends are enqueued
//! and return at once (the staging buffers live until a later [`NcclTransport::flush`] or drop);
//! a receive reads the next header from that peer, then its data, and files messages that are
//! not the one asked for in a mailbox (NCCL matches sends and receives per peer in order, the
//! executor asks by tag). Messages to the rank itself never touch NCCL.
//!
//! Ordering caveat (unverified on multi-GPU runs): NCCL p2p is a rendezvous, so a send completes
//! only once the peer posts the matching receive; sends and receives share one stream here, so a
//! schedule must not make two ranks wait on each other's receives with sends queued in front
//! of them. Neighbouring stages of 1F1B / ZB-H1 / DualPipe exchange messages in orders that
//! satisfy this on a single communicator only when each rank's receives are posted in its
//! schedule order; a per-direction communicator pair is the next step if a multi-GPU run shows
//! otherwise.
//!
//! Launch: rank 0 creates [`cudarc::nccl::Id`], hands its bytes to the others out of band
//! (`Id::uninit`), and every rank calls [`NcclTransport::new`] with its own GPU.
use crate::device::{cuda_err, guard, Device};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id};
use dsv3_core::pipeline::schedule::Chunk;
use dsv3_core::pipeline::transport::{Tag, Transport};
use dsv3_core::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether libnccl can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names
    std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false)
}

struct SendComm(Comm);
// SAFETY: a communicator is used by one thread at a time (the transport is owned by its rank's
// thread); NCCL allows using a communicator from a thread other than the one that created it.
unsafe impl Send for SendComm {}

/// One rank's NCCL endpoint.
pub struct NcclTransport {
    comm: SendComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    mailbox: HashMap<(usize, Tag), Vec<f32>>,
    /// Buffers of sends that may still be in flight.
    in_flight: Vec<(CudaSlice<u64>, CudaSlice<f32>)>,
    aborted: bool,
}

fn nerr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Io(format!("NCCL: {what}: {e:?}"))
}

fn header(tag: Tag, len: usize) -> [u64; 4] {
    [tag.chunk.dir as u64, tag.chunk.stage as u64, tag.chunk.mb as u64, tag.forward as u64 | ((len as u64) << 1)]
}

fn parse(h: &[u64]) -> (Tag, usize) {
    let chunk = Chunk { dir: h[0] as usize, stage: h[1] as usize, mb: h[2] as usize };
    (Tag { chunk, forward: h[3] & 1 == 1 }, (h[3] >> 1) as usize)
}

impl NcclTransport {
    /// Joins the communicator `id` as `rank` of `world` on `dev` (a new stream for communication).
    pub fn new(dev: &Device, rank: usize, world: usize, id: Id) -> Result<NcclTransport> {
        if !nccl_present() {
            return Err(Error::Unsupported("NCCL: libnccl.so could not be loaded".into()));
        }
        if rank >= world {
            return Err(Error::Input(format!("rank {rank} of a world of {world}")));
        }
        let stream = dev.ctx.new_stream().map_err(|e| cuda_err("communication stream", e))?;
        let comm = guard("ncclCommInitRank", || Comm::from_rank(stream.clone(), rank, world, id))?
            .map_err(|e| nerr("ncclCommInitRank", e))?;
        Ok(NcclTransport {
            comm: SendComm(comm),
            stream,
            rank,
            world,
            mailbox: HashMap::new(),
            in_flight: Vec::new(),
            aborted: false,
        })
    }

    /// A fresh unique id (rank 0 makes it and sends its bytes to the other ranks).
    pub fn new_id() -> Result<Id> {
        if !nccl_present() {
            return Err(Error::Unsupported("NCCL: libnccl.so could not be loaded".into()));
        }
        guard("ncclGetUniqueId", Id::new)?.map_err(|e| nerr("ncclGetUniqueId", e))
    }

    /// Waits for every queued send and frees its staging buffers.
    pub fn flush(&mut self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("communication stream", e))?;
        self.in_flight.clear();
        Ok(())
    }

    /// Sums `data` over all ranks in place (data-parallel gradient reduction).
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let mut buf = self.stream.clone_htod(data).map_err(|e| cuda_err("upload", e))?;
        self.comm.0.all_reduce_in_place(&mut buf, &cudarc::nccl::ReduceOp::Sum).map_err(|e| nerr("all_reduce", e))?;
        let v = self.stream.clone_dtoh(&buf).map_err(|e| cuda_err("download", e))?;
        data.copy_from_slice(&v);
        Ok(())
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if self.aborted {
            return Err(Error::Io(format!("rank {}: the transport was aborted", self.rank)));
        }
        if peer >= self.world {
            return Err(Error::Input(format!("no rank {peer} (world of {})", self.world)));
        }
        Ok(())
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn send(&mut self, peer: usize, tag: Tag, data: Vec<f32>) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank {
            self.mailbox.insert((peer, tag), data);
            return Ok(());
        }
        let h = self.stream.clone_htod(&header(tag, data.len())).map_err(|e| cuda_err("upload", e))?;
        let d = self.stream.clone_htod(&data).map_err(|e| cuda_err("upload", e))?;
        self.comm.0.send(&h, peer as i32).map_err(|e| nerr("send header", e))?;
        if !data.is_empty() {
            self.comm.0.send(&d, peer as i32).map_err(|e| nerr("send", e))?;
        }
        self.in_flight.push((h, d));
        Ok(())
    }

    fn recv(&mut self, peer: usize, tag: Tag) -> Result<Vec<f32>> {
        self.check_peer(peer)?;
        loop {
            if let Some(d) = self.mailbox.remove(&(peer, tag)) {
                return Ok(d);
            }
            if peer == self.rank {
                return Err(Error::Io(format!("rank {}: waiting for a message it never sent itself", self.rank)));
            }
            let mut h = self.stream.alloc_zeros::<u64>(4).map_err(|e| cuda_err("alloc", e))?;
            self.comm.0.recv(&mut h, peer as i32).map_err(|e| nerr("recv header", e))?;
            let hv = self.stream.clone_dtoh(&h).map_err(|e| cuda_err("download", e))?;
            let (got, len) = parse(&hv);
            let mut data = Vec::new();
            if len > 0 {
                let mut d = self.stream.alloc_zeros::<f32>(len).map_err(|e| cuda_err("alloc", e))?;
                self.comm.0.recv(&mut d, peer as i32).map_err(|e| nerr("recv", e))?;
                data = self.stream.clone_dtoh(&d).map_err(|e| cuda_err("download", e))?;
            }
            self.mailbox.insert((peer, got), data);
        }
    }

    fn abort(&mut self) {
        // NCCL p2p has no out-of-band message to tell peers: this endpoint refuses further use, and
        // peers blocked on it wait until the process group is torn down by its launcher
        self.aborted = true;
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let tag = Tag { chunk: Chunk { dir: 1, stage: 7, mb: 12 }, forward: false };
        assert_eq!(parse(&header(tag, 123_456)), (tag, 123_456));
        let tag = Tag { chunk: Chunk { dir: 0, stage: 0, mb: 0 }, forward: true };
        assert_eq!(parse(&header(tag, 0)), (tag, 0));
    }
}
