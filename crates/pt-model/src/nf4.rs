//! bitsandbytes' 4-bit NormalFloat weights (NF4, QLoRA's base): each block of
//! 64 values stored as 4-bit indices into the NF4 code book and the block's
//! absolute maximum; with double quantisation the maxima themselves are
//! stored as 8-bit indices into bitsandbytes' dynamic map, per block of 256,
//! after subtracting their mean. Quantising here gives the bytes
//! bitsandbytes' CPU path gives (`quantize_4bit`, `quantize_blockwise`);
//! dequantising gives its values, rounded to the compute dtype as its
//! `matmul_4bit` rounds them.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::strips;

/// Values per NF4 block (bitsandbytes' `blocksize` for 4-bit weights).
pub const BLOCK: usize = 64;

/// NF4 blocks per parallel task of dequantisation.
const DEQUANTIZE_TASK_BLOCKS: usize = 256;

/// Block maxima per block of the double quantisation (bitsandbytes' nested blocksize).
pub const NESTED_BLOCK: usize = 256;

/// The NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact
/// zero (QLoRA, appendix E; the values bitsandbytes stores in f32).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The two code values of each byte (high nibble first), so that
/// dequantising looks up one pair per byte.
fn code_pairs() -> &'static [[f32; 2]; 256] {
    static PAIRS: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
    PAIRS.get_or_init(|| std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 0xF]]))
}

/// How the base model's linear weights are quantised (bitsandbytes'
/// `BitsAndBytesConfig` for 4-bit NF4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Config {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: the dtype a weight is dequantised to and
    /// multiplied in.
    pub compute_dtype: DType,
}

/// A weight's block maxima, plain or double-quantised.
#[derive(Clone, Debug)]
pub enum BlockScales {
    Plain(Vec<f32>),
    Nested {
        /// One 8-bit index into [`dynamic_map`] per NF4 block.
        codes: Vec<u8>,
        /// One maximum per [`NESTED_BLOCK`] indices.
        absmax: Vec<f32>,
        /// The mean of the maxima, subtracted before quantising them.
        offset: f32,
    },
}

/// A `[out, in]` weight in NF4.
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    pub shape: (usize, usize),
    /// Two indices per byte, the first in the high nibble (bitsandbytes' packing).
    pub codes: Vec<u8>,
    pub scales: BlockScales,
    pub compute_dtype: DType,
    /// The codes and maxima on the device the weight is used on, when that
    /// is not the CPU.
    resident: OnceLock<Resident>,
}

/// A weight's codes and block maxima on a device.
#[derive(Clone, Debug)]
struct Resident {
    /// `[blocks · BLOCK / 2]` u8.
    codes: Tensor,
    /// `[blocks, 1]` f32.
    maxima: Tensor,
}

impl Nf4Weight {
    pub fn new(
        shape: (usize, usize),
        codes: Vec<u8>,
        scales: BlockScales,
        compute_dtype: DType,
    ) -> Self {
        Self {
            shape,
            codes,
            scales,
            compute_dtype,
            resident: OnceLock::new(),
        }
    }

    /// Quantises `weight` `[out, in]` (any float dtype) as bitsandbytes does.
    pub fn quantize(weight: &Tensor, config: Nf4Config) -> Result<Self> {
        let shape = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (codes, absmax) = quantize_nf4(&values);
        let scales = match config.double_quant {
            false => BlockScales::Plain(absmax),
            true => {
                let offset = mean(&absmax);
                let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
                let (codes, absmax) = quantize_blockwise(&centred, dynamic_map(), NESTED_BLOCK);
                BlockScales::Nested {
                    codes,
                    absmax,
                    offset,
                }
            }
        };
        Ok(Self::new(shape, codes, scales, config.compute_dtype))
    }

    /// Each NF4 block's maximum as bitsandbytes dequantises it.
    fn block_maxima(&self) -> Cow<'_, [f32]> {
        match &self.scales {
            BlockScales::Plain(absmax) => Cow::Borrowed(absmax),
            BlockScales::Nested {
                codes,
                absmax,
                offset,
            } => Cow::Owned(nested_maxima(codes, absmax, *offset, dynamic_map())),
        }
    }

    /// The weight's values in f32 (bitsandbytes' `dequantize_4bit`).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let maxima = self.block_maxima();
        let mut values = vec![0f32; self.shape.0 * self.shape.1];
        let task = BLOCK * DEQUANTIZE_TASK_BLOCKS;
        values
            .par_chunks_mut(task)
            .enumerate()
            .for_each(|(i, out)| self.dequantize_span(&maxima, i * task, out));
        values
    }

    /// The weight as a tensor in `dtype` on `device`.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let values = match device {
            Device::Cpu => Tensor::from_vec(self.dequantize_f32(), self.shape, device)?,
            _ => self.dequantize_with_tensor_ops(device)?,
        };
        values.to_dtype(dtype)
    }

    /// The values computed on `device` by candle's tensor ops from the codes
    /// and block maxima, copied there on first use: on a GPU the weight
    /// stays 4-bit, and no dense copy crosses from the host per use.
    fn dequantize_with_tensor_ops(&self, device: &Device) -> Result<Tensor> {
        let resident = match self.resident.get() {
            Some(resident) if resident.codes.device().same_device(device) => resident.clone(),
            _ => {
                let resident = self.upload(device)?;
                // Kept for the device the model lives on (the first one asked).
                let _ = self.resident.set(resident.clone());
                resident
            }
        };
        let bytes = resident.codes.to_dtype(DType::F32)?;
        let high = (&bytes / 16.0)?.floor()?;
        let low = (&bytes - (&high * 16.0)?)?;
        let indices = Tensor::stack(&[high, low], 1)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        let values = Tensor::new(&NF4_CODE, device)?
            .index_select(&indices, 0)?
            .reshape(((), BLOCK))?
            .broadcast_mul(&resident.maxima)?;
        let (out, inner) = self.shape;
        values
            .flatten_all()?
            .narrow(0, 0, out * inner)?
            .reshape(self.shape)
    }

    /// The codes, padded to whole blocks, and each block's maximum on `device`.
    fn upload(&self, device: &Device) -> Result<Resident> {
        let maxima = self.block_maxima();
        let mut codes = self.codes.clone();
        codes.resize(maxima.len() * BLOCK / 2, 0);
        Ok(Resident {
            codes: Tensor::from_vec(codes, maxima.len() * BLOCK / 2, device)?,
            maxima: Tensor::from_slice(&maxima, (maxima.len(), 1), device)?,
        })
    }

    /// `x Wᵀ` in the compute dtype (`x`: `[.., in]`, in the compute dtype),
    /// as bitsandbytes' `matmul_4bit` computes it: the dequantised weight
    /// rounded to the compute dtype, products summed in f32. On the CPU
    /// without the dense weight (see [`crate::strips`]).
    pub fn matmul_transposed(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            let dense = self.dequantize(self.compute_dtype, x.device())?;
            return x.broadcast_matmul(&dense.t()?);
        }
        let maxima = self.block_maxima();
        let fill = |start: usize, out: &mut [f32]| self.dequantize_span(&maxima, start, out);
        let round = |panel: &mut [f32]| round_to(self.compute_dtype, panel);
        strips::times_transposed(x, self.shape, fill, round)?.to_dtype(self.compute_dtype)
    }

    /// `g W` in the compute dtype (`g`: `[.., out]`, in the compute dtype):
    /// the input's gradient of [`Nf4Weight::matmul_transposed`].
    pub fn matmul(&self, g: &Tensor) -> Result<Tensor> {
        if !g.device().is_cpu() {
            return g.broadcast_matmul(&self.dequantize(self.compute_dtype, g.device())?);
        }
        let maxima = self.block_maxima();
        let fill = |start: usize, out: &mut [f32]| self.dequantize_span(&maxima, start, out);
        let round = |panel: &mut [f32]| round_to(self.compute_dtype, panel);
        strips::times(g, self.shape, fill, round)?.to_dtype(self.compute_dtype)
    }

    /// The values from flat index `start` on into `out`: in each block its
    /// code times its maximum, two codes per byte, the first in the high
    /// nibble. Blocks run along the flattened weight, so a span may start or
    /// end inside a block or a byte.
    fn dequantize_span(&self, maxima: &[f32], start: usize, out: &mut [f32]) {
        let (mut at, mut rest) = (start, out);
        while !rest.is_empty() {
            let scale = maxima[at / BLOCK];
            let length = (BLOCK - at % BLOCK).min(rest.len());
            let (piece, tail) = rest.split_at_mut(length);
            let mut piece = piece;
            if at % 2 == 1 {
                piece[0] = NF4_CODE[(self.codes[at / 2] & 0xF) as usize] * scale;
                piece = &mut piece[1..];
            }
            let bytes = &self.codes[at.div_ceil(2)..];
            let whole_bytes = piece.len() / 2;
            let mut pairs = piece.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                let [first, second] = code_pairs()[byte as usize];
                pair[0] = first * scale;
                pair[1] = second * scale;
            }
            if let [last] = pairs.into_remainder() {
                *last = NF4_CODE[(bytes[whole_bytes] >> 4) as usize] * scale;
            }
            (at, rest) = (at + length, tail);
        }
    }

    /// Bytes held: the packed indices and the block scales.
    pub fn size_in_bytes(&self) -> usize {
        let scales = match &self.scales {
            BlockScales::Plain(absmax) => 4 * absmax.len(),
            BlockScales::Nested { codes, absmax, .. } => codes.len() + 4 * absmax.len() + 4,
        };
        self.codes.len() + scales
    }
}

/// Double-quantised block maxima decoded: each 8-bit code's value in `map`
/// times its nested block's maximum, plus the offset.
pub fn nested_maxima(codes: &[u8], absmax: &[f32], offset: f32, map: &[f32]) -> Vec<f32> {
    let maxima = codes
        .iter()
        .enumerate()
        .map(|(i, &q)| map[q as usize] * absmax[i / NESTED_BLOCK] + offset);
    maxima.collect()
}

/// bitsandbytes' `quantize_4bit` for NF4 (its CPU path): per block of
/// [`BLOCK`] values the absolute maximum, and each value times the
/// maximum's reciprocal (a trailing partial block: divided by it) mapped to
/// the nearest code, ties to the lower one (`torch.bucketize` over the
/// midpoints). An all-zero block's maximum stays 0; a partial block's is at
/// least 1e-38, as bitsandbytes stores them.
pub fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let midpoints: Vec<f32> = NF4_CODE.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let nearest = |scaled: f32| midpoints.iter().filter(|&&m| m < scaled).count() as u8;
    let blocks: Vec<(Vec<u8>, f32)> = values
        .par_chunks(BLOCK)
        .map(|block| {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if block.len() == BLOCK {
                let inverse = 1.0 / max.max(1e-38);
                let indices = block
                    .iter()
                    .map(|v| nearest((v * inverse).clamp(-1.0, 1.0)));
                (indices.collect(), max)
            } else {
                let max = max.max(1e-38);
                let indices = block.iter().map(|v| nearest((v / max).clamp(-1.0, 1.0)));
                (indices.collect(), max)
            }
        })
        .collect();
    let absmax = blocks.iter().map(|(_, max)| *max).collect();
    let mut indices: Vec<u8> = blocks.into_iter().flat_map(|(i, _)| i).collect();
    if indices.len() % 2 == 1 {
        // bitsandbytes pads with a scaled 0, whose code is NF4's zero.
        indices.push(nearest(0.0));
    }
    let packed = indices.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// bitsandbytes' CPU `quantize_blockwise` with a 256-entry code book
/// (`cquantize_blockwise_cpu_fp32`): per block the absolute maximum, and
/// each value times its reciprocal looked up in a 65536-bin table of the
/// nearest code (bitsandbytes' table, so values near a midpoint round as
/// its do). An all-zero block gets index 0.
pub fn quantize_blockwise(
    values: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let table = nearest_code_table(code);
    let blocks: Vec<(Vec<u8>, f32)> = values
        .par_chunks(blocksize)
        .map(|block| {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max == 0.0 {
                return (vec![0; block.len()], max);
            }
            let inverse = 1.0 / max;
            let indices = block
                .iter()
                .map(|v| table[table_bin(v * inverse)])
                .collect();
            (indices, max)
        })
        .collect();
    let absmax = blocks.iter().map(|(_, max)| *max).collect();
    (blocks.into_iter().flat_map(|(i, _)| i).collect(), absmax)
}

/// `values` rounded to `dtype` and back, as candle's casts round.
fn round_to(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => values
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        DType::F16 => values
            .iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// Bins of the nearest-code table over [-1, 1].
const TABLE_BINS: usize = 65536;

/// The bin of a scaled value: `(v + 1) / 2 · 65535`, rounded half up.
fn table_bin(value: f32) -> usize {
    let value = value.clamp(-1.0, 1.0);
    ((value + 1.0) * 0.5 * (TABLE_BINS - 1) as f32 + 0.5) as usize
}

/// For each bin's centre, the index of the first code whose upper midpoint
/// is not below it (`code` sorted).
fn nearest_code_table(code: &[f32; 256]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut index = 0;
    (0..TABLE_BINS)
        .map(|bin| {
            let centre = -1.0 + (2.0 * bin as f32) / (TABLE_BINS - 1) as f32;
            while index < midpoints.len() && midpoints[index] < centre {
                index += 1;
            }
            index as u8
        })
        .collect()
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`):
/// for exponents 10⁻⁶ … 10⁰, the midpoints of `2^i + 1` points spread
/// evenly over [0.1, 1] (PyTorch's f32 `linspace`), scaled by the
/// exponent, with both signs; then 0 and 1, sorted.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut values = vec![0.0f32, 1.0];
        for i in 0..7 {
            let points = linspace(0.1, 1.0, (1 << i) + 1);
            let scale = 10f64.powi(i - 6) as f32;
            for pair in points.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                values.extend([scale * mean, -scale * mean]);
            }
        }
        values.sort_by(f32::total_cmp);
        values.try_into().expect("254 scaled midpoints, 0 and 1")
    })
}

/// PyTorch's f32 `linspace` on the CPU: from the start for the first half
/// of the points, back from the end for the rest, each a fused multiply-add
/// (its vectorised kernels are built with FMA, and the compiler fuses
/// `start + step * i`).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| match i < halfway {
            true => step.mul_add(i as f32, start),
            false => (-step).mul_add((steps - i - 1) as f32, end),
        })
        .collect()
}

/// The mean of the block maxima, the double quantisation's offset. f64
/// accumulation: PyTorch's own f32 `mean` sums in an order that depends on
/// the CPU's vector width and thread count, so no single order matches it
/// everywhere; this is within a rounding of any of them.
fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_book_round_trips_and_packs_high_nibble_first() {
        // One block holding every code exactly (scaled by its maximum 2.0).
        let mut values: Vec<f32> = NF4_CODE.iter().map(|c| c * 2.0).collect();
        values.resize(BLOCK, 0.0);
        let (packed, absmax) = quantize_nf4(&values);
        assert_eq!(absmax, vec![2.0]);
        assert_eq!(packed[0], 0x01);
        assert_eq!(packed[7], 0xEF);
        // The zero padding is code 7 (NF4's exact zero).
        assert_eq!(packed[8], 0x77);
        let weight = Nf4Weight::new((1, BLOCK), packed, BlockScales::Plain(absmax), DType::F32);
        assert_eq!(weight.dequantize_f32(), values);
    }

    #[test]
    fn a_midpoint_goes_to_the_lower_code_and_zero_blocks_stay_zero() {
        let mut values = vec![0f32; 2 * BLOCK];
        values[0] = 1.0;
        values[1] = (NF4_CODE[8] + NF4_CODE[9]) / 2.0;
        let (packed, absmax) = quantize_nf4(&values);
        assert_eq!(packed[0], 0xF8);
        assert_eq!(absmax, vec![1.0, 0.0]);
    }

    #[test]
    fn the_dynamic_map_is_sorted_signed_and_spans_minus_one_to_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map[255], 1.0);
        assert_eq!(map.iter().filter(|&&v| v == 0.0).count(), 1);
        assert_eq!(map.iter().filter(|&&v| v < 0.0).count(), 127);
        assert!((map[0] + 0.992_968_75).abs() < 1e-6, "{}", map[0]);
    }

    #[test]
    fn fused_products_are_the_dequantised_weights_products() {
        // Rows that split blocks and bytes (37 values each, 7·37 odd), and
        // a shape with several strips per thread.
        for (out, inner, n) in [(7, 37, 3), (300, 128, 5), (64, 700, 2)] {
            let values: Vec<f32> = (0..out * inner)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let weight = Tensor::from_vec(values, (out, inner), &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (n, inner), &Device::Cpu).unwrap();
            let g = Tensor::randn(0f32, 1.0, (n, out), &Device::Cpu).unwrap();
            for (compute_dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 8e-3)] {
                let config = Nf4Config {
                    double_quant: true,
                    compute_dtype,
                };
                let nf4 = Nf4Weight::quantize(&weight, config).unwrap();
                let dense = nf4.dequantize(compute_dtype, &Device::Cpu).unwrap();
                let (x, g) = (
                    x.to_dtype(compute_dtype).unwrap(),
                    g.to_dtype(compute_dtype).unwrap(),
                );
                let pairs = [
                    (
                        nf4.matmul_transposed(&x).unwrap(),
                        x.matmul(&dense.t().unwrap()).unwrap(),
                    ),
                    (nf4.matmul(&g).unwrap(), g.matmul(&dense).unwrap()),
                ];
                for (fused, composite) in pairs {
                    assert_eq!(fused.dtype(), compute_dtype);
                    assert_eq!(fused.dims(), composite.dims());
                    let as_f32 = |t: Tensor| {
                        t.to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    };
                    for (a, b) in as_f32(fused).iter().zip(as_f32(composite)) {
                        assert!(
                            (a - b).abs() <= tolerance * b.abs().max(1.0),
                            "{out}×{inner} {compute_dtype:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tensor_ops_dequantise_exactly_as_the_cpu_loop() {
        // A partial last block, an odd value count, and both kinds of maxima.
        let values: Vec<f32> = (0..7 * 37)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 9.0)
            .collect();
        let tensor = Tensor::from_vec(values, (7, 37), &Device::Cpu).unwrap();
        for double_quant in [false, true] {
            let config = Nf4Config {
                double_quant,
                compute_dtype: DType::F32,
            };
            let weight = Nf4Weight::quantize(&tensor, config).unwrap();
            let by_ops = weight.dequantize_with_tensor_ops(&Device::Cpu).unwrap();
            assert_eq!(by_ops.dims(), [7, 37]);
            let by_ops = by_ops.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(by_ops, weight.dequantize_f32());
        }
    }

    #[test]
    fn nf4_error_is_within_half_a_code_gap_of_each_blocks_maximum() {
        let values: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let tensor = Tensor::from_vec(values.clone(), (10, 100), &Device::Cpu).unwrap();
        for double_quant in [false, true] {
            let config = Nf4Config {
                double_quant,
                compute_dtype: DType::F32,
            };
            let weight = Nf4Weight::quantize(&tensor, config).unwrap();
            let widest_gap = NF4_CODE
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(0f32, f32::max);
            for (block, (ours, original)) in weight
                .dequantize_f32()
                .chunks(BLOCK)
                .zip(values.chunks(BLOCK))
                .enumerate()
            {
                let max = original.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The nested maximum itself is off by up to a dynamic-map step.
                let slack = if double_quant { 1.02 } else { 1.0 };
                for (a, b) in ours.iter().zip(original) {
                    assert!(
                        (a - b).abs() <= max * slack * widest_gap / 2.0 + 1e-6,
                        "block {block}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
