//! Gradient checkpointing per block: the forward keeps only each block's input; the backward
//! runs the block again on it (with the same LoRA dropout masks) and backpropagates through
//! that recomputation. candle has no checkpointing, so it is a custom op whose backward runs a
//! nested forward and backward (docs/candle-training.md §9).
//!
//! The nested backward gives the block's LoRA tensors their gradients, which the op cannot
//! return (an op's backward gives gradients to its arguments only): they go to
//! `RecomputedGrads`, and `Model::backward` adds them to the gradient store.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor, Var};

use super::block::{Block, Positions};
use crate::error::Result;
use crate::stash::Stash;

/// Parameter gradients computed inside recomputed blocks during one backward.
#[derive(Clone, Default)]
pub struct RecomputedGrads(Arc<Mutex<Vec<(Var, Tensor)>>>);

impl RecomputedGrads {
    fn push(&self, var: Var, grad: Tensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((var, grad));
    }

    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Add the collected gradients into `grads` (summing with any already there).
    pub fn drain_into(&self, grads: &mut GradStore) -> candle_core::Result<()> {
        let collected = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (var, grad) in collected {
            let grad = match grads.remove(var.as_tensor()) {
                Some(earlier) => (earlier + grad)?,
                None => grad,
            };
            grads.insert(var.as_tensor(), grad);
        }
        Ok(())
    }
}

/// `block.forward(x)` in training, keeping for the backward only `x`.
pub fn checkpointed(block: &Block, x: &Tensor, pos: &Positions, grads: &RecomputedGrads) -> Result<Tensor> {
    let params: Vec<Var> = block.linears().iter().filter_map(|l| l.lora.as_ref()).flat_map(|p| p.vars()).collect();
    let y = block.forward(&x.detach(), pos, true, None)?;
    // the op must be recorded when the block holds trainable tensors even if x does not track
    // (the first block's input comes from the frozen embeddings): a LoRA tensor anchors it
    let anchor = match params.first() {
        Some(p) => p.as_tensor().clone(),
        None if x.track_op() => x.clone(),
        None => return Ok(y),
    };
    let op = Checkpoint {
        block: block.clone(),
        pos: pos.clone(),
        dropout_seed: crate::lora::dropout_seed(),
        params,
        grads: grads.clone(),
        output: Stash::new(y),
    };
    Ok(x.apply_op2(&anchor, op)?)
}

struct Checkpoint {
    block: Block,
    pos: Positions,
    dropout_seed: u64,
    params: Vec<Var>,
    grads: RecomputedGrads,
    output: Stash,
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu_fwd()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output.cuda_fwd()
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // the same dropout masks as the forward: they are drawn from this seed and the path
        let seed = crate::lora::dropout_seed();
        crate::lora::set_dropout_seed(self.dropout_seed);
        let x = Var::from_tensor(&x.detach())?;
        let recomputed = self.block.forward(x.as_tensor(), &self.pos, true, None);
        crate::lora::set_dropout_seed(seed);
        let y = recomputed.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let nested = (y * grad.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = nested.get(p.as_tensor()) {
                self.grads.push(p.clone(), g.clone());
            }
        }
        Ok((nested.get(x.as_tensor()).cloned(), None))
    }
}
