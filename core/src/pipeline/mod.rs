//! Pipeline parallelism: per-rank schedules (1F1B, ZB-H1, DualPipe, DualPipeV), a simulator of
//! their bubbles and memory, and (with `std`) an executor that trains a model split into stages
//! with one thread per rank.
//!
//! - [`schedule`]: the ops (F, B, W, FB), the four generators and their preconditions.
//! - [`sim`]: the dependency-driven replay: timelines, bubbles, peak activations, deadlocks.
//! - [`stage`]: a contiguous range of layers (plus embedding / head and loss): forward,
//!   backward (full or input-grad only), and the deferred weight-gradient jobs.
//! - [`transport`] (std): the [`transport::Transport`] trait and its in-process channels.
//! - [`exec`] (std): one training step of a schedule, one thread per rank, and the serial
//!   reference it matches.
#[cfg(feature = "std")]
pub mod exec;
pub mod schedule;
pub mod sim;
pub mod stage;
#[cfg(feature = "std")]
pub mod transport;

pub use schedule::{Chunk, Kind, Op, Schedule};
pub use sim::{simulate, Costs, SimResult};
