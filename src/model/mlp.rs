//! The position-wise feed-forward network.
//!
//! Gated (SwiGLU, Shazeer 2020 "GLU Variants Improve Transformer", Llama's choice):
//! `down_proj(silu(gate_proj(x)) * up_proj(x))`. Non-gated (Vaswani et al. 2017 with
//! ReLU; GELU and SiLU as options): `down_proj(act(up_proj(x)))`, with no `gate_proj`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::adapter::Projection;
use super::config::{Activation, ModelConfig};
use super::dropout::DropoutRng;
use super::linear;

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    /// Only for the gated form.
    gate_proj: Option<Projection>,
    up_proj: Projection,
    down_proj: Projection,
    activation: Activation,
}

impl Mlp {
    /// Reads or creates `gate_proj`, `up_proj` and `down_proj` under `vb` (`model.layers.{i}.mlp`).
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        let (c, inner, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_proj = match cfg.activation.is_gated() {
            true => Some(linear(vb.pp("gate_proj"), c, inner, bias, cfg)?.into()),
            false => None,
        };
        Ok(Mlp {
            gate_proj,
            up_proj: linear(vb.pp("up_proj"), c, inner, bias, cfg)?.into(),
            down_proj: linear(vb.pp("down_proj"), inner, c, bias, cfg)?.into(),
            activation: cfg.activation,
        })
    }

    /// The tensors of this layer, named under `prefix`.
    pub(crate) fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let layers = [
            ("gate_proj", self.gate_proj.as_ref()),
            ("up_proj", Some(&self.up_proj)),
            ("down_proj", Some(&self.down_proj)),
        ];
        for (name, layer) in layers {
            if let Some(layer) = layer {
                super::linear_tensors(layer.linear(), &format!("{prefix}.{name}"), out);
            }
        }
    }

    /// The projections by name, for attaching adapters.
    pub(crate) fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection)> {
        let mut out = Vec::with_capacity(3);
        if let Some(gate_proj) = self.gate_proj.as_mut() {
            out.push(("gate_proj", gate_proj));
        }
        out.push(("up_proj", &mut self.up_proj));
        out.push(("down_proj", &mut self.down_proj));
        out
    }

    /// The feed-forward output for `xs`; `rng` (training) drives the adapters' dropout.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rng: Option<&DropoutRng>,
    ) -> candle_core::Result<Tensor> {
        let up = self.up_proj.forward(xs, rng)?; // (b, t, inner)
        let hidden = match (&self.gate_proj, self.activation) {
            (Some(gate_proj), _) => {
                let gate = gate_proj.forward(xs, rng)?; // (b, t, inner)
                match super::fused::swiglu(&gate, &up)? {
                    Some(hidden) => hidden,
                    None => (gate.silu()? * up)?,
                }
            }
            (None, Activation::Relu) => up.relu()?,
            // transformers' "gelu" is the exact erf form, not the tanh approximation.
            (None, Activation::Gelu) => up.gelu_erf()?,
            (None, Activation::Silu | Activation::Swiglu) => up.silu()?,
        }; // (b, t, inner)
        self.down_proj.forward(&hidden, rng) // (b, t, c)
    }
}
