//! The training step of the Llama recipe (pre-norm RMSNorm, RoPE, SwiGLU, no biases,
//! no dropout) in f32 on the CPU, differentiated by hand rather than by candle.
//!
//! Candle's backward pass gives each node's input a gradient tensor of its own: it
//! allocates a zeroed tensor, adds the contribution into it, and keeps every
//! intermediate of the graph alive until the end. For a small model those passes over
//! memory are a tenth of a step. Written out, the step keeps only what its backward pass
//! reads, lets each product add into its destination (the residual sums in the forward
//! pass; the three projections that read one normed input add their input gradients
//! into one buffer in the backward pass), and writes each weight's gradient once. The
//! kernels are those of [`super::fused`] that the autograd path also runs, and the
//! tests hold this pass to candle's autograd on the loss and every gradient.

use std::sync::Mutex;

use candle_core::{Device, Storage, Tensor, Var};

use super::config::ModelConfig;
use super::fused::{
    self, input_grad, input_grad_add, linear_rows, linear_rows_add, weight_grad, CausalAttention, RopeTables,
    Products, SavedMap, SwigluKept,
};
use super::rope::Rotary;
use crate::{Error, Result};

/// Where each weight of one block sits among the run's variables.
struct BlockWeights {
    input_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    post_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// What a block's backward pass reads of its forward pass.
struct BlockActivations {
    /// The block's input (n, c) and its RMSNorm.
    x: Vec<f32>,
    normed: Vec<f32>,
    /// The projections (n, heads * d) and (n, kv_heads * d), before RoPE.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The attention's output (n, heads * d), the input of `o_proj`.
    attention: Vec<f32>,
    /// Each attention map's rotated heads and weights, where they were kept.
    attention_maps: Option<Vec<SavedMap>>,
    /// The residual stream after attention (n, c) and its RMSNorm.
    mid: Vec<f32>,
    mid_normed: Vec<f32>,
    /// The feed-forward's up projection (n, hidden), and what SwiGLU kept of the gate.
    up: Vec<f32>,
    swiglu: SwigluKept,
}

/// Buffers of earlier steps, handed out again for outputs that a kernel overwrites in
/// full: a fresh zeroed buffer would cost a pass over memory as long as the kernel's.
#[derive(Default)]
struct Scratch(Mutex<Vec<Vec<f32>>>);

impl Scratch {
    /// A buffer of `len` entries with arbitrary contents, for the caller to overwrite:
    /// the smallest kept one that is large enough, or a new one.
    fn take(&self, len: usize) -> Vec<f32> {
        let mut kept = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let best = (kept.iter().enumerate())
            .filter(|(_, buf)| buf.capacity() >= len)
            .min_by_key(|(_, buf)| buf.capacity())
            .map(|(i, _)| i);
        let mut buf = best.map(|i| kept.swap_remove(i)).unwrap_or_default();
        buf.resize(len, 0.0);
        buf
    }

    /// Keeps `bufs` for a later [`Scratch::take`].
    fn give<const N: usize>(&self, bufs: [Vec<f32>; N]) {
        let mut kept = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        kept.extend(bufs);
    }
}

/// A hand-written forward and backward pass over the variables of a Llama model.
pub(crate) struct LlamaBackprop {
    vocab: usize,
    /// The residual stream's width and the feed-forward's.
    width: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    max_positions: usize,
    rope: RopeTables,
    /// The number of variables the indices below are into.
    vars: usize,
    embed: usize,
    blocks: Vec<BlockWeights>,
    final_norm: usize,
    /// `None` when the output projection is the embedding (tied weights).
    lm_head: Option<usize>,
    /// The arithmetic of the products (the linear layers' and attention's), forward and
    /// backward.
    products: Products,
    scratch: Scratch,
}

impl LlamaBackprop {
    /// Whether the pass can train a model of `cfg`: the plain Llama recipe (RMSNorm
    /// before each sublayer, RoPE, SwiGLU), no dropout, no biases.
    pub(crate) fn takes(cfg: &ModelConfig) -> bool {
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        cfg.is_llama()
            && cfg.dropout == 0.0
            && !cfg.attention_bias
            && !cfg.mlp_bias
            && heads > 0
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && head_dim.is_multiple_of(2)
    }

    /// The pass for a model of `cfg` whose weights are `vars` (named as
    /// [`super::Transformer::named_tensors`] names them), or `None` where it does not
    /// apply: another architecture, dropout, biases, another dtype or device, or
    /// variables it does not know (candle's autograd then trains the model). The
    /// products run in the arithmetic `products` names; everything else in f32.
    pub(crate) fn new(cfg: &ModelConfig, vars: &[(String, Var)], products: Products) -> Option<LlamaBackprop> {
        if !Self::takes(cfg) {
            return None;
        }
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let (c, f, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let find = |name: &str, shape: &[usize]| {
            vars.iter().position(|(n, var)| {
                n == name
                    && var.dims() == shape
                    && var.dtype() == candle_core::DType::F32
                    && var.device().is_cpu()
            })
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let name = |part: &str| format!("model.layers.{i}.{part}.weight");
                Some(BlockWeights {
                    input_norm: find(&name("input_layernorm"), &[c])?,
                    q: find(&name("self_attn.q_proj"), &[heads * head_dim, c])?,
                    k: find(&name("self_attn.k_proj"), &[kv_heads * head_dim, c])?,
                    v: find(&name("self_attn.v_proj"), &[kv_heads * head_dim, c])?,
                    o: find(&name("self_attn.o_proj"), &[c, heads * head_dim])?,
                    post_norm: find(&name("post_attention_layernorm"), &[c])?,
                    gate: find(&name("mlp.gate_proj"), &[f, c])?,
                    up: find(&name("mlp.up_proj"), &[f, c])?,
                    down: find(&name("mlp.down_proj"), &[c, f])?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => Some(find("lm_head.weight", &[vocab, c])?),
        };
        let known = 2 + 9 * blocks.len() + usize::from(lm_head.is_some());
        if vars.len() != known {
            return None;
        }
        let rope = Rotary::new(cfg, candle_core::DType::F32, &Device::Cpu).ok()?.host_tables()?;
        Some(LlamaBackprop {
            vocab,
            width: c,
            hidden: f,
            heads,
            kv_heads,
            head_dim,
            eps: cfg.rms_norm_eps as f32,
            max_positions: cfg.max_position_embeddings,
            rope,
            vars: vars.len(),
            embed: find("model.embed_tokens.weight", &[vocab, c])?,
            blocks,
            final_norm: find("model.norm.weight", &[c])?,
            lm_head,
            products,
            scratch: Scratch::default(),
        })
    }

    /// The mean cross-entropy (nats per token) of `targets` after `inputs`, both rows of
    /// `t` token ids one after another, and the gradient of `scale` times it with
    /// respect to every variable, in `vars` order. When the loss is not finite no
    /// gradient is computed and the list is empty.
    pub(crate) fn loss_and_grads(
        &self,
        vars: &[(String, Var)],
        inputs: &[u32],
        targets: &[u32],
        t: usize,
        scale: f32,
    ) -> Result<(f32, Vec<Tensor>)> {
        let n = inputs.len();
        if vars.len() != self.vars || targets.len() != n || n == 0 || t == 0 || !n.is_multiple_of(t) {
            return Err(Error::Invalid(format!(
                "backprop: {n} inputs and {} targets in rows of {t} for {} variables",
                targets.len(),
                vars.len()
            )));
        }
        if t > self.max_positions {
            return Err(Error::Invalid(format!(
                "positions 0..{t} exceed max_position_embeddings = {}",
                self.max_positions
            )));
        }
        if let Some(&bad) = inputs.iter().chain(targets).find(|&&id| id as usize >= self.vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let guards: Vec<_> = vars.iter().map(|(_, var)| var.as_tensor().storage_and_layout()).collect();
        let weights = guards
            .iter()
            .map(|(storage, layout)| match &**storage {
                Storage::Cpu(cpu) => Ok(fused::slice(cpu, layout, "backprop")?),
                _ => Err(Error::Invalid("backprop: the weights are not in host memory".into())),
            })
            .collect::<Result<Vec<&[f32]>>>()?;
        let w = |index: usize| weights[index];
        let (c, f, eps) = (self.width, self.hidden, self.eps);
        let (q_width, kv_width) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let attention = CausalAttention::new(self.heads, self.kv_heads, self.head_dim, Some(self.rope.clone()))
            .with_products(self.products);

        // The attention weights, (t, t) per head, are kept for the backward pass while
        // they take no more memory than four copies of the residual stream; longer
        // sequences recompute them (memory linear in t).
        let keep_maps = t * self.heads <= 4 * c;

        // Forward, keeping what the backward pass reads.
        let embed = w(self.embed);
        let mut x: Vec<f32> = inputs
            .iter()
            .flat_map(|&id| &embed[id as usize * c..][..c])
            .copied()
            .collect();
        let mut saved = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let mut normed = self.scratch.take(n * c);
            fused::rms_norm_rows(&x, w(block.input_norm), eps, &mut normed);
            let q = linear_rows(self.products, &normed, w(block.q), c);
            let k = linear_rows(self.products, &normed, w(block.k), c);
            let v = linear_rows(self.products, &normed, w(block.v), c);
            let (attention_out, attention_maps) = match keep_maps {
                true => {
                    let (out, maps) = attention.forward_rows_keeping(&q, &k, &v, t)?;
                    (out, Some(maps))
                }
                false => (attention.forward_rows(&q, &k, &v, t)?, None),
            };
            let mut mid = x.clone();
            linear_rows_add(self.products, &mut mid, &attention_out, w(block.o), q_width);
            let mut mid_normed = self.scratch.take(n * c);
            fused::rms_norm_rows(&mid, w(block.post_norm), eps, &mut mid_normed);
            let gate = linear_rows(self.products, &mid_normed, w(block.gate), c);
            let up = linear_rows(self.products, &mid_normed, w(block.up), c);
            let mut gated = self.scratch.take(n * f);
            let swiglu = fused::swiglu_rows_keeping(gate, &up, &mut gated, self.scratch.take(n * f));
            let mut next = mid.clone();
            linear_rows_add(self.products, &mut next, &gated, w(block.down), f);
            self.scratch.give([gated]);
            saved.push(BlockActivations {
                x: std::mem::replace(&mut x, next),
                normed,
                q,
                k,
                v,
                attention: attention_out,
                attention_maps,
                mid,
                mid_normed,
                up,
                swiglu,
            });
        }
        let mut final_normed = self.scratch.take(n * c);
        fused::rms_norm_rows(&x, w(self.final_norm), eps, &mut final_normed);
        let head = w(self.lm_head.unwrap_or(self.embed));
        let mut logits = linear_rows(self.products, &final_normed, head, c);
        // The logits become their own gradient: d(scale * mean loss) / d logits.
        let total = fused::cross_entropy_grad_in_place(&mut logits, targets, scale / n as f32);
        let loss = (total / n as f64) as f32;
        if !loss.is_finite() {
            return Ok((loss, Vec::new()));
        }

        // Backward, from the output down.
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); vars.len()];
        let d_logits = logits;
        let d_final_normed = input_grad(self.products, &d_logits, head, self.vocab);
        let d_head = weight_grad(self.products, &d_logits, self.vocab, &final_normed, c);
        drop(d_logits);
        self.scratch.give([final_normed]);
        let mut dx = self.scratch.take(n * c);
        grads[self.final_norm] = fused::rms_norm_grad(&x, w(self.final_norm), &d_final_normed, eps, &mut dx, false);
        for (block, acts) in self.blocks.iter().zip(saved).rev() {
            // next = mid + gated W_down^T
            grads[block.down] = weight_grad(self.products, &dx, c, &acts.swiglu.output(&acts.up), f);
            let d_gated = input_grad(self.products, &dx, w(block.down), c);
            let (mut d_gate, mut d_up) = (self.scratch.take(n * f), self.scratch.take(n * f));
            acts.swiglu.grad(&acts.up, &d_gated, &mut d_gate, &mut d_up);
            grads[block.gate] = weight_grad(self.products, &d_gate, f, &acts.mid_normed, c);
            grads[block.up] = weight_grad(self.products, &d_up, f, &acts.mid_normed, c);
            let mut d_mid_normed = input_grad(self.products, &d_gate, w(block.gate), f);
            input_grad_add(self.products, &mut d_mid_normed, &d_up, w(block.up), f);
            self.scratch.give([d_gate, d_up, acts.mid_normed, acts.swiglu.into_silu()]);
            // dx becomes the gradient of `mid`: the residual path plus the norm's.
            grads[block.post_norm] =
                fused::rms_norm_grad(&acts.mid, w(block.post_norm), &d_mid_normed, eps, &mut dx, true);
            // mid = x + attention W_o^T
            grads[block.o] = weight_grad(self.products, &dx, c, &acts.attention, q_width);
            let d_attention = input_grad(self.products, &dx, w(block.o), c);
            let rows = [&acts.q[..], &acts.k, &acts.v, &acts.attention, &d_attention];
            let (dq, dk, dv) = attention.backward_rows(rows, t, acts.attention_maps.as_deref())?;
            grads[block.q] = weight_grad(self.products, &dq, q_width, &acts.normed, c);
            grads[block.k] = weight_grad(self.products, &dk, kv_width, &acts.normed, c);
            grads[block.v] = weight_grad(self.products, &dv, kv_width, &acts.normed, c);
            let mut d_normed = input_grad(self.products, &dq, w(block.q), q_width);
            input_grad_add(self.products, &mut d_normed, &dk, w(block.k), kv_width);
            input_grad_add(self.products, &mut d_normed, &dv, w(block.v), kv_width);
            // dx becomes the gradient of the block's input.
            grads[block.input_norm] =
                fused::rms_norm_grad(&acts.x, w(block.input_norm), &d_normed, eps, &mut dx, true);
            self.scratch.give([acts.normed]);
        }
        // The embedding rows each input read, plus the output projection when tied.
        let mut d_embed = match self.lm_head {
            Some(lm_head) => {
                grads[lm_head] = d_head;
                vec![0f32; self.vocab * c]
            }
            None => d_head,
        };
        for (row, &id) in dx.chunks_exact(c).zip(inputs) {
            for (acc, g) in d_embed[id as usize * c..][..c].iter_mut().zip(row) {
                *acc += g;
            }
        }
        grads[self.embed] = d_embed;
        self.scratch.give([dx]);
        drop(weights);
        drop(guards);
        let grads = grads
            .into_iter()
            .zip(vars)
            .map(|(grad, (_, var))| Ok(Tensor::from_vec(grad, var.shape(), &Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss, grads))
    }
}
