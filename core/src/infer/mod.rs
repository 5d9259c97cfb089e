//! Inference: the latent KV cache ([`cache`]), sessions with batched prefill and decode
//! ([`session`]), sampling ([`sampling`]) and generation with streaming ([`generate`]).
pub mod cache;
pub mod generate;
pub mod sampling;
pub mod session;

pub use generate::{generate, generate_grouped, Event, GenerateOutput};
pub use sampling::{Sampler, SamplingParams};
pub use session::Session;
