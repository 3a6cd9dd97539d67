//! A LLaMA-style decoder-only transformer on candle, whose logits equal Hugging Face
//! `transformers`' on the same weights, with a KV cache for decoding, the variants of
//! the original transformer as config options, and HF directory import/export.
//!
//! The architecture is Vaswani et al. 2017 ("Attention Is All You Need") as refined by
//! Llama (Touvron et al. 2023): pre-norm blocks (Xiong et al. 2020) with RMSNorm (Zhang
//! & Sennrich 2019), rotary position embeddings (Su et al. 2021), a SwiGLU feed-forward
//! network (Shazeer 2020) and grouped-query attention (Ainslie et al. 2023).
//!
//! Every layer has `load(vb, cfg)` and passes `vb.pp("q_proj")` to its children, so one
//! code path creates fresh parameters from a `VarMap` (training) or reads a checkpoint
//! (inference), and the parameter names are HF Llama's. Files, one per concern:
//! `config` (the architecture), `norm`, `rope` (all position encodings), `attention`
//! (with the KV cache), `mlp`, `block`, `transformer` (the model), `state` (the model as
//! a `LanguageModel`), `hf` (config.json + model.safetensors), `params` (parameter
//! inventory and memory estimate), `dropout` (seeded masks), `adapter` (projections
//! that carry LoRA branches; see `crate::lora`), `fused` (CPU kernels with their
//! backward passes), `backprop` (the plain Llama recipe's training step written out
//! over those kernels), `recompute` (activation checkpointing).
//!
//! Candle stays inside this module: everything that leaves it is host data or
//! `crate::Error`.

pub mod adapter;
mod attention;
pub(crate) mod backprop;
mod block;
pub mod config;
mod dropout;
mod fused;
pub mod hf;
mod mlp;
mod norm;
pub mod params;
mod recompute;
mod rope;
mod state;
mod transformer;

#[cfg(test)]
mod tests;

use candle_core::Tensor;
use candle_nn::{Init, Linear, VarBuilder};

pub use adapter::{LoraBranch, Projection};
pub use attention::KvCache;
pub use config::{Activation, ModelConfig, NormKind, NormPosition, PositionKind};
pub use dropout::DropoutRng;
pub(crate) use fused::cross_entropy as fused_cross_entropy;
pub(crate) use fused::{has_bf16_kernel, Products};
pub use params::{param_count, tensor_shapes, training_memory, TrainingMemory};
pub use recompute::ActivationCheckpointing;
pub use state::{slid_window, TransformerState};
pub use transformer::Transformer;

impl From<candle_core::Error> for crate::Error {
    fn from(error: candle_core::Error) -> Self {
        crate::Error::Tensor(error.to_string())
    }
}

/// A linear layer `weight` (out, in) and optional `bias` (out) under `vb`, initialised
/// like transformers' Llama: normal(0, initializer_range) weights, zero biases.
fn linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    cfg: &ModelConfig,
) -> candle_core::Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: cfg.initializer_range,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = match bias {
        true => Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?),
        false => None,
    };
    Ok(Linear::new(weight, bias))
}

/// A linear layer's tensors, named `{prefix}.weight` and `{prefix}.bias`.
fn linear_tensors(layer: &Linear, prefix: &str, out: &mut Vec<(String, Tensor)>) {
    out.push((format!("{prefix}.weight"), layer.weight().clone()));
    if let Some(bias) = layer.bias() {
        out.push((format!("{prefix}.bias"), bias.clone()));
    }
}
