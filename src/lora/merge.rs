//! Merging an adapter into its base: W' = W + scale·B·A per adapted linear (with DoRA, each row
//! of that rescaled to m / ‖W + scale·B·A‖), computed in f32
//! from the base checkpoint's own weights (docs/adapter-formats.md §5), written as a Hugging
//! Face checkpoint folder; and the divergence check between base + adapter and the merged model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::export::{encode, replace_folder, write_safetensors_file, ExportInfo, TensorDType};
use super::peft::PeftAdapter;
use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::{BaseWeights, Model};
use crate::quant::{bnb, FloatType, FrozenWeight};
use crate::weights::{bytes_to_f32, RawTensor};

/// Which base weights the adapter's delta is added to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeInto {
    /// The checkpoint's own 16-bit or f32 weights (the standard choice).
    #[default]
    Original,
    /// The NF4-dequantized weights a QLoRA adapter was trained against: every linear of the
    /// layers becomes dequant(quant(W)) (or the stored NF4 weights of a 4-bit checkpoint,
    /// dequantized), the adapted ones plus the delta.
    Dequantized { double_quant: bool },
}

impl MergeInto {
    pub fn parse(s: &str, double_quant: bool) -> Result<Self> {
        match s {
            "original" => Ok(MergeInto::Original),
            "dequantized" => Ok(MergeInto::Dequantized { double_quant }),
            other => Err(Error::Invalid(format!("unknown merge target {other:?}: use original or dequantized"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub into: MergeInto,
    /// Output type of every float tensor; `None` keeps each tensor's stored type.
    pub dtype: Option<TensorDType>,
    /// Shards are cut at this size (a single shard is written as model.safetensors).
    pub max_shard_bytes: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self { into: MergeInto::Original, dtype: None, max_shard_bytes: 4 << 30 }
    }
}

fn tensor_dtype_of(d: safetensors::Dtype) -> Option<TensorDType> {
    match d {
        safetensors::Dtype::F32 => Some(TensorDType::F32),
        safetensors::Dtype::BF16 => Some(TensorDType::Bf16),
        safetensors::Dtype::F16 => Some(TensorDType::F16),
        _ => None,
    }
}

fn tensor_dtype_of_float(f: FloatType) -> TensorDType {
    match f {
        FloatType::F32 => TensorDType::F32,
        FloatType::BF16 => TensorDType::Bf16,
        FloatType::F16 => TensorDType::F16,
    }
}

fn byte_size(d: TensorDType) -> usize {
    match d {
        TensorDType::F32 => 4,
        _ => 2,
    }
}

/// Where one output tensor comes from.
enum Source {
    /// Copied as stored (non-float tensors, or float ones in their own type).
    Copy,
    /// A float tensor, converted to the output type.
    Convert,
    /// A linear's weight: the base (stored or dequantized) plus the adapter's delta, if any.
    Linear { path: String },
}

struct Planned {
    key: String,
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    bytes: usize,
    source: Source,
}

/// Non-weight files of a model folder that a merged model carries over (tokenizer, generation
/// config, remote code).
fn is_carried_file(name: &str) -> bool {
    let weights = [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".index.json"];
    !(name.starts_with('.')
        || name == "config.json"
        || name == "README.md"
        || weights.iter().any(|ext| name.ends_with(ext)))
}

/// Merge `adapter` into the checkpoint at `base` and write the merged model to the folder
/// `out`: safetensors (sharded with model.safetensors.index.json when larger than a shard),
/// config.json without a quantization_config, the tokenizer and other non-weight files, and
/// a model card. The chat template of `info`, if any, goes into tokenizer_config.json.
pub fn write_merged_model(
    adapter: &PeftAdapter,
    base: &Path,
    out: &Path,
    opts: &MergeOptions,
    info: &ExportInfo,
) -> Result<()> {
    if super::export::same_place(out, base) {
        return Err(Error::Invalid(format!(
            "{}: the merged model would replace its own base model; choose another output folder",
            out.display()
        )));
    }
    let config_path = base.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", config_path.display())))?;
    let is_4bit = bnb::config_is_4bit(&config)?;
    let ckpt = Checkpoint::open(base)?;
    let device = Device::Cpu;

    // the dequantized weights are exactly what the QLoRA model computes with
    let nf4_model = match opts.into {
        MergeInto::Original if is_4bit => {
            return Err(Error::Invalid(format!(
                "{}: this checkpoint stores 4-bit weights, not the original 16-bit ones; pass the unquantized \
                 base with --model, or merge into the dequantized weights (--merge-into dequantized)",
                base.display()
            )))
        }
        MergeInto::Original => None,
        MergeInto::Dequantized { double_quant } => {
            Some(Model::load(base, BaseWeights::Nf4 { double_quant, compute: DType::F32 }, &device)?)
        }
    };
    let nf4_linears: BTreeMap<&str, &FrozenWeight> = nf4_model
        .as_ref()
        .map(|m| m.linears().map(|l| (l.path.as_str(), l.base.weight())).collect())
        .unwrap_or_default();

    // the bitsandbytes side tensors of 4-bit weights (absmax, quant_map, quant_state …)
    let mut quantized = BTreeSet::new();
    for key in ckpt.keys() {
        if let Some(prefix) = key.strip_suffix(".weight") {
            if bnb::is_4bit(ckpt.file_of(&key)?, prefix) {
                quantized.insert(prefix.to_string());
            }
        }
    }
    let mut plan = Vec::new();
    let mut used = BTreeSet::new();
    for key in ckpt.keys() {
        if quantized.iter().any(|p| key.starts_with(&format!("{p}.weight."))) {
            continue;
        }
        let file = ckpt.file_of(&key)?;
        let view = file.get(&key)?;
        let path = key.strip_suffix(".weight").map(str::to_string);
        let linear = path.filter(|p| adapter.pairs.contains_key(p) || nf4_linears.contains_key(p.as_str()));
        let stored = tensor_dtype_of(view.dtype());
        let (shape, out_dtype, source) = match linear {
            Some(path) => {
                let (shape, own) = match nf4_linears.get(path.as_str()) {
                    Some(FrozenWeight::Nf4(q)) => (q.shape.clone(), tensor_dtype_of_float(q.dtype)),
                    _ => (
                        view.shape().to_vec(),
                        stored.ok_or_else(|| file.error(&key, "expected a float weight to merge into"))?,
                    ),
                };
                used.insert(path.clone());
                (shape, opts.dtype.unwrap_or(own), Source::Linear { path })
            }
            None => match (stored, opts.dtype) {
                (Some(s), Some(d)) if s != d => (view.shape().to_vec(), d, Source::Convert),
                _ => {
                    let bytes = view.data().len();
                    plan.push(Planned {
                        key,
                        shape: view.shape().to_vec(),
                        dtype: view.dtype(),
                        bytes,
                        source: Source::Copy,
                    });
                    continue;
                }
            },
        };
        let bytes = shape.iter().product::<usize>() * byte_size(out_dtype);
        plan.push(Planned { key, shape, dtype: out_dtype.safetensors(), bytes, source });
    }
    if let Some(p) = adapter.pairs.keys().find(|p| !used.contains(*p)) {
        return Err(Error::bad_entry(
            base,
            format!("{p}.weight"),
            "the adapter's module has no weight in this checkpoint: is this the adapter's base model?",
        ));
    }

    // shards, in key order, each under the size limit (a larger single tensor gets its own)
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new()];
    let mut size = 0usize;
    for p in plan {
        if size > 0 && size + p.bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += p.bytes;
        if let Some(shard) = shards.last_mut() {
            shard.push(p);
        }
    }
    let n = shards.len();
    let scale = adapter.settings.scale();
    let merged_tensor = |p: &Planned| -> Result<RawTensor> {
        let file = || ckpt.file_of(&p.key);
        let data = match &p.source {
            Source::Copy => file()?.get(&p.key)?.data().to_vec(),
            Source::Convert => {
                let (values, _) = file()?.f32_values(&p.key)?;
                encode(&values, tensor_dtype_of(p.dtype).unwrap_or(TensorDType::F32))
            }
            Source::Linear { path } => {
                let w = match nf4_linears.get(path.as_str()) {
                    Some(weight) => weight.to_dense(DType::F32, &device)?,
                    None => {
                        let f = file()?;
                        let view = f.get(&p.key)?;
                        let values = bytes_to_f32(view.dtype(), view.data())
                            .ok_or_else(|| f.error(&p.key, "expected a float weight"))?;
                        Tensor::from_vec(values, p.shape.as_slice(), &device)?
                    }
                };
                let w = match adapter.pairs.get(path) {
                    Some((a, b)) => {
                        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
                        if delta.dims() != w.dims() {
                            return Err(Error::bad_entry(
                                base,
                                &p.key,
                                format!(
                                    "shape {:?}, but the adapter's B·A is {:?}: is this the adapter's base model?",
                                    w.dims(),
                                    delta.dims()
                                ),
                            ));
                        }
                        let merged = (w + delta)?;
                        // DoRA folds its magnitude in: each row rescaled to m / ‖W + s·B·A‖
                        match adapter.magnitudes.get(path) {
                            Some(m) => {
                                let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                                let m = m.to_dtype(DType::F32)?.reshape((m.elem_count(), 1))?;
                                merged.broadcast_mul(&m.broadcast_div(&norm)?)?
                            }
                            None => merged,
                        }
                    }
                    None => w,
                };
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                encode(&values, tensor_dtype_of(p.dtype).unwrap_or(TensorDType::F32))
            }
        };
        ckpt.file_of(&p.key)?.release(&p.key);
        Ok(RawTensor { name: p.key.clone(), dtype: p.dtype, shape: p.shape.clone(), data })
    };

    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
        if let Some(d) = opts.dtype {
            let keys: Vec<&str> = ["torch_dtype", "dtype"].into_iter().filter(|k| obj.contains_key(*k)).collect();
            for k in if keys.is_empty() { vec!["torch_dtype"] } else { keys } {
                obj.insert(k.to_string(), d.torch_name().into());
            }
        }
    }

    replace_folder(out, &["config.json"], |dir| {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (i, shard) in shards.iter().enumerate() {
            let name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            let tensors = shard.iter().map(&merged_tensor).collect::<Result<Vec<_>>>()?;
            for t in &tensors {
                weight_map.insert(t.name.clone(), name.clone().into());
                total += t.data.len();
            }
            write_safetensors_file(&dir.join(&name), &tensors)?;
        }
        if n > 1 {
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_json(&dir.join("model.safetensors.index.json"), &index)?;
        }
        write_json(&dir.join("config.json"), &config)?;
        for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
            let entry = entry.map_err(|e| Error::io(base, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_file() && is_carried_file(&name) {
                // read and write rather than copy, so read-only sources give writable files
                let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                std::fs::write(dir.join(&name), bytes).map_err(|e| Error::io(dir.join(&name), e))?;
            }
        }
        if let Some(template) = &info.chat_template {
            let tc_path = dir.join("tokenizer_config.json");
            match std::fs::read_to_string(&tc_path) {
                Ok(text) => {
                    let mut tc: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", tc_path.display())))?;
                    if let Some(obj) = tc.as_object_mut() {
                        obj.insert("chat_template".into(), template.clone().into());
                    }
                    write_json(&tc_path, &tc)?;
                }
                Err(_) => {
                    let p = dir.join("chat_template.jinja");
                    std::fs::write(&p, template).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        let card = super::export::model_card("Merged model", info.base_model.as_deref(), adapter, info)
            .replace("library_name: peft", "library_name: transformers")
            .replace(
                "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM",
                "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM",
            );
        let p = dir.join("README.md");
        std::fs::write(&p, card).map_err(|e| Error::io(&p, e))?;
        Ok(())
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// How far a merged model's predictions are from the adapter model's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    /// Share of positions where both pick the same most likely next token.
    pub top1_agreement: f64,
    /// Mean over positions of KL(adapter model ‖ merged model) in nats.
    pub mean_kl: f64,
    pub max_abs_logit_diff: f32,
    pub positions: usize,
}

/// `count` sequences of `len` token ids below `vocab`, repeatable from `seed`.
pub fn sample_sequences(vocab: usize, count: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..count).map(|_| (0..len).map(|_| rng.below(vocab.max(1) as u64) as u32).collect()).collect()
}

/// Compare two models' next-token distributions over `sequences`.
pub fn divergence(reference: &Model, other: &Model, sequences: &[Vec<u32>]) -> Result<Divergence> {
    let (mut agree, mut kl_sum, mut max_diff, mut positions) = (0usize, 0f64, 0f32, 0usize);
    for seq in sequences.iter().filter(|s| !s.is_empty()) {
        let ids = Tensor::new(seq.as_slice(), reference.device())?.unsqueeze(0)?;
        let p = reference.forward(&ids, false)?.squeeze(0)?;
        let q = other.forward(&ids, false)?.squeeze(0)?.to_device(p.device())?;
        max_diff = max_diff.max((&p - &q)?.abs()?.max_all()?.to_scalar::<f32>()?);
        let (lp, lq) = (candle_nn::ops::log_softmax(&p, D::Minus1)?, candle_nn::ops::log_softmax(&q, D::Minus1)?);
        let kl = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?.to_vec1::<f32>()?;
        kl_sum += kl.iter().map(|&v| v as f64).sum::<f64>();
        let (ap, aq) = (p.argmax(D::Minus1)?.to_vec1::<u32>()?, q.argmax(D::Minus1)?.to_vec1::<u32>()?);
        agree += ap.iter().zip(&aq).filter(|(a, b)| a == b).count();
        positions += seq.len();
    }
    if positions == 0 {
        return Err(Error::Invalid("divergence check: no tokens to compare on".into()));
    }
    Ok(Divergence {
        top1_agreement: agree as f64 / positions as f64,
        mean_kl: kl_sum / positions as f64,
        max_abs_logit_diff: max_diff,
        positions,
    })
}

/// Load base + adapter (the base as `reference_base`: NF4 for a QLoRA adapter, so the
/// reference is what was trained) and the merged model in f32, and compare them on
/// `sequences` (token ids, e.g. tokenized prompts), or on four random 32-token sequences
/// when none are given.
pub fn divergence_check(
    adapter_dir: &Path,
    base: &Path,
    merged: &Path,
    reference_base: BaseWeights,
    sequences: &[Vec<u32>],
    device: &Device,
) -> Result<Divergence> {
    let mut reference = Model::load(base, reference_base, device)?;
    reference.load_adapter(adapter_dir)?;
    let merged = Model::load(merged, BaseWeights::Dense(DType::F32), device)?;
    let vocab = reference.spec.vocab;
    if let Some(t) = sequences.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(Error::Invalid(format!("divergence check: token id {t} is outside the vocabulary of {vocab}")));
    }
    let random;
    let sequences = if sequences.is_empty() {
        random = sample_sequences(vocab, 4, 32, 0x5eed);
        &random
    } else {
        sequences
    };
    divergence(&reference, &merged, sequences)
}
