//! Fused CPU kernels in f32: each layer's elementwise and per-row work in one pass,
//! with hand-written backward passes for training, and the products and scoring that
//! inference runs.
//!
//! Candle differentiates any graph of primitive ops, but on the CPU every primitive is a
//! pass over memory and a new tensor kept for the backward pass. The kernels, one module
//! per layer kind:
//! - [`norm`]: RMSNorm (Zhang & Sennrich 2019);
//! - [`attention`]: causal self-attention with RoPE and grouped-query heads; the
//!   backward pass recomputes the attention weights row by row instead of keeping the
//!   (b, h, t, t) matrix (as FlashAttention, Dao et al. 2022, does), so memory stays
//!   linear in t;
//! - [`swiglu`]: `silu(gate) * up` (Shazeer 2020);
//! - [`linear`]: `x W^T`, over many rows or a few;
//! - [`scoring`]: cross-entropy for training, and log-probabilities of targets for
//!   evaluation;
//! - [`matmul`] and [`rows`]: the matrix products and row arithmetic they share, and
//!   [`bf16`]: products with bf16 operands for mixed-precision training.
//!
//! Each op returns `None` when it does not apply (another device or dtype), and the
//! caller takes the graph of primitive ops, which is also the reference the tests
//! compare values and gradients against. Loops run over batch rows in parallel with
//! rayon (one thread when `RAYON_NUM_THREADS=1`).

mod attention;
mod bf16;
mod linear;
mod matmul;
mod norm;
mod rows;
mod scoring;
mod swiglu;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, DType, Layout, Storage, Tensor};

pub(crate) use attention::{cached_attention, causal_attention, heads, AttentionDropout, RopeTables};
pub(super) use attention::{CausalAttention, SavedMap};
pub(crate) use linear::{few_rows_linear, linear};
pub(super) use linear::{input_grad, input_grad_add, linear_rows, linear_rows_add, weight_grad};
pub(crate) use bf16::has_bf16_kernel;
pub(crate) use matmul::Products;
pub(crate) use norm::rms_norm;
pub(super) use norm::{rms_norm_grad, rms_norm_rows};
pub(crate) use rows::log_softmax_rows;
pub(crate) use scoring::{cross_entropy, projected_scores, score_rows, RowScore};
pub(super) use scoring::cross_entropy_grad_in_place;
pub(crate) use swiglu::swiglu;
pub(super) use swiglu::{swiglu_rows_keeping, SwigluKept};

/// Whether the kernels here can take `xs`: f32 on the CPU.
fn applies(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// The f32 elements of a contiguous CPU tensor.
pub(super) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: expects f32 tensors");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: expects contiguous tensors");
    };
    Ok(&data[start..end])
}

/// Runs `f` on the f32 elements of `tensors` (made contiguous first), borrowed from
/// their storage: what a backward pass reads.
fn with_host<const N: usize, R>(
    tensors: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let contiguous = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *slot = match &**storage {
            Storage::Cpu(cpu) => slice(cpu, layout, op)?,
            _ => bail!("{op}: expects CPU tensors"),
        };
    }
    f(slices)
}
