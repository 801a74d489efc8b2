//! The training core's model side: BLOOM in candle, computing what HF
//! transformers computes (see `tests/fixtures/bloom-tiny`). Written with
//! differentiable primitives only: candle's fused LayerNorm and softmax have no
//! backward and would silently stop gradients. On the CPU the hot ops are
//! fused kernels with hand-written backward passes (`fused`), checked against
//! the composite ops that CUDA runs.

pub mod bloom;
mod checkpoint;
pub mod fused;
pub mod generate;
pub mod init;
pub mod ops;

pub use bloom::{AdapterConfig, Bloom, Config, DropoutDraw, KvCache, LORA_TARGETS, Lora};
