//! dsv3: a DeepSeek-V3 / R1 engine.
//!
//! This facade re-exports the core engine ([`dsv3_core`]); see its module map.
pub use dsv3_core::*;
