//! The decoder-only transformer: token embedding, N blocks, final norm, output projection.
//!
//! With the default config this is `transformers`' `LlamaForCausalLM` (Touvron et al.
//! 2023): RMSNorm pre-norm blocks, RoPE, SwiGLU, grouped-query attention, untied or tied
//! output projection, and its logits equal transformers' on the same weights (tested
//! against `shared/fixtures/hf_tiny_llama`). The config's variant fields turn it into
//! the original transformer decoder of Vaswani et al. 2017.
//!
//! Every forward returns logits for every position, so training, scoring and decoding
//! share one model type; `forward_step` adds a [`KvCache`] for incremental decoding.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::adapter::{few_rows_or_linear, LoraBranch, Projection};
use super::attention::{CausalMask, KvCache};
use super::block::Block;
use super::config::{ModelConfig, NormPosition, PositionKind};
use super::dropout::DropoutRng;
use super::fused::{projected_scores, score_rows, RowScore};
use super::norm::Norm;
use super::recompute::ActivationCheckpointing;
use super::rope::{AddedPositions, Rotary};
use crate::{Error, Result};

/// A decoder-only transformer language model.
#[derive(Debug, Clone)]
pub struct Transformer {
    cfg: ModelConfig,
    /// (vocab, c); also the output projection when embeddings are tied.
    embed_tokens: Tensor,
    positions: Option<AddedPositions>,
    rotary: Option<Rotary>,
    blocks: Vec<Block>,
    /// The final norm of pre-norm models; post-norm blocks already end with one.
    norm: Option<Norm>,
    /// Untied output projection; `None` when it is `embed_tokens`.
    lm_head: Option<Linear>,
    device: Device,
    dtype: DType,
}

impl Transformer {
    /// Builds the model from `vb` at the root prefix: fresh parameters when `vb` comes
    /// from a `VarMap` (training), or the weights of a checkpoint.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let model_vb = vb.pp("model");
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let embed_tokens = model_vb.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            init,
        )?;
        let positions = AddedPositions::load(model_vb.clone(), cfg)?;
        let rotary = match cfg.position {
            PositionKind::Rope => Some(Rotary::new(cfg, vb.dtype(), vb.device())?),
            _ => None,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(model_vb.pp("layers").pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = match cfg.norm_position {
            NormPosition::Pre => Some(Norm::load(model_vb.pp("norm"), cfg)?),
            NormPosition::Post => None,
        };
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => Some(super::linear(
                vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                cfg,
            )?),
        };
        Ok(Transformer {
            cfg: cfg.resolved(),
            embed_tokens,
            positions,
            rotary,
            blocks,
            norm,
            lm_head,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration that built this model, with head counts and widths resolved.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every parameter under its Hugging Face name, in file order (embeddings, layers,
    /// final norm, output projection). A tied output projection is not listed.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        if let Some(positions) = &self.positions {
            positions.named_tensors(&mut out);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            block.named_tensors(&format!("model.layers.{i}"), &mut out);
        }
        if let Some(norm) = &self.norm {
            norm.named_tensors("model.norm", &mut out);
        }
        if let Some(lm_head) = &self.lm_head {
            super::linear_tensors(lm_head, "lm_head", &mut out);
        }
        out
    }

    /// A copy whose weights and adapters are cut off from any variables they came from:
    /// its forward builds no backward graph, so evaluating a model that is being trained
    /// holds no activations beyond the layer at hand.
    pub fn detached(&self) -> Result<Transformer> {
        let tensors: HashMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, self.dtype(), &self.device);
        let mut copy = Transformer::load(vb, &self.cfg)?;
        let mut source = self.clone();
        for ((_, from), (_, to)) in source
            .projections_mut()
            .into_iter()
            .zip(copy.projections_mut())
        {
            for branch in from.adapters() {
                to.push_adapter(LoraBranch {
                    a: branch.a.detach(),
                    b: branch.b.detach(),
                    ..branch.clone()
                });
            }
        }
        Ok(copy)
    }

    /// Every adaptable projection (attention and MLP) under its Hugging Face module name,
    /// `model.layers.{i}.self_attn.q_proj`, ..., in file order: where LoRA attaches.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, projection) in block.projections_mut() {
                out.push((format!("model.layers.{i}.{name}"), projection));
            }
        }
        out
    }

    /// Logits (b, t, vocab) for every position of `ids` (b, t), without dropout.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, None, None, None)
    }

    /// Logits (b, keep, vocab) for the last `keep` positions of `ids` (b, t) only: the
    /// output projection, often the largest matrix, runs on those rows alone. Scoring
    /// with a stride reads just the rows it scores.
    pub fn forward_tail(&self, ids: &Tensor, keep: usize) -> Result<Tensor> {
        self.run(ids, None, None, Some(keep))
    }

    /// The [`RowScore`] of the last `targets.len() / b` positions of each row of `ids`
    /// (b, t) against `targets` (row after row): [`Transformer::forward_tail`] and
    /// [`score_rows`], except that on the CPU in f32 the output projection is scored a
    /// block of the vocabulary at a time ([`projected_scores`]), never forming the logits.
    pub(crate) fn score_tail(&self, ids: &Tensor, targets: &[u32]) -> Result<Vec<RowScore>> {
        let b = ids.dims2()?.0.max(1);
        let xs = self.hidden_states(ids, None, None, Some(targets.len() / b))?;
        let weight = match &self.lm_head {
            Some(lm_head) if lm_head.bias().is_some() => None,
            Some(lm_head) => Some(lm_head.weight()),
            None => Some(&self.embed_tokens),
        };
        if let Some(scores) = weight.map(|w| projected_scores(&xs, w, targets)).transpose()?.flatten() {
            return Ok(scores);
        }
        Ok(score_rows(&self.project(&xs)?, targets)?)
    }

    /// Logits (b, t, vocab) with dropout drawn from `rng`: the training forward. With
    /// `checkpointing`, every block keeps only its input and output for the backward
    /// pass (see [`ActivationCheckpointing`]), whose gradients it then holds for the weights
    /// inside the blocks.
    pub fn forward_train(
        &self,
        ids: &Tensor,
        rng: &DropoutRng,
        checkpointing: Option<&ActivationCheckpointing>,
    ) -> Result<Tensor> {
        self.run(ids, None, Some((rng, checkpointing)), None)
    }

    /// Logits (b, t, vocab) for `ids` (b, t) following the positions already in
    /// `kv_cache`, whose keys and values it then holds too. Prefill a prompt with one
    /// call, then feed one token (b, 1) at a time.
    pub fn forward_step(&self, ids: &Tensor, kv_cache: &mut KvCache) -> Result<Tensor> {
        self.run(ids, Some(kv_cache), None, None)
    }

    /// As [`Transformer::forward_step`], but logits (b, keep, vocab) for the last `keep`
    /// positions only: prefilling a prompt needs just the last row.
    pub fn forward_step_tail(
        &self,
        ids: &Tensor,
        kv_cache: &mut KvCache,
        keep: usize,
    ) -> Result<Tensor> {
        self.run(ids, Some(kv_cache), None, Some(keep))
    }

    /// log p(ids[b, i+1] | ids[b, ..=i]) in nats, as f32: (b, t - 1).
    pub fn next_token_logprobs(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Ok(Tensor::zeros((b, 0), DType::F32, &self.device)?);
        }
        let logits = self.forward(ids)?.narrow(1, 0, t - 1)?; // (b, t-1, vocab)
        let logprobs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let targets = ids
            .narrow(1, 1, t - 1)?
            .to_dtype(DType::U32)?
            .contiguous()?; // (b, t-1)
        Ok(logprobs.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?) // (b, t-1)
    }

    fn run(
        &self,
        ids: &Tensor,
        kv_cache: Option<&mut KvCache>,
        training: Option<(&DropoutRng, Option<&ActivationCheckpointing>)>,
        keep: Option<usize>,
    ) -> Result<Tensor> {
        self.project(&self.hidden_states(ids, kv_cache, training, keep)?)
    }

    /// The final hidden states (b, t or keep, c) that the output projection reads.
    fn hidden_states(
        &self,
        ids: &Tensor,
        mut kv_cache: Option<&mut KvCache>,
        training: Option<(&DropoutRng, Option<&ActivationCheckpointing>)>,
        keep: Option<usize>,
    ) -> Result<Tensor> {
        let rng = training.map(|(rng, _)| rng);
        let (b, t) = ids.dims2().map_err(|_| {
            Error::Invalid(format!(
                "token ids must be a (batch, time) tensor, got shape {:?}",
                ids.dims()
            ))
        })?;
        if t == 0 {
            return Err(Error::Invalid("cannot run the model on zero tokens".into()));
        }
        let offset = kv_cache.as_ref().map_or(0, |cache| cache.len());
        let limit = self.cfg.max_position_embeddings;
        if self.cfg.position != PositionKind::None && offset + t > limit {
            return Err(Error::Invalid(format!(
                "positions {offset}..{} exceed max_position_embeddings = {limit}; \
                 shorten the input or the generation",
                offset + t
            )));
        }
        let mut xs = self
            .embed_tokens
            .embedding(&ids.flatten_all()?)? // (b * t, c)
            .reshape((b, t, self.cfg.hidden_size))?; // (b, t, c)
        if let Some(positions) = &self.positions {
            xs = positions.add(&xs, offset)?;
        }
        if let Some(rng) = rng {
            xs = rng.dropout(&xs, self.cfg.dropout)?;
        }
        let mask = match t {
            1 => None,
            _ => Some(CausalMask::new(t, offset, &self.device)), // (t, offset + t), when needed
        };
        if let Some(keep) = keep {
            if keep == 0 || keep > t {
                return Err(Error::Invalid(format!(
                    "cannot keep the last {keep} of {t} positions"
                )));
            }
        }
        // Only the last `keep` rows of the last block are read: it computes just those
        // (the rest only feed the cache).
        let tail = keep.filter(|&keep| keep < t && training.is_none());
        let last = self.blocks.len().saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            if let (Some(keep), true) = (tail, i == last) {
                let mut scratch = None;
                let kv = match kv_cache.as_deref_mut() {
                    Some(cache) => cache.layer_mut(i),
                    None => &mut scratch,
                };
                xs = block.forward_tail(&xs, self.rotary.as_ref(), offset, kv, keep)?;
                break;
            }
            xs = match training {
                Some((rng, Some(checkpointing))) => {
                    checkpointing.block(block, &xs, self.rotary.as_ref(), mask.as_ref(), rng)?
                }
                _ => {
                    let kv = kv_cache.as_deref_mut().map(|cache| cache.layer_mut(i));
                    block.forward(&xs, self.rotary.as_ref(), offset, mask.as_ref(), kv, rng)?
                }
            };
        }
        if let Some(cache) = kv_cache {
            cache.advance(t);
        }
        if let Some(keep) = keep {
            let rows = xs.dim(1)?;
            xs = xs.narrow(1, rows - keep, keep)?; // (b, keep, c)
        }
        if let Some(norm) = &self.norm {
            xs = norm.forward(&xs)?;
        }
        Ok(xs)
    }

    /// Logits (.., vocab) of hidden states (.., c).
    fn project(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(lm_head) => few_rows_or_linear(lm_head, xs)?,
            // Tied weights: the output projection is the input embedding.
            None => few_rows_or_linear(&Linear::new(self.embed_tokens.clone(), None), xs)?,
        })
    }
}

impl Module for Transformer {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Transformer::forward(self, ids).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
