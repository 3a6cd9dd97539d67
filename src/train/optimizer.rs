//! AdamW: Adam (Kingma & Ba 2015) with decoupled weight decay (Loshchilov & Hutter 2019,
//! "Decoupled Weight Decay Regularization"), as PyTorch's `torch.optim.AdamW`:
//!
//! ```text
//! p <- p * (1 - lr * wd)                      (decayed parameters only)
//! m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! Weight matrices are decayed; norms, biases and (unless asked) embeddings are not, as
//! in nanoGPT and most LLM recipes. Gradients may be scaled first (global-norm clipping,
//! Pascanu et al. 2013). On the CPU with f32 weights the update is one fused pass per
//! tensor, in place, with the moments in host memory; elsewhere it is tensor arithmetic.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Storage, Tensor, Var};

use crate::simd::simd_kernel;
use crate::{Error, Result};

/// AdamW's hyper-parameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// One parameter's two moments.
#[derive(Debug)]
enum Moments {
    /// In host memory, updated by the fused CPU kernel.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// On the parameter's device.
    Device { m: Tensor, v: Tensor },
}

/// One trained tensor.
#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// The AdamW optimiser over a fixed, name-sorted list of parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    /// Updates done so far (the `t` of the bias corrections).
    steps: u64,
}

/// Whether a parameter gets weight decay: weight matrices only, and embeddings only if asked.
pub fn decays(name: &str, rank: usize, decay_embeddings: bool) -> bool {
    rank >= 2 && (decay_embeddings || !name.contains("embed_"))
}

impl AdamW {
    /// An optimiser over `vars` (name, variable), in name order.
    pub fn new(
        mut vars: Vec<(String, Var)>,
        config: AdamWConfig,
        decay_embeddings: bool,
    ) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let moments = match fused(&var) {
                    true => Moments::Host {
                        m: vec![0.0; var.elem_count()],
                        v: vec![0.0; var.elem_count()],
                    },
                    false => Moments::Device {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                    },
                };
                Ok(Param {
                    decay: decays(&name, var.rank(), decay_embeddings),
                    name,
                    var,
                    moments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            config,
            steps: 0,
        })
    }

    /// The parameters in update order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Number of updates done.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with learning rate `lr`; `grads` follow [`AdamW::vars`] and
    /// are multiplied by `grad_scale` first (clipping).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::Invalid(format!(
                "AdamW got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (param, grad) in self.params.iter_mut().zip(grads) {
            let decay = if param.decay { c.weight_decay } else { 0.0 };
            match &mut param.moments {
                Moments::Host { m, v } => {
                    let grad = grad.contiguous()?;
                    let kernel = FusedAdamW {
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        decay: (lr * decay) as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        step_size: (lr / bc1) as f32,
                        bc2_sqrt: bc2.sqrt() as f32,
                        eps: c.eps as f32,
                        grad_scale: grad_scale as f32,
                    };
                    param.var.as_tensor().inplace_op2(&grad, &kernel)?;
                }
                Moments::Device { m, v } => {
                    let grad = (grad.to_dtype(DType::F32)? * grad_scale)?;
                    *m = ((&*m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                    let p = param.var.as_tensor();
                    let p = if decay > 0.0 {
                        (p * (1.0 - lr * decay))?
                    } else {
                        p.clone()
                    };
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let update = ((&*m / denom)? * (lr / bc1))?;
                    param.var.set(&(p - update)?)?;
                }
            }
        }
        Ok(())
    }

    /// The moments as host tensors named `{param}.exp_avg` and `{param}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for param in &self.params {
            let shape = param.var.shape().clone();
            let (m, v) = match &param.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, &shape, &Device::Cpu)?,
                    Tensor::from_slice(v, &shape, &Device::Cpu)?,
                ),
                Moments::Device { m, v } => {
                    (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?)
                }
            };
            out.push((format!("{}.exp_avg", param.name), m));
            out.push((format!("{}.exp_avg_sq", param.name), v));
        }
        Ok(out)
    }

    /// Restores the moments and the update count saved by [`AdamW::state_tensors`];
    /// a missing or misshapen tensor is an error naming it and both shapes.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for param in &mut self.params {
            let get = |suffix: &str| -> Result<Tensor> {
                let name = format!("{}.{suffix}", param.name);
                let tensor = tensors.get(&name).ok_or_else(|| {
                    Error::Invalid(format!(
                        "optimizer state `{name}` is missing from the checkpoint"
                    ))
                })?;
                if tensor.dims() != param.var.dims() {
                    return Err(Error::Invalid(format!(
                        "optimizer state `{name}` has shape {:?} but the parameter has {:?}",
                        tensor.dims(),
                        param.var.dims()
                    )));
                }
                Ok(tensor.to_dtype(DType::F32)?)
            };
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            param.moments = match &param.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                },
                Moments::Device { .. } => Moments::Device {
                    m: m.to_device(param.var.device())?,
                    v: v.to_device(param.var.device())?,
                },
            };
        }
        self.steps = steps;
        Ok(())
    }
}

/// Whether a variable takes the fused in-place CPU update.
fn fused(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
}

/// The global L2 norm of `grads` (Pascanu et al. 2013), summed in f64 on the CPU.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut device_parts = Vec::new();
    let mut host_sum = 0f64;
    for grad in grads {
        if grad.device().is_cpu() && grad.dtype() == DType::F32 {
            let grad = grad.contiguous()?;
            let (storage, layout) = grad.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Err(Error::Tensor(
                    "a contiguous f32 CPU gradient has another storage".into(),
                ));
            };
            host_sum += sum_of_squares(&data[start..end]);
        } else {
            device_parts.push(grad.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if !device_parts.is_empty() {
        // One host sync for all device tensors.
        host_sum += Tensor::stack(&device_parts, 0)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(host_sum.sqrt())
}

simd_kernel! {
    /// `sum x^2` in f64, in eight partial sums so that the loop vectorises.
    fn sum_of_squares(xs: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = xs.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
        for chunk in chunks {
            for l in 0..8 {
                acc[l] += (chunk[l] as f64) * (chunk[l] as f64);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

/// The fused in-place update of one f32 CPU tensor.
struct FusedAdamW<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    /// lr * weight_decay (0 for parameters that are not decayed).
    decay: f32,
    beta1: f32,
    beta2: f32,
    /// lr / (1 - beta1^t).
    step_size: f32,
    /// sqrt(1 - beta2^t).
    bc2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(params), CpuStorage::F32(grads)) = (s1, s2) else {
            candle_core::bail!("fused-adamw: expects f32 parameters and gradients");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused-adamw: expects contiguous tensors");
        };
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let (params, grads) = (&mut params[p0..p1], &grads[g0..g1]);
        if params.len() != grads.len() || m.len() != params.len() {
            candle_core::bail!(
                "fused-adamw: {} parameters, {} gradients",
                params.len(),
                grads.len()
            );
        }
        adamw_update(self, params, grads, &mut m, &mut v);
        Ok(())
    }
}

simd_kernel! {
    /// The update of `params` by `grads` with the moments `m` and `v`, as `op` says.
    fn adamw_update(op: &FusedAdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
        let keep = 1.0 - op.decay;
        let (b1, b2) = (op.beta1, op.beta2);
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * op.grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / op.bc2_sqrt + op.eps;
            *p = *p * keep - op.step_size * *m / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two AdamW steps on p = [[1, -2, 3]] (a decayed matrix) with gradients g1 and g2,
    /// lr 0.1, betas 0.9/0.95, eps 1e-8, weight decay 0.1, worked by hand from the formulas
    /// in the module doc (PyTorch's `torch.optim.AdamW` update):
    /// step 1: p = 0.99 p - 0.1 sign(g1) = [0.89, -1.88, 2.87] (m^/sqrt(v^) = sign(g) at t = 1);
    /// step 2: m = [0.055, -0.07, 0.15], v = [0.012375, 0.0495, 0.1945],
    /// p = 0.99 p - 0.1 (m / 0.19) / (sqrt(v / 0.0975) + eps) = [0.799847, -1.809493, 2.785404].
    #[test]
    fn fused_and_tensor_paths_match_the_hand_worked_update() {
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut results = Vec::new();
        for fused_path in [true, false] {
            let var = Var::from_vec(vec![1f32, -2., 3.], (1, 3), &Device::Cpu).unwrap();
            let mut opt =
                AdamW::new(vec![("w.weight".into(), var.clone())], config, false).unwrap();
            if !fused_path {
                let p = &mut opt.params[0];
                p.moments = Moments::Device {
                    m: var.zeros_like().unwrap(),
                    v: var.zeros_like().unwrap(),
                };
            }
            for g in [[0.5f32, -1., 2.], [0.1, 0.2, -0.3]] {
                let g = Tensor::from_slice(&g, (1, 3), &Device::Cpu).unwrap();
                opt.step(&[g], 0.1, 1.0).unwrap();
            }
            results.push(
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        let expected = [0.799_847f32, -1.809_493, 2.785_404];
        for got in &results {
            for (a, b) in got.iter().zip(expected) {
                assert!((a - b).abs() < 1e-5, "{got:?} vs {expected:?}");
            }
        }
        for (a, b) in results[0].iter().zip(&results[1]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn no_decay_on_norms_biases_embeddings() {
        assert!(decays("model.layers.0.mlp.up_proj.weight", 2, false));
        assert!(decays("lm_head.weight", 2, false));
        assert!(!decays("model.embed_tokens.weight", 2, false));
        assert!(decays("model.embed_tokens.weight", 2, true));
        assert!(!decays("model.norm.weight", 1, true));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias", 1, false));
    }

    #[test]
    fn global_norm_of_two_tensors() {
        let a = Tensor::from_slice(&[3f32, 0.], 2, &Device::Cpu).unwrap();
        let b = Tensor::from_slice(&[4f32], (1, 1), &Device::Cpu).unwrap();
        assert!((global_norm(&[a, b]).unwrap() - 5.0).abs() < 1e-12);
    }
}
