//! Optimisation as the HF Trainer does it: AdamW with f32 state, learning-rate
//! schedules with warmup, and global gradient-norm clipping.

#![forbid(unsafe_code)]

pub mod optim;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, clip_scale, grad_norm};
pub use schedule::{Schedule, SchedulerType};
