//! Pipeline parallelism: per-rank schedules (1F1B, ZB-H1, DualPipe, DualPipeV), a simulator of
//! their bubbles and memory, and (with `std`) an executor that trains a model split into stages
//! with one thread per rank.
//!
//! - [`schedule`]: the ops (F, B, W, FB), the four generators and their preconditions.
//! - [`sim`]: the dependency-driven replay: timelines, bubbles, peak activations, deadlocks.
pub mod schedule;
pub mod sim;

pub use schedule::{Chunk, Kind, Op, Schedule};
pub use sim::{simulate, Costs, SimResult};
