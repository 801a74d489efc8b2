//! The training core's model side: BLOOM in candle, computing what HF
//! transformers computes (see `tests/fixtures/bloom-tiny`). Written with
//! differentiable primitives only: candle's fused LayerNorm and softmax have no
//! backward and would silently stop gradients. On the CPU the hot ops are
//! fused kernels with hand-written backward passes (`fused`), checked against
//! the composite ops that CUDA runs.

#![forbid(unsafe_code)]

//!
//! Files by job: `bloom` is the architecture (config, layers, forward, the
//! base tensors); `peft` is PEFT's LoRA adapter format (config, init, load,
//! save, merge); `hf_dir` is HF model-directory I/O; `ops` and `fused` are
//! the differentiable and fused kernels; `generate` and `init` use a model.

pub mod bloom;
mod checkpoint;
pub mod fused;
pub mod generate;
pub mod hf_dir;
pub mod init;
pub mod ops;
pub mod peft;

pub use bloom::{Bloom, Config, DropoutDraw, KvCache, Lora};
pub use peft::{AdapterConfig, LORA_TARGETS};
