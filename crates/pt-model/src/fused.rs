//! Fused CPU kernels with their backward passes. Each is one parallel pass
//! forward and one backward where candle's composite ops would run several
//! single-threaded passes and keep every intermediate tensor alive for the
//! backward pass. [`crate::ops`] picks these for f32 tensors on the CPU and
//! the composite ops elsewhere (CUDA), so both compute the same function.
//!
//! The kernels' loops are `#[multiversion(targets = "simd")]` functions:
//! pt-host is built for baseline x86-64 (SSE2's 4 lanes, no FMA), so each
//! is compiled again for x86-64-v2, v3 (AVX2, FMA) and v4 (AVX-512), and the
//! widest the CPU has runs, as gemm picks its kernels for the products.
//! The same float operations run in the same order in every copy (Rust
//! fuses no multiply-add unless asked), so every CPU computes the same values.

// multiversion's dispatcher calls the copies through `unsafe`.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor, bail,
};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per parallel task of an elementwise kernel.
const TASK: usize = 1 << 14;

/// A kernel input's f32 values; the callers make inputs contiguous.
pub fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => bail!("fused kernel input must be contiguous"),
    }
}

/// `f` of the f32 values of a CPU tensor `x` (made contiguous first).
pub(crate) fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        bail!("a CPU kernel got a tensor on another device");
    };
    Ok(f(values(storage, layout)?))
}

/// [`values`], writable: an in-place kernel's target.
pub fn values_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&mut values[start..end]),
        (CpuStorage::F32(_), None) => bail!("an in-place kernel's target must be contiguous"),
        _ => bail!("an in-place kernel's target must be f32"),
    }
}

fn output(values: Vec<f32>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(values), shape.clone()))
}

/// The largest elementwise difference of two tensors of one shape, for
/// comparing a fast path with its reference: infinite where one holds a NaN
/// the other does not (candle's `max` skips NaNs, so a NaN would pass).
pub fn max_abs_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!(
            "compared tensors differ in shape: {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    let values = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    Ok(values(a)?
        .iter()
        .zip(values(b)?)
        .map(|(&a, b)| match (a - b).abs() {
            d if d.is_nan() && !(a.is_nan() && b.is_nan()) => f32::INFINITY,
            d if d.is_nan() => 0.0,
            d => d,
        })
        .fold(0.0, f32::max))
}

/// Whether the fused kernels take `x`: an f32 tensor on the CPU (they make
/// their inputs contiguous themselves).
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

// --- GELU, the tanh approximation BLOOM uses --------------------------------

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `eˣ` without a libm call, so that loops over it vectorise: `x = n ln 2 +
/// r` with |r| ≤ ln2/2, a degree-6 Taylor polynomial for `eʳ` (relative
/// error < 2e-7) and `2ⁿ` built in the exponent bits.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5·2²³ (`round` is a libm
    // call). The sum's low mantissa bits then hold n itself: reading it from
    // them is integer arithmetic, where `n as i32` (a saturating cast, NaN to
    // 0) compiled to a scalar compare-and-convert per lane and left the loops
    // over this function one element at a time.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    let biased_exponent = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(biased_exponent << 23)
}

/// `1 + tanh(u) = 2 σ(2u)`, so BLOOM's `0.5 x (1 + tanh(u))` is `x σ(2u)`,
/// with no cancellation where tanh is near −1. Returns `(σ(2u), du/dx)`.
#[inline(always)]
fn gelu_parts(x: f32) -> (f32, f32) {
    let u = SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x);
    let sigmoid = 1.0 / (1.0 + fast_exp(-2.0 * u));
    (sigmoid, SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x))
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * gelu_parts(x).0
}

#[multiversion(targets = "simd")]
fn gelu_slice(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x));
}

#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let (s, du) = gelu_parts(x);
    s + x * s * (1.0 - s) * 2.0 * du
}

/// `dx = g · gelu'(x)`.
#[multiversion(targets = "simd")]
fn gelu_backward_slice(dx: &mut [f32], x: &[f32], g: &[f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        *dx = g * gelu_derivative(x);
    }
}

/// A backward kernel of a value and its output's gradient: `each(out,
/// value, grad)` over matching `chunk`-element pieces (any size for an
/// elementwise kernel; one row for a row-wise one), in parallel.
struct ZippedBackward<F> {
    name: &'static str,
    chunk: usize,
    each: F,
}

impl<F: Fn(&mut [f32], &[f32], &[f32]) + Send + Sync> CustomOp2 for ZippedBackward<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        vs: &CpuStorage,
        vl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (value, grad) = (values(vs, vl)?, values(gs, gl)?);
        let mut out = vec![0f32; value.len()];
        out.par_chunks_mut(self.chunk)
            .zip(
                value
                    .par_chunks(self.chunk)
                    .zip(grad.par_chunks(self.chunk)),
            )
            .for_each(|(out, (value, grad))| (self.each)(out, value, grad));
        output(out, vl.shape())
    }
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
            .for_each(|(y, x)| gelu_slice(y, x));
        output(y, layout.shape())
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_gradient(x, grad)?))
    }
}

pub(crate) fn gelu_op(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// `grad · gelu'(x)`: the input gradient of [`gelu_op`].
pub(crate) fn gelu_gradient(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &grad.contiguous()?,
        &ZippedBackward {
            name: "fused-gelu-backward",
            chunk: TASK,
            each: gelu_backward_slice,
        },
    )
}

// --- LayerNorm over the last dimension ---------------------------------------

struct LayerNorm {
    eps: f32,
}

#[multiversion(targets = "simd")]
fn layer_norm_row(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, rstd) = row_statistics(x, eps);
    for i in 0..y.len() {
        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
    }
}

/// Mean and 1/std of a row (two passes, as PyTorch's kernel is exact to).
#[inline(always)]
fn row_statistics(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum_of(row, |v| v) / n;
    let variance = sum_of(row, |v| (v - mean) * (v - mean)) / n;
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
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| layer_norm_row(y, x, w, b, self.eps));
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
        let [dx, dw, db] = norm_backward(x, weight, grad, layer_norm_backward(self.eps))?;
        Ok((dx, dw, db))
    }
}

fn layer_norm_backward(eps: f32) -> NormBackward {
    NormBackward {
        name: "fused-layer-norm-backward",
        sums: 2,
        eps,
        row: layer_norm_row_backward,
    }
}

/// The input gradient of [`layer_norm_op`] (a frozen weight's and bias's
/// are summed on the way and dropped).
pub(crate) fn layer_norm_input_gradient(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    grad: &Tensor,
) -> Result<Tensor> {
    let [dx, ..] = norm_backward(
        &x.contiguous()?,
        weight,
        grad,
        layer_norm_backward(eps as f32),
    )?;
    Ok(dx.expect("a norm's backward gives its input's gradient"))
}

/// LayerNorm's backward of one row; sums: the weight's and bias's gradients.
#[multiversion(targets = "simd")]
fn layer_norm_row_backward(eps: f32, Row { x, g, w, dx }: Row<'_>, sums: &mut [Vec<f32>]) {
    let h = w.len();
    let (mean, rstd) = row_statistics(x, eps);
    // `dx` holds g ⊙ w until the last pass; the means are lane sums, as
    // running ones would keep the loop one element at a time.
    for i in 0..h {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = g[i] * w[i];
        sums[0][i] += g[i] * xhat;
        sums[1][i] += g[i];
    }
    let mean_gy = sum_of(dx, |gy| gy) / h as f32;
    let mean_gy_xhat = sum_of_pairs(dx, x, |gy, x| gy * (x - mean) * rstd) / h as f32;
    for i in 0..h {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = rstd * (dx[i] - mean_gy - xhat * mean_gy_xhat);
    }
}

/// RMSNorm's backward of one row; sums: the weight's gradient.
#[multiversion(targets = "simd")]
fn rms_norm_row_backward(eps: f32, Row { x, g, w, dx }: Row<'_>, sums: &mut [Vec<f32>]) {
    let h = w.len();
    let rstd = inverse_rms(x, eps);
    // `dx` holds g ⊙ w until the last pass (see `layer_norm_row_backward`).
    for i in 0..h {
        dx[i] = g[i] * w[i];
        sums[0][i] += g[i] * x[i] * rstd;
    }
    let mean_gy_xhat = sum_of_pairs(dx, x, |gy, x| gy * x * rstd) / h as f32;
    for i in 0..h {
        dx[i] = rstd * (dx[i] - x[i] * rstd * mean_gy_xhat);
    }
}

/// Rows per parallel task of a norm's backward (each sums its own
/// per-column gradients).
const ROWS_PER_TASK: usize = 64;

/// One row of a norm's backward: the input, its output's gradient, the
/// weight, and where the input's gradient goes.
struct Row<'a> {
    x: &'a [f32],
    g: &'a [f32],
    w: &'a [f32],
    dx: &'a mut [f32],
}

/// A row-wise norm's backward over `(x, weight, grad)`: `row` per row,
/// accumulating `sums` per-column gradients (weight, bias); the result packs
/// `dx` and the sums into one vector.
struct NormBackward {
    name: &'static str,
    sums: usize,
    eps: f32,
    row: fn(f32, Row<'_>, &mut [Vec<f32>]),
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        self.name
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
        let partials: Vec<Vec<Vec<f32>>> = dx
            .par_chunks_mut(task)
            .zip(x.par_chunks(task).zip(g.par_chunks(task)))
            .map(|(dx, (x, g))| {
                let mut sums = vec![vec![0f32; h]; self.sums];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    (self.row)(self.eps, Row { x, g, w, dx }, &mut sums);
                }
                sums
            })
            .collect();
        let mut totals = vec![vec![0f32; h]; self.sums];
        for (k, total) in totals.iter_mut().enumerate() {
            add_in_task_order(total, partials.iter().map(|sums| &sums[k]));
        }
        let n = dx.len();
        dx.extend(totals.into_iter().flatten());
        output(dx, &Shape::from(n + self.sums * h))
    }
}

/// Adds each task's partial sums into `total` in task order, not rayon's
/// reduction tree (which follows work stealing): the same sums on every run.
fn add_in_task_order<'a>(total: &mut [f32], partials: impl Iterator<Item = &'a Vec<f32>>) {
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
}

/// The sums over rows of `x` `[rows, h]` (a bias's gradient): on the CPU in
/// f32 a block of rows per task, each adding whole rows (candle's `sum(0)`
/// walks the columns on one thread).
pub(crate) fn column_sums(x: &Tensor) -> Result<Tensor> {
    if !applies(x) {
        return x.sum(0);
    }
    let h = x.dim(1)?;
    let total = with_values(x, |values| {
        let partials: Vec<Vec<f32>> = values
            .par_chunks(h * ROWS_PER_TASK)
            .map(|rows| {
                let mut sums = vec![0f32; h];
                for row in rows.chunks(h) {
                    sums.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
                sums
            })
            .collect();
        let mut total = vec![0f32; h];
        add_in_task_order(&mut total, partials.iter());
        total
    })?;
    Tensor::from_vec(total, h, x.device())
}

/// The gradients of `x` `[n, h]`, of the weight and of the bias of
/// [`layer_norm_op`] (CPU, f32).
pub(crate) fn layer_norm_gradients(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    grad: &Tensor,
) -> Result<[Tensor; 3]> {
    let grads = norm_backward(
        &x.contiguous()?,
        weight,
        grad,
        layer_norm_backward(eps as f32),
    )?;
    Ok(grads.map(|grad| grad.expect("LayerNorm's backward gives all three")))
}

/// The gradients of `x` and of the per-column parameters (as many as
/// `backward.sums`; `None` beyond them) from one [`NormBackward`] pass.
fn norm_backward(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    backward: NormBackward,
) -> Result<[Option<Tensor>; 3]> {
    let (h, n, sums) = (weight.elem_count(), x.elem_count(), backward.sums);
    let packed = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &backward)?;
    let mut grads = [
        Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
        None,
        None,
    ];
    for (k, slot) in grads.iter_mut().skip(1).take(sums).enumerate() {
        *slot = Some(packed.narrow(0, n + k * h, h)?);
    }
    Ok(grads)
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

// --- RMSNorm and SwiGLU (the Llama family) -----------------------------------

struct RmsNorm {
    eps: f32,
}

#[multiversion(targets = "simd")]
fn rms_norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let rstd = inverse_rms(x, eps);
    for i in 0..y.len() {
        y[i] = x[i] * rstd * w[i];
    }
}

/// 1/rms of a row.
#[inline(always)]
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = sum_of(row, |v| v * v) / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (values(xs, xl)?, values(ws, wl)?);
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| rms_norm_row(y, x, w, self.eps));
        output(y, xl.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = NormBackward {
            name: "fused-rms-norm-backward",
            sums: 1,
            eps: self.eps,
            row: rms_norm_row_backward,
        };
        let [dx, dw, _] = norm_backward(x, weight, grad, backward)?;
        Ok((dx, dw))
    }
}

pub(crate) fn rms_norm_op(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// `silu(gate) ⊙ up`, whose backward gives both inputs' gradients at once.
struct SwiGlu;

/// `σ(x)`, with the vectorising exponential.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[multiversion(targets = "simd")]
fn swiglu_slice(y: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        *y = g * sigmoid(g) * u;
    }
}

#[multiversion(targets = "simd")]
fn swiglu_backward_slice(
    d_gate: &mut [f32],
    d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
) {
    for i in 0..gate.len() {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        d_up[i] = grad[i] * g * s;
        d_gate[i] = grad[i] * up[i] * s * (1.0 + g * (1.0 - s));
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (values(gs, gl)?, values(us, ul)?);
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(TASK)
            .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK)))
            .for_each(|(y, (gate, up))| swiglu_slice(y, gate, up));
        output(y, gl.shape())
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let packed = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBackward)?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(gate.shape())?),
            Some(packed.narrow(0, n, n)?.reshape(gate.shape())?),
        ))
    }
}

/// The gradients of gate and up, packed.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up, grad) = (values(gs, gl)?, values(us, ul)?, values(ds, dl)?);
        let n = gate.len();
        let mut packed = vec![0f32; 2 * n];
        let (d_gate, d_up) = packed.split_at_mut(n);
        d_gate
            .par_chunks_mut(TASK)
            .zip(d_up.par_chunks_mut(TASK))
            .zip(
                gate.par_chunks(TASK)
                    .zip(up.par_chunks(TASK))
                    .zip(grad.par_chunks(TASK)),
            )
            .for_each(|((d_gate, d_up), ((gate, up), grad))| {
                swiglu_backward_slice(d_gate, d_up, gate, up, grad)
            });
        output(packed, &Shape::from(2 * n))
    }
}

pub(crate) fn swiglu_op(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// --- RoPE (the Llama family) ---------------------------------------------------

/// Rotary position embedding of `[b, heads, s, d]`: dimension `i` and
/// `i + d/2` of each position rotated by that position's angle `θᵢ`
/// (transformers' `x·cos + rotate_half(x)·sin`). `cos`, `sin`: `[b, s, d/2]`.
/// A rotation's backward is the rotation by `−θ`: the same kernel with
/// `inverse`.
struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(storage, layout)?;
        let (b, heads, s, d) = layout.shape().dims4()?;
        let half = d / 2;
        if self.cos.len() != b * s * half {
            bail!(
                "fused RoPE: angles for {} values, the input needs {}",
                self.cos.len(),
                b * s * half
            );
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s * d)
            .zip(x.par_chunks(s * d))
            .enumerate()
            .for_each(|(row_head, (y, x))| {
                let row = row_head / heads;
                for t in 0..s {
                    let angles = (row * s + t) * half;
                    let (cos, sin) = (
                        &self.cos[angles..angles + half],
                        &self.sin[angles..angles + half],
                    );
                    let (x, y) = (&x[t * d..(t + 1) * d], &mut y[t * d..(t + 1) * d]);
                    rotate(y, x, cos, sin, sign);
                }
            });
        output(y, layout.shape())
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// One position's rotation: the halves of `x` turned by the angles whose
/// cosines and sines (times `sign`) are given.
#[multiversion(targets = "simd")]
fn rotate(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        y[i] = x[i] * c - x[i + half] * s;
        y[i + half] = x[i + half] * c + x[i] * s;
    }
}

/// [`Rope`] of `x` `[b, heads, s, d]` with angles' `cos`, `sin` `[b, s, d/2]`.
pub(crate) fn rope_op(x: &Tensor, cos: &Arc<Vec<f32>>, sin: &Arc<Vec<f32>>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        inverse: false,
    })
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
    /// ALiBi with the causal and padding mask of a left- or right-padded
    /// batch (`mask`: 1 for tokens, 0 for pads) whose last `queries`
    /// positions are the queries. Positions count tokens only, so left
    /// padding does not shift them.
    pub fn alibi(mask: &[Vec<u32>], queries: usize, heads: usize) -> Self {
        let keys = mask.first().map_or(0, Vec::len);
        let mut positions = Vec::with_capacity(mask.len() * keys);
        for row in mask {
            let mut seen = 0f32;
            positions.extend(row.iter().map(|&m| {
                seen += m as f32;
                if m == 1 { seen - 1.0 } else { 0.0 }
            }));
        }
        Self {
            batch: mask.len(),
            keys,
            queries,
            slopes: crate::bloom::alibi_slopes(heads),
            positions,
            real: mask.iter().flatten().map(|&m| m == 1).collect(),
        }
    }

    /// Whether row `b` has no padding: its queries then see exactly their
    /// causal prefix of keys.
    pub(crate) fn unpadded(&self, b: usize) -> bool {
        self.real[b * self.keys..(b + 1) * self.keys]
            .iter()
            .all(|&r| r)
    }

    /// Query `i` of row `b` (`unpadded`: [`Self::unpadded`]) under `head`:
    /// the softmax of its raw scores `z` into `p`, over the keys `..p.len()`,
    /// which must hold all it may see and, in a padded row, all keys (a pad
    /// query that may see none is uniform over them, as HF's finite mask
    /// minimum makes it).
    pub(crate) fn softmax_row(
        &self,
        p: &mut [f32],
        z: &[f32],
        scale: f32,
        (b, head, i): (usize, usize, usize),
        unpadded: bool,
    ) {
        let row = AttentionRow {
            scale,
            slope: self.slopes[head],
            positions: &self.positions[b * self.keys..(b + 1) * self.keys],
        };
        // Without padding the allowed keys are the causal prefix: loops with
        // no test per key, which vectorise.
        if unpadded {
            let (prefix, rest) = p.split_at_mut(self.keys - self.queries + i + 1);
            softmax_prefix(prefix, z, &row);
            rest.fill(0.0);
        } else {
            row.softmax_masked(p, z, |j| self.allowed(b, i, j));
        }
    }

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
        let unpadded: Vec<bool> = (0..bias.batch).map(|b| bias.unpadded(b)).collect();
        let mut probs = vec![0f32; scores.len()];
        probs
            .par_chunks_mut(s)
            .zip(scores.par_chunks(s))
            .enumerate()
            .for_each(|(r, (p, z))| {
                let (b, head, i) = (r / (heads * q), (r / q) % heads, r % q);
                bias.softmax_row(p, z, self.scale, (b, head, i), unpadded[b]);
            });
        output(probs, layout.shape())
    }

    fn bwd(&self, _: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(attention_softmax_backward(probs, grad, self.scale)?))
    }
}

/// The gradient of [`attention_softmax_op`]'s scores from its output `probs`
/// and their gradient: `scale · p ⊙ (g − Σ g p)`, a row at a time (each
/// row's dot product is its own).
pub(crate) fn attention_softmax_backward(
    probs: &Tensor,
    grad: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    probs.contiguous()?.apply_op2_no_bwd(
        &grad.contiguous()?,
        &ZippedBackward {
            name: "fused-softmax-backward",
            chunk: probs.dim(D::Minus1)?,
            each: |dz: &mut [f32], p: &[f32], g: &[f32]| softmax_backward_row(dz, p, g, scale),
        },
    )
}

/// One query's row of [`AttentionSoftmax`]: its head's ALiBi slope and its
/// batch row's key positions.
struct AttentionRow<'a> {
    scale: f32,
    slope: f32,
    positions: &'a [f32],
}

impl AttentionRow<'_> {
    /// Softmax over the keys `allowed` says a query may see (0 elsewhere);
    /// uniform when it may see none (a pad query of a left-padded row), as
    /// HF's finite mask minimum makes it.
    fn softmax_masked(&self, p: &mut [f32], z: &[f32], allowed: impl Fn(usize) -> bool) {
        let mut max = f32::NEG_INFINITY;
        for j in 0..p.len() {
            if allowed(j) {
                p[j] = z[j] * self.scale + self.slope * self.positions[j];
                max = max.max(p[j]);
            }
        }
        if max == f32::NEG_INFINITY {
            p.fill(1.0 / p.len() as f32);
            return;
        }
        for (j, p) in p.iter_mut().enumerate() {
            *p = if allowed(j) { fast_exp(*p - max) } else { 0.0 };
        }
        let sum = sum_of(p, |x| x);
        p.iter_mut().for_each(|p| *p /= sum);
    }
}

/// Softmax over the keys of `z` (raw scores) into `p`, all allowed.
#[multiversion(targets = "simd")]
fn softmax_prefix(p: &mut [f32], z: &[f32], row: &AttentionRow<'_>) {
    for ((p, &z), &position) in p.iter_mut().zip(z).zip(row.positions) {
        *p = z * row.scale + row.slope * position;
    }
    let max = max_of(p);
    p.iter_mut().for_each(|p| *p = fast_exp(*p - max));
    let sum = sum_of(p, |x| x);
    p.iter_mut().for_each(|p| *p /= sum);
}

/// Lanes of the row reductions: independent partial maxima and sums that
/// the compiler keeps in vector registers (a single running sum would be
/// one long dependency chain, and float sums are not reordered for it).
const LANES: usize = 16;

/// The maximum of `values` (−∞ if empty), in [`LANES`] lanes.
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let (chunks, tail) = values.as_chunks::<LANES>();
    let mut maxima = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &x) in maxima.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    maxima
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// The sum of `term` over `values`, in [`LANES`] lanes.
#[inline(always)]
fn sum_of(values: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let (chunks, tail) = values.as_chunks::<LANES>();
    let mut sums = [0f32; LANES];
    for chunk in chunks {
        for (s, &x) in sums.iter_mut().zip(chunk) {
            *s += term(x);
        }
    }
    sums.iter().sum::<f32>() + tail.iter().map(|&x| term(x)).sum::<f32>()
}

/// The sum of `term` over `a` and `b` side by side, in [`LANES`] lanes.
#[inline(always)]
fn sum_of_pairs(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let b = &b[..a.len()];
    let ((a_chunks, a_tail), (b_chunks, b_tail)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let mut sums = [0f32; LANES];
    for (a, b) in a_chunks.iter().zip(b_chunks) {
        for ((s, &a), &b) in sums.iter_mut().zip(a).zip(b) {
            *s += term(a, b);
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(&a, &b)| term(a, b)).sum();
    sums.iter().sum::<f32>() + tail
}

/// Where `value` first occurs in `values` (0 if nowhere): whole chunks are
/// tested without a branch per element, so that the scan vectorises.
#[inline(always)]
fn first_position(values: &[f32], value: f32) -> usize {
    let (chunks, _) = values.as_chunks::<LANES>();
    let chunk = chunks
        .iter()
        .position(|chunk| chunk.iter().fold(false, |found, &x| found | (x == value)))
        .unwrap_or(chunks.len());
    let start = chunk * LANES;
    values[start..]
        .iter()
        .position(|&x| x == value)
        .map_or(0, |offset| start + offset)
}

/// `dz = scale · p ⊙ (g − Σ g p)` of one row.
#[multiversion(targets = "simd")]
pub(crate) fn softmax_backward_row(dz: &mut [f32], p: &[f32], g: &[f32], scale: f32) {
    let dot = sum_of_pairs(p, g, |p, g| p * g);
    for ((dz, p), g) in dz.iter_mut().zip(p).zip(g) {
        *dz = scale * p * (g - dot);
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

// --- Cross-entropy over a chunk of logits ------------------------------------

/// Per row of `[rows, vocab]` logits: the cross-entropy of its target
/// (`None`: 0), its arg-max (the first maximum, as candle's `argmax`), and,
/// when `into_gradient`, the logits replaced by the loss's gradient,
/// `softmax − one-hot` (zero on rows without a target). One parallel pass
/// per row where the composite ops take six single-threaded ones and a
/// tensor each.
struct CrossEntropyRows<'a> {
    targets: &'a [Option<u32>],
    into_gradient: bool,
    rows: std::sync::Mutex<Vec<(f32, u32)>>,
}

impl candle_core::InplaceOp1 for CrossEntropyRows<'_> {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let logits = values_mut(storage, layout)?;
        let vocab = layout.dims().last().copied().unwrap_or(1);
        if logits.len() != vocab * self.targets.len() {
            bail!("fused-cross-entropy: one target per row of logits");
        }
        let rows = logits
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(z, &target)| cross_entropy_row(z, target, self.into_gradient))
            .collect();
        *self.rows.lock().expect("not poisoned") = rows;
        Ok(())
    }
}

#[multiversion(targets = "simd")]
fn cross_entropy_row(z: &mut [f32], target: Option<u32>, into_gradient: bool) -> (f32, u32) {
    let max = max_of(z);
    let argmax = first_position(z, max) as u32;
    let sum = sum_of(z, |x| fast_exp(x - max));
    let Some(target) = target.map(|t| t as usize) else {
        if into_gradient {
            z.fill(0.0);
        }
        return (0.0, argmax);
    };
    let loss = sum.ln() - (z[target] - max);
    if into_gradient {
        let inverse = 1.0 / sum;
        z.iter_mut().for_each(|x| *x = fast_exp(*x - max) * inverse);
        z[target] -= 1.0;
    }
    (loss, argmax)
}

/// Each row's cross-entropy and arg-max of `logits` `[rows, vocab]` (f32 on
/// the CPU, contiguous), which become the loss's gradient when
/// `into_gradient`: see [`CrossEntropyRows`].
pub(crate) fn cross_entropy_rows(
    logits: &Tensor,
    targets: &[Option<u32>],
    into_gradient: bool,
) -> Result<Vec<(f32, u32)>> {
    let vocab = logits.dim(1)?;
    if let Some(&t) = targets.iter().flatten().find(|&&t| t as usize >= vocab) {
        bail!("target {t} is outside the vocabulary ({vocab})");
    }
    let op = CrossEntropyRows {
        targets,
        into_gradient,
        rows: std::sync::Mutex::new(Vec::new()),
    };
    logits.inplace_op1(&op)?;
    Ok(op.rows.into_inner().expect("not poisoned"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::{
        attention_probs_composite, layer_norm_composite, rms_norm_composite, swiglu_composite,
    };
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_difference(a, b).unwrap()
    }

    /// Runs `f` (fused) and `g` (composite) on the same variables and
    /// compares outputs and the gradients of a random weighted sum of them.
    pub(crate) fn assert_same_function(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composite: impl Fn(&[Tensor]) -> Tensor,
        tolerance: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (y_fused, y_composite) = (fused(&tensors), composite(&tensors));
        assert!(max_difference(&y_fused, &y_composite) < tolerance);
        let weights = random(y_fused.dims(), 99);
        let grads_fused = (&y_fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads_composite = (&y_composite * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (
                grads_fused.get(v.as_tensor()),
                grads_composite.get(v.as_tensor()),
            );
            let (a, b) = (
                a.unwrap_or_else(|| panic!("input {i}: no gradient")),
                b.unwrap(),
            );
            let scale = b
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max_difference(a, b) < tolerance * scale.max(1.0),
                "input {i}: {}",
                max_difference(a, b)
            );
        }
    }

    /// LayerNorm's weight and bias gradients sum over every row: in task
    /// order, they are the same bits whatever the thread count.
    #[test]
    fn layer_norm_gradients_do_not_depend_on_the_thread_count() {
        let x = Var::from_tensor(&random(&[40 * ROWS_PER_TASK, 32], 5)).unwrap();
        let (w, b) = (
            Var::from_tensor(&random(&[32], 6)).unwrap(),
            Var::from_tensor(&random(&[32], 7)).unwrap(),
        );
        let weights = random(&[40 * ROWS_PER_TASK, 32], 8);
        let gradients = |threads: usize| -> Vec<Vec<f32>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = layer_norm_op(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
                let grads = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [&w, &b]
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).unwrap().to_vec1().unwrap())
                    .collect()
            })
        };
        let one = gradients(1);
        for threads in [2, 3, 7] {
            assert_eq!(gradients(threads), one, "{threads} threads");
        }
    }

    #[test]
    fn fused_gelu_equals_candles() {
        assert_same_function(
            &[random(&[3, 70, 33], 1)],
            |t| gelu_op(&t[0]).unwrap(),
            |t| t[0].gelu().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn fused_layer_norm_equals_the_composite() {
        let (x, w, b) = (random(&[2, 130, 48], 2), random(&[48], 3), random(&[48], 4));
        assert_same_function(
            &[x, w, b],
            |t| layer_norm_op(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| layer_norm_composite(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            1e-4,
        );
    }

    /// The fused rotation equals transformers' `x·cos + rotate_half(x)·sin`
    /// in values and gradients.
    #[test]
    fn fused_rope_equals_rotate_half() {
        let (b, heads, s, half) = (2, 3, 5, 4);
        let angles = random(&[b, s, half], 9);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let table = |t: &Tensor| Arc::new(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let (cos_table, sin_table) = (table(&cos), table(&sin));
        let full = |t: &Tensor| Tensor::cat(&[t, t], 2).unwrap().unsqueeze(1).unwrap();
        let (cos_full, sin_full) = (full(&cos), full(&sin));
        assert_same_function(
            &[random(&[b, heads, s, 2 * half], 10)],
            |t| rope_op(&t[0], &cos_table, &sin_table).unwrap(),
            |t| {
                let (x1, x2) = (
                    t[0].narrow(3, 0, half).unwrap(),
                    t[0].narrow(3, half, half).unwrap(),
                );
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
                (t[0].broadcast_mul(&cos_full).unwrap() + rotated.broadcast_mul(&sin_full).unwrap())
                    .unwrap()
            },
            1e-5,
        );
    }

    /// 130 rows: the backward's tasks of 64 rows end mid-batch.
    #[test]
    fn fused_rms_norm_equals_the_composite() {
        let (x, w) = (random(&[2, 130, 48], 5), random(&[48], 6));
        assert_same_function(
            &[x, w],
            |t| rms_norm_op(&t[0], &t[1], 1e-6).unwrap(),
            |t| rms_norm_composite(&t[0], &t[1], 1e-6).unwrap(),
            1e-4,
        );
    }

    #[test]
    fn fused_swiglu_equals_the_composite() {
        let (gate, up) = (random(&[3, 70, 90], 7), random(&[3, 70, 90], 8));
        assert_same_function(
            &[gate, up],
            |t| swiglu_op(&t[0], &t[1]).unwrap(),
            |t| swiglu_composite(&t[0], &t[1]).unwrap(),
            1e-4,
        );
    }

    #[test]
    fn fused_attention_softmax_equals_the_composite_with_padding_and_a_cache() {
        // Row 0 left-padded by 3 (its first 3 queries see no key), row 1
        // right-padded by 2, row 2 unpadded (its causal prefix is computed
        // without a test per key); 7 queries over 37 keys (30 cached): more
        // than two lane groups and a partial one.
        let keys = 37;
        let real: Vec<Vec<u32>> = vec![
            [vec![0; 3], vec![1; keys - 3]].concat(),
            [vec![1; keys - 2], vec![0; 2]].concat(),
            vec![1; keys],
        ];
        for queries in [keys, 7] {
            let bias = Arc::new(AttentionBias::alibi(&real, queries, 3));
            let scores = random(&[3, 3, queries, keys], 5);
            assert_same_function(
                &[scores],
                |t| attention_softmax_op(&t[0], 0.25, &bias).unwrap(),
                |t| attention_probs_composite(&t[0], 0.25, &bias, None).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn fast_gelu_matches_the_tanh_formula() {
        let exact = |x: f64| {
            0.5 * x * (1.0 + (0.797_884_560_802_865_4 * x * (1.0 + 0.044_715 * x * x)).tanh())
        };
        let mut worst = (0f64, 0f64);
        for i in -20_000..=20_000 {
            let x = i as f64 * 1e-3;
            let error = (gelu(x as f32) as f64 - exact(x)).abs() / exact(x).abs().max(1e-3);
            let h = 1e-4;
            let slope = (exact(x + h) - exact(x - h)) / (2.0 * h);
            let slope_error = (gelu_derivative(x as f32) as f64 - slope).abs();
            worst = (worst.0.max(error), worst.1.max(slope_error));
        }
        // A few f32 ulps: the tanh form through libm is no closer to the f64 truth.
        assert!(worst.0 < 2e-6 && worst.1 < 1e-5, "{worst:?}");
    }

    #[test]
    fn a_one_sided_nan_or_another_shape_is_no_match() {
        let a = Tensor::new(&[1f32, 2.0, f32::NAN], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.5, 3.0], &Device::Cpu).unwrap();
        assert_eq!(max_abs_difference(&a, &b).unwrap(), f32::INFINITY);
        assert_eq!(max_abs_difference(&a, &a).unwrap(), 0.0);
        assert_eq!(max_abs_difference(&b, &(&b * 2.0).unwrap()).unwrap(), 3.0);
        let error = max_abs_difference(&a, &b.reshape((3, 1)).unwrap()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("differ in shape: [3] and [3, 1]"),
            "{error}"
        );
    }

    #[test]
    fn column_sums_are_candles_over_several_tasks() {
        let x = random(&[3 * ROWS_PER_TASK + 5, 7], 12);
        let sums = column_sums(&x).unwrap();
        assert_eq!(sums.dims(), [7]);
        assert!(max_difference(&sums, &x.sum(0).unwrap()) < 1e-4);
    }

    #[test]
    fn lane_reductions_are_the_plain_ones() {
        // Lengths around the lane count: empty, tail only, whole chunks, both.
        for n in [0, 1, 15, 16, 17, 48, 50] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 31) as f32 - 15.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 17) as f32 * 0.5).collect();
            let plain: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            assert_eq!(sum_of_pairs(&a, &b, |a, b| a * b), plain, "n = {n}");
            for value in a.iter().copied().chain([1e9]) {
                let plain = a.iter().position(|&x| x == value).unwrap_or(0);
                assert_eq!(first_position(&a, value), plain, "n = {n}, {value}");
            }
        }
    }

    #[test]
    fn fast_exp_is_exp_over_the_whole_clamped_range() {
        let relative_error = |x: f32| {
            let exact = (x as f64).exp();
            (fast_exp(x) as f64 - exact).abs() / exact
        };
        // Every exponent n from −126 to 127, both ends of each rounding
        // interval and the points between.
        let worst = (-8_700_000..=8_800_000)
            .step_by(7)
            .map(|i| relative_error(i as f32 * 1e-5))
            .fold(0f64, f64::max);
        assert!(worst < 3e-7, "{worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(relative_error(-87.0) < 3e-7 && relative_error(88.0) < 3e-7);
        // Beyond the clamps: e⁻⁸⁷ and e⁸⁸, never 0, ∞ or a wrapped exponent.
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.0));
        assert_eq!(fast_exp(1000.0), fast_exp(88.0));
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
