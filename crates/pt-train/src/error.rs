//! What stops training for a reason the user fixes; the binary says how, in
//! its flags.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no training blocks: the corpus is smaller than one block")]
    NoTrainingBlocks,
    #[error("loss is {loss} at step {step}: stopping (the last checkpoint is intact)")]
    LossNotFinite { loss: f64, step: usize },
    #[error("the checkpoint was trained on {saved} blocks, this run has {now}")]
    OtherBlocks { saved: usize, now: usize },
    /// Blocks per micro-batch per rank, saved and now.
    #[error(
        "the checkpoint was trained by {saved_ranks} rank(s) × {saved_batch} blocks per micro-batch, this run has \
         {ranks} × {batch}: the data order and the schedule would not continue"
    )]
    OtherBatch {
        saved_ranks: usize,
        saved_batch: usize,
        ranks: usize,
        batch: usize,
    },
    #[error(
        "the checkpoint was trained with {saved} gradient accumulation steps, this run has {now}"
    )]
    OtherAccumulation { saved: usize, now: usize },
    #[error("{}: cannot write the checkpoint (the earlier checkpoints are intact)", .0.display())]
    CheckpointWrite(PathBuf),
}
