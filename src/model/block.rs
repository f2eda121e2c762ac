//! One decoder layer: norms, attention (RoPE or ALiBi, grouped KV heads, sliding window), a
//! dense, gated or mixture-of-experts MLP, and the residuals (sequential or parallel), built
//! from the layer plan of `ModelSpec`. The decoder is a loop over blocks, and gradient
//! checkpointing wraps a block whole (model::recompute).

use candle_core::{DType, Device, Tensor, D};

use super::attention::{attention, AttentionMask};
use super::checkpoint::WeightSource;
use super::decoder::BaseWeights;
use super::ops;
use super::spec::{Activation, MlpKind, ModelSpec, NormKind, Position, Role};
use crate::arch::SplitKind;
use crate::error::{Error, Result};
use crate::lora::LoraLinear;
use crate::quant::FrozenLinear;

/// A norm's frozen parameters: RMSNorm has only a weight, LayerNorm also a bias.
#[derive(Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub fn load(
        spec: &ModelSpec,
        prefix: &str,
        source: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = spec.hidden;
        let bias = match spec.norm {
            NormKind::Rms => None,
            NormKind::Layer => Some(source.tensor(&format!("{prefix}.bias"), &[h], dtype, device)?),
        };
        Ok(Norm { weight: source.tensor(&format!("{prefix}.weight"), &[h], dtype, device)?, bias, eps: spec.norm_eps })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            None => ops::rms_norm(x, &self.weight, self.eps),
            Some(b) => ops::layer_norm(x, &self.weight, b, self.eps),
        }
    }
}

// one per block, never moved in a hot path: the variants' sizes do not matter
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Qkv {
    Separate {
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
    },
    /// One projection whose output rows hold q, k and v (split as the plan says).
    Fused(LoraLinear),
}

#[derive(Clone)]
pub struct Expert {
    pub gate: LoraLinear,
    pub up: LoraLinear,
    pub down: LoraLinear,
}

#[derive(Clone)]
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

/// What a block needs of the model's shape.
#[derive(Clone, Debug)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qkv_split: Option<SplitKind>,
    rope: Option<(usize, bool)>,
    parallel_residual: bool,
}

/// The position terms of one forward, shared by every block: RoPE tables for the new
/// positions and the attention mask (causal, sliding window, ALiBi slopes).
#[derive(Clone)]
pub struct Positions {
    /// cos and sin [t, rotary_dim / 2] in the compute dtype.
    pub rope: Option<(Tensor, Tensor)>,
    pub mask: AttentionMask,
}

impl Positions {
    /// For t tokens at positions offset..offset + t.
    pub fn new(spec: &ModelSpec, offset: usize, t: usize, dtype: DType, device: &Device) -> Result<Self> {
        let mask = AttentionMask { offset, window: spec.sliding_window, alibi: None };
        Ok(match spec.position {
            Position::Rope { theta, rotary_dim, .. } => {
                // as transformers computes them, in f32
                let inv_freq: Vec<f32> = (0..rotary_dim / 2)
                    .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
                    .collect();
                let inv_freq = Tensor::from_vec(inv_freq, (1, rotary_dim / 2), device)?;
                let pos = Tensor::arange(offset as u32, (offset + t) as u32, device)?
                    .to_dtype(DType::F32)?
                    .reshape((t, 1))?;
                let freqs = pos.broadcast_mul(&inv_freq)?;
                Positions { rope: Some((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?)), mask }
            }
            Position::Alibi => {
                Positions { rope: None, mask: AttentionMask { alibi: Some(alibi_slopes(spec.heads)), ..mask } }
            }
        })
    }
}

/// Keys and values a layer has seen ([b, kv_heads, len, head_dim], after RoPE).
pub type LayerCache = Option<(Tensor, Tensor)>;

#[derive(Clone)]
pub struct Block {
    shape: Shape,
    attn_norm: Norm,
    mlp_norm: Option<Norm>,
    qkv: Qkv,
    o: LoraLinear,
    mlp: Mlp,
    /// Attention's matmuls take bf16 operands, as the frozen linears do (a CPU run in bf16).
    bf16_operands: bool,
}

fn load_linear(
    source: &dyn WeightSource,
    path: String,
    shape: [usize; 2],
    bias: bool,
    base: BaseWeights,
    device: &Device,
) -> Result<LoraLinear> {
    let weight = source.linear_weight(&path, shape, base, device)?;
    let bias = if bias {
        Some(source.tensor(&format!("{path}.bias"), &[shape[0]], base.activation_dtype(device), device)?)
    } else {
        None
    };
    Ok(LoraLinear::new(path, base.frozen_linear(device, FrozenLinear::new(weight, bias)?)))
}

impl Block {
    /// Load layer `i` as the spec's layer plan describes it.
    pub fn load(
        spec: &ModelSpec,
        i: usize,
        source: &dyn WeightSource,
        base: BaseWeights,
        device: &Device,
    ) -> Result<Self> {
        let dtype = base.activation_dtype(device);
        let prefix = spec.layer_prefix(i);
        let mut linears = Vec::with_capacity(spec.linears.len());
        for l in &spec.linears {
            let linear = load_linear(source, spec.linear_path(i, l), l.shape(), l.bias, base, device)?;
            linears.push((l.role, l.expert, Some(linear)));
        }
        let mut take = |role: Role, expert: Option<usize>| -> Result<LoraLinear> {
            linears
                .iter_mut()
                .find(|(r, e, l)| *r == role && *e == expert && l.is_some())
                .and_then(|(.., l)| l.take())
                .ok_or_else(|| {
                    Error::Invalid(format!("architecture table: the layout of {} has no {role:?} module", spec.family))
                })
        };
        let qkv = if spec.linears.iter().any(|l| l.role == Role::Qkv) {
            Qkv::Fused(take(Role::Qkv, None)?)
        } else {
            Qkv::Separate { q: take(Role::Q, None)?, k: take(Role::K, None)?, v: take(Role::V, None)? }
        };
        let o = take(Role::O, None)?;
        let mlp = match spec.mlp {
            MlpKind::Moe { experts, top_k, act } => {
                let router = take(Role::Router, None)?;
                let experts = (0..experts)
                    .map(|e| {
                        Ok(Expert {
                            gate: take(Role::ExpertGate, Some(e))?,
                            up: take(Role::ExpertUp, Some(e))?,
                            down: take(Role::ExpertDown, Some(e))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Mlp::Moe { router, experts, top_k, act }
            }
            MlpKind::Gated(act) if spec.linears.iter().any(|l| l.role == Role::GateUp) => {
                Mlp::GatedFused { gate_up: take(Role::GateUp, None)?, down: take(Role::Down, None)?, act }
            }
            MlpKind::Gated(act) => Mlp::Gated {
                gate: take(Role::Gate, None)?,
                up: take(Role::Up, None)?,
                down: take(Role::Down, None)?,
                act,
            },
            MlpKind::Plain(act) => Mlp::Plain { up: take(Role::Up, None)?, down: take(Role::Down, None)?, act },
        };
        let w = &spec.weights;
        let shape = Shape {
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
            qkv_split: spec.qkv_split,
            rope: match spec.position {
                Position::Rope { rotary_dim, interleaved, .. } => Some((rotary_dim, interleaved)),
                Position::Alibi => None,
            },
            parallel_residual: spec.parallel_residual,
        };
        let block = Block {
            shape,
            attn_norm: Norm::load(spec, &format!("{prefix}.{}", w.attn_norm), source, dtype, device)?,
            mlp_norm: w
                .mlp_norm
                .as_ref()
                .map(|n| Norm::load(spec, &format!("{prefix}.{n}"), source, dtype, device))
                .transpose()?,
            qkv,
            o,
            mlp,
            bf16_operands: base.bf16_operands_on_cpu(device),
        };
        // trainable tensors, checkpoints and exporters list the linears in plan order
        let planned: Vec<String> = spec.linears.iter().map(|l| spec.linear_path(i, l)).collect();
        debug_assert!(block.linears().iter().map(|l| &l.path).eq(planned.iter()), "a block's linears in plan order");
        Ok(block)
    }

    /// The block's linears in the order of the layer plan.
    pub fn linears(&self) -> Vec<&LoraLinear> {
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

    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
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

    /// h [b, t, hidden] → the layer's output. `train` turns LoRA dropout on; `cache` holds the
    /// keys and values of earlier positions (inference).
    pub fn forward(&self, h: &Tensor, pos: &Positions, train: bool, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let x = self.attn_norm.forward(h)?;
        let attn = self.attention(&x, pos, train, cache)?;
        Ok(if self.shape.parallel_residual {
            let mlp_in = match &self.mlp_norm {
                Some(n) => n.forward(h)?,
                None => x,
            };
            ((h + attn)? + self.mlp(&mlp_in, train)?)?
        } else {
            let h = (h + attn)?;
            let mlp_in = match &self.mlp_norm {
                Some(n) => n.forward(&h)?,
                None => h.clone(),
            };
            (&h + self.mlp(&mlp_in, train)?)?
        })
    }

    fn attention(&self, x: &Tensor, pos: &Positions, train: bool, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let s = &self.shape;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (s.head_dim, s.heads, s.kv_heads);
        let (q, k, v) = match &self.qkv {
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
        if let (Some((rotary_dim, interleaved)), Some((cos, sin))) = (s.rope, &pos.rope) {
            q = apply_rope(&q, cos, sin, rotary_dim, interleaved)?;
            k = apply_rope(&k, cos, sin, rotary_dim, interleaved)?;
        }
        // keys and values of earlier positions come from the cache (after RoPE)
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
        let out = attention(&q, &k, &v, &pos.mask, self.bf16_operands)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(self.o.forward(&out, train)?)
    }

    fn mlp(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.mlp {
            Mlp::Gated { gate, up, down, act } => {
                down.forward(&gated(&gate.forward(x, train)?, &up.forward(x, train)?, *act)?, train)?
            }
            Mlp::GatedFused { gate_up, down, act } => {
                let y = gate_up.forward(x, train)?;
                let half = y.dim(D::Minus1)? / 2;
                down.forward(&gated(&y.narrow(D::Minus1, 0, half)?, &y.narrow(D::Minus1, half, half)?, *act)?, train)?
            }
            Mlp::Plain { up, down, act } => down.forward(&activate(&up.forward(x, train)?, *act)?, train)?,
            Mlp::Moe { router, experts, top_k, act } => moe(router, experts, *top_k, *act, x, train)?,
        })
    }
}

/// Sparse MoE as transformers' Mixtral: softmax over the router logits in f32, the top k
/// experts per token, their weights renormalised to sum to one.
fn moe(
    router: &LoraLinear,
    experts: &[Expert],
    top_k: usize,
    act: Activation,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let hidden = *dims.last().unwrap_or(&0);
    let device = x.device();
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
    let idx = Tensor::from_vec(chosen.concat(), (n, top_k), device)?;
    let weights = probs.gather(&idx, 1)?;
    let weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?.to_dtype(x.dtype())?.flatten_all()?;
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
        let tokens = Tensor::new(tokens.as_slice(), device)?;
        let slots = Tensor::new(slots.as_slice(), device)?;
        let xe = xf.index_select(&tokens, 0)?;
        let ye = expert
            .down
            .forward(&gated(&expert.gate.forward(&xe, train)?, &expert.up.forward(&xe, train)?, act)?, train)?;
        let ye = ye.broadcast_mul(&weights.index_select(&slots, 0)?.unsqueeze(1)?)?;
        out = out.index_add(&tokens, &ye, 0)?;
    }
    Ok(out.reshape(dims)?)
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
