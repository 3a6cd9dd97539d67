//! RMSNorm (Zhang & Sennrich 2019), `x / sqrt(mean(x^2) + eps) * w`, forward and
//! backward each one pass per row.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::rows::{axpy, dot, dot3};
use super::{applies, slice, with_host};
use crate::simd::simd_kernel;

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
pub(crate) fn rms_norm_rows(xs: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
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
pub(crate) fn rms_norm_grad(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], add: bool) -> Vec<f32> {
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
