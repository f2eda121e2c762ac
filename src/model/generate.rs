//! Text generation on token ids with a KV cache: greedy, or temperature and top-p sampling
//! from a seed, stopping at an end-of-sequence id. Works with LoRA adapters on (the same
//! layers as training, in eval mode). Tokenizing and chat templates are the caller's.

use candle_core::{Tensor, D};

use super::decoder::{KvCache, Model};
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 (or less) is greedy.
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at
    /// least this (1 = all tokens). Ignored when greedy.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops at any of these; the stop id is not part of the output.
    pub eos_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, eos_ids: Vec::new() }
    }
}

/// The ids generated after `prompt_ids` (without the prompt and without the stop id).
pub fn generate(model: &Model, prompt_ids: &[u32], options: &GenerateOptions) -> Result<Vec<u32>> {
    generate_streaming(model, prompt_ids, options, |_| true)
}

/// As `generate`, calling `on_token` with each new id as soon as it is chosen (before any
/// stop check on length); `on_token` returning false stops generation after that token.
pub fn generate_streaming(
    model: &Model,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid("generation needs a prompt of at least one token".into()));
    }
    if !(options.top_p > 0.0 && options.top_p <= 1.0) {
        return Err(Error::Invalid(format!("top-p must be in (0, 1], got {}", options.top_p)));
    }
    let vocab = model.spec.vocab as u32;
    if let Some(bad) = prompt_ids.iter().find(|&&id| id >= vocab) {
        return Err(Error::Invalid(format!("prompt token id {bad} is outside the model's vocabulary of {vocab}")));
    }
    let mut rng = Rng::new(options.seed);
    let mut cache = KvCache::new(model.blocks.len());
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
    while out.len() < options.max_new_tokens {
        let logits = model.forward_with_cache(&input, &mut cache)?;
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?.squeeze(0)?;
        let next = choose(&last, options, &mut rng)?;
        if options.eos_ids.contains(&next) {
            break;
        }
        out.push(next);
        if !on_token(next) {
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

/// The next id from last-position logits [V]: argmax (the first of equal maxima, as torch),
/// or a sample from softmax(logits / T) restricted to the top-p nucleus.
pub fn choose(logits: &Tensor, options: &GenerateOptions, rng: &mut Rng) -> Result<u32> {
    if options.temperature <= 0.0 {
        return Ok(argmax(&logits.to_vec1::<f32>()?));
    }
    let probs = candle_nn::ops::softmax(&(logits / options.temperature)?, D::Minus1)?.to_vec1::<f32>()?;
    Ok(sample_top_p(&probs, options.top_p, rng.next_f64()))
}

pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Sample with the uniform draw `u` ∈ [0, 1) among the smallest set of most likely tokens whose
/// probabilities reach `top_p`, renormalised.
pub fn sample_top_p(probs: &[f32], top_p: f64, u: f64) -> u32 {
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &id in &order {
        mass += probs[id as usize] as f64;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let mut target = u * mass;
    for &id in &order[..kept] {
        target -= probs[id as usize] as f64;
        if target < 0.0 {
            return id;
        }
    }
    order[kept - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let probs = [0.1f32, 0.5, 0.3, 0.1];
        // nucleus for 0.7: ids 1 (0.5) and 2 (0.3), mass 0.8
        let picks: Vec<u32> = (0..100).map(|i| sample_top_p(&probs, 0.7, i as f64 / 100.0)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        let share_of_1 = picks.iter().filter(|&&p| p == 1).count();
        assert_eq!(share_of_1, 63); // u·0.8 < 0.5 ⇔ u < 0.625
                                    // top_p 1: every token can come out
        let all: std::collections::BTreeSet<u32> =
            (0..100).map(|i| sample_top_p(&probs, 1.0, i as f64 / 100.0)).collect();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }
}
