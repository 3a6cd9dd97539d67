//! Resumable checkpoints: one safetensors file holding the weights, AdamW's moments and,
//! in its metadata, the step, the batch generator's state and the model config, written
//! atomically (temporary file, then rename), so an interrupted write leaves the previous
//! checkpoint intact and `--resume` continues bit for bit.
//!
//! Tensor names: the model's Hugging Face names for the weights, `optim/{name}.exp_avg`
//! and `optim/{name}.exp_avg_sq` for the moments. The metadata key `nlp.checkpoint`
//! holds [`CheckpointState`] as JSON. The checkpoint is for resuming; the model
//! directory beside it (`config.json`, `model.safetensors`) is what other commands read.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use crate::fsutil::write_atomic;
use crate::model::{tensor_shapes, ModelConfig};
use crate::{Error, Result};

/// File name of the checkpoint inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const STATE_KEY: &str = "nlp.checkpoint";
const OPTIM_PREFIX: &str = "optim/";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps done.
    pub step: u64,
    /// The training batch generator's state (the data position).
    pub batch_rng: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Best validation loss so far.
    pub best_val_loss: Option<f32>,
    /// Seconds of training so far.
    pub seconds: f64,
    /// The seed of the run.
    pub seed: u64,
    /// The model's config (a resumed run must build the same model).
    pub model: ModelConfig,
}

/// Writes the checkpoint of `optimizer`'s parameters and moments with `state` to `path`.
pub fn save(path: &Path, optimizer: &AdamW, state: &CheckpointState) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = optimizer
        .vars()
        .map(|(name, var)| Ok((name.to_string(), var.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    for (name, tensor) in optimizer.state_tensors()? {
        tensors.push((format!("{OPTIM_PREFIX}{name}"), tensor));
    }
    let state_json = serde_json::to_string(state).map_err(|e| Error::Invalid(e.to_string()))?;
    let metadata = HashMap::from([(STATE_KEY.to_string(), state_json)]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Tensor(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Reads a checkpoint's state without its tensors.
pub fn read_state(path: &Path) -> Result<CheckpointState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    state_of(&bytes, path)
}

fn state_of(bytes: &[u8], path: &Path) -> Result<CheckpointState> {
    let corrupt = |message: String| {
        Error::Invalid(format!(
            "{}: {message}; the checkpoint is corrupt or not from `nlp train` (start afresh without --resume)",
            path.display()
        ))
    };
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| corrupt(format!("no `{STATE_KEY}` metadata")))?;
    serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))
}

/// Loads the checkpoint at `path` into `optimizer`'s parameters and moments, after
/// checking that it was made for `model` (the error names the differing tensor and
/// both shapes); returns its state.
pub fn load(path: &Path, optimizer: &mut AdamW, model: &ModelConfig) -> Result<CheckpointState> {
    load_with_shapes(path, optimizer, model, &tensor_shapes(model))
}

/// [`load`] for an optimiser over other parameters than the model's own (LoRA
/// adapters): `expected` lists their names and shapes.
pub fn load_with_shapes(
    path: &Path,
    optimizer: &mut AdamW,
    model: &ModelConfig,
    expected: &[(String, Vec<usize>)],
) -> Result<CheckpointState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let state = state_of(&bytes, path)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        Error::Invalid(format!(
            "{}: {e}; the checkpoint is corrupt",
            path.display()
        ))
    })?;
    drop(bytes);
    // The shapes the config implies against the shapes in the file, tensor by tensor.
    for (name, shape) in expected {
        match tensors.get(name) {
            None => {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{name}` (shape {shape:?}) is missing; the checkpoint was made \
                     for another [model] config",
                    path.display()
                )))
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{name}` has shape {:?} in the checkpoint but the config needs \
                     {shape:?}; resume with the [model] config the run started with",
                    path.display(),
                    t.dims()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors
        .keys()
        .find(|n| !n.starts_with(OPTIM_PREFIX) && !expected.iter().any(|(e, _)| e == *n))
    {
        return Err(Error::Invalid(format!(
            "{}: tensor `{extra}` is not part of the configured model; resume with the [model] \
             config the run started with",
            path.display()
        )));
    }
    if &state.model != model {
        return Err(Error::Invalid(format!(
            "{}: the checkpoint's model config differs from the configured one (same shapes, \
             other settings: {}); resume with the [model] config the run started with",
            path.display(),
            config_difference(&state.model, model)
        )));
    }
    let vars: Vec<(String, Var)> = optimizer
        .vars()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    for (name, var) in &vars {
        let tensor = tensors.get(name).ok_or_else(|| {
            Error::Invalid(format!("{}: tensor `{name}` is missing", path.display()))
        })?;
        var.set(&tensor.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    let moments: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(OPTIM_PREFIX).map(|n| (n.to_string(), t)))
        .collect();
    optimizer
        .load_state(&moments, state.step)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    Ok(state)
}

/// The first field in which two model configs differ, as `key: old vs new`.
fn config_difference(old: &ModelConfig, new: &ModelConfig) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return "unknown".into();
    };
    a.iter()
        .find(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k}: {v} vs {}",
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .unwrap_or_else(|| "unknown".into())
}
