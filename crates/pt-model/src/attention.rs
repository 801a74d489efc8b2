//! BLOOM's attention on the CPU as one op, from the fused query-key-value
//! projection to the heads' merged context, with a backward of its own.
//! Through candle's autograd each of its dozen steps (the head split's
//! views and copies, the two batched products, the softmax) is a node whose
//! backward allocates a zeroed gradient for each input and adds into it, and
//! whose inputs stay alive until the backward pass: the `[b, heads, q,
//! keys]` scores and probabilities alone are 8 MB each per layer at the
//! bench shape. Here the backward recomputes the probabilities from q and k,
//! as flash attention does, and the graph holds only the projection.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::custom_op::{TensorOp1, apply_op1};
use crate::fused::{AttentionBias, attention_softmax_backward, attention_softmax_op};
use crate::product::matmul;

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

impl PackedAttention {
    pub(crate) fn new(heads: usize, bias: &Arc<AttentionBias>) -> Self {
        Self {
            heads,
            bias: bias.clone(),
        }
    }

    /// `[b, s, heads, d]` of a `[b, s, heads · width]` tensor.
    fn per_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, width) = x.dims3()?;
        x.reshape((b, s, self.heads, width / self.heads))
    }

    fn scale(&self, q: &Tensor) -> Result<f32> {
        Ok(1.0 / (q.dim(3)? as f32).sqrt())
    }

    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scale = f64::from(self.scale(q)?);
        attention_softmax_op(&matmul(q, &k.t()?)?, scale, &self.bias)
    }
}

impl TensorOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let [q, k, v] = split_heads(qkv, self.heads)?;
        merge_heads(&matmul(&self.probs(&q, &k)?, &v)?)
    }

    fn backward(&self, qkv: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: the products below would otherwise join the graph.
        let (qkv, grad) = (qkv.detach(), grad.detach());
        let [q, k, v] = split_heads(&qkv, self.heads)?;
        let probs = self.probs(&q, &k)?;
        let grad = self.per_head(&grad)?.transpose(1, 2)?.contiguous()?;
        let grad_v = matmul(&probs.t()?, &grad)?;
        let grad_probs = matmul(&grad, &v.t()?)?;
        let grad_scores = attention_softmax_backward(&probs, &grad_probs, self.scale(&q)?)?;
        let grad_q = matmul(&grad_scores, &k)?;
        let grad_k = matmul(&grad_scores.t()?, &q)?;
        // Back to the projection's layout: [b, heads, s, 3, d] → [b, s, heads · 3 · d].
        let (b, s, _) = qkv.dims3()?;
        let packed = Tensor::stack(&[grad_q, grad_k, grad_v], 3)?;
        Ok(Some(packed.transpose(1, 2)?.reshape((b, s, ()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{assert_same_function, random};
    use crate::ops::attention_probs_composite;

    #[test]
    fn packed_attention_is_the_composite_attention() {
        // Three heads of d 4 over 6 positions: a left-padded, a right-padded
        // and an unpadded row.
        let (heads, d, s) = (3, 4, 6);
        let real = [vec![0, 0, 1, 1, 1, 1], vec![1, 1, 1, 1, 1, 0], vec![1; 6]];
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
