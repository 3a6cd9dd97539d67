//! The `[model]` and `[train]` sections of a training config, and what a run needs.
//!
//! Both sections are plain serde structs with every field serialized and no `Option`
//! (the config layering checks each key of a file against the serialized defaults), so
//! "automatic" is spelled `0` or `"auto"`. The defaults are nanoGPT's character-level
//! Shakespeare recipe (a 0.8M-parameter Llama: dim 128, 4 layers, 4 heads, SwiGLU 352,
//! 64-token windows, batch 12, AdamW 1e-3 with betas 0.9/0.95 and weight decay 0.1,
//! 100 warm-up steps then cosine decay to lr/10 over 2000 steps).
//!
//! [`ModelSection::model_config`] turns the section into the model's [`ModelConfig`]
//! once the tokenizer has fixed the vocabulary size.

use serde::{Deserialize, Serialize};

use crate::model::{Activation, ModelConfig, NormKind, NormPosition, PositionKind};

/// `[model]`: the architecture of the transformer to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Width of the residual stream.
    pub dim: u64,
    /// Number of transformer blocks.
    pub n_layers: u64,
    /// Number of query heads.
    pub n_heads: u64,
    /// Number of key/value heads (grouped-query attention); 0 = one per query head.
    pub n_kv_heads: u64,
    /// Width of the feed-forward layer; 0 = automatic (SwiGLU: 8/3 dim rounded up to a
    /// multiple of 32, as Llama; otherwise 4 dim, as Vaswani et al.).
    pub hidden: u64,
    /// "rms" (RMSNorm) or "layer" (LayerNorm).
    pub norm: String,
    /// "pre" or "post" (normalisation before the residual branch, or after the sum).
    pub norm_position: String,
    /// "swiglu", "silu", "relu" or "gelu".
    pub activation: String,
    /// "rope", "sinusoidal", "learned" or "none".
    pub position: String,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Dropout probability on embeddings, attention weights and residual branches.
    pub dropout: f64,
    /// Whether the output projection is the input embedding.
    pub tie_embeddings: bool,
    /// Whether the attention and feed-forward projections have biases.
    pub bias: bool,
    /// Epsilon of every normalisation layer.
    pub norm_eps: f64,
    /// Standard deviation of the normal initialisation of weight matrices.
    pub init_std: f64,
    /// Longest sequence the model accepts (`max_position_embeddings` in config.json);
    /// 0 = `seq_len`, the context it is trained on. Generation past it slides a window.
    pub max_seq_len: u64,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            dim: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 0,
            hidden: 0,
            norm: "rms".into(),
            norm_position: "pre".into(),
            activation: "swiglu".into(),
            position: "rope".into(),
            rope_theta: 10_000.0,
            dropout: 0.0,
            tie_embeddings: false,
            bias: false,
            norm_eps: 1e-5,
            init_std: 0.02,
            max_seq_len: 0,
        }
    }
}

/// `[train]`: data, optimiser, schedule, evaluation and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// "char" (a vocabulary of the corpus's characters), "byte" (256 byte tokens) or the
    /// path of a `tokenizer.json` (e.g. from `nlp bpe train`).
    pub tokenizer: String,
    /// "auto", "u16" or "u32": the width of the token file's ids.
    pub token_dtype: String,
    /// The share of the corpus's tokens held out for validation (the last part).
    pub val_fraction: f64,
    /// Tokens per training sequence.
    pub seq_len: u64,
    /// Sequences per micro-batch.
    pub batch_size: u64,
    /// Micro-batches whose gradients are summed before each optimiser step.
    pub grad_accum: u64,
    /// Optimiser steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: u64,
    /// "cosine", "constant" or "wsd" (warm-up, stable, decay).
    pub schedule: String,
    /// wsd: the share of all steps spent in the final linear decay to `min_lr`.
    pub decay_fraction: f64,
    /// AdamW's decoupled weight decay on weight matrices.
    pub weight_decay: f64,
    /// Whether embeddings (and a tied output projection) are decayed too.
    pub decay_embeddings: bool,
    /// AdamW's first-moment decay.
    pub beta1: f64,
    /// AdamW's second-moment decay.
    pub beta2: f64,
    /// AdamW's denominator epsilon.
    pub eps: f64,
    /// Clip the gradients' global L2 norm to this; 0 = no clipping.
    pub grad_clip: f64,
    /// Evaluate on the validation tokens every N steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Batches per evaluation.
    pub eval_steps: u64,
    /// Write a checkpoint every N steps (and at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Write a metrics line and report progress every N steps.
    pub log_every: u64,
    /// "auto", "f32" or "bf16-mixed". On the CPU bf16-mixed is the hand-written pass of
    /// the Llama recipe with bf16 operands and f32 sums in its products;
    /// "auto" is bf16-mixed on a GPU and, for that recipe, on a CPU with AVX512-BF16,
    /// f32 otherwise.
    pub precision: String,
    /// Keep only each block's input for the backward pass and recompute the rest
    /// (activation checkpointing): much less activation memory for about a third more
    /// computation per step.
    pub checkpoint_activations: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            tokenizer: "char".into(),
            token_dtype: "auto".into(),
            val_fraction: 0.1,
            seq_len: 64,
            batch_size: 12,
            grad_accum: 1,
            steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            schedule: "cosine".into(),
            decay_fraction: 0.2,
            weight_decay: 0.1,
            decay_embeddings: false,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 250,
            eval_steps: 20,
            checkpoint_every: 500,
            log_every: 10,
            precision: "auto".into(),
            checkpoint_activations: false,
        }
    }
}

/// Everything one training run needs besides the corpus text and the device.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSetup {
    /// The architecture.
    pub model: ModelSection,
    /// The training settings.
    pub train: TrainSection,
    /// Seed of every random source (initialisation, batches, dropout).
    pub seed: u64,
    /// The corpus's name, for messages.
    pub corpus_name: String,
    /// The resolved configuration as TOML, saved as `train.toml`.
    pub config_toml: String,
}

/// Parses a lower-case variant name through its serde spelling.
fn variant<T: serde::de::DeserializeOwned>(text: &str, allowed: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("`{text}` is not one of {allowed}"))
}

impl ModelSection {
    /// The model's config for a vocabulary of `vocab_size` and training windows of
    /// `seq_len`; errors carry the dotted key.
    pub fn model_config(
        &self,
        vocab_size: usize,
        seq_len: u64,
    ) -> Result<ModelConfig, (String, String)> {
        let key = |k: &str, m: String| (format!("model.{k}"), m);
        let norm: NormKind = variant(&self.norm, "rms, layer").map_err(|m| key("norm", m))?;
        let norm_position: NormPosition =
            variant(&self.norm_position, "pre, post").map_err(|m| key("norm_position", m))?;
        let activation: Activation = variant(&self.activation, "swiglu, silu, relu, gelu")
            .map_err(|m| key("activation", m))?;
        let position: PositionKind = variant(&self.position, "rope, sinusoidal, learned, none")
            .map_err(|m| key("position", m))?;
        let dim = self.dim as usize;
        let hidden = match (self.hidden, activation.is_gated()) {
            (0, true) => (8 * dim / 3).div_ceil(32) * 32,
            (0, false) => 4 * dim,
            (h, _) => h as usize,
        };
        let max_seq_len = match self.max_seq_len {
            0 => seq_len,
            n => n,
        };
        let cfg = ModelConfig {
            vocab_size,
            hidden_size: dim,
            intermediate_size: hidden,
            num_hidden_layers: self.n_layers as usize,
            num_attention_heads: self.n_heads as usize,
            num_key_value_heads: match self.n_kv_heads {
                0 => None,
                n => Some(n as usize),
            },
            head_dim: None,
            rms_norm_eps: self.norm_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: max_seq_len as usize,
            tie_word_embeddings: self.tie_embeddings,
            attention_bias: self.bias,
            mlp_bias: self.bias,
            initializer_range: self.init_std,
            bos_token_id: None,
            eos_token_id: None,
            norm,
            norm_position,
            activation,
            position,
            dropout: self.dropout,
        };
        Ok(cfg)
    }

    /// Checks the section without a vocabulary; the error is (dotted key, message).
    pub fn validate(&self, seq_len: u64) -> Result<(), (String, String)> {
        for (name, value) in [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
        ] {
            if value == 0 {
                return Err((format!("model.{name}"), "must be at least 1".into()));
            }
        }
        if self.dim % self.n_heads != 0 {
            return Err((
                "model.dim".into(),
                format!(
                    "{} is not divisible by n_heads = {}; choose a width that is a multiple of the head count",
                    self.dim, self.n_heads
                ),
            ));
        }
        if self.max_seq_len != 0 && self.max_seq_len < seq_len {
            return Err((
                "model.max_seq_len".into(),
                format!(
                    "{} is shorter than train.seq_len = {seq_len}",
                    self.max_seq_len
                ),
            ));
        }
        let cfg = self.model_config(1, seq_len)?;
        // The model names its own keys; map them back to this section's names.
        cfg.validate().map_err(|e| match e {
            crate::Error::Config { key, message, .. } => {
                let ours = match key.as_str() {
                    "hidden_size" => "dim",
                    "num_key_value_heads" => "n_kv_heads",
                    "num_attention_heads" => "n_heads",
                    "intermediate_size" => "hidden",
                    "rms_norm_eps" => "norm_eps",
                    "initializer_range" => "init_std",
                    "max_position_embeddings" => "max_seq_len",
                    "head_dim" => "dim",
                    other => other,
                };
                (format!("model.{ours}"), message)
            }
            other => ("model".to_string(), other.to_string()),
        })
    }
}

/// The numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights, activations and gradients.
    F32,
    /// f32 master weights and optimiser state, bf16 forward and backward.
    Bf16Mixed,
}

impl TrainSection {
    /// The precision `device` gives this setting: "auto" is bf16-mixed on a GPU, f32 on
    /// the CPU (where the trainer takes bf16-mixed instead for the Llama recipe on a CPU
    /// with AVX512-BF16).
    pub fn precision_on(&self, device: &candle_core::Device) -> Precision {
        match (self.precision.as_str(), device.is_cpu()) {
            ("f32", _) | ("auto", true) => Precision::F32,
            _ => Precision::Bf16Mixed,
        }
    }

    /// Checks values that are well-typed but not allowed; the error is (dotted key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("train.{k}"), m.to_string()));
        if self.tokenizer.trim().is_empty() {
            return err(
                "tokenizer",
                "must be \"char\", \"byte\" or the path of a tokenizer.json",
            );
        }
        if !matches!(self.token_dtype.as_str(), "auto" | "u16" | "u32") {
            return err("token_dtype", "must be \"auto\", \"u16\" or \"u32\"");
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return err(
                "val_fraction",
                "must be between 0 and 1 (exclusive), e.g. 0.1",
            );
        }
        for (name, value) in [
            ("seq_len", self.seq_len),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("steps", self.steps),
            ("eval_steps", self.eval_steps),
            ("log_every", self.log_every),
        ] {
            if value == 0 {
                return err(name, "must be at least 1");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return err("lr", "must be a positive number");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return err("min_lr", "must be between 0 and lr");
        }
        if !matches!(self.schedule.as_str(), "cosine" | "constant" | "wsd") {
            return err("schedule", "must be \"cosine\", \"constant\" or \"wsd\"");
        }
        if !(0.0..=1.0).contains(&self.decay_fraction) {
            return err("decay_fraction", "must be between 0 and 1");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return err("weight_decay", "must be a non-negative number");
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return err(name, "must be in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return err("eps", "must be a positive number");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return err(
                "grad_clip",
                "must be a non-negative number (0 turns clipping off)",
            );
        }
        if !matches!(self.precision.as_str(), "auto" | "f32" | "bf16-mixed") {
            return err("precision", "must be \"auto\", \"f32\" or \"bf16-mixed\"");
        }
        Ok(())
    }
}

impl TrainSetup {
    /// Checks both sections; the error is (dotted key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.train.validate()?;
        self.model.validate(self.train.seq_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_shakespeare_recipe_and_valid() {
        let setup = TrainSetup {
            model: ModelSection::default(),
            train: TrainSection::default(),
            seed: 1,
            corpus_name: "x".into(),
            config_toml: String::new(),
        };
        setup.validate().unwrap();
        let cfg = setup.model.model_config(65, 64).unwrap();
        assert_eq!(cfg.intermediate_size, 352, "8/3 * 128 rounded up to 32");
        assert_eq!(cfg.max_position_embeddings, 64, "the trained context");
        // Every field serializes, so the config layering can check keys against it.
        let table = toml::Table::try_from(TrainSection::default()).unwrap();
        assert_eq!(table.len(), 24);
        let table = toml::Table::try_from(ModelSection::default()).unwrap();
        assert_eq!(table.len(), 16);
    }

    #[test]
    fn bad_values_name_their_key() {
        let model = ModelSection {
            dim: 130,
            ..Default::default()
        };
        assert_eq!(model.validate(64).unwrap_err().0, "model.dim");
        let model = ModelSection {
            norm: "batch".into(),
            ..Default::default()
        };
        assert_eq!(model.validate(64).unwrap_err().0, "model.norm");
        let model = ModelSection {
            n_kv_heads: 3,
            ..Default::default()
        };
        assert_eq!(model.validate(64).unwrap_err().0, "model.n_kv_heads");
        let train = TrainSection {
            schedule: "linear".into(),
            ..Default::default()
        };
        assert_eq!(train.validate().unwrap_err().0, "train.schedule");
        let train = TrainSection {
            val_fraction: 0.0,
            ..Default::default()
        };
        assert_eq!(train.validate().unwrap_err().0, "train.val_fraction");
    }
}
