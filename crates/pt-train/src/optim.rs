//! AdamW as PyTorch implements it (decoupled weight decay, bias-corrected
//! moments), with its state in f32 tensors that a checkpoint can save.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{
    CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Storage, Tensor, Var,
};
use pt_model::fused::{values, values_mut};
use rayon::prelude::*;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// HF `TrainingArguments` defaults (weight decay 0).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// A trained variable and how AdamW updates it (PyTorch's parameter groups).
#[derive(Clone)]
pub struct Parameter {
    pub var: Var,
    /// Whether weight decay applies (HF: everything but biases and norms).
    pub decay: bool,
    /// Its learning rate as a multiple of the schedule's: LoRA+ trains B
    /// matrices `loraplus_lr_ratio` times faster.
    pub lr_ratio: f64,
}

impl Parameter {
    /// At the schedule's learning rate.
    pub fn new(var: Var, decay: bool) -> Self {
        Self {
            var,
            decay,
            lr_ratio: 1.0,
        }
    }
}

/// The optimizer's view of named trained variables: weight decay as HF's
/// Trainer groups it ([`decays`]), and with LoRA+ LLaMA-Factory's groups:
/// every `lora_B` and every 1-D adapter weight (DoRA's magnitudes) at
/// `loraplus_lr_ratio` times the learning rate.
pub fn parameters(named: &[(String, Var)], loraplus_lr_ratio: Option<f64>) -> Vec<Parameter> {
    named
        .iter()
        .map(|(name, var)| {
            let fast = name.contains(".lora_B.") || var.rank() == 1;
            Parameter {
                lr_ratio: match loraplus_lr_ratio {
                    Some(ratio) if fast => ratio,
                    _ => 1.0,
                },
                ..Parameter::new(var.clone(), decays(name))
            }
        })
        .collect()
}

struct Slot {
    param: Var,
    decay: bool,
    lr_ratio: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    slots: Vec<Slot>,
}

impl AdamW {
    pub fn new(params: Vec<Parameter>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(
                |Parameter {
                     var,
                     decay,
                     lr_ratio,
                 }| {
                    // Two tensors: the CPU update writes each in place.
                    let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                    Ok(Slot {
                        exp_avg: zeros()?,
                        exp_avg_sq: zeros()?,
                        param: var,
                        decay,
                        lr_ratio,
                    })
                },
            )
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            step: 0,
            slots,
        })
    }

    /// Writes the moments and step count (safetensors, f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            for (kind, t) in [("exp_avg", &slot.exp_avg), ("exp_avg_sq", &slot.exp_avg_sq)] {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                tensors.push((
                    format!("{i}.{kind}"),
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.dims().to_vec(),
                ));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, bytes, shape)| {
                Ok((
                    name.as_str(),
                    TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("config".to_string(), serde_json::to_string(&self.config)?),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// Restores what [`AdamW::save`] wrote; the parameter shapes must match.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: corrupt optimizer state", path.display()))?;
        let step = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok());
        let step =
            step.with_context(|| format!("{}: optimizer state has no step", path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            for (kind, target) in [
                ("exp_avg", &mut slot.exp_avg),
                ("exp_avg_sq", &mut slot.exp_avg_sq),
            ] {
                let t = tensors
                    .get(&format!("{i}.{kind}"))
                    .with_context(|| format!("{}: no `{i}.{kind}`", path.display()))?;
                if t.dims() != target.dims() {
                    bail!(
                        "{}: `{i}.{kind}` has shape {:?}, the model needs {:?}",
                        path.display(),
                        t.dims(),
                        target.dims()
                    );
                }
                *target = t.to_device(target.device())?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr` from `grads` times `grad_scale`
    /// (gradient clipping, [`clip_scale`]); `grads[i]` belongs to parameter `i`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            // PyTorch decays by the group's learning rate too.
            let lr = lr * slot.lr_ratio;
            if update_on_cpu(slot, grad, grad_scale, lr, &c, bias1, bias2)? {
                continue;
            }
            let grad = (grad.to_dtype(DType::F32)? * grad_scale)?;
            let mut param = slot.param.as_tensor().to_dtype(DType::F32)?;
            if slot.decay && c.weight_decay != 0.0 {
                param = (param * (1.0 - lr * c.weight_decay))?;
            }
            slot.exp_avg = ((&slot.exp_avg * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denominator = ((slot.exp_avg_sq.sqrt()? / bias2.sqrt())? + c.eps)?;
            let update = ((&slot.exp_avg / denominator)? * (lr / bias1))?;
            slot.param
                .set(&(param - update)?.to_dtype(slot.param.dtype())?)?;
        }
        Ok(())
    }
}

/// Elements per parallel task of the CPU update.
const UPDATE_TASK: usize = 1 << 14;

/// [`AdamW::apply`]'s update of one f32 CPU parameter, in place: the moments,
/// then the parameter, each one parallel pass (the tensor ops make and read
/// a dozen full-size temporaries, and new moment tensors alone meant 3 GB in
/// flight at bloomz-560m's embedding). Returns false, changing nothing, where
/// it does not apply (CUDA, bf16, a strided tensor).
fn update_on_cpu(
    slot: &mut Slot,
    grad: &Tensor,
    grad_scale: f64,
    lr: f64,
    c: &AdamWConfig,
    bias1: f64,
    bias2: f64,
) -> Result<bool> {
    let param = slot.param.as_tensor();
    let contiguous_f32 =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if ![grad, param, &slot.exp_avg, &slot.exp_avg_sq]
        .into_iter()
        .all(contiguous_f32)
    {
        return Ok(false);
    }
    let scale = grad_scale as f32;
    slot.exp_avg.inplace_op2(
        grad,
        &MomentUpdate {
            beta: c.beta1 as f32,
            scale,
            squared: false,
        },
    )?;
    slot.exp_avg_sq.inplace_op2(
        grad,
        &MomentUpdate {
            beta: c.beta2 as f32,
            scale,
            squared: true,
        },
    )?;
    let decay = if slot.decay {
        1.0 - lr * c.weight_decay
    } else {
        1.0
    };
    param.inplace_op3(
        &slot.exp_avg,
        &slot.exp_avg_sq,
        &ParameterUpdate {
            decay: decay as f32,
            step_size: (lr / bias1) as f32,
            bias2_sqrt: bias2.sqrt() as f32,
            eps: c.eps as f32,
        },
    )?;
    Ok(true)
}

/// A moment from the gradient times `scale`: `m = βm + (1−β)g`, or with
/// `squared`, `v = βv + (1−β)g²`.
struct MomentUpdate {
    beta: f32,
    scale: f32,
    squared: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        moment_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let moment = values_mut(moment, moment_layout)?;
        let grad = values(grad, grad_layout)?;
        let (beta, scale, squared) = (self.beta, self.scale, self.squared);
        moment
            .par_chunks_mut(UPDATE_TASK)
            .zip(grad.par_chunks(UPDATE_TASK))
            .for_each(|(moment, grad)| {
                for (m, g) in moment.iter_mut().zip(grad) {
                    let g = g * scale;
                    let term = if squared {
                        (1.0 - beta) * g * g
                    } else {
                        (1.0 - beta) * g
                    };
                    *m = beta * *m + term;
                }
            });
        Ok(())
    }
}

/// `p = p·decay − step_size · m / (√v / √bias2 + eps)`, PyTorch's AdamW step
/// from the updated moments.
struct ParameterUpdate {
    decay: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
}

impl InplaceOp3 for ParameterUpdate {
    fn name(&self) -> &'static str {
        "adamw-parameter"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        exp_avg: &CpuStorage,
        exp_avg_layout: &Layout,
        exp_avg_sq: &CpuStorage,
        exp_avg_sq_layout: &Layout,
    ) -> candle_core::Result<()> {
        let param = values_mut(param, param_layout)?;
        let m = values(exp_avg, exp_avg_layout)?;
        let v = values(exp_avg_sq, exp_avg_sq_layout)?;
        param
            .par_chunks_mut(UPDATE_TASK)
            .zip(m.par_chunks(UPDATE_TASK))
            .zip(v.par_chunks(UPDATE_TASK))
            .for_each(|((param, m), v)| {
                for ((p, m), v) in param.iter_mut().zip(m).zip(v) {
                    let denominator = v.sqrt() / self.bias2_sqrt + self.eps;
                    *p = *p * self.decay - self.step_size * (m / denominator);
                }
            });
        Ok(())
    }
}

/// A contiguous f32 CPU tensor's values.
fn cpu_values<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => values(cpu, layout).ok(),
        _ => None,
    }
}

/// The global L2 norm of `grads` (accumulated in f64).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut squares = 0f64;
    for g in grads {
        let (storage, layout) = g.storage_and_layout();
        squares += match cpu_values(&storage, layout) {
            // Partial sums added in order: rayon's `sum` follows work stealing.
            Some(values) => values
                .par_chunks(UPDATE_TASK)
                .map(|chunk| {
                    chunk
                        .iter()
                        .map(|&v| f64::from(v) * f64::from(v))
                        .sum::<f64>()
                })
                .collect::<Vec<f64>>()
                .iter()
                .sum(),
            None => {
                drop(storage);
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64
            }
        };
    }
    Ok(squares.sqrt())
}

/// What PyTorch's `clip_grad_norm_` scales gradients by: `max_norm / (norm
/// + 1e-6)` when that is below 1 (and `max_norm` > 0), else 1. Pass it to
/// [`AdamW::apply`], which scales as it reads.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    let coefficient = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coefficient < 1.0 {
        coefficient
    } else {
        1.0
    }
}

/// HF's weight-decay groups (`Trainer.get_decay_parameter_names`): every
/// weight decays but biases and norms — by name (`bias`, `layernorm`,
/// `rmsnorm`, a `norm` or `*_norm` module: Llama's `model.norm`, Qwen3's
/// `q_norm`) or, for BLOOM's `ln_f`, by its `nn.LayerNorm` type.
pub fn decays(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let norm_module = name
        .split('.')
        .any(|part| part == "norm" || part.ends_with("_norm"));
    !(name.contains("bias")
        || name.contains("layernorm")
        || name.contains("rmsnorm")
        || norm_module
        || name.contains("ln_f"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_adamw_step_moves_by_lr_against_the_gradient_sign() {
        // After one step, m̂ = g and v̂ = g², so the update is lr·g/(|g|+eps).
        let p = Var::new(&[1f32, -2.], &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![Parameter::new(p.clone(), true)], config).unwrap();
        let g = Tensor::new(&[0.5f32, -3.], &Device::Cpu).unwrap();
        opt.apply(&[g], 0.01, 1.0).unwrap();
        let v: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in v.iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let grads = [Tensor::new(&[3f32, 4.], &Device::Cpu).unwrap()];
        let norm = grad_norm(&grads).unwrap();
        assert_eq!(norm, 5.0);
        assert!((clip_scale(norm, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_scale(norm, 10.0), 1.0);
        assert_eq!(clip_scale(norm, 0.0), 1.0);
        // Scaled as the update reads them: the first step moves by lr
        // whatever the scale, so compare the moments through a second step.
        let p = Var::new(&[0f32, 0.], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![Parameter::new(p.clone(), false)],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.apply(&grads, 1.0, 0.5).unwrap();
        let m: Vec<f32> = opt.slots[0].exp_avg.to_vec1().unwrap();
        assert!(
            (m[0] - 0.15).abs() < 1e-7 && (m[1] - 0.2).abs() < 1e-7,
            "{m:?}"
        );
    }

    #[test]
    fn cpu_update_follows_pytorchs_formula_over_steps() {
        // PyTorch's AdamW, element by element in f64.
        let config = AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        let start = [0.3f32, -1.2, 2.0, 0.0, -0.7];
        let grads = [
            [0.5f32, -3.0, 0.01, 1.0, -0.2],
            [-0.4, 2.0, 0.02, 1.0, 0.3],
            [0.1, -0.5, -0.03, 1.0, 0.0],
        ];
        let lr = 0.01;
        let p = Var::new(&start, &Device::Cpu).unwrap();
        // f32 on the CPU takes the fused update; bf16 would take the tensor ops.
        let mut opt = AdamW::new(vec![Parameter::new(p.clone(), true)], config).unwrap();
        // Handles on the moments' storage: an update in place changes them.
        let (exp_avg, exp_avg_sq) = (
            opt.slots[0].exp_avg.clone(),
            opt.slots[0].exp_avg_sq.clone(),
        );
        let (mut param, mut m, mut v) = (start.map(f64::from), [0f64; 5], [0f64; 5]);
        for (step, g) in grads.iter().enumerate() {
            opt.apply(&[Tensor::new(g, &Device::Cpu).unwrap()], lr, 1.0)
                .unwrap();
            let t = step as i32 + 1;
            for i in 0..5 {
                let g = g[i] as f64;
                param[i] *= 1.0 - lr * config.weight_decay;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let denominator = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                param[i] -= lr / (1.0 - 0.9f64.powi(t)) * m[i] / denominator;
            }
        }
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for (a, b) in got.iter().zip(param) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?} vs {param:?}");
        }
        for (tensor, expected) in [(exp_avg, m), (exp_avg_sq, v)] {
            let got: Vec<f32> = tensor.to_vec1().unwrap();
            for (a, b) in got.iter().zip(expected) {
                // f32 moments: (1 − β2) alone rounds to 4.7e-5 relative.
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * b.abs(),
                    "{got:?} vs {expected:?}"
                );
            }
        }
    }
}
