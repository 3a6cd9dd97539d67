//! Row arithmetic the kernels share: e^x without the C library, and dot products,
//! maxima, sums of exponentials and softmax kept in eight lanes so that their loops
//! compile to vector instructions; also the log-softmax of logit rows that a decoding
//! step reads.

use candle_core::{DType, Tensor};

use crate::simd::simd_kernel;

/// e^x to about 2 ulp (Cephes' `expf` polynomial), written without branches so that a
/// loop of it compiles to vector instructions, unlike the C library's `expf`.
/// Saturates to the smallest normal below x = -87.3 and overflows to +inf above 88.7;
/// NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
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
pub(super) fn max_of(xs: &[f32]) -> f32 {
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
pub(super) fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
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
pub(super) fn softmax_in_place(xs: &mut [f32]) -> f32 {
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
pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}
