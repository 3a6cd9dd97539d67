//! Causal self-attention: RoPE (rotate-half layout) on q and k, `softmax(q k^T /
//! sqrt(d))` under the causal mask, times v, with grouped-query heads. It reads the
//! projections' (b, t, heads * d) outputs and writes the (b, t, heads * d) input of
//! `o_proj`, so no transposes or copies. Query rows go by blocks of [`BLOCK`], each
//! block's scores one matrix product against the keys before it (FlashAttention's
//! tiling, Dao et al. 2022). The backward pass recomputes or reuses the weights map by
//! map; scoring with a stride attends from the scored rows over the cached keys and
//! values.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul, matmul_on, Products, Strided};
use super::rows::{axpy, dot, softmax_in_place};
use super::{applies, slice, with_host};
use crate::simd::simd_kernel;

/// Rotary tables for the positions `0..t`: cos and sin, each (t, d/2) row-major.
#[derive(Debug, Clone)]
pub(crate) struct RopeTables {
    pub(crate) cos: Arc<Vec<f32>>,
    pub(crate) sin: Arc<Vec<f32>>,
}

/// Causal self-attention with RoPE and grouped-query heads (see [`causal_attention`]).
pub(crate) struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
    dropout: Option<AttentionDropout>,
    /// The arithmetic of its products (f32 but in mixed-precision training).
    products: Products,
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
    pub(super) fn factor(&self, map: usize, t: usize, i: usize, j: usize) -> f32 {
        crate::model::dropout::mask_factor(self.seed, ((map * t + i) * t + j) as u64, self.p)
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
    pub(crate) fn new(heads: usize, kv_heads: usize, head_dim: usize, rope: Option<RopeTables>) -> Self {
        CausalAttention { heads, kv_heads, head_dim, rope, dropout: None, products: Products::F32 }
    }

    /// The same attention with its products in the arithmetic `products` names.
    pub(crate) fn with_products(self, products: Products) -> Self {
        CausalAttention { products, ..self }
    }

    /// `dst = scale * lhs rhs` (or `+=` with `accumulate`) in this attention's
    /// arithmetic, on the calling thread: heads run in parallel.
    #[inline(always)]
    fn matmul(&self, dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: Strided, rhs: Strided, scale: f32) {
        matmul_on(self.products, gemm::Parallelism::None, dst, dst_rs, accumulate, lhs, rhs, scale)
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
    pub(crate) fn forward_rows(&self, q: &[f32], k: &[f32], v: &[f32], t: usize) -> candle_core::Result<Vec<f32>> {
        Ok(self.forward_maps(q, k, v, t, false)?.0)
    }

    /// [`CausalAttention::forward_rows`], keeping for the backward pass each map's rotated
    /// heads and its (t, t) weights, in map order (`bi * heads + head`).
    pub(crate) fn forward_rows_keeping(
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
    pub(crate) fn backward_rows(
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
/// the first `positions.end` columns of `p` (one row per query, `rs` apart), the
/// product in the arithmetic `products` names.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_weights(
    products: Products,
    q_rows: &[f32],
    kh: &[f32],
    d: usize,
    positions: std::ops::Range<usize>,
    scale: f32,
    p: &mut [f32],
    rs: usize,
) {
    let (first, rows, keys) = (positions.start, positions.len(), positions.end);
    let q_block = Strided { data: q_rows, rows, cols: d, rs: d, cs: 1 };
    let k_t = Strided { data: kh, rows: d, cols: keys, rs: 1, cs: d };
    matmul_on(products, gemm::Parallelism::None, p, rs, false, q_block, k_t, scale);
    for r in 0..rows {
        causal_softmax(&mut p[r * rs..][..keys], first + r);
    }
}

/// What the forward pass of one attention map keeps for the backward pass, so that it
/// neither rotates the heads again nor recomputes the weights: the rotated query and
/// key rows (t, d) and the attention weights (t, t), zero above the diagonal.
pub(crate) struct SavedMap {
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
            block_weights(op.products, &qh[i0 * d..], &kh, d, i0..keys, scale, block, rs);
            if let Some(dropout) = &op.dropout {
                dropout.apply(map, t, i0, keys, block);
            }
            let weights = Strided { data: block, rows, cols: keys, rs, cs: 1 };
            let values = Strided { data: &v[kv_head * d..], rows: keys, cols: d, rs: g * d, cs: 1 };
            op.matmul(&mut out[i0 * d..], d, false, weights, values, 1.0);
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
                        block_weights(op.products, &qh[i0 * d..], kh, d, i0..keys, scale, p, keys);
                        (p, keys)
                    }
                };
                // The gradient rows of the block's outputs, (rows, d), h * d apart.
                let d_out = Strided { data: &d_o[(i0 * h + head) * d..], rows, cols: d, rs: h * d, cs: 1 };
                // dP = dO V^T.
                let v_t = Strided { data: &v[kv_head * d..], rows: d, cols: keys, rs: 1, cs: g * d };
                op.matmul(ds, keys, false, d_out, v_t, 1.0);
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
                op.matmul(&mut dqh[i0 * d..], d, false, scores_grad, k_rows, 1.0);
                let q_block = Strided { data: &qh[i0 * d..], rows, cols: d, rs: d, cs: 1 };
                op.matmul(&mut grads.dk, d, true, scores_grad.t(), q_block, 1.0);
                op.matmul(&mut grads.dv, d, true, weighted.t(), d_out, 1.0);
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
            block_weights(Products::F32, &qh[i0 * d..], kh, d, offset + i0..keys, scale, p, keys);
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
        products: Products::F32,
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}
