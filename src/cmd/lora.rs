//! `nlp lora train|merge`: parse the flags, open the base model, encode the corpus with
//! its tokenizer, and hand over to `crate::lora`.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use candle_core::{Tensor, D};
use serde_json::json;

use super::loaded::{AdapterSpec, Loaded};
use super::Context;
use crate::data;
use crate::lora::{self, FineTuneSetup, LoraConfig, Mode};
use crate::model::{param_count, Transformer};
use crate::train::{interrupt, StepReport};

/// `nlp lora ...`
#[derive(Debug, clap::Subcommand)]
pub enum LoraCommand {
    /// Fine-tune a model directory with LoRA adapters (the base stays frozen), or every
    /// weight with --full, using the training loop of `nlp train` (the `[train]`
    /// section: steps, lr, batches, validation split, checkpoints).
    ///
    /// Example: `nlp lora train --base runs/shakespeare --data ptb-train.txt -o ptb-lora
    /// --rank 8 --alpha 16 --target q_proj,v_proj --steps 300`
    Train(LoraTrainArgs),
    /// Fold adapters into the base weights (summed in f64, stored in f32) and write an ordinary model directory;
    /// reports the largest logit difference between the merged and unmerged model.
    ///
    /// Example: `nlp lora merge --base runs/shakespeare --adapter ptb-lora -o ptb-merged`
    Merge(LoraMergeArgs),
}

/// `nlp lora train`
#[derive(Debug, clap::Args)]
pub struct LoraTrainArgs {
    /// The base model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "MODEL_DIR")]
    pub base: PathBuf,

    /// Training text: a path or a known corpus name (default: the config's data.corpus).
    /// Its last train.val_fraction is held out for validation.
    #[arg(long, value_name = "CORPUS")]
    pub data: Option<String>,

    /// Output folder: an adapter directory in PEFT's layout (adapter_config.json,
    /// adapter_model.safetensors) plus train.toml, metrics.jsonl, loss.svg and
    /// checkpoint.safetensors; with --full, a model directory instead.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,

    /// The rank r of each update B A.
    #[arg(long, default_value_t = 8, value_name = "R")]
    pub rank: usize,

    /// lora_alpha: updates are scaled by alpha / r (alpha / sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0, value_name = "ALPHA")]
    pub alpha: f64,

    /// Dropout on the adapters' inputs while training.
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    pub dropout: f64,

    /// Modules to adapt, comma-separated: q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj (or a longer suffix such as self_attn.q_proj), or all-linear.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj",
        value_name = "MODULES"
    )]
    pub target: Vec<String>,

    /// Rank-stabilised LoRA: scale by alpha / sqrt(r) (Kalajdzievski 2023).
    #[arg(long)]
    pub rslora: bool,

    /// Train every weight of the base instead of adapters (full fine-tuning, for
    /// comparison); the output is then a model directory.
    #[arg(long, conflicts_with_all = ["rslora"])]
    pub full: bool,

    /// Continue the run in the output folder from its checkpoint (same flags and config).
    #[arg(long)]
    pub resume: bool,

    /// Optimiser steps (sets train.steps).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,

    /// Peak learning rate (sets train.lr).
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
}

impl LoraTrainArgs {
    /// Configuration overrides implied by the flags, applied after `--set`.
    pub fn config_overrides(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(data) = &self.data {
            sets.push(format!(
                "data.corpus={}",
                toml::Value::String(data.clone())
            ));
        }
        if let Some(steps) = self.steps {
            sets.push(format!("train.steps={steps}"));
        }
        if let Some(lr) = self.lr {
            sets.push(format!("train.lr={lr:?}"));
        }
        sets
    }
}

/// `nlp lora merge`
#[derive(Debug, clap::Args)]
pub struct LoraMergeArgs {
    /// The base model directory.
    #[arg(long, value_name = "MODEL_DIR")]
    pub base: PathBuf,

    /// An adapter directory, optionally with a weight on its update (`DIR:0.5`).
    /// Repeatable: the updates add up.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]", required = true)]
    pub adapters: Vec<AdapterSpec>,

    /// The merged model directory to write.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
}

/// Runs `nlp lora ...`.
pub fn run(ctx: &Context, command: LoraCommand) -> Result<()> {
    match command {
        LoraCommand::Train(args) => train(ctx, args),
        LoraCommand::Merge(args) => merge(ctx, args),
    }
}

/// Opens a transformer model directory, with its tokenizer.json path.
fn open_base(path: &Path, ctx: &Context, adapters: &[AdapterSpec]) -> Result<Loaded> {
    let loaded = Loaded::open_with_adapters(path, ctx, adapters)?;
    if !matches!(loaded, Loaded::Transformer { .. }) {
        bail!(
            "{}: --base must be a transformer model directory (config.json, \
             model.safetensors, tokenizer.json), not an n-gram model",
            path.display()
        );
    }
    Ok(loaded)
}

fn copy_tokenizer(base: &Path, out: &Path) -> Result<()> {
    let from = base.join("tokenizer.json");
    let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
    crate::fsutil::write_atomic(&out.join("tokenizer.json"), &bytes)?;
    Ok(())
}

fn train(ctx: &Context, args: LoraTrainArgs) -> Result<()> {
    let config = &ctx.config;
    let mode = match args.full {
        true => Mode::Full,
        false => {
            let lora = LoraConfig {
                r: args.rank,
                alpha: args.alpha,
                dropout: args.dropout,
                targets: args.target.clone(),
                rslora: args.rslora,
                base_model: args.base.display().to_string(),
            };
            lora.validate()?;
            Mode::Lora(lora)
        }
    };
    let base_dir = ctx.model_dir(&args.base)?;
    let mut loaded = open_base(&base_dir, ctx, &[])?;
    if let (Mode::Lora(lora), Loaded::Transformer { model, .. }) = (&mode, &mut loaded) {
        // Bad targets fail before the corpus is read.
        lora::select_modules(model, &lora.targets)?;
    }
    let ids = match args.resume {
        true => None,
        false => {
            let corpus = data::resolve(&config.data.corpus)?;
            let mut text = String::new();
            corpus
                .open()?
                .read_to_string(&mut text)
                .with_context(|| format!("reading {corpus}"))?;
            Some(loaded.encode(&text, &corpus.to_string())?)
        }
    };
    let Loaded::Transformer { model, .. } = loaded else {
        unreachable!("open_base returns transformers only");
    };
    let setup = FineTuneSetup {
        mode,
        train: config.train.clone(),
        seed: config.run.seed,
        config_toml: config.to_toml(),
    };
    if !interrupt::install() {
        tracing::debug!("no Ctrl-C handler on this platform");
    }
    let bar = crate::progress::count_bar("lora", ctx.quiet);
    bar.set_length(setup.train.steps);
    let mut on_progress = |report: &StepReport| {
        bar.set_position(report.step);
        let val = report
            .val_loss
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        bar.set_message(format!("loss {:.3}{val} lr {:.1e}", report.train_loss, report.lr));
        if let Some(val) = report.val_loss {
            bar.suspend(|| {
                tracing::info!(
                    "step {}: train loss {:.4}, val loss {val:.4}",
                    report.step,
                    report.train_loss
                )
            });
        }
        ControlFlow::Continue(())
    };
    let summary = lora::train::run(
        &setup,
        model,
        ids.as_deref(),
        &args.output,
        args.resume,
        &mut on_progress,
    )
    .with_context(|| format!("fine-tuning into {}", args.output.display()))?;
    bar.finish_and_clear();
    if args.full {
        copy_tokenizer(&base_dir, &args.output)?;
    }
    let peak = lora::peak_memory();
    // PEFT's convention: the share of all parameters (base + adapters) that train.
    let total = match args.full {
        true => summary.base_params,
        false => summary.base_params + summary.trainable,
    };
    let percent = 100.0 * summary.trainable as f64 / total as f64;
    let ppl = |loss: Option<f32>| loss.map(|l| (l as f64).exp());
    if ctx.json {
        ctx.print_json(&json!({
            "output": args.output,
            "mode": if args.full { "full" } else { "lora" },
            "steps": summary.steps,
            "resumed_from": summary.resumed_from,
            "interrupted": summary.interrupted,
            "trainable_parameters": summary.trainable,
            "total_parameters": total,
            "trainable_percent": percent,
            "peak_memory_bytes": peak,
            "seconds_per_step": summary.seconds_per_step,
            "tokens_per_s": summary.tokens_per_s,
            "initial_val_loss": summary.initial_val_loss,
            "initial_val_ppl": ppl(Some(summary.initial_val_loss)),
            "final_train_loss": summary.final_train_loss,
            "final_val_loss": summary.final_val_loss,
            "final_val_ppl": ppl(summary.final_val_loss),
            "train_tokens": summary.split_tokens.0,
            "val_tokens": summary.split_tokens.1,
        }))?;
    } else {
        println!(
            "trainable parameters: {} of {total} ({percent:.3}%)",
            summary.trainable
        );
        println!(
            "peak memory (VmHWM): {}",
            peak.map_or("unknown".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
        );
        println!(
            "{} steps, {:.4} s/step: validation loss {:.4} (ppl {:.2}) -> {} (ppl {})",
            summary.steps,
            summary.seconds_per_step,
            summary.initial_val_loss,
            (summary.initial_val_loss as f64).exp(),
            summary
                .final_val_loss
                .map_or("-".into(), |l| format!("{l:.4}")),
            ppl(summary.final_val_loss).map_or("-".into(), |p| format!("{p:.2}")),
        );
        let what = if args.full { "model" } else { "adapter" };
        println!("{what} directory: {}", args.output.display());
    }
    if summary.interrupted {
        tracing::warn!(
            "interrupted at step {}: checkpoint written; continue with --resume",
            summary.steps
        );
    }
    Ok(())
}

/// Logits of a fixed sample: token ids cycling through the vocabulary.
fn sample_logits(model: &Transformer) -> Result<Tensor> {
    let cfg = model.config();
    let t = cfg.max_position_embeddings.clamp(1, 64);
    let ids: Vec<u32> = (0..t)
        .map(|i| ((i * 7 + 3) % cfg.vocab_size) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (1, t), model.device())?;
    Ok(model.forward(&ids)?)
}

fn merge(ctx: &Context, args: LoraMergeArgs) -> Result<()> {
    let base_dir = ctx.model_dir(&args.base)?;
    let loaded = open_base(&base_dir, ctx, &args.adapters)?;
    let Loaded::Transformer { mut model, .. } = loaded else {
        unreachable!("open_base returns transformers only");
    };
    let unmerged = sample_logits(&model)?;
    lora::merge(&mut model)?;
    let merged = sample_logits(&model)?;
    let max_diff = (unmerged - merged)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?;
    model
        .save_pretrained(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    copy_tokenizer(&base_dir, &args.output)?;
    if ctx.json {
        ctx.print_json(&json!({
            "output": args.output,
            "adapters": args.adapters.iter().map(|a| json!({"dir": a.dir, "weight": a.weight})).collect::<Vec<_>>(),
            "parameters": param_count(model.config()),
            "max_abs_logit_diff": max_diff,
        }))?;
    } else {
        println!("largest |merged - unmerged| logit on a {}-token sample: {max_diff:.3e}", 
            model.config().max_position_embeddings.clamp(1, 64));
        println!("model directory: {}", args.output.display());
    }
    Ok(())
}
