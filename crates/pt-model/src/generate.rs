//! Text generation with a KV cache, with HF `generate`'s logits processing:
//! repetition penalty, then (when sampling) temperature, top-k and top-p.

use anyhow::{Result, bail};
use candle_core::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{KvCache, Model};

#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Sample (true) or take the most likely token (false, greedy).
    pub do_sample: bool,
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: f64,
    /// HF's CTRL-style penalty on tokens already in the sequence (1: none).
    pub repetition_penalty: f64,
    pub seed: u64,
    pub eos_id: u32,
    pub pad_id: u32,
}

/// Generates a continuation of each prompt (a left-padded batch). `on_token`
/// sees every new token of every unfinished row as it is chosen. Returns the
/// new tokens per prompt, EOS included when one was generated.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        bail!("every prompt needs at least one token");
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut step_input: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| [vec![config.pad_id; width - p.len()], p.clone()].concat())
        .collect();
    let mut mask: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| [vec![0; width - p.len()], vec![1; p.len()]].concat())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut cache = KvCache::default();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut finished = vec![false; prompts.len()];
    for _ in 0..config.max_new_tokens {
        let logits = model
            .forward_cached(&step_input, &mask, &mut cache)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (row, mut scores) in logits.into_iter().enumerate() {
            if finished[row] {
                next.push(config.pad_id);
                continue;
            }
            if config.repetition_penalty != 1.0 {
                let seen: Vec<u32> = prompts[row].iter().chain(&outputs[row]).copied().collect();
                penalize_repetition(&mut scores, &seen, config.repetition_penalty);
            }
            let token = if config.do_sample {
                sample(&scores, config, &mut rng)
            } else {
                argmax(&scores)
            };
            outputs[row].push(token);
            on_token(row, token)?;
            finished[row] = token == config.eos_id;
            next.push(token);
        }
        for row in &mut mask {
            row.push(1);
        }
        step_input = next.into_iter().map(|t| vec![t]).collect();
        if finished.iter().all(|&f| f) {
            break;
        }
    }
    Ok(outputs)
}

/// HF's `RepetitionPenaltyLogitsProcessor`: a seen token's score is divided
/// by the penalty when positive, multiplied when negative.
pub fn penalize_repetition(scores: &mut [f32], seen: &[u32], penalty: f64) {
    let mut done = std::collections::HashSet::new();
    for &token in seen {
        if done.insert(token) {
            let score = &mut scores[token as usize];
            *score = if *score < 0.0 {
                *score * penalty as f32
            } else {
                *score / penalty as f32
            };
        }
    }
}

/// The first index of the largest score (as torch's argmax).
fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// The candidates sampling may pick, with their probabilities: temperature,
/// then top-k, then top-p, as HF's processors apply them.
pub fn candidates(scores: &[f32], config: &GenerationConfig) -> Vec<(u32, f64)> {
    let temperature = config.temperature.max(1e-6);
    let mut order: Vec<(u32, f64)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (i as u32, s as f64 / temperature))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    let max = order[0].1;
    let total: f64 = order.iter().map(|(_, s)| (s - max).exp()).sum();
    let mut probabilities: Vec<(u32, f64)> = order
        .into_iter()
        .map(|(t, s)| (t, (s - max).exp() / total))
        .collect();
    if config.top_p < 1.0 {
        // Keep tokens until their cumulative probability reaches top_p (at least one).
        let mut cumulative = 0.0;
        let keep = probabilities
            .iter()
            .position(|(_, p)| {
                cumulative += p;
                cumulative >= config.top_p
            })
            .map_or(probabilities.len(), |i| i + 1);
        probabilities.truncate(keep);
        let kept: f64 = probabilities.iter().map(|(_, p)| p).sum();
        for (_, p) in &mut probabilities {
            *p /= kept;
        }
    }
    probabilities
}

fn sample(scores: &[f32], config: &GenerationConfig, rng: &mut ChaCha8Rng) -> u32 {
    let probabilities = candidates(scores, config);
    let mut draw: f64 = rng.random();
    for &(token, p) in &probabilities {
        if draw < p {
            return token;
        }
        draw -= p;
    }
    probabilities.last().map_or(0, |&(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: 1,
            do_sample: true,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_id: 2,
            pad_id: 3,
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let mut scores = [2.0f32, -1.0, 4.0];
        penalize_repetition(&mut scores, &[0, 1, 0], 2.0);
        assert_eq!(scores, [1.0, -2.0, 4.0]);
    }

    #[test]
    fn top_k_top_p_and_temperature_filter_as_hf() {
        // Scores ln(0.5), ln(0.3), ln(0.2): softmax gives back 0.5, 0.3, 0.2.
        let scores = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let all = candidates(&scores, &config());
        assert_eq!(all.len(), 3);
        assert!((all[1].1 - 0.3).abs() < 1e-6);
        let top2 = candidates(
            &scores,
            &GenerationConfig {
                top_k: 2,
                ..config()
            },
        );
        assert_eq!(top2.iter().map(|c| c.0).collect::<Vec<_>>(), [0, 1]);
        assert!((top2[0].1 - 0.625).abs() < 1e-6);
        // top_p 0.7: 0.5 is not enough, 0.5 + 0.3 is.
        let nucleus = candidates(
            &scores,
            &GenerationConfig {
                top_p: 0.7,
                ..config()
            },
        );
        assert_eq!(nucleus.len(), 2);
        // Temperature 0.5 squares the odds: 0.25 : 0.09 : 0.04.
        let cold = candidates(
            &scores,
            &GenerationConfig {
                temperature: 0.5,
                ..config()
            },
        );
        assert!((cold[0].1 - 0.25 / 0.38).abs() < 1e-6);
    }
}
