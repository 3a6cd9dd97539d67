//! Matrix products through the `gemm` crate (or, for bf16 operands, [`super::bf16`])
//! on strided views of slices, and the size from which a product is shared out over
//! the thread pool.

use super::bf16::bf16_into;

/// Multiply-adds from which a product is shared out over the thread pool: handing
/// work to the pool and waiting for it costs some microseconds, more than a smaller
/// product saves.
pub(super) const PARALLEL_FROM: usize = 1 << 17;

/// Every thread of the pool for products of [`PARALLEL_FROM`] multiply-adds and more,
/// one below.
pub(super) fn parallelism(multiply_adds: usize) -> gemm::Parallelism {
    match rayon::current_num_threads() {
        threads if threads > 1 && multiply_adds >= PARALLEL_FROM => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// The arithmetic of a product: f32 throughout, or both operands rounded to bf16 with
/// the products summed in f32 (mixed-precision training, see [`super::bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Products {
    F32,
    Bf16,
}

/// `data` (rows, cols) row-major.
pub(super) fn row_major(data: &[f32], cols: usize) -> Strided<'_> {
    Strided { data, rows: data.len() / cols, cols, rs: cols, cs: 1 }
}

/// A strided matrix in a slice: entry (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> Strided<'a> {
    /// The transpose, over the same slice.
    pub(super) fn t(self) -> Strided<'a> {
        Strided { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`; `dst` is
/// row-major with rows `dst_rs` apart. One thread: callers run heads in parallel.
pub(super) fn matmul(dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: Strided, rhs: Strided, scale: f32) {
    matmul_on(Products::F32, gemm::Parallelism::None, dst, dst_rs, accumulate, lhs, rhs, scale)
}

/// [`matmul`] in the arithmetic `products` names, on the threads `parallelism` names.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_on(
    products: Products,
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
    unsafe { product_into(products, parallelism, dst.as_mut_ptr(), dst_rs, accumulate, lhs, rhs, scale) }
}

/// `scale * lhs rhs` as a new row-major matrix (`lhs.rows`, `rhs.cols`). The product
/// writes every entry, so the buffer is not zeroed first: zeroing a fresh buffer costs
/// a pass over memory as long as a thin product's.
pub(super) fn product(products: Products, parallelism: gemm::Parallelism, lhs: Strided, rhs: Strided, scale: f32) -> Vec<f32> {
    let len = lhs.rows * rhs.cols;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: the buffer has room for the (rows, cols) product with rows `cols` apart;
    // told not to read its destination (`accumulate` false), either product writes every
    // entry of it and reads none (with an inner dimension of 0 it writes zeros), so all
    // `len` entries are initialised when the length is set.
    unsafe {
        product_into(products, parallelism, dst.as_mut_ptr(), rhs.cols, false, lhs, rhs, scale);
        dst.set_len(len);
    }
    dst
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`, in the
/// arithmetic `products` names.
///
/// # Safety
/// As [`gemm_into`]'s.
#[allow(clippy::too_many_arguments)]
unsafe fn product_into(
    products: Products,
    parallelism: gemm::Parallelism,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: the caller's promise is the one both products need.
    unsafe {
        match products {
            Products::F32 => gemm_into(parallelism, dst, dst_rs, accumulate, lhs, rhs, scale),
            Products::Bf16 => bf16_into(parallelism, dst, dst_rs, accumulate, lhs, rhs, scale),
        }
    }
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`, through the
/// `gemm` crate.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `accumulate`) at every entry
/// `r * dst_rs + c` of the (`lhs.rows`, `rhs.cols`) product, and overlap neither input.
pub(super) unsafe fn gemm_into(
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
