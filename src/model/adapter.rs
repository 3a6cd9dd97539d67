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

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Module, Shape, Storage, Tensor,
};
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
        let on_cpu = xs.device().is_cpu() && !weight.track_op();
        // Training one adapter on a frozen weight: one op for the whole projection.
        if let ([branch], true) = (self.adapters.as_slice(), on_cpu) {
            if branch.a.track_op() || branch.b.track_op() {
                let op = LoraLinear {
                    weight: weight.clone(),
                    scale: branch.scale,
                    dropout: rng
                        .filter(|_| branch.dropout > 0.0)
                        .map(|rng| (branch.dropout, rng.take_stream(xs.elem_count()))),
                };
                let ys = xs.contiguous()?.apply_op3(
                    &branch.a.contiguous()?,
                    &branch.b.contiguous()?,
                    op,
                )?;
                return match self.linear.bias() {
                    Some(bias) => ys.broadcast_add(bias),
                    None => Ok(ys),
                };
            }
        }
        // Gradients flow through a frozen weight to `xs` but must not be made for it.
        let mut ys = match on_cpu && xs.track_op() {
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

/// `linear` applied to `xs`: through the few-row kernel when it applies (decoding a
/// handful of positions at once), else as one op over all rows (training's products).
pub(crate) fn few_rows_or_linear(linear: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
    let weight = linear.weight();
    let ys = match super::fused::few_rows_linear(xs, weight)? {
        Some(ys) => ys,
        None => match super::fused::linear(xs, weight)? {
            Some(ys) => ys,
            None => return linear.forward(xs),
        },
    };
    match linear.bias() {
        Some(bias) => ys.broadcast_add(bias),
        None => Ok(ys),
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
        let xs = host_tensor(storage, layout, self.name())?;
        // The plain layer's own forward, so results are bit-identical to it; detached:
        // this matmul is the op's own business, not part of the graph.
        let ys = Linear::new(self.weight.detach(), None).forward(&xs)?; // (.., out)
        into_storage(ys, self.name())
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

/// One trained adapter on a frozen weight, `x W^T + scale (dropout(x) A^T) B^T`, as a
/// single op of `(x, A, B)`. Built from the same products as the unfused path, but the
/// graph keeps only the op's inputs and output: the dropout mask, the dropped input and
/// the branch's (b, t, r) and (b, t, out) intermediates are recomputed in the backward
/// instead of held from forward to backward, per projection and layer. That is most of
/// the activation memory adapters would otherwise add to the frozen model's.
struct LoraLinear {
    /// (out, in), frozen.
    weight: Tensor,
    scale: f64,
    /// The dropout probability and the [`DropoutRng`] stream state the mask is drawn
    /// from: element `i` of `x` is dropped when draw `i` of the stream is below `p`.
    dropout: Option<(f64, u64)>,
}

impl LoraLinear {
    /// The dropout factors for an input shaped like `xs` (0 or 1 / (1 - p)), or `None`
    /// without dropout.
    fn mask(&self, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some((p, stream)) = self.dropout else {
            return Ok(None);
        };
        let mask = DropoutRng::mask_of_stream(stream, p, xs.elem_count());
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        Ok(Some(mask))
    }

    /// `dropout(x)`: `xs` times `mask`, or `xs` without dropout.
    fn dropped(xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match mask {
            Some(mask) => xs * mask,
            None => Ok(xs.clone()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let xs = host_tensor(s1, l1, self.name())?; // (.., in)
        let a = host_tensor(s2, l2, self.name())?; // (r, in)
        let b = host_tensor(s3, l3, self.name())?; // (out, r)
        let base = Linear::new(self.weight.detach(), None).forward(&xs)?; // (.., out)
        let dropped = Self::dropped(&xs, self.mask(&xs)?.as_ref())?; // (.., in)
        let low = dropped.broadcast_matmul(&a.t()?)?; // (.., r)
        let up = low.broadcast_matmul(&b.t()?)?; // (.., out)
        into_storage((base + (up * self.scale)?)?, self.name())
    }

    fn bwd(
        &self,
        xs: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wants_grad_xs = xs.track_op();
        let (xs, a, b, dy) = (xs.detach(), a.detach(), b.detach(), grad_ys.detach());
        let (out, r, inputs) = (b.dim(0)?, a.dim(0)?, a.dim(1)?);
        let mask = self.mask(&xs)?;
        let dy_rows = dy.reshape(((), out))?; // (n, out)
        let dropped = Self::dropped(&xs, mask.as_ref())?; // (.., in)
        let low = dropped.broadcast_matmul(&a.t()?)?.reshape(((), r))?; // (n, r)

        // dL/dB = scale dy^T low; dL/d(low) = scale dy B; dL/dA = d(low)^T dropout(x)
        let grad_b = (dy_rows.t()?.matmul(&low)? * self.scale)?; // (out, r)
        let grad_low = (dy_rows.matmul(&b)? * self.scale)?; // (n, r)
        let grad_a = grad_low.t()?.matmul(&dropped.reshape(((), inputs))?)?; // (r, in)

        // dL/dx = dy W + mask * (d(low) A); nothing when x needs no gradient (the
        // frozen embeddings' output feeding the first layer).
        let grad_xs = match wants_grad_xs {
            false => None,
            true => {
                let through_branch = grad_low.matmul(&a)?.reshape(xs.shape())?; // (.., in)
                let through_branch = match &mask {
                    Some(mask) => (through_branch * mask)?,
                    None => through_branch,
                };
                Some((dy.broadcast_matmul(&self.weight.detach())? + through_branch)?)
            }
        };
        Ok((grad_xs, Some(grad_a), Some(grad_b)))
    }
}

/// The elements behind a CPU op's input, as a tensor of the op's own (off the graph).
fn host_tensor(storage: &CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs contiguous inputs");
    };
    let (shape, cpu) = (layout.shape().clone(), &Device::Cpu);
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        _ => candle_core::bail!("{op} needs float inputs"),
    }
}

/// A CPU op's result handed back as storage and shape.
pub(super) fn into_storage(ys: Tensor, op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut ys = ys.contiguous()?;
    if ys.layout().start_offset() != 0 {
        ys = ys.copy()?; // a view into a larger buffer: the storage must start at the data
    }
    let shape = ys.shape().clone();
    let (storage, _) = ys.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok((cpu.clone(), shape)),
        _ => candle_core::bail!("{op} ran off the CPU"),
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
        let plain = x
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap();
        let frozen = x
            .as_tensor()
            .apply_op1(FrozenLinear {
                weight: weight.clone(),
            })
            .unwrap();
        let diff = (&plain - &frozen)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let grad = |ys: &Tensor| {
            let loss = (ys.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let store = loss.backward().unwrap();
            let gx = store.get(x.as_tensor()).unwrap().clone();
            (gx, store.get(&weight).is_some())
        };
        let (plain_gx, _) = grad(&plain);
        let (frozen_gx, weight_grad) = grad(&frozen);
        let diff = (plain_gx - frozen_gx)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        assert!(!weight_grad);
        assert_eq!(frozen.dtype(), DType::F32);
    }

    #[test]
    fn one_trained_adapter_runs_as_one_op_with_the_unfused_values_and_gradients() {
        let weight = ramp(&[5, 4], 0.1); // (out, in)
        let x = Var::from_tensor(&ramp(&[2, 3, 4], 0.2)).unwrap(); // (b, t, in)
        let a = Var::from_tensor(&ramp(&[2, 4], 0.3)).unwrap(); // (r, in)
        let b = Var::from_tensor(&(ramp(&[5, 2], 0.05) + 0.01).unwrap()).unwrap(); // (out, r)
        let (scale, p, seed) = (1.5, 0.25, 11);
        let mut projection = Projection::from(Linear::new(weight.clone(), None));
        projection.push_adapter(LoraBranch {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
            dropout: p,
        });
        let fused = projection
            .forward(x.as_tensor(), Some(&DropoutRng::new(seed)))
            .unwrap();
        // The same products in plain candle ops, the mask from the same stream.
        let dropped = DropoutRng::new(seed).dropout(x.as_tensor(), p).unwrap();
        let branch = dropped
            .broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        let plain = (x
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap()
            + (branch * scale).unwrap())
        .unwrap();
        let max_diff = |p: &Tensor, q: &Tensor| -> f32 {
            (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(max_diff(&plain, &fused), 0.0);
        // A loss that weighs outputs unevenly, so every gradient entry matters.
        let weights = ramp(&[2, 3, 5], 0.7);
        let grads = |ys: &Tensor| {
            let store = (ys * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let get = |t: &Tensor| store.get(t).unwrap().clone();
            let frozen_grad = store.get(&weight).is_some();
            (
                [get(x.as_tensor()), get(a.as_tensor()), get(b.as_tensor())],
                frozen_grad,
            )
        };
        let (plain_grads, _) = grads(&plain);
        let (fused_grads, weight_grad) = grads(&fused);
        for (name, (p, q)) in ["x", "A", "B"]
            .iter()
            .zip(plain_grads.iter().zip(&fused_grads))
        {
            assert!(
                max_diff(p, q) < 1e-5,
                "d/d{name} differs by {}",
                max_diff(p, q)
            );
        }
        assert!(!weight_grad, "the frozen weight got a gradient");
        // Dropout really masked something: the branch differs from an unmasked one.
        let unmasked = projection.forward(x.as_tensor(), None).unwrap();
        assert!(max_diff(&unmasked, &fused) > 1e-3);
    }
}
