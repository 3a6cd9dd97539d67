//! Hugging Face model directories: `config.json` + `model.safetensors`, read and written.
//!
//! Loading maps `LlamaConfig` keys onto [`ModelConfig`] with Llama's defaults for absent
//! keys, reads RoPE theta from either spelling (transformers 5's
//! `rope_parameters.rope_theta`, older files' top-level `rope_theta`), and checks every
//! tensor of the file against the names and shapes the config implies before building
//! the model, so a bad checkpoint is an error that names the tensor and both shapes.
//!
//! Saving writes HF field names with `architectures: ["LlamaForCausalLM"]`. Our variant
//! fields (`norm`, `norm_position`, `activation`, `position`, `dropout`) are written only
//! when they differ from Llama's choices; a config that needs them (LayerNorm, post-norm,
//! a non-gated MLP, sinusoidal/learned/no positions) still saves and reloads here, but
//! `transformers` ignores those keys and would build a different model from the file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::config::{Activation, ModelConfig, NormKind, NormPosition, PositionKind};
use super::params::tensor_shapes;
use super::transformer::Transformer;
use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// File name of the configuration inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a checkpoint sharded over several safetensors files.
pub const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// `config.json` as transformers writes it; keys we do not use are ignored.
#[derive(Debug, Deserialize)]
struct HfConfigFile {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    initializer_range: Option<f64>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    // Our extensions.
    norm: Option<NormKind>,
    norm_position: Option<NormPosition>,
    activation: Option<Activation>,
    position: Option<PositionKind>,
    dropout: Option<f64>,
}

/// transformers 5's `rope_parameters` (and older files' `rope_scaling`).
#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    /// transformers 4's older spelling of `rope_type` inside `rope_scaling`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
}

/// A token id or a list of them (transformers allows both for `eos_token_id`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id: we keep one end-of-sequence token.
    fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

fn config_error(path: &Path, key: &str, message: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    }
}

/// Parses the text of a `config.json` (read from `path`, named in errors).
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig> {
    let file: HfConfigFile = serde_json::from_str(text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })?;
    if let Some(model_type) = &file.model_type {
        if model_type != "llama" {
            return Err(config_error(
                path,
                "model_type",
                format!(
                    "`{model_type}` is not supported: only Llama-style checkpoints (`llama`) load"
                ),
            ));
        }
    }
    for (key, rope) in [
        ("rope_parameters", &file.rope_parameters),
        ("rope_scaling", &file.rope_scaling),
    ] {
        let kind = rope
            .as_ref()
            .and_then(|r| r.rope_type.as_ref().or(r.legacy_type.as_ref()));
        if let Some(kind) = kind {
            if kind != "default" {
                return Err(config_error(
                    path,
                    key,
                    format!("RoPE type `{kind}` is not supported: only `default` (no scaling)"),
                ));
            }
        }
    }
    let activation = match (file.activation, file.hidden_act.as_deref()) {
        (Some(activation), _) => activation,
        (None, None | Some("silu")) => Activation::Swiglu,
        (None, Some(other)) => {
            return Err(config_error(
                path,
                "hidden_act",
                format!("a gated MLP with `{other}` is not supported: Llama uses `silu` (SwiGLU)"),
            ))
        }
    };
    let rope_theta = file
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(file.rope_theta)
        .unwrap_or(10_000.0);
    let cfg = ModelConfig {
        vocab_size: file.vocab_size,
        hidden_size: file.hidden_size,
        intermediate_size: file.intermediate_size,
        num_hidden_layers: file.num_hidden_layers,
        num_attention_heads: file.num_attention_heads,
        num_key_value_heads: file.num_key_value_heads,
        head_dim: file.head_dim,
        // Llama's defaults for keys old files leave out.
        rms_norm_eps: file.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        max_position_embeddings: file.max_position_embeddings.unwrap_or(2048),
        tie_word_embeddings: file.tie_word_embeddings.unwrap_or(false),
        attention_bias: file.attention_bias.unwrap_or(false),
        mlp_bias: file.mlp_bias.unwrap_or(false),
        initializer_range: file.initializer_range.unwrap_or(0.02),
        bos_token_id: file.bos_token_id.as_ref().and_then(TokenIds::first),
        eos_token_id: file.eos_token_id.as_ref().and_then(TokenIds::first),
        norm: file.norm.unwrap_or_default(),
        norm_position: file.norm_position.unwrap_or_default(),
        activation,
        position: file.position.unwrap_or_default(),
        dropout: file.dropout.unwrap_or(0.0),
    };
    cfg.validate_in(path)?;
    Ok(cfg)
}

/// The `config.json` text for `cfg` with weights stored as `dtype`.
pub fn config_json(cfg: &ModelConfig, dtype: DType) -> String {
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    };
    let hidden_act = match cfg.activation {
        Activation::Swiglu | Activation::Silu => "silu",
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
    };
    let mut map = Map::new();
    let mut put = |key: &str, value: Value| {
        map.insert(key.to_string(), value);
    };
    put("architectures", json!(["LlamaForCausalLM"]));
    put("model_type", json!("llama"));
    put("vocab_size", json!(cfg.vocab_size));
    put("hidden_size", json!(cfg.hidden_size));
    put("intermediate_size", json!(cfg.intermediate_size));
    put("num_hidden_layers", json!(cfg.num_hidden_layers));
    put("num_attention_heads", json!(cfg.num_attention_heads));
    put("num_key_value_heads", json!(cfg.kv_heads()));
    put("head_dim", json!(cfg.head_size()));
    put("hidden_act", json!(hidden_act));
    put("rms_norm_eps", json!(cfg.rms_norm_eps));
    // Both spellings, so transformers 4 and 5 read the same theta.
    put("rope_theta", json!(cfg.rope_theta));
    put(
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": cfg.rope_theta}),
    );
    put(
        "max_position_embeddings",
        json!(cfg.max_position_embeddings),
    );
    put("tie_word_embeddings", json!(cfg.tie_word_embeddings));
    put("attention_bias", json!(cfg.attention_bias));
    put("attention_dropout", json!(0.0));
    put("mlp_bias", json!(cfg.mlp_bias));
    put("initializer_range", json!(cfg.initializer_range));
    put("pretraining_tp", json!(1));
    put("use_cache", json!(true));
    put("bos_token_id", json!(cfg.bos_token_id));
    put("eos_token_id", json!(cfg.eos_token_id));
    put("dtype", json!(dtype_name));
    put("torch_dtype", json!(dtype_name));
    // Our extensions, only where the model is not a Llama.
    let llama = ModelConfig::default();
    if cfg.norm != llama.norm {
        put("norm", json!(cfg.norm));
    }
    if cfg.norm_position != llama.norm_position {
        put("norm_position", json!(cfg.norm_position));
    }
    if cfg.activation != llama.activation {
        put("activation", json!(cfg.activation));
    }
    if cfg.position != llama.position {
        put("position", json!(cfg.position));
    }
    if cfg.dropout != llama.dropout {
        put("dropout", json!(cfg.dropout));
    }
    let mut text =
        serde_json::to_string_pretty(&Value::Object(map)).expect("a JSON map always serializes");
    text.push('\n');
    text
}

/// Checks a checkpoint's tensors against the names and shapes `cfg` implies.
pub(crate) fn check_tensors(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let expected = tensor_shapes(cfg);
    for (name, shape) in &expected {
        let Some(tensor) = tensors.get(name) else {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` (shape {shape:?}) is missing; does config.json \
                 (layers, bias flags, tie_word_embeddings, position) match this checkpoint?",
                path.display()
            )));
        };
        if tensor.dims() != shape.as_slice() {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` has shape {:?} but the config needs {shape:?}; \
                 does config.json match this checkpoint?",
                path.display(),
                tensor.dims()
            )));
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
    for name in tensors.keys() {
        // Old transformers saved RoPE frequencies as buffers, and some tied checkpoints
        // still carry a copy of the embedding as `lm_head.weight`: neither is a parameter.
        let harmless = name.ends_with("rotary_emb.inv_freq")
            || (cfg.tie_word_embeddings && name == "lm_head.weight");
        if !known.contains(name.as_str()) && !harmless {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` is not part of the model config.json describes; \
                 does config.json match this checkpoint?",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The shard files a sharded checkpoint's index (`model.safetensors.index.json`) names
/// in its `weight_map`, each once, in the order first named.
pub fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", index_path.display())))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::Invalid(format!(
            "{}: no `weight_map` object",
            index_path.display()
        )));
    };
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: `weight_map` entry `{name}` is not a file name",
                index_path.display()
            ))
        })?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    Ok(files)
}

/// Loads a model directory (`config.json`, and `model.safetensors` or the shards that
/// `model.safetensors.index.json` names) onto `device` as `dtype`.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Transformer> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let cfg = parse_config(&text, &config_path)?;
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(SHARD_INDEX_FILE);
    let files = match (single.is_file(), index.is_file()) {
        (false, true) => shard_files(&index)?.iter().map(|f| dir.join(f)).collect(),
        _ => vec![single],
    };
    let mut tensors = HashMap::new();
    for weights_path in &files {
        // Mapped, not read: the tensors are copied out of the file's pages once,
        // without a second whole-file copy in between.
        let file = std::fs::File::open(weights_path).map_err(|e| Error::io(weights_path, e))?;
        // SAFETY: the map is read while this loop holds it; a file rewritten meanwhile
        // by another process could change what is read, as with any reader.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(weights_path, e))?;
        let shard = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::Tensor(format!("{}: {e}", weights_path.display())))?;
        tensors.extend(shard);
    }
    let weights_path = match files.len() {
        1 => files[0].clone(),
        _ => index,
    };
    check_tensors(&cfg, &tensors, &weights_path)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    Transformer::load(vb, &cfg)
}

/// Writes `model`'s `config.json` and `model.safetensors` into `dir` (created if
/// needed), each atomically; the weights go first, so a config never describes
/// weights that are not there.
pub fn save(model: &Transformer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    // Host copies: safetensors serializes from CPU memory.
    let tensors = model
        .named_tensors()
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    // transformers refuses safetensors files without `format: pt` metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Tensor(format!("{}: {e}", weights_path.display())))?;
    write_atomic(&weights_path, &bytes)?;
    let config_path = dir.join(CONFIG_FILE);
    write_atomic(
        &config_path,
        config_json(model.config(), model.dtype()).as_bytes(),
    )
}

impl Transformer {
    /// Loads a Hugging Face model directory; see [`load`].
    pub fn from_pretrained(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        load(dir, device, dtype)
    }

    /// Saves as a Hugging Face model directory; see [`save`].
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        save(self, dir)
    }
}
