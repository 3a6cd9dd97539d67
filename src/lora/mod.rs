//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
//! fine-tune a frozen model through low-rank updates `W' = W + (alpha / r) B A` of its
//! projections, file-compatible with Hugging Face PEFT.
//!
//! `config` is the adapter's hyper-parameters and PEFT's `adapter_config.json`;
//! `adapter` its tensors, PEFT's `adapter_model.safetensors`, attaching to a model and
//! merging; `train` the fine-tuning loop (adapters only, or every weight for
//! comparison). Applying an adapter inside a forward pass is the model's business
//! (`crate::model::adapter`); this module decides which adapters go where.

pub mod adapter;
pub mod config;
pub mod train;

pub use adapter::{merge, select_modules, Adapter, LoraPair, ADAPTER_WEIGHTS_FILE};
pub use config::{LoraConfig, ADAPTER_CONFIG_FILE};
pub use train::{FineTuneSetup, FineTuneSummary, Mode};

/// Peak resident memory of this process in bytes (`VmHWM` in Linux's
/// `/proc/self/status`), if the platform reports it.
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
