//! The training core's model side: BLOOM in candle, computing what HF
//! transformers computes (see `tests/fixtures/bloom-tiny`). Written with
//! differentiable primitives only: candle's fused LayerNorm and softmax have no
//! backward and would silently stop gradients. On the CPU the hot ops are
//! fused kernels with hand-written backward passes (`fused`), checked against
//! the composite ops that CUDA runs.

//!
//! Files by job: `bloom` is the architecture (config, layers, forward, the
//! base tensors); `peft` is PEFT's LoRA adapter format (config, init, load,
//! save, merge); `hf_dir` is HF model-directory I/O; `ops` (norms,
//! activations, softmax), `linear` (frozen and trainable linear layers with
//! LoRA), `loss` (chunked cross-entropy) and `fused` (their CPU kernels) are
//! the differentiable building blocks, `custom_op` their shared plumbing;
//! `product` is the CPU's matrix products (batches in parallel, sums added
//! in place) and `attention` BLOOM's attention as one op;
//! `nf4` is QLoRA's 4-bit base weights and `bf16` frozen weights kept in
//! bf16 on the CPU, both multiplied strip by strip (`strips`) without
//! widening a whole layer;
//! `checkpoint` recomputes any block that implements its trait; `generate`
//! and `init` use a model.

// Two exceptions, in `strips` and `product`: gemm called on disjoint parts
// of one output.
#![deny(unsafe_code)]

mod attention;
pub mod bf16;
pub mod bloom;
mod checkpoint;
mod custom_op;
pub mod fused;
pub mod generate;
pub mod hf_dir;
pub mod init;
mod layers;
pub mod linear;
pub mod llama;
pub mod loss;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod peft;
mod product;
mod strips;
mod thread_groups;
pub mod vocabulary;

pub use hf_dir::BlockWeights;
pub use layers::{DropoutDraw, Lora};
pub use model::{KvCache, MODEL_TYPES, Model, ModelConfig, model_type};
pub use peft::AdapterConfig;
