//! Normalisation layers: RMSNorm (Zhang & Sennrich 2019, Llama's choice) and LayerNorm
//! (Ba et al. 2016, the original transformer's).
//!
//! RMSNorm is `x / sqrt(mean(x^2) + eps) * weight`, computed in f32 and cast back, as
//! `transformers`' `LlamaRMSNorm` does. LayerNorm also subtracts the mean and adds a bias.
//! Tensor names: `weight` (and `bias` for LayerNorm) under the layer's prefix.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::config::{ModelConfig, NormKind};

/// One normalisation layer over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    /// LayerNorm's shift; `None` for RMSNorm.
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// Reads or creates the parameters of a norm over `hidden_size` features.
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        let size = cfg.hidden_size;
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = match cfg.norm {
            NormKind::Rms => None,
            NormKind::Layer => Some(vb.get_with_hints(size, "bias", Init::Const(0.0))?),
        };
        Ok(Norm {
            weight,
            bias,
            eps: cfg.rms_norm_eps,
        })
    }

    /// The tensors of this layer, named under `prefix`.
    pub(crate) fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        if let Some(bias) = &self.bias {
            out.push((format!("{prefix}.bias"), bias.clone()));
        }
    }

    /// The differentiable form, built from primitive ops that candle can back-propagate.
    fn forward_graph(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let width = xs.dim(D::Minus1)? as f64;
        // Statistics in f32 even for half-precision weights, as transformers does.
        let xs = xs.to_dtype(DType::F32)?;
        let xs = match &self.bias {
            None => xs,
            Some(_) => xs.broadcast_sub(&(xs.sum_keepdim(D::Minus1)? / width)?)?,
        };
        let mean_square = (xs.sqr()?.sum_keepdim(D::Minus1)? / width)?; // (.., 1)
        let normed = xs.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?;
        let scaled = normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?;
        match &self.bias {
            None => Ok(scaled),
            Some(bias) => scaled.broadcast_add(bias),
        }
    }
}

impl Module for Norm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // candle's fused kernels have no backward pass: use them only when no gradient
        // can flow through this call (inference on loaded weights).
        let tracked = xs.track_op() || self.weight.track_op();
        if tracked || !xs.is_contiguous() {
            if self.bias.is_none() {
                if let Some(ys) = super::fused::rms_norm(xs, &self.weight, self.eps)? {
                    return Ok(ys);
                }
            }
            return self.forward_graph(xs);
        }
        let eps = self.eps as f32;
        match &self.bias {
            None => candle_nn::ops::rms_norm(xs, &self.weight, eps),
            Some(bias) => candle_nn::ops::layer_norm(xs, &self.weight, bias, eps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_and_graph_forms_agree() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 3.0, (2, 5, 16), &dev).unwrap();
        for norm in [NormKind::Rms, NormKind::Layer] {
            let cfg = ModelConfig {
                hidden_size: 16,
                norm,
                ..Default::default()
            };
            let weight = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
            let layer = Norm {
                weight,
                bias: (norm == NormKind::Layer).then_some(bias),
                eps: cfg.rms_norm_eps,
            };
            let fused = layer.forward(&xs).unwrap();
            let graph = layer.forward_graph(&xs).unwrap();
            let diff = (fused - graph).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{norm:?}");
        }
    }

    #[test]
    fn rms_norm_matches_hand_computation() {
        // x = [1, 2, 3, 4]: mean square 7.5, so x / sqrt(7.5 + 1e-5) * w.
        let dev = Device::Cpu;
        let layer = Norm {
            weight: Tensor::new(&[1f32, 1.0, 2.0, 0.5], &dev).unwrap(),
            bias: None,
            eps: 1e-5,
        };
        let out = layer
            .forward(&Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let r = (7.5f64 + 1e-5).sqrt();
        let want = [1.0 / r, 2.0 / r, 6.0 / r, 2.0 / r];
        for (got, want) in out[0].iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6);
        }
    }
}
