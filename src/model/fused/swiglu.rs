//! SwiGLU (Shazeer 2020), `silu(gate) * up`, forward and backward each one pass; the
//! hand-written training pass keeps `silu(gate)` from the forward for the backward.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::rows::exp;
use super::{applies, slice, with_host};
use crate::simd::simd_kernel;

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
pub(crate) struct SwigluKept {
    slopes: Vec<f32>,
    silu: Vec<f32>,
}

/// `silu(gate) * up` into `out`, keeping what [`SwigluKept::grad`] reads; `gate` is
/// consumed, and so is `silu`, a buffer as long as `gate` whose entries are overwritten.
pub(crate) fn swiglu_rows_keeping(mut gate: Vec<f32>, up: &[f32], out: &mut [f32], mut silu: Vec<f32>) -> SwigluKept {
    assert_eq!(silu.len(), gate.len(), "swiglu: the kept buffer's length");
    gate.par_chunks_mut(SWIGLU_CHUNK)
        .zip(up.par_chunks(SWIGLU_CHUNK))
        .zip(out.par_chunks_mut(SWIGLU_CHUNK).zip(silu.par_chunks_mut(SWIGLU_CHUNK)))
        .for_each(|((gate, up), (out, silu))| swiglu_fwd_keeping(gate, up, out, silu));
    SwigluKept { slopes: gate, silu }
}

impl SwigluKept {
    /// The buffer given to [`swiglu_rows_keeping`], for reuse.
    pub(crate) fn into_silu(self) -> Vec<f32> {
        self.silu
    }

    /// `silu(gate) * up` again, as the forward pass computed it.
    pub(crate) fn output(&self, up: &[f32]) -> Vec<f32> {
        self.silu.iter().zip(up).map(|(s, u)| s * u).collect()
    }

    /// The gradients `d_gate`, `d_up` given the output's `dys` and the forward's `up`.
    pub(crate) fn grad(&self, up: &[f32], dys: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
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
