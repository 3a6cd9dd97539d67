//! The hyper-parameters of a LoRA adapter and PEFT's `adapter_config.json`.
//!
//! We write the fields PEFT's `LoraConfig` needs to rebuild the adapter (`peft_type`
//! "LORA", `task_type` "CAUSAL_LM", `r`, `lora_alpha`, `lora_dropout`,
//! `target_modules`, `bias` "none", `use_rslora`, `base_model_name_or_path`) and read
//! files PEFT wrote, refusing the options whose meaning we do not implement (DoRA,
//! per-module rank or alpha patterns, trained biases, saved full modules) instead of
//! silently computing something else.

use std::path::Path;

use serde_json::{json, Value};

use crate::{Error, Result};

/// File name of the adapter's configuration inside an adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// The projections LoRA can target, by their Hugging Face module names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
];

/// What an adapter is: its rank, scaling, dropout and the modules it adapts.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank r of `B A`.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout on each adapter's input while training.
    pub dropout: f64,
    /// Module names or suffixes (`q_proj`, `self_attn.q_proj`), or `all-linear`.
    pub targets: Vec<String>,
    /// Rank-stabilised scaling (Kalajdzievski 2023, "A Rank Stabilization Scaling
    /// Factor for Fine-Tuning with LoRA"): `alpha / sqrt(r)`.
    pub rslora: bool,
    /// The base model the adapter was trained on, as given.
    pub base_model: String,
}

impl LoraConfig {
    /// The factor on `B A`: `alpha / r` (Hu et al. 2021, section 4.1), or `alpha / sqrt(r)`
    /// with rsLoRA.
    pub fn scale(&self) -> f64 {
        match self.rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }

    /// Checks values that are well-typed but not allowed; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid(
                "--rank 0: the rank of a LoRA adapter must be at least 1 (8 is usual)".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "--dropout {}: must be at least 0 and below 1 (0.05 is usual)",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Invalid(format!(
                "--alpha {}: must be a finite number",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid(
                "--target: name at least one module, e.g. q_proj,v_proj or all-linear".into(),
            ));
        }
        Ok(())
    }

    /// The `adapter_config.json` text PEFT reads.
    pub fn to_json(&self) -> String {
        let alpha = match self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            true => json!(self.alpha as i64),
            false => json!(self.alpha),
        };
        let value = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "use_rslora": self.rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": self.base_model,
        });
        let mut text = serde_json::to_string_pretty(&value).expect("a JSON map always serializes");
        text.push('\n');
        text
    }

    /// Parses an `adapter_config.json` read from `path` (named in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<LoraConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let get = |key: &str| value.get(key).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(
                    "peft_type",
                    format!("{other:?} is not a LoRA adapter; only peft_type \"LORA\" loads"),
                ))
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("r", "missing or not a whole number".into()))?
            as usize;
        let alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
        let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let targets = match get("target_modules") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| bad("target_modules", "must be a list of module names".into()))?,
            Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
            Some(Value::String(s)) => {
                return Err(bad(
                    "target_modules",
                    format!("the pattern `{s}` is not supported: give a list of module names"),
                ))
            }
            _ => return Err(bad("target_modules", "missing".into())),
        };
        // Options that change the computation and that we do not implement.
        let unsupported = [
            ("use_dora", get("use_dora").and_then(Value::as_bool) == Some(true)),
            (
                "fan_in_fan_out",
                get("fan_in_fan_out").and_then(Value::as_bool) == Some(true),
            ),
            (
                "bias",
                get("bias").and_then(Value::as_str).is_some_and(|b| b != "none"),
            ),
            ("lora_bias", get("lora_bias").and_then(Value::as_bool) == Some(true)),
            (
                "rank_pattern",
                get("rank_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty()),
            ),
            (
                "alpha_pattern",
                get("alpha_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty()),
            ),
            ("modules_to_save", get("modules_to_save").is_some()),
            ("layers_to_transform", get("layers_to_transform").is_some()),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(bad(
                key,
                "this PEFT option is not supported by nlp: only plain LoRA adapters load".into(),
            ));
        }
        let config = LoraConfig {
            r,
            alpha,
            dropout,
            targets,
            rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            base_model: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        };
        config
            .validate()
            .map_err(|e| bad("r", format!("{e}")))?;
        Ok(config)
    }
}

/// Whether the module `name` (`model.layers.0.self_attn.q_proj`) is one `target` names:
/// equal to it, or ending in `.{target}` (PEFT's rule for a list of names).
pub fn matches(name: &str, target: &str) -> bool {
    target == "all-linear"
        || name == target
        || name
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(r: usize, alpha: f64, rslora: bool) -> LoraConfig {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            targets: vec!["q_proj".into()],
            rslora,
            base_model: String::new(),
        }
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_sqrt_r() {
        // Hu et al. 2021: alpha / r; Kalajdzievski 2023: alpha / sqrt(r).
        assert_eq!(config(8, 16.0, false).scale(), 2.0);
        assert_eq!(config(16, 16.0, true).scale(), 4.0);
        assert_eq!(config(4, 8.0, true).scale(), 4.0);
    }

    #[test]
    fn target_matching_follows_peft_suffix_rule() {
        let name = "model.layers.0.self_attn.q_proj";
        assert!(matches(name, "q_proj"));
        assert!(matches(name, "self_attn.q_proj"));
        assert!(matches(name, name));
        assert!(!matches(name, "proj"));
        assert!(!matches(name, "k_proj"));
        assert!(matches(name, "all-linear"));
    }

    #[test]
    fn json_round_trips_and_reads_the_peft_fixture_fields() {
        let mut written = config(8, 16.0, true);
        written.targets = vec!["q_proj".into(), "v_proj".into()];
        written.dropout = 0.05;
        let path = Path::new("adapter_config.json");
        assert_eq!(LoraConfig::from_json(&written.to_json(), path).unwrap(), written);
        let dora = written.to_json().replace("\"use_dora\": false", "\"use_dora\": true");
        let error = LoraConfig::from_json(&dora, path).unwrap_err().to_string();
        assert!(error.contains("use_dora"), "{error}");
    }
}
