//! Logit rows against their targets: the mean cross-entropy of training (whose
//! gradient is `softmax - one_hot`), and for evaluation each row's log p(target), top
//! log-probability and top id, with the output projection folded in vocabulary blocks so
//! that a window's logits never exist at once.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul_on, parallelism, row_major, Products};
use super::rows::{exp, max_of, softmax_in_place, sum_exp_shifted};
use super::{applies, slice, with_host};
use crate::simd::simd_kernel;

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

simd_kernel! {
    /// -log softmax(row)[target]: the cross-entropy of one row of logits.
    fn row_nll(row: &[f32], target: u32) -> f64 {
        let max = max_of(row);
        let log_norm = max + sum_exp_shifted(row, max).ln();
        f64::from(log_norm - row[target as usize])
    }
}

/// What scoring needs of one row of logits: log p(target), the largest log-probability
/// and its id.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowScore {
    pub(crate) logprob: f32,
    pub(crate) top_logprob: f32,
    pub(crate) top_id: u32,
}

/// The [`RowScore`] of each row of `logits` (.., vocab) against `targets`, one per row,
/// on the host in one pass per row: the log-softmax is never materialised.
pub(crate) fn score_rows(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<RowScore>> {
    let vocab = logits.dims().last().copied().unwrap_or(0);
    if logits.elem_count() != targets.len() * vocab {
        bail!("score-rows: {} targets for logits of shape {:?}", targets.len(), logits.dims());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("target id {bad} is outside the vocabulary of {vocab}");
    }
    let logits = logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    with_host([&logits], "score-rows", |[data]| {
        Ok(data
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &target)| score_row(row, target))
            .collect())
    })
}

simd_kernel! {
    /// The [`RowScore`] of one row of logits against its target: the row as a single
    /// block of [`fold_block`].
    fn score_row(row: &[f32], target: u32) -> RowScore {
        let mut run = RunningScore::START;
        fold_block(row, 0, target, &mut run);
        run.score()
    }
}

/// Vocabulary columns per block of [`projected_scores`].
const VOCAB_BLOCK: usize = 4096;

/// What [`projected_scores`] carries for one row from one vocabulary block to the
/// next: the largest logit so far and its id, the sum of the exponentials of the logits
/// so far shifted by that maximum, and the target's logit once its block is reached.
#[derive(Debug, Clone, Copy)]
struct RunningScore {
    max: f32,
    top_id: u32,
    sum: f32,
    target_logit: f32,
}

impl RunningScore {
    /// Before the first block.
    const START: RunningScore = RunningScore { max: f32::NEG_INFINITY, top_id: 0, sum: 0.0, target_logit: f32::NAN };

    /// The row's score once every block is folded in.
    #[inline(always)]
    fn score(&self) -> RowScore {
        let log_norm = self.max + self.sum.ln();
        RowScore {
            logprob: self.target_logit - log_norm,
            top_logprob: self.max - log_norm,
            top_id: self.top_id,
        }
    }
}

/// The [`RowScore`] of each row of the output projection `x W^T` (`x` (.., c) hidden
/// states, `w` (vocab, c)) against `targets`, or `None` where the kernel does not apply.
/// The (rows, vocab) logits never exist at once: [`VOCAB_BLOCK`] columns at a time, each
/// row's maximum, sum of exponentials and argmax carry over from block to block, the
/// sum rescaled when the maximum rises (the online softmax of Milakov & Gimelshein
/// 2018). A window's whole logits would be, for 512 scored rows of a 32,000-token
/// vocabulary, 65 MB allocated and faulted in for every window; a block's stay a few MB
/// and are reused. With one block (a vocabulary of at most [`VOCAB_BLOCK`]) this is
/// [`score_rows`] on the product.
pub(crate) fn projected_scores(x: &Tensor, w: &Tensor, targets: &[u32]) -> candle_core::Result<Option<Vec<RowScore>>> {
    if !applies(x) || !applies(w) || x.track_op() || w.track_op() {
        return Ok(None);
    }
    let (vocab, c) = w.dims2()?;
    let n = x.elem_count() / c.max(1);
    if x.dims().last() != Some(&c) || n != targets.len() {
        bail!("projected-scores: {} targets for hidden states {:?} and an output weight {:?}", targets.len(), x.dims(), w.dims());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("target id {bad} is outside the vocabulary of {vocab}");
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let scores = with_host([&x, &w], "projected-scores", |[x, w]| {
        let mut running = vec![RunningScore::START; n];
        let mut logits = vec![0f32; n * VOCAB_BLOCK.min(vocab)];
        for first in (0..vocab).step_by(VOCAB_BLOCK) {
            let cols = VOCAB_BLOCK.min(vocab - first);
            let block = row_major(&w[first * c..(first + cols) * c], c);
            let logits = &mut logits[..n * cols];
            matmul_on(Products::F32, parallelism(n * c * cols), logits, cols, false, row_major(x, c), block.t(), 1.0);
            logits
                .par_chunks(cols)
                .zip(running.par_iter_mut().zip(targets.par_iter()))
                .for_each(|(row, (run, &target))| fold_block(row, first, target, run));
        }
        Ok(running.iter().map(RunningScore::score).collect::<Vec<_>>())
    })?;
    Ok(Some(scores))
}

simd_kernel! {
    /// Folds one vocabulary block's logits `row` (ids `first..`) into `run`. On the
    /// first block the sum is exactly the block's: `0 * e^(-inf - top)` adds nothing.
    fn fold_block(row: &[f32], first: usize, target: u32, run: &mut RunningScore) {
        let top = max_of(row);
        if top > run.max {
            // Only a strictly larger maximum moves the argmax: the first of equal
            // maxima is in the earliest block.
            run.top_id = (first + row.iter().position(|&l| l == top).unwrap_or(0)) as u32;
            run.sum = run.sum * exp(run.max - top) + sum_exp_shifted(row, top);
            run.max = top;
        } else {
            run.sum += sum_exp_shifted(row, run.max);
        }
        if let Some(&logit) = (target as usize).checked_sub(first).and_then(|i| row.get(i)) {
            run.target_logit = logit;
        }
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = slice(storage, layout, self.name())?;
        let n = self.targets.len();
        let v = logits.len() / n;
        let total: f64 = logits
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| row_nll(row, t))
            .collect::<Vec<f64>>()
            // Summed in row order: a parallel sum's grouping would vary from run to run.
            .iter()
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.targets.len() as f32;
        let d_logits = with_host([logits], self.name(), |[logits]| {
            let mut d_logits = logits.to_vec();
            cross_entropy_grad_in_place(&mut d_logits, &self.targets, scale);
            Ok(d_logits)
        })?;
        Ok(Some(Tensor::from_vec(
            d_logits,
            logits.shape(),
            &Device::Cpu,
        )?))
    }
}

/// Turns each row of `logits` (n, vocab) into the gradient of `scale` times the
/// summed cross-entropy against `targets`, `scale * (softmax - one_hot)`, in place, and
/// returns that sum (nats, added in row order).
pub(crate) fn cross_entropy_grad_in_place(logits: &mut [f32], targets: &[u32], scale: f32) -> f64 {
    let v = logits.len() / targets.len().max(1);
    let losses: Vec<f64> = logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| cross_entropy_grad_row(row, t, scale))
        .collect();
    losses.iter().sum()
}

simd_kernel! {
    /// One row of [`cross_entropy_grad_in_place`]: returns the row's cross-entropy.
    fn cross_entropy_grad_row(row: &mut [f32], target: u32, scale: f32) -> f64 {
        let target_logit = row[target as usize];
        let log_norm = softmax_in_place(row);
        row[target as usize] -= 1.0;
        row.iter_mut().for_each(|d| *d *= scale);
        f64::from(log_norm - target_logit)
    }
}

/// Mean cross-entropy (nats) of `logits` (n, vocab) against `targets` (n) u32, or `None`
/// when the kernel does not apply.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(logits) || !targets.device().is_cpu() {
        return Ok(None);
    }
    let (_n, v) = logits.dims2()?;
    let targets: Vec<u32> = targets.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("target id {bad} is outside the vocabulary of {v}");
    }
    let op = CrossEntropy {
        targets: Arc::new(targets),
    };
    Ok(Some(logits.contiguous()?.apply_op1(op)?))
}
