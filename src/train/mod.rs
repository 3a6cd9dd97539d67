//! Training the transformer of `crate::model` on a corpus: token files, batches, AdamW
//! (Loshchilov & Hutter 2019), learning-rate schedules (linear warm-up, then cosine decay
//! as in Loshchilov & Hutter 2017 / nanoGPT, constant, or warm-up-stable-decay),
//! gradient clipping and accumulation, evaluation, metrics, and atomic checkpoints that
//! resume exactly.
//!
//! One file per concern: `config` (the `[model]` and `[train]` sections), `vocab` (char,
//! byte or file tokenizers), `token_file` (memory-mapped u16/u32 ids with a header),
//! `batches` (seeded random windows), `schedule` (lr as a pure function of the step),
//! `optimizer` (AdamW, global-norm clipping), `checkpoint`, `metrics` (`metrics.jsonl`
//! and the loss curve), `interrupt` (Ctrl-C), `trainer` (the loop). This is not the
//! CLI: `cmd/train.rs` resolves the corpus and the device and draws the progress bar.

// `u64::is_multiple_of` is newer than our rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod interrupt;
pub mod metrics;
pub mod optimizer;
pub mod schedule;
pub(crate) mod step;
pub mod token_file;
pub mod trainer;
pub mod vocab;

#[cfg(test)]
mod tests;

pub use config::{ModelSection, Precision, TrainSection, TrainSetup};
pub use trainer::{run, run_with_control, StepReport, TrainSummary};
