//! One transformer block: self-attention then feed-forward, each on a residual branch.
//!
//! Pre-norm (Xiong et al. 2020, "On Layer Normalization in the Transformer
//! Architecture"; Llama): `h = x + attn(norm1(x)); y = h + mlp(norm2(h))`.
//! Post-norm (Vaswani et al. 2017): `h = norm1(x + attn(x)); y = norm2(h + mlp(h))`.
//! Either way the norms are named `input_layernorm` and `post_attention_layernorm`.
//! During training, dropout hits each branch's output before the residual sum.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::adapter::Projection;
use super::attention::{Attention, CausalMask, LayerKv};
use super::config::{ModelConfig, NormPosition};
use super::dropout::DropoutRng;
use super::mlp::Mlp;
use super::norm::Norm;
use super::rope::Rotary;

/// One block, `model.layers.{i}`.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    norm_position: NormPosition,
    dropout: f64,
}

impl Block {
    /// Reads or creates the block's layers under `vb` (`model.layers.{i}`).
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        Ok(Block {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: Norm::load(vb.pp("input_layernorm"), cfg)?,
            post_attention_layernorm: Norm::load(vb.pp("post_attention_layernorm"), cfg)?,
            norm_position: cfg.norm_position,
            dropout: cfg.dropout,
        })
    }

    /// The tensors of this block, named under `prefix`.
    pub(crate) fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        self.self_attn
            .named_tensors(&format!("{prefix}.self_attn"), out);
        self.mlp.named_tensors(&format!("{prefix}.mlp"), out);
        self.input_layernorm
            .named_tensors(&format!("{prefix}.input_layernorm"), out);
        self.post_attention_layernorm
            .named_tensors(&format!("{prefix}.post_attention_layernorm"), out);
    }

    /// The block's projections by their name under it (`self_attn.q_proj`, ...).
    pub(crate) fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        let attn = self.self_attn.projections_mut().into_iter();
        let mlp = self.mlp.projections_mut().into_iter();
        attn.map(|(name, p)| (format!("self_attn.{name}"), p))
            .chain(mlp.map(|(name, p)| (format!("mlp.{name}"), p)))
            .collect()
    }

    /// The outputs of the last `keep` of positions `offset..offset + t` only, appending
    /// the keys and values of all `t` to `kv`: in the last block, the rows before those
    /// whose logits are wanted feed nothing but the cache, so their queries, attention
    /// and feed-forward are skipped (exact: every position's output depends on its own
    /// row and the keys and values before it). Inference only.
    pub(crate) fn forward_tail(
        &self,
        xs: &Tensor,
        rotary: Option<&Rotary>,
        offset: usize,
        kv: &mut Option<LayerKv>,
        keep: usize,
    ) -> candle_core::Result<Tensor> {
        let (_b, t, _c) = xs.dims3()?; // (b, t, c)
        let skipped = t - keep;
        // The skipped rows' attention input (the norms work row by row) gives their keys
        // and values; the kept rows then run the whole block after them.
        let skipped_rows = xs.narrow(1, 0, skipped)?; // (b, skipped, c)
        let attention_input = match self.norm_position {
            NormPosition::Pre => self.input_layernorm.forward(&skipped_rows)?,
            NormPosition::Post => skipped_rows,
        };
        self.self_attn
            .fill_cache(&attention_input, rotary, offset, kv)?;
        let mask = (keep > 1).then(|| CausalMask::new(keep, offset + skipped, xs.device()));
        let kept = xs.narrow(1, skipped, keep)?; // (b, keep, c)
        self.forward(&kept, rotary, offset + skipped, mask.as_ref(), Some(kv), None)
    }

    /// Runs the block on positions `offset..offset + t` (see `Attention::forward`).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rotary: Option<&Rotary>,
        offset: usize,
        mask: Option<&CausalMask>,
        kv: Option<&mut Option<LayerKv>>,
        rng: Option<&DropoutRng>,
    ) -> candle_core::Result<Tensor> {
        let branch_dropout = |ys: Tensor| match rng {
            Some(rng) => rng.dropout(&ys, self.dropout),
            None => Ok(ys),
        };
        match self.norm_position {
            NormPosition::Pre => {
                let normed = self.input_layernorm.forward(xs)?; // (b, t, c)
                let attn = self
                    .self_attn
                    .forward(&normed, rotary, offset, mask, kv, rng)?;
                let xs = (xs + branch_dropout(attn)?)?; // (b, t, c)
                let ff = self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&xs)?, rng)?;
                &xs + branch_dropout(ff)? // (b, t, c)
            }
            NormPosition::Post => {
                let attn = self.self_attn.forward(xs, rotary, offset, mask, kv, rng)?;
                let xs = self
                    .input_layernorm
                    .forward(&(xs + branch_dropout(attn)?)?)?;
                let ff = self.mlp.forward(&xs, rng)?;
                self.post_attention_layernorm
                    .forward(&(&xs + branch_dropout(ff)?)?) // (b, t, c)
            }
        }
    }
}
