//! The generic decoder, driven by `ModelSpec`: pre-norm blocks of attention (RoPE, GQA,
//! sliding window) and a gated MLP, with every linear a frozen base plus optional LoRA.
//! Only differentiable ops are used (docs/candle-training.md §4): our fused ops with a
//! backward (model::ops), never candle's fast kernels that cut the graph.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use super::checkpoint::{Checkpoint, WeightSource};
use super::ops;
use super::spec::{Activation, MlpKind, ModelSpec, NormKind, Position};
use crate::arch::{self, SplitKind};
use crate::error::{Error, Result};
use crate::lora::{LoraLinear, LoraSettings};
use crate::quant::{bnb, FrozenLinear, FrozenWeight};
use crate::rng::Rng;

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

/// A norm's frozen parameters: RMSNorm has only a weight, LayerNorm also a bias.
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            None => ops::rms_norm(x, &self.weight, self.eps),
            Some(b) => ops::layer_norm(x, &self.weight, b, self.eps),
        }
    }
}

pub enum Qkv {
    Separate {
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
    },
    /// One projection whose output rows hold q, k and v (split by `ModelSpec::qkv_split`).
    Fused(LoraLinear),
}

pub struct Expert {
    pub gate: LoraLinear,
    pub up: LoraLinear,
    pub down: LoraLinear,
}

pub enum Mlp {
    Gated {
        gate: LoraLinear,
        up: LoraLinear,
        down: LoraLinear,
        act: Activation,
    },
    /// One projection to [gate; up] (ChatGLM).
    GatedFused {
        gate_up: LoraLinear,
        down: LoraLinear,
        act: Activation,
    },
    Plain {
        up: LoraLinear,
        down: LoraLinear,
        act: Activation,
    },
    Moe {
        router: LoraLinear,
        experts: Vec<Expert>,
        top_k: usize,
        act: Activation,
    },
}

pub struct Layer {
    attn_norm: Norm,
    mlp_norm: Option<Norm>,
    pub qkv: Qkv,
    pub o: LoraLinear,
    pub mlp: Mlp,
}

impl Layer {
    fn linears(&self) -> Vec<&LoraLinear> {
        let mut out: Vec<&LoraLinear> = match &self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&self.o);
        match &self.mlp {
            Mlp::Gated { gate, up, down, .. } => out.extend([gate, up, down]),
            Mlp::GatedFused { gate_up, down, .. } => out.extend([gate_up, down]),
            Mlp::Plain { up, down, .. } => out.extend([up, down]),
            Mlp::Moe { router, experts, .. } => {
                out.push(router);
                for e in experts {
                    out.extend([&e.gate, &e.up, &e.down]);
                }
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        let mut out: Vec<&mut LoraLinear> = match &mut self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&mut self.o);
        match &mut self.mlp {
            Mlp::Gated { gate, up, down, .. } => out.extend([gate, up, down]),
            Mlp::GatedFused { gate_up, down, .. } => out.extend([gate_up, down]),
            Mlp::Plain { up, down, .. } => out.extend([up, down]),
            Mlp::Moe { router, experts, .. } => {
                out.push(router);
                for e in experts {
                    out.extend([&mut e.gate, &mut e.up, &mut e.down]);
                }
            }
        }
        out
    }
}

pub struct Model {
    pub spec: ModelSpec,
    embed: Tensor,
    embed_norm: Option<Norm>,
    pub layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: FrozenLinear,
    device: Device,
    dtype: DType,
}

fn load_linear(
    source: &dyn WeightSource,
    prefix: &str,
    shape: [usize; 2],
    bias: bool,
    base: BaseWeights,
    device: &Device,
) -> Result<LoraLinear> {
    let weight = source.linear_weight(prefix, shape, base, device)?;
    let bias = if bias {
        Some(source.tensor(&format!("{prefix}.bias"), &[shape[0]], base.compute_dtype(), device)?)
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
        Self::from_source(spec, &ckpt, base, device)
    }

    pub fn from_source(spec: ModelSpec, source: &dyn WeightSource, base: BaseWeights, device: &Device) -> Result<Self> {
        let dtype = base.compute_dtype();
        let (h, hd) = (spec.hidden, spec.head_dim);
        let (q_out, kv_out) = (spec.heads * hd, spec.kv_heads * hd);
        let w = &spec.weights;
        let norm = |prefix: &str| -> Result<Norm> {
            let bias = match spec.norm {
                NormKind::Rms => None,
                NormKind::Layer => Some(source.tensor(&format!("{prefix}.bias"), &[h], dtype, device)?),
            };
            Ok(Norm {
                weight: source.tensor(&format!("{prefix}.weight"), &[h], dtype, device)?,
                bias,
                eps: spec.norm_eps,
            })
        };
        let embed = source.tensor(&format!("{}.weight", w.embed), &[spec.vocab, h], dtype, device)?;
        let embed_norm = w.embed_norm.as_deref().map(norm).transpose()?;
        let mut layers = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let p = spec.layer_prefix(i);
            let lin = |name: &str, shape: [usize; 2], bias: bool| {
                load_linear(source, &format!("{p}.{name}"), shape, bias, base, device)
            };
            let qkv = match (&w.qkv, &w.q, &w.k, &w.v) {
                (Some(qkv), ..) => Qkv::Fused(lin(qkv, [q_out + 2 * kv_out, h], spec.qkv_bias)?),
                (None, Some(q), Some(k), Some(v)) => Qkv::Separate {
                    q: lin(q, [q_out, h], spec.qkv_bias)?,
                    k: lin(k, [kv_out, h], spec.qkv_bias)?,
                    v: lin(v, [kv_out, h], spec.qkv_bias)?,
                },
                _ => return Err(Error::Invalid("architecture table: weights need q, k, v or qkv".into())),
            };
            let ffn = spec.intermediate;
            let mlp = match (spec.mlp, &w.gate) {
                (MlpKind::Gated(act), _) if w.gate_up.is_some() => Mlp::GatedFused {
                    gate_up: lin(w.gate_up.as_deref().unwrap_or_default(), [2 * ffn, h], spec.mlp_bias)?,
                    down: lin(&w.down, [h, ffn], spec.mlp_bias)?,
                    act,
                },
                (MlpKind::Gated(act), Some(gate)) => Mlp::Gated {
                    gate: lin(gate, [ffn, h], spec.mlp_bias)?,
                    up: lin(&w.up, [ffn, h], spec.mlp_bias)?,
                    down: lin(&w.down, [h, ffn], spec.mlp_bias)?,
                    act,
                },
                (MlpKind::Plain(act), _) => Mlp::Plain {
                    up: lin(&w.up, [ffn, h], spec.mlp_bias)?,
                    down: lin(&w.down, [h, ffn], spec.mlp_bias)?,
                    act,
                },
                (MlpKind::Moe { experts, top_k, act }, Some(gate)) => {
                    let (Some(router), Some(prefix)) = (&w.router, &w.experts) else {
                        return Err(Error::Invalid("architecture table: a MoE layout needs router and experts".into()));
                    };
                    let experts = (0..experts)
                        .map(|e| {
                            let ep = prefix.replace("{e}", &e.to_string());
                            Ok(Expert {
                                gate: lin(&format!("{ep}.{gate}"), [ffn, h], false)?,
                                up: lin(&format!("{ep}.{}", w.up), [ffn, h], false)?,
                                down: lin(&format!("{ep}.{}", w.down), [h, ffn], false)?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Mlp::Moe { router: lin(router, [experts.len(), h], false)?, experts, top_k, act }
                }
                _ => return Err(Error::Invalid("architecture table: a gated MLP needs a gate weight".into())),
            };
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.{}", w.attn_norm))?,
                mlp_norm: w.mlp_norm.as_ref().map(|n| norm(&format!("{p}.{n}"))).transpose()?,
                qkv,
                o: lin(&w.o, [h, q_out], spec.o_bias)?,
                mlp,
            });
        }
        let final_norm = norm(&w.final_norm)?;
        let lm_head_key = format!("{}.weight", w.lm_head);
        // transformers never quantizes lm_head; tied models reuse the embedding
        let lm_weight = if spec.tie_embeddings || !source.contains(&lm_head_key) {
            embed.clone()
        } else {
            source.tensor(&lm_head_key, &[spec.vocab, h], dtype, device)?
        };
        let lm_bias = if spec.lm_head_bias {
            Some(source.tensor(&format!("{}.bias", w.lm_head), &[spec.vocab], dtype, device)?)
        } else {
            None
        };
        // Baichuan2's NormHead: rows scaled to unit L2 norm (torch's F.normalize, eps 1e-12)
        let lm_weight = if spec.normalized_lm_head {
            lm_weight.broadcast_div(&lm_weight.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)?
        } else {
            lm_weight
        };
        let lm_head = FrozenLinear::new(FrozenWeight::Dense(lm_weight), lm_bias)?;
        Ok(Self { spec, embed, embed_norm, layers, final_norm, lm_head, device: device.clone(), dtype })
    }

    /// A model of a preset's shape with generated weights (benchmarks; see `presets`).
    pub fn from_preset(name: &str, base: BaseWeights, device: &Device) -> Result<Self> {
        let config = super::presets::preset_config(name)?;
        let table = arch::table()?;
        let recognised = table.recognise(&config)?;
        let spec = ModelSpec::from_config(&config, &recognised, &format!("preset {name}"))?;
        Self::from_source(spec, &super::presets::RandomWeights { seed: 0 }, base, device)
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

    /// Put fresh LoRA pairs on every linear whose name is a target ("all-linear" for all),
    /// initialised from `seed`.
    pub fn add_lora(&mut self, settings: &LoraSettings, seed: u64) -> Result<()> {
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
                lin.init_lora(settings, &mut Rng::for_key(seed, &lin.path), &device)?;
            }
        }
        Ok(())
    }

    /// Load a PEFT adapter folder onto this model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<crate::lora::LoraSettings> {
        let adapter = crate::lora::peft::read_adapter(dir, &self.device.clone())?;
        adapter.check_base(&self.spec, &self.linear_names(), dir)?;
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
        self.forward_impl(input_ids, train, None)
    }

    /// Inference with a KV cache: `input_ids` [b, t] continue the `cache.len()` positions the
    /// cache already holds (none for the prompt); their keys and values are appended to it.
    /// Returns the logits [b, t, V] of the new positions, equal to those of a full forward.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        self.forward_impl(input_ids, false, Some(cache))
    }

    fn forward_impl(&self, input_ids: &Tensor, train: bool, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let s = &self.spec;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut h = self.embed.index_select(&ids, 0)?.reshape((b, t, s.hidden))?;
        if let Some(n) = &self.embed_norm {
            h = n.forward(&h)?;
        }
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let positions = self.position_terms(offset, t)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer.attn_norm.forward(&h)?;
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = self.attention(layer, &x, &positions, train, layer_cache)?;
            h = if s.parallel_residual {
                let mlp_in = match &layer.mlp_norm {
                    Some(n) => n.forward(&h)?,
                    None => x,
                };
                ((h + attn)? + self.mlp(&layer.mlp, &mlp_in, train)?)?
            } else {
                let h = (h + attn)?;
                let mlp_in = match &layer.mlp_norm {
                    Some(n) => n.forward(&h)?,
                    None => h.clone(),
                };
                (&h + self.mlp(&layer.mlp, &mlp_in, train)?)?
            };
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let h = self.final_norm.forward(&h)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match mlp {
            Mlp::Gated { gate, up, down, act } => {
                down.forward(&gated(&gate.forward(x, train)?, &up.forward(x, train)?, *act)?, train)?
            }
            Mlp::GatedFused { gate_up, down, act } => {
                let y = gate_up.forward(x, train)?;
                let half = y.dim(D::Minus1)? / 2;
                down.forward(&gated(&y.narrow(D::Minus1, 0, half)?, &y.narrow(D::Minus1, half, half)?, *act)?, train)?
            }
            Mlp::Plain { up, down, act } => down.forward(&activate(&up.forward(x, train)?, *act)?, train)?,
            Mlp::Moe { router, experts, top_k, act } => self.moe(router, experts, *top_k, *act, x, train)?,
        })
    }

    /// Sparse MoE as transformers' Mixtral: softmax over the router logits in f32, the top k
    /// experts per token, their weights renormalised to sum to one.
    fn moe(
        &self,
        router: &LoraLinear,
        experts: &[Expert],
        top_k: usize,
        act: Activation,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let xf = x.reshape(((), hidden))?;
        let n = xf.dim(0)?;
        let probs = ops::softmax_last_dim(&router.forward(&xf, train)?.to_dtype(DType::F32)?)?;
        // the choice of experts is not differentiable; the chosen weights are
        let chosen: Vec<Vec<u32>> = probs
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| {
                let mut idx: Vec<u32> = (0..row.len() as u32).collect();
                idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                idx.truncate(top_k);
                idx
            })
            .collect();
        let idx = Tensor::from_vec(chosen.concat(), (n, top_k), &self.device)?;
        let weights = probs.gather(&idx, 1)?;
        let weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?.to_dtype(self.dtype)?.flatten_all()?;
        let mut out = xf.zeros_like()?;
        for (e, expert) in experts.iter().enumerate() {
            let (mut tokens, mut slots) = (Vec::new(), Vec::new());
            for (tok, row) in chosen.iter().enumerate() {
                if let Some(k) = row.iter().position(|&c| c as usize == e) {
                    tokens.push(tok as u32);
                    slots.push((tok * top_k + k) as u32);
                }
            }
            if tokens.is_empty() {
                continue;
            }
            let tokens = Tensor::new(tokens.as_slice(), &self.device)?;
            let slots = Tensor::new(slots.as_slice(), &self.device)?;
            let xe = xf.index_select(&tokens, 0)?;
            let ye = expert
                .down
                .forward(&gated(&expert.gate.forward(&xe, train)?, &expert.up.forward(&xe, train)?, act)?, train)?;
            let ye = ye.broadcast_mul(&weights.index_select(&slots, 0)?.unsqueeze(1)?)?;
            out = out.index_add(&tokens, &ye, 0)?;
        }
        Ok(out.reshape(dims)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        positions: &PositionTerms,
        train: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (s.head_dim, s.heads, s.kv_heads);
        let (q, k, v) = match &layer.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x, train)?, k.forward(x, train)?, v.forward(x, train)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x, train)?;
                match s.qkv_split {
                    Some(SplitKind::QkvGrouped) => {
                        let g = nh / nkv;
                        let y = y.reshape((b, t, nkv, g + 2, hd))?;
                        (
                            y.narrow(3, 0, g)?.reshape((b, t, nh * hd))?,
                            y.narrow(3, g, 1)?.reshape((b, t, nkv * hd))?,
                            y.narrow(3, g + 1, 1)?.reshape((b, t, nkv * hd))?,
                        )
                    }
                    _ => (
                        y.narrow(2, 0, nh * hd)?,
                        y.narrow(2, nh * hd, nkv * hd)?,
                        y.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                    ),
                }
            }
        };
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let (mut q, mut k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        if let (Position::Rope { rotary_dim, interleaved, .. }, Some((cos, sin))) = (&s.position, &positions.rope) {
            q = apply_rope(&q, cos, sin, *rotary_dim, *interleaved)?;
            k = apply_rope(&k, cos, sin, *rotary_dim, *interleaved)?;
        }
        // keys and values of earlier positions come from the cache (after RoPE, before repeat)
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let (k, v) = (repeat_kv(k, nh / nkv)?, repeat_kv(v, nh / nkv)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(&positions.mask)?;
        let probs = ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(layer.o.forward(&out, train)?)
    }

    /// The position terms of t tokens at positions offset..offset+t attending to keys
    /// 0..offset+t: RoPE tables, and the additive attention mask (causal, sliding window,
    /// ALiBi) of shape [heads or 1, t, offset+t].
    fn position_terms(&self, offset: usize, t: usize) -> Result<PositionTerms> {
        let total = offset + t;
        let causal = causal_mask(offset, t, self.spec.sliding_window, &self.device)?;
        Ok(match self.spec.position {
            Position::Rope { theta, rotary_dim, .. } => {
                // as transformers computes them, in f32
                let inv_freq: Vec<f32> = (0..rotary_dim / 2)
                    .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
                    .collect();
                let inv_freq = Tensor::from_vec(inv_freq, (1, rotary_dim / 2), &self.device)?;
                let pos =
                    Tensor::arange(offset as u32, total as u32, &self.device)?.to_dtype(DType::F32)?.reshape((t, 1))?;
                let freqs = pos.broadcast_mul(&inv_freq)?;
                let rope = Some((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?));
                PositionTerms { rope, mask: causal.unsqueeze(0)? }
            }
            Position::Alibi => {
                // bias slope_h · j on key position j; under softmax equal to slope_h · (j − i)
                let slopes = Tensor::new(alibi_slopes(self.spec.heads).as_slice(), &self.device)?;
                let keys = Tensor::arange(0u32, total as u32, &self.device)?.to_dtype(DType::F32)?;
                let alibi = slopes.reshape((self.spec.heads, 1, 1))?.broadcast_mul(&keys.reshape((1, 1, total))?)?;
                PositionTerms { rope: None, mask: alibi.broadcast_add(&causal.unsqueeze(0)?)? }
            }
        })
    }
}

struct PositionTerms {
    rope: Option<(Tensor, Tensor)>,
    mask: Tensor,
}

/// ALiBi slopes for n heads, as BLOOM's build_alibi_tensor (and Baichuan's _get_interleave).
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let base = |m: usize| 2f64.powf(-(2f64.powf(-((m as f64).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|p| base(closest).powi(p as i32) as f32).collect();
    if closest != n {
        let extra = base(2 * closest);
        let remaining = (n - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra.powi((2 * i + 1) as i32) as f32));
    }
    slopes
}

/// RoPE on the first `rotary_dim` of each head (rotate-half, or interleaved pairs); the rest
/// passes through.
fn apply_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    rotary_dim: usize,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let rope = |x: &Tensor| {
        if interleaved {
            candle_nn::rotary_emb::rope_i_slow(&x.contiguous()?, cos, sin)
        } else {
            ops::rope(x, cos, sin)
        }
    };
    let hd = x.dim(D::Minus1)?;
    if rotary_dim == hd {
        return rope(x);
    }
    let rot = rope(&x.narrow(D::Minus1, 0, rotary_dim)?)?;
    Tensor::cat(&[&rot, &x.narrow(D::Minus1, rotary_dim, hd - rotary_dim)?], D::Minus1)
}

/// act(gate) · up, fused for SiLU.
fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => ops::silu_gate(gate, up),
        other => activate(gate, other)? * up,
    }
}

fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// [b, kv, t, d] → [b, kv·n_rep, t, d], each KV head repeated for its group of query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, t, d))?.reshape((b, kv * n_rep, t, d))
}

/// [t, offset+t]: 0 where query i (at position offset+i) may attend to key j (j ≤ offset+i,
/// and offset+i − j < window), −∞ elsewhere.
fn causal_mask(offset: usize, t: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> = (offset..total)
        .flat_map(|i| {
            (0..total).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

/// Keys and values of the positions a model has seen, per layer ([b, kv_heads, len, head_dim],
/// after RoPE), so that generation computes each new token from itself and the cache.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self { layers: vec![None; layers], len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
