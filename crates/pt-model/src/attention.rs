//! BLOOM's attention on the CPU as one op, from the fused query-key-value
//! projection to the heads' merged context, with a backward of its own.
//! Through candle's autograd each of its dozen steps (the head split's
//! views and copies, the two batched products, the softmax) is a node whose
//! backward allocates a zeroed gradient for each input and adds into it, and
//! whose inputs stay alive until the backward pass: the `[b, heads, q,
//! keys]` scores and probabilities alone are 8 MB each per layer at the
//! bench shape. Here the products read q, k and v in place in the
//! projection and write the context (and in the backward the projection's
//! gradient) in place, a tile of [`QUERY_TILE`] queries at a time, so that
//! no `[heads, q, keys]` tensor exists: a tile's scores live in its
//! thread's scratch, and the backward recomputes them from q and k, as flash
//! attention does. A causal tile's products also stop at its last query's
//! key, which skips the masked upper triangle (3/8 of the scores at 256
//! positions, 7/16 at 512).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::custom_op::{TensorOp1, apply_op1};
use crate::fused::{AttentionBias, softmax_backward_row, with_values};
use crate::product::{Dst, Placed, product_at};

/// Queries per tile: small enough that a tile's scores stay in a core's
/// cache, large enough for gemm's register tiles and to keep the number of
/// tasks (batch rows × heads × tiles) small.
const QUERY_TILE: usize = 64;

/// The merged context `[b, s, heads · d]` of BLOOM's fused projection `qkv`
/// `[b, s, heads · 3 · d]` (laid out per head: `[.., head, (q|k|v), d]`),
/// without a KV cache: `softmax(q kᵀ / √d + ALiBi + mask) v` per head.
pub(crate) fn packed_attention(
    qkv: &Tensor,
    heads: usize,
    bias: &Arc<AttentionBias>,
) -> Result<Tensor> {
    apply_op1(PackedAttention::new(heads, bias), qkv)
}

/// q, k and v `[b, heads, s, d]` (contiguous) of BLOOM's fused projection
/// `[b, s, heads · 3 · d]`, laid out per head: `[.., head, (q|k|v), d]`.
pub(crate) fn split_heads(qkv: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
    let (b, s, width) = qkv.dims3()?;
    let qkv = qkv.reshape((b, s, heads, 3, width / (3 * heads)))?;
    let part = |i| {
        qkv.narrow(3, i, 1)?
            .squeeze(3)?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// The heads' context `[b, heads, s, d]` merged into `[b, s, heads · d]`.
pub(crate) fn merge_heads(context: &Tensor) -> Result<Tensor> {
    let (b, _, s, _) = context.dims4()?;
    context.transpose(1, 2)?.reshape((b, s, ()))
}

/// [`packed_attention`]'s op, whose forward and backward a block computing
/// its own backward calls directly.
pub(crate) struct PackedAttention {
    heads: usize,
    bias: Arc<AttentionBias>,
}

/// The projection's sizes, and where a batch row's and head's q, k and v
/// lie in it: `[b, s, heads, (q|k|v), d]`.
#[derive(Clone, Copy)]
struct Packing {
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
}

impl Packing {
    fn of(qkv: &Tensor, heads: usize, bias: &AttentionBias) -> Result<Self> {
        let (batch, seq, width) = qkv.dims3()?;
        if heads == 0 || width % (3 * heads) != 0 {
            bail!("packed-attention: a projection of {width} is not 3 × {heads} heads");
        }
        if (bias.batch, bias.keys, bias.queries) != (batch, seq, seq) {
            bail!("packed-attention: the bias is for another batch or length");
        }
        Ok(Self {
            batch,
            seq,
            heads,
            d: width / (3 * heads),
        })
    }

    /// Values per position of the projection.
    fn width(&self) -> usize {
        3 * self.heads * self.d
    }

    /// q (`part` 0), k (1) or v (2) of batch row `b` and `head`, `[s, d]`.
    fn part(&self, b: usize, head: usize, part: usize) -> Placed {
        Placed {
            start: b * self.seq * self.width() + (3 * head + part) * self.d,
            row: self.width(),
            column: 1,
        }
    }

    /// Batch row `b`'s and `head`'s `[s, d]` of the merged context (or its
    /// gradient), `[b, s, heads · d]`.
    fn context(&self, b: usize, head: usize) -> Placed {
        let width = self.heads * self.d;
        Placed {
            start: b * self.seq * width + head * self.d,
            row: width,
            column: 1,
        }
    }

    /// The query positions of each tile, in order.
    fn tiles(&self) -> impl DoubleEndedIterator<Item = Range<usize>> + use<> {
        let seq = self.seq;
        (0..seq)
            .step_by(QUERY_TILE)
            .map(move |start| start..(start + QUERY_TILE).min(seq))
    }
}

/// A thread's buffers for one tile: `[tile, keys]` each.
struct Scratch {
    scores: Vec<f32>,
    probs: Vec<f32>,
    grad_scores: Vec<f32>,
}

impl Scratch {
    fn new(keys: usize) -> Self {
        let tile = || vec![0f32; QUERY_TILE * keys];
        Self {
            scores: tile(),
            probs: tile(),
            grad_scores: tile(),
        }
    }
}

impl PackedAttention {
    pub(crate) fn new(heads: usize, bias: &Arc<AttentionBias>) -> Self {
        Self {
            heads,
            bias: bias.clone(),
        }
    }

    /// The keys `..end` that a tile of queries ending at `tile_end` may
    /// see: its causal prefix, or all keys in a padded row.
    fn keys_seen(&self, tile_end: usize, unpadded: bool) -> usize {
        match unpadded {
            true => self.bias.keys - self.bias.queries + tile_end,
            false => self.bias.keys,
        }
    }

    /// The probabilities `[tile, keys]` (in `scratch.probs`) of one tile of
    /// batch row `b`'s queries under `head`, computed in `scratch.scores`;
    /// returns `keys`, those the tile sees ([`Self::keys_seen`]).
    fn tile_probs(
        &self,
        qkv: &[f32],
        packing: Packing,
        (b, head, tile): (usize, usize, &Range<usize>),
        scratch: &mut Scratch,
    ) -> Result<usize> {
        let unpadded = self.bias.unpadded(b);
        let (m, d, keys) = (tile.len(), packing.d, self.keys_seen(tile.end, unpadded));
        let scores = &mut scratch.scores[..m * keys];
        // SAFETY: `scores` is this task's own buffer.
        #[allow(unsafe_code)]
        unsafe {
            product_at(
                (Dst::of(scores), Placed::rows_of(keys)),
                false,
                (qkv, packing.part(b, head, 0).down(tile.start)),
                (qkv, packing.part(b, head, 1).t()),
                [m, d, keys],
                Parallelism::None,
            )?
        };
        let scale = 1.0 / (d as f32).sqrt();
        let probs = &mut scratch.probs[..m * keys];
        for (row, (p, z)) in probs.chunks_mut(keys).zip(scores.chunks(keys)).enumerate() {
            let query = (b, head, tile.start + row);
            self.bias.softmax_row(p, z, scale, query, unpadded);
        }
        Ok(keys)
    }

    /// The merged context `[b, s, heads · d]` of the projection's values.
    fn context(&self, qkv: &[f32], packing: Packing) -> Result<Vec<f32>> {
        let Packing {
            batch, seq, heads, ..
        } = packing;
        let mut context = Vec::new();
        let len = batch * seq * heads * packing.d;
        let dst = Dst::spare(&mut context, len);
        let tasks: Vec<(usize, usize, Range<usize>)> = (0..batch * heads)
            .flat_map(|task| {
                packing
                    .tiles()
                    .map(move |tile| (task / heads, task % heads, tile))
            })
            .collect();
        tasks.into_par_iter().try_for_each_init(
            || Scratch::new(seq),
            |scratch, (b, head, tile)| {
                let keys = self.tile_probs(qkv, packing, (b, head, &tile), scratch)?;
                // SAFETY: each task writes its own tile of its own head.
                #[allow(unsafe_code)]
                unsafe {
                    product_at(
                        (dst, packing.context(b, head).down(tile.start)),
                        false,
                        (&scratch.probs, Placed::rows_of(keys)),
                        (qkv, packing.part(b, head, 2)),
                        [tile.len(), keys, packing.d],
                        Parallelism::None,
                    )
                }
            },
        )?;
        // SAFETY: the tasks wrote every tile of every head of every row.
        #[allow(unsafe_code)]
        unsafe {
            context.set_len(len)
        };
        Ok(context)
    }

    /// The projection's gradient `[b, s, heads · 3 · d]` from the merged
    /// context's `grad`. One task per batch row and head, which owns that
    /// head's q, k and v gradients: its tiles run last to first, as the
    /// last tile sees every key and so writes all of k's and v's gradients
    /// before the others add theirs.
    fn gradient(&self, qkv: &[f32], grad: &[f32], packing: Packing) -> Result<Vec<f32>> {
        let Packing { seq, heads, d, .. } = packing;
        let mut grad_qkv = Vec::new();
        let dst = Dst::spare(&mut grad_qkv, qkv.len());
        let scale = 1.0 / (d as f32).sqrt();
        (0..packing.batch * heads)
            .into_par_iter()
            .try_for_each_init(
                || Scratch::new(seq),
                |scratch, task| -> Result<()> {
                    let (b, head) = (task / heads, task % heads);
                    let [q, k, v] = [0, 1, 2].map(|part| packing.part(b, head, part));
                    for (index, tile) in packing.tiles().rev().enumerate() {
                        let keys = self.tile_probs(qkv, packing, (b, head, &tile), scratch)?;
                        let (m, seen_before) = (tile.len(), index > 0);
                        let grad_context = packing.context(b, head).down(tile.start);
                        let (probs, grad_probs) =
                            (&scratch.probs[..m * keys], &mut scratch.scores[..m * keys]);
                        // SAFETY (every product): the task writes only its own
                        // head's q, k and v gradients, and its own scratch.
                        #[allow(unsafe_code)]
                        unsafe {
                            // v's gradient: probsᵀ · grad, added over the tiles.
                            product_at(
                                (dst, v),
                                seen_before,
                                (probs, Placed::rows_of(keys).t()),
                                (grad, grad_context),
                                [keys, m, d],
                                Parallelism::None,
                            )?;
                            // The probabilities' gradient: grad · vᵀ.
                            product_at(
                                (Dst::of(grad_probs), Placed::rows_of(keys)),
                                false,
                                (grad, grad_context),
                                (qkv, v.t()),
                                [m, d, keys],
                                Parallelism::None,
                            )?;
                        }
                        let grad_scores = &mut scratch.grad_scores[..m * keys];
                        for ((dz, p), g) in grad_scores
                            .chunks_mut(keys)
                            .zip(probs.chunks(keys))
                            .zip(grad_probs.chunks(keys))
                        {
                            softmax_backward_row(dz, p, g, scale);
                        }
                        #[allow(unsafe_code)]
                        unsafe {
                            // q's gradient: grad_scores · k, this tile's rows.
                            product_at(
                                (dst, q.down(tile.start)),
                                false,
                                (grad_scores, Placed::rows_of(keys)),
                                (qkv, k),
                                [m, keys, d],
                                Parallelism::None,
                            )?;
                            // k's gradient: grad_scoresᵀ · q, added over the tiles.
                            product_at(
                                (dst, k),
                                seen_before,
                                (grad_scores, Placed::rows_of(keys).t()),
                                (qkv, q.down(tile.start)),
                                [keys, m, d],
                                Parallelism::None,
                            )?;
                        }
                    }
                    Ok(())
                },
            )?;
        // SAFETY: each task wrote all of its head's q, k and v gradients.
        #[allow(unsafe_code)]
        unsafe {
            grad_qkv.set_len(qkv.len())
        };
        Ok(grad_qkv)
    }
}

impl TensorOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let packing = Packing::of(qkv, self.heads, &self.bias)?;
        let context = with_values(qkv, |qkv| self.context(qkv, packing))??;
        let (b, s, _) = qkv.dims3()?;
        Tensor::from_vec(context, (b, s, packing.heads * packing.d), &Device::Cpu)
    }

    fn backward(&self, qkv: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let packing = Packing::of(qkv, self.heads, &self.bias)?;
        let grad_qkv = with_values(qkv, |qkv| {
            with_values(grad, |grad| self.gradient(qkv, grad, packing))
        })???;
        Ok(Some(Tensor::from_vec(grad_qkv, qkv.shape(), &Device::Cpu)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{assert_same_function, random};
    use crate::ops::attention_probs_composite;

    #[test]
    fn packed_attention_is_the_composite_attention() {
        // Three heads of d 4 over three tiles (the last one short): a
        // left-padded, a right-padded and an unpadded row.
        let (heads, d, s) = (3, 4, 2 * QUERY_TILE + 7);
        let padded = |pads: usize, left: bool| -> Vec<u32> {
            (0..s)
                .map(|j| u32::from(if left { j >= pads } else { j < s - pads }))
                .collect()
        };
        let real = [padded(70, true), padded(9, false), vec![1; s]];
        let bias = Arc::new(AttentionBias::alibi(&real, s, heads));
        let qkv = random(&[3, s, heads * 3 * d], 31);
        assert_same_function(
            &[qkv],
            |t| packed_attention(&t[0], heads, &bias).unwrap(),
            |t| {
                let qkv = t[0].reshape((3, s, heads, 3, d)).unwrap();
                let part = |i| {
                    let part = qkv.narrow(3, i, 1).unwrap().squeeze(3).unwrap();
                    part.transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let (q, k, v) = (part(0), part(1), part(2));
                let scores = q.matmul(&k.t().unwrap()).unwrap();
                let probs = attention_probs_composite(&scores, 0.5, &bias, None).unwrap();
                let context = probs.matmul(&v).unwrap();
                context
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((3, s, heads * d))
                    .unwrap()
            },
            1e-5,
        );
    }
}
