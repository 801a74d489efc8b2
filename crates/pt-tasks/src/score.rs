//! Log-likelihoods of continuations, split and truncated as
//! lm-evaluation-harness's causal-LM path does, batched.

use anyhow::{Result, bail};
use candle_core::Tensor;
use pt_data::Tokenizer;
use pt_model::Model;

/// A question's context and its choices' continuations, as token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

impl Request {
    /// The harness's split of each (context, continuation) pair: trailing
    /// whitespace moves from the context to the continuation; a
    /// continuation's tokens are those of `context + continuation` past the
    /// context's own encoding (special tokens as the tokenizer's
    /// post-processor adds them: a BOS for Llama, none for BLOOM or Qwen).
    /// The context is encoded once for all its continuations.
    pub fn encode(tokenizer: &Tokenizer, context: &str, continuations: &[String]) -> Result<Self> {
        let (context, moved) = context.split_at(context.trim_end().len());
        let context_ids = tokenizer.encode_with_special_tokens(context)?;
        let continuations = continuations
            .iter()
            .map(|continuation| {
                let whole = tokenizer
                    .encode_with_special_tokens(&format!("{context}{moved}{continuation}"))?;
                match whole.get(context_ids.len()..) {
                    Some(ids) if !ids.is_empty() => Ok(ids.to_vec()),
                    _ => bail!("the continuation {continuation:?} adds no tokens to its context"),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            context: context_ids,
            continuations,
        })
    }
}

/// A token scored: (the position whose logits predict it, the token, its
/// request, its choice).
type Target = (usize, u32, usize, usize);

/// One sequence through the model and the tokens scored on it.
struct Row {
    input: Vec<u32>,
    targets: Vec<Target>,
}

/// The model's inputs for `requests`: choice `c`'s input is
/// `(context + continuation)[-(max_length + 1):][:-1]` with the
/// continuation's tokens scored at its last positions. Choices with the same
/// input (one-token continuations: the context alone) share a row, so a
/// four-letter question costs one pass over its context.
fn rows(requests: &[Request], max_length: usize) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    for (request, asked) in requests.iter().enumerate() {
        let first_row = rows.len();
        for (choice, continuation) in asked.continuations.iter().enumerate() {
            if continuation.len() > max_length {
                bail!(
                    "a continuation of {} tokens does not fit the model's {max_length}",
                    continuation.len()
                );
            }
            let whole_len = asked.context.len() + continuation.len();
            let skip = whole_len.saturating_sub(max_length + 1);
            let mut input: Vec<u32> = asked.context[skip.min(asked.context.len())..].to_vec();
            input.extend(&continuation[..continuation.len() - 1]);
            let start = input.len() - continuation.len() + 1;
            let targets = continuation
                .iter()
                .enumerate()
                .map(|(i, &token)| (start + i - 1, token, request, choice));
            match rows[first_row..].iter_mut().find(|row| row.input == input) {
                Some(row) => row.targets.extend(targets),
                None => rows.push(Row {
                    input,
                    targets: targets.collect(),
                }),
            }
        }
    }
    Ok(rows)
}

/// Each request's log-likelihood per choice: the sum of its continuation
/// tokens' log-probabilities. Rows run longest first, `batch_size` at a
/// time, right-padded; `progress(done, total)` after each batch.
pub fn log_likelihoods(
    model: &Model,
    requests: &[Request],
    max_length: usize,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>> {
    let mut rows = rows(requests, max_length)?;
    rows.sort_by_key(|row| std::cmp::Reverse(row.input.len()));
    let mut scores: Vec<Vec<f64>> = requests
        .iter()
        .map(|r| vec![0.0; r.continuations.len()])
        .collect();
    let batches = rows.len().div_ceil(batch_size.max(1));
    for (done, batch) in rows.chunks(batch_size.max(1)).enumerate() {
        let width = batch[0].input.len();
        let input_ids: Vec<Vec<u32>> = batch
            .iter()
            .map(|row| {
                let mut ids = row.input.clone();
                ids.resize(width, 0);
                ids
            })
            .collect();
        let mask: Vec<Vec<u32>> = batch
            .iter()
            .map(|row| (0..width).map(|t| u32::from(t < row.input.len())).collect())
            .collect();
        let targets: Vec<(usize, &Target)> = batch
            .iter()
            .enumerate()
            .flat_map(|(r, row)| row.targets.iter().map(move |t| (r, t)))
            .collect();
        let positions: Vec<(usize, usize)> = targets.iter().map(|&(r, t)| (r, t.0)).collect();
        let log_probs = model.next_token_log_probs(&input_ids, &mask, &positions)?;
        let tokens: Vec<u32> = targets.iter().map(|(_, t)| t.1).collect();
        let tokens = Tensor::new(tokens.as_slice(), log_probs.device())?.unsqueeze(1)?;
        let picked = log_probs.gather(&tokens, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        for (&(_, &(_, _, request, choice)), log_prob) in targets.iter().zip(picked) {
            scores[request][choice] += log_prob as f64;
        }
        progress(done + 1, batches);
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-token continuations share the context's row; longer ones get a
    /// row each, scored at their last positions; an input longer than the
    /// model's window loses its first tokens.
    #[test]
    fn rows_share_contexts_and_truncate_from_the_left() {
        let letters = Request {
            context: vec![1, 2, 3],
            continuations: vec![vec![10], vec![11]],
        };
        let words = Request {
            context: vec![1, 2, 3, 4, 5],
            continuations: vec![vec![20, 21], vec![22]],
        };
        let rows = rows(&[letters, words], 5).unwrap();
        let layout: Vec<(Vec<u32>, Vec<Target>)> =
            rows.into_iter().map(|r| (r.input, r.targets)).collect();
        assert_eq!(
            layout,
            [
                (vec![1, 2, 3], vec![(2, 10, 0, 0), (2, 11, 0, 1)]),
                // (1 2 3 4 5 20 21)[-6:][:-1]
                (vec![2, 3, 4, 5, 20], vec![(3, 20, 1, 0), (4, 21, 1, 0)]),
                // (1 2 3 4 5 22)[-6:][:-1]
                (vec![1, 2, 3, 4, 5], vec![(4, 22, 1, 1)]),
            ]
        );
    }
}
