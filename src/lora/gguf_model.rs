//! A merged model as one llama.cpp GGUF file that llama.cpp and Ollama run as it is: F16, Q8_0
//! or Q4_K_M, with the tensor names, q/k row permutation and metadata llama.cpp's
//! convert_hf_to_gguf.py writes for the family, the tokenizer laid out as that converter lays it
//! out, and, for Q4_K_M, the per-tensor type mixture llama-quantize picks
//! (src/llama-quant.cpp). Tensors are read, quantized and written one at a time, so a large
//! model never sits in memory whole.
//!
//! Written for llama.cpp's `llama` architecture (LLaMA, LLaMA-2, Mistral, Mixtral, Yi, InternLM)
//! and `qwen2`; other families are refused with the way out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use super::gguf::{llama_permutation, write_gguf_file, TensorEntry};
use crate::error::{Error, Result};
use crate::model::spec::{Activation, MlpKind, ModelSpec, NormKind, Position, Role};

/// The quantization of a merged GGUF model (llama.cpp's file types of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F16,
    Q8_0,
    Q4KM,
}

impl GgufQuant {
    pub const ALL: [GgufQuant; 3] = [GgufQuant::F16, GgufQuant::Q8_0, GgufQuant::Q4KM];

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "f16" => Ok(GgufQuant::F16),
            "q8_0" => Ok(GgufQuant::Q8_0),
            "q4_k_m" => Ok(GgufQuant::Q4KM),
            other => Err(Error::Invalid(format!("unknown GGUF quantization {other:?}: use f16, q8_0 or q4_k_m"))),
        }
    }

    /// The name llama.cpp and file names use.
    pub fn label(self) -> &'static str {
        match self {
            GgufQuant::F16 => "F16",
            GgufQuant::Q8_0 => "Q8_0",
            GgufQuant::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype`.
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
        }
    }
}

/// What llama-quantize's type choice looks at in a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    Output,
    AttnV,
    AttnOutput,
    FfnDown,
    /// MoE router: llama.cpp keeps it in f32.
    Router,
    /// Any other matrix.
    Weight,
    /// Norms and biases: f32.
    Vector,
}

/// One tensor of the output file.
struct Planned {
    entry: TensorEntry,
    /// The Hugging Face tensors it is made of (several: experts stacked on a new first axis).
    sources: Vec<String>,
    /// llama.cpp's q/k row permutation over this many heads.
    permute: Option<usize>,
}

/// llama.cpp's architecture for a merged GGUF of `spec`, or why it cannot be written.
pub fn model_arch(spec: &ModelSpec) -> Result<&'static str> {
    let family = spec.family_name();
    let arch = spec.gguf_arch.as_deref().ok_or_else(|| {
        Error::Invalid(format!(
            "a merged GGUF of the {family} family: llama.cpp cannot load this family; export a merged model \
             (safetensors) or a PEFT adapter instead"
        ))
    })?;
    let arch = match arch {
        "llama" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(Error::Invalid(format!(
                "a merged GGUF of the {family} family (llama.cpp's {other:?} architecture) is not written yet: only \
                 the llama and qwen2 architectures are (LLaMA, LLaMA-2, Mistral, Mixtral, Yi, Qwen2); export a merged \
                 model (safetensors) and convert it with llama.cpp's convert_hf_to_gguf.py"
            )))
        }
    };
    let unsupported = |what: &str| {
        Error::Invalid(format!(
            "a merged GGUF of this {family} model: {what}, which llama.cpp's {arch} architecture does not have; \
             export a merged model (safetensors) instead"
        ))
    };
    if !matches!(spec.norm, NormKind::Rms) {
        return Err(unsupported("it uses LayerNorm"));
    }
    match spec.position {
        Position::Rope { rotary_dim, interleaved: false, .. } if rotary_dim == spec.head_dim => {}
        _ => return Err(unsupported("its position encoding is not full rotate-half RoPE")),
    }
    if spec.parallel_residual || spec.normalized_lm_head || spec.weights.embed_norm.is_some() || spec.lm_head_bias {
        return Err(unsupported("its block or output head differs from LLaMA's"));
    }
    let silu_gated = matches!(spec.mlp, MlpKind::Gated(Activation::Silu) | MlpKind::Moe { act: Activation::Silu, .. });
    if !silu_gated || spec.linears.iter().any(|l| matches!(l.role, Role::Qkv | Role::GateUp)) {
        return Err(unsupported("its MLP is not SiLU-gated, or it has fused projections"));
    }
    Ok(arch)
}

/// llama-quantize's "more bits" layers of Q4_K_M: the first and last eighth and every third
/// layer between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2
}

/// The tensor type llama.cpp's converter (F16, Q8_0) or llama-quantize (Q4_K_M) gives a tensor.
fn tensor_type(
    quant: GgufQuant,
    category: Category,
    layer: usize,
    layers: usize,
    cols: usize,
    experts: usize,
) -> GgmlDType {
    use GgmlDType as T;
    if matches!(category, Category::Vector | Category::Router) {
        return T::F32;
    }
    let target = match quant {
        GgufQuant::F16 => return T::F16,
        GgufQuant::Q8_0 => T::Q8_0,
        GgufQuant::Q4KM => match category {
            Category::Output if !cols.is_multiple_of(256) => T::Q8_0,
            Category::Output => T::Q6K,
            Category::AttnV if experts == 8 => T::Q8_0,
            Category::AttnV | Category::FfnDown if use_more_bits(layer, layers) => T::Q6K,
            Category::AttnOutput if experts == 8 => T::Q5K,
            _ => T::Q4K,
        },
    };
    // rows that do not fill a 256-wide k-quant block fall back as llama-quantize does
    let target = match target {
        T::Q4K if !cols.is_multiple_of(256) => T::Q5_0,
        T::Q5K if !cols.is_multiple_of(256) => T::Q5_1,
        T::Q6K if !cols.is_multiple_of(256) => T::Q8_0,
        t => t,
    };
    if !cols.is_multiple_of(target.block_size()) {
        T::F16
    } else {
        target
    }
}

/// The output tensors, named and typed as llama.cpp names them for `spec`, from the keys of
/// the merged checkpoint.
fn plan_tensors(
    spec: &ModelSpec,
    shapes: &BTreeMap<String, Vec<usize>>,
    arch: &str,
    quant: GgufQuant,
    dir: &Path,
) -> Result<Vec<Planned>> {
    let experts = match spec.mlp {
        MlpKind::Moe { experts, .. } => experts,
        _ => 0,
    };
    let shape_of = |key: &str| -> Result<Vec<usize>> {
        shapes.get(key).cloned().ok_or_else(|| Error::bad_entry(dir, key, "missing from the merged checkpoint"))
    };
    let permutes = arch == "llama";
    let w = &spec.weights;
    let mut plan = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let mut add = |name: String, sources: Vec<String>, permute: Option<usize>, category: Category, layer: usize| {
        let mut shape = shape_of(&sources[0])?;
        if sources.len() > 1 {
            shape.insert(0, sources.len());
        }
        let category = if shape.len() == 1 { Category::Vector } else { category };
        let cols = *shape.last().unwrap_or(&1);
        let ggml = tensor_type(quant, category, layer, spec.layers, cols, experts);
        used.extend(sources.iter().cloned());
        plan.push(Planned { entry: TensorEntry { name, shape, ggml }, sources, permute });
        Ok::<(), Error>(())
    };
    let has = |key: &str| shapes.contains_key(key);
    let tied = !has(&format!("{}.weight", w.lm_head));
    add(
        "token_embd.weight".into(),
        vec![format!("{}.weight", w.embed)],
        None,
        if tied { Category::Output } else { Category::TokenEmbd },
        0,
    )?;
    for layer in 0..spec.layers {
        let prefix = spec.layer_prefix.replace("{i}", &layer.to_string());
        let blk = format!("blk.{layer}");
        add(
            format!("{blk}.attn_norm.weight"),
            vec![format!("{prefix}.{}.weight", w.attn_norm)],
            None,
            Category::Vector,
            layer,
        )?;
        if let Some(norm) = &w.mlp_norm {
            add(
                format!("{blk}.ffn_norm.weight"),
                vec![format!("{prefix}.{norm}.weight")],
                None,
                Category::Vector,
                layer,
            )?;
        }
        let mut stacked: BTreeMap<&str, Vec<(usize, String)>> = BTreeMap::new();
        for planned in &spec.linears {
            let path = spec.linear_path(layer, planned);
            let (name, permute, category) = match planned.role {
                Role::Q => ("attn_q", permutes.then_some(spec.heads), Category::Weight),
                Role::K => ("attn_k", permutes.then_some(spec.kv_heads), Category::Weight),
                Role::V => ("attn_v", None, Category::AttnV),
                Role::O => ("attn_output", None, Category::AttnOutput),
                Role::Gate => ("ffn_gate", None, Category::Weight),
                Role::Up => ("ffn_up", None, Category::Weight),
                Role::Down => ("ffn_down", None, Category::FfnDown),
                Role::Router => ("ffn_gate_inp", None, Category::Router),
                Role::ExpertGate | Role::ExpertUp | Role::ExpertDown => {
                    let name = match planned.role {
                        Role::ExpertGate => "ffn_gate_exps",
                        Role::ExpertUp => "ffn_up_exps",
                        _ => "ffn_down_exps",
                    };
                    stacked.entry(name).or_default().push((planned.expert.unwrap_or(0), path));
                    continue;
                }
                Role::Qkv | Role::GateUp => unreachable!("refused by model_arch"),
            };
            add(format!("{blk}.{name}.weight"), vec![format!("{path}.weight")], permute, category, layer)?;
            if has(&format!("{path}.bias")) {
                add(format!("{blk}.{name}.bias"), vec![format!("{path}.bias")], permute, Category::Vector, layer)?;
            }
        }
        for (name, mut parts) in stacked {
            parts.sort_by_key(|p| p.0);
            let category = if name == "ffn_down_exps" { Category::FfnDown } else { Category::Weight };
            let sources = parts.into_iter().map(|(_, path)| format!("{path}.weight")).collect();
            add(format!("{blk}.{name}.weight"), sources, None, category, layer)?;
        }
    }
    add("output_norm.weight".into(), vec![format!("{}.weight", w.final_norm)], None, Category::Vector, 0)?;
    if !tied {
        add("output.weight".into(), vec![format!("{}.weight", w.lm_head)], None, Category::Output, 0)?;
    }
    // anything else in the checkpoint would be silently lost: only RoPE's cached inverse
    // frequencies are recomputed by llama.cpp
    if let Some(stray) = shapes.keys().find(|k| !used.contains(*k) && !k.ends_with("rotary_emb.inv_freq")) {
        return Err(Error::bad_entry(dir, stray, "this tensor has no place in llama.cpp's layout of the model"));
    }
    Ok(plan)
}

/// What else the file says besides the weights.
#[derive(Debug, Clone, Default)]
pub struct GgufModelInfo {
    /// `general.name`.
    pub name: Option<String>,
    /// The chat template to store (default: the one the tokenizer files carry).
    pub chat_template: Option<String>,
}

/// Write the merged Hugging Face checkpoint in `merged` (config.json, safetensors, tokenizer
/// files) of `spec`'s family as one GGUF file at `out`.
pub fn write_gguf_model(
    merged: &Path,
    spec: &ModelSpec,
    quant: GgufQuant,
    out: &Path,
    info: &GgufModelInfo,
) -> Result<()> {
    let arch = model_arch(spec)?;
    let ckpt = crate::model::checkpoint::Checkpoint::open(merged)?;
    let mut shapes = BTreeMap::new();
    for key in ckpt.keys() {
        let shape = ckpt.file_of(&key)?.get(&key)?.shape().to_vec();
        shapes.insert(key, shape);
    }
    let plan = plan_tensors(spec, &shapes, arch, quant, merged)?;

    let config = read_json(&merged.join("config.json"))?;
    let vocab_rows =
        plan.iter().find(|p| p.entry.name == "token_embd.weight").map(|p| p.entry.shape[0]).unwrap_or(spec.vocab);
    let mut metadata = model_metadata(spec, arch, quant, &config, info);
    metadata.extend(tokenizer_metadata(merged, &config, vocab_rows, info.chat_template.as_deref())?);

    let device = Device::Cpu;
    let produce = |i: usize| -> Result<QTensor> {
        let p = &plan[i];
        let mut parts = Vec::with_capacity(p.sources.len());
        for key in &p.sources {
            let (values, shape) = ckpt.file_of(key)?.f32_values(key)?;
            let t = Tensor::from_vec(values, shape.as_slice(), &device)?;
            let t = match p.permute {
                Some(heads) => {
                    let order: Vec<u32> = llama_permutation(t.dim(0)?, heads)?.into_iter().map(|i| i as u32).collect();
                    t.index_select(&Tensor::new(order.as_slice(), &device)?, 0)?
                }
                None => t,
            };
            ckpt.file_of(key)?.release(key);
            parts.push(t);
        }
        let t = if parts.len() == 1 { parts.remove(0) } else { Tensor::stack(&parts, 0)? };
        Ok(QTensor::quantize(&t, p.entry.ggml)?)
    };
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    write_gguf_file(out, &metadata, &entries, produce)
}

/// The architecture's hyper-parameters as convert_hf_to_gguf.py writes them.
fn model_metadata(
    spec: &ModelSpec,
    arch: &str,
    quant: GgufQuant,
    config: &Json,
    info: &GgufModelInfo,
) -> Vec<(String, Value)> {
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |n: usize| Value::U32(n as u32);
    let context = config.get("max_position_embeddings").and_then(Json::as_u64).unwrap_or(2048) as usize;
    let theta = match spec.position {
        Position::Rope { theta, .. } => theta,
        Position::Alibi => 10_000.0,
    };
    let mut kvs = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.quantization_version".to_string(), Value::U32(2)),
        ("general.file_type".to_string(), Value::U32(quant.file_type())),
        (key("vocab_size"), u32v(spec.vocab)),
        (key("context_length"), u32v(context)),
        (key("embedding_length"), u32v(spec.hidden)),
        (key("block_count"), u32v(spec.layers)),
        (key("feed_forward_length"), u32v(spec.intermediate)),
        (key("attention.head_count"), u32v(spec.heads)),
        (key("attention.head_count_kv"), u32v(spec.kv_heads)),
        (key("rope.freq_base"), Value::F32(theta as f32)),
        (key("rope.dimension_count"), u32v(spec.head_dim)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(spec.norm_eps as f32)),
    ];
    if spec.head_dim * spec.heads != spec.hidden {
        kvs.push((key("attention.key_length"), u32v(spec.head_dim)));
        kvs.push((key("attention.value_length"), u32v(spec.head_dim)));
    }
    if let MlpKind::Moe { experts, top_k, .. } = spec.mlp {
        kvs.push((key("expert_count"), u32v(experts)));
        kvs.push((key("expert_used_count"), u32v(top_k)));
    }
    if let Some(name) = &info.name {
        kvs.push(("general.name".to_string(), Value::String(name.clone())));
    }
    kvs
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", path.display())))
}

// ---- the tokenizer, as llama.cpp's converter writes it ----

// llama.cpp's token types
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` metadata for the model in `dir`, with `rows` tokens (the embedding's rows;
/// missing ids are padded as `[PAD{id}]` like the converter does):
/// - a model imported from a GGUF file: that file's own tokenizer metadata, as llama.cpp wrote it;
/// - tokenizer.json with a byte-level BPE: `gpt2`, with the pre-tokenizer llama.cpp knows it by;
/// - tokenizer.model (SentencePiece BPE): `llama`, with the piece scores.
fn tokenizer_metadata(
    dir: &Path,
    config: &Json,
    rows: usize,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let mut kvs: Vec<(String, Value)> = match config.get("qls_imported_from").and_then(Json::as_str).map(Path::new) {
        Some(gguf) if gguf.is_file() => tokenizer_from_gguf(gguf)?,
        _ if dir.join("tokenizer.json").is_file() => tokenizer_from_json(dir, config, rows)?,
        _ if dir.join("tokenizer.model").is_file() => tokenizer_from_sentencepiece(dir, config, rows)?,
        _ => {
            return Err(Error::Invalid(format!(
                "{}: no tokenizer.json or tokenizer.model, so the GGUF would have no tokenizer; put the base model's \
                 tokenizer files in its folder",
                dir.display()
            )))
        }
    };
    let template = match chat_template {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Json>(&t).ok())
            .and_then(|tc| tc.get("chat_template").and_then(Json::as_str).map(str::to_string))
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok()),
    };
    kvs.retain(|(k, _)| k != "tokenizer.chat_template");
    if let Some(t) = template {
        kvs.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(kvs)
}

fn tokenizer_from_gguf(gguf: &Path) -> Result<Vec<(String, Value)>> {
    let mut reader = BufReader::new(File::open(gguf).map_err(|e| Error::io(gguf, e))?);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::Invalid(format!("{}: not a readable GGUF file ({e})", gguf.display())))?;
    let mut kvs: Vec<(String, Value)> =
        content.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
    kvs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(kvs)
}

/// Special token ids and flags from tokenizer_config.json and config.json, as the converter's
/// SpecialVocab finds them.
fn special_ids(dir: &Path, config: &Json, tokens: &[String]) -> Vec<(String, Value)> {
    let index: std::collections::HashMap<&str, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    let id_of = |t: &str| index.get(t).copied();
    let tc = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Json::Null);
    let mut kvs = Vec::new();
    for (name, key) in
        [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")]
    {
        let text = tc.get(format!("{name}_token")).and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()));
        let id = text.and_then(id_of).or_else(|| {
            let cfg = match name {
                "unk" => None,
                _ => config.get(format!("{name}_token_id")),
            };
            cfg.and_then(|v| v.as_u64().or_else(|| v.as_array()?.first()?.as_u64())).map(|n| n as u32)
        });
        if let Some(id) = id {
            kvs.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    for flag in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc.get(flag).and_then(Json::as_bool) {
            kvs.push((format!("tokenizer.ggml.{flag}"), Value::Bool(b)));
        }
    }
    kvs
}

/// tokenizer.json's added tokens: id, text, and llama.cpp's type (special ones are control tokens).
fn added_tokens(json: &Json) -> impl Iterator<Item = (usize, String, i32)> + '_ {
    json["added_tokens"].as_array().into_iter().flatten().filter_map(|added| {
        let kind = if added["special"].as_bool().unwrap_or(false) { CONTROL } else { USER_DEFINED };
        Some((added["id"].as_u64()? as usize, added["content"].as_str()?.to_string(), kind))
    })
}

fn strings(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn ints(items: &[i32]) -> Value {
    Value::Array(items.iter().map(|&i| Value::I32(i)).collect())
}

/// A byte-level BPE tokenizer.json (`gpt2` in llama.cpp).
fn tokenizer_from_json(dir: &Path, config: &Json, rows: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let json = read_json(&path)?;
    let model = &json["model"];
    // ByteLevel in the pre-tokenizer or decoder (alone or in a Sequence); not the whole vocabulary
    let byte_level = [&json["pre_tokenizer"], &json["decoder"]].iter().any(|v| v.to_string().contains("\"ByteLevel\""));
    if model["type"].as_str() != Some("BPE") || !byte_level {
        if dir.join("tokenizer.model").is_file() {
            return tokenizer_from_sentencepiece(dir, config, rows);
        }
        return Err(Error::bad_entry(
            &path,
            "model.type",
            "only byte-level BPE tokenizers (or a SentencePiece tokenizer.model) can be written to GGUF; export a \
             merged model (safetensors) instead",
        ));
    }
    let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(id) = id.as_u64() {
            by_id.insert(id as u32, (token.clone(), NORMAL));
        }
    }
    for (id, content, kind) in added_tokens(&json) {
        by_id.insert(id as u32, (content, kind));
    }
    let rows = rows.max(by_id.keys().next_back().map_or(0, |&i| i as usize + 1));
    let (mut tokens, mut types) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for i in 0..rows {
        let (t, k) = by_id.remove(&(i as u32)).unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        tokens.push(t);
        types.push(k);
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::Invalid(format!("{}: cannot be read ({e})", path.display())))?;
    let pre = pre_tokenizer_name(&tokenizer, &json, &path)?;
    let mut kvs = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre)),
        ("tokenizer.ggml.token_type".to_string(), ints(&types)),
        ("tokenizer.ggml.merges".to_string(), strings(merges)),
    ];
    kvs.extend(special_ids(dir, config, &tokens));
    kvs.push(("tokenizer.ggml.tokens".to_string(), strings(tokens)));
    Ok(kvs)
}

/// llama.cpp's name for the BPE pre-tokenizer: the converter's hash of how the tokenizer
/// splits a test text (assets/llama-cpp-pre-tokenizers.json), else the one llama.cpp
/// implements with the same regex as the tokenizer's.
fn pre_tokenizer_name(tokenizer: &tokenizers::Tokenizer, json: &Json, path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    #[derive(serde::Deserialize)]
    struct Table {
        chktxt: String,
        hashes: BTreeMap<String, String>,
    }
    let table: Table = serde_json::from_str(include_str!("../../assets/llama-cpp-pre-tokenizers.json"))
        .map_err(|e| Error::Invalid(format!("assets/llama-cpp-pre-tokenizers.json: {e}")))?;
    let ids = tokenizer
        .encode(table.chktxt.as_str(), true)
        .map_err(|e| Error::Invalid(format!("{}: cannot tokenize ({e})", path.display())))?;
    // Python's str() of a list of ints
    let list = format!("[{}]", ids.get_ids().iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash: String = Sha256::digest(list.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    if let Some(name) = table.hashes.get(&hash) {
        return Ok(name.clone());
    }
    let pre = &json["pre_tokenizer"];
    let text = pre.to_string();
    let regex_of = |p: &Json| p["pattern"]["Regex"].as_str().map(str::to_string);
    let split = pre["pretokenizers"].as_array().and_then(|ps| ps.iter().find_map(regex_of)).or_else(|| regex_of(pre));
    match split.as_deref() {
        Some(r) if r == crate::hub::tokenizer::REGEX_LLAMA3 => Ok("llama-bpe".into()),
        Some(r) if r == crate::hub::tokenizer::REGEX_QWEN2 => Ok("qwen2".into()),
        None if pre["type"].as_str() == Some("ByteLevel") && text.contains("\"use_regex\":true") => Ok("gpt-2".into()),
        _ => Err(Error::Invalid(format!(
            "{}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {hash}); its converter would refuse \
             it too; export a merged model (safetensors) instead",
            path.display()
        ))),
    }
}

/// A SentencePiece tokenizer.model (`llama` in llama.cpp).
fn tokenizer_from_sentencepiece(dir: &Path, config: &Json, rows: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.model");
    let pieces = crate::hub::sentencepiece::pieces(&path)?;
    let mut tokens: Vec<String> = pieces.tokens;
    let mut scores = pieces.scores;
    let mut types: Vec<i32> = pieces.kinds;
    // added tokens beyond the model's pieces (tokenizer.json), as the converter adds them
    if let Ok(json) = read_json(&dir.join("tokenizer.json")) {
        for (id, content, kind) in added_tokens(&json) {
            while tokens.len() <= id {
                tokens.push(format!("[PAD{}]", tokens.len()));
                scores.push(-1000.0);
                types.push(UNUSED);
            }
            tokens[id] = content;
            types[id] = kind;
        }
    }
    while tokens.len() < rows {
        tokens.push(format!("[PAD{}]", tokens.len()));
        scores.push(-1000.0);
        types.push(UNUSED);
    }
    let mut kvs = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("default".into())),
        ("tokenizer.ggml.scores".to_string(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".to_string(), ints(&types)),
    ];
    let mut ids = special_ids(dir, config, &tokens);
    for (key, id) in [("unknown_token_id", pieces.unk), ("bos_token_id", pieces.bos), ("eos_token_id", pieces.eos)] {
        let key = format!("tokenizer.ggml.{key}");
        if let (false, Some(id)) = (ids.iter().any(|(k, _)| *k == key), id) {
            ids.push((key, Value::U32(id)));
        }
    }
    kvs.extend(ids);
    if !pieces.add_space_prefix {
        kvs.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    }
    kvs.push(("tokenizer.ggml.tokens".to_string(), strings(tokens)));
    Ok(kvs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_quantize_does() {
        // 32 layers: the first and last four, and every third between
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(more, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let t = |c, layer, cols| tensor_type(GgufQuant::Q4KM, c, layer, 32, cols, 0);
        assert_eq!(t(Category::FfnDown, 0, 4096), GgmlDType::Q6K);
        assert_eq!(t(Category::FfnDown, 4, 11008), GgmlDType::Q4K);
        assert_eq!(t(Category::AttnV, 6, 4096), GgmlDType::Q6K);
        assert_eq!(t(Category::Weight, 6, 4096), GgmlDType::Q4K);
        assert_eq!(t(Category::Output, 0, 4096), GgmlDType::Q6K);
        // rows narrower than a k-quant block fall back: Q4_K → Q5_0, Q6_K → Q8_0
        assert_eq!(t(Category::Weight, 4, 576), GgmlDType::Q5_0);
        assert_eq!(t(Category::Output, 0, 576), GgmlDType::Q8_0);
        assert_eq!(t(Category::Vector, 0, 576), GgmlDType::F32);
        // Mixtral's eight experts: attn_v in Q8_0
        assert_eq!(tensor_type(GgufQuant::Q4KM, Category::AttnV, 4, 32, 4096, 8), GgmlDType::Q8_0);
        assert_eq!(tensor_type(GgufQuant::Q8_0, Category::Weight, 0, 2, 48, 0), GgmlDType::F16);
        assert_eq!(tensor_type(GgufQuant::F16, Category::Router, 0, 2, 64, 8), GgmlDType::F32);
    }

    #[test]
    fn quantizations_parse_as_llama_cpp_names_them() {
        assert_eq!(GgufQuant::parse("Q4_K_M").unwrap(), GgufQuant::Q4KM);
        assert_eq!(GgufQuant::parse("q8-0").unwrap(), GgufQuant::Q8_0);
        assert!(GgufQuant::parse("q3_k_s").is_err());
    }
}
