//! The causal-LM loss: mean cross-entropy of the shifted labels, positions labelled -100
//! ignored, as transformers computes it; in training, computed in chunks of positions through
//! the output layer so the full logits never exist (`chunked_lm_loss`).

use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use super::ops;
use crate::error::{Error, Result};
use crate::quant::FrozenLinear;
use crate::stash::Stash;

pub const IGNORE_INDEX: i64 = -100;

/// logits [b, t, V] (any float dtype; computed in f32), labels [b, t] (i64 or u32 with -100
/// for ignored positions when i64).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(Error::Invalid(format!("labels of shape {:?} for logits of shape {:?}", labels.dims(), [b, t, v])));
    }
    if t < 2 {
        return Err(Error::Invalid("a sequence needs at least two tokens to predict one".into()));
    }
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.reshape((b * (t - 1), v))?;
    let labels: Vec<i64> = labels.narrow(1, 1, t - 1)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let keep: Vec<f32> = labels.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
    let count: f32 = keep.iter().sum();
    if count == 0.0 {
        return Err(Error::Invalid("every label is -100: the batch has no token to train on".into()));
    }
    if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v)) {
        return Err(Error::Invalid(format!("label {bad} is outside the vocabulary of {v} tokens")));
    }
    let targets: Vec<u32> = labels.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 }).collect();
    let device = logits.device();
    let targets = Tensor::from_vec(targets, (b * (t - 1), 1), device)?;
    let keep = Tensor::from_vec(keep, b * (t - 1), device)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
    Ok(((picked * keep)?.sum_all()? * (-1.0 / count as f64))?)
}

/// Bytes of f32 logits one chunk of the chunked loss may hold. Each chunk reads the whole
/// output layer twice (forward, and again in the backward), so bigger chunks make that cheaper
/// on the CPU; kept under glibc's 32 MiB mmap ceiling so that a chunk's buffers are reused
/// from the heap instead of mapped and zeroed afresh (`memory::keep_freed_memory_for_reuse`).
/// SmolLM2: 160 positions; a few % more tokens/s at 256 tokens than 16 MiB chunks, +44 MiB.
pub const LOSS_CHUNK_BYTES: usize = 30 << 20;

/// Positions per chunk of the chunked loss for a vocabulary of `vocab`.
pub fn loss_chunk_rows(vocab: usize) -> usize {
    (LOSS_CHUNK_BYTES / (4 * vocab.max(1))).max(1)
}

/// The causal-LM loss of `hidden` [b, t, h] (the final norm's output) through the frozen output
/// layer `head`: the same value and gradient as `causal_lm_loss(head(hidden), labels)`, but the
/// logits of one chunk of positions exist at a time, in the forward and again in the backward,
/// so neither the full logits nor their gradient are ever held. Chunks whose positions are all
/// ignored (prompt tokens, padding) are skipped.
pub fn chunked_lm_loss(hidden: &Tensor, head: &FrozenLinear, labels: &Tensor) -> Result<Tensor> {
    let vocab = head.out_features();
    chunked_lm_loss_with(hidden, head, labels, loss_chunk_rows(vocab))
}

fn chunked_lm_loss_with(hidden: &Tensor, head: &FrozenLinear, labels: &Tensor, chunk: usize) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let vocab = head.out_features();
    if labels.dims() != [b, t] {
        return Err(Error::Invalid(format!(
            "labels of shape {:?} for hidden states of shape {:?}",
            labels.dims(),
            [b, t, h]
        )));
    }
    if t < 2 {
        return Err(Error::Invalid("a sequence needs at least two tokens to predict one".into()));
    }
    // position i of a row predicts label i + 1; the last position of each row predicts nothing
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let shifted: Vec<i64> = (0..b * t).map(|r| if (r + 1) % t == 0 { IGNORE_INDEX } else { labels[r + 1] }).collect();
    if let Some(bad) = shifted.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab)) {
        return Err(Error::Invalid(format!("label {bad} is outside the vocabulary of {vocab} tokens")));
    }
    let count = shifted.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if count == 0 {
        return Err(Error::Invalid("every label is -100: the batch has no token to train on".into()));
    }
    let device = hidden.device();
    let rows = b * t;
    let mut chunks = Vec::new();
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let part = &shifted[start..start + len];
        if part.iter().all(|&l| l == IGNORE_INDEX) {
            continue;
        }
        let targets: Vec<u32> = part.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 }).collect();
        let weights: Vec<f32> =
            part.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 / count as f32 }).collect();
        chunks.push(LossChunk { start, len, weight: Tensor::new(weights.as_slice(), device)?, targets, weights });
    }
    let flat = hidden.reshape((rows, h))?;
    let detached = flat.detach();
    let mut total: Option<Tensor> = None;
    for c in &chunks {
        let logits = head.forward(&detached.narrow(0, c.start, c.len)?)?.to_dtype(DType::F32)?;
        let nll = (ops::cross_entropy_rows(&logits, &c.targets)? * &c.weight)?.sum_all()?;
        total = Some(match total {
            None => nll,
            Some(t) => (t + nll)?,
        });
    }
    let loss = total.expect("at least one chunk has a label");
    if !hidden.track_op() {
        return Ok(loss);
    }
    Ok(flat.apply_op1(ChunkedLoss { head: head.clone(), chunks, hidden: h, loss: Stash::new(loss) })?)
}

struct LossChunk {
    start: usize,
    len: usize,
    /// The target of each position (0 where ignored).
    targets: Vec<u32>,
    /// 1/count where trained, 0 where ignored; and the same as a [len] tensor.
    weights: Vec<f32>,
    weight: Tensor,
}

struct ChunkedLoss {
    head: FrozenLinear,
    chunks: Vec<LossChunk>,
    hidden: usize,
    loss: Stash,
}

impl CustomOp1 for ChunkedLoss {
    fn name(&self) -> &'static str {
        "chunked-lm-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.loss.cpu_fwd()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.loss.cuda_fwd()
    }

    /// d logits = (softmax − one-hot) · weight · grad, chunk by chunk; d hidden = d logits · W.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = x.detach();
        let (rows, dtype, device) = (x.dim(0)?, x.dtype(), x.device().clone());
        // the scale of the loss (1, or a micro-batch's share of an accumulated step)
        let grad = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let mut parts = Vec::new();
        let mut next = 0;
        for c in &self.chunks {
            if c.start > next {
                parts.push(Tensor::zeros((c.start - next, self.hidden), dtype, &device)?);
            }
            let logits = self.head.forward(&x.narrow(0, c.start, c.len)?)?.to_dtype(DType::F32)?;
            let weights: Vec<f32> = c.weights.iter().map(|w| w * grad).collect();
            let d_logits = ops::cross_entropy_grad(&logits, &c.targets, &weights)?.to_dtype(dtype)?;
            drop(logits);
            parts.push(self.head.input_grad(&d_logits)?);
            next = c.start + c.len;
        }
        if next < rows {
            parts.push(Tensor::zeros((rows - next, self.hidden), dtype, &device)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::rand;
    use crate::quant::FrozenWeight;
    use candle_core::{Device, Var};

    #[test]
    fn chunked_loss_matches_the_full_logits() {
        let (b, t, h, v) = (3, 7, 16, 40);
        let head = FrozenLinear::new(FrozenWeight::Dense(rand(&[v, h], 1)), Some(rand(&[v], 2))).unwrap();
        let mut labels: Vec<i64> = (0..b * t).map(|i| (i * 7 % v) as i64).collect();
        // a prompt part, a whole ignored row and a trailing pad
        labels[..4].fill(IGNORE_INDEX);
        labels[t..2 * t].fill(IGNORE_INDEX);
        labels[b * t - 1] = IGNORE_INDEX;
        let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&rand(&[b, t, h], 3)).unwrap();
        let plain = causal_lm_loss(&head.forward(x.as_tensor()).unwrap(), &labels).unwrap();
        let g_plain = plain.backward().unwrap();
        for chunk in [1, 3, 5, 64] {
            let loss = chunked_lm_loss_with(x.as_tensor(), &head, &labels, chunk).unwrap();
            let diff = (loss.to_scalar::<f32>().unwrap() - plain.to_scalar::<f32>().unwrap()).abs();
            assert!(diff < 1e-5, "chunk {chunk}: loss differs by {diff}");
            let g = loss.backward().unwrap();
            let (a, e) = (g.get(x.as_tensor()).unwrap(), g_plain.get(x.as_tensor()).unwrap());
            let d = (a - e).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "chunk {chunk}: gradient differs by {d}");
        }
    }
}
