//! The training loop: data preparation, then for each step `grad_accum` micro-batches of
//! forward, cross-entropy, backward; global-norm clipping; one AdamW update; periodic
//! evaluation, metrics and checkpoints.
//!
//! The step is lean on purpose: one `forward_train` and one `backward` per micro-batch,
//! the only host read is the loss (for logging and the NaN check), and the weights are
//! updated in place. Every random source derives from the run's seed: initialisation
//! from the seed and the tensor's name, batches from a generator whose state the
//! checkpoint keeps, dropout from the seed and the step, evaluation batches from the seed
//! alone (the same validation windows at every evaluation). So on the CPU the same
//! config gives the same losses, and a resumed run the losses of an uninterrupted one.
//!
//! With `precision = bf16-mixed` the weights and AdamW stay in f32. On a GPU each step
//! runs the model on a bf16 copy (`to_dtype` is differentiable, so the gradients arrive
//! in f32), as PyTorch's autocast does; on the CPU the hand-written pass multiplies
//! bf16-rounded operands with f32 sums in its products.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};

use super::batches::{derive_seed, sample_batch};
use super::checkpoint::{self, CheckpointState, CHECKPOINT_FILE};
use super::config::{Precision, TrainSection, TrainSetup};
use super::metrics::{self, MetricsLog, StepRecord, METRICS_FILE};
use super::optimizer::{AdamW, AdamWConfig};
use super::schedule::{LrSchedule, Schedule};
use super::step::{apply_update, micro_batches, MicroBatches, StepContext};
use super::token_file::{self, TokenDtype, TokenFile};
use super::{interrupt, vocab};
use crate::fsutil::write_atomic;
use crate::model::backprop::LlamaBackprop;
use crate::model::{has_bf16_kernel, Products};
use crate::model::{
    fused_cross_entropy, param_count, training_memory, ModelConfig, TrainingMemory, Transformer,
};
use crate::rng::SplitMix64;
use crate::tokenize::{AnyTokenizer, Tokenizer};
use crate::{Error, Result};

/// File name of the tokenizer inside the output folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the resolved configuration inside the output folder.
pub const CONFIG_TOML_FILE: &str = "train.toml";
/// Folder of the token files inside the output folder.
pub const DATA_DIR: &str = "data";

// Stream labels for `derive_seed`.
const INIT_STREAM: u64 = 1;
const BATCH_STREAM: u64 = 2;
const EVAL_STREAM: u64 = 3;
const DROPOUT_STREAM: u64 = 4;

/// What one step reports to the caller (progress bars, tests).
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: u64,
    /// Steps in the run.
    pub steps: u64,
    /// The learning rate used at this step.
    pub lr: f64,
    /// Mean loss of this step's micro-batches, in nats per token.
    pub train_loss: f32,
    /// Validation loss, at evaluation steps.
    pub val_loss: Option<f32>,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    /// Training throughput since the last logged step.
    pub tokens_per_s: f64,
}

/// What a finished (or interrupted) run did and where it put things.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps done in total.
    pub steps: u64,
    /// The step this invocation resumed from, if it resumed.
    pub resumed_from: Option<u64>,
    /// Whether Ctrl-C ended the run early (a checkpoint was written).
    pub interrupted: bool,
    /// The last step's training loss.
    pub final_train_loss: Option<f32>,
    /// The last evaluation's validation loss.
    pub final_val_loss: Option<f32>,
    /// The best validation loss of the run.
    pub best_val_loss: Option<f32>,
    /// Training tokens per second over this invocation (evaluation excluded).
    pub tokens_per_s: f64,
    /// Training tokens consumed in total.
    pub tokens_seen: u64,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
    /// Trained parameters.
    pub param_count: usize,
    /// The memory estimate checked before starting.
    pub memory: TrainingMemory,
    /// "f32" or "bf16-mixed".
    pub precision: &'static str,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Training and validation tokens.
    pub split_tokens: (usize, usize),
    /// The output folder: a model directory (`config.json`, `model.safetensors`,
    /// `tokenizer.json`, `train.toml`, `metrics.jsonl`, `loss.svg`, `checkpoint.safetensors`).
    pub out_dir: PathBuf,
}

fn config_error(key: &str, message: String) -> Error {
    Error::Config {
        path: PathBuf::from("configuration"),
        key: key.into(),
        message,
    }
}

/// The tokenizer and the memory-mapped train/validation token files of a run.
struct Data {
    tokenizer: AnyTokenizer,
    train: TokenFile,
    val: TokenFile,
}

/// Tokenizes the corpus once into `out_dir/data/{train,val}.bin` (kept when resuming).
fn prepare_data(
    setup: &TrainSetup,
    corpus: &mut dyn Read,
    out_dir: &Path,
    resume: bool,
) -> Result<Data> {
    let data_dir = out_dir.join(DATA_DIR);
    let (train_path, val_path) = (data_dir.join("train.bin"), data_dir.join("val.bin"));
    let tokenizer_path = out_dir.join(TOKENIZER_FILE);
    if resume && train_path.exists() && val_path.exists() && tokenizer_path.exists() {
        let tokenizer = crate::tokenize::load_json(&tokenizer_path)?;
        return Ok(Data {
            tokenizer,
            train: TokenFile::open(&train_path)?,
            val: TokenFile::open(&val_path)?,
        });
    }
    let mut bytes = Vec::new();
    corpus
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(&setup.corpus_name, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let tokenizer = vocab::resolve_tokenizer(&setup.train.tokenizer, &text)?;
    let dtype = TokenDtype::choose(&setup.train.token_dtype, tokenizer.vocab_size())?;
    let ids = match setup.train.tokenizer.as_str() {
        // Raw bytes, so invalid UTF-8 survives.
        "byte" => bytes.iter().map(|&b| b as u32).collect(),
        _ => tokenizer.encode_bytes(text.as_bytes()),
    };
    drop(bytes);
    let (train_ids, val_ids) = token_file::split(&ids, setup.train.val_fraction);
    let need = setup.train.seq_len as usize + 2;
    if train_ids.len() < need || val_ids.len() < need {
        return Err(Error::Invalid(format!(
            "{}: {} tokens split into {} training and {} validation tokens, but each part needs \
             at least seq_len + 2 = {need}; use a larger corpus or a smaller train.seq_len",
            setup.corpus_name,
            ids.len(),
            train_ids.len(),
            val_ids.len()
        )));
    }
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
    token_file::write_token_file(&train_path, train_ids, dtype)?;
    token_file::write_token_file(&val_path, val_ids, dtype)?;
    crate::tokenize::save_json(&tokenizer, &tokenizer_path)?;
    Ok(Data {
        tokenizer,
        train: TokenFile::open(&train_path)?,
        val: TokenFile::open(&val_path)?,
    })
}

/// Bytes of memory the kernel says are available (Linux `/proc/meminfo`), if known.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Standard normal draws from a seeded generator (Box-Muller).
fn normal_values(n: usize, std: f64, rng: &mut SplitMix64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = 1.0 - rng.next_f64(); // (0, 1]
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// FNV-1a of a name, to give each tensor its own initialisation stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The trained variables with a seeded initialisation: weight matrices normal(0,
/// initializer_range) from the seed and their name (candle's own CPU generator cannot be
/// seeded), norms and biases as the layers made them (ones and zeros).
fn init_vars(varmap: &VarMap, cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Tensor("the VarMap lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    drop(data);
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        if var.rank() >= 2 {
            let mut rng = SplitMix64::new(derive_seed(seed, INIT_STREAM ^ name_hash(name)));
            let values = normal_values(var.elem_count(), cfg.initializer_range, &mut rng);
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
        }
    }
    Ok(vars)
}

/// The precision a run trains in, and the hand-written pass that replaces candle's
/// autograd where it applies: the plain Llama recipe on the CPU, without checkpointed
/// activations (they recompute through autograd). Mixed precision on the CPU is that
/// pass with bf16 products, since candle's own CPU bf16 products are slow and some of
/// their gradients missing; "auto" takes it where the CPU multiplies bf16 pairs
/// (AVX512-BF16), as it takes bf16-mixed on a GPU.
fn training_pass(
    train: &TrainSection,
    cfg: &ModelConfig,
    vars: &[(String, Var)],
    device: &Device,
) -> Result<(Precision, Option<LlamaBackprop>)> {
    let precision = train.precision_on(device);
    if !device.is_cpu() {
        return Ok((precision, None));
    }
    let pass = |products| match train.checkpoint_activations {
        true => None,
        false => LlamaBackprop::new(cfg, vars, products),
    };
    if train.precision == "auto" && has_bf16_kernel() {
        if let Some(backprop) = pass(Products::Bf16) {
            return Ok((Precision::Bf16Mixed, Some(backprop)));
        }
    }
    match precision {
        Precision::F32 => Ok((precision, pass(Products::F32))),
        Precision::Bf16Mixed => {
            let backprop = pass(Products::Bf16).ok_or_else(cpu_mixed_precision_error)?;
            if !has_bf16_kernel() {
                tracing::warn!(
                    "this CPU has no AVX512-BF16: bf16-mixed rounds the operands and multiplies in \
                     f32 (the same values, slower than precision = \"f32\")"
                );
            }
            Ok((precision, Some(backprop)))
        }
    }
}

/// Refuses bf16-mixed on the CPU for a model the hand-written pass does not train,
/// from the configuration alone: before the run writes anything.
fn check_cpu_mixed_precision(setup: &TrainSetup, device: &Device) -> Result<()> {
    let train = &setup.train;
    if !device.is_cpu() || train.precision != "bf16-mixed" {
        return Ok(());
    }
    // The vocabulary is not known yet and does not matter here.
    let cfg = setup
        .model
        .model_config(2, train.seq_len)
        .map_err(|(key, message)| config_error(&key, message))?;
    match !train.checkpoint_activations && LlamaBackprop::takes(&cfg) {
        true => Ok(()),
        false => Err(cpu_mixed_precision_error()),
    }
}

fn cpu_mixed_precision_error() -> Error {
    config_error(
        "train.precision",
        "\"bf16-mixed\" on the CPU needs the plain Llama recipe (RMSNorm before each sublayer, \
         RoPE, SwiGLU, no biases, no dropout) with checkpoint_activations = false; train this \
         model in \"f32\""
            .into(),
    )
}

/// The model a step runs: the f32 model itself, or its bf16 copy under mixed precision.
fn step_model<'a>(
    model: &'a Transformer,
    vars: &[(String, Var)],
    precision: Precision,
) -> Result<Cow<'a, Transformer>> {
    match precision {
        Precision::F32 => Ok(Cow::Borrowed(model)),
        Precision::Bf16Mixed => {
            let tensors = vars
                .iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::BF16)?)))
                .collect::<Result<HashMap<String, Tensor>>>()?;
            let vb = VarBuilder::from_tensors(tensors, DType::BF16, model.device());
            Ok(Cow::Owned(Transformer::load(vb, model.config())?))
        }
    }
}

/// Mean cross-entropy (nats per token) of `logits` (b, t, vocab) against `targets` (b, t).
pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logits = logits.reshape((b * t, v))?.to_dtype(DType::F32)?; // (b*t, vocab)
    if let Some(loss) = fused_cross_entropy(&logits, &targets.flatten_all()?)? {
        return Ok(loss);
    }
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = targets.reshape((b * t, 1))?; // (b*t, 1)
    Ok(logprobs.gather(&targets, 1)?.mean_all()?.neg()?)
}

/// Validation loss over `eval_steps` batches drawn from a generator fixed by the seed.
fn evaluate(
    model: &Transformer,
    data: &TokenFile,
    setup: &TrainSetup,
    device: &Device,
) -> Result<f32> {
    let train = &setup.train;
    let model = model.detached()?;
    let mut rng = SplitMix64::new(derive_seed(setup.seed, EVAL_STREAM));
    let mut total = 0.0f64;
    for _ in 0..train.eval_steps {
        let batch = sample_batch(
            data,
            train.batch_size as usize,
            train.seq_len as usize,
            &mut rng,
            device,
        )?;
        let logits = model.forward(&batch.inputs)?.detach();
        total += cross_entropy(&logits, &batch.targets)?.to_scalar::<f32>()? as f64;
    }
    Ok((total / train.eval_steps as f64) as f32)
}

/// Trains the model `setup` describes on `corpus` into `out_dir`, or continues the run
/// there (`resume`), calling `on_progress` after every step. Ctrl-C (see
/// [`interrupt::install`]) writes a checkpoint and returns early.
pub fn run(
    setup: &TrainSetup,
    corpus: &mut dyn Read,
    out_dir: &Path,
    resume: bool,
    device: &Device,
    on_progress: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    run_with_control(
        setup,
        corpus,
        out_dir,
        resume,
        device,
        &mut |report: &StepReport| {
            on_progress(report);
            ControlFlow::Continue(())
        },
    )
}

/// [`run`] whose callback may stop the run after a step (with a checkpoint, as Ctrl-C).
pub fn run_with_control(
    setup: &TrainSetup,
    corpus: &mut dyn Read,
    out_dir: &Path,
    resume: bool,
    device: &Device,
    on_progress: &mut dyn FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    let started = Instant::now();
    setup
        .validate()
        .map_err(|(key, message)| config_error(&key, message))?;
    check_cpu_mixed_precision(setup, device)?;
    let train = &setup.train;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let checkpoint_path = out_dir.join(CHECKPOINT_FILE);
    match (resume, checkpoint_path.exists()) {
        (true, false) => {
            return Err(Error::Invalid(format!(
                "{}: no checkpoint to resume from; start the run without --resume",
                checkpoint_path.display()
            )))
        }
        (false, true) => {
            return Err(Error::Invalid(format!(
                "{} already holds a training run; pass --resume to continue it, or choose \
                 another output folder",
                out_dir.display()
            )))
        }
        _ => {}
    }

    let data = prepare_data(setup, corpus, out_dir, resume)?;
    let vocab_size = data.tokenizer.vocab_size();
    let cfg = setup
        .model
        .model_config(vocab_size, train.seq_len)
        .map_err(|(key, message)| config_error(&key, message))?;
    let (batch_size, seq_len) = (train.batch_size as usize, train.seq_len as usize);
    let memory = training_memory(&cfg, batch_size, seq_len, train.checkpoint_activations);
    if device.is_cpu() {
        if let Some(available) = available_memory() {
            if memory.total() > available {
                return Err(Error::Invalid(format!(
                    "training this model needs about {:.1} GiB ({} parameters: weights {:.1} GiB, \
                     gradients {:.1} GiB, AdamW {:.1} GiB, activations {:.1} GiB) but {:.1} GiB are \
                     available; lower model.dim/n_layers or train.batch_size/seq_len, or set \
                     train.checkpoint_activations = true",
                    gib(memory.total()),
                    param_count(&cfg),
                    gib(memory.parameters),
                    gib(memory.gradients),
                    gib(memory.optimizer),
                    gib(memory.activations),
                    gib(available)
                )));
            }
        }
    }
    // Parameters: f32 variables, seeded.
    let varmap = VarMap::new();
    let model = Transformer::load(VarBuilder::from_varmap(&varmap, DType::F32, device), &cfg)?;
    let vars = init_vars(&varmap, &cfg, setup.seed)?;
    let adamw = AdamWConfig {
        beta1: train.beta1,
        beta2: train.beta2,
        eps: train.eps,
        weight_decay: train.weight_decay,
    };
    let mut optimizer = AdamW::new(vars.clone(), adamw, train.decay_embeddings)?;
    let vars: Vec<(String, Var)> = optimizer
        .vars()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let (precision, backprop) = training_pass(train, &cfg, &vars, device)?;
    tracing::debug!("backward pass: {}", if backprop.is_some() { "hand-written" } else { "autograd" });
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
    let resumed_from = if resume {
        let saved = checkpoint::load(&checkpoint_path, &mut optimizer, &cfg.resolved())?;
        if saved.seed != setup.seed {
            tracing::warn!(
                "the checkpoint was made with seed {} and continues with it",
                saved.seed
            );
        }
        state = saved;
        Some(state.step)
    } else {
        None
    };
    write_atomic(
        &out_dir.join(CONFIG_TOML_FILE),
        setup.config_toml.as_bytes(),
    )?;
    let mut log = MetricsLog::open(&out_dir.join(METRICS_FILE), resumed_from)?;
    let mut batch_rng = SplitMix64::new(state.batch_rng);

    let save_all =
        |optimizer: &AdamW, state: &CheckpointState, log: &mut MetricsLog| -> Result<()> {
            log.flush()?;
            checkpoint::save(&checkpoint_path, optimizer, state)?;
            model.save_pretrained(out_dir)
        };

    let tokens_per_step = (batch_size * seq_len) as u64 * train.grad_accum;
    let mut interval = (Instant::now(), 0u64); // since the last log: start, tokens
    let mut train_seconds = 0.0f64;
    let mut tokens_this_run = 0u64;
    let mut last_train_loss = None;
    let mut last_val_loss = None;
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
            data: &data.train,
            vars: &vars,
            device,
            seed: setup.seed,
            dropout_stream: DROPOUT_STREAM,
            backprop: backprop.as_ref(),
        };
        let step_model = || step_model(&model, &vars, precision);
        let (train_loss, grads) = match micro_batches(step_model, &ctx, state.step, &mut batch_rng)? {
            MicroBatches::Done { loss, grads } => (loss, grads),
            MicroBatches::Diverged(loss_value) => {
                log.flush()?;
                let kept = match state.step {
                    0 => "no checkpoint was written".to_string(),
                    _ if resumed_from.is_some() || state.step >= train.checkpoint_every.max(1) => {
                        format!(
                            "the last good checkpoint is {} (use --resume with a lower train.lr)",
                            checkpoint_path.display()
                        )
                    }
                    _ => "no checkpoint was written yet".to_string(),
                };
                return Err(Error::Invalid(format!(
                    "the training loss became {loss_value} at step {}: training diverged; lower \
                     train.lr, raise train.warmup_steps or set train.grad_clip; {kept}",
                    state.step + 1
                )));
            }
        };
        let grad_norm = apply_update(&mut optimizer, &grads, lr, train.grad_clip)?;
        drop(grads);
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        tokens_this_run += tokens_per_step;
        interval.1 += tokens_per_step;
        train_seconds += step_started.elapsed().as_secs_f64();
        last_train_loss = Some(train_loss);

        let last = state.step == train.steps;
        let is_eval = last || (train.eval_every > 0 && state.step % train.eval_every == 0);
        let is_log = is_eval || state.step % train.log_every == 0;
        let tokens_per_s = interval.1 as f64 / interval.0.elapsed().as_secs_f64().max(1e-9);
        let val_loss = match is_eval {
            true => {
                let val = evaluate(&model, &data.val, setup, device)?;
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
        if !last && train.checkpoint_every > 0 && state.step % train.checkpoint_every == 0 {
            save_all(&optimizer, &state, &mut log)?;
        }
    }
    state.batch_rng = batch_rng.state;
    save_all(&optimizer, &state, &mut log)?;
    metrics::write_plot(out_dir)?;
    Ok(TrainSummary {
        steps: state.step,
        resumed_from,
        interrupted,
        final_train_loss: last_train_loss,
        final_val_loss: last_val_loss,
        best_val_loss: state.best_val_loss,
        tokens_per_s: tokens_this_run as f64 / train_seconds.max(1e-9),
        tokens_seen: state.tokens_seen,
        seconds: started.elapsed().as_secs_f64(),
        param_count: param_count(&cfg),
        memory,
        precision: match precision {
            Precision::F32 => "f32",
            Precision::Bf16Mixed => "bf16-mixed",
        },
        vocab_size,
        split_tokens: (data.train.len(), data.val.len()),
        out_dir: out_dir.to_path_buf(),
    })
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
