//! Fused CPU kernels with their backward passes. Each is one parallel pass
//! forward and one backward where candle's composite ops would run several
//! single-threaded passes and keep every intermediate tensor alive for the
//! backward pass. [`crate::ops`] picks these for f32 tensors on the CPU and
//! the composite ops elsewhere (CUDA), so both compute the same function.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail,
};
use rayon::prelude::*;

/// Elements per parallel task of an elementwise kernel.
const TASK: usize = 1 << 14;

/// A kernel input's values; the callers make inputs contiguous.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => bail!("fused kernel input must be contiguous"),
    }
}

fn output(values: Vec<f32>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(values), shape.clone()))
}

/// `x` as the kernels need it: f32 and contiguous.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

// --- GELU, the tanh approximation BLOOM uses --------------------------------

const SQRT_2_OVER_PI: f32 = 0.797_884_56;
const GELU_CUBIC: f32 = 0.044_715;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)).tanh())
}

fn gelu_derivative(x: f32) -> f32 {
    let t = (SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(TASK)
            .zip(x.par_chunks(TASK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x)));
        output(y, layout.shape())
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

/// `grad · gelu'(x)`.
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (values(xs, xl)?, values(gs, gl)?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(TASK)
            .zip(x.par_chunks(TASK).zip(g.par_chunks(TASK)))
            .for_each(|(dx, (x, g))| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *dx = g * gelu_derivative(x);
                }
            });
        output(dx, xl.shape())
    }
}

pub(crate) fn gelu_op(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// --- LayerNorm over the last dimension ---------------------------------------

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of a row (two passes, as PyTorch's kernel is exact to).
fn row_statistics(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (variance + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (values(xs, xl)?, values(ws, wl)?, values(bs, bl)?);
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let (mean, rstd) = row_statistics(x, self.eps);
            for i in 0..h {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        });
        output(y, xl.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = weight.elem_count();
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, h)?),
            Some(packed.narrow(0, n + h, h)?),
        ))
    }
}

/// The gradients of x, weight and bias, packed into one vector.
struct LayerNormBackward {
    eps: f32,
}

/// Rows per parallel task of the LayerNorm backward (each sums its own dw, db).
const ROWS_PER_TASK: usize = 64;

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (values(xs, xl)?, values(ws, wl)?, values(gs, gl)?);
        let h = w.len();
        let mut dx = vec![0f32; x.len()];
        let task = h * ROWS_PER_TASK;
        let (dw, db) = dx
            .par_chunks_mut(task)
            .zip(x.par_chunks(task).zip(g.par_chunks(task)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, rstd) = row_statistics(x, self.eps);
                    let (mut mean_gy, mut mean_gy_xhat) = (0f32, 0f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        let gy = g[i] * w[i];
                        mean_gy += gy;
                        mean_gy_xhat += gy * xhat;
                        dw[i] += g[i] * xhat;
                        db[i] += g[i];
                    }
                    (mean_gy, mean_gy_xhat) = (mean_gy / h as f32, mean_gy_xhat / h as f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * w[i] - mean_gy - xhat * mean_gy_xhat);
                    }
                }
                (dw, db)
            })
            .reduce(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut dw, mut db), (w2, b2)| {
                    dw.iter_mut().zip(&w2).for_each(|(a, b)| *a += b);
                    db.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
                    (dw, db)
                },
            );
        let n = dx.len();
        dx.extend(dw);
        dx.extend(db);
        output(dx, &Shape::from(n + 2 * h))
    }
}

pub(crate) fn layer_norm_op(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

// --- Attention: scale, ALiBi, causal and padding mask, softmax ---------------

/// What decides each attention score besides q·k: ALiBi and the mask, for a
/// left- or right-padded batch of `batch` rows whose last `queries` of
/// `keys` positions are queries.
#[derive(Debug)]
pub struct AttentionBias {
    pub batch: usize,
    pub keys: usize,
    pub queries: usize,
    /// Per head.
    pub slopes: Vec<f32>,
    /// `[batch, keys]`: each key's position counting real tokens only (0 for pads).
    pub positions: Vec<f32>,
    /// `[batch, keys]`: false for padding.
    pub real: Vec<bool>,
}

impl AttentionBias {
    /// Whether query `i` (of `queries`) of row `b` may attend to key `j`.
    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        j <= self.keys - self.queries + i && self.real[b * self.keys + j]
    }

    /// ALiBi `[b, heads, 1, keys]` and the additive mask `[b, 1, queries,
    /// keys]` (HF's finite minimum where masked), for the composite path.
    pub fn tensors(&self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let (b, s, q, heads) = (self.batch, self.keys, self.queries, self.slopes.len());
        let mut alibi = Vec::with_capacity(b * heads * s);
        let mut additive = Vec::with_capacity(b * q * s);
        for row in 0..b {
            let positions = &self.positions[row * s..(row + 1) * s];
            for slope in &self.slopes {
                alibi.extend(positions.iter().map(|p| slope * p));
            }
            for i in 0..q {
                additive.extend((0..s).map(|j| {
                    if self.allowed(row, i, j) {
                        0.0
                    } else {
                        f32::MIN
                    }
                }));
            }
        }
        Ok((
            Tensor::from_vec(alibi, (b, heads, 1, s), device)?,
            Tensor::from_vec(additive, (b, 1, q, s), device)?,
        ))
    }
}

/// `softmax(scores · scale + alibi + mask)` over the keys of `[b, heads,
/// queries, keys]` raw scores. A row with no allowed key (a pad query of a
/// left-padded row) is uniform, as HF's finite mask minimum makes it.
struct AttentionSoftmax {
    scale: f32,
    bias: Arc<AttentionBias>,
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = values(storage, layout)?;
        let bias = &self.bias;
        let (s, q, heads) = (bias.keys, bias.queries, bias.slopes.len());
        let mut probs = vec![0f32; scores.len()];
        probs
            .par_chunks_mut(s)
            .zip(scores.par_chunks(s))
            .enumerate()
            .for_each(|(r, (p, z))| {
                let (b, head, i) = (r / (heads * q), (r / q) % heads, r % q);
                let slope = bias.slopes[head];
                let positions = &bias.positions[b * s..(b + 1) * s];
                let mut max = f32::NEG_INFINITY;
                for j in 0..s {
                    if bias.allowed(b, i, j) {
                        p[j] = z[j] * self.scale + slope * positions[j];
                        max = max.max(p[j]);
                    }
                }
                if max == f32::NEG_INFINITY {
                    p.fill(1.0 / s as f32);
                    return;
                }
                let mut sum = 0f32;
                for j in 0..s {
                    p[j] = if bias.allowed(b, i, j) {
                        (p[j] - max).exp()
                    } else {
                        0.0
                    };
                    sum += p[j];
                }
                p.iter_mut().for_each(|v| *v /= sum);
            });
        output(probs, layout.shape())
    }

    fn bwd(&self, _: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let keys = self.bias.keys;
        Ok(Some(probs.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBackward {
                scale: self.scale,
                keys,
            },
        )?))
    }
}

/// `scale · p ⊙ (g − Σ g p)` per row.
struct SoftmaxBackward {
    scale: f32,
    keys: usize,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (values(ps, pl)?, values(gs, gl)?);
        let mut dz = vec![0f32; p.len()];
        dz.par_chunks_mut(self.keys)
            .zip(p.par_chunks(self.keys).zip(g.par_chunks(self.keys)))
            .for_each(|(dz, (p, g))| {
                let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                for ((dz, p), g) in dz.iter_mut().zip(p).zip(g) {
                    *dz = self.scale * p * (g - dot);
                }
            });
        output(dz, pl.shape())
    }
}

pub(crate) fn attention_softmax_op(
    scores: &Tensor,
    scale: f64,
    bias: &Arc<AttentionBias>,
) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(AttentionSoftmax {
        scale: scale as f32,
        bias: bias.clone(),
    })
}
