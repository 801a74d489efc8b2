//! Learning-rate schedules of HF `get_scheduler`, as a function of the 0-based
//! optimizer step about to be taken.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// HF's warmup: `warmup_steps` when given (> 0), else `ceil(ratio · total)`.
    pub fn warmup(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as usize
        }
    }

    /// The learning rate of optimizer step `step` (0-based, before the update).
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != SchedulerType::Constant && step < self.warmup_steps {
            return self.peak_lr * s / w.max(1.0);
        }
        let decay_span = (t - w).max(1.0);
        let factor = match self.kind {
            SchedulerType::Linear => ((t - s) / decay_span).max(0.0),
            SchedulerType::Cosine => {
                let progress = (s - w) / decay_span;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay_as_hf() {
        let s = Schedule {
            kind: SchedulerType::Linear,
            peak_lr: 1e-2,
            warmup_steps: 2,
            total_steps: 6,
        };
        let lrs: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        assert_eq!(lrs, [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025]);
    }

    #[test]
    fn cosine_and_constants() {
        let cosine = Schedule {
            kind: SchedulerType::Cosine,
            peak_lr: 1.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!(cosine.lr(0), 1.0);
        assert!((cosine.lr(2) - 0.5).abs() < 1e-12);
        let with_warmup = Schedule {
            kind: SchedulerType::ConstantWithWarmup,
            peak_lr: 1.0,
            warmup_steps: 4,
            total_steps: 10,
        };
        assert_eq!((with_warmup.lr(1), with_warmup.lr(7)), (0.25, 1.0));
        let constant = Schedule {
            kind: SchedulerType::Constant,
            peak_lr: 1.0,
            warmup_steps: 4,
            total_steps: 10,
        };
        assert_eq!(constant.lr(0), 1.0);
        assert_eq!(Schedule::warmup(0, 0.1, 25), 3);
    }
}
