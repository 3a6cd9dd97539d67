//! `nlp train`: resolve the corpus and the device, draw the progress bar, and hand the
//! `[model]` and `[train]` sections to `crate::train::run`.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::Context;
use crate::data;
use crate::train::{self, interrupt, StepReport, TrainSetup};

/// `nlp train`
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Training text: a path or a known corpus name (default: the config's data.corpus).
    pub corpus: Option<String>,

    /// Output folder; it becomes a model directory (config.json, model.safetensors,
    /// tokenizer.json, train.toml, metrics.jsonl, loss.svg) plus checkpoint.safetensors.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,

    /// Continue the run in the output folder from its checkpoint (give the same config).
    #[arg(long)]
    pub resume: bool,

    /// Optimiser steps (sets train.steps).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,

    /// "char", "byte" or a tokenizer.json (sets train.tokenizer).
    #[arg(long, value_name = "TOKENIZER")]
    pub tokenizer: Option<String>,
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

impl TrainArgs {
    /// Configuration overrides implied by the flags, applied after `--set`.
    pub fn config_overrides(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(corpus) = &self.corpus {
            sets.push(format!("data.corpus={}", toml_string(corpus)));
        }
        if let Some(steps) = self.steps {
            sets.push(format!("train.steps={steps}"));
        }
        if let Some(tokenizer) = &self.tokenizer {
            sets.push(format!("train.tokenizer={}", toml_string(tokenizer)));
        }
        sets
    }
}

/// Runs `nlp train`.
pub fn run(ctx: &Context, args: TrainArgs) -> Result<()> {
    let config = &ctx.config;
    let corpus = data::resolve(&config.data.corpus)?;
    let device = config.device()?.resolve()?;
    let setup = TrainSetup {
        model: config.model.clone(),
        train: config.train.clone(),
        seed: config.run.seed,
        corpus_name: corpus.to_string(),
        config_toml: config.to_toml(),
    };
    if !interrupt::install() {
        tracing::debug!(
            "no Ctrl-C handler on this platform: an interrupted run keeps its last checkpoint"
        );
    }
    tracing::info!(
        "training on {corpus} ({}) into {}{}",
        crate::device::describe(&device),
        args.output.display(),
        if args.resume { ", resuming" } else { "" }
    );
    let bar = crate::progress::count_bar("train", ctx.quiet);
    bar.set_length(setup.train.steps);
    let mut reader = corpus.open()?;
    let mut on_progress = |report: &StepReport| {
        bar.set_position(report.step);
        let val = report
            .val_loss
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.3}{val} lr {:.1e} {:.0} tok/s",
            report.train_loss, report.lr, report.tokens_per_s
        ));
        if let Some(val) = report.val_loss {
            bar.suspend(|| {
                tracing::info!(
                    "step {}: train loss {:.4}, val loss {val:.4}",
                    report.step,
                    report.train_loss
                )
            });
        }
    };
    let summary = train::run(
        &setup,
        &mut reader,
        &args.output,
        args.resume,
        &device,
        &mut on_progress,
    )
    .with_context(|| format!("training into {}", args.output.display()))?;
    bar.finish_and_clear();
    if ctx.json {
        ctx.print_json(&json!({
            "output": summary.out_dir,
            "steps": summary.steps,
            "resumed_from": summary.resumed_from,
            "interrupted": summary.interrupted,
            "final_train_loss": summary.final_train_loss,
            "final_val_loss": summary.final_val_loss,
            "best_val_loss": summary.best_val_loss,
            "tokens_per_s": summary.tokens_per_s,
            "tokens_seen": summary.tokens_seen,
            "seconds": summary.seconds,
            "parameters": summary.param_count,
            "memory_estimate_bytes": summary.memory.total(),
            "precision": summary.precision,
            "vocab_size": summary.vocab_size,
            "train_tokens": summary.split_tokens.0,
            "val_tokens": summary.split_tokens.1,
        }))?;
    } else {
        let loss = |l: Option<f32>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
        println!(
            "trained {} parameters for {} steps ({:.0} tokens/s, {:.1}s, {}): train loss {}, val loss {} (best {})",
            summary.param_count,
            summary.steps,
            summary.tokens_per_s,
            summary.seconds,
            summary.precision,
            loss(summary.final_train_loss),
            loss(summary.final_val_loss),
            loss(summary.best_val_loss),
        );
        println!("model directory: {}", summary.out_dir.display());
    }
    if summary.interrupted {
        // Not a success: scripts must not mistake a stopped run for a finished one.
        bail!(
            "interrupted at step {}: checkpoint written; continue with `nlp train --resume -o {}` and the same config",
            summary.steps,
            args.output.display()
        );
    }
    Ok(())
}
