//! Mixing corpora: a domain corpus with general text, so that continued
//! pretraining learns the domain without forgetting the rest ("replay").
//! Each source is prepared on its own (its own cache entry, plugins and
//! report); the training set is then a list of (source, block) picks, drawn
//! with the sources' weights as LLaMA-Factory's `mix_strategy` draws
//! examples (HF `interleave_datasets`), but per block: blocks hold equal
//! numbers of tokens, so the weights are shares of training tokens, which
//! is what a replay ratio means, where HF's per-document draw would weigh
//! long and short documents alike.

use serde::{Deserialize, Serialize};

use crate::dedup::mix64;
use crate::packing::Blocks;

/// How sources are combined (LLaMA-Factory's `mix_strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixStrategy {
    /// Every block of every source once, source after source (the trainer
    /// shuffles them): the weights play no part.
    #[default]
    Concat,
    /// Draw a source by weight for each block until one source runs out
    /// (HF `stopping_strategy="first_exhausted"`): no block repeats, and
    /// with a small domain corpus beside a large general one, an epoch is
    /// one pass over the domain with general text at its share.
    InterleaveUnder,
    /// Draw until every source has run out at least once, restarting the
    /// ones that run out (`"all_exhausted"`): smaller sources repeat.
    InterleaveOver,
}

/// A source's part of the mix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drawn {
    /// Blocks the source has.
    pub available: u64,
    /// Blocks drawn from it (repeats counted).
    pub drawn: u64,
}

/// A reproducible stream of 64-bit values (SplitMix64).
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform permutation of `0..n` (Fisher–Yates).
    fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

/// The training blocks of `sources` mixed under `strategy` with `weights`
/// (any positive numbers; shares are their fractions), seeded by `seed`;
/// also what each source gave. Each source's blocks are taken in a seeded
/// order, so that a source cut short gives a random share of itself, not
/// its first files.
pub fn mix(
    sources: Vec<Blocks>,
    weights: &[f64],
    strategy: MixStrategy,
    seed: u64,
) -> (Blocks, Vec<Drawn>) {
    assert_eq!(sources.len(), weights.len(), "a weight per source");
    let mut draws = Draws(mix64(seed ^ 0x6D69_7865_6420_6461));
    let mut picks: Vec<(u32, u32)> = Vec::new();
    let counts: Vec<usize> = sources.iter().map(Blocks::len).collect();
    match strategy {
        MixStrategy::Concat => {
            for (s, &n) in counts.iter().enumerate() {
                picks.extend((0..n as u32).map(|b| (s as u32, b)));
            }
        }
        MixStrategy::InterleaveUnder | MixStrategy::InterleaveOver => {
            let total: f64 = weights.iter().sum();
            let orders: Vec<Vec<u32>> = counts.iter().map(|&n| draws.permutation(n)).collect();
            let mut next = vec![0usize; sources.len()];
            let under = strategy == MixStrategy::InterleaveUnder;
            // An empty source ends an `under` mix at once and never
            // finishes an `over` one: it counts as run out from the start.
            let mut exhausted: Vec<bool> = counts.iter().map(|&n| n == 0).collect();
            let done = |exhausted: &[bool]| match under {
                true => exhausted.iter().any(|&e| e),
                false => exhausted.iter().all(|&e| e),
            };
            while !done(&exhausted) {
                let mut u = draws.unit() * total;
                let s = weights
                    .iter()
                    .position(|&w| {
                        u -= w;
                        u < 0.0
                    })
                    .unwrap_or(weights.len() - 1);
                if counts[s] == 0 {
                    continue;
                }
                picks.push((s as u32, orders[s][next[s]]));
                next[s] += 1;
                if next[s] == counts[s] {
                    exhausted[s] = true;
                    next[s] = 0;
                }
            }
        }
    }
    let mut drawn: Vec<Drawn> = counts
        .iter()
        .map(|&n| Drawn {
            available: n as u64,
            drawn: 0,
        })
        .collect();
    for &(s, _) in &picks {
        drawn[s as usize].drawn += 1;
    }
    (Blocks::picked(sources, picks), drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of `n` one-token blocks holding `tag * 10_000 + i`.
    fn source(tag: u32, n: u32) -> Blocks {
        Blocks::new(
            1,
            (0..n).map(|i| tag * 10_000 + i).collect(),
            vec![1; n as usize],
        )
    }

    /// Each block's one id.
    fn ids(blocks: &Blocks) -> Vec<u32> {
        (0..blocks.len()).map(|i| blocks.row(i)[0]).collect()
    }

    /// Each block's source.
    fn tags(blocks: &Blocks) -> Vec<u32> {
        ids(blocks).iter().map(|id| id / 10_000).collect()
    }

    #[test]
    fn weights_are_honoured_within_sampling_tolerance() {
        let (mixed, drawn) = mix(
            vec![source(0, 8_000), source(1, 50_000)],
            &[0.8, 0.2],
            MixStrategy::InterleaveUnder,
            42,
        );
        // The domain source runs out first: all of it, and general text at
        // a fifth of the blocks.
        assert_eq!(drawn[0].drawn, 8_000);
        let n = mixed.len() as f64;
        let share = drawn[1].drawn as f64 / n;
        let sigma = (0.2 * 0.8 / n).sqrt();
        assert!((share - 0.2).abs() < 4.0 * sigma, "share {share}, n {n}");
        // No block repeats, and the general blocks are a random share of
        // the source, not its first ones.
        let mut general: Vec<u32> = ids(&mixed).into_iter().filter(|&id| id >= 10_000).collect();
        let largest = *general.iter().max().unwrap();
        general.sort();
        general.dedup();
        assert_eq!(general.len() as u64, drawn[1].drawn);
        assert!(largest > 10_000 + 40_000, "{largest}");
    }

    #[test]
    fn the_mix_is_reproducible_and_follows_the_seed() {
        let sources = || vec![source(0, 300), source(1, 300), source(2, 300)];
        let weights = [0.5, 0.3, 0.2];
        let one = mix(sources(), &weights, MixStrategy::InterleaveOver, 7).0;
        let again = mix(sources(), &weights, MixStrategy::InterleaveOver, 7).0;
        let other = mix(sources(), &weights, MixStrategy::InterleaveOver, 8).0;
        assert_eq!(one, again);
        assert_ne!(one, other);
    }

    #[test]
    fn over_repeats_small_sources_until_every_source_ran_out() {
        let (mixed, drawn) = mix(
            vec![source(0, 10), source(1, 1_000)],
            &[0.5, 0.5],
            MixStrategy::InterleaveOver,
            1,
        );
        assert_eq!(drawn[1].drawn, 1_000, "the large source is seen once");
        assert!(drawn[0].drawn > 900, "{drawn:?}");
        // Each pass over the small source is a whole permutation of it.
        let mut small: Vec<u32> = ids(&mixed)
            .into_iter()
            .filter(|&id| id < 10_000)
            .take(10)
            .collect();
        small.sort();
        assert_eq!(small, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn concat_takes_every_block_once_in_source_order() {
        let (mixed, drawn) = mix(
            vec![source(0, 3), source(1, 2)],
            &[1.0, 1.0],
            MixStrategy::Concat,
            0,
        );
        assert_eq!(tags(&mixed), [0, 0, 0, 1, 1]);
        assert_eq!((drawn[0].drawn, drawn[1].drawn), (3, 2));
        let (empty, _) = mix(
            vec![source(0, 3), source(1, 0)],
            &[0.5, 0.5],
            MixStrategy::InterleaveUnder,
            0,
        );
        assert!(empty.is_empty(), "an empty source ends an `under` mix");
    }
}
