//! Model shapes without weights: the configs benchmarks run on, with generated weights.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::checkpoint::WeightSource;
use super::decoder::BaseWeights;
use crate::error::{Error, Result};
use crate::quant::{nf4, FloatType, FrozenWeight};
use crate::rng::Rng;

/// Preset names, as ../shared/bench/peft_baseline.py names them.
pub const PRESETS: [&str; 3] = ["smollm2-135m", "tiny", "llama2-7b"];

/// The config.json of a preset (the same shapes as the PyTorch baseline's presets).
pub fn preset_config(name: &str) -> Result<Value> {
    let base =
        |vocab: usize, hidden: usize, ffn: usize, layers: usize, heads: usize, kv: usize, theta: f64, tied: bool| {
            json!({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                "rope_theta": theta, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
                "max_position_embeddings": 4096, "hidden_act": "silu"
            })
        };
    match name {
        "smollm2-135m" => Ok(base(49152, 576, 1536, 30, 9, 3, 100_000.0, true)),
        "tiny" => Ok(base(256, 64, 192, 2, 4, 2, 10_000.0, false)),
        "llama2-7b" => Ok(base(32000, 4096, 11008, 32, 32, 32, 10_000.0, false)),
        other => Err(Error::Invalid(format!("unknown preset {other:?}; presets: {}", PRESETS.join(", ")))),
    }
}

/// Generated weights: linears and embeddings N(0, 0.02²), norm weights one, biases zero;
/// the same for a given seed.
pub struct RandomWeights {
    pub seed: u64,
}

impl WeightSource for RandomWeights {
    fn contains(&self, _key: &str) -> bool {
        true
    }

    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match shape {
            [_] if key.ends_with(".bias") => Tensor::zeros(shape, DType::F32, device)?,
            [_] => Tensor::ones(shape, DType::F32, device)?,
            _ => Tensor::from_vec(normal_values(Rng::key(self.seed, key), shape.iter().product()), shape, device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn linear_weight(
        &self,
        prefix: &str,
        shape: [usize; 2],
        base: BaseWeights,
        device: &Device,
    ) -> Result<FrozenWeight> {
        let w = self.tensor(&format!("{prefix}.weight"), &shape, DType::F32, device)?;
        Ok(match base {
            BaseWeights::Dense(dtype) => FrozenWeight::Dense(w.to_dtype(dtype)?),
            BaseWeights::Nf4 { double_quant, .. } => {
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                let q = nf4::quantize(&values, &shape, FloatType::F32, nf4::BLOCKSIZE, double_quant)?;
                FrozenWeight::nf4(q, device)?
            }
        })
    }
}

/// n samples of N(0, 0.02²), drawn in parallel chunks each seeded from `key` and its index:
/// a 7B model's 6.7 billion weights in seconds rather than minutes.
fn normal_values(key: u64, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        part.copy_from_slice(&Rng::new(Rng::nth(key, c as u64)).normal(part.len(), 0.0, 0.02));
    });
    out
}
