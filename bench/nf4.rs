//! `cargo bench -p pt-model --bench nf4`: the fused NF4 products against
//! dequantising the whole weight and then multiplying (what CUDA still
//! does), and against the dense f32 weight, at Qwen2.5-0.5B's and
//! bloomz-560m's layer shapes, for one token (generation) to a 512-token
//! block (training, eval). Rounds alternate the three so that a noisy
//! machine slows all of them alike; it prints medians and their ratios.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pt_model::nf4::{Nf4Config, Nf4Weight};

const ROUNDS: usize = 9;

/// Median seconds of `f`, measured in turns with the other candidates.
fn medians(candidates: &mut [&mut dyn FnMut() -> Tensor]) -> Vec<f64> {
    let mut times = vec![Vec::new(); candidates.len()];
    candidates.iter_mut().for_each(|f| drop(f()));
    for _ in 0..ROUNDS {
        for (f, times) in candidates.iter_mut().zip(&mut times) {
            let started = Instant::now();
            drop(f());
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[ROUNDS / 2]
        })
        .collect()
}

fn main() {
    let device = Device::Cpu;
    let config = Nf4Config {
        double_quant: true,
        compute_dtype: DType::F32,
    };
    println!(
        "{:<26} {:>6} {:>10} {:>12} {:>10} {:>14} {:>12}",
        "layer [out, in]",
        "tokens",
        "dense ms",
        "dequant ms",
        "fused ms",
        "dequant/fused",
        "dense/fused"
    );
    let layers = [
        ("qwen2.5-0.5b mlp up", 4864, 896),
        ("qwen2.5-0.5b mlp down", 896, 4864),
        ("bloomz-560m mlp up", 4096, 1024),
    ];
    for (name, out, inner) in layers {
        let weight = Tensor::randn(0f32, 0.02, (out, inner), &device).unwrap();
        let nf4 = Nf4Weight::quantize(&weight, config).unwrap();
        for tokens in [1, 16, 512] {
            let x = Tensor::randn(0f32, 1.0, (tokens, inner), &device).unwrap();
            let g = Tensor::randn(0f32, 1.0, (tokens, out), &device).unwrap();
            let dequantized = || nf4.dequantize(DType::F32, &device).unwrap();
            let forward = medians(&mut [
                &mut || x.matmul(&weight.t().unwrap()).unwrap(),
                &mut || x.matmul(&dequantized().t().unwrap()).unwrap(),
                &mut || nf4.matmul_transposed(&x).unwrap(),
            ]);
            let backward = medians(&mut [
                &mut || g.matmul(&weight).unwrap(),
                &mut || g.matmul(&dequantized()).unwrap(),
                &mut || nf4.matmul(&g).unwrap(),
            ]);
            for (pass, [dense, dequant, fused]) in
                [("x Wᵀ", forward), ("g W", backward)].map(|(pass, t)| (pass, [t[0], t[1], t[2]]))
            {
                println!(
                    "{:<26} {tokens:>6} {:>10.2} {:>12.2} {:>10.2} {:>14.2} {:>12.2}",
                    format!("{name} {pass}"),
                    dense * 1e3,
                    dequant * 1e3,
                    fused * 1e3,
                    dequant / fused,
                    dense / fused
                );
            }
        }
    }
}
