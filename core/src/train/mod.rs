//! Training: AdamW ([`optim`]), learning-rate schedules ([`schedule`]), and the [`trainer`]
//! that runs steps (gradient accumulation, global-norm clipping, auxiliary-loss-free bias
//! updates, router statistics).
pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::AdamW;
pub use schedule::LrSchedule;
pub use trainer::{MicroBatch, StepMetrics, TrainConfig, Trainer};
