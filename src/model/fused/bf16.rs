//! Matrix products with bf16 operands and f32 sums: the products of mixed-precision
//! training on the CPU.
//!
//! Each operand is rounded to bf16 (round to nearest even, as `VCVTNEPS2BF16` does)
//! while it is packed, and the products are summed in f32. On CPUs with AVX512-BF16
//! (AMD Zen 4, Intel Cooper Lake and Sapphire Rapids) `VDPBF16PS` multiplies and adds
//! two bf16 pairs per f32 lane, twice the multiply-adds of an f32 `VFMADD` per
//! instruction; elsewhere the rounded operands go through the f32 product, which gives
//! the same values up to the order of the sums.
//!
//! The kernel follows the layout of Goto and van de Geijn (2008): a block of the right
//! operand packed into panels of `NR` columns, a block of the left one into panels
//! of `MR` rows, both as bf16 pairs along the inner dimension, and a register tile of
//! `MR` x `NR` f32 sums that runs over the pairs of a `KC`-deep block.

use super::matmul::{gemm_into, Strided};

/// `x` rounded to bf16 (to nearest, ties to even), as its 16 bits. Like
/// `VCVTNEPS2BF16`, subnormal inputs become zero of the same sign and NaN stays NaN.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    if bits & 0x7F80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16, back as an f32.
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// Whether this CPU runs the AVX512-BF16 kernel; elsewhere [`bf16_into`] rounds the
/// operands and runs the f32 product.
pub(crate) fn has_bf16_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`, with both
/// operands rounded to bf16 and the products summed in f32; `dst` is row-major with
/// rows `dst_rs` apart. On `gemm::Parallelism::Rayon(t)` the rows are shared out in `t`
/// bands over the current rayon pool.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `accumulate`) at every entry
/// `r * dst_rs + c` of the (`lhs.rows`, `rhs.cols`) product, and overlap neither input.
pub(super) unsafe fn bf16_into(
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
    if m == 0 || n == 0 {
        return;
    }
    if !has_bf16_kernel() {
        // SAFETY: as the caller promised.
        unsafe { rounded_product(parallelism, dst, dst_rs, accumulate, lhs, rhs, scale) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller promised; the CPU has AVX512-BF16 (checked above).
    unsafe {
        avx512::banded(parallelism, dst, dst_rs, accumulate, lhs, rhs, scale)
    };
}

/// [`bf16_into`] without the AVX512-BF16 kernel: the operands rounded to bf16 into f32
/// copies, then the f32 product.
///
/// # Safety
/// As [`bf16_into`]'s.
unsafe fn rounded_product(
    parallelism: gemm::Parallelism,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    let (a, b) = (rounded(lhs), rounded(rhs));
    let a = Strided { data: &a, rs: lhs.cols, cs: 1, ..lhs };
    let b = Strided { data: &b, rs: rhs.cols, cs: 1, ..rhs };
    // SAFETY: the caller's promise about `dst`, which overlaps none of these copies.
    unsafe { gemm_into(parallelism, dst, dst_rs, accumulate, a, b, scale) };
}

/// The entries of `v` rounded to bf16, as a row-major f32 matrix.
fn rounded(v: Strided) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.rows * v.cols);
    for r in 0..v.rows {
        out.extend((0..v.cols).map(|c| round_bf16(v.data[r * v.rs + c * v.cs])));
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{bf16_bits, Strided};

    /// Rows of the register tile.
    const MR: usize = 12;
    /// Columns of the register tile: two vectors of 16 f32 lanes.
    const NR: usize = 32;
    /// Inner dimension of one packed block (an even number): a panel of the right operand,
    /// `KC / 2` pairs by [`NR`] columns, takes 16 KiB and stays in L1.
    const KC: usize = 256;
    /// Columns of one packed block of the right operand (256 KiB at most, in L2).
    const NC: usize = 512;
    /// Rows of one packed block of the left operand.
    const MC: usize = 96;

    /// [`super::bf16_into`] on the kernel: contiguous bands of rows, a whole number of
    /// tiles each, one per thread of `parallelism`.
    ///
    /// # Safety
    /// As [`super::bf16_into`]'s, and the CPU must have AVX512F, AVX512BW and AVX512-BF16.
    pub(super) unsafe fn banded(
        parallelism: gemm::Parallelism,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        lhs: Strided,
        rhs: Strided,
        scale: f32,
    ) {
        let m = lhs.rows;
        let threads = match parallelism {
            gemm::Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        let band = m.div_ceil(threads).next_multiple_of(MR);
        if band >= m {
            // SAFETY: as the caller promised.
            unsafe { product(dst, dst_rs, accumulate, lhs, rhs, scale) };
            return;
        }
        let dst = SendPtr(dst);
        rayon::scope(|scope| {
            for first in (0..m).step_by(band) {
                let rows = band.min(m - first);
                let lhs = Strided { data: &lhs.data[first * lhs.rs..], rows, ..lhs };
                let dst = &dst;
                scope.spawn(move |_| {
                    // SAFETY: each band writes its own rows of `dst`, inside what the
                    // caller promised.
                    unsafe { product(dst.0.add(first * dst_rs), dst_rs, accumulate, lhs, rhs, scale) };
                });
            }
        });
    }

    /// A destination pointer that the row bands of one product share; each writes rows
    /// of its own.
    struct SendPtr(*mut f32);
    // SAFETY: the bands write disjoint rows (see `banded`).
    unsafe impl Sync for SendPtr {}


    /// One operand seen as `outer` lines (rows of the left operand, columns of the
    /// right one) along the inner dimension: entry (o, i) is `data[o * os + i * is]`.
    #[derive(Clone, Copy)]
    struct Lines<'a> {
        data: &'a [f32],
        outer: usize,
        os: usize,
        is: usize,
    }

    /// Packs lines `o0..o0 + W` (zeros past the last line) over inner indices
    /// `i0..i0 + kc` (zeros for the odd one past the end) into `dst`: for each pair of
    /// inner indices, `W` words of two bf16 each, the even index in the low half.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn pack_panel<const W: usize>(v: Lines, o0: usize, i0: usize, kc: usize, dst: &mut [u32]) {
        let pairs = kc.div_ceil(2);
        let lines = W.min(v.outer.saturating_sub(o0));
        debug_assert!(dst.len() >= pairs * W);
        if v.is == 1 {
            // Each line is contiguous: for 16 lines at a time, 32 entries (16 pairs) of
            // each become one vector of pairs, and the 16 x 16 block of pairs is
            // transposed so that each pair's words for the 16 lines go out in one store.
            for first in (0..W).step_by(16) {
                let group = (W - first).min(16);
                let store = ((1u32 << group) - 1) as __mmask16;
                for start in (0..kc).step_by(32) {
                    let mut block = [_mm512_setzero_si512(); 16];
                    for (l, row) in block.iter_mut().enumerate().take(group.min(lines.saturating_sub(first))) {
                        let chunk = &v.data[(o0 + first + l) * v.os + i0 + start..][..(kc - start).min(32)];
                        let pairs = _mm512_cvtne2ps_pbh(load_masked(chunk, 16), load_masked(chunk, 0));
                        *row = std::mem::transmute::<__m512bh, __m512i>(pairs);
                    }
                    let block = transpose_16x16(block);
                    for (q, words) in block.iter().enumerate().take((kc - start).min(32).div_ceil(2)) {
                        let at = (start / 2 + q) * W + first;
                        _mm512_mask_storeu_epi32(dst[at..at + group].as_mut_ptr().cast(), store, *words);
                    }
                }
            }
        } else if v.os == 1 {
            // Lines side by side: two rows of the inner dimension, 16 lines at a time,
            // interleaved into pairs.
            for p in 0..pairs {
                let even = &v.data[(i0 + 2 * p) * v.is + o0..][..lines];
                let odd = match 2 * p + 1 < kc {
                    true => &v.data[(i0 + 2 * p + 1) * v.is + o0..][..lines],
                    false => &[][..],
                };
                for start in (0..W).step_by(16) {
                    let width = (W - start).min(16);
                    let lo = widen(_mm512_cvtneps_pbh(load_masked(even, start)));
                    let hi = widen(_mm512_cvtneps_pbh(load_masked(odd, start)));
                    let words = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                    let mask = ((1u32 << width) - 1) as __mmask16;
                    let at = p * W + start;
                    _mm512_mask_storeu_epi32(dst[at..at + width].as_mut_ptr().cast(), mask, words);
                }
            }
        } else {
            for p in 0..pairs {
                for o in 0..W {
                    let entry = |i: usize| match o < lines && i < kc {
                        true => u32::from(bf16_bits(v.data[(o0 + o) * v.os + (i0 + i) * v.is])),
                        false => 0,
                    };
                    dst[p * W + o] = entry(2 * p) | entry(2 * p + 1) << 16;
                }
            }
        }
    }

    /// The transpose of a 16 x 16 block of 32-bit words, one row per vector: 32-bit
    /// and 64-bit interleaves within each 128-bit lane, then two rounds of lane
    /// shuffles.
    #[inline(always)]
    unsafe fn transpose_16x16(rows: [__m512i; 16]) -> [__m512i; 16] {
        let mut a = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_epi32(rows[2 * k], rows[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_epi32(rows[2 * k], rows[2 * k + 1]);
        }
        // b[4k + c], lane l: column 4l + c of rows 4k..4k + 4.
        let mut b = [_mm512_setzero_si512(); 16];
        for k in 0..4 {
            b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
            b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
        }
        // Column 4l + c is lane l of b[c], b[4 + c], b[8 + c], b[12 + c].
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            // Lanes 0, 1 (e0, f0) and 2, 3 (e1, f1) of two vectors side by side.
            let e0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[c], b[4 + c]);
            let e1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[c], b[4 + c]);
            let f0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[8 + c], b[12 + c]);
            let f1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[8 + c], b[12 + c]);
            out[c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(e0, f0);
            out[4 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(e0, f0);
            out[8 + c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(e1, f1);
            out[12 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(e1, f1);
        }
        out
    }

    /// Up to 16 entries of `line` from `start`, zeros past its end.
    #[inline(always)]
    unsafe fn load_masked(line: &[f32], start: usize) -> __m512 {
        let n = line.len().saturating_sub(start).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        _mm512_maskz_loadu_ps(mask, line.as_ptr().wrapping_add(start))
    }

    /// 16 bf16 values zero-extended to 32-bit lanes.
    #[inline(always)]
    unsafe fn widen(v: __m256bh) -> __m512i {
        _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v))
    }

    /// Where a register tile goes: `rows` x `cols` entries (at most [`MR`] x [`NR`])
    /// from `ptr`, rows `rs` apart, that take `scale` times the tile's sums, written
    /// over them or, with `add`, added to them.
    #[derive(Clone, Copy)]
    struct TileOut {
        ptr: *mut f32,
        rs: usize,
        rows: usize,
        cols: usize,
        scale: f32,
        add: bool,
    }

    /// The sums over `pairs` pairs of a packed left panel `a` and right panel `b`, into
    /// `out`.
    #[inline(always)]
    unsafe fn tile(pairs: usize, a: *const u32, b: *const u32, out: TileOut) {
        let mut sums = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            let a = a.add(p * MR);
            for (r, sum) in sums.iter_mut().enumerate() {
                let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
                sum[0] = _mm512_dpbf16_ps(sum[0], pair, b0);
                sum[1] = _mm512_dpbf16_ps(sum[1], pair, b1);
            }
        }
        let scale = _mm512_set1_ps(out.scale);
        let masks = [column_mask(out.cols, 0), column_mask(out.cols, 16)];
        for (r, sum) in sums.iter().enumerate().take(out.rows) {
            for (half, &mask) in masks.iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                let at = out.ptr.add(r * out.rs + 16 * half);
                let mut value = _mm512_mul_ps(sum[half], scale);
                if out.add {
                    value = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), value);
                }
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }

    /// The lanes of the 16 columns from `start` that lie within `cols`.
    #[inline(always)]
    fn column_mask(cols: usize, start: usize) -> __mmask16 {
        let n = cols.saturating_sub(start).min(16);
        ((1u32 << n) - 1) as __mmask16
    }

    /// The blocked product (see the module doc) on the calling thread.
    ///
    /// # Safety
    /// As [`super::bf16_into`]'s, and the CPU must have AVX512F, AVX512BW and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn product(dst: *mut f32, dst_rs: usize, accumulate: bool, lhs: Strided, rhs: Strided, scale: f32) {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        let left = Lines { data: lhs.data, outer: m, os: lhs.rs, is: lhs.cs };
        let right = Lines { data: rhs.data, outer: n, os: rhs.cs, is: rhs.rs };
        // Each thread keeps its packing buffers from product to product: zeroing fresh
        // ones would cost a pass over a quarter megabyte for every product.
        thread_local! {
            static PACKED: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        let mut buffers = PACKED.with(|packed| packed.take());
        let (packed_a, packed_b) = &mut buffers;
        packed_a.resize(packed_a.len().max(KC / 2 * MC.min(m.next_multiple_of(MR))), 0);
        packed_b.resize(packed_b.len().max(KC / 2 * NC.min(n.next_multiple_of(NR))), 0);
        if k == 0 && !accumulate {
            for r in 0..m {
                std::ptr::write_bytes(dst.add(r * dst_rs), 0, n);
            }
        }
        for i0 in (0..k).step_by(KC) {
            let kc = KC.min(k - i0);
            let pairs = kc.div_ceil(2);
            let add = accumulate || i0 > 0;
            for j0 in (0..n).step_by(NC) {
                let nc = NC.min(n - j0);
                for (panel, o0) in (j0..j0 + nc).step_by(NR).enumerate() {
                    pack_panel::<NR>(right, o0, i0, kc, &mut packed_b[panel * pairs * NR..][..pairs * NR]);
                }
                for r0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - r0);
                    for (panel, o0) in (r0..r0 + mc).step_by(MR).enumerate() {
                        pack_panel::<MR>(left, o0, i0, kc, &mut packed_a[panel * pairs * MR..][..pairs * MR]);
                    }
                    for (col_panel, c) in (0..nc).step_by(NR).enumerate() {
                        let b = packed_b.as_ptr().add(col_panel * pairs * NR);
                        for (row_panel, r) in (0..mc).step_by(MR).enumerate() {
                            let a = packed_a.as_ptr().add(row_panel * pairs * MR);
                            let out = TileOut {
                                ptr: dst.add((r0 + r) * dst_rs + j0 + c),
                                rs: dst_rs,
                                rows: MR.min(mc - r),
                                cols: NR.min(nc - c),
                                scale,
                                add,
                            };
                            tile(pairs, a, b, out);
                        }
                    }
                }
            }
        }
        PACKED.with(|packed| packed.replace(buffers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        let cases: [(f32, u16); 10] = [
            (1.0, 0x3F80),
            (-2.5, 0xC020),
            // Halfway between 1 and 1 + 2^-7: ties to the even 1.
            (1.0 + 2f32.powi(-8), 0x3F80),
            // Halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6.
            (1.0 + 3.0 * 2f32.powi(-8), 0x3F82),
            // Just past halfway: up.
            (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 0x3F81),
            (f32::MAX, 0x7F80),
            (f32::INFINITY, 0x7F80),
            (f32::MIN_POSITIVE / 2.0, 0x0000),
            (-f32::MIN_POSITIVE / 2.0, 0x8000),
            (f32::MIN_POSITIVE, 0x0080),
        ];
        for (x, bits) in cases {
            assert_eq!(bf16_bits(x), bits, "{x:e}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(-f32::NAN).is_nan());
    }

    /// The CPU's own conversion agrees with [`bf16_bits`] on a spread of values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rounding_matches_the_cpu_instruction() {
        if !has_bf16_kernel() {
            eprintln!("no AVX512-BF16 on this CPU: the instruction is not compared");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn convert(values: &[f32; 16]) -> [u16; 16] {
            use std::arch::x86_64::*;
            let v = _mm512_loadu_ps(values.as_ptr());
            std::mem::transmute(_mm512_cvtneps_pbh(v))
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..4096 {
            let values: [f32; 16] = std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                f32::from_bits((state >> 32) as u32)
            });
            // SAFETY: the CPU has the features (checked above).
            let hardware = unsafe { convert(&values) };
            for (x, bits) in values.iter().zip(hardware) {
                if x.is_nan() {
                    assert!(f32::from_bits(u32::from(bits) << 16).is_nan());
                } else {
                    assert_eq!(bf16_bits(*x), bits, "{x:e} ({:#010x})", x.to_bits());
                }
            }
        }
    }

    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A product through `run`, over the four ways the training pass lays out its
    /// operands (rows of the left operand and columns of the right one contiguous
    /// along the inner dimension or across it) and a strided one, against f64 sums of
    /// the bf16-rounded operands. The tolerance is f32 summation error; skipping the
    /// rounding (a relative change of about 2^-9 per operand) would fail it.
    fn check_layouts(run: unsafe fn(gemm::Parallelism, *mut f32, usize, bool, Strided, Strided, f32)) {
        let shapes = [(1, 1, 1), (13, 7, 33), (97, 300, 70), (25, 513, 600), (12, 0, 5)];
        for (m, k, n) in shapes {
            let a = fill(2 * m * k.max(1), 1);
            let b = fill(2 * k.max(1) * n, 2);
            let layouts: [(&str, Strided, Strided); 5] = [
                ("rows x columns^T", Strided { data: &a, rows: m, cols: k, rs: k, cs: 1 }, Strided { data: &b, rows: k, cols: n, rs: 1, cs: k }),
                ("rows x rows", Strided { data: &a, rows: m, cols: k, rs: k, cs: 1 }, Strided { data: &b, rows: k, cols: n, rs: n, cs: 1 }),
                ("columns^T x rows", Strided { data: &a, rows: m, cols: k, rs: 1, cs: m }, Strided { data: &b, rows: k, cols: n, rs: n, cs: 1 }),
                ("columns^T x columns^T", Strided { data: &a, rows: m, cols: k, rs: 1, cs: m }, Strided { data: &b, rows: k, cols: n, rs: 1, cs: k }),
                ("strided", Strided { data: &a, rows: m, cols: k, rs: 2 * k, cs: 2 }, Strided { data: &b, rows: k, cols: n, rs: 2 * n, cs: 2 }),
            ];
            for (name, lhs, rhs) in layouts {
                let at = |v: &Strided, r: usize, c: usize| f64::from(round_bf16(v.data[r * v.rs + c * v.cs]));
                for (threads, accumulate) in [(1, false), (1, true), (2, false), (2, true)] {
                    // Rows three wider than the product: the gap must stay untouched.
                    let dst_rs = n + 3;
                    let before = fill(m * dst_rs, 3);
                    let mut dst = before.clone();
                    let parallelism = match threads {
                        1 => gemm::Parallelism::None,
                        t => gemm::Parallelism::Rayon(t),
                    };
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    // SAFETY: `dst` holds the (m, n) product with rows `dst_rs` apart.
                    pool.install(|| unsafe { run(parallelism, dst.as_mut_ptr(), dst_rs, accumulate, lhs, rhs, 0.5) });
                    for r in 0..m {
                        for c in 0..dst_rs {
                            let got = dst[r * dst_rs + c];
                            if c >= n {
                                assert_eq!(got, before[r * dst_rs + c], "{name} {m}x{k}x{n}: gap at ({r}, {c})");
                                continue;
                            }
                            let terms = (0..k).map(|i| at(&lhs, r, i) * at(&rhs, i, c));
                            let (sum, size) = terms.fold((0.0, 0.0), |(s, z), t| (s + t, z + t.abs()));
                            let base = if accumulate { f64::from(before[r * dst_rs + c]) } else { 0.0 };
                            let want = base + 0.5 * sum;
                            let tol = 1e-6 * (1.0 + size) + 1e-6 * want.abs();
                            assert!(
                                (f64::from(got) - want).abs() <= tol,
                                "{name} {m}x{k}x{n}, {threads} thread(s), accumulate {accumulate}: ({r}, {c}) is {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_sum_the_rounded_operands() {
        check_layouts(bf16_into);
    }

    #[test]
    fn the_fallback_sums_the_same_rounded_operands() {
        check_layouts(rounded_product);
    }
}
