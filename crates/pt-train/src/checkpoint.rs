//! Checkpoint I/O: `checkpoint-N/` written whole or not at all, rotated by
//! `save_total_limit`, resumed from only when it continues this run; the
//! final outputs and HF's `*_results.json`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::Value;

use crate::TrainError;
use crate::state::TrainerState;
use crate::trainer::{Trainable, Trainer};

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

impl Trainer<'_> {
    /// The adapter or the full model into `dir`, with the tokenizer files
    /// beside them as HF's Trainer saves its tokenizer: weights for an
    /// extended vocabulary travel with the tokenizer that fits them.
    fn save_weights(&mut self, dir: &Path) -> Result<()> {
        match &self.trainable {
            Trainable::Adapter(config) => self.model.save_adapter(dir, config, &self.base_model)?,
            Trainable::Full { source } => {
                let dtype = self.model.dtype();
                self.model.save_model(
                    dir,
                    source,
                    dtype,
                    pt_model::hf_dir::DEFAULT_MAX_SHARD_BYTES,
                )?
            }
        }
        pt_model::hf_dir::copy_tokenizer_files(&self.tokenizer_dir, dir)
    }

    /// A resumed run must continue the checkpoint's data order and
    /// schedule: the same blocks, blocks per micro-batch over all ranks,
    /// and accumulation steps. Another world size is fine when
    /// `ranks × per_device_train_batch_size` stays the same.
    pub(crate) fn check_resumable(&self, train_blocks: usize) -> Result<()> {
        let (state, shape) = (&self.state, self.state.shape());
        if shape.train_blocks != train_blocks {
            return Err(TrainError::OtherBlocks {
                saved: shape.train_blocks,
                now: train_blocks,
            }
            .into());
        }
        let (world, batch) = (
            self.collective.world_size(),
            self.args.per_device_train_batch_size,
        );
        let saved_world = shape.world_size.max(1);
        let saved_batch = saved_world * state.train_batch_size;
        if saved_batch != world * batch {
            return Err(TrainError::OtherBatch {
                saved_ranks: saved_world,
                saved_batch: state.train_batch_size,
                ranks: world,
                batch,
            }
            .into());
        }
        let accumulation = shape.gradient_accumulation_steps;
        if accumulation != 0 && accumulation != self.args.gradient_accumulation_steps {
            return Err(TrainError::OtherAccumulation {
                saved: accumulation,
                now: self.args.gradient_accumulation_steps,
            }
            .into());
        }
        Ok(())
    }

    /// Writes `checkpoint-N/` (adapter, optimizer state, trainer state) into a
    /// staging directory and renames it into place: never half-written. Then
    /// deletes the oldest checkpoints beyond `save_total_limit`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = &self.args.output_dir.clone();
        let name = format!("checkpoint-{}", self.state.global_step);
        // Every rank holds the same weights and optimizer state: rank 0 writes them.
        if !self.collective.is_main() {
            return Ok(out.join(name));
        }
        fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
        let staging = out.join(format!(".{name}.partial"));
        let target = out.join(&name);
        let written = self.write_checkpoint(&staging, &target);
        if let Err(error) = written {
            // The earlier checkpoints are untouched; a resume picks the last one.
            fs::remove_dir_all(&staging).ok();
            return Err(error.context(TrainError::CheckpointWrite(target)));
        }
        if let Some(limit) = self.args.save_total_limit {
            let mut checkpoints = list_checkpoints(out)?;
            while checkpoints.len() > limit.max(1) {
                let (_, oldest) = checkpoints.remove(0);
                fs::remove_dir_all(&oldest)
                    .with_context(|| format!("{}: cannot delete", oldest.display()))?;
            }
        }
        Ok(target)
    }

    /// The checkpoint's files into `staging`, then `staging` renamed to `target`.
    fn write_checkpoint(&mut self, staging: &Path, target: &Path) -> Result<()> {
        if staging.exists() {
            fs::remove_dir_all(staging)?;
        }
        self.save_weights(staging)?;
        self.optimizer.save(&staging.join(OPTIMIZER))?;
        let state = staging.join(STATE);
        fs::write(&state, serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("{}: cannot write", state.display()))?;
        pt_fs::sync_directory(staging)?;
        if target.exists() {
            fs::remove_dir_all(target)?;
        }
        fs::rename(staging, target)?;
        pt_fs::sync_directory(target.parent().unwrap_or(Path::new(".")))
    }

    /// Restores weights, optimizer and trainer state from `checkpoint-N/`.
    pub fn resume(&mut self, checkpoint: &Path) -> Result<()> {
        let state_path = checkpoint.join(STATE);
        let state =
            TrainerState::from_json(&fs::read(&state_path).with_context(|| {
                format!("{}: not a checkpoint (no {STATE})", checkpoint.display())
            })?)
            .with_context(|| format!("{}: corrupt trainer state", state_path.display()))?;
        let file = checkpoint.join(self.trainable.weights_file());
        let weights = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("{}: corrupt or missing weights", file.display()))?;
        for (name, variable) in &self.named {
            let tensor = weights
                .get(name)
                .with_context(|| format!("{}: no `{name}`", file.display()))?;
            variable.set(
                &tensor
                    .to_device(variable.device())?
                    .to_dtype(variable.dtype())?,
            )?;
        }
        self.optimizer.load(&checkpoint.join(OPTIMIZER))?;
        self.state = state;
        Ok(())
    }

    /// The final outputs: the adapter or model in `output_dir` with its
    /// tokenizer files, and `trainer_state.json`. Written into a staging directory, then
    /// each file renamed into place: a reader never sees a half-written file.
    pub fn save_final(&mut self) -> Result<()> {
        if !self.collective.is_main() {
            return Ok(());
        }
        let dir = self.args.output_dir.clone();
        let staging = dir.join(".final.partial");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        self.save_weights(&staging)?;
        fs::write(staging.join(STATE), serde_json::to_vec_pretty(&self.state)?)?;
        pt_fs::sync_directory(&staging)?;
        for entry in fs::read_dir(&staging)? {
            let path = entry?.path();
            let target = dir.join(path.file_name().expect("a file name"));
            fs::rename(&path, &target)
                .with_context(|| format!("{}: cannot write", target.display()))?;
        }
        fs::remove_dir(&staging)?;
        pt_fs::sync_directory(&dir)
    }
}

/// `checkpoint-N` directories of `dir`, oldest (smallest N) first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    if !dir.is_dir() {
        return Ok(found);
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `name` into `dir` as pretty JSON (HF's `*_results.json`).
pub fn write_results(dir: &Path, name: &str, value: &Value) -> Result<()> {
    fs::create_dir_all(dir)?;
    pt_fs::write_atomically(&dir.join(name), &serde_json::to_vec_pretty(value)?)
}
