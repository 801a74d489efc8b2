//! Training as the HF Trainer does it: the loop (`trainer`), AdamW with f32
//! state, learning-rate schedules with warmup, global gradient-norm
//! clipping, evaluation, checkpoints and `trainer_state.json`.

#![forbid(unsafe_code)]

mod checkpoint;
mod error;
pub mod evaluate;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod step;
pub mod trainer;

pub use checkpoint::{list_checkpoints, write_results};
pub use error::TrainError;
pub use optim::{AdamW, AdamWConfig, Parameter, clip_scale, grad_norm};
pub use schedule::{Schedule, SchedulerType};
