//! What one core's vector units can multiply-add at best: f32 FMA, and bf16
//! dot products where the CPU has AVX512-BF16. Whether computing in bf16
//! could pay on a CPU depends on their ratio, which the flags do not tell:
//! an Intel Xeon (family 6, model 207) has AVX512-BF16 but runs `vdpbf16ps`
//! at half the GFLOP/s of its f32 FMAs.

// The timed loops are intrinsics behind run-time feature checks.
#![allow(unsafe_code)]

use serde::Serialize;

/// Per-core peaks in GFLOP/s (a multiply-add counts 2).
#[derive(Debug, Serialize)]
pub(super) struct Peaks {
    /// With the widest FMA the CPU has (512 or 256 bits).
    pub f32_fma: Option<f64>,
    /// `vdpbf16ps`: 32 bf16 products summed pairwise into 16 f32 lanes.
    pub bf16_dot: Option<f64>,
}

/// Independent accumulators per timed loop: more than the units' latency
/// times their throughput, so the loop measures throughput.
const CHAINS: usize = 12;

impl Peaks {
    /// Times each instruction kind on this thread, best of three runs of
    /// `iterations` (about 0.05 s each at 10⁶).
    pub(super) fn measure(iterations: usize) -> Self {
        let best = |run: &dyn Fn() -> (f64, f64)| {
            (0..3)
                .map(|_| {
                    let started = std::time::Instant::now();
                    let (flops, _) = run();
                    flops / started.elapsed().as_secs_f64() / 1e9
                })
                .fold(0.0, f64::max)
        };
        Self {
            f32_fma: fma_kernel().map(|kernel| best(&|| kernel(iterations))),
            bf16_dot: bf16_dot_kernel().map(|kernel| best(&|| kernel(iterations))),
        }
    }
}

/// A timed loop: given its iterations, the flops it did and what it summed.
type Kernel = fn(usize) -> (f64, f64);

#[cfg(target_arch = "x86_64")]
fn fma_kernel() -> Option<Kernel> {
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features the kernel is compiled for.
        Some(|n| unsafe { x86::fma_512(n) })
    } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        Some(|n| unsafe { x86::fma_256(n) })
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn bf16_dot_kernel() -> Option<Kernel> {
    let present =
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16");
    // SAFETY: the CPU has the features the kernel is compiled for.
    present.then_some((|n| unsafe { x86::bf16_dot(n) }) as Kernel)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_kernel() -> Option<Kernel> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_dot_kernel() -> Option<Kernel> {
    None
}

/// Each kernel adds `1 × 1` (per product) to every lane of [`CHAINS`]
/// accumulators `n` times, and returns the flops and the sum of all lanes,
/// which the tests check: the instructions really ran.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// [`CHAINS`] accumulators from `zero`, each through `n` steps of `step`.
    #[inline(always)]
    fn chains<V: Copy>(n: usize, zero: V, step: impl Fn(V) -> V) -> [V; CHAINS] {
        let mut sums = [zero; CHAINS];
        for _ in 0..n {
            for sum in &mut sums {
                *sum = step(*sum);
            }
        }
        sums
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn fma_512(n: usize) -> (f64, f64) {
        let one = black_box(_mm512_set1_ps(1.0));
        let sums = chains(n, _mm512_setzero_ps(), |sum| _mm512_fmadd_ps(one, one, sum));
        let total = sums
            .iter()
            .fold(_mm512_setzero_ps(), |a, &b| _mm512_add_ps(a, b));
        let flops = (n * CHAINS * 16 * 2) as f64;
        (flops, f64::from(_mm512_reduce_add_ps(total)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma_256(n: usize) -> (f64, f64) {
        let one = black_box(_mm256_set1_ps(1.0));
        let sums = chains(n, _mm256_setzero_ps(), |sum| _mm256_fmadd_ps(one, one, sum));
        let mut lanes = [0f32; 8];
        let total = sums
            .iter()
            .fold(_mm256_setzero_ps(), |a, &b| _mm256_add_ps(a, b));
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        let flops = (n * CHAINS * 8 * 2) as f64;
        (flops, lanes.iter().map(|&l| f64::from(l)).sum())
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn bf16_dot(n: usize) -> (f64, f64) {
        // Two bf16 ones (0x3f80) per 32-bit lane.
        let ones: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0));
        let one = black_box(ones);
        let sums = chains(n, _mm512_setzero_ps(), |sum| {
            _mm512_dpbf16_ps(sum, one, one)
        });
        let total = sums
            .iter()
            .fold(_mm512_setzero_ps(), |a, &b| _mm512_add_ps(a, b));
        let flops = (n * CHAINS * 32 * 2) as f64;
        (flops, f64::from(_mm512_reduce_add_ps(total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kernel_does_the_multiply_adds_it_counts() {
        // Sums stay exact in f32 below 2²⁴ per lane.
        let n = 1000;
        for kernel in [fma_kernel(), bf16_dot_kernel()].into_iter().flatten() {
            let (flops, sum) = kernel(n);
            // Every multiply-add added 1 × 1 to the total.
            assert_eq!(sum, flops / 2.0);
        }
        let peaks = Peaks::measure(1000);
        assert_eq!(peaks.f32_fma.is_some(), fma_kernel().is_some());
        assert!(
            peaks
                .f32_fma
                .is_none_or(|rate| rate.is_finite() && rate > 0.0)
        );
        assert_eq!(peaks.bf16_dot.is_some(), bf16_dot_kernel().is_some());
    }
}
