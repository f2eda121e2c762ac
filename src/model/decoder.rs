//! The generic decoder, driven by `ModelSpec`: the embeddings, a loop over blocks
//! (model::block), the final norm and the output layer, with every linear a frozen base plus
//! optional LoRA. Only differentiable ops are used (docs/candle-training.md §4): our fused ops
//! with a backward (model::ops), never candle's fast kernels that cut the graph.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::block::{Block, LayerCache, Norm, Positions};
use super::checkpoint::{Checkpoint, WeightSource};
use super::loss::chunked_lm_loss;
use super::recompute::{checkpointed, RecomputedGrads};
use super::spec::ModelSpec;
use crate::arch;
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

    /// Whether the frozen matmuls multiply in bf16 with f32 activations: bf16 compute on the
    /// CPU, where the elementwise work stays in f32 (our fused CPU kernels) and only the
    /// matmuls, nearly all of a step's arithmetic, take bf16 operands (`quant::bf16_matmul`).
    pub fn bf16_operands_on_cpu(self, device: &Device) -> bool {
        device.is_cpu() && self.compute_dtype() == DType::BF16
    }

    /// The dtype of the activations, norm weights and biases on `device`.
    pub fn activation_dtype(self, device: &Device) -> DType {
        if self.bf16_operands_on_cpu(device) {
            DType::F32
        } else {
            self.compute_dtype()
        }
    }

    /// A frozen linear in the form this setting computes with.
    pub fn frozen_linear(self, device: &Device, linear: FrozenLinear) -> FrozenLinear {
        if self.bf16_operands_on_cpu(device) {
            linear.with_bf16_operands()
        } else {
            linear
        }
    }
}

pub struct Model {
    pub spec: ModelSpec,
    /// The embedding table; None when it is the output layer's packed weight (tied embeddings
    /// in a CPU run in bf16), whose rows then serve the lookup.
    embed: Option<Tensor>,
    embed_norm: Option<Norm>,
    pub blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: FrozenLinear,
    device: Device,
    dtype: DType,
    /// Recompute each block in the backward instead of keeping its activations.
    gradient_checkpointing: bool,
    recomputed: RecomputedGrads,
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
        let dtype = base.activation_dtype(device);
        let h = spec.hidden;
        let w = &spec.weights;
        // in the compute dtype: the tied output layer multiplies with it
        let embed = source.tensor(&format!("{}.weight", w.embed), &[spec.vocab, h], base.compute_dtype(), device)?;
        let embed_norm = w.embed_norm.as_deref().map(|n| Norm::load(&spec, n, source, dtype, device)).transpose()?;
        let blocks =
            (0..spec.layers).map(|i| Block::load(&spec, i, source, base, device)).collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load(&spec, &w.final_norm, source, dtype, device)?;
        let lm_head_key = format!("{}.weight", w.lm_head);
        // transformers never quantizes lm_head; tied models reuse the embedding
        let lm_weight = if spec.tie_embeddings || !source.contains(&lm_head_key) {
            embed.clone()
        } else {
            source.tensor(&lm_head_key, &[spec.vocab, h], base.compute_dtype(), device)?
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
        let lm_head = base.frozen_linear(device, FrozenLinear::new(FrozenWeight::Dense(lm_weight), lm_bias)?);
        // a tied table packed for the bf16 kernel is held once, in the packed form
        let tied = (spec.tie_embeddings || !source.contains(&lm_head_key)) && !spec.normalized_lm_head;
        let embed = match lm_head.weight() {
            FrozenWeight::Bf16Panels(_) if tied => None,
            _ => Some(embed),
        };
        Ok(Self {
            spec,
            embed,
            embed_norm,
            blocks,
            final_norm,
            lm_head,
            device: device.clone(),
            dtype,
            gradient_checkpointing: false,
            recomputed: RecomputedGrads::default(),
        })
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
        self.blocks.iter().flat_map(|b| b.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.blocks.iter_mut().flat_map(|b| b.linears_mut())
    }

    /// Holds every host NF4 weight in the device form instead (what a GPU run loads), so that
    /// the CPU tests run the GPU's code path: dequantization from device tensors.
    pub fn use_device_form_nf4(&mut self) -> Result<()> {
        let device = self.device().clone();
        for l in self.linears_mut() {
            l.base = l.base.clone().into_device_form(&device)?;
        }
        Ok(())
    }

    /// Put fresh LoRA pairs on every linear a target selects (module names, PEFT path
    /// suffixes, or "all-linear"), initialised from `seed`.
    pub fn add_lora(&mut self, settings: &LoraSettings, seed: u64) -> Result<()> {
        self.spec.check_targets(&settings.targets)?;
        if settings.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        let device = self.device.clone();
        for lin in self.linears_mut() {
            if ModelSpec::targets_select(&settings.targets, &lin.path) {
                lin.init_lora(settings, &mut Rng::for_key(seed, &lin.path), &device)?;
            }
        }
        Ok(())
    }

    /// Load a PEFT adapter folder onto this model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<crate::lora::LoraSettings> {
        let adapter = crate::lora::peft::read_adapter(dir, &self.device.clone())?;
        adapter.check_base(&self.spec, dir)?;
        adapter.apply(self.linears_mut(), dir)?;
        Ok(adapter.settings)
    }

    /// Turn per-block gradient checkpointing on or off for training forwards: on, the
    /// backward recomputes each block from its kept input (same results, less memory, one
    /// more forward's work). Gradients must then be taken with `Model::backward`.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The gradients of `loss` (a scalar computed by this model), with those of the LoRA
    /// tensors inside checkpointed blocks, which their recomputation produces.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.recomputed.clear();
        let mut grads = loss.backward()?;
        self.recomputed.drain_into(&mut grads)?;
        Ok(grads)
    }

    /// The trainable tensors, keyed as PEFT names them (`base_model.model.<path>.lora_A.weight`,
    /// and DoRA's `….lora_magnitude_vector.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(pair) = &lin.lora {
                out.push((format!("base_model.model.{}.lora_A.weight", lin.path), pair.a.clone()));
                out.push((format!("base_model.model.{}.lora_B.weight", lin.path), pair.b.clone()));
                if let Some(m) = &pair.magnitude {
                    out.push((format!("base_model.model.{}.lora_magnitude_vector.weight", lin.path), m.clone()));
                }
            }
        }
        out
    }

    /// input_ids [b, t] (u32) → logits [b, t, V] in f32. `train` turns LoRA dropout on.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.hidden(input_ids, train, None)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// The mean next-token loss of `labels` [b, t] (-100 ignored), as `causal_lm_loss` on the
    /// logits computes it, in chunks of positions so that the logits never exist whole.
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.hidden(input_ids, train, None)?;
        chunked_lm_loss(&h, &self.lm_head, labels)
    }

    /// Inference with a KV cache: `input_ids` [b, t] continue the `cache.len()` positions the
    /// cache already holds (none for the prompt); their keys and values are appended to it.
    /// Returns the logits [b, t, V] of the new positions, equal to those of a full forward.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            *cache = KvCache::new(self.blocks.len());
        }
        let h = self.hidden(input_ids, false, Some(cache))?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// The final norm's output [b, t, hidden].
    fn hidden(&self, input_ids: &Tensor, train: bool, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let rows = match (&self.embed, self.lm_head.weight()) {
            (Some(table), _) => table.index_select(&ids, 0)?,
            (None, FrozenWeight::Bf16Panels(w)) => {
                let rows = w.rows_f32(&ids.to_vec1::<u32>()?).map_err(Error::Invalid)?;
                Tensor::from_vec(rows, (b * t, self.spec.hidden), &self.device)?
            }
            (None, _) => unreachable!("the embedding table is dropped only for a packed output layer"),
        };
        let mut h = rows.reshape((b, t, self.spec.hidden))?.to_dtype(self.dtype)?;
        if let Some(n) = &self.embed_norm {
            h = n.forward(&h)?;
        }
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let positions = Positions::new(&self.spec, offset, t, self.dtype, &self.device)?;
        let checkpoint = train && self.gradient_checkpointing && cache.is_none();
        for (i, block) in self.blocks.iter().enumerate() {
            h = if checkpoint {
                checkpointed(block, &h, &positions, &self.recomputed)?
            } else {
                block.forward(&h, &positions, train, cache.as_mut().map(|c| &mut c.layers[i]))?
            };
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(self.final_norm.forward(&h)?)
    }
}

/// Keys and values of the positions a model has seen, per layer ([b, kv_heads, len, head_dim],
/// after RoPE), so that generation computes each new token from itself and the cache.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
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
