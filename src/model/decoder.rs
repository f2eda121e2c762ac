//! The generic decoder, driven by `ModelSpec`: pre-norm blocks of attention (RoPE, GQA,
//! sliding window) and a gated MLP, with every linear a frozen base plus optional LoRA.
//! Only differentiable ops are used (docs/candle-training.md §4): composite RMSNorm, rope_slow
//! and ops::softmax, never the fused kernels that cut the graph.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use super::checkpoint::Checkpoint;
use super::spec::{ModelSpec, Position};
use crate::arch;
use crate::error::{Error, Result};
use crate::lora::{LoraLinear, LoraSettings};
use crate::quant::{bnb, nf4, FloatType, FrozenLinear, FrozenWeight};

/// How the frozen base weights are held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseWeights {
    /// LoRA: dense weights in this dtype.
    Dense(DType),
    /// QLoRA: NF4 (with or without double quantization); compute in `compute`.
    Nf4 { double_quant: bool, compute: DType },
}

impl BaseWeights {
    pub fn compute_dtype(self) -> DType {
        match self {
            BaseWeights::Dense(d) => d,
            BaseWeights::Nf4 { compute, .. } => compute,
        }
    }
}

pub struct Layer {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    pub q: LoraLinear,
    pub k: LoraLinear,
    pub v: LoraLinear,
    pub o: LoraLinear,
    pub gate: LoraLinear,
    pub up: LoraLinear,
    pub down: LoraLinear,
}

impl Layer {
    fn linears(&self) -> [&LoraLinear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    fn linears_mut(&mut self) -> [&mut LoraLinear; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

pub struct Model {
    pub spec: ModelSpec,
    embed: Tensor,
    pub layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: FrozenLinear,
    device: Device,
    dtype: DType,
}

fn load_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    shape: [usize; 2],
    bias: bool,
    base: BaseWeights,
    device: &Device,
) -> Result<LoraLinear> {
    let weight_key = format!("{prefix}.weight");
    let file = ckpt.file_of(&weight_key)?;
    let weight = if bnb::is_4bit(file, prefix) {
        let q = bnb::load_nf4(file, prefix)?;
        if q.shape != shape {
            return Err(file.error(&weight_key, format!("shape {:?}, expected {:?} from config.json", q.shape, shape)));
        }
        FrozenWeight::Nf4(Arc::new(q))
    } else {
        match base {
            BaseWeights::Dense(dtype) => FrozenWeight::Dense(ckpt.tensor(&weight_key, &shape, dtype, device)?),
            BaseWeights::Nf4 { double_quant, .. } => {
                // Quantized tensor by tensor, so that loading never holds the whole dense model.
                let view = file.get(&weight_key)?;
                let stored = match view.dtype() {
                    safetensors::Dtype::BF16 => FloatType::BF16,
                    safetensors::Dtype::F16 => FloatType::F16,
                    _ => FloatType::F32,
                };
                let (values, got) = file.f32_values(&weight_key)?;
                if got != shape {
                    return Err(file.error(&weight_key, format!("shape {got:?}, expected {shape:?} from config.json")));
                }
                FrozenWeight::Nf4(Arc::new(nf4::quantize(&values, &shape, stored, nf4::BLOCKSIZE, double_quant)?))
            }
        }
    };
    let bias = if bias {
        Some(ckpt.tensor(&format!("{prefix}.bias"), &[shape[0]], base.compute_dtype(), device)?)
    } else {
        None
    };
    Ok(LoraLinear::new(prefix.to_string(), FrozenLinear::new(weight, bias)?))
}

impl Model {
    /// Load a Hugging Face checkpoint folder (config.json + safetensors).
    pub fn load(dir: &Path, base: BaseWeights, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", config_path.display())))?;
        bnb::config_is_4bit(&config)?;
        let table = arch::table()?;
        let recognised = table.recognise(&config).map_err(|e| match e {
            Error::UnknownFamily(m) => Error::UnknownFamily(format!("{}: {m}", config_path.display())),
            other => other,
        })?;
        let spec = ModelSpec::from_config(&config, &recognised, &config_path.display().to_string())?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(spec, &ckpt, base, device)
    }

    pub fn from_checkpoint(spec: ModelSpec, ckpt: &Checkpoint, base: BaseWeights, device: &Device) -> Result<Self> {
        let dtype = base.compute_dtype();
        let (h, hd) = (spec.hidden, spec.head_dim);
        let (q_out, kv_out) = (spec.heads * hd, spec.kv_heads * hd);
        let w = &spec.weights;
        let embed = ckpt.tensor(&format!("{}.weight", w.embed), &[spec.vocab, h], dtype, device)?;
        let mut layers = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let p = spec.layer_prefix(i);
            let lin = |name: &str, shape: [usize; 2], bias: bool| {
                load_linear(ckpt, &format!("{p}.{name}"), shape, bias, base, device)
            };
            let norm = |name: &str| ckpt.tensor(&format!("{p}.{name}.weight"), &[h], dtype, device);
            layers.push(Layer {
                attn_norm: norm(&w.attn_norm)?,
                mlp_norm: norm(&w.mlp_norm)?,
                q: lin(&w.q, [q_out, h], spec.qkv_bias)?,
                k: lin(&w.k, [kv_out, h], spec.qkv_bias)?,
                v: lin(&w.v, [kv_out, h], spec.qkv_bias)?,
                o: lin(&w.o, [h, q_out], spec.o_bias)?,
                gate: lin(&w.gate, [spec.intermediate, h], spec.mlp_bias)?,
                up: lin(&w.up, [spec.intermediate, h], spec.mlp_bias)?,
                down: lin(&w.down, [h, spec.intermediate], spec.mlp_bias)?,
            });
        }
        let final_norm = ckpt.tensor(&format!("{}.weight", w.final_norm), &[h], dtype, device)?;
        let lm_head_key = format!("{}.weight", w.lm_head);
        // transformers never quantizes lm_head; tied models reuse the embedding
        let lm_head = if spec.tie_embeddings || !ckpt.contains(&lm_head_key) {
            FrozenLinear::new(FrozenWeight::Dense(embed.clone()), None)?
        } else {
            FrozenLinear::new(FrozenWeight::Dense(ckpt.tensor(&lm_head_key, &[spec.vocab, h], dtype, device)?), None)?
        };
        Ok(Self { spec, embed, layers, final_norm, lm_head, device: device.clone(), dtype })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.layers.iter_mut().flat_map(|l| l.linears_mut())
    }

    /// Linear module names this model has (what targets may name).
    pub fn linear_names(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.linears().map(|l| l.name().to_string()).filter(|n| seen.insert(n.clone())).collect()
    }

    /// Put fresh LoRA pairs on every linear whose name is a target ("all-linear" for all).
    pub fn add_lora(&mut self, settings: &LoraSettings) -> Result<()> {
        let have = self.linear_names();
        let all = settings.targets.iter().any(|t| t == "all-linear");
        let missing: Vec<&str> =
            settings.targets.iter().filter(|t| *t != "all-linear" && !have.contains(t)).map(String::as_str).collect();
        if !missing.is_empty() || settings.targets.is_empty() {
            return Err(Error::Invalid(format!(
                "no linear module named {}; this model's linear modules are: {}",
                if missing.is_empty() { "(none chosen)".to_string() } else { missing.join(", ") },
                have.join(", ")
            )));
        }
        if settings.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        let device = self.device.clone();
        for lin in self.linears_mut() {
            if all || settings.targets.iter().any(|t| t == lin.name()) {
                lin.init_lora(settings, &device)?;
            }
        }
        Ok(())
    }

    /// Load a PEFT adapter folder onto this model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<crate::lora::LoraSettings> {
        let adapter = crate::lora::peft::read_adapter(dir, &self.device.clone())?;
        adapter.apply(self.linears_mut(), dir)?;
        Ok(adapter.settings)
    }

    /// The trainable tensors, keyed as PEFT names them (`base_model.model.<path>.lora_A.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(pair) = &lin.lora {
                out.push((format!("base_model.model.{}.lora_A.weight", lin.path), pair.a.clone()));
                out.push((format!("base_model.model.{}.lora_B.weight", lin.path), pair.b.clone()));
            }
        }
        out
    }

    /// input_ids [b, t] (u32) → logits [b, t, V] in f32. `train` turns LoRA dropout on.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let s = &self.spec;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut h = self.embed.index_select(&ids, 0)?.reshape((b, t, s.hidden))?;
        let (cos, sin) = self.rope_tables(t)?;
        let mask = causal_mask(t, s.sliding_window, &self.device)?;
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.attn_norm, s.norm_eps)?;
            h = (h + self.attention(layer, &x, &cos, &sin, &mask, train)?)?;
            let x = rms_norm(&h, &layer.mlp_norm, s.norm_eps)?;
            let gated = (layer.gate.forward(&x, train)?.silu()? * layer.up.forward(&x, train)?)?;
            h = (h + layer.down.forward(&gated, train)?)?;
        }
        let h = rms_norm(&h, &self.final_norm, s.norm_eps)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, s.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(layer.q.forward(x, train)?, s.heads)?;
        let k = heads(layer.k.forward(x, train)?, s.kv_heads)?;
        let v = heads(layer.v.forward(x, train)?, s.kv_heads)?;
        let q = candle_nn::rotary_emb::rope_slow(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&k, cos, sin)?;
        let (k, v) = (repeat_kv(k, s.heads / s.kv_heads)?, repeat_kv(v, s.heads / s.kv_heads)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (s.head_dim as f64).sqrt()))?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, s.heads * s.head_dim))?;
        Ok(layer.o.forward(&out, train)?)
    }

    /// cos and sin [t, rotary_dim/2] for positions 0..t, as transformers computes them in f32.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let Position::Rope { theta, rotary_dim } = self.spec.position;
        let inv_freq: Vec<f32> =
            (0..rotary_dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, rotary_dim / 2), &self.device)?;
        let positions = Tensor::arange(0u32, t as u32, &self.device)?.to_dtype(DType::F32)?.reshape((t, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?))
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm_slow(x, weight, eps as f32)
}

/// [b, kv, t, d] → [b, kv·n_rep, t, d], each KV head repeated for its group of query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, t, d))?.reshape((b, kv * n_rep, t, d))
}

/// 0 where query i may attend to key j (j ≤ i, and i − j < window), −∞ elsewhere.
fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}
