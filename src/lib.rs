//! dsv3: a DeepSeek-V3 / R1 engine.
//!
//! This facade re-exports the core engine ([`dsv3_core`]); see its module map.
//! The README follows (its Rust example is compiled as a doc test).
#![doc = include_str!("../README.md")]
pub use dsv3_core::*;
