//! A product `lhs · rhs` computed in column strips, each strip's slice of
//! `rhs` made on demand by the caller into a buffer of its own thread: the
//! fused dequantise-and-multiply of 4-bit weights (`nf4`) and the widening
//! of bf16 weights (`bf16`), where the whole dense `rhs` would be a transient
//! as large as the layer in f32, written to fresh pages and read back from
//! memory once per use. A strip's panel stays in the core's cache between
//! being made and being multiplied.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Values per panel before its width is rounded up to a step: 256 KiB of
/// f32, so that a panel (at most about twice that) stays in a 1–2 MiB L2
/// beside gemm's packed blocks of `lhs`.
const PANEL_VALUES: usize = 1 << 16;

/// Strip widths are multiples of this: of gemm's register tiles (16–48
/// wide), and of an NF4 block, so that a column strip of a weight whose rows
/// are whole blocks holds one block of each row.
const WIDTH_STEP: usize = 64;

/// Strips per thread at the least, so that uneven strips still balance.
const STRIPS_PER_THREAD: usize = 4;

/// How a panel lays out `rhs[k, j]` (depth `k`, strip column `j`): at
/// `k · depth_stride + j · column_stride`.
#[derive(Clone, Copy)]
struct PanelLayout {
    depth_stride: usize,
    column_stride: usize,
}

/// `dst = lhs · rhs` (`lhs`: `[rows, depth]`, `dst`: `[rows, columns]`, both
/// row-major f32). `panel(strip, buffer)` fills `buffer` with
/// `rhs[.., strip]` and says how it laid it out; strips run in parallel,
/// each multiplied on one thread right after its panel is made.
fn strip_product(
    lhs: &[f32],
    rows: usize,
    depth: usize,
    columns: usize,
    panel: impl Fn(Range<usize>, &mut Vec<f32>) -> PanelLayout + Sync,
) -> Vec<f32> {
    assert_eq!(lhs.len(), rows * depth, "lhs is [rows, depth]");
    let mut dst = vec![0f32; rows * columns];
    if dst.is_empty() || depth == 0 {
        return dst;
    }
    let width = strip_width(columns, depth, rayon::current_num_threads());
    let strips: Vec<Range<usize>> = (0..columns)
        .step_by(width)
        .map(|start| start..(start + width).min(columns))
        .collect();
    let dst_start = DstStart(dst.as_mut_ptr());
    strips
        .into_par_iter()
        .for_each_init(Vec::new, |buffer, strip| {
            let layout = panel(strip.clone(), buffer);
            let last = (depth - 1) * layout.depth_stride + (strip.len() - 1) * layout.column_stride;
            assert!(last < buffer.len(), "the panel holds rhs[.., strip]");
            let dst_strip = dst_start.offset(strip.start);
            // SAFETY: gemm reads `lhs` within `[rows, depth]` and the panel
            // within the extent just checked, and writes `dst[i, strip]` for
            // `i < rows`: inside `dst` (`strip.end <= columns`), and no other
            // task writes those elements, as the strips are disjoint. `dst`
            // outlives the parallel loop, which ends before it is returned.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    rows,
                    strip.len(),
                    depth,
                    dst_strip,
                    1,
                    columns as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    depth as isize,
                    buffer.as_ptr(),
                    layout.column_stride as isize,
                    layout.depth_stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        });
    dst
}

/// [`strip_product`] for a CPU tensor `lhs` `[.., depth]`, read in place as
/// f32 (a copy would be a transient per product): `[.., columns]` in f32.
fn tensor_strip_product(
    lhs: &Tensor,
    depth: usize,
    columns: usize,
    panel: impl Fn(Range<usize>, &mut Vec<f32>) -> PanelLayout + Sync,
) -> Result<Tensor> {
    let mut dims = lhs.dims().to_vec();
    let rows = lhs.elem_count() / depth.max(1);
    let product = crate::fused::with_values(&lhs.to_dtype(DType::F32)?, |values| {
        strip_product(values, rows, depth, columns, panel)
    })?;
    *dims.last_mut().expect("a matrix") = columns;
    Tensor::from_vec(product, dims, &Device::Cpu)
}

/// `x Wᵀ` for a row-major `[out, inner]` weight `W` held in some compact
/// form (`x`: `[.., inner]` on the CPU), in f32: `fill(start, values)`
/// writes `W`'s values from flat index `start` on, in f32; `round` then
/// adjusts each panel (a compute dtype's rounding).
pub(crate) fn times_transposed(
    x: &Tensor,
    (out, inner): (usize, usize),
    fill: impl Fn(usize, &mut [f32]) + Sync,
    round: impl Fn(&mut [f32]) + Sync,
) -> Result<Tensor> {
    tensor_strip_product(x, inner, out, |rows, panel| {
        // Rows of W, each `inner` values from `row · inner` on.
        panel.resize(rows.len() * inner, 0.0);
        fill(rows.start * inner, panel);
        round(panel);
        PanelLayout {
            depth_stride: 1,
            column_stride: inner,
        }
    })
}

/// `g W` for the weight of [`times_transposed`] (`g`: `[.., out]` on the
/// CPU), in f32: the input's gradient of `x Wᵀ`.
pub(crate) fn times(
    g: &Tensor,
    (out, inner): (usize, usize),
    fill: impl Fn(usize, &mut [f32]) + Sync,
    round: impl Fn(&mut [f32]) + Sync,
) -> Result<Tensor> {
    tensor_strip_product(g, out, inner, |columns, panel| {
        // Columns of W, a piece of each row.
        let width = columns.len();
        panel.resize(out * width, 0.0);
        for (row, piece) in panel.chunks_mut(width).enumerate() {
            fill(row * inner + columns.start, piece);
        }
        round(panel);
        PanelLayout {
            depth_stride: width,
            column_stride: 1,
        }
    })
}

/// The start of the destination, shared by the strips' tasks.
#[derive(Clone, Copy)]
struct DstStart(*mut f32);

impl DstStart {
    fn offset(self, count: usize) -> *mut f32 {
        self.0.wrapping_add(count)
    }
}

// SAFETY: the tasks holding it write disjoint strips (see `strip_product`).
#[allow(unsafe_code)]
unsafe impl Send for DstStart {}
#[allow(unsafe_code)]
unsafe impl Sync for DstStart {}

/// As wide as a cache-sized panel allows, but narrow enough to give every
/// thread several strips.
fn strip_width(columns: usize, depth: usize, threads: usize) -> usize {
    let by_cache = PANEL_VALUES / depth.max(1);
    let by_threads = columns.div_ceil(STRIPS_PER_THREAD * threads);
    let width = by_cache.min(by_threads).next_multiple_of(WIDTH_STEP);
    width.max(WIDTH_STEP).min(columns.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lhs · rhs` by the definition, in f64.
    fn reference(lhs: &[f32], rhs: &[f32], rows: usize, depth: usize, columns: usize) -> Vec<f32> {
        let mut dst = vec![0f32; rows * columns];
        for i in 0..rows {
            for j in 0..columns {
                let sum: f64 = (0..depth)
                    .map(|k| lhs[i * depth + k] as f64 * rhs[k * columns + j] as f64)
                    .sum();
                dst[i * columns + j] = sum as f32;
            }
        }
        dst
    }

    #[test]
    fn strips_of_either_panel_layout_give_the_whole_product() {
        // Columns not a multiple of the strip width, depth not of anything.
        for (rows, depth, columns) in [(3, 5, 7), (17, 129, 300), (1, 1000, 70), (40, 64, 1)] {
            let lhs: Vec<f32> = (0..rows * depth).map(|i| (i % 13) as f32 - 6.0).collect();
            let rhs: Vec<f32> = (0..depth * columns)
                .map(|i| ((i * 7) % 11) as f32 / 4.0 - 1.0)
                .collect();
            let expected = reference(&lhs, &rhs, rows, depth, columns);
            // The strip's columns copied row by row, or transposed.
            let row_major = strip_product(&lhs, rows, depth, columns, |strip, buffer| {
                buffer.clear();
                for k in 0..depth {
                    buffer.extend_from_slice(&rhs[k * columns..][strip.clone()]);
                }
                PanelLayout {
                    depth_stride: strip.len(),
                    column_stride: 1,
                }
            });
            let transposed = strip_product(&lhs, rows, depth, columns, |strip, buffer| {
                buffer.clear();
                for j in strip {
                    buffer.extend((0..depth).map(|k| rhs[k * columns + j]));
                }
                PanelLayout {
                    depth_stride: 1,
                    column_stride: depth,
                }
            });
            for result in [row_major, transposed] {
                for (a, b) in result.iter().zip(&expected) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn strips_are_cache_sized_and_several_per_thread() {
        // Qwen2.5-0.5B's MLP: 4864 × 896; 73 columns of depth 896 fill a panel.
        assert_eq!(strip_width(4864, 896, 2), 128);
        // Many threads: 896 columns in 64-wide strips, never wider than the matrix.
        assert_eq!(strip_width(896, 896, 16), 64);
        assert_eq!(strip_width(7, 5, 2), 7);
        // Deep panels: one step wide even where it overflows the target.
        assert_eq!(strip_width(896, 1 << 20, 2), 64);
    }
}
