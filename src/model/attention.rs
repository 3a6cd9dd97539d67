//! Causal multi-head self-attention (Vaswani et al. 2017, eq. 1) with grouped-query
//! attention (Ainslie et al. 2023, "GQA") and a key/value cache for decoding.
//!
//! `softmax(q k^T / sqrt(head_dim) + mask) v` per head, where `num_key_value_heads`
//! key/value heads each serve `num_attention_heads / num_key_value_heads` query heads
//! (query head `h` reads key/value head `h / groups`, as `transformers`' `repeat_kv`).
//! Projections are separate `q_proj`, `k_proj`, `v_proj`, `o_proj` (HF names), so one
//! layer reads a Llama checkpoint unchanged and trains with plain `Var`s.
//!
//! The cache stores keys after RoPE and before the GQA repeat, so it holds
//! `num_key_value_heads` heads: that saving is the point of GQA.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::adapter::Projection;
use super::config::ModelConfig;
use super::dropout::DropoutRng;
use super::fused;
use super::linear;
use super::rope::Rotary;

/// Keys and values one attention layer has seen: each (b, kv_heads, s, head_dim).
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

/// Keys and values of every layer for the tokens fed so far (one sequence or a batch
/// of equally long ones).
///
/// Appending concatenates into new tensors instead of writing into a preallocated
/// buffer (candle-nn's `KvCache`): that costs a copy per step, but a `clone` shares
/// nothing that a later append mutates, so forking a state for beam search, sampling or
/// speculative drafts is free and safe.
///
/// The rows of a batched step stay views of its cache ([`KvCache::unstack`]); when
/// the same rows are stacked again in the same order (beams whose parents did not
/// change places), [`KvCache::stack`] takes the batched cache back without a copy.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    /// Number of positions cached.
    len: usize,
    /// The batched cache this one is a row of, and which row, while it is unchanged.
    row_of: Option<(Arc<KvCache>, usize)>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Number of positions the cache holds (the offset of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cached keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|kv| (kv.k.elem_count() + kv.v.elem_count()) * kv.k.dtype().size_in_bytes())
            .sum()
    }

    /// The slot of layer `index`, growing the list on first use.
    pub(crate) fn layer_mut(&mut self, index: usize) -> &mut Option<LayerKv> {
        self.row_of = None;
        if self.layers.len() <= index {
            self.layers.resize(index + 1, None);
        }
        &mut self.layers[index]
    }

    /// Records that `t` more positions were appended to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps the first `len` positions of every layer (no copy: a view of them).
    pub(crate) fn truncate(&mut self, len: usize) -> candle_core::Result<()> {
        if len > self.len {
            candle_core::bail!("cannot keep {len} of {} cached positions", self.len);
        }
        self.row_of = None;
        for layer in self.layers.iter_mut().flatten() {
            layer.k = layer.k.narrow(2, 0, len)?;
            layer.v = layer.v.narrow(2, 0, len)?;
        }
        self.len = len;
        Ok(())
    }

    /// Joins caches of equal length along the batch dimension, for one batched step.
    pub(crate) fn stack(caches: &[&KvCache]) -> candle_core::Result<KvCache> {
        let first = caches
            .first()
            .expect("stack is called with at least one cache");
        if let Some((batched, _)) = &first.row_of {
            let rows = batched.layers.first().and_then(Option::as_ref).and_then(|kv| kv.k.dim(0).ok());
            let unchanged = rows == Some(caches.len())
                && caches.iter().enumerate().all(|(index, cache)| {
                    matches!(&cache.row_of, Some((b, row)) if Arc::ptr_eq(b, batched) && *row == index)
                });
            if unchanged {
                return Ok(KvCache::clone(batched));
            }
        }
        let mut layers = Vec::with_capacity(first.layers.len());
        for index in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for cache in caches {
                match cache.layers.get(index) {
                    Some(Some(kv)) => {
                        ks.push(kv.k.clone());
                        vs.push(kv.v.clone());
                    }
                    _ => candle_core::bail!("cannot stack caches that cover different layers"),
                }
            }
            layers.push(Some(LayerKv {
                k: Tensor::cat(&ks, 0)?,
                v: Tensor::cat(&vs, 0)?,
            }));
        }
        Ok(KvCache {
            layers,
            len: first.len,
            row_of: None,
        })
    }

    /// Splits a batched cache into one cache per batch row: views of its rows, which
    /// keep the batched tensors alive while any of them is held.
    pub(crate) fn unstack(self, batch: usize) -> candle_core::Result<Vec<KvCache>> {
        let batched = Arc::new(self);
        (0..batch)
            .map(|row| {
                let layers = batched
                    .layers
                    .iter()
                    .map(|kv| {
                        let kv = kv.as_ref().expect("a stepped cache has every layer");
                        Ok(Some(LayerKv {
                            k: kv.k.narrow(0, row, 1)?,
                            v: kv.v.narrow(0, row, 1)?,
                        }))
                    })
                    .collect::<candle_core::Result<_>>()?;
                Ok(KvCache {
                    layers,
                    len: batched.len,
                    row_of: Some((Arc::clone(&batched), row)),
                })
            })
            .collect()
    }
}

/// One self-attention layer.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dropout: f64,
}

impl Attention {
    /// Reads or creates the four projections under `vb` (`model.layers.{i}.self_attn`).
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        let (c, d, bias) = (cfg.hidden_size, cfg.head_size(), cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        Ok(Attention {
            q_proj: linear(vb.pp("q_proj"), c, heads * d, bias, cfg)?.into(),
            k_proj: linear(vb.pp("k_proj"), c, kv_heads * d, bias, cfg)?.into(),
            v_proj: linear(vb.pp("v_proj"), c, kv_heads * d, bias, cfg)?.into(),
            o_proj: linear(vb.pp("o_proj"), heads * d, c, bias, cfg)?.into(),
            heads,
            kv_heads,
            head_dim: d,
            dropout: cfg.dropout,
        })
    }

    /// The tensors of this layer, named under `prefix`.
    pub(crate) fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let layers = [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ];
        for (name, layer) in layers {
            super::linear_tensors(layer.linear(), &format!("{prefix}.{name}"), out);
        }
    }

    /// The four projections by name, for attaching adapters.
    pub(crate) fn projections_mut(&mut self) -> [(&'static str, &mut Projection); 4] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }

    /// Attends from `xs` (positions `offset..offset + t`) to the cached positions and to
    /// `xs` itself, appending `xs`'s keys and values to `kv` when a cache is given.
    /// `mask` is the additive causal mask (t, offset + t), `None` when t == 1.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rotary: Option<&Rotary>,
        offset: usize,
        mask: Option<&CausalMask>,
        kv: Option<&mut Option<LayerKv>>,
        rng: Option<&DropoutRng>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _c) = xs.dims3()?; // (b, t, c)
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        // A whole sequence from its start (training, scoring, a prompt's prefill): one
        // fused kernel from the projections to o_proj's input, when it applies (f32 on
        // the CPU). Its keys and values then fill the empty cache.
        if offset == 0 && t > 1 {
            let rope = match rotary {
                Some(rotary) => rotary.host_tables(),
                None => None,
            };
            let dropout = rng.filter(|_| self.dropout > 0.0).map(|rng| fused::AttentionDropout {
                p: self.dropout,
                seed: rng.next_seed(),
            });
            if rotary.is_none() || rope.is_some() {
                let (q, k, v) = (
                    self.q_proj.forward(xs, rng)?, // (b, t, h * d)
                    self.k_proj.forward(xs, rng)?, // (b, t, g * d)
                    self.v_proj.forward(xs, rng)?, // (b, t, g * d)
                );
                if let Some(out) = fused::causal_attention(&q, &k, &v, (h, g, d), rope, dropout)? {
                    if let Some(slot) = kv {
                        *slot = Some(self.cache_layout(&k, &v, rotary, 0)?);
                    }
                    return self.o_proj.forward(&out, rng); // (b, t, c)
                }
            }
        }
        let split = |proj: &Projection, heads: usize| -> candle_core::Result<Tensor> {
            proj.forward(xs, rng)? // (b, t, heads * d)
                .reshape((b, t, heads, d))?
                .transpose(1, 2)? // (b, heads, t, d)
                .contiguous()
        };
        let mut q = split(&self.q_proj, h)?; // (b, h, t, d)
        let mut k = split(&self.k_proj, g)?; // (b, g, t, d)
        let mut v = split(&self.v_proj, g)?; // (b, g, t, d)
        if let Some(rotary) = rotary {
            q = rotary.apply(&q, offset)?;
            k = rotary.apply(&k, offset)?;
        }
        if let Some(slot) = kv {
            if let Some(past) = slot.as_ref() {
                k = Tensor::cat(&[&past.k, &k], 2)?; // (b, g, s, d)
                v = Tensor::cat(&[&past.v, &v], 2)?; // (b, g, s, d)
            }
            *slot = Some(LayerKv {
                k: k.clone(),
                v: v.clone(),
            });
        }
        // Several positions after cached ones (scoring with a stride, a prefill's
        // continuation): one fused kernel, when it applies.
        if t > 1 && rng.is_none() {
            if let Some(out) = fused::cached_attention(&q, &k, &v, offset)? {
                return self.o_proj.forward(&out, rng); // (b, t, c)
            }
        }
        let k = repeat_kv(k, h / g)?; // (b, h, s, d)
        let v = repeat_kv(v, h / g)?; // (b, h, s, d)

        let dtype = q.dtype();
        let scale = 1.0 / (d as f64).sqrt();
        // Scores, mask and softmax in f32 even for half-precision weights, as
        // transformers does: exp of large half-precision scores overflows.
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?; // (b, h, t, s)
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask.get()?)?,
            None => scores,
        };
        // The fused softmax has no backward pass; training takes the graph form.
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        }
        .to_dtype(dtype)?; // (b, h, t, s)
        let probs = match rng {
            Some(rng) => rng.dropout(&probs, self.dropout)?,
            None => probs,
        };
        let out = probs.matmul(&v)?; // (b, h, t, d)
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?; // (b, t, h * d)
        self.o_proj.forward(&out, rng) // (b, t, c)
    }

    /// Appends the keys and values of `xs` (positions `offset..offset + t`) to `kv`
    /// without attending from them: the positions of the last block whose outputs
    /// nobody reads, which still have to be there for the queries after them.
    pub(crate) fn fill_cache(
        &self,
        xs: &Tensor,
        rotary: Option<&Rotary>,
        offset: usize,
        kv: &mut Option<LayerKv>,
    ) -> candle_core::Result<()> {
        let (k, v) = (self.k_proj.forward(xs, None)?, self.v_proj.forward(xs, None)?); // (b, t, g * d)
        let new = self.cache_layout(&k, &v, rotary, offset)?;
        *kv = Some(match kv.take() {
            Some(past) => LayerKv {
                k: Tensor::cat(&[&past.k, &new.k], 2)?,
                v: Tensor::cat(&[&past.v, &new.v], 2)?,
            },
            None => new,
        });
        Ok(())
    }

    /// Projected keys and values `k`, `v` (b, t, g * d) of positions `offset..` as the
    /// cache holds them, (b, g, t, d) with the keys rotated: one pass each where the
    /// fused split applies (it rotates to positions from 0 only).
    fn cache_layout(
        &self,
        k: &Tensor,
        v: &Tensor,
        rotary: Option<&Rotary>,
        offset: usize,
    ) -> candle_core::Result<LayerKv> {
        let (b, t, _) = k.dims3()?;
        let (g, d) = (self.kv_heads, self.head_dim);
        let split = match rotary.map(|rotary| (offset, rotary.host_tables())) {
            None => fused::heads(k, g, d, None)?,
            Some((0, Some(tables))) => fused::heads(k, g, d, Some(tables))?,
            Some(_) => None,
        };
        let k = match split {
            Some(k) => k,
            None => {
                let k = k.reshape((b, t, g, d))?.transpose(1, 2)?.contiguous()?;
                match rotary {
                    Some(rotary) => rotary.apply(&k, offset)?,
                    None => k,
                }
            }
        };
        let v = match fused::heads(v, g, d, None)? {
            Some(v) => v,
            None => v.reshape((b, t, g, d))?.transpose(1, 2)?.contiguous()?,
        };
        Ok(LayerKv { k, v })
    }
}

/// Repeats each key/value head `groups` times, so head `h` of the result is head
/// `h / groups` of the input (transformers' `repeat_kv`).
fn repeat_kv(xs: Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(xs);
    }
    let (b, g, s, d) = xs.dims4()?; // (b, g, s, d)
    xs.unsqueeze(2)? // (b, g, 1, s, d)
        .broadcast_as((b, g, groups, s, d))?
        .reshape((b, g * groups, s, d)) // (b, h, s, d)
}

/// The causal mask of one forward pass, built the first time a layer needs it: the
/// fused attention kernel masks by itself, so a pass that takes it in every layer
/// (training, scoring, prefill) never builds the (t, offset + t) matrix.
#[derive(Debug, Clone)]
pub(crate) struct CausalMask {
    t: usize,
    offset: usize,
    device: candle_core::Device,
    built: std::sync::OnceLock<Tensor>,
}

impl CausalMask {
    /// The mask for `t` new positions after `offset` cached ones, not yet built.
    pub(crate) fn new(t: usize, offset: usize, device: &candle_core::Device) -> Self {
        CausalMask { t, offset, device: device.clone(), built: std::sync::OnceLock::new() }
    }

    /// The additive mask (t, offset + t) in f32 (see [`causal_mask`]).
    pub(crate) fn get(&self) -> candle_core::Result<&Tensor> {
        if let Some(mask) = self.built.get() {
            return Ok(mask);
        }
        let mask = causal_mask(self.t, self.offset, &self.device)?;
        Ok(self.built.get_or_init(|| mask))
    }
}

/// The additive causal mask for `t` new positions after `offset` cached ones: entry
/// (i, j) is 0 when key j is at or before query `offset + i`, and -inf after it.
fn causal_mask(
    t: usize,
    offset: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, s), device) // (t, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn repeat_kv_follows_transformers_order() {
        // Two kv heads holding 0 and 1, repeated 3 times: heads 0,0,0,1,1,1.
        let xs = Tensor::new(&[0f32, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let out = repeat_kv(xs, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn causal_mask_with_offset() {
        let mask = causal_mask(2, 1, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mask[0][..2], [0.0, 0.0]);
        assert_eq!(mask[0][2], f32::NEG_INFINITY);
        assert_eq!(mask[1], vec![0.0, 0.0, 0.0]);
    }
}
