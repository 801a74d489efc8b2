//! What a user can do about an error, in this binary's flags. The libraries
//! say what went wrong with typed errors and never name a flag (the same
//! library serves other front ends); each error that a flag fixes gets its
//! hint here, in one place, after the message.

use pt_data::{
    BadRecordError, CacheError, CallFailure, MissingTokenizer, PluginError, PluginErrorCause,
    PrepareError, RecordProblem,
};
use pt_dist::DistError;
use pt_hub::HubError;
use pt_train::TrainError;

/// An error as the user reads it: text a plugin controls (quoted in the
/// message) escaped so that it cannot drive the terminal, then the flags
/// that help.
pub fn explain(error: &anyhow::Error) -> String {
    let mut text = pt_data::text::escape_controls(&format!("{error:#}"), true).into_owned();
    if let Some(hint) = hint(error) {
        text.push('\n');
        text.push_str(&hint);
    }
    text
}

/// The hint for the first error in the chain (message or context) that a
/// flag fixes. anyhow's `downcast_ref` looks through every context layer.
fn hint(error: &anyhow::Error) -> Option<String> {
    if let Some(error) = error.downcast_ref::<PluginError>() {
        return Some(plugin_hint(error));
    }
    if let Some(error) = error.downcast_ref::<BadRecordError>() {
        return Some(record_hint(&error.problem));
    }
    if let Some(error) = error.downcast_ref::<PrepareError>() {
        return Some(match error {
            PrepareError::NoCorpus => {
                "Give a training corpus (--train_file_dir) or a validation corpus (--validation_file_dir).".into()
            }
            PrepareError::ShardOutOfRange { index, count } => {
                format!("--shard_index {index} is not below --num_shards {count}: shards count from 0.")
            }
        });
    }
    if let Some(error) = error.downcast_ref::<CacheError>() {
        return Some(match error {
            CacheError::CorruptEntry(_) => "Rerun with --overwrite_cache.".into(),
            CacheError::CorruptShard(_) => {
                "Prepare this shard again with --overwrite_cache.".into()
            }
            CacheError::MissingShard { index, count, .. } => format!(
                "Run `pt-host prepare` with the same flags and --num_shards {count} --shard_index {index}, then merge again."
            ),
            CacheError::ShardsFromOtherFiles { .. } => {
                "Prepare the shards again with --overwrite_cache.".into()
            }
        });
    }
    if error.downcast_ref::<MissingTokenizer>().is_some() {
        return Some(
            "--model_name_or_path (or --tokenizer_name_or_path) must be a directory holding tokenizer.json."
                .into(),
        );
    }
    if let Some(error) = error.downcast_ref::<TrainError>() {
        return Some(train_hint(error));
    }
    if let Some(error) = error.downcast_ref::<DistError>() {
        return dist_hint(error);
    }
    if let Some(error) = error.downcast_ref::<HubError>() {
        return Some(match error {
            HubError::Unreachable { .. } => {
                "Try HF_ENDPOINT=https://hf-mirror.com or --hub modelscope.".into()
            }
            HubError::NotFound { .. } => "Check the id, --model_revision and --hub.".into(),
        });
    }
    if error.downcast_ref::<pt_bundle::KeyExists>().is_some() {
        return Some("Choose another --name.".into());
    }
    None
}

fn record_hint(problem: &RecordProblem) -> String {
    let skip = "--on_bad_record skip skips such records and counts them";
    match problem {
        RecordProblem::TooLarge { limit, .. } => format!(
            "Raise --max_document_mb (now {}) if such records are documents, or {skip}.",
            limit >> 20
        ),
        RecordProblem::NoTextField { .. } | RecordProblem::NotAString { .. } => {
            format!("Pass --text_field to choose another field, or {skip}.")
        }
        _ => format!("Fix the record, or {skip}."),
    }
}

fn train_hint(error: &TrainError) -> String {
    match error {
        TrainError::NoTrainingBlocks => "Lower --block_size or add data.".into(),
        TrainError::LossNotFinite { .. } => {
            "Lower --learning_rate; --resume_from_checkpoint true continues from the last checkpoint."
                .into()
        }
        TrainError::OtherBlocks { .. } => "Resume with the same data and --block_size.".into(),
        TrainError::OtherBatch {
            saved_ranks,
            saved_batch,
            ..
        } => format!(
            "Resume with ranks × --per_device_train_batch_size = {} (e.g. {saved_ranks} × {saved_batch}).",
            saved_ranks * saved_batch
        ),
        TrainError::OtherAccumulation { saved, .. } => {
            format!("Resume with --gradient_accumulation_steps {saved}.")
        }
        TrainError::CheckpointWrite(_) => {
            "--resume_from_checkpoint true continues from the last checkpoint.".into()
        }
    }
}

fn dist_hint(error: &DistError) -> Option<String> {
    Some(match error {
        DistError::Disagreement { .. } => {
            "Start every rank with the same flags, with a shared --cache_dir and --output_dir."
                .into()
        }
        DistError::Timeout { seconds, .. } => format!(
            "Raise --ddp_timeout (now {seconds} s) if ranks legitimately wait that long, e.g. while rank 0 prepares a large corpus."
        ),
        DistError::BuiltWithoutNccl { .. } => "Or train on CPUs with --ddp_backend mpi.".into(),
        DistError::NcclWithoutCuda => {
            "--ddp_backend nccl needs --device_map cuda; on CPUs use --ddp_backend mpi.".into()
        }
        DistError::NotStartedByMpi { .. } => {
            "torchrun-style launches use --ddp_backend nccl.".into()
        }
        DistError::BuiltWithoutMpi { .. } => return None,
    })
}

/// What a user can do about a plugin failure.
fn plugin_hint(error: &PluginError) -> String {
    let skip = "or pass --on_plugin_error skip to skip such documents";
    match &error.cause {
        PluginErrorCause::Call(CallFailure::Deadline { .. }) => format!(
            "Raise --plugin_timeout_ms if the plugin needs more time per call, lower --plugin_batch_size, {skip}."
        ),
        PluginErrorCause::Call(CallFailure::MemoryCap { .. }) => format!(
            "Raise --plugin_memory_mb if the plugin legitimately needs more, lower --plugin_batch_size, {skip}."
        ),
        PluginErrorCause::Call(CallFailure::TooManyDerived { .. }) => {
            format!("Raise --max_derived_per_document if the plugin is right to, {skip}.")
        }
        PluginErrorCause::Call(CallFailure::DerivedPastLimit { .. }) => {
            "Raise --max_derived_documents, or pass --on_plugin_error skip to keep the first ones and discard the rest."
                .to_string()
        }
        _ => format!("Fix the plugin or the document, {skip}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// A library error, under the context layers callers add, still gets
    /// its flag hint after the whole message.
    #[test]
    fn typed_errors_get_their_flag_hints_through_context_layers() {
        let cases: Vec<(anyhow::Error, &str)> = vec![
            (
                BadRecordError {
                    path: "corpus/a.jsonl".into(),
                    line: 3,
                    problem: RecordProblem::NoTextField {
                        field: "text".into(),
                        keys: vec!["content".into()],
                    },
                }
                .into(),
                "corpus/a.jsonl:3: record has no `text` field (it has: content)\nPass --text_field",
            ),
            (
                TrainError::OtherBatch {
                    saved_ranks: 2,
                    saved_batch: 4,
                    ranks: 1,
                    batch: 4,
                }
                .into(),
                "Resume with ranks × --per_device_train_batch_size = 8 (e.g. 2 × 4).",
            ),
            (
                DistError::Timeout {
                    message: "all-reduce did not complete within 30 s".into(),
                    seconds: 30,
                }
                .into(),
                "within 30 s\nRaise --ddp_timeout (now 30 s)",
            ),
            (
                Err::<(), _>(std::io::Error::other("gone"))
                    .context(MissingTokenizer("m/tokenizer.json".into()))
                    .unwrap_err(),
                "m/tokenizer.json: cannot read the tokenizer: gone\n--model_name_or_path",
            ),
            (
                CacheError::MissingShard {
                    index: 1,
                    count: 3,
                    path: "cache/1-of-3".into(),
                }
                .into(),
                "--num_shards 3 --shard_index 1",
            ),
        ];
        for (error, expected) in cases {
            let explained = explain(&error.context("preparing").context("while running"));
            assert!(
                explained.contains(expected),
                "{expected:?} not in {explained:?}"
            );
        }
        let plain = explain(&anyhow::anyhow!("no hint for this"));
        assert_eq!(plain, "no hint for this");
    }
}
