//! Evaluation as HF's Trainer reports it (loss over tokens, perplexity,
//! next-token accuracy), alone or across the ranks of a job, with custom
//! metrics fed the per-block samples.

use std::ops::Range;

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor};
use pt_data::Blocks;
use pt_dist::{Collective, Single};
use pt_model::Model;
use pt_model::loss::next_token_loss_sum;
use pt_model::ops::log_softmax_last_dim;
use serde::Serialize;
use serde_json::{Value, json};

use crate::step::MicroBatch;

/// Evaluation results: `eval_loss` (mean over tokens), `perplexity`, `accuracy`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub eval_loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    pub eval_tokens: usize,
    /// Evaluation blocks.
    pub samples: usize,
    /// Custom metrics by name (without the `eval_` prefix).
    pub extra: Vec<(String, f64)>,
    /// Each source's loss, when the evaluation set joins several.
    pub sources: Vec<SourceLoss>,
}

/// One source's part of an evaluation (`eval_<name>_loss`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceLoss {
    pub name: String,
    pub loss: f64,
    pub tokens: usize,
}

/// What a metric plugin sees of one evaluation block.
pub struct EvalSample {
    /// The block's real tokens.
    pub tokens: Vec<u32>,
    /// Greedy prediction at each position but the last: `predicted[t]` is the
    /// model's guess for `tokens[t + 1]`.
    pub predicted: Vec<u32>,
    /// Log-probability the model gave `tokens[t + 1]`.
    pub logprobs: Vec<f32>,
}

/// Receives evaluation samples (custom metrics, e.g. WebAssembly plugins)
/// and adds metrics of its own that need the model (benchmark tasks).
pub trait MetricSink {
    /// Whether [`MetricSink::add`] reads the samples: building them costs a
    /// log-softmax per row, and rank 0 then evaluates every block itself.
    fn wants_samples(&self) -> bool;
    fn add(&mut self, samples: &[EvalSample]) -> Result<()>;
    /// The metrics of the evaluation that just ended; the next one starts afresh.
    fn finish(&mut self, model: &Model) -> Result<Vec<(String, f64)>>;
}

/// Samples of a batch: per row, so that only one row's log-softmax
/// `[seq, vocab]` exists at a time.
fn samples(
    logits: &Tensor,
    predictions: &[Vec<u32>],
    batch: &MicroBatch,
) -> Result<Vec<EvalSample>> {
    let mut samples = Vec::with_capacity(predictions.len());
    for (row, predicted) in predictions.iter().enumerate() {
        let real = batch.attention_mask[row]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let tokens = batch.input_ids[row][..real].to_vec();
        let predicting = logits.get(row)?.narrow(0, 0, real.saturating_sub(1))?;
        let log_probs = log_softmax_last_dim(&predicting.to_dtype(DType::F32)?)?;
        let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
        let logprobs = log_probs
            .gather(&targets, 1)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        samples.push(EvalSample {
            predicted: predicted[..real.saturating_sub(1)].to_vec(),
            tokens,
            logprobs,
        });
    }
    Ok(samples)
}

/// Loss, perplexity and next-token accuracy over `blocks`, without dropout;
/// custom metrics from `sink` come back in `extra`. `on_batch(done, total)`
/// follows the batches, for progress displays.
pub fn evaluate<'s>(
    model: &Model,
    blocks: &Blocks,
    batch_size: usize,
    sink: Option<&mut (dyn MetricSink + 's)>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalMetrics> {
    evaluate_across(&Single, model, blocks, batch_size, sink, on_batch)
}

/// [`evaluate`] shared by the ranks of `collective`: each evaluates a
/// contiguous part of the blocks and the sums are added up, so every rank
/// gets the metrics of all blocks. Metric plugins need every sample in one
/// place: with a `sink`, rank 0 evaluates all blocks and the others wait.
pub fn evaluate_across<'s>(
    collective: &dyn Collective,
    model: &Model,
    blocks: &Blocks,
    batch_size: usize,
    mut sink: Option<&mut (dyn MetricSink + 's)>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalMetrics> {
    model.set_dropout(None);
    let (rank, world) = (collective.rank(), collective.world_size());
    let sampled = sink.as_ref().is_some_and(|sink| sink.wants_samples());
    let mine = match (sampled, rank) {
        (true, 0) => 0..blocks.len(),
        (true, _) => 0..0,
        (false, _) => rank * blocks.len() / world..(rank + 1) * blocks.len() / world,
    };
    // Per source (one part for a single one): loss sum and tokens; batches
    // never mix sources, so that each source's loss is its own.
    let parts: Vec<Range<usize>> = match blocks.sources() {
        [] => std::iter::once(0..blocks.len()).collect(),
        sources => sources.iter().map(|(_, rows)| rows.clone()).collect(),
    };
    let batches: Vec<(usize, Vec<usize>)> = parts
        .iter()
        .enumerate()
        .flat_map(|(part, rows)| {
            let rows: Vec<usize> = (rows.start.max(mine.start)..rows.end.min(mine.end)).collect();
            rows.chunks(batch_size.max(1))
                .map(|chunk| (part, chunk.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    // Summed over ranks as one vector: each part's loss sum, then each
    // part's tokens, then the correct predictions.
    let n = parts.len();
    let mut sums = vec![0f64; 2 * n + 1];
    let total = batches.len();
    for (done, (part, chunk)) in batches.iter().enumerate() {
        let batch = MicroBatch::from_rows(blocks, chunk);
        // Metric plugins read every position's log-probabilities: only
        // then do the whole batch's logits exist at once.
        let (sum, count, predictions) = match sink.as_deref_mut().filter(|_| sampled) {
            Some(sink) => {
                let logits = model.forward(&batch.input_ids, &batch.attention_mask)?;
                let (sum, count) = next_token_loss_sum(&logits, &batch.labels)?;
                let predictions = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
                sink.add(&samples(&logits, &predictions, &batch)?)?;
                (sum.to_scalar::<f32>()? as f64, count, predictions)
            }
            None => model.eval_loss_sum_and_predictions(
                &batch.input_ids,
                &batch.attention_mask,
                &batch.labels,
            )?,
        };
        sums[*part] += sum;
        sums[n + part] += count as f64;
        for (row, labels) in predictions.iter().zip(&batch.labels) {
            sums[2 * n] += (1..labels.len())
                .filter(|&t| labels[t] >= 0 && row[t - 1] as i64 == labels[t])
                .count() as f64;
        }
        on_batch(done + 1, total);
    }
    if collective.communicates() {
        sums = collective
            .all_reduce_sum(&Tensor::new(sums.as_slice(), &Device::Cpu)?)?
            .to_vec1::<f64>()?;
    }
    let (losses, rest) = sums.split_at(n);
    let (part_tokens, correct) = rest.split_at(n);
    let loss_sum: f64 = losses.iter().sum();
    let tokens = part_tokens.iter().sum::<f64>() as usize;
    let correct = correct[0] as usize;
    if tokens == 0 {
        bail!("the evaluation set has no tokens to predict (is it empty? check data_report.json)");
    }
    let extra = match sink {
        Some(sink) if rank == 0 => sink.finish(model)?,
        _ => Vec::new(),
    };
    let eval_loss = loss_sum / tokens as f64;
    Ok(EvalMetrics {
        eval_loss,
        perplexity: eval_loss.exp(),
        accuracy: correct as f64 / tokens as f64,
        eval_tokens: tokens,
        samples: blocks.len(),
        extra,
        sources: blocks
            .sources()
            .iter()
            .enumerate()
            .map(|(part, (name, _))| SourceLoss {
                name: name.clone(),
                loss: losses[part] / part_tokens[part].max(1.0),
                tokens: part_tokens[part] as usize,
            })
            .collect(),
    })
}

/// Evaluation results as HF names them (`eval_loss`, …; custom metrics as
/// `eval_NAME`), for the log history and `eval_results.json`.
pub fn eval_results(metrics: &EvalMetrics, epoch: f64, step: Option<usize>) -> Value {
    let mut results = json!({
        "eval_loss": metrics.eval_loss,
        "perplexity": metrics.perplexity,
        "eval_accuracy": metrics.accuracy,
        "eval_tokens": metrics.eval_tokens,
        "eval_samples": metrics.samples,
        "epoch": epoch,
    });
    for (name, value) in &metrics.extra {
        results[format!("eval_{name}")] = json!(value);
    }
    for source in &metrics.sources {
        results[format!("eval_{}_loss", source.name)] = json!(source.loss);
        results[format!("eval_{}_perplexity", source.name)] = json!(source.loss.exp());
    }
    if let Some(step) = step {
        results["step"] = json!(step);
    }
    results
}
