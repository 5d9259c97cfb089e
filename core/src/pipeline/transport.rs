//! [`Transport`]: point-to-point transfers of boundary tensors (activations forward, gradients
//! backward) between pipeline ranks, and [`ChannelTransport`], its in-process implementation
//! (one thread per rank, `std::sync::mpsc` channels). Sends never wait for the receiver, so a
//! rank's communication overlaps its compute; a receive waits only for data not yet produced.
//! A multi-GPU implementation (NCCL send/recv on a communication stream) plugs in behind the
//! same trait.
use crate::error::{Error, Result};
use crate::pipeline::schedule::Chunk;
use alloc::format;
use alloc::vec::Vec;
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};

/// What a message carries: the boundary tensor of `chunk` (the sender's stage), an activation
/// when `forward`, else the gradient of the sender's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub chunk: Chunk,
    pub forward: bool,
}

/// Point-to-point transfers between the ranks of one pipeline.
pub trait Transport: Send {
    /// This endpoint's rank.
    fn rank(&self) -> usize;
    /// Sends `data` to `peer` (which may be this rank) without waiting for it to be received.
    fn send(&mut self, peer: usize, tag: Tag, data: Vec<f32>) -> Result<()>;
    /// Waits for the message `tag` from `peer`.
    fn recv(&mut self, peer: usize, tag: Tag) -> Result<Vec<f32>>;
    /// Tells every other rank that this one failed, so that none waits forever.
    fn abort(&mut self);
}

enum Msg {
    Data { from: usize, tag: Tag, data: Vec<f32> },
    Abort { from: usize },
}

/// The in-process [`Transport`]: an unbounded channel into each rank; messages that arrive
/// before they are needed wait in a mailbox.
pub struct ChannelTransport {
    rank: usize,
    peers: Vec<Option<Sender<Msg>>>,
    inbox: Receiver<Msg>,
    mailbox: HashMap<(usize, Tag), Vec<f32>>,
}

/// One connected [`ChannelTransport`] per rank.
pub fn channel_mesh(ranks: usize) -> Vec<ChannelTransport> {
    let (txs, rxs): (Vec<Sender<Msg>>, Vec<Receiver<Msg>>) = (0..ranks).map(|_| channel()).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(rank, inbox)| ChannelTransport {
            rank,
            // no sender to itself: a rank's inbox closes once every other rank is gone
            peers: txs.iter().enumerate().map(|(i, t)| (i != rank).then(|| t.clone())).collect(),
            inbox,
            mailbox: HashMap::new(),
        })
        .collect()
}

impl Transport for ChannelTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn send(&mut self, peer: usize, tag: Tag, data: Vec<f32>) -> Result<()> {
        if peer == self.rank {
            self.mailbox.insert((peer, tag), data);
            return Ok(());
        }
        let tx =
            self.peers.get(peer).and_then(|t| t.as_ref()).ok_or_else(|| Error::Input(format!("no rank {peer}")))?;
        tx.send(Msg::Data { from: self.rank, tag, data })
            .map_err(|_| Error::Io(format!("rank {}: rank {peer} has stopped", self.rank)))
    }

    fn recv(&mut self, peer: usize, tag: Tag) -> Result<Vec<f32>> {
        loop {
            if let Some(d) = self.mailbox.remove(&(peer, tag)) {
                return Ok(d);
            }
            match self.inbox.recv() {
                Ok(Msg::Data { from, tag, data }) => {
                    self.mailbox.insert((from, tag), data);
                }
                Ok(Msg::Abort { from }) => {
                    return Err(Error::Io(format!("rank {}: rank {from} failed", self.rank)));
                }
                Err(_) => return Err(Error::Io(format!("rank {}: every other rank has stopped", self.rank))),
            }
        }
    }

    fn abort(&mut self) {
        for tx in self.peers.iter().flatten() {
            let _ = tx.send(Msg::Abort { from: self.rank });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_by_tag_in_any_order() {
        let mut m = channel_mesh(2);
        let t = |mb, forward| Tag { chunk: Chunk { dir: 0, stage: 0, mb }, forward };
        let (a, b) = m.split_at_mut(1);
        a[0].send(1, t(0, true), alloc::vec![1.0]).unwrap();
        a[0].send(1, t(1, true), alloc::vec![2.0]).unwrap();
        assert_eq!(b[0].recv(0, t(1, true)).unwrap(), alloc::vec![2.0]);
        assert_eq!(b[0].recv(0, t(0, true)).unwrap(), alloc::vec![1.0]);
        a[0].abort();
        assert!(b[0].recv(0, t(2, true)).is_err());
    }
}
