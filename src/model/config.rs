//! `ModelConfig`: the shape and the architectural choices of a decoder-only transformer.
//!
//! Field names are Hugging Face's `LlamaConfig` names (`hidden_size`,
//! `num_key_value_heads`, `rms_norm_eps`, ...), so a `config.json` maps onto it one to
//! one (see `hf.rs` for the file layer: the two spellings of RoPE theta, Llama's defaults
//! for absent keys). The extension fields `norm`, `norm_position`, `activation`,
//! `position` and `dropout` select the variants of Vaswani et al. 2017 ("Attention Is
//! All You Need"); their defaults are Llama's choices, so a config that leaves them out
//! is a Llama.
//!
//! This is also the `[model]` table of our TOML configs: `serde(default)` fills every key
//! a file leaves out from [`ModelConfig::default`], a small character-level Llama.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which normalisation every block (and the final layer) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// RMSNorm (Zhang & Sennrich 2019): scale only, no mean subtraction. Llama's choice.
    #[default]
    Rms,
    /// LayerNorm (Ba et al. 2016): mean and variance, with a weight and a bias.
    Layer,
}

/// Where the normalisation sits relative to the residual connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPosition {
    /// `x + f(norm(x))` (Xiong et al. 2020): stable without warm-up. Llama's choice.
    #[default]
    Pre,
    /// `norm(x + f(x))`, as in Vaswani et al. 2017; no final norm after the last block.
    Post,
}

/// The feed-forward network's non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Gated `down(silu(gate(x)) * up(x))` (Shazeer 2020). Llama's choice.
    #[default]
    Swiglu,
    /// Non-gated `down(silu(up(x)))`.
    Silu,
    /// Non-gated `down(relu(up(x)))`, as in Vaswani et al. 2017.
    Relu,
    /// Non-gated `down(gelu(up(x)))` with the exact (erf) GELU.
    Gelu,
}

impl Activation {
    /// True for the gated form, which has a third projection (`gate_proj`).
    pub fn is_gated(self) -> bool {
        matches!(self, Activation::Swiglu)
    }
}

/// How the model learns where a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionKind {
    /// Rotary embeddings on queries and keys (Su et al. 2021). Llama's choice.
    #[default]
    Rope,
    /// Fixed sines and cosines added to the token embeddings (Vaswani et al. 2017).
    Sinusoidal,
    /// A trained table `model.embed_positions.weight` added to the token embeddings.
    Learned,
    /// Nothing: the causal mask alone tells positions apart.
    None,
}

/// The architecture of a decoder-only transformer, with Hugging Face Llama field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Number of token ids (rows of the embedding, columns of the logits).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward network's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); absent means one per query head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; absent means `hidden_size / num_attention_heads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Epsilon of every normalisation layer (RMSNorm or LayerNorm).
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Longest sequence the position tables cover.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the input embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether the feed-forward projections have biases.
    pub mlp_bias: bool,
    /// Standard deviation of the normal initialisation of fresh weights.
    pub initializer_range: f64,
    /// Beginning-of-sequence token fed before the first real token, if the model has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if the model has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// RMSNorm or LayerNorm.
    pub norm: NormKind,
    /// Pre-norm or post-norm blocks.
    pub norm_position: NormPosition,
    /// Feed-forward non-linearity.
    pub activation: Activation,
    /// Position encoding.
    pub position: PositionKind,
    /// Dropout probability on embeddings, attention weights and residual branches (training only).
    pub dropout: f64,
}

impl Default for ModelConfig {
    /// The shape of the character-level Llama in `shared/fixtures/hf_tiny_llama`.
    fn default() -> Self {
        ModelConfig {
            vocab_size: 65,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
            norm: NormKind::Rms,
            norm_position: NormPosition::Pre,
            activation: Activation::Swiglu,
            position: PositionKind::Rope,
            dropout: 0.0,
        }
    }
}

impl ModelConfig {
    /// The original transformer's choices (LayerNorm, post-norm, ReLU, sinusoidal
    /// positions, biases) on the default shape.
    pub fn vaswani() -> Self {
        ModelConfig {
            norm: NormKind::Layer,
            norm_position: NormPosition::Post,
            activation: Activation::Relu,
            position: PositionKind::Sinusoidal,
            attention_bias: true,
            mlp_bias: true,
            dropout: 0.1,
            ..ModelConfig::default()
        }
    }

    /// Number of key/value heads, resolved.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head, resolved.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The same config with `num_key_value_heads` and `head_dim` written out, as a
    /// model keeps it and as `config.json` states it.
    pub fn resolved(&self) -> ModelConfig {
        ModelConfig {
            num_key_value_heads: Some(self.kv_heads()),
            head_dim: Some(self.head_size()),
            ..self.clone()
        }
    }

    /// True when `transformers`' `LlamaForCausalLM` computes the same function.
    pub fn is_llama(&self) -> bool {
        self.norm == NormKind::Rms
            && self.norm_position == NormPosition::Pre
            && self.activation == Activation::Swiglu
            && self.position == PositionKind::Rope
    }

    /// Checks that the numbers fit together; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.validate_in(Path::new("model config"))
    }

    /// Like [`ModelConfig::validate`], naming `path` as where the config came from.
    pub(crate) fn validate_in(&self, path: &Path) -> Result<()> {
        match self.first_problem() {
            None => Ok(()),
            Some((key, message)) => Err(Error::Config {
                path: PathBuf::from(path),
                key: key.to_string(),
                message,
            }),
        }
    }

    // `usize::is_multiple_of` is newer than our rust-version (1.85).
    #[allow(clippy::manual_is_multiple_of)]
    fn first_problem(&self) -> Option<(&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Some((key, "must be at least 1".to_string()));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Some(("vocab_size", "token ids are u32: at most 4294967295".into()));
        }
        let heads = self.num_attention_heads;
        match self.head_dim {
            Some(0) => return Some(("head_dim", "must be at least 1".to_string())),
            Some(_) => {}
            None if self.hidden_size % heads != 0 => {
                return Some((
                    "hidden_size",
                    format!(
                        "{} is not divisible by num_attention_heads = {heads}; \
                         choose another width or set head_dim",
                        self.hidden_size
                    ),
                ))
            }
            None => {}
        }
        let kv_heads = self.kv_heads();
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Some((
                "num_key_value_heads",
                format!(
                    "{kv_heads} does not divide num_attention_heads = {heads} \
                     (each key/value head serves a whole group of query heads)"
                ),
            ));
        }
        if self.position == PositionKind::Rope && self.head_size() % 2 != 0 {
            return Some((
                "head_dim",
                format!(
                    "rotary embeddings rotate pairs of features: head width {} must be even",
                    self.head_size()
                ),
            ));
        }
        if self.position == PositionKind::Sinusoidal && self.hidden_size % 2 != 0 {
            return Some((
                "hidden_size",
                format!(
                    "sinusoidal positions pair a sine with a cosine: {} must be even",
                    self.hidden_size
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Some((
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            ));
        }
        if self.position == PositionKind::Rope
            && !(self.rope_theta.is_finite() && self.rope_theta > 1.0)
        {
            return Some((
                "rope_theta",
                format!("{} must be greater than 1", self.rope_theta),
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Some((
                "initializer_range",
                format!("{} is not a non-negative number", self.initializer_range),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Some((
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            ));
        }
        for (key, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Some((
                        key,
                        format!("{id} is outside the vocabulary of {}", self.vocab_size),
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_vaswani_presets_are_valid() {
        ModelConfig::default().validate().unwrap();
        ModelConfig::vaswani().validate().unwrap();
        assert!(ModelConfig::default().is_llama());
        assert!(!ModelConfig::vaswani().is_llama());
    }

    #[test]
    fn validate_names_the_key() {
        let cases: Vec<(&str, ModelConfig)> = vec![
            (
                "hidden_size",
                ModelConfig {
                    hidden_size: 130,
                    ..Default::default()
                },
            ),
            (
                "num_key_value_heads",
                ModelConfig {
                    num_key_value_heads: Some(3),
                    ..Default::default()
                },
            ),
            (
                "num_key_value_heads",
                ModelConfig {
                    num_key_value_heads: Some(0),
                    ..Default::default()
                },
            ),
            (
                "head_dim",
                ModelConfig {
                    head_dim: Some(33),
                    ..Default::default()
                },
            ),
            (
                "vocab_size",
                ModelConfig {
                    vocab_size: 0,
                    ..Default::default()
                },
            ),
            (
                "dropout",
                ModelConfig {
                    dropout: 1.0,
                    ..Default::default()
                },
            ),
            (
                "rms_norm_eps",
                ModelConfig {
                    rms_norm_eps: 0.0,
                    ..Default::default()
                },
            ),
            (
                "eos_token_id",
                ModelConfig {
                    eos_token_id: Some(65),
                    ..Default::default()
                },
            ),
        ];
        for (key, cfg) in cases {
            match cfg.validate() {
                Err(Error::Config { key: got, .. }) => assert_eq!(got, key),
                other => panic!("expected an error on {key}, got {other:?}"),
            }
        }
        // head_dim decouples the head width from hidden_size / heads, as in HF.
        ModelConfig {
            hidden_size: 130,
            head_dim: Some(32),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn toml_style_partial_tables_fill_defaults() {
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"hidden_size": 64, "norm": "layer", "position": "learned"}"#)
                .unwrap();
        assert_eq!(cfg.hidden_size, 64);
        assert_eq!(cfg.head_size(), 16);
        assert_eq!(cfg.norm, NormKind::Layer);
        assert_eq!(cfg.position, PositionKind::Learned);
        assert_eq!(cfg.vocab_size, 65);
        assert!(serde_json::from_str::<ModelConfig>(r#"{"hidden_sise": 64}"#).is_err());
    }
}
