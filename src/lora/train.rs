//! Fine-tuning a pretrained model: only LoRA adapters (the base frozen), or every
//! weight (`Mode::Full`, for comparison), with the training loop's parts from
//! `crate::train`: seeded batches, AdamW with the lr schedule and clipping, periodic
//! validation, `metrics.jsonl` and `loss.svg`, atomic checkpoints that resume exactly,
//! Ctrl-C handling.
//!
//! The frozen base costs only its weights and activations: its tensors are not
//! variables, so no gradient or optimiser state exists for them (and its projections
//! skip their weight gradients, see `crate::model::adapter`). The output folder is an
//! adapter directory (PEFT layout) or, with `Mode::Full`, a model directory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;

use super::adapter::Adapter;
use super::config::LoraConfig;
use crate::fsutil::write_atomic;
use crate::model::{param_count, Transformer};
use crate::rng::SplitMix64;
use crate::train::batches::{derive_seed, sample_batch};
use crate::train::checkpoint::{self, CheckpointState, CHECKPOINT_FILE};
use crate::train::metrics::{self, MetricsLog, StepRecord, METRICS_FILE};
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::schedule::{LrSchedule, Schedule};
use crate::train::token_file::{self, TokenDtype, TokenFile};
use crate::train::step::{apply_update, micro_batches, MicroBatches, StepContext};
use crate::train::trainer::cross_entropy;
use crate::train::{interrupt, StepReport, TrainSection};
use crate::{Error, Result};

// Stream labels for `derive_seed`, apart from `nlp train`'s.
const INIT_STREAM: u64 = 0x10_0001;
const BATCH_STREAM: u64 = 0x10_0002;
const EVAL_STREAM: u64 = 0x10_0003;
const DROPOUT_STREAM: u64 = 0x10_0004;

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// New LoRA adapters on the frozen base.
    Lora(LoraConfig),
    /// Every weight of the base (full fine-tuning).
    Full,
}

/// Everything a fine-tuning run needs besides the base model and the tokens.
#[derive(Debug, Clone)]
pub struct FineTuneSetup {
    /// What to train.
    pub mode: Mode,
    /// Steps, batches, optimiser and schedule (`[train]`; its tokenizer keys are unused:
    /// the base model's tokenizer encodes the corpus).
    pub train: TrainSection,
    /// Seed of every random source.
    pub seed: u64,
    /// The resolved configuration as TOML, saved as `train.toml`.
    pub config_toml: String,
}

/// What a finished (or interrupted) fine-tuning run did.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuneSummary {
    /// Steps done in total.
    pub steps: u64,
    /// The step this invocation resumed from.
    pub resumed_from: Option<u64>,
    /// Whether Ctrl-C or the callback ended the run early.
    pub interrupted: bool,
    /// Validation loss of the base model before any update (of this invocation's start).
    pub initial_val_loss: f32,
    /// The last step's training loss.
    pub final_train_loss: Option<f32>,
    /// The last evaluation's validation loss.
    pub final_val_loss: Option<f32>,
    /// Trained parameters.
    pub trainable: usize,
    /// Parameters of the base model.
    pub base_params: usize,
    /// Mean seconds per optimiser step in this invocation (evaluation excluded).
    pub seconds_per_step: f64,
    /// Training tokens per second in this invocation.
    pub tokens_per_s: f64,
    /// Training and validation tokens.
    pub split_tokens: (usize, usize),
}

/// Writes the token files once (`data/{train,val}.bin`), or reopens them on resume.
fn prepare_tokens(
    ids: Option<&[u32]>,
    train: &TrainSection,
    vocab_size: usize,
    out_dir: &Path,
) -> Result<(TokenFile, TokenFile)> {
    let data_dir = out_dir.join("data");
    let (train_path, val_path) = (data_dir.join("train.bin"), data_dir.join("val.bin"));
    let Some(ids) = ids else {
        return Ok((TokenFile::open(&train_path)?, TokenFile::open(&val_path)?));
    };
    let (train_ids, val_ids) = token_file::split(ids, train.val_fraction);
    let need = train.seq_len as usize + 2;
    if train_ids.len() < need || val_ids.len() < need {
        return Err(Error::Invalid(format!(
            "{} tokens split into {} training and {} validation tokens, but each part needs at \
             least seq_len + 2 = {need}; use a larger corpus or a smaller train.seq_len",
            ids.len(),
            train_ids.len(),
            val_ids.len()
        )));
    }
    let dtype = TokenDtype::choose(&train.token_dtype, vocab_size)?;
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
    token_file::write_token_file(&train_path, train_ids, dtype)?;
    token_file::write_token_file(&val_path, val_ids, dtype)?;
    Ok((TokenFile::open(&train_path)?, TokenFile::open(&val_path)?))
}

/// Validation loss over `eval_steps` batches fixed by the seed.
fn evaluate(model: &Transformer, data: &TokenFile, train: &TrainSection, seed: u64) -> Result<f32> {
    let mut rng = SplitMix64::new(derive_seed(seed, EVAL_STREAM));
    let model = model.detached()?;
    let mut total = 0.0f64;
    for _ in 0..train.eval_steps {
        let batch = sample_batch(
            data,
            train.batch_size as usize,
            train.seq_len as usize,
            &mut rng,
            model.device(),
        )?;
        let logits = model.forward(&batch.inputs)?.detach();
        total += cross_entropy(&logits, &batch.targets)?.to_scalar::<f32>()? as f64;
    }
    Ok((total / train.eval_steps.max(1) as f64) as f32)
}

/// The base's weights as variables, for full fine-tuning: a model built on a `VarMap`
/// whose variables take the base's values.
fn as_variables(base: &Transformer, device: &Device) -> Result<(Transformer, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    let model = Transformer::load(
        VarBuilder::from_varmap(&varmap, DType::F32, device),
        base.config(),
    )?;
    let values: HashMap<String, Tensor> = base.named_tensors().into_iter().collect();
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Tensor("the VarMap lock is poisoned".into()))?;
    let mut vars = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let value = values
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("the base model has no tensor `{name}`")))?;
        var.set(&value.to_dtype(DType::F32)?)?;
        vars.push((name.clone(), var.clone()));
    }
    Ok((model, vars))
}

/// Fine-tunes `base` on `ids` (the corpus encoded with the base's tokenizer; `None` when
/// resuming, which reuses the token files) into `out_dir`, calling `on_progress` after
/// every step; the callback may stop the run (a checkpoint is written, as on Ctrl-C).
/// `base_dir` is recorded in `adapter_config.json`.
pub fn run(
    setup: &FineTuneSetup,
    base: Transformer,
    ids: Option<&[u32]>,
    out_dir: &Path,
    resume: bool,
    on_progress: &mut dyn FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<FineTuneSummary> {
    let train = &setup.train;
    train.validate().map_err(|(key, message)| Error::Config {
        path: PathBuf::from("configuration"),
        key,
        message,
    })?;
    let max_positions = base.config().max_position_embeddings;
    if train.seq_len as usize > max_positions {
        return Err(Error::Invalid(format!(
            "train.seq_len = {} exceeds the base model's max_position_embeddings = \
             {max_positions}; lower train.seq_len",
            train.seq_len
        )));
    }
    let device = base.device().clone();
    let checkpoint_path = out_dir.join(CHECKPOINT_FILE);
    match (resume, checkpoint_path.exists()) {
        (true, false) => {
            return Err(Error::Invalid(format!(
                "{}: no checkpoint to resume from; start without --resume",
                checkpoint_path.display()
            )))
        }
        (false, true) => {
            return Err(Error::Invalid(format!(
                "{} already holds a fine-tuning run; pass --resume to continue it, or choose \
                 another output folder",
                out_dir.display()
            )))
        }
        _ => {}
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let base_params = param_count(base.config());
    let cfg = base.config().clone();
    let (train_data, val_data) = prepare_tokens(ids, train, cfg.vocab_size, out_dir)?;

    // The model that trains, and its variables.
    let (model, vars, adapter) = match &setup.mode {
        Mode::Lora(lora) => {
            let mut model = base;
            let (adapter, vars) =
                Adapter::init(lora, &mut model, derive_seed(setup.seed, INIT_STREAM))?;
            adapter.attach(&mut model, 1.0, out_dir)?;
            (model, vars, Some(adapter))
        }
        Mode::Full => {
            let (model, vars) = as_variables(&base, &device)?;
            drop(base);
            (model, vars, None)
        }
    };
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let expected_shapes: Vec<(String, Vec<usize>)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let adamw = AdamWConfig {
        beta1: train.beta1,
        beta2: train.beta2,
        eps: train.eps,
        weight_decay: train.weight_decay,
    };
    let mut optimizer = AdamW::new(vars, adamw, train.decay_embeddings)?;
    let vars: Vec<(String, Var)> = optimizer
        .vars()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let schedule = LrSchedule {
        schedule: match train.schedule.as_str() {
            "constant" => Schedule::Constant,
            "wsd" => Schedule::WarmupStableDecay {
                decay_fraction: train.decay_fraction,
            },
            _ => Schedule::Cosine,
        },
        lr: train.lr,
        min_lr: train.min_lr,
        warmup_steps: train.warmup_steps,
        total_steps: train.steps,
    };
    let mut state = CheckpointState {
        step: 0,
        batch_rng: derive_seed(setup.seed, BATCH_STREAM),
        tokens_seen: 0,
        best_val_loss: None,
        seconds: 0.0,
        seed: setup.seed,
        model: cfg.resolved(),
    };
    let resumed_from = match resume {
        true => {
            state = checkpoint::load_with_shapes(
                &checkpoint_path,
                &mut optimizer,
                &cfg.resolved(),
                &expected_shapes,
            )?;
            Some(state.step)
        }
        false => None,
    };
    write_atomic(
        &out_dir.join(crate::train::trainer::CONFIG_TOML_FILE),
        setup.config_toml.as_bytes(),
    )?;
    let mut log = MetricsLog::open(&out_dir.join(METRICS_FILE), resumed_from)?;
    let mut batch_rng = SplitMix64::new(state.batch_rng);
    let save_all =
        |optimizer: &AdamW, state: &CheckpointState, log: &mut MetricsLog| -> Result<()> {
            log.flush()?;
            checkpoint::save(&checkpoint_path, optimizer, state)?;
            match &adapter {
                Some(adapter) => adapter.save(out_dir),
                None => model.save_pretrained(out_dir),
            }
        };

    let initial_val_loss = evaluate(&model, &val_data, train, setup.seed)?;
    if resumed_from.is_none() {
        log.write(&json!({"step": 0, "val_loss": initial_val_loss}))?;
    }
    let (batch_size, seq_len) = (train.batch_size as usize, train.seq_len as usize);
    let tokens_per_step = (batch_size * seq_len) as u64 * train.grad_accum;
    let mut interval = (Instant::now(), 0u64);
    let (mut train_seconds, mut steps_this_run) = (0.0f64, 0u64);
    let (mut last_train_loss, mut last_val_loss) = (None, None);
    let mut interrupted = false;
    while state.step < train.steps {
        if interrupt::requested() {
            interrupted = true;
            break;
        }
        let step_started = Instant::now();
        let lr = schedule.at(state.step);
        let ctx = StepContext {
            train,
            data: &train_data,
            vars: &vars,
            device: &device,
            seed: setup.seed,
            dropout_stream: DROPOUT_STREAM,
            backprop: None,
        };
        let step_model = || Ok(Cow::Borrowed(&model));
        let (train_loss, grads) = match micro_batches(step_model, &ctx, state.step, &mut batch_rng)? {
            MicroBatches::Done { loss, grads } => (loss, grads),
            MicroBatches::Diverged(loss_value) => {
                log.flush()?;
                return Err(Error::Invalid(format!(
                    "the training loss became {loss_value} at step {}: fine-tuning diverged; \
                     lower train.lr or set train.grad_clip",
                    state.step + 1
                )));
            }
        };
        let grad_norm = apply_update(&mut optimizer, &grads, lr, train.grad_clip)?;
        drop(grads);
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        steps_this_run += 1;
        interval.1 += tokens_per_step;
        train_seconds += step_started.elapsed().as_secs_f64();
        last_train_loss = Some(train_loss);

        let last = state.step == train.steps;
        let is_eval = last || (train.eval_every > 0 && state.step.is_multiple_of(train.eval_every));
        let is_log = is_eval || state.step.is_multiple_of(train.log_every.max(1));
        let tokens_per_s = interval.1 as f64 / interval.0.elapsed().as_secs_f64().max(1e-9);
        let val_loss = match is_eval {
            true => {
                let val = evaluate(&model, &val_data, train, setup.seed)?;
                state.best_val_loss = Some(state.best_val_loss.map_or(val, |b| b.min(val)));
                last_val_loss = Some(val);
                Some(val)
            }
            false => None,
        };
        if is_log {
            log.write_step(&StepRecord {
                step: state.step,
                lr,
                train_loss,
                tokens_per_s,
                grad_norm,
                tokens: state.tokens_seen,
                val_loss,
            })?;
            interval = (Instant::now(), 0);
        }
        let control = on_progress(&StepReport {
            step: state.step,
            steps: train.steps,
            lr,
            train_loss,
            val_loss,
            grad_norm,
            tokens_per_s,
        });
        state.batch_rng = batch_rng.state;
        state.seconds += step_started.elapsed().as_secs_f64();
        if control.is_break() && !last {
            interrupted = true;
            break;
        }
        if !last && train.checkpoint_every > 0 && state.step.is_multiple_of(train.checkpoint_every) {
            save_all(&optimizer, &state, &mut log)?;
        }
    }
    state.batch_rng = batch_rng.state;
    save_all(&optimizer, &state, &mut log)?;
    metrics::write_plot(out_dir)?;
    Ok(FineTuneSummary {
        steps: state.step,
        resumed_from,
        interrupted,
        initial_val_loss,
        final_train_loss: last_train_loss,
        final_val_loss: last_val_loss,
        trainable,
        base_params,
        seconds_per_step: train_seconds / steps_this_run.max(1) as f64,
        tokens_per_s: (steps_this_run * tokens_per_step) as f64 / train_seconds.max(1e-9),
        split_tokens: (train_data.len(), val_data.len()),
    })
}
