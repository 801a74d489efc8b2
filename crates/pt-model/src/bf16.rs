//! Frozen linear weights kept in bf16 on the CPU and multiplied in f32: half
//! the memory of f32 weights at the f32 speed. candle's CPU matmul widens a
//! bf16 operand whole on every call (a transient as large as the layer in
//! f32, the LM head's included), and computing in bf16 would round the
//! activations too. Here each product widens the weight a cache-sized panel
//! at a time (`strips`): the result is the f32 product of the bf16-rounded
//! weight, the same as if it were stored widened.

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;

use crate::strips;

/// A `[out, in]` weight in bf16, row-major, on the CPU.
#[derive(Clone, Debug)]
pub struct Bf16Weight {
    pub shape: (usize, usize),
    values: Vec<bf16>,
}

impl Bf16Weight {
    /// `weight` `[out, in]` (any float dtype) rounded to bf16, to nearest even.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let shape = weight.dims2()?;
        let values = weight.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
        Ok(Self { shape, values })
    }

    /// The weight as a tensor in `dtype` on `device`.
    pub fn to_dtype(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.values, self.shape, device)?.to_dtype(dtype)
    }

    /// `x Wᵀ` (`x`: `[.., in]`, on the CPU), in f32.
    pub fn matmul_transposed(&self, x: &Tensor) -> Result<Tensor> {
        strips::times_transposed(x, self.shape, |start, out| self.widen(start, out), |_| {})
    }

    /// `g W` (`g`: `[.., out]`, on the CPU), in f32: the input's gradient of
    /// [`Bf16Weight::matmul_transposed`].
    pub fn matmul(&self, g: &Tensor) -> Result<Tensor> {
        strips::times(g, self.shape, |start, out| self.widen(start, out), |_| {})
    }

    /// The values from flat index `start` on into `out`, in f32: bf16 is
    /// f32's top half, so this is a shift the compiler vectorises.
    fn widen(&self, start: usize, out: &mut [f32]) {
        let values = &self.values[start..start + out.len()];
        for (out, value) in out.iter_mut().zip(values) {
            *out = value.to_f32();
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        2 * self.values.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_the_f32_products_of_the_rounded_weight() {
        let cpu = &Device::Cpu;
        // Shapes that leave partial strips; values with bits below bf16's 8.
        for (out, inner, rows) in [(5, 3, 2), (300, 129, 7), (70, 1000, 1), (1, 64, 40)] {
            let weight = Tensor::randn(0f32, 1.0, (out, inner), cpu).unwrap();
            let stored = Bf16Weight::new(&weight).unwrap();
            let rounded = weight.to_dtype(DType::BF16).unwrap();
            let widened = rounded.to_dtype(DType::F32).unwrap();
            assert_eq!(
                stored
                    .to_dtype(DType::F32, cpu)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                widened.to_vec2::<f32>().unwrap(),
                "round to nearest even, as candle and PyTorch round"
            );
            assert_ne!(
                widened.to_vec2::<f32>().unwrap(),
                weight.to_vec2::<f32>().unwrap()
            );
            let x = Tensor::randn(0f32, 1.0, (rows, inner), cpu).unwrap();
            let g = Tensor::randn(0f32, 1.0, (rows, out), cpu).unwrap();
            let pairs = [
                (
                    stored.matmul_transposed(&x).unwrap(),
                    x.matmul(&widened.t().unwrap()).unwrap(),
                ),
                (stored.matmul(&g).unwrap(), g.matmul(&widened).unwrap()),
            ];
            for (ours, expected) in pairs {
                assert_eq!(ours.dims(), expected.dims());
                let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in ours.iter().zip(&expected) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }
}
