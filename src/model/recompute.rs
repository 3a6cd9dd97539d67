//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
//! Cost"): a checkpointed block keeps only its input and output in the training graph.
//! Its forward runs off the graph; its backward runs the block again, on the saved input
//! with the same dropout draws, and backpropagates through that copy. Training then holds
//! one block's intermediate activations at a time instead of every block's, for about
//! one more forward pass of work.
//!
//! A candle op can hand gradients back only to its own arguments, so the gradients of the
//! weights inside a block (its adapters, or all its weights in full training) are
//! gathered in a [`ActivationCheckpointing`] during the backward pass and merged into the
//! [`GradStore`] afterwards with [`ActivationCheckpointing::merge_into`].

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, Var};

use super::attention::CausalMask;
use super::block::Block;
use super::dropout::DropoutRng;
use super::rope::Rotary;

/// What the checkpointed blocks of one training forward pass share: the gradients of
/// the weights inside them, and an anchor that ties each block into the graph.
#[derive(Debug, Clone)]
pub struct ActivationCheckpointing {
    grads: Arc<Mutex<GradStore>>,
    /// A trained scalar every checkpointed block takes as an argument, so a block is
    /// part of the graph (and gets its backward call) even when its input needs no
    /// gradient: the first block of a LoRA run reads frozen embeddings.
    anchor: Var,
}

impl ActivationCheckpointing {
    /// An empty gradient collection for one forward and backward pass on `device`.
    pub fn new(device: &Device) -> candle_core::Result<Self> {
        Ok(ActivationCheckpointing {
            grads: Arc::new(Mutex::new(GradStore::default())),
            anchor: Var::zeros((), DType::F32, device)?,
        })
    }

    /// Adds the gradients the checkpointed blocks computed during `backward` into
    /// `store`, where the weights' gradients are looked up as usual.
    pub fn merge_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let mut grads = self.grads.lock().expect("a checkpointed backward panicked");
        store.extend(std::mem::take(&mut *grads))
    }

    /// `block` applied to `xs` (training, dropout from `rng`) with only `xs` and the
    /// result kept for the backward pass.
    pub(crate) fn block(
        &self,
        block: &Block,
        xs: &Tensor,
        rotary: Option<&Rotary>,
        mask: Option<&CausalMask>,
        rng: &DropoutRng,
    ) -> candle_core::Result<Tensor> {
        let start = rng.position();
        let replay = DropoutRng::new(start);
        // Off the graph: the block's intermediates are freed as soon as it returns.
        let ys = block
            .forward(&xs.detach(), rotary, 0, mask, None, Some(&replay))?
            .detach();
        rng.seek(replay.position());
        let op = CheckpointedBlock {
            block: block.clone(),
            rotary: rotary.cloned(),
            mask: mask.cloned(),
            dropout_start: start,
            output: Mutex::new(Some(ys)),
            grads: self.grads.clone(),
        };
        xs.apply_op2(self.anchor.as_tensor(), op)
    }
}

/// One block between its saved input and its output (see the module comment).
struct CheckpointedBlock {
    block: Block,
    rotary: Option<Rotary>,
    mask: Option<CausalMask>,
    /// The dropout stream's position when the block first ran, to redraw its masks.
    dropout_start: u64,
    /// The output the forward already computed, handed to candle once.
    output: Mutex<Option<Tensor>>,
    grads: Arc<Mutex<GradStore>>,
}

impl CustomOp2 for CheckpointedBlock {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        _xs: &CpuStorage,
        _xs_layout: &Layout,
        _anchor: &CpuStorage,
        _anchor_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ys = self.output.lock().expect("poisoned").take();
        let Some(ys) = ys else {
            candle_core::bail!("a checkpointed block ran twice");
        };
        super::adapter::into_storage(ys, self.name())
    }

    fn bwd(
        &self,
        xs: &Tensor,
        anchor: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&xs.detach())?;
        let replay = DropoutRng::new(self.dropout_start);
        let ys = self.block.forward(
            input.as_tensor(),
            self.rotary.as_ref(),
            0,
            self.mask.as_ref(),
            None,
            Some(&replay),
        )?;
        // d/dys of sum(ys * grad_ys) is grad_ys: the rerun's backward is the block's.
        let mut store = (ys * grad_ys.detach())?.sum_all()?.backward()?;
        // Detached: candle's gradients for leaves still point into the graph that made
        // them, and kept as they are they would keep this block's activations alive.
        let grad_xs = store
            .remove(input.as_tensor())
            .filter(|_| xs.track_op())
            .map(|grad| grad.detach());
        let mut weights = GradStore::default();
        for &id in store.get_ids() {
            if let Some(grad) = store.get_id(id) {
                weights.insert_id(id, grad.detach());
            }
        }
        drop(store);
        self.grads.lock().expect("poisoned").extend(weights)?;
        Ok((grad_xs, Some(anchor.zeros_like()?)))
    }
}
