//! Fused CPU kernels with hand-written backward passes, for training in f32.
//!
//! Candle differentiates any graph of primitive ops, but on the CPU every primitive is a
//! pass over memory and a new tensor kept for the backward pass. These kernels do each
//! layer's elementwise and per-row work in one pass, forward and backward:
//! - [`rms_norm`]: `x / sqrt(mean(x^2) + eps) * w` (Zhang & Sennrich 2019);
//! - [`causal_attention`]: RoPE (rotate-half layout) on q and k, `softmax(q k^T /
//!   sqrt(d))` under the causal mask, times v, with grouped-query heads, reading the
//!   projections' (b, t, heads * d) outputs and writing the (b, t, heads * d) input of
//!   `o_proj`, so no transposes or copies; the backward pass recomputes the attention
//!   weights row by row instead of keeping the (b, h, t, t) matrix (as FlashAttention,
//!   Dao et al. 2022, does), so memory stays linear in t;
//! - [`swiglu`]: `silu(gate) * up` (Shazeer 2020);
//! - [`cross_entropy`]: mean negative log-softmax of the targets, whose gradient is
//!   `softmax - one_hot`.
//!
//! Each returns `None` when it does not apply (another device or dtype), and the caller
//! takes the graph of primitive ops, which is also the reference the tests compare
//! values and gradients against. Loops run over batch rows in parallel with rayon (one
//! thread when `RAYON_NUM_THREADS=1`).

use std::sync::Arc;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use crate::simd::simd_kernel;

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

/// e^x to about 2 ulp (Cephes' `expf` polynomial), written without branches so that a
/// loop of it compiles to vector instructions, unlike the C library's `expf`.
/// Saturates to the smallest normal below x = -87.3 and overflows to +inf above 88.7;
/// NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from n's bits in the low mantissa of `shifted`: integer operations only
    // (a float-to-int cast would keep the loop scalar).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler can keep them in vector registers.
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum a_k b_k c_k`, in eight partial sums as [`dot`].
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8, c8) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ra, rb, rc) = (a8.remainder(), b8.remainder(), c8.remainder());
    for ((x, y), z) in a8.zip(b8).zip(c8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).zip(rc).map(|((x, y), z)| x * y * z).sum();
    acc.iter().sum::<f32>() + tail
}

/// The largest element (NEG_INFINITY for none), in eight lanes so that the loop
/// vectorises.
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for x in chunks {
        for l in 0..8 {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    tail.iter().chain(&acc).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// The sum of e^(x - shift) over `xs`, in eight lanes.
#[inline(always)]
fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - shift)).sum();
    for x in chunks {
        for l in 0..8 {
            acc[l] += exp(x[l] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail
}

simd_kernel! {
    /// Turns `row` into its log-softmax in place: `x - max - ln(sum(e^(x - max)))`.
    fn log_softmax_in_place(row: &mut [f32]) {
        let max = max_of(row);
        let log_sum = max + sum_exp_shifted(row, max).ln();
        row.iter_mut().for_each(|x| *x -= log_sum);
    }
}

/// The log-softmax of each row of `logits` (n, vocab), as host rows: what a decoding
/// step reads. Computed here rather than by candle's composite op, whose elementwise
/// passes over a few rows of a large vocabulary are each handed to a thread pool.
pub(crate) fn log_softmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for row in &mut rows {
        log_softmax_in_place(row);
    }
    Ok(rows)
}

/// Turns `xs` into its softmax in place and returns its log-sum-exp; each
/// exponential is computed once, in eight lanes.
#[inline(always)]
fn softmax_in_place(xs: &mut [f32]) -> f32 {
    let max = max_of(xs);
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for x in &mut chunks {
        for l in 0..8 {
            x[l] = exp(x[l] - max);
            acc[l] += x[l];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        tail += *x;
    }
    let sum = acc.iter().sum::<f32>() + tail;
    let inv = 1.0 / sum;
    xs.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `y += alpha * x`.
#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xs, weight) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut out = vec![0f32; xs.len()];
        rms_norm_rows(xs, weight, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_host([xs, weight, grad], self.name(), |[x, w, g]| {
            let mut dx = vec![0f32; x.len()];
            let dw = rms_norm_grad(x, w, g, self.eps, &mut dx, false);
            Ok((dx, dw))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, xs.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(dw, weight.shape(), &Device::Cpu)?),
        ))
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * w` for each row of `xs` (rows of `weight.len()`).
pub(super) fn rms_norm_rows(xs: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let c = weight.len();
    out.par_chunks_mut(c)
        .zip(xs.par_chunks(c))
        .for_each(|(y, x)| rms_norm_row(x, weight, eps, y));
}

simd_kernel! {
    /// One row of [`rms_norm_rows`].
    fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
        let r = 1.0 / (dot(x, x) / weight.len() as f32 + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
            *y = x * r * w;
        }
    }
}

/// The backward pass of [`rms_norm_rows`] for the output gradient `g`: writes the
/// input's gradient into `dx` (adds it when `add`) and returns the weight's.
pub(super) fn rms_norm_grad(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], add: bool) -> Vec<f32> {
    let c = w.len();
    // dw sums over rows in fixed groups, added up in order: the result does not depend
    // on how rayon happens to split the work (training must be deterministic).
    let group = 64 * c;
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(group)
        .zip(x.par_chunks(group).zip(g.par_chunks(group)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![0f32; c];
            rms_norm_grad_rows([x, w, g], eps, dx, add, &mut dw);
            dw
        })
        .collect();
    let mut dw = vec![0f32; c];
    for part in &partial {
        axpy(1.0, part, &mut dw);
    }
    dw
}

simd_kernel! {
    /// [`rms_norm_grad`] over the rows of `x` and `g`, the weight's gradient added into `dw`.
    fn rms_norm_grad_rows(xwg: [&[f32]; 3], eps: f32, dx: &mut [f32], add: bool, dw: &mut [f32]) {
        // d/dx_k of x_k r w_k with r = (mean(x^2) + eps)^(-1/2):
        // dx = r (g w) - x r^3 mean(g w x);  dw = sum over rows of g x r.
        let [x, w, g] = xwg;
        let c = w.len();
        for (dx, (x, g)) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c).zip(g.chunks_exact(c))) {
            let r = 1.0 / (dot(x, x) / c as f32 + eps).sqrt();
            let gwx = dot3(g, w, x);
            for ((dw, &g), &x) in dw.iter_mut().zip(g).zip(x) {
                *dw += g * x * r;
            }
            let coeff = r * r * r * gwx / c as f32;
            let rows = dx.iter_mut().zip(g.iter().zip(w)).zip(x);
            match add {
                true => rows.for_each(|((dx, (g, w)), x)| *dx += r * g * w - x * coeff),
                false => rows.for_each(|((dx, (g, w)), x)| *dx = r * g * w - x * coeff),
            }
        }
    }
}

/// RMSNorm of `xs` (.., c) with `weight` (c), or `None` when the kernel does not apply.
pub(crate) fn rms_norm(
    xs: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(xs) || !applies(weight) {
        return Ok(None);
    }
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    Ok(Some(xs.apply_op2(&weight, RmsNorm { eps: eps as f32 })?))
}

// ---------------------------------------------------------------- SwiGLU

struct SwiGlu;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let up = &up[..gate.len()];
        let mut out = vec![0f32; gate.len()];
        swiglu_rows(gate, up, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = with_host([gate, up, grad], self.name(), |[gs, us, dys]| {
            let n = gs.len();
            let (us, dys) = (&us[..n], &dys[..n]);
            let (mut d_gate, mut d_up) = (vec![0f32; n], vec![0f32; n]);
            swiglu_grad(gs, us, dys, &mut d_gate, &mut d_up);
            Ok((d_gate, d_up))
        })?;
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(d_up, up.shape(), &Device::Cpu)?),
        ))
    }
}

simd_kernel! {
    /// `out = silu(gate) * up`.
    fn swiglu_fwd(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len();
        let (up, out) = (&up[..n], &mut out[..n]);
        for i in 0..n {
            out[i] = gate[i] * sigmoid(gate[i]) * up[i];
        }
    }
}

simd_kernel! {
    /// The gradients of `silu(gate) * up` given the output's `dys`.
    fn swiglu_bwd(gs: &[f32], us: &[f32], dys: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        let n = gs.len();
        let (us, dys, d_gate, d_up) = (&us[..n], &dys[..n], &mut d_gate[..n], &mut d_up[..n]);
        for i in 0..n {
            let (g, u, dy) = (gs[i], us[i], dys[i]);
            let s = sigmoid(g);
            // silu'(g) = s (1 + g (1 - s)).
            d_gate[i] = dy * u * s * (1.0 + g * (1.0 - s));
            d_up[i] = dy * g * s;
        }
    }
}

simd_kernel! {
    /// `out = silu(gate) * up`, keeping for a backward pass `silu(gate)` in `silu` and
    /// its derivative in place of `gate`.
    fn swiglu_fwd_keeping(gate: &mut [f32], up: &[f32], out: &mut [f32], silu: &mut [f32]) {
        let n = gate.len();
        let (up, out, silu) = (&up[..n], &mut out[..n], &mut silu[..n]);
        for i in 0..n {
            let g = gate[i];
            let s = sigmoid(g);
            silu[i] = g * s;
            out[i] = g * s * up[i];
            // silu'(g) = s (1 + g (1 - s)).
            gate[i] = s * (1.0 + g * (1.0 - s));
        }
    }
}

simd_kernel! {
    /// The gradients of `silu(gate) * up` given the output's `dys`, from what
    /// [`swiglu_fwd_keeping`] kept: no exponentials.
    fn swiglu_bwd_kept(slopes: &[f32], silu: &[f32], us: &[f32], dys: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        let n = slopes.len();
        let (silu, us, dys, d_gate, d_up) = (&silu[..n], &us[..n], &dys[..n], &mut d_gate[..n], &mut d_up[..n]);
        for i in 0..n {
            d_gate[i] = dys[i] * us[i] * slopes[i];
            d_up[i] = dys[i] * silu[i];
        }
    }
}

/// Elements per task of the SwiGLU passes: whole cache lines, shared over the pool.
const SWIGLU_CHUNK: usize = 1 << 14;

/// `out = silu(gate) * up`, elementwise.
fn swiglu_rows(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(SWIGLU_CHUNK)
        .zip(gate.par_chunks(SWIGLU_CHUNK).zip(up.par_chunks(SWIGLU_CHUNK)))
        .for_each(|(out, (gate, up))| swiglu_fwd(gate, up, out));
}

/// The gradients `d_gate`, `d_up` of [`swiglu_rows`] given the output's `dys`.
fn swiglu_grad(gs: &[f32], us: &[f32], dys: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let inputs = gs.par_chunks(SWIGLU_CHUNK).zip(us.par_chunks(SWIGLU_CHUNK)).zip(dys.par_chunks(SWIGLU_CHUNK));
    let outputs = d_gate.par_chunks_mut(SWIGLU_CHUNK).zip(d_up.par_chunks_mut(SWIGLU_CHUNK));
    inputs
        .zip(outputs)
        .for_each(|(((gs, us), dys), (d_gate, d_up))| swiglu_bwd(gs, us, dys, d_gate, d_up));
}

/// What a training forward pass of SwiGLU keeps: `silu'(gate)` and `silu(gate)`.
pub(super) struct SwigluKept {
    slopes: Vec<f32>,
    silu: Vec<f32>,
}

/// `silu(gate) * up` into `out`, keeping what [`SwigluKept::grad`] reads; `gate` is
/// consumed, and so is `silu`, a buffer as long as `gate` whose entries are overwritten.
pub(super) fn swiglu_rows_keeping(mut gate: Vec<f32>, up: &[f32], out: &mut [f32], mut silu: Vec<f32>) -> SwigluKept {
    assert_eq!(silu.len(), gate.len(), "swiglu: the kept buffer's length");
    gate.par_chunks_mut(SWIGLU_CHUNK)
        .zip(up.par_chunks(SWIGLU_CHUNK))
        .zip(out.par_chunks_mut(SWIGLU_CHUNK).zip(silu.par_chunks_mut(SWIGLU_CHUNK)))
        .for_each(|((gate, up), (out, silu))| swiglu_fwd_keeping(gate, up, out, silu));
    SwigluKept { slopes: gate, silu }
}

impl SwigluKept {
    /// The buffer given to [`swiglu_rows_keeping`], for reuse.
    pub(super) fn into_silu(self) -> Vec<f32> {
        self.silu
    }

    /// `silu(gate) * up` again, as the forward pass computed it.
    pub(super) fn output(&self, up: &[f32]) -> Vec<f32> {
        self.silu.iter().zip(up).map(|(s, u)| s * u).collect()
    }

    /// The gradients `d_gate`, `d_up` given the output's `dys` and the forward's `up`.
    pub(super) fn grad(&self, up: &[f32], dys: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        let kept = self.slopes.par_chunks(SWIGLU_CHUNK).zip(self.silu.par_chunks(SWIGLU_CHUNK));
        let inputs = kept.zip(up.par_chunks(SWIGLU_CHUNK).zip(dys.par_chunks(SWIGLU_CHUNK)));
        let outputs = d_gate.par_chunks_mut(SWIGLU_CHUNK).zip(d_up.par_chunks_mut(SWIGLU_CHUNK));
        inputs.zip(outputs).for_each(|(((slopes, silu), (up, dys)), (d_gate, d_up))| {
            swiglu_bwd_kept(slopes, silu, up, dys, d_gate, d_up)
        });
    }
}

/// `silu(gate) * up`, or `None` when the kernel does not apply.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(gate) || !applies(up) || gate.shape() != up.shape() {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
    ))
}

// ---------------------------------------------------------------- few-row linear

/// Multiply-adds from which a product is shared out over the thread pool: handing
/// work to the pool and waiting for it costs some microseconds, more than a smaller
/// product saves.
const PARALLEL_FROM: usize = 1 << 17;

/// Row counts [`few_rows_linear`] takes: decoding one position, verifying a
/// speculative draft, stepping beams.
const FEW_ROWS: std::ops::RangeInclusive<usize> = 1..=16;

/// Output columns `first..first + out.len() / m` of `x W^T` for the `m` rows of `x`
/// (m, k), column-major into `out`: each weight row is read once for every row.
fn few_rows_columns(x: &[f32], w: &[f32], k: usize, m: usize, first: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= (first + out.len() / m) * k);
    // One row only streams the weights, which a dot product at a time keeps up with.
    #[cfg(target_arch = "x86_64")]
    if m > 1 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for, and the slices
        // hold every row it reads (asserted above).
        return unsafe { few_rows_avx2::columns(x, w, k, m, first, out) };
    }
    dot_columns(x, w, k, m, first, out)
}

simd_kernel! {
    /// [`few_rows_columns`] one dot product at a time.
    fn dot_columns(x: &[f32], w: &[f32], k: usize, m: usize, first: usize, out: &mut [f32]) {
        for (j, column) in out.chunks_exact_mut(m).enumerate() {
            let w_row = &w[(first + j) * k..][..k];
            for (i, y) in column.iter_mut().enumerate() {
                *y = dot(&x[i * k..][..k], w_row);
            }
        }
    }
}

/// The AVX2 form of [`few_rows_columns`]: two weight rows against up to four rows of
/// `x` at a time, so each load of eight weights feeds four multiply-adds and each load
/// of `x` two, in eight accumulators that hide the latency of the multiply-add. (A dot
/// product at a time does one load per multiply-add and waits on its one accumulator.)
/// The weights are prefetched 2 KiB ahead: at four multiply-adds per weight the
/// hardware prefetcher alone falls behind and the loop waits on memory.
#[cfg(target_arch = "x86_64")]
mod few_rows_avx2 {
    use std::arch::x86_64::*;

    /// How far ahead of its loads each weight stream is prefetched, in floats.
    const PREFETCH_AHEAD: usize = 512;

    /// As [`super::few_rows_columns`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `m * k` values and `w` at least
    /// `(first + out.len() / m) * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns(x: &[f32], w: &[f32], k: usize, m: usize, first: usize, out: &mut [f32]) {
        let columns = out.len() / m;
        for j in (0..columns).step_by(2) {
            let w0 = w.as_ptr().add((first + j) * k);
            // An odd last column pairs with itself; the duplicate sums are dropped.
            let pair = j + 1 < columns;
            let w1 = if pair { w0.add(k) } else { w0 };
            for i in (0..m).step_by(4) {
                let xs = x.as_ptr().add(i * k);
                let sums: &[[f32; 2]] = match m - i {
                    1 => &block::<1>(xs, k, w0, w1),
                    2 => &block::<2>(xs, k, w0, w1),
                    3 => &block::<3>(xs, k, w0, w1),
                    _ => &block::<4>(xs, k, w0, w1),
                };
                for (r, pair_sums) in sums.iter().enumerate() {
                    out[j * m + i + r] = pair_sums[0];
                    if pair {
                        out[(j + 1) * m + i + r] = pair_sums[1];
                    }
                }
            }
        }
    }

    /// The dot products of `R` consecutive rows of `x` (each `k` long) with the weight
    /// rows at `w0` and `w1`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize>(x: *const f32, k: usize, w0: *const f32, w1: *const f32) -> [[f32; 2]; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let body = k - k % 8;
        let mut p = 0;
        while p < body {
            // A hint only: an address past the weights is never read.
            _mm_prefetch::<_MM_HINT_T0>(w0.wrapping_add(p + PREFETCH_AHEAD) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w1.wrapping_add(p + PREFETCH_AHEAD) as *const i8);
            let (a, b) = (_mm256_loadu_ps(w0.add(p)), _mm256_loadu_ps(w1.add(p)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(x.add(r * k + p));
                acc[0] = _mm256_fmadd_ps(v, a, acc[0]);
                acc[1] = _mm256_fmadd_ps(v, b, acc[1]);
            }
            p += 8;
        }
        let mut sums = [[0f32; 2]; R];
        for (r, (sums, acc)) in sums.iter_mut().zip(&acc).enumerate() {
            for c in 0..2 {
                sums[c] = sum_lanes(acc[c]);
            }
            for q in body..k {
                let v = *x.add(r * k + q);
                sums[0] += v * *w0.add(q);
                sums[1] += v * *w1.add(q);
            }
        }
        sums
    }

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_lanes(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
    }
}

/// `x W^T` for a few rows of `x` (.., k) against `weight` (n, k), without gradients:
/// each weight row is read once for all the rows, where a general matrix product
/// would first copy the whole weight into its packed layout, which costs more than the
/// arithmetic at one to sixteen rows. `None` when the kernel does not apply.
pub(crate) fn few_rows_linear(xs: &Tensor, weight: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let k = xs.dims().last().copied().unwrap_or(0);
    let rows = xs.elem_count() / k.max(1);
    let applicable = applies(xs)
        && applies(weight)
        && !xs.track_op()
        && !weight.track_op()
        && FEW_ROWS.contains(&rows)
        && weight.dims2().is_ok_and(|(_, wk)| wk == k);
    if !applicable {
        return Ok(None);
    }
    let n = weight.dim(0)?;
    const COLUMNS_PER_TASK: usize = 64;
    // Below PARALLEL_FROM (a 256 x 512 weight for one row) the product runs on the
    // calling thread. Above it, two threads read the weight at twice the bandwidth of one.
    let out = with_host([xs, weight], "few-rows-linear", |[x, w]| {
        let mut by_column = vec![0f32; n * rows];
        let task = |(task, out): (usize, &mut [f32])| {
            few_rows_columns(x, w, k, rows, task * COLUMNS_PER_TASK, out)
        };
        match n * k * rows >= PARALLEL_FROM {
            true => by_column.par_chunks_mut(COLUMNS_PER_TASK * rows).enumerate().for_each(task),
            false => by_column.chunks_mut(COLUMNS_PER_TASK * rows).enumerate().for_each(task),
        }
        let mut out = vec![0f32; rows * n];
        for (j, column) in by_column.chunks_exact(rows).enumerate() {
            for (i, &y) in column.iter().enumerate() {
                out[i * n + j] = y;
            }
        }
        Ok(out)
    })?;
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("at least one dimension") = n;
    Ok(Some(Tensor::from_vec(out, dims, xs.device())?))
}

// ---------------------------------------------------------------- linear

/// `x W^T` as one op of `(x, W)`, forward and backward each one matrix product per
/// result over all the rows of `x` (.., in), W (out, in). candle's `Linear` is a
/// reshape, a transpose and a product, and its backward pass allocates, zeroes and
/// adds a gradient for each of those nodes: a tenth of a small model's training step.
struct FusedLinear;

/// Every thread of the pool for products of [`PARALLEL_FROM`] multiply-adds and more,
/// one below.
fn parallelism(multiply_adds: usize) -> gemm::Parallelism {
    match rayon::current_num_threads() {
        threads if threads > 1 && multiply_adds >= PARALLEL_FROM => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// `data` (rows, cols) row-major.
fn row_major(data: &[f32], cols: usize) -> Strided<'_> {
    Strided { data, rows: data.len() / cols, cols, rs: cols, cs: 1 }
}

/// `x W^T` for `x` (n, in) and `w` (out, in), as a new (n, out) matrix.
pub(super) fn linear_rows(x: &[f32], w: &[f32], in_features: usize) -> Vec<f32> {
    let (x, w) = (row_major(x, in_features), row_major(w, in_features));
    product(parallelism(x.rows * x.cols * w.rows), x, w.t(), 1.0)
}

/// `y += x W^T` for `x` (n, in), `w` (out, in) and `y` (n, out).
pub(super) fn linear_rows_add(y: &mut [f32], x: &[f32], w: &[f32], in_features: usize) {
    let (x, w) = (row_major(x, in_features), row_major(w, in_features));
    matmul_on(parallelism(x.rows * x.cols * w.rows), y, w.rows, true, x, w.t(), 1.0);
}

/// The gradient `dy W` (n, in) of the input of `x W^T`, given `dy` (n, out) and `w`
/// (out, in).
pub(super) fn input_grad(dy: &[f32], w: &[f32], out_features: usize) -> Vec<f32> {
    let (dy, w) = (row_major(dy, out_features), row_major(w, w.len() / out_features));
    product(parallelism(dy.rows * dy.cols * w.cols), dy, w, 1.0)
}

/// `dx += dy W`: as [`input_grad`], added into `dx`.
pub(super) fn input_grad_add(dx: &mut [f32], dy: &[f32], w: &[f32], out_features: usize) {
    let (dy, w) = (row_major(dy, out_features), row_major(w, w.len() / out_features));
    matmul_on(parallelism(dy.rows * dy.cols * w.cols), dx, w.cols, true, dy, w, 1.0);
}

/// The gradient `dy^T x` (out, in) of the weight of `x W^T`, given `dy` (n, out) and
/// `x` (n, in).
pub(super) fn weight_grad(dy: &[f32], out_features: usize, x: &[f32], in_features: usize) -> Vec<f32> {
    let (dy, x) = (row_major(dy, out_features), row_major(x, in_features));
    product(parallelism(dy.rows * dy.cols * x.cols), dy.t(), x, 1.0)
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (out_features, k) = l2.shape().dims2()?;
        let y = linear_rows(x, w, k);
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("at least one dimension") = out_features;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_features, k) = w.dims2()?;
        // Only the gradients someone asks for: a frozen weight (the output layer
        // under LoRA) gets none, and its product would be as large as the forward's.
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = with_host([x, w, grad], self.name(), |[x, w, g]| {
            let dx = want_dx.then(|| input_grad(g, w, out_features));
            let dw = want_dw.then(|| weight_grad(g, out_features, x, k));
            Ok((dx, dw))
        })?;
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?,
            dw.map(|dw| Tensor::from_vec(dw, w.shape(), w.device())).transpose()?,
        ))
    }
}

/// `xs W^T` for `xs` (.., in) and `weight` (out, in) through [`FusedLinear`], or `None`
/// where it does not apply (another dtype or device).
pub(crate) fn linear(xs: &Tensor, weight: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let k = weight.dims2().map(|(_, k)| k);
    if !applies(xs) || !applies(weight) || xs.dims().last().copied() != k.ok() {
        return Ok(None);
    }
    Ok(Some(xs.contiguous()?.apply_op2(&weight.contiguous()?, FusedLinear)?))
}

// ---------------------------------------------------------------- cross-entropy

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
            matmul_on(parallelism(n * c * cols), logits, cols, false, row_major(x, c), block.t(), 1.0);
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
pub(super) fn cross_entropy_grad_in_place(logits: &mut [f32], targets: &[u32], scale: f32) -> f64 {
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

// ---------------------------------------------------------------- attention

/// Rotary tables for the positions `0..t`: cos and sin, each (t, d/2) row-major.
#[derive(Debug, Clone)]
pub(crate) struct RopeTables {
    pub(crate) cos: Arc<Vec<f32>>,
    pub(crate) sin: Arc<Vec<f32>>,
}

/// Causal self-attention with RoPE and grouped-query heads (see [`causal_attention`]).
pub(super) struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
    dropout: Option<AttentionDropout>,
}

/// Dropout on the attention weights (training): weight (i, j) of head `head` in batch
/// row `bi` is kept unless draw `((bi * heads + head) * t + i) * t + j` of the SplitMix64
/// stream of `seed`, as a uniform in [0, 1), falls below `p`; kept weights are scaled by
/// 1 / (1 - p). Indexing the stream lets the backward pass redraw the forward's mask.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionDropout {
    pub(crate) p: f64,
    pub(crate) seed: u64,
}

impl AttentionDropout {
    /// The mask factor (0 or 1 / (1 - p)) of weight (i, j) of attention map `map`
    /// (`bi * heads + head`) over `t` positions.
    #[inline(always)]
    fn factor(&self, map: usize, t: usize, i: usize, j: usize) -> f32 {
        super::dropout::mask_factor(self.seed, ((map * t + i) * t + j) as u64, self.p)
    }

    /// Multiplies `rows` (query rows `i0..`, `keys` columns each) of map `map` by the mask.
    #[inline(always)]
    fn apply(&self, map: usize, t: usize, i0: usize, keys: usize, rows: &mut [f32]) {
        for (r, row) in rows.chunks_exact_mut(keys).enumerate() {
            for (j, w) in row.iter_mut().enumerate().take(i0 + r + 1) {
                *w *= self.factor(map, t, i0 + r, j);
            }
        }
    }
}

/// The shapes one attention call works on.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    h: usize,
    g: usize,
    d: usize,
}

impl CausalAttention {
    /// Attention over `heads` query heads sharing `kv_heads` key/value heads of width
    /// `head_dim`, rotated by `rope` when given, without dropout.
    pub(super) fn new(heads: usize, kv_heads: usize, head_dim: usize, rope: Option<RopeTables>) -> Self {
        CausalAttention { heads, kv_heads, head_dim, rope, dropout: None }
    }

    fn dims(&self, q_len: usize, k_len: usize, t: usize) -> candle_core::Result<Dims> {
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        let b = q_len / (t * h * d);
        if b * t * h * d != q_len || b * t * g * d != k_len {
            bail!("fused-attention: inputs do not match {h} heads, {g} kv heads of width {d}");
        }
        Ok(Dims { t, h, g, d })
    }

    /// The forward pass over `q` (b, t, heads * d) and `k`, `v` (b, t, kv_heads * d):
    /// the (b, t, heads * d) input of `o_proj`.
    pub(super) fn forward_rows(&self, q: &[f32], k: &[f32], v: &[f32], t: usize) -> candle_core::Result<Vec<f32>> {
        Ok(self.forward_maps(q, k, v, t, false)?.0)
    }

    /// [`CausalAttention::forward_rows`], keeping for the backward pass each map's rotated
    /// heads and its (t, t) weights, in map order (`bi * heads + head`).
    pub(super) fn forward_rows_keeping(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<SavedMap>)> {
        self.forward_maps(q, k, v, t, true)
    }

    fn forward_maps(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        keep: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<SavedMap>)> {
        let dims = self.dims(q.len(), k.len(), t)?;
        let Dims { t, h, g, d } = dims;
        let (per_q, per_kv) = (t * h * d, t * g * d);
        // One (batch row, head) pair per task, so a single sequence still uses every core.
        let (heads, saved): (Vec<Vec<f32>>, Vec<Option<SavedMap>>) = (0..q.len() / per_q * h)
            .into_par_iter()
            .map(|task| {
                let bi = task / h;
                let qkv = [
                    &q[bi * per_q..][..per_q],
                    &k[bi * per_kv..][..per_kv],
                    &v[bi * per_kv..][..per_kv],
                ];
                let mut out = vec![0f32; t * d];
                let mut saved = keep.then(|| SavedMap { qh: Vec::new(), kh: Vec::new(), weights: Vec::new() });
                attention_fwd_head(self, dims, task, qkv, &mut out, saved.as_mut());
                (out, saved)
            })
            .unzip();
        Ok((interleave_heads(&heads, t, h, d), saved.into_iter().flatten().collect()))
    }

    /// The backward pass: from the inputs, the output `o` and its gradient `d_o`, the
    /// gradients of `q`, `k` and `v`, in their layouts; `saved` holds what
    /// [`CausalAttention::forward_rows_keeping`] kept, or the weights are recomputed.
    pub(super) fn backward_rows(
        &self,
        rows: [&[f32]; 5],
        t: usize,
        saved: Option<&[SavedMap]>,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let [q, k, v, o, d_o] = rows;
        let dims = self.dims(q.len(), k.len(), t)?;
        let Dims { t, h, g, d } = dims;
        if saved.is_some_and(|maps| maps.len() != q.len() / (t * d)) {
            bail!("fused-attention: the kept maps are not those of these inputs");
        }
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let (per_q, per_kv) = (t * h * d, t * g * d);
        // One (batch row, kv head) pair per task: the task owns the gradients of its
        // kv head and of the query heads sharing it, added into place afterwards.
        let group = h / g;
        let grads: Vec<GroupGrads> = (0..q.len() / per_q * g)
            .into_par_iter()
            .map(|task| {
                let (bi, kv_head) = (task / g, task % g);
                let rows = [
                    &q[bi * per_q..][..per_q],
                    &k[bi * per_kv..][..per_kv],
                    &v[bi * per_kv..][..per_kv],
                    &o[bi * per_q..][..per_q],
                    &d_o[bi * per_q..][..per_q],
                ];
                let mut grads = GroupGrads {
                    dq: vec![0f32; group * t * d],
                    dk: vec![0f32; t * d],
                    dv: vec![0f32; t * d],
                };
                let maps = saved.map(|maps| &maps[bi * h..][..h]);
                attention_bwd_group(self, dims, (bi, kv_head), rows, &mut grads, maps);
                grads
            })
            .collect();
        for (task, grads) in grads.iter().enumerate() {
            let (bi, kv_head) = (task / g, task % g);
            let dq = &mut dq[bi * per_q..][..per_q];
            for (member, dqh) in grads.dq.chunks_exact(t * d).enumerate() {
                self.scatter_add(dqh, h, kv_head * group + member, dq);
            }
            self.scatter_add(&grads.dk, g, kv_head, &mut dk[bi * per_kv..][..per_kv]);
            let dv = &mut dv[bi * per_kv..][..per_kv];
            for (i, row) in grads.dv.chunks_exact(d).enumerate() {
                axpy(1.0, row, &mut dv[(i * g + kv_head) * d..][..d]);
            }
        }
        Ok((dq, dk, dv))
    }

    /// Copies head `head` of `src` (t, heads * d) into `dst` (t, d), rotated when RoPE is on.
    #[inline(always)]
    fn gather(&self, src: &[f32], heads: usize, head: usize, dst: &mut [f32]) {
        gather_head(src, heads, head, self.head_dim, self.rope.as_ref(), dst)
    }

    /// Adds `src` (t, d), a gradient with respect to rotated rows, into head `head` of
    /// `dst` (t, heads * d), rotating it back (the transpose of the rotation).
    #[inline(always)]
    fn scatter_add(&self, src: &[f32], heads: usize, head: usize, dst: &mut [f32]) {
        let d = self.head_dim;
        let half = d / 2;
        for (i, row) in src.chunks_exact(d).enumerate() {
            let y = &mut dst[(i * heads + head) * d..][..d];
            match &self.rope {
                None => axpy(1.0, row, y),
                Some(rope) => {
                    let (cos, sin) = (&rope.cos[i * half..][..half], &rope.sin[i * half..][..half]);
                    for j in 0..half {
                        y[j] += row[j] * cos[j] + row[j + half] * sin[j];
                        y[j + half] += row[j + half] * cos[j] - row[j] * sin[j];
                    }
                }
            }
        }
    }
}

/// Copies head `head` of `src` (t, heads * d) into `dst` (t, d), rotating row `i` to
/// position `i` when `rope` is given: `(x1 cos - x2 sin, x2 cos + x1 sin)` for the
/// halves `x1`, `x2` of the row (the rotate-half form of Llama).
#[inline(always)]
fn gather_head(src: &[f32], heads: usize, head: usize, d: usize, rope: Option<&RopeTables>, dst: &mut [f32]) {
    let half = d / 2;
    for (i, row) in dst.chunks_exact_mut(d).enumerate() {
        let x = &src[(i * heads + head) * d..][..d];
        match rope {
            None => row.copy_from_slice(x),
            Some(rope) => {
                let (cos, sin) = (&rope.cos[i * half..][..half], &rope.sin[i * half..][..half]);
                let ((x1, x2), (y1, y2)) = (x.split_at(half), row.split_at_mut(half));
                let rows = y1.iter_mut().zip(y2).zip(x1.iter().zip(x2));
                for (((y1, y2), (&a, &b)), (&c, &s)) in rows.zip(cos.iter().zip(sin)) {
                    *y1 = a * c - b * s;
                    *y2 = b * c + a * s;
                }
            }
        }
    }
}

simd_kernel! {
    /// [`gather_head`], compiled for the CPU's vector width.
    fn gather_head_simd(src: &[f32], heads: usize, head: usize, d: usize, rope: Option<&RopeTables>, dst: &mut [f32]) {
        gather_head(src, heads, head, d, rope, dst)
    }
}

/// Splits (b, t, heads * d) into heads, (b, heads, t, d), rotated to positions `0..t`
/// when RoPE tables are given: the layout the key/value cache keeps. Forward only.
struct Heads {
    heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = slice(storage, layout, self.name())?;
        let (b, t, width) = layout.shape().dims3()?;
        if width != self.heads * self.head_dim {
            bail!("heads: rows of {width} are not {} heads of {}", self.heads, self.head_dim);
        }
        let (h, d) = (self.heads, self.head_dim);
        let mut out = vec![0f32; src.len()];
        if !out.is_empty() {
            // One task per (batch row, head): its (t, d) block of the output.
            out.par_chunks_mut(t * d).enumerate().for_each(|(task, dst)| {
                let row = &src[task / h * t * h * d..][..t * h * d];
                gather_head_simd(row, h, task % h, d, self.rope.as_ref(), dst);
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }
}

/// `xs` (b, t, heads * d) as (b, heads, t, d), each row `i` rotated to position `i` by
/// `rope` when given; `None` where the kernel does not apply (another dtype or device,
/// or a tensor that needs a gradient).
pub(crate) fn heads(
    xs: &Tensor,
    heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(xs) || xs.track_op() {
        return Ok(None);
    }
    Ok(Some(xs.contiguous()?.apply_op1_no_bwd(&Heads { heads, head_dim, rope })?))
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let out = self.forward_rows(q, k, v, l1.dims()[1])?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let t = res.dims()[1];
        let (dq, dk, dv) = with_host([q, k, v, res, grad], self.name(), |[q, k, v, o, d_o]| {
            self.backward_rows([q, k, v, o, d_o], t, None)
        })?;
        Ok((
            Some(Tensor::from_vec(dq, res.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(dk, k.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(dv, v.shape(), &Device::Cpu)?),
        ))
    }
}

/// The gradients one backward task produces, with respect to the rotated rows, head
/// by head: `dq` for each query head of the group, (t, d) one after another, and `dk`,
/// `dv` (t, d) for the kv head.
struct GroupGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Query rows per block: a block's scores against the keys before it are one matrix
/// product, `(BLOCK, d) x (d, keys)`, as in FlashAttention's tiling (Dao et al. 2022),
/// though the block's whole score rows are kept (at most `BLOCK * t` floats).
const BLOCK: usize = 64;

/// A strided matrix in a slice: entry (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Strided<'a> {
    /// The transpose, over the same slice.
    fn t(self) -> Strided<'a> {
        Strided { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`; `dst` is
/// row-major with rows `dst_rs` apart. One thread: callers run heads in parallel.
fn matmul(dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: Strided, rhs: Strided, scale: f32) {
    matmul_on(gemm::Parallelism::None, dst, dst_rs, accumulate, lhs, rhs, scale)
}

/// [`matmul`] on the threads `parallelism` names.
fn matmul_on(
    parallelism: gemm::Parallelism,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    let out = Strided { data: dst, rows: lhs.rows, cols: rhs.cols, rs: dst_rs, cs: 1 };
    assert!(out.fits(), "matmul: the destination overruns its slice");
    // SAFETY: `dst` holds every entry the product writes (checked just above) and is
    // borrowed mutably, so it aliases neither input.
    unsafe { gemm_into(parallelism, dst.as_mut_ptr(), dst_rs, accumulate, lhs, rhs, scale) }
}

/// `scale * lhs rhs` as a new row-major matrix (`lhs.rows`, `rhs.cols`). The product
/// writes every entry, so the buffer is not zeroed first: zeroing a fresh buffer costs
/// a pass over memory as long as a thin product's.
fn product(parallelism: gemm::Parallelism, lhs: Strided, rhs: Strided, scale: f32) -> Vec<f32> {
    let len = lhs.rows * rhs.cols;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: the buffer has room for the (rows, cols) product with rows `cols` apart;
    // told not to read its destination (`accumulate` false), gemm writes every entry of
    // it and reads none (with an inner dimension of 0 it writes zeros), so all `len`
    // entries are initialised when the length is set.
    unsafe {
        gemm_into(parallelism, dst.as_mut_ptr(), rhs.cols, false, lhs, rhs, scale);
        dst.set_len(len);
    }
    dst
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`, through the
/// `gemm` crate.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `accumulate`) at every entry
/// `r * dst_rs + c` of the (`lhs.rows`, `rhs.cols`) product, and overlap neither input.
unsafe fn gemm_into(
    parallelism: gemm::Parallelism,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "matmul: inner dimensions differ");
    assert!(lhs.fits() && rhs.fits(), "matmul: an operand overruns its slice");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the operands' entries are inside their slices (checked just above), the
    // destination's are the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Turns scores `row` of query `i` into attention weights over keys `0..=i`, in place;
/// the entries after `i` become 0.
#[inline(always)]
fn causal_softmax(row: &mut [f32], i: usize) {
    let (live, masked) = row.split_at_mut(i + 1);
    softmax_in_place(live);
    masked.fill(0.0);
}

/// The attention weights of one head's query rows at `positions`, `q_rows` (one row of
/// `d` per position) and keys `kh` (d wide, one row per position from 0) rotated, into
/// the first `positions.end` columns of `p` (one row per query, `rs` apart).
#[inline(always)]
fn block_weights(q_rows: &[f32], kh: &[f32], d: usize, positions: std::ops::Range<usize>, scale: f32, p: &mut [f32], rs: usize) {
    let (first, rows, keys) = (positions.start, positions.len(), positions.end);
    let q_block = Strided { data: q_rows, rows, cols: d, rs: d, cs: 1 };
    let k_t = Strided { data: kh, rows: d, cols: keys, rs: 1, cs: d };
    matmul(p, rs, false, q_block, k_t, scale);
    for r in 0..rows {
        causal_softmax(&mut p[r * rs..][..keys], first + r);
    }
}

/// What the forward pass of one attention map keeps for the backward pass, so that it
/// neither rotates the heads again nor recomputes the weights: the rotated query and
/// key rows (t, d) and the attention weights (t, t), zero above the diagonal.
pub(super) struct SavedMap {
    qh: Vec<f32>,
    kh: Vec<f32>,
    weights: Vec<f32>,
}

simd_kernel! {
    /// Attention map `map` (`bi * h + head`: query head `head` of batch row `bi`) of
    /// the forward, from that row's `q` (t, h * d), `k`, `v` (t, g * d) into `out` (t, d);
    /// with `keep`, the map's rotated heads and weights are left there.
    fn attention_fwd_head(
        op: &CausalAttention,
        dims: Dims,
        map: usize,
        qkv: [&[f32]; 3],
        out: &mut [f32],
        keep: Option<&mut SavedMap>,
    ) {
        let [q, k, v] = qkv;
        let Dims { t, h, g, d } = dims;
        let head = map % h;
        let scale = 1.0 / (d as f32).sqrt();
        let kv_head = head / (h / g);
        let (mut qh, mut kh) = (vec![0f32; t * d], vec![0f32; t * d]);
        op.gather(q, h, head, &mut qh);
        op.gather(k, g, kv_head, &mut kh);
        // Kept, the weights fill a (t, t) matrix; otherwise one block's rows at a time.
        let keeping = keep.is_some();
        let mut p = vec![0f32; if keeping { t * t } else { BLOCK.min(t) * t }];
        for i0 in (0..t).step_by(BLOCK) {
            let rows = BLOCK.min(t - i0);
            let keys = i0 + rows;
            let (block, rs) = match keeping {
                true => (&mut p[i0 * t..], t),
                false => (&mut p[..rows * keys], keys),
            };
            block_weights(&qh[i0 * d..], &kh, d, i0..keys, scale, block, rs);
            if let Some(dropout) = &op.dropout {
                dropout.apply(map, t, i0, keys, block);
            }
            let weights = Strided { data: block, rows, cols: keys, rs, cs: 1 };
            let values = Strided { data: &v[kv_head * d..], rows: keys, cols: d, rs: g * d, cs: 1 };
            matmul(&mut out[i0 * d..], d, false, weights, values, 1.0);
        }
        if let Some(keep) = keep {
            *keep = SavedMap { qh, kh, weights: p };
        }
    }
}

simd_kernel! {
    /// The attention backward for `task` = (batch row `bi`, kv head `kv_head`) and the
    /// query heads sharing that kv head: from the inputs `q`, `k`, `v`, the output `o`
    /// and its gradient `d_o` into `grads`, reading the forward's rotated heads and
    /// weights from `saved` (the maps of every head of the batch row) when given.
    fn attention_bwd_group(
        op: &CausalAttention,
        dims: Dims,
        task: (usize, usize),
        rows: [&[f32]; 5],
        grads: &mut GroupGrads,
        saved: Option<&[SavedMap]>,
    ) {
        let (bi, kv_head) = task;
        let [q, k, v, o, d_o] = rows;
        let Dims { t, h, g, d } = dims;
        let scale = 1.0 / (d as f32).sqrt();
        let group = h / g;
        let mut q_rotated = Vec::new();
        let mut k_rotated = vec![0f32; if saved.is_some() { 0 } else { t * d }];
        let kh: &[f32] = match saved {
            Some(maps) => &maps[kv_head * group].kh,
            None => {
                op.gather(k, g, kv_head, &mut k_rotated);
                &k_rotated
            }
        };
        let block = BLOCK.min(t) * t;
        let mut p = vec![0f32; if saved.is_some() { 0 } else { block }];
        let mut ds = vec![0f32; block];
        // The dropped-out weights, which the values were summed with.
        let mut dropped = vec![0f32; if op.dropout.is_some() { block } else { 0 }];
        for (member, dqh) in grads.dq.chunks_exact_mut(t * d).enumerate() {
            let head = kv_head * group + member;
            let map = bi * h + head;
            let qh: &[f32] = match saved {
                Some(maps) => &maps[head].qh,
                None => {
                    q_rotated.resize(t * d, 0.0);
                    op.gather(q, h, head, &mut q_rotated);
                    &q_rotated
                }
            };
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                let keys = i0 + rows;
                let ds = &mut ds[..rows * keys];
                // This block's weights (rows, keys), `rs` apart.
                let (weights, rs): (&[f32], usize) = match saved {
                    Some(maps) => (&maps[head].weights[i0 * t..], t),
                    None => {
                        let p = &mut p[..rows * keys];
                        block_weights(&qh[i0 * d..], kh, d, i0..keys, scale, p, keys);
                        (p, keys)
                    }
                };
                // The gradient rows of the block's outputs, (rows, d), h * d apart.
                let d_out = Strided { data: &d_o[(i0 * h + head) * d..], rows, cols: d, rs: h * d, cs: 1 };
                // dP = dO V^T.
                let v_t = Strided { data: &v[kv_head * d..], rows: d, cols: keys, rs: 1, cs: g * d };
                matmul(ds, keys, false, d_out, v_t, 1.0);
                let mut weighted = Strided { data: weights, rows, cols: keys, rs, cs: 1 };
                if let Some(dropout) = &op.dropout {
                    // Through the mask: the gradient of the weights before dropout.
                    dropout.apply(map, t, i0, keys, ds);
                    let dropped = &mut dropped[..rows * keys];
                    for (r, row) in dropped.chunks_exact_mut(keys).enumerate() {
                        row.copy_from_slice(&weights[r * rs..][..keys]);
                    }
                    dropout.apply(map, t, i0, keys, dropped);
                    weighted = Strided { data: dropped, rows, cols: keys, rs: keys, cs: 1 };
                }
                // Softmax backward: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), and the sum
                // is dO_i . O_i (with dropout too: O_i sums the dropped-out weights).
                for (r, ds_row) in ds.chunks_exact_mut(keys).enumerate() {
                    let i = i0 + r;
                    let delta = dot(&d_o[(i * h + head) * d..][..d], &o[(i * h + head) * d..][..d]);
                    for (s, &pj) in ds_row.iter_mut().zip(&weights[r * rs..][..keys]) {
                        *s = pj * (*s - delta) * scale;
                    }
                }
                let scores_grad = Strided { data: ds, rows, cols: keys, rs: keys, cs: 1 };
                // dQ = dS K, dK += dS^T Q, dV += P^T dO.
                let k_rows = Strided { data: kh, rows: keys, cols: d, rs: d, cs: 1 };
                matmul(&mut dqh[i0 * d..], d, false, scores_grad, k_rows, 1.0);
                let q_block = Strided { data: &qh[i0 * d..], rows, cols: d, rs: d, cs: 1 };
                matmul(&mut grads.dk, d, true, scores_grad.t(), q_block, 1.0);
                matmul(&mut grads.dv, d, true, weighted.t(), d_out, 1.0);
            }
        }
    }
}

/// The outputs of each (batch row, head), (t, d) each in that order, interleaved into
/// (b, t, h * d), a block of positions per task.
fn interleave_heads(heads: &[Vec<f32>], t: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; heads.len() * t * d];
    out.par_chunks_mut(h * d).with_min_len(64).enumerate().for_each(|(row, dst)| {
        let (bi, i) = (row / t, row % t);
        for (head, dst) in dst.chunks_exact_mut(d).enumerate() {
            dst.copy_from_slice(&heads[bi * h + head][i * d..][..d]);
        }
    });
    out
}

simd_kernel! {
    /// One head of [`cached_attention`]: queries `qh` (t, d) at positions
    /// `offset..offset + t` over keys `kh` and values `vh` (offset + t, d), into `out` (t, d).
    fn cached_attention_head(qh: &[f32], kh: &[f32], vh: &[f32], d: usize, offset: usize, out: &mut [f32]) {
        let t = qh.len() / d;
        let scale = 1.0 / (d as f32).sqrt();
        let mut p = vec![0f32; BLOCK.min(t) * (offset + t)];
        for i0 in (0..t).step_by(BLOCK) {
            let rows = BLOCK.min(t - i0);
            let keys = offset + i0 + rows;
            let p = &mut p[..rows * keys];
            block_weights(&qh[i0 * d..], kh, d, offset + i0..keys, scale, p, keys);
            let weights = Strided { data: p, rows, cols: keys, rs: keys, cs: 1 };
            let values = Strided { data: vh, rows: keys, cols: d, rs: d, cs: 1 };
            matmul(&mut out[i0 * d..], d, false, weights, values, 1.0);
        }
    }
}

/// Causal attention from `q` (b, heads, t, d), rotated, at positions
/// `offset..offset + t` over `k`, `v` (b, kv_heads, offset + t, d): the keys and values
/// of the cached positions and of the queries' own, as the key/value cache holds them.
/// Returns (b, t, heads * d), the input of `o_proj`, or `None` where the kernel does not
/// apply (another dtype or device, or tensors that need a gradient). Inference only:
/// scoring with a stride and continuing a prefill attend this way without forming the
/// (t, offset + t) scores of every head.
pub(crate) fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> candle_core::Result<Option<Tensor>> {
    if ![q, k, v].iter().all(|x| applies(x) && !x.track_op()) {
        return Ok(None);
    }
    let (b, h, t, d) = q.dims4()?;
    let (_, g, s, _) = k.dims4()?;
    if s != offset + t {
        return Ok(None);
    }
    if k.dims() != [b, g, s, d] || v.dims() != k.dims() || g == 0 || h % g != 0 {
        bail!("cached-attention: q {:?}, k {:?}, v {:?} at offset {offset}", q.dims(), k.dims(), v.dims());
    }
    let out = with_host([q, k, v], "cached-attention", |[q, k, v]| {
        let heads: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|map| {
                let (bi, head) = (map / h, map % h);
                let kv = bi * g + head / (h / g);
                let mut out = vec![0f32; t * d];
                let (kh, vh) = (&k[kv * s * d..][..s * d], &v[kv * s * d..][..s * d]);
                cached_attention_head(&q[map * t * d..][..t * d], kh, vh, d, offset, &mut out);
                out
            })
            .collect();
        Ok(interleave_heads(&heads, t, h, d))
    })?;
    Ok(Some(Tensor::from_vec(out, (b, t, h * d), q.device())?))
}

/// Causal self-attention over `q` (b, t, heads * d) and `k`, `v` (b, t, kv_heads * d),
/// `(heads, kv_heads, d)` given as `shape`, straight from the projections, with RoPE for positions `0..t` when `rope` is given
/// and dropout on the attention weights when `dropout` is; returns (b, t, heads * d),
/// or `None` when the kernel does not apply.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: (usize, usize, usize),
    rope: Option<RopeTables>,
    dropout: Option<AttentionDropout>,
) -> candle_core::Result<Option<Tensor>> {
    let (heads, kv_heads, head_dim) = shape;
    if !applies(q) || !applies(k) || !applies(v) || heads % kv_heads != 0 || head_dim % 2 != 0 {
        return Ok(None);
    }
    let op = CausalAttention {
        heads,
        kv_heads,
        head_dim,
        rope,
        dropout,
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

#[cfg(test)]
mod tests {
    //! Every kernel against the graph of primitive ops it replaces (candle's autograd
    //! is the reference for the gradients), on random inputs.
    use super::*;
    use candle_core::{Var, D};

    fn randn(shape: &[usize], seed: u64) -> Var {
        // A fixed pseudo-random fill, so failures reproduce.
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Var::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn scores_by_vocabulary_block_equal_the_whole_log_softmax() {
        // Three blocks of the vocabulary (4096, 4096, 1808 ids).
        let (n, c, vocab) = (7, 16, 10_000);
        let mut x = randn(&[n, c], 41).as_tensor().to_vec2::<f32>().unwrap();
        let mut w = randn(&[vocab, c], 42).as_tensor().to_vec2::<f32>().unwrap();
        // Row 0 reads column 0 alone, where ids 100 (first block) and 9000 (last) hold
        // the same, largest logit: the first of them is the argmax.
        x[0] = (0..c).map(|j| if j == 0 { 1.0 } else { 0.0 }).collect();
        w[100][0] = 10.0;
        w[9000][0] = 10.0;
        let x = Tensor::new(x, &Device::Cpu).unwrap();
        let w = Tensor::new(w, &Device::Cpu).unwrap();
        let targets = [9000, 4100, 9999, 100, 0, 4095, 8192];
        let got = projected_scores(&x, &w, &targets).unwrap().unwrap();
        let logits = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for ((row, score), &target) in logits.iter().zip(&got).zip(&targets) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_norm = f64::from(max) + row.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
            let top_id = row.iter().position(|&l| l == max).unwrap();
            assert!((f64::from(score.logprob) - (f64::from(row[target as usize]) - log_norm)).abs() < 1e-5);
            assert!((f64::from(score.top_logprob) - (f64::from(max) - log_norm)).abs() < 1e-5);
            assert_eq!(score.top_id as usize, top_id);
        }
        assert_eq!(got[0].top_id, 100);
        // Within one block, the whole-row scoring exactly.
        let small = w.narrow(0, 0, 300).unwrap();
        let small_targets = [3, 299, 0, 150, 7, 100, 42];
        let blocked = projected_scores(&x, &small, &small_targets).unwrap().unwrap();
        let whole = score_rows(&x.matmul(&small.t().unwrap()).unwrap(), &small_targets).unwrap();
        for (a, b) in blocked.iter().zip(&whole) {
            assert_eq!((a.logprob, a.top_logprob, a.top_id), (b.logprob, b.top_logprob, b.top_id));
        }
        // A target outside the vocabulary is an error, not a read past the weight.
        assert!(projected_scores(&x, &small, &[300, 0, 0, 0, 0, 0, 0]).is_err());
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Values of `fused(inputs)` and `reference(inputs)`, and the gradients of
    /// `sum(out * probe)` with respect to every input, agree within `tol`.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&xs), reference(&xs));
        assert!(
            max_diff(&a, &b) < tol,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let probe = randn(a.dims(), 99).as_tensor().clone();
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, x) in xs.iter().enumerate() {
            let (da, db) = (ga.get(x).unwrap(), gb.get(x).unwrap());
            let diff = max_diff(da, db);
            assert!(diff < tol, "gradient of input {i} differs by {diff}");
        }
    }

    #[test]
    fn log_softmax_rows_match_candle_and_normalise() {
        let logits = (randn(&[3, 1000], 40).as_tensor() * 8.0).unwrap();
        let ours = log_softmax_rows(&logits).unwrap();
        let reference = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
        for (row, expected) in ours.iter().zip(&reference) {
            let worst = row.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "log-probabilities differ by {worst}");
            let total: f64 = row.iter().map(|&lp| f64::from(lp).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
        }
    }

    #[test]
    fn cached_attention_matches_the_graph() {
        // Two batch rows, 4 query heads over 2 kv heads of width 8; 5 queries after 7
        // cached positions (two blocks of rows would need more than 64 queries, so a
        // second case has 70).
        for (t, offset) in [(5, 7), (70, 3)] {
            let (b, h, g, d) = (2, 4, 2, 8);
            let q = randn(&[b, h, t, d], 31).as_tensor().detach();
            let k = randn(&[b, g, offset + t, d], 32).as_tensor().detach();
            let v = randn(&[b, g, offset + t, d], 33).as_tensor().detach();
            let ours = cached_attention(&q, &k, &v, offset).unwrap().unwrap();
            let repeat = |x: &Tensor| {
                let (b, g, s, d) = x.dims4().unwrap();
                x.unsqueeze(2).unwrap().expand((b, g, h / g, s, d)).unwrap().reshape((b, h, s, d)).unwrap()
            };
            let scores = (q.matmul(&repeat(&k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..offset + t).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, offset + t), &Device::Cpu).unwrap();
            let weights = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            let reference = weights
                .matmul(&repeat(&v).contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            let diff = max_diff(&ours, &reference);
            assert!(diff < 1e-5, "t {t}, offset {offset}: differs by {diff}");
        }
    }

    #[test]
    fn rms_norm_matches_the_graph() {
        let inputs = [randn(&[3, 5, 16], 1), randn(&[16], 2)];
        let eps = 1e-5;
        check(
            &inputs,
            |x| rms_norm(&x[0], &x[1], eps).unwrap().unwrap(),
            |x| {
                let ms = x[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let r = (ms + eps).unwrap().sqrt().unwrap();
                x[0].broadcast_div(&r)
                    .unwrap()
                    .broadcast_mul(&x[1])
                    .unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn swiglu_matches_the_graph() {
        let inputs = [randn(&[2, 7, 24], 3), randn(&[2, 7, 24], 4)];
        check(
            &inputs,
            |x| swiglu(&x[0], &x[1]).unwrap().unwrap(),
            |x| (x[0].silu().unwrap() * &x[1]).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn linear_matches_the_graph() {
        // Rows over two leading dimensions; the larger shape takes the parallel
        // products. The reference is candle's own product of x and W^T.
        for (dims, out, seed) in [([2, 5, 24], 13, 20), ([3, 40, 96], 70, 21)] {
            let inputs = [randn(&dims, seed), randn(&[out, dims[2]], seed + 10)];
            check(
                &inputs,
                |x| linear(&x[0], &x[1]).unwrap().expect("applies"),
                |x| x[0].broadcast_matmul(&x[1].t().unwrap()).unwrap(),
                1e-4,
            );
        }
        let weight = randn(&[4, 6], 22).as_tensor().clone();
        let wrong_width = randn(&[2, 5], 23).as_tensor().clone();
        assert!(linear(&wrong_width, &weight).unwrap().is_none());
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_gather() {
        let logits = randn(&[10, 7], 5);
        let targets = Tensor::new(&[0u32, 6, 3, 3, 1, 2, 5, 4, 0, 6], &Device::Cpu).unwrap();
        check(
            &[logits],
            |x| {
                cross_entropy(&(&x[0] * 4.0).unwrap(), &targets)
                    .unwrap()
                    .unwrap()
            },
            |x| {
                let logprobs =
                    candle_nn::ops::log_softmax(&(&x[0] * 4.0).unwrap(), D::Minus1).unwrap();
                let picked = logprobs.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
                picked.mean_all().unwrap().neg().unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let logits = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &targets).is_err());
    }

    /// The unfused attention: split heads, rotate half, scores, causal mask, softmax,
    /// weighted values, merge heads.
    fn attention_graph(
        x: &[Tensor],
        h: usize,
        g: usize,
        d: usize,
        rope: Option<&(Tensor, Tensor)>,
        dropout_mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, t, _) = x[0].dims3().unwrap();
        let split = |x: &Tensor, heads: usize| {
            x.reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let rotate = |x: Tensor| match rope {
            None => x,
            Some((cos, sin)) => {
                let (x1, x2) = (
                    x.narrow(3, 0, d / 2).unwrap(),
                    x.narrow(3, d / 2, d / 2).unwrap(),
                );
                let first =
                    (x1.broadcast_mul(cos).unwrap() - x2.broadcast_mul(sin).unwrap()).unwrap();
                let second =
                    (x2.broadcast_mul(cos).unwrap() + x1.broadcast_mul(sin).unwrap()).unwrap();
                Tensor::cat(&[first, second], 3).unwrap()
            }
        };
        let repeat = |x: Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, g, h / g, t, d))
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let q = rotate(split(&x[0], h));
        let k = repeat(rotate(split(&x[1], g)));
        let v = repeat(split(&x[2], g));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let probs = match dropout_mask {
            Some(m) => (probs * m).unwrap(),
            None => probs,
        };
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn tables(t: usize, d: usize) -> (RopeTables, (Tensor, Tensor)) {
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t {
            for i in 0..half {
                let angle = p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let tensors = (
            Tensor::from_slice(&cos, (t, half), &Device::Cpu).unwrap(),
            Tensor::from_slice(&sin, (t, half), &Device::Cpu).unwrap(),
        );
        let host = RopeTables {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        };
        (host, tensors)
    }

    #[test]
    fn attention_matches_the_graph_with_rope_and_gqa() {
        // 150 positions: blocks of queries, the last one short.
        let (b, d) = (2, 8);
        for (t, h, g, with_rope) in [(9, 4, 4, true), (9, 4, 2, true), (9, 3, 1, false), (150, 2, 1, true)] {
            let inputs = [
                randn(&[b, t, h * d], 10),
                randn(&[b, t, g * d], 11),
                randn(&[b, t, g * d], 12),
            ];
            let (host, tensors) = tables(t, d);
            check(
                &inputs,
                |x| {
                    let rope = with_rope.then(|| host.clone());
                    causal_attention(&x[0], &x[1], &x[2], (h, g, d), rope, None)
                        .unwrap()
                        .unwrap()
                },
                |x| attention_graph(x, h, g, d, with_rope.then_some(&tensors), None),
                1e-5,
            );
        }
    }

    #[test]
    fn heads_match_a_transpose_then_candles_rope() {
        // The cache's layout: (b, t, heads * d) -> (b, heads, t, d), rotated by
        // candle-nn's own rotary kernel as the reference.
        let (b, t, h, d) = (2, 70, 3, 8);
        let xs = randn(&[b, t, h * d], 30).as_tensor().detach();
        let split = xs.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (host, (cos, sin)) = tables(t, d);
        let rotated = candle_nn::rotary_emb::rope(&split, &cos, &sin).unwrap();
        let fused = heads(&xs, h, d, Some(host)).unwrap().unwrap();
        assert!(max_diff(&fused, &rotated) < 1e-6, "rotated heads differ by {}", max_diff(&fused, &rotated));
        let plain = heads(&xs, h, d, None).unwrap().unwrap();
        assert_eq!(max_diff(&plain, &split), 0.0);
        // A tensor that needs its gradient is left to the graph.
        assert!(heads(&randn(&[1, 2, 8], 31), 1, 8, None).unwrap().is_none());
    }

    #[test]
    fn attention_dropout_matches_the_graph_with_the_same_mask() {
        // Values and gradients equal the graph's with the mask the kernel draws, and
        // about p of the causal weights are dropped.
        let (b, t, d, h, g) = (2, 70, 8, 4, 2);
        let dropout = AttentionDropout { p: 0.3, seed: 11 };
        let inputs = [
            randn(&[b, t, h * d], 20),
            randn(&[b, t, g * d], 21),
            randn(&[b, t, g * d], 22),
        ];
        let mut factors = vec![0f32; b * h * t * t];
        for (map, rows) in factors.chunks_exact_mut(t * t).enumerate() {
            for (i, row) in rows.chunks_exact_mut(t).enumerate() {
                for (j, f) in row.iter_mut().enumerate().take(i + 1) {
                    *f = dropout.factor(map, t, i, j);
                }
            }
        }
        let causal = b * h * t * (t + 1) / 2;
        let dropped = causal - factors.iter().filter(|&&f| f > 0.0).count();
        let share = dropped as f64 / causal as f64;
        assert!((share - 0.3).abs() < 0.02, "dropped {share}");
        let mask = Tensor::from_vec(factors, (b, h, t, t), &Device::Cpu).unwrap();
        let (host, tensors) = tables(t, d);
        check(
            &inputs,
            |x| {
                causal_attention(&x[0], &x[1], &x[2], (h, g, d), Some(host.clone()), Some(dropout))
                    .unwrap()
                    .unwrap()
            },
            |x| attention_graph(x, h, g, d, Some(&tensors), Some(&mask)),
            1e-5,
        );
    }

    #[test]
    fn few_rows_linear_matches_matmul_and_declines_other_shapes() {
        // Odd widths leave a tail after the last eight and an unpaired last column;
        // the larger weight takes the parallel path.
        for (n, k) in [(37, 24), (37, 27), (301, 517)] {
            let weight = randn(&[n, k], 30).as_tensor().detach();
            for rows in 1..=16 {
                let x = randn(&[1, rows, k], 31 + rows as u64).as_tensor().detach();
                let fast = few_rows_linear(&x, &weight).unwrap().expect("applies");
                let reference = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
                assert!(max_diff(&fast, &reference) < 1e-4, "{rows} rows of {k} against {n}");
            }
        }
        let weight = randn(&[37, 24], 30).as_tensor().detach();
        let many = randn(&[1, 17, 24], 33).as_tensor().detach();
        assert!(few_rows_linear(&many, &weight).unwrap().is_none());
        let tracked = randn(&[1, 4, 24], 34);
        assert!(few_rows_linear(tracked.as_tensor(), &weight).unwrap().is_none());
    }
}
