//! One optimizer step, shared by `nlp train` and `nlp lora train`: the micro-batches of
//! gradient accumulation, each a seeded batch through the model with its own dropout
//! stream, then one clipped AdamW update. What the two loops keep apart is which
//! variables train and how a step's model is made from them.

use std::borrow::Cow;

use candle_core::{Device, Tensor, Var};

use super::batches::{derive_seed, sample_batch, Batch};
use super::optimizer::{global_norm, AdamW};
use super::token_file::TokenFile;
use super::trainer::cross_entropy;
use super::TrainSection;
use crate::model::backprop::LlamaBackprop;
use crate::model::{ActivationCheckpointing, DropoutRng, Transformer};
use crate::rng::SplitMix64;
use crate::Result;

/// What every step of a run reads.
pub(crate) struct StepContext<'a> {
    /// The training settings (batch shape, accumulation, clipping, checkpointing).
    pub train: &'a TrainSection,
    /// The training tokens.
    pub data: &'a TokenFile,
    /// The variables that train, in the optimizer's order.
    pub vars: &'a [(String, Var)],
    /// Where batches go.
    pub device: &'a Device,
    /// The run's seed and the label of its dropout stream, so that a resumed run
    /// draws the masks the uninterrupted one would have.
    pub seed: u64,
    pub dropout_stream: u64,
    /// The hand-written pass for a plain Llama model in f32 on the CPU, which then
    /// replaces the model's forward pass and candle's autograd.
    pub backprop: Option<&'a LlamaBackprop>,
}

/// What the micro-batches of one step produced.
pub(crate) enum MicroBatches {
    /// The mean training loss and each variable's summed gradient, in `vars` order
    /// (zeros for a variable no gradient reached).
    Done { loss: f32, grads: Vec<Tensor> },
    /// A micro-batch's loss was NaN or infinite.
    Diverged(f32),
}

/// Runs the `grad_accum` micro-batches of step `step` through the model `model` makes
/// (the weights themselves, or a half-precision view of them), drawing batches from
/// `batch_rng`.
pub(crate) fn micro_batches<'m>(
    model: impl Fn() -> Result<Cow<'m, Transformer>>,
    ctx: &StepContext,
    step: u64,
    batch_rng: &mut SplitMix64,
) -> Result<MicroBatches> {
    let train = ctx.train;
    let (batch_size, seq_len) = (train.batch_size as usize, train.seq_len as usize);
    let mut loss_sum = 0.0f64;
    let mut grads: Vec<Option<Tensor>> = vec![None; ctx.vars.len()];
    for micro in 0..train.grad_accum {
        let batch = sample_batch(ctx.data, batch_size, seq_len, batch_rng, ctx.device)?;
        let (loss_value, micro_grads) = match ctx.backprop {
            Some(backprop) => {
                let inputs: Vec<u32> = batch.inputs.flatten_all()?.to_vec1()?;
                let targets: Vec<u32> = batch.targets.flatten_all()?.to_vec1()?;
                let scale = 1.0 / train.grad_accum as f32;
                let (loss, grads) = backprop.loss_and_grads(ctx.vars, &inputs, &targets, seq_len, scale)?;
                (loss, grads.into_iter().map(Some).collect())
            }
            None => autograd_grads(&*model()?, ctx, step, micro, &batch)?,
        };
        if !loss_value.is_finite() {
            return Ok(MicroBatches::Diverged(loss_value));
        }
        loss_sum += loss_value as f64;
        for (slot, grad) in grads.iter_mut().zip(micro_grads) {
            *slot = match (slot.take(), grad) {
                (Some(acc), Some(g)) => Some((acc + g)?),
                (acc, g) => acc.or(g),
            };
        }
    }
    let grads = grads
        .into_iter()
        .zip(ctx.vars)
        .map(|(grad, (_, var))| match grad {
            Some(grad) => Ok(grad),
            None => Ok(var.as_tensor().zeros_like()?),
        })
        .collect::<Result<_>>()?;
    Ok(MicroBatches::Done {
        loss: (loss_sum / train.grad_accum as f64) as f32,
        grads,
    })
}

/// The loss of one micro-batch through `model` and candle's autograd, and the
/// gradient of the loss over `grad_accum` for each variable (`None` where none reached).
fn autograd_grads(
    model: &Transformer,
    ctx: &StepContext,
    step: u64,
    micro: u64,
    batch: &Batch,
) -> Result<(f32, Vec<Option<Tensor>>)> {
    let train = ctx.train;
    let dropout = DropoutRng::new(derive_seed(
        ctx.seed,
        ctx.dropout_stream ^ (step * train.grad_accum + micro).wrapping_mul(0x9E37_79B9),
    ));
    let checkpointing = match train.checkpoint_activations {
        true => Some(ActivationCheckpointing::new(ctx.device)?),
        false => None,
    };
    let logits = model.forward_train(&batch.inputs, &dropout, checkpointing.as_ref())?; // (b, t, vocab)
    let loss = cross_entropy(&logits, &batch.targets)?;
    // The one host read of the micro-batch: the loss, for the log and the NaN check.
    let loss_value = loss.to_scalar::<f32>()?;
    if !loss_value.is_finite() {
        return Ok((loss_value, Vec::new()));
    }
    let loss = match train.grad_accum {
        1 => loss,
        n => (loss / n as f64)?,
    };
    let mut store = loss.backward()?;
    if let Some(checkpointing) = &checkpointing {
        checkpointing.merge_into(&mut store)?;
    }
    // Detached, or a kept gradient would keep the micro-batch's graph alive.
    let grads = ctx.vars.iter().map(|(_, var)| store.remove(var.as_tensor()).map(|grad| grad.detach()));
    Ok((loss_value, grads.collect()))
}

/// One AdamW update at learning rate `lr` with `grads` scaled so that their global L2
/// norm is at most `clip` (0: no clipping); returns the norm before clipping.
pub(crate) fn apply_update(
    optimizer: &mut AdamW,
    grads: &[Tensor],
    lr: f64,
    clip: f64,
) -> Result<f64> {
    let norm = global_norm(grads)?;
    let scale = match clip {
        clip if clip > 0.0 && norm > clip => clip / (norm + 1e-6),
        _ => 1.0,
    };
    optimizer.step(grads, lr, scale)?;
    Ok(norm)
}
