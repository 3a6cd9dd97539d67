//! An adapter's tensors and PEFT's `adapter_model.safetensors`.
//!
//! Each adapted module `m` (a Hugging Face name such as `model.layers.0.self_attn.q_proj`)
//! has `A` (r, in) and `B` (out, r), stored as
//! `base_model.model.{m}.lora_A.weight` and `base_model.model.{m}.lora_B.weight`, the
//! names PEFT's `save_pretrained` writes for a causal LM. A fresh adapter follows Hu et
//! al. 2021 (and PEFT's default): `A` uniform in `±1/sqrt(in)` (Kaiming-uniform with
//! `a = sqrt(5)`), `B = 0`, so training starts from the base model's outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{matches, LoraConfig, ADAPTER_CONFIG_FILE, PROJECTIONS};
use crate::fsutil::write_atomic;
use crate::model::{LoraBranch, Transformer};
use crate::rng::SplitMix64;
use crate::train::batches::derive_seed;
use crate::{Error, Result};

/// File name of the adapter's weights inside an adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

const PREFIX: &str = "base_model.model.";

/// The (A, B) pair of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
}

/// A LoRA adapter: its configuration and one (A, B) pair per adapted module.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Rank, scaling, dropout and targets.
    pub config: LoraConfig,
    /// By module name, in name order.
    pub pairs: BTreeMap<String, LoraPair>,
}

/// The safetensors key of module `module`'s `lora_A` or `lora_B`.
pub fn tensor_key(module: &str, which: char) -> String {
    format!("{PREFIX}{module}.lora_{which}.weight")
}

/// The module names of `model`'s projections that `targets` select, in model order;
/// a target that selects nothing is an error listing the names that exist.
pub fn select_modules(model: &mut Transformer, targets: &[String]) -> Result<Vec<String>> {
    let names: Vec<String> = model
        .projections_mut()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for target in targets {
        if !names.iter().any(|name| matches(name, target)) {
            let present: Vec<&str> = PROJECTIONS
                .iter()
                .copied()
                .filter(|p| names.iter().any(|n| matches(n, p)))
                .collect();
            return Err(Error::Invalid(format!(
                "--target `{target}` matches no module of the base model; its linear modules \
                 are {} (or all-linear)",
                present.join(", ")
            )));
        }
    }
    Ok(names
        .into_iter()
        .filter(|name| targets.iter().any(|t| matches(name, t)))
        .collect())
}

impl Adapter {
    /// A fresh adapter for `model` as trainable variables: `A` Kaiming-uniform from
    /// `seed` and the module's name, `B` zero. Returns the variables by safetensors key.
    pub fn init(
        config: &LoraConfig,
        model: &mut Transformer,
        seed: u64,
    ) -> Result<(Adapter, Vec<(String, Var)>)> {
        config.validate()?;
        let modules = select_modules(model, &config.targets)?;
        let device = model.device().clone();
        let mut pairs = BTreeMap::new();
        let mut vars = Vec::new();
        for (name, projection) in model.projections_mut() {
            if !modules.contains(&name) {
                continue;
            }
            let (out_dim, in_dim) = projection.weight().dims2()?;
            let bound = 1.0 / (in_dim as f64).sqrt();
            let mut rng = SplitMix64::new(derive_seed(seed, fnv1a(&name)));
            let values: Vec<f32> = (0..config.r * in_dim)
                .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(values, (config.r, in_dim), &device)?)?;
            let b = Var::zeros((out_dim, config.r), DType::F32, &device)?;
            vars.push((tensor_key(&name, 'A'), a.clone()));
            vars.push((tensor_key(&name, 'B'), b.clone()));
            pairs.insert(
                name,
                LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
        }
        Ok((
            Adapter {
                config: config.clone(),
                pairs,
            },
            vars,
        ))
    }

    /// Reads an adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Adapter> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = LoraConfig::from_json(&text, &config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::Tensor(format!("{}: {e}", weights_path.display())))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in tensors {
            let parsed = key.strip_prefix(PREFIX).and_then(|rest| {
                rest.strip_suffix(".lora_A.weight")
                    .map(|m| (m, 'A'))
                    .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))
            });
            let Some((module, which)) = parsed else {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{key}` is not a LoRA weight (expected \
                     `base_model.model.<module>.lora_A.weight` or `.lora_B.weight`)",
                    weights_path.display()
                )));
            };
            let slot = halves.entry(module.to_string()).or_default();
            let tensor = tensor.to_dtype(DType::F32)?;
            match which {
                'A' => slot.0 = Some(tensor),
                _ => slot.1 = Some(tensor),
            }
        }
        let mut pairs = BTreeMap::new();
        for (module, halves) in halves {
            let (Some(a), Some(b)) = halves else {
                return Err(Error::Invalid(format!(
                    "{}: module `{module}` has only one of lora_A and lora_B",
                    weights_path.display()
                )));
            };
            pairs.insert(module, LoraPair { a, b });
        }
        if pairs.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: the file holds no LoRA weights",
                weights_path.display()
            )));
        }
        Ok(Adapter { config, pairs })
    }

    /// Writes `adapter_model.safetensors` then `adapter_config.json` into `dir`, each
    /// atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::with_capacity(2 * self.pairs.len());
        for (module, pair) in &self.pairs {
            for (which, tensor) in [('A', &pair.a), ('B', &pair.b)] {
                let host = tensor.to_device(&Device::Cpu)?.contiguous()?.copy()?;
                tensors.push((tensor_key(module, which), host));
            }
        }
        // PEFT (through safetensors' torch loader) wants `format: pt`.
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| Error::Tensor(format!("{}: {e}", path.display())))?;
        write_atomic(&path, &bytes)?;
        write_atomic(
            &dir.join(ADAPTER_CONFIG_FILE),
            self.config.to_json().as_bytes(),
        )
    }

    /// Number of adapter parameters.
    pub fn param_count(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// Attaches the adapter to `model` (unmerged) with its update scaled by `weight`,
    /// after checking every tensor's shape against the module it adapts. `source` names
    /// the adapter in errors.
    pub fn attach(&self, model: &mut Transformer, weight: f64, source: &Path) -> Result<()> {
        let dtype = model.dtype();
        let scale = self.config.scale() * weight;
        let r = self.config.r;
        let mut projections: HashMap<String, _> = model.projections_mut().into_iter().collect();
        let file = source.join(ADAPTER_WEIGHTS_FILE);
        for (module, pair) in &self.pairs {
            let Some(projection) = projections.get_mut(module) else {
                let mut names: Vec<&String> = projections.keys().collect();
                names.sort();
                return Err(Error::Invalid(format!(
                    "{}: tensor `{}` adapts module `{module}`, which the base model does not \
                     have (it has {} linear modules, e.g. `{}`); was this adapter made for \
                     another base model?",
                    file.display(),
                    tensor_key(module, 'A'),
                    names.len(),
                    names.first().map_or("", |n| n.as_str())
                )));
            };
            let (out_dim, in_dim) = projection.weight().dims2()?;
            for (which, tensor, need) in [
                ('A', &pair.a, [r, in_dim]),
                ('B', &pair.b, [out_dim, r]),
            ] {
                if tensor.dims() != need.as_slice() {
                    return Err(Error::Invalid(format!(
                        "{}: tensor `{}` has shape {:?} but the base model (with r = {r}) needs \
                         {need:?}; was this adapter made for another base model?",
                        file.display(),
                        tensor_key(module, which),
                        tensor.dims()
                    )));
                }
            }
            projection.push_adapter(LoraBranch {
                a: pair.a.to_dtype(dtype)?,
                b: pair.b.to_dtype(dtype)?,
                scale,
                dropout: self.config.dropout,
            });
        }
        Ok(())
    }
}

/// FNV-1a of a module name: each module gets its own initialisation stream.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Folds every attached adapter into `model`'s weights in f32 (see
/// [`crate::model::Projection::merge`]).
pub fn merge(model: &mut Transformer) -> Result<()> {
    for (_, projection) in model.projections_mut() {
        projection.merge()?;
    }
    Ok(())
}
