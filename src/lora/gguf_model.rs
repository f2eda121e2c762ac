//! A merged model as one llama.cpp GGUF file that llama.cpp and Ollama run as it is: F16, Q8_0
//! or Q4_K_M, with the tensor names, q/k row permutation and metadata llama.cpp's
//! convert_hf_to_gguf.py writes for the family, the tokenizer laid out as that converter lays it
//! out, and, for Q4_K_M, the per-tensor type mixture llama-quantize picks
//! (src/llama-quant.cpp). Tensors are read, quantized and written one at a time, so a large
//! model never sits in memory whole.
//!
//! Written for every architecture of ours llama.cpp loads: `llama` (LLaMA, LLaMA-2, Mistral,
//! Mixtral, Yi, InternLM), `qwen2`, `qwen`, `falcon`, `bloom` (BLOOM, BLOOMZ), `phi2` (Phi-1.5/2),
//! `chatglm` (ChatGLM3), `baichuan` (Baichuan, Baichuan2) and `xverse`. A model whose graph
//! llama.cpp would compute differently (see `graph_mismatch`) is refused with the way out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use super::gguf::{linear_place, select_rows, write_gguf_file, LinearPlace, TensorEntry};
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

/// What llama-quantize's type choice looks at in a tensor (its `tensor_get_category`, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    Output,
    /// attn_v, and a fused attn_qkv, which llama-quantize treats alike.
    AttnV,
    AttnK,
    AttnOutput,
    FfnDown,
    /// MoE router: llama.cpp keeps it in f32.
    Router,
    /// Any other matrix.
    Weight,
    /// Norms and biases: f32.
    Vector,
}

impl Category {
    /// The category of the GGUF tensor `name` of `dims` dimensions; `tied`: the token embedding
    /// is also the output matrix, and is quantized as the output.
    fn of(name: &str, dims: usize, tied: bool) -> Self {
        match name {
            _ if dims == 1 => Category::Vector,
            "output.weight" => Category::Output,
            "token_embd.weight" if tied => Category::Output,
            "token_embd.weight" => Category::TokenEmbd,
            _ if name.ends_with("ffn_gate_inp.weight") => Category::Router,
            _ if name.ends_with("attn_qkv.weight") || name.ends_with("attn_v.weight") => Category::AttnV,
            _ if name.ends_with("attn_k.weight") => Category::AttnK,
            _ if name.ends_with("attn_output.weight") => Category::AttnOutput,
            _ if name.contains("ffn_down") => Category::FfnDown,
            _ => Category::Weight,
        }
    }
}

/// One tensor of the output file.
struct Planned {
    entry: TensorEntry,
    /// The Hugging Face tensors it is made of (several: experts stacked on a new first axis).
    sources: Vec<String>,
    /// The rows of each source it takes, in order (q/k permuted, a fused qkv reordered or
    /// split); all of them when `None`.
    rows: Option<Vec<usize>>,
    /// Scale each row to unit L2 norm: Baichuan2's NormHead, which llama.cpp does not apply.
    unit_rows: bool,
}

/// The llama.cpp architectures this export writes.
const ARCHS: [&str; 9] = ["llama", "qwen2", "falcon", "bloom", "qwen", "phi2", "chatglm", "baichuan", "xverse"];

/// llama.cpp's architecture for a merged GGUF of `spec`, or why it cannot be written.
pub fn model_arch(spec: &ModelSpec) -> Result<&'static str> {
    let family = spec.family_name();
    let arch = spec.gguf_arch.as_deref().ok_or_else(|| {
        Error::Invalid(format!(
            "a merged GGUF of the {family} family: llama.cpp cannot load this family; export a merged model \
             (safetensors) or a PEFT adapter instead"
        ))
    })?;
    let arch = ARCHS.into_iter().find(|a| *a == arch).ok_or_else(|| {
        Error::Invalid(format!(
            "a merged GGUF of the {family} family (llama.cpp's {arch:?} architecture) is not written yet; export a \
             merged model (safetensors) and convert it with llama.cpp's convert_hf_to_gguf.py"
        ))
    })?;
    if let Some(what) = graph_mismatch(spec, arch) {
        return Err(Error::Invalid(format!(
            "a merged GGUF of this {family} model: {what}, which llama.cpp's {arch} architecture does not compute; \
             export a merged model (safetensors) instead"
        )));
    }
    Ok(arch)
}

/// Where `spec` differs from what llama.cpp's graph for `arch` computes (src/models/{arch}.cpp),
/// so that its GGUF would load but answer differently.
fn graph_mismatch(spec: &ModelSpec, arch: &str) -> Option<&'static str> {
    let rms = matches!(spec.norm, NormKind::Rms);
    // llama.cpp's NORM rope rotates interleaved pairs: the converters of the llama-like archs
    // permute q/k rows from the rotate-half layout, ChatGLM is interleaved already; NEOX is
    // rotate-half; `Some(false)`: rotate-half over whole heads
    let rope = match spec.position {
        Position::Rope { rotary_dim, interleaved, .. } => Some((rotary_dim, interleaved)),
        Position::Alibi => None,
    };
    let full_half_rope = rope == Some((spec.head_dim, false));
    let (gelu, silu_gated, fused_qkv, fused_gate_up) = (
        matches!(spec.mlp, MlpKind::Plain(Activation::GeluErf | Activation::GeluTanh)),
        matches!(spec.mlp, MlpKind::Gated(Activation::Silu) | MlpKind::Moe { act: Activation::Silu, .. }),
        spec.linears.iter().any(|l| l.role == Role::Qkv),
        spec.linears.iter().any(|l| l.role == Role::GateUp),
    );
    let plain_head = !spec.lm_head_bias && spec.weights.embed_norm.is_none();
    let llama_like_block = rms && !spec.parallel_residual && plain_head && !fused_gate_up;
    match arch {
        "llama" | "qwen2" | "xverse" if !llama_like_block || !silu_gated || fused_qkv => {
            Some("its block differs from LLaMA's (norm, residual, fused projections or MLP)")
        }
        "llama" | "qwen2" | "xverse" if !full_half_rope => Some("its position encoding is not full rotate-half RoPE"),
        "falcon" if rms || !spec.parallel_residual || !plain_head || !gelu => {
            Some("its block is not Falcon's parallel LayerNorm block with a GELU MLP")
        }
        "falcon" if spec.qkv_bias || spec.o_bias || spec.mlp_bias => Some("its linear layers have biases"),
        "falcon" if !full_half_rope => Some("its position encoding is not full rotate-half RoPE"),
        "bloom" if rms || spec.parallel_residual || spec.weights.embed_norm.is_none() || spec.lm_head_bias => {
            Some("its block is not BLOOM's")
        }
        "bloom" if rope.is_some() => Some("it does not use ALiBi"),
        "qwen" if !llama_like_block || !silu_gated || spec.o_bias || spec.heads != spec.kv_heads => {
            Some("its block differs from Qwen's")
        }
        "qwen" if !full_half_rope || spec.head_dim * spec.heads != spec.hidden => {
            Some("its rotary embedding does not cover whole heads")
        }
        "phi2" if rms || !spec.parallel_residual || !gelu || spec.weights.embed_norm.is_some() => {
            Some("its block is not Phi's parallel LayerNorm block")
        }
        "phi2" if !matches!(rope, Some((_, false))) => Some("its position encoding is not rotate-half RoPE"),
        "chatglm" if !rms || spec.parallel_residual || !plain_head || !fused_gate_up => {
            Some("its block differs from ChatGLM's")
        }
        "chatglm" if spec.o_bias || spec.mlp_bias => Some("its output or MLP projections have biases"),
        "chatglm" if rope != Some((spec.head_dim / 2, true)) => {
            Some("its rotary embedding is not ChatGLM's (interleaved, half of each head)")
        }
        "baichuan" if !llama_like_block || !silu_gated || spec.qkv_bias || spec.o_bias || spec.mlp_bias => {
            Some("its block differs from Baichuan's")
        }
        // llama.cpp knows the position encoding by the depth alone: RoPE at 32 layers (7B),
        // ALiBi at 40 (13B), none at any other
        "baichuan" if rope.is_some() && spec.layers != 32 => {
            Some("it uses RoPE but has not 32 layers (llama.cpp applies RoPE to Baichuan's 32-layer 7B models only)")
        }
        "baichuan" if rope.is_none() && spec.layers != 40 => {
            Some("it uses ALiBi but has not 40 layers (llama.cpp applies ALiBi to Baichuan's 40-layer 13B models only)")
        }
        "baichuan" if rope.is_some() && !full_half_rope => Some("its position encoding is not full rotate-half RoPE"),
        _ if spec.normalized_lm_head && arch != "baichuan" => Some("its output head is normalized"),
        _ => None,
    }
}

/// llama-quantize's "more bits" layers of Q4_K_M: the first and last eighth and every third
/// layer between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2
}

/// What llama-quantize's choice of a tensor's type depends on besides the tensor.
#[derive(Debug, Clone, Copy)]
struct QuantContext {
    quant: GgufQuant,
    layers: usize,
    experts: usize,
    /// llama-quantize has rules of its own for Falcon.
    falcon: bool,
    /// llama.cpp's LLM_TYPE_70B (a llama of 80 layers with grouped KV heads): attn_v, 8× smaller
    /// than attn_q there, gets Q5_K where it would get Q4_K.
    llama_70b: bool,
}

/// The tensor type llama.cpp's converter (F16, Q8_0) or llama-quantize (Q4_K_M) gives a tensor
/// (src/llama-quant.cpp, `llama_tensor_get_type_impl`).
fn tensor_type(ctx: QuantContext, category: Category, layer: usize, cols: usize) -> GgmlDType {
    use GgmlDType as T;
    if matches!(category, Category::Vector | Category::Router) {
        return T::F32;
    }
    let (layers, eight_experts) = (ctx.layers, ctx.experts == 8);
    let target = match ctx.quant {
        GgufQuant::F16 => return T::F16,
        GgufQuant::Q8_0 => T::Q8_0,
        GgufQuant::Q4KM => match category {
            Category::Output if ctx.falcon || !cols.is_multiple_of(256) => T::Q8_0,
            Category::Output => T::Q6K,
            Category::AttnV | Category::AttnK if eight_experts => T::Q8_0,
            Category::AttnV if use_more_bits(layer, layers) => T::Q6K,
            Category::AttnV if ctx.llama_70b => T::Q5K,
            Category::FfnDown if ctx.falcon && layer < layers / 16 => T::Q6K,
            Category::FfnDown if ctx.falcon && use_more_bits(layer, layers) => T::Q5K,
            Category::FfnDown if !ctx.falcon && use_more_bits(layer, layers) => T::Q6K,
            Category::AttnOutput if eight_experts && !ctx.falcon => T::Q5K,
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

/// The output tensors, named, laid out and typed as llama.cpp's converter does for `arch`, from
/// the keys of the merged checkpoint.
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
    let llama_70b = arch == "llama" && experts == 0 && spec.layers == 80 && spec.heads != spec.kv_heads;
    let ctx = QuantContext { quant, layers: spec.layers, experts, falcon: arch == "falcon", llama_70b };
    let shape_of = |key: &str| -> Result<Vec<usize>> {
        shapes.get(key).cloned().ok_or_else(|| Error::bad_entry(dir, key, "missing from the merged checkpoint"))
    };
    let has = |key: &str| shapes.contains_key(key);
    let w = &spec.weights;
    let tied = !has(&format!("{}.weight", w.lm_head));
    if tied && spec.normalized_lm_head {
        return Err(Error::Invalid(
            "a merged GGUF of a model whose normalized output head is tied to its embedding: llama.cpp has no \
             such head; export a merged model (safetensors) instead"
                .into(),
        ));
    }
    let mut plan = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let mut add = |name: String, sources: Vec<String>, rows: Option<Vec<usize>>, layer: usize| {
        let mut shape = shape_of(&sources[0])?;
        if let Some(rows) = &rows {
            shape[0] = rows.len();
        }
        if sources.len() > 1 {
            shape.insert(0, sources.len());
        }
        let category = Category::of(&name, shape.len(), tied);
        let cols = *shape.last().unwrap_or(&1);
        let ggml = tensor_type(ctx, category, layer, cols);
        let unit_rows = spec.normalized_lm_head && name == "output.weight";
        used.extend(sources.iter().cloned());
        plan.push(Planned { entry: TensorEntry { name, shape, ggml }, sources, rows, unit_rows });
        Ok::<(), Error>(())
    };
    // a norm: its weight, and its bias where it has one (LayerNorm)
    let add_norm = |add: &mut dyn FnMut(String, Vec<String>, Option<Vec<usize>>, usize) -> Result<()>,
                    name: &str,
                    hf: &str,
                    layer: usize| {
        for part in ["weight", "bias"] {
            let key = format!("{hf}.{part}");
            if part == "weight" || has(&key) {
                add(format!("{name}.{part}"), vec![key], None, layer)?;
            }
        }
        Ok::<(), Error>(())
    };
    add("token_embd.weight".into(), vec![format!("{}.weight", w.embed)], None, 0)?;
    if let Some(norm) = &w.embed_norm {
        add_norm(&mut add, "token_embd_norm", norm, 0)?;
    }
    for layer in 0..spec.layers {
        let prefix = spec.layer_prefix(layer);
        let blk = format!("blk.{layer}");
        // Falcon-40B's two norms: ln_mlp feeds the MLP and is llama.cpp's attn_norm, ln_attn
        // feeds attention and is attn_norm_2
        let (attn_norm, mlp_norm) = match (arch, &w.mlp_norm) {
            ("falcon", Some(_)) => ("attn_norm_2", "attn_norm"),
            _ => ("attn_norm", "ffn_norm"),
        };
        add_norm(&mut add, &format!("{blk}.{attn_norm}"), &format!("{prefix}.{}", w.attn_norm), layer)?;
        if let Some(norm) = &w.mlp_norm {
            add_norm(&mut add, &format!("{blk}.{mlp_norm}"), &format!("{prefix}.{norm}"), layer)?;
        }
        let mut stacked: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for planned in &spec.linears {
            let path = spec.linear_path(layer, planned);
            let parts = match linear_place(spec, arch, layer, planned)? {
                LinearPlace::Rows(parts) => parts,
                LinearPlace::Router(name) => vec![(name, (0..planned.out_features).collect())],
                LinearPlace::Expert { name, index } => {
                    stacked.entry(name).or_default().push((index, format!("{path}.weight")));
                    continue;
                }
            };
            for (name, rows) in parts {
                add(format!("{name}.weight"), vec![format!("{path}.weight")], Some(rows.clone()), layer)?;
                if has(&format!("{path}.bias")) {
                    add(format!("{name}.bias"), vec![format!("{path}.bias")], Some(rows), layer)?;
                }
            }
        }
        for (name, mut parts) in stacked {
            parts.sort_by_key(|p| p.0);
            add(format!("{name}.weight"), parts.into_iter().map(|p| p.1).collect(), None, layer)?;
        }
    }
    add_norm(&mut add, "output_norm", &w.final_norm, 0)?;
    if !tied {
        add("output.weight".into(), vec![format!("{}.weight", w.lm_head)], None, 0)?;
        if has(&format!("{}.bias", w.lm_head)) {
            add("output.bias".into(), vec![format!("{}.bias", w.lm_head)], None, 0)?;
        }
    }
    // anything else in the checkpoint would be silently lost: only RoPE's cached inverse
    // frequencies are recomputed by llama.cpp
    if let Some(stray) = shapes.keys().find(|k| !used.contains(*k) && !k.ends_with("inv_freq")) {
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
    metadata.extend(tokenizer_metadata(merged, arch, &config, vocab_rows, info.chat_template.as_deref())?);
    // Phi's and ChatGLM's converters say no BOS goes before a prompt, whatever the tokenizer says
    if matches!(arch, "phi2" | "chatglm") {
        metadata.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        metadata.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    }

    let device = Device::Cpu;
    let produce = |i: usize| -> Result<QTensor> {
        let p = &plan[i];
        let mut parts = Vec::with_capacity(p.sources.len());
        for key in &p.sources {
            let (values, shape) = ckpt.file_of(key)?.f32_values(key)?;
            let mut t = Tensor::from_vec(values, shape.as_slice(), &device)?;
            if let Some(rows) = &p.rows {
                t = select_rows(&t, rows)?;
            }
            if p.unit_rows {
                t = t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?)?;
            }
            ckpt.file_of(key)?.release(key);
            parts.push(t);
        }
        let t = if parts.len() == 1 { parts.remove(0) } else { Tensor::stack(&parts, 0)? };
        quantize(&t, p.entry.ggml)
    };
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    write_gguf_file(out, &metadata, &entries, produce)
}

/// `t` in `ggml`: the k-quants as ggml itself quantizes them (quant::k_quants, byte for byte
/// llama-quantize's), the rest through candle (Q8_0 and Q5_0 match ggml's within float
/// rounding of the input).
fn quantize(t: &Tensor, ggml: GgmlDType) -> Result<QTensor> {
    use crate::quant::k_quants;
    let k_quant: fn(&[f32]) -> Vec<u8> = match ggml {
        GgmlDType::Q4K => k_quants::quantize_q4_k,
        GgmlDType::Q5K => k_quants::quantize_q5_k,
        GgmlDType::Q6K => k_quants::quantize_q6_k,
        _ => return Ok(QTensor::quantize(t, ggml)?),
    };
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let bytes = k_quant(&values);
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(ggml, &bytes, t.dims().to_vec(), t.device())?)
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
    let context = ["max_position_embeddings", "n_positions", "seq_length", "model_max_length"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Json::as_u64))
        .unwrap_or(2048) as usize;
    // llama.cpp's llama graph attends to every position: within the sliding window (Mistral
    // v0.1's) that is the model's attention, so the window is the context it answers right in
    let context = spec.sliding_window.map_or(context, |window| context.min(window));
    // Qwen's config and llama.cpp count both MLP branches together
    let feed_forward = if arch == "qwen" { 2 * spec.intermediate } else { spec.intermediate };
    let mut kvs = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.quantization_version".to_string(), Value::U32(2)),
        ("general.file_type".to_string(), Value::U32(quant.file_type())),
        (key("vocab_size"), u32v(spec.vocab)),
        (key("context_length"), u32v(context)),
        (key("embedding_length"), u32v(spec.hidden)),
        (key("block_count"), u32v(spec.layers)),
        (key("feed_forward_length"), u32v(feed_forward)),
        (key("attention.head_count"), u32v(spec.heads)),
        (key("attention.head_count_kv"), u32v(spec.kv_heads)),
    ];
    kvs.push(match spec.norm {
        NormKind::Rms => (key("attention.layer_norm_rms_epsilon"), Value::F32(spec.norm_eps as f32)),
        NormKind::Layer => (key("attention.layer_norm_epsilon"), Value::F32(spec.norm_eps as f32)),
    });
    if let Position::Rope { theta, rotary_dim, .. } = spec.position {
        kvs.push((key("rope.freq_base"), Value::F32(theta as f32)));
        kvs.push((key("rope.dimension_count"), u32v(rotary_dim)));
    }
    if spec.head_dim * spec.heads != spec.hidden {
        kvs.push((key("attention.key_length"), u32v(spec.head_dim)));
        kvs.push((key("attention.value_length"), u32v(spec.head_dim)));
    }
    if let MlpKind::Moe { experts, top_k, .. } = spec.mlp {
        kvs.push((key("expert_count"), u32v(experts)));
        kvs.push((key("expert_used_count"), u32v(top_k)));
    }
    // what the converters record of the q/k/v transform they applied
    match arch {
        "falcon" => kvs.push((key("tensor_data_layout"), Value::String("jploski".into()))),
        "baichuan" | "xverse" => kvs.push((key("tensor_data_layout"), Value::String("Meta AI original pth".into()))),
        _ => {}
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
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The `tokenizer.*` metadata for the model in `dir`, with `rows` tokens (the embedding's rows;
/// missing ids are padded as `[PAD{id}]` like the converter does):
/// - a model imported from a GGUF file: that file's own tokenizer metadata, as llama.cpp wrote it;
/// - tokenizer.json with a byte-level BPE: `gpt2`, with the pre-tokenizer llama.cpp knows it by;
/// - tokenizer.model (SentencePiece BPE): `llama`, with the piece scores.
fn tokenizer_metadata(
    dir: &Path,
    arch: &str,
    config: &Json,
    rows: usize,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let mut kvs: Vec<(String, Value)> = match config.get("qls_imported_from").and_then(Json::as_str).map(Path::new) {
        Some(gguf) if gguf.is_file() => tokenizer_from_gguf(gguf)?,
        // ChatGLM3's converter builds its vocabulary from tokenizer.model, whatever else is there
        _ if arch == "chatglm" && dir.join("tokenizer.model").is_file() => {
            tokenizer_from_sentencepiece(dir, arch, config, rows)?
        }
        _ if dir.join("tokenizer.json").is_file() => tokenizer_from_json(dir, arch, config, rows)?,
        _ if dir.join("tokenizer.model").is_file() => tokenizer_from_sentencepiece(dir, arch, config, rows)?,
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

/// A byte-level BPE tokenizer.json (`gpt2` in llama.cpp), or a SentencePiece-style one.
fn tokenizer_from_json(dir: &Path, arch: &str, config: &Json, rows: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let json = read_json(&path)?;
    let model = &json["model"];
    // ByteLevel in the pre-tokenizer or decoder (alone or in a Sequence); not the whole vocabulary
    let byte_level = [&json["pre_tokenizer"], &json["decoder"]].iter().any(|v| v.to_string().contains("\"ByteLevel\""));
    let is_bpe = model["type"].as_str() == Some("BPE");
    if !is_bpe || !byte_level {
        if dir.join("tokenizer.model").is_file() {
            return tokenizer_from_sentencepiece(dir, arch, config, rows);
        }
        let metaspace = model["byte_fallback"].as_bool().unwrap_or(false)
            || [&json["pre_tokenizer"], &json["normalizer"], &json["decoder"]]
                .iter()
                .any(|v| v.to_string().contains('\u{2581}'));
        if is_bpe && metaspace {
            return tokenizer_from_sentencepiece_json(dir, config, rows, &json);
        }
        return Err(Error::bad_entry(
            &path,
            "model.type",
            "only a byte-level BPE or a SentencePiece-style BPE tokenizer.json, or a SentencePiece tokenizer.model, \
             can be written to GGUF; export a merged model (safetensors) instead",
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
    let merges = merges(model);
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

/// tokenizer.json's merges as "a b" strings (both of the forms tokenizers writes).
fn merges(model: &Json) -> Vec<String> {
    model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?)),
            _ => None,
        })
        .collect()
}

/// A SentencePiece-style BPE tokenizer.json ("▁" for spaces, byte fallback) without its
/// tokenizer.model, as XVERSE and many LLaMA-2 and Mistral fine-tunes ship it: `llama`, laid out
/// as the converter's LlamaHfVocab lays it out (`<0xXX>` pieces as bytes, added tokens as
/// control or user-defined), except for the scores: the converter gives every piece -1000, and
/// llama.cpp's SentencePiece tokenizer, which merges the best-scored pair first, then merges
/// left to right; here a piece scores minus the rank of the merge that makes it, so llama.cpp
/// merges in the tokenizer's BPE order.
fn tokenizer_from_sentencepiece_json(
    dir: &Path,
    config: &Json,
    rows: usize,
    json: &Json,
) -> Result<Vec<(String, Value)>> {
    let model = &json["model"];
    let mut by_id: BTreeMap<u32, (String, i32, f32)> = BTreeMap::new();
    let mut id_of = std::collections::HashMap::new();
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(id) = id.as_u64() {
            let is_byte = token.len() == 6 && token.starts_with("<0x") && token.ends_with('>');
            by_id.insert(id as u32, (token.clone(), if is_byte { BYTE } else { NORMAL }, 0.0));
            id_of.insert(token.clone(), id as u32);
        }
    }
    for (rank, merge) in merges(model).iter().enumerate() {
        let Some((a, b)) = merge.split_once(' ') else { continue };
        if let Some(entry) = id_of.get(&format!("{a}{b}")).and_then(|id| by_id.get_mut(id)) {
            if entry.2 == 0.0 {
                entry.2 = -(rank as f32) - 1.0;
            }
        }
    }
    for (id, content, kind) in added_tokens(json) {
        by_id.insert(id as u32, (content, kind, -1000.0));
    }
    let unk = model["unk_token"].as_str().and_then(|t| id_of.get(t)).copied();
    if let Some(entry) = unk.and_then(|id| by_id.get_mut(&id)) {
        entry.1 = UNKNOWN;
    }
    let rows = rows.max(by_id.keys().next_back().map_or(0, |&i| i as usize + 1));
    let (mut tokens, mut types, mut scores) =
        (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
    for i in 0..rows {
        let (t, k, s) = by_id.remove(&(i as u32)).unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED, -1000.0));
        tokens.push(t);
        types.push(k);
        scores.push(Value::F32(s));
    }
    // a normalizer or pre-tokenizer that puts "▁" before the text
    let add_space_prefix = [&json["normalizer"], &json["pre_tokenizer"]].iter().any(|v| {
        let v = v.to_string();
        v.contains("\"Prepend\"")
            || v.contains("\"prepend_scheme\":\"always\"")
            || v.contains("\"prepend_scheme\":\"first\"")
            || v.contains("\"add_prefix_space\":true")
    });
    let mut kvs = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("default".into())),
        ("tokenizer.ggml.scores".to_string(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".to_string(), ints(&types)),
        ("tokenizer.ggml.add_space_prefix".to_string(), Value::Bool(add_space_prefix)),
    ];
    let mut ids = special_ids(dir, config, &tokens);
    if let (false, Some(id)) = (ids.iter().any(|(k, _)| k == "tokenizer.ggml.unknown_token_id"), unk) {
        ids.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(id)));
    }
    kvs.extend(ids);
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

/// ChatGLM3's special tokens, which its tokenizer (tokenization_chatglm.py) numbers from the end
/// of its SentencePiece pieces on, in this order.
const CHATGLM3_SPECIAL: [&str; 9] =
    ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"];

/// A SentencePiece tokenizer.model (`llama` in llama.cpp).
fn tokenizer_from_sentencepiece(dir: &Path, arch: &str, config: &Json, rows: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.model");
    let pieces = crate::hub::sentencepiece::pieces(&path)?;
    let mut tokens: Vec<String> = pieces.tokens;
    let mut scores = pieces.scores;
    let mut types: Vec<i32> = pieces.kinds;
    let (mut pre, mut pad_score) = ("default", -1000.0);
    // ChatGLM3 as the converter's set_vocab_chatglm3 writes it: the first three pieces renamed,
    // the special tokens after the pieces as control tokens, the padding scored 0
    if arch == "chatglm" {
        (pre, pad_score) = ("chatglm-spm", 0.0);
        for (i, name) in ["<unk>", "<bos>", "<eos>"].into_iter().enumerate().take(tokens.len()) {
            tokens[i] = name.to_string();
        }
        for name in CHATGLM3_SPECIAL {
            tokens.push(name.to_string());
            scores.push(0.0);
            types.push(CONTROL);
        }
    }
    // ids missing up to `end` become `[PAD{id}]`, unused, as the converter pads them
    let mut pad_to = |end: usize, tokens: &mut Vec<String>, types: &mut Vec<i32>| {
        while tokens.len() < end {
            tokens.push(format!("[PAD{}]", tokens.len()));
            scores.push(pad_score);
            types.push(UNUSED);
        }
    };
    // added tokens beyond the model's pieces (tokenizer.json), as the converter adds them
    if let Ok(json) = read_json(&dir.join("tokenizer.json")) {
        for (id, content, kind) in added_tokens(&json) {
            pad_to(id + 1, &mut tokens, &mut types);
            tokens[id] = content;
            types[id] = kind;
        }
    }
    pad_to(rows, &mut tokens, &mut types);
    let mut kvs = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
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
        let ctx = |quant, layers, experts, falcon| QuantContext { quant, layers, experts, falcon, llama_70b: false };
        let t = |c, layer, cols| tensor_type(ctx(GgufQuant::Q4KM, 32, 0, false), c, layer, cols);
        assert_eq!(t(Category::FfnDown, 0, 4096), GgmlDType::Q6K);
        assert_eq!(t(Category::FfnDown, 4, 11008), GgmlDType::Q4K);
        assert_eq!(t(Category::AttnV, 6, 4096), GgmlDType::Q6K);
        assert_eq!(t(Category::Weight, 6, 4096), GgmlDType::Q4K);
        assert_eq!(t(Category::Output, 0, 4096), GgmlDType::Q6K);
        // rows narrower than a k-quant block fall back: Q4_K → Q5_0, Q6_K → Q8_0
        assert_eq!(t(Category::Weight, 4, 576), GgmlDType::Q5_0);
        assert_eq!(t(Category::Output, 0, 576), GgmlDType::Q8_0);
        assert_eq!(t(Category::Vector, 0, 576), GgmlDType::F32);
        // Mixtral's eight experts: attn_v and attn_k in Q8_0, attn_output in Q5_K
        let mixtral = |c| tensor_type(ctx(GgufQuant::Q4KM, 32, 8, false), c, 4, 4096);
        assert_eq!(mixtral(Category::AttnV), GgmlDType::Q8_0);
        assert_eq!(mixtral(Category::AttnK), GgmlDType::Q8_0);
        assert_eq!(mixtral(Category::AttnOutput), GgmlDType::Q5K);
        // Falcon: the output in Q8_0; ffn_down Q6_K in the first sixteenth, Q5_K on more-bits layers
        let falcon = |c, layer| tensor_type(ctx(GgufQuant::Q4KM, 32, 0, true), c, layer, 4544 / 64 * 256);
        assert_eq!(falcon(Category::Output, 0), GgmlDType::Q8_0);
        assert_eq!(falcon(Category::FfnDown, 1), GgmlDType::Q6K);
        assert_eq!(falcon(Category::FfnDown, 3), GgmlDType::Q5K);
        assert_eq!(falcon(Category::FfnDown, 4), GgmlDType::Q4K);
        // a 70B llama: attn_v in Q5_K off the more-bits layers
        let seventy = QuantContext { llama_70b: true, ..ctx(GgufQuant::Q4KM, 80, 0, false) };
        assert_eq!(tensor_type(seventy, Category::AttnV, 11, 8192), GgmlDType::Q5K);
        assert_eq!(tensor_type(seventy, Category::AttnV, 12, 8192), GgmlDType::Q6K);
        assert_eq!(tensor_type(ctx(GgufQuant::Q8_0, 2, 0, false), Category::Weight, 0, 48), GgmlDType::F16);
        assert_eq!(tensor_type(ctx(GgufQuant::F16, 2, 8, false), Category::Router, 0, 64), GgmlDType::F32);
    }

    #[test]
    fn categories_are_llama_quantizes_by_name() {
        assert_eq!(Category::of("blk.3.attn_qkv.weight", 2, false), Category::AttnV);
        assert_eq!(Category::of("blk.3.attn_qkv.bias", 1, false), Category::Vector);
        assert_eq!(Category::of("token_embd.weight", 2, true), Category::Output);
        assert_eq!(Category::of("token_embd.weight", 2, false), Category::TokenEmbd);
        assert_eq!(Category::of("blk.0.ffn_down_exps.weight", 3, false), Category::FfnDown);
        assert_eq!(Category::of("blk.0.ffn_gate_inp.weight", 2, false), Category::Router);
    }

    #[test]
    fn quantizations_parse_as_llama_cpp_names_them() {
        assert_eq!(GgufQuant::parse("Q4_K_M").unwrap(), GgufQuant::Q4KM);
        assert_eq!(GgufQuant::parse("q8-0").unwrap(), GgufQuant::Q8_0);
        assert!(GgufQuant::parse("q3_k_s").is_err());
    }
}
