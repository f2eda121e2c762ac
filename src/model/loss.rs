//! The causal-LM loss: mean cross-entropy of the shifted labels, positions labelled -100
//! ignored, as transformers computes it.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

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
