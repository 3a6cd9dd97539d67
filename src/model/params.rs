//! The parameter inventory of a config, and what training it costs in memory.
//!
//! [`tensor_shapes`] lists every parameter's Hugging Face name and shape from the config
//! alone, without building the model: loading checks a checkpoint against it (so a bad
//! file is an error naming the tensor, not a panic), and [`param_count`] sums it. A test
//! keeps it equal to what the layers' `load` functions actually create.

use serde::Serialize;

use super::config::{ModelConfig, NormKind, NormPosition, PositionKind};

/// Every parameter tensor the config implies, by HF name, in file order.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (c, v, inner) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (q_width, kv_width) = (
        cfg.num_attention_heads * cfg.head_size(),
        cfg.kv_heads() * cfg.head_size(),
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    if cfg.position == PositionKind::Learned {
        out.push((
            "model.embed_positions.weight".to_string(),
            vec![cfg.max_position_embeddings, c],
        ));
    }
    let linear = |out: &mut Vec<(String, Vec<usize>)>,
                  name: String,
                  rows: usize,
                  cols: usize,
                  bias: bool| {
        out.push((format!("{name}.weight"), vec![rows, cols]));
        if bias {
            out.push((format!("{name}.bias"), vec![rows]));
        }
    };
    let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
        out.push((format!("{name}.weight"), vec![c]));
        if cfg.norm == NormKind::Layer {
            out.push((format!("{name}.bias"), vec![c]));
        }
    };
    for i in 0..cfg.num_hidden_layers {
        let attn = format!("model.layers.{i}.self_attn");
        let ab = cfg.attention_bias;
        linear(&mut out, format!("{attn}.q_proj"), q_width, c, ab);
        linear(&mut out, format!("{attn}.k_proj"), kv_width, c, ab);
        linear(&mut out, format!("{attn}.v_proj"), kv_width, c, ab);
        linear(&mut out, format!("{attn}.o_proj"), c, q_width, ab);
        let mlp = format!("model.layers.{i}.mlp");
        let mb = cfg.mlp_bias;
        if cfg.activation.is_gated() {
            linear(&mut out, format!("{mlp}.gate_proj"), inner, c, mb);
        }
        linear(&mut out, format!("{mlp}.up_proj"), inner, c, mb);
        linear(&mut out, format!("{mlp}.down_proj"), c, inner, mb);
        norm(&mut out, format!("model.layers.{i}.input_layernorm"));
        norm(
            &mut out,
            format!("model.layers.{i}.post_attention_layernorm"),
        );
    }
    if cfg.norm_position == NormPosition::Pre {
        norm(&mut out, "model.norm".to_string());
    }
    if !cfg.tie_word_embeddings {
        linear(&mut out, "lm_head".to_string(), v, c, false);
    }
    out
}

/// Exact number of trained parameters (a tied output projection counts once).
pub fn param_count(cfg: &ModelConfig) -> usize {
    tensor_shapes(cfg)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

/// Bytes an f32 training run with AdamW needs, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrainingMemory {
    /// The weights.
    pub parameters: usize,
    /// One gradient per weight.
    pub gradients: usize,
    /// AdamW's two moments per weight.
    pub optimizer: usize,
    /// Activations kept for the backward pass (an estimate).
    pub activations: usize,
}

impl TrainingMemory {
    /// Sum of all parts.
    pub fn total(&self) -> usize {
        self.parameters + self.gradients + self.optimizer + self.activations
    }
}

/// Estimates the memory of training `cfg` in f32 on batches of `batch_size` sequences
/// of `seq_len` tokens.
///
/// Parameters, gradients and AdamW's moments are exact (4 bytes each, 4 copies).
/// Activations are a rough count of what candle's autograd keeps for our unfused graph,
/// per token and layer: norm inputs and outputs in f32 (4c), q/k/v before and after RoPE
/// and the GQA repeat (4 q-widths + 4 kv-widths), three (heads x seq_len) score tensors
/// (scores, masked, softmax), the attention and MLP outputs and residual sums (4c), and
/// four MLP-wide tensors; plus the embedding and, at the head, the logits, their
/// log-softmax and their gradient (3 x vocab). Expect the real peak within a factor of
/// about 1.5 either way; dropout masks add roughly one more tensor per site. With
/// activation checkpointing (`checkpointed`) a layer keeps only its input (c) and one
/// layer at a time holds the rest.
pub fn training_memory(
    cfg: &ModelConfig,
    batch_size: usize,
    seq_len: usize,
    checkpointed: bool,
) -> TrainingMemory {
    const F32: usize = 4;
    let weights = param_count(cfg) * F32;
    let c = cfg.hidden_size;
    let q_width = cfg.num_attention_heads * cfg.head_size();
    let kv_width = cfg.kv_heads() * cfg.head_size();
    let per_token_layer = 8 * c
        + 4 * q_width
        + 4 * kv_width
        + 3 * cfg.num_attention_heads * seq_len
        + 4 * cfg.intermediate_size;
    let layers = match checkpointed {
        false => per_token_layer * cfg.num_hidden_layers,
        true => per_token_layer + c * cfg.num_hidden_layers,
    };
    let per_token = layers + 2 * c + 3 * cfg.vocab_size;
    TrainingMemory {
        parameters: weights,
        gradients: weights,
        optimizer: 2 * weights,
        activations: batch_size * seq_len * per_token * F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_count_by_hand() {
        // Fixture shape: embed 65x128, lm_head 65x128, per layer 4 x 128x128 + 3 x 128x352
        // + 2 x 128, final norm 128.
        let cfg = ModelConfig::default();
        let per_layer = 4 * 128 * 128 + 3 * 128 * 352 + 2 * 128;
        assert_eq!(param_count(&cfg), 2 * 65 * 128 + 4 * per_layer + 128);
        let tied = ModelConfig {
            tie_word_embeddings: true,
            ..ModelConfig::default()
        };
        assert_eq!(param_count(&cfg) - param_count(&tied), 65 * 128);
    }

    #[test]
    fn memory_parts_scale_as_documented() {
        let cfg = ModelConfig::default();
        let m = training_memory(&cfg, 8, 64, false);
        assert_eq!(m.parameters, param_count(&cfg) * 4);
        assert_eq!(m.optimizer, 2 * m.parameters);
        assert_eq!(
            training_memory(&cfg, 16, 64, false).activations,
            2 * m.activations
        );
        let checkpointed = training_memory(&cfg, 8, 64, true);
        assert!(checkpointed.activations < m.activations / 2);
        assert_eq!(checkpointed.parameters, m.parameters);
        assert_eq!(m.total(), 4 * m.parameters + m.activations);
    }
}
