//! Log-likelihoods of continuations, split and truncated as
//! lm-evaluation-harness's causal-LM path does, batched.

use anyhow::{Result, bail};
use candle_core::Tensor;
use pt_data::Tokenizer;
use pt_model::{KvCache, Model};

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
        if context_ids.is_empty() {
            bail!("the context {context:?} has no tokens to score a continuation after");
        }
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
fn rows<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
    max_length: usize,
) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    for (request, asked) in requests.into_iter().enumerate() {
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

/// Whether `request` is scored with its context's keys and values computed
/// once: it has a continuation of several tokens (one-token continuations
/// share a row anyway), and no input is cut to the window (a cut context
/// differs between continuations).
fn shares_cache(request: &Request, max_length: usize) -> bool {
    let longest = request
        .continuations
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    longest > 1 && request.context.len() + longest <= max_length + 1
}

/// The log-probabilities of `tokens` in the rows of `log_probs` (`[n, vocab]`).
fn picked(log_probs: &Tensor, tokens: &[u32]) -> Result<Vec<f32>> {
    let tokens = Tensor::new(tokens, log_probs.device())?.unsqueeze(1)?;
    Ok(log_probs.gather(&tokens, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}

/// Each request's log-likelihood per choice: the sum of its continuation
/// tokens' log-probabilities. Requests with continuations of several tokens
/// run their context once and every continuation after its cached keys and
/// values; the others run as rows (see [`rows`]), longest first. Each runs
/// `batch_size` contexts or rows at a time, padded; `progress(done, total)`
/// after each batch.
pub fn log_likelihoods(
    model: &Model,
    requests: &[Request],
    max_length: usize,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>> {
    let batch_size = batch_size.max(1);
    let mut scores: Vec<Vec<f64>> = requests
        .iter()
        .map(|r| vec![0.0; r.continuations.len()])
        .collect();
    let (mut cached, uncached): (Vec<usize>, Vec<usize>) =
        (0..requests.len()).partition(|&i| shares_cache(&requests[i], max_length));
    cached.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len()));
    let mut rows = rows(uncached.iter().map(|&i| &requests[i]), max_length)?;
    rows.sort_by_key(|row| std::cmp::Reverse(row.input.len()));
    let total = rows.len().div_ceil(batch_size) + cached.len().div_ceil(batch_size);
    let mut done = 0;
    for batch in cached.chunks(batch_size) {
        score_after_shared_context(model, requests, batch, &mut scores)?;
        done += 1;
        progress(done, total);
    }
    for batch in rows.chunks(batch_size) {
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
        for (&(_, &(_, _, request, choice)), log_prob) in
            targets.iter().zip(picked(&log_probs, &tokens)?)
        {
            scores[uncached[request]][choice] += log_prob as f64;
        }
        done += 1;
        progress(done, total);
    }
    Ok(scores)
}

/// Scores `batch` (indices of `requests`): the contexts, left-padded to end
/// together, in one pass that keeps their keys and values and scores every
/// continuation's first token; then each continuation of several tokens as
/// a row after a copy of its context's cache, right-padded.
fn score_after_shared_context(
    model: &Model,
    requests: &[Request],
    batch: &[usize],
    scores: &mut [Vec<f64>],
) -> Result<()> {
    let width = batch
        .iter()
        .map(|&i| requests[i].context.len())
        .max()
        .unwrap_or(0);
    let mut context_ids = Vec::with_capacity(batch.len());
    let mut context_mask = Vec::with_capacity(batch.len());
    for &i in batch {
        let context = &requests[i].context;
        let pad = width - context.len();
        context_ids.push([vec![0; pad], context.clone()].concat());
        context_mask.push([vec![0; pad], vec![1; context.len()]].concat());
    }
    let mut cache = KvCache::default();
    let last: Vec<(usize, usize)> = (0..batch.len()).map(|r| (r, width - 1)).collect();
    let log_probs =
        model.next_token_log_probs_cached(&context_ids, &context_mask, &mut cache, &last)?;
    // Every continuation's first token, from the context's last position.
    let mut first: Vec<(usize, usize, u32)> = Vec::new();
    for (r, &i) in batch.iter().enumerate() {
        for (choice, continuation) in requests[i].continuations.iter().enumerate() {
            first.push((r, choice, continuation[0]));
        }
    }
    let rows: Vec<u32> = first.iter().map(|&(r, _, _)| r as u32).collect();
    let rows = Tensor::from_vec(rows, first.len(), log_probs.device())?;
    let tokens: Vec<u32> = first.iter().map(|f| f.2).collect();
    for (&(r, choice, _), log_prob) in first
        .iter()
        .zip(picked(&log_probs.index_select(&rows, 0)?, &tokens)?)
    {
        scores[batch[r]][choice] += log_prob as f64;
    }
    // The rest of each longer continuation, after its context.
    let longer: Vec<(usize, usize, &[u32])> = batch
        .iter()
        .enumerate()
        .flat_map(|(r, &i)| {
            requests[i]
                .continuations
                .iter()
                .enumerate()
                .filter(|(_, c)| c.len() > 1)
                .map(move |(choice, c)| (r, choice, c.as_slice()))
        })
        .collect();
    let steps = longer
        .iter()
        .map(|(_, _, c)| c.len() - 1)
        .max()
        .unwrap_or(0);
    if steps == 0 {
        return Ok(());
    }
    let from: Vec<u32> = longer.iter().map(|&(r, _, _)| r as u32).collect();
    let mut cache = cache.select_rows(&from)?;
    let mut input_ids = Vec::with_capacity(longer.len());
    let mut mask = Vec::with_capacity(longer.len());
    let mut positions = Vec::new();
    let mut tokens = Vec::new();
    let mut owners = Vec::new();
    for (k, &(r, choice, continuation)) in longer.iter().enumerate() {
        let fed = &continuation[..continuation.len() - 1];
        input_ids.push([fed.to_vec(), vec![0; steps - fed.len()]].concat());
        mask.push(
            [
                context_mask[r].clone(),
                vec![1; fed.len()],
                vec![0; steps - fed.len()],
            ]
            .concat(),
        );
        // Token t + 1 is predicted at the position of token t.
        for (t, &token) in continuation[1..].iter().enumerate() {
            positions.push((k, t));
            tokens.push(token);
            owners.push((batch[r], choice));
        }
    }
    let log_probs = model.next_token_log_probs_cached(&input_ids, &mask, &mut cache, &positions)?;
    for (&(request, choice), log_prob) in owners.iter().zip(picked(&log_probs, &tokens)?) {
        scores[request][choice] += log_prob as f64;
    }
    Ok(())
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
