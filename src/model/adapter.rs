//! The hook that lets a projection carry low-rank adapters (Hu et al. 2021, "LoRA"):
//! `y = x W^T + b + sum_k scale_k * (dropout(x) A_k^T) B_k^T`, with `A_k` (r, in) and
//! `B_k` (out, r).
//!
//! A [`Projection`] is a linear layer plus a list of [`LoraBranch`]es, empty for a plain
//! model, so a model without adapters runs exactly the plain `x W^T + b`. What adapters
//! are, how they are named, read, written, trained and merged lives in `crate::lora`;
//! this file only applies them.
//!
//! Training only the adapters must not pay for the frozen weights' gradients: candle's
//! matmul backward computes both operands' gradients, so a frozen `x W^T` on the CPU
//! runs as [`FrozenLinear`], an op whose backward returns only `dL/dx = dL/dy W`. That
//! saves a weight-sized (times batch, for a broadcast matmul) gradient per projection
//! and a third of the backward's matmul work.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Storage, Tensor};
use candle_nn::Linear;

use super::dropout::DropoutRng;

/// One low-rank update of a projection.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    /// (r, in): the down-projection, PEFT's `lora_A`.
    pub a: Tensor,
    /// (out, r): the up-projection, PEFT's `lora_B`.
    pub b: Tensor,
    /// The factor on `B A`: `alpha / r` (or `alpha / sqrt(r)` with rsLoRA), times the
    /// adapter's weight when several are combined.
    pub scale: f64,
    /// Dropout on the branch's input during training (PEFT's `lora_dropout`).
    pub dropout: f64,
}

impl LoraBranch {
    /// `scale * B A` (out, in) in the adapter's dtype: what merging adds to `W`.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale // (out, in)
    }
}

/// A linear layer with optional LoRA branches.
#[derive(Debug, Clone)]
pub struct Projection {
    linear: Linear,
    adapters: Vec<LoraBranch>,
}

impl From<Linear> for Projection {
    fn from(linear: Linear) -> Self {
        Projection {
            linear,
            adapters: Vec::new(),
        }
    }
}

impl Projection {
    /// The base layer, without adapters.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// The base weight (out, in).
    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    /// The adapters applied on top of the base layer.
    pub fn adapters(&self) -> &[LoraBranch] {
        &self.adapters
    }

    /// Adds an adapter branch.
    pub fn push_adapter(&mut self, branch: LoraBranch) {
        self.adapters.push(branch);
    }

    /// Folds every adapter into the weight, `W + sum scale B A` computed in f64, and
    /// drops the branches: the merged layer runs at the plain layer's cost.
    pub fn merge(&mut self) -> candle_core::Result<()> {
        if self.adapters.is_empty() {
            return Ok(());
        }
        let weight = self.linear.weight();
        // Summed in f64 so that the merged weight is W + scale B A rounded once.
        let mut merged = weight.to_dtype(DType::F64)?;
        for branch in &self.adapters {
            let wide = LoraBranch {
                a: branch.a.to_dtype(DType::F64)?,
                b: branch.b.to_dtype(DType::F64)?,
                ..branch.clone()
            };
            merged = (merged + wide.delta()?)?;
        }
        let merged = merged.to_dtype(weight.dtype())?;
        self.linear = Linear::new(merged, self.linear.bias().cloned());
        self.adapters.clear();
        Ok(())
    }

    /// `x W^T + b` plus every adapter's branch; `rng` (training) turns on their dropout.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rng: Option<&DropoutRng>,
    ) -> candle_core::Result<Tensor> {
        let weight = self.linear.weight();
        // Gradients flow through a frozen weight to `xs` but must not be made for it.
        let frozen = xs.track_op() && !weight.track_op() && xs.device().is_cpu();
        let mut ys = match frozen {
            true => {
                let ys = xs.contiguous()?.apply_op1(FrozenLinear {
                    weight: weight.clone(),
                })?; // (b, t, out)
                match self.linear.bias() {
                    Some(bias) => ys.broadcast_add(bias)?,
                    None => ys,
                }
            }
            false => few_rows_or_linear(&self.linear, xs)?, // (b, t, out)
        };
        for branch in &self.adapters {
            let input = match rng {
                Some(rng) => rng.dropout(xs, branch.dropout)?,
                None => xs.clone(),
            };
            let low = input.broadcast_matmul(&branch.a.t()?)?; // (b, t, r)
            let up = low.broadcast_matmul(&branch.b.t()?)?; // (b, t, out)
            ys = (ys + (up * branch.scale)?)?;
        }
        Ok(ys)
    }
}

/// `linear` applied to `xs`, through the few-row kernel when it applies (decoding a
/// handful of positions at once).
pub(crate) fn few_rows_or_linear(linear: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
    match super::fused::few_rows_linear(xs, linear.weight())? {
        Some(ys) => match linear.bias() {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        },
        None => linear.forward(xs),
    }
}

/// `x W^T` for a weight that is not trained: the backward pass gives `x` its gradient
/// and computes nothing for `W`.
struct FrozenLinear {
    /// (out, in)
    weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear needs a contiguous input");
        };
        let (shape, cpu) = (layout.shape().clone(), &Device::Cpu);
        let xs = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, cpu)?,
            CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, cpu)?,
            CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, cpu)?,
            _ => candle_core::bail!("frozen-linear needs a float input"),
        };
        // The plain layer's own forward, so results are bit-identical to it; detached:
        // this matmul is the op's own business, not part of the graph.
        let ys = Linear::new(self.weight.detach(), None)
            .forward(&xs)?
            .contiguous()?; // (.., out)
        let out_shape = ys.shape().clone();
        let (ys_storage, _) = ys.storage_and_layout();
        match &*ys_storage {
            Storage::Cpu(cpu) => Ok((cpu.clone(), out_shape)),
            _ => candle_core::bail!("frozen-linear ran off the CPU"),
        }
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy W: (.., out) x (out, in) -> (.., in)
        Ok(Some(grad_ys.broadcast_matmul(&self.weight.detach())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn ramp(shape: &[usize], step: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * step).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_linear_gives_the_input_gradient_of_a_plain_matmul_and_none_for_the_weight() {
        let weight = ramp(&[5, 4], 0.1); // (out, in)
        let x = Var::from_tensor(&ramp(&[2, 3, 4], 0.2)).unwrap(); // (b, t, in)
        let plain = x.as_tensor().broadcast_matmul(&weight.t().unwrap()).unwrap();
        let frozen = x
            .as_tensor()
            .apply_op1(FrozenLinear {
                weight: weight.clone(),
            })
            .unwrap();
        let diff = (&plain - &frozen).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let grad = |ys: &Tensor| {
            let loss = (ys.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let store = loss.backward().unwrap();
            let gx = store.get(x.as_tensor()).unwrap().clone();
            (gx, store.get(&weight).is_some())
        };
        let (plain_gx, _) = grad(&plain);
        let (frozen_gx, weight_grad) = grad(&frozen);
        let diff = (plain_gx - frozen_gx).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        assert!(!weight_grad);
        assert_eq!(frozen.dtype(), DType::F32);
    }
}
