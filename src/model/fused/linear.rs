//! Linear layers, `x W^T`: one op whose forward and backward are each one matrix
//! product over all rows (training, prefill, scoring), and a kernel for a few rows
//! (decoding, draft verification, beams) that reads each weight row once.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul_on, parallelism, product, row_major, Products, PARALLEL_FROM};
use super::rows::dot;
use super::{applies, slice, with_host};
use crate::simd::simd_kernel;

/// `x W^T` as one op of `(x, W)`, forward and backward each one matrix product per
/// result over all the rows of `x` (.., in), W (out, in). candle's `Linear` is a
/// reshape, a transpose and a product, and its backward pass allocates, zeroes and
/// adds a gradient for each of those nodes: a tenth of a small model's training step.
struct FusedLinear;

/// `x W^T` for `x` (n, in) and `w` (out, in), as a new (n, out) matrix.
pub(crate) fn linear_rows(products: Products, x: &[f32], w: &[f32], in_features: usize) -> Vec<f32> {
    let (x, w) = (row_major(x, in_features), row_major(w, in_features));
    product(products, parallelism(x.rows * x.cols * w.rows), x, w.t(), 1.0)
}

/// `y += x W^T` for `x` (n, in), `w` (out, in) and `y` (n, out).
pub(crate) fn linear_rows_add(products: Products, y: &mut [f32], x: &[f32], w: &[f32], in_features: usize) {
    let (x, w) = (row_major(x, in_features), row_major(w, in_features));
    matmul_on(products, parallelism(x.rows * x.cols * w.rows), y, w.rows, true, x, w.t(), 1.0);
}

/// The gradient `dy W` (n, in) of the input of `x W^T`, given `dy` (n, out) and `w`
/// (out, in).
pub(crate) fn input_grad(products: Products, dy: &[f32], w: &[f32], out_features: usize) -> Vec<f32> {
    let (dy, w) = (row_major(dy, out_features), row_major(w, w.len() / out_features));
    product(products, parallelism(dy.rows * dy.cols * w.cols), dy, w, 1.0)
}

/// `dx += dy W`: as [`input_grad`], added into `dx`.
pub(crate) fn input_grad_add(products: Products, dx: &mut [f32], dy: &[f32], w: &[f32], out_features: usize) {
    let (dy, w) = (row_major(dy, out_features), row_major(w, w.len() / out_features));
    matmul_on(products, parallelism(dy.rows * dy.cols * w.cols), dx, w.cols, true, dy, w, 1.0);
}

/// The gradient `dy^T x` (out, in) of the weight of `x W^T`, given `dy` (n, out) and
/// `x` (n, in).
pub(crate) fn weight_grad(products: Products, dy: &[f32], out_features: usize, x: &[f32], in_features: usize) -> Vec<f32> {
    let (dy, x) = (row_major(dy, out_features), row_major(x, in_features));
    product(products, parallelism(dy.rows * dy.cols * x.cols), dy.t(), x, 1.0)
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
        let y = linear_rows(Products::F32, x, w, k);
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
            let dx = want_dx.then(|| input_grad(Products::F32, g, w, out_features));
            let dw = want_dw.then(|| weight_grad(Products::F32, g, out_features, x, k));
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

// ---------------------------------------------------------------- few-row linear

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
