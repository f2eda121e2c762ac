//! llama.cpp GGUF LoRA adapters (docs/adapter-formats.md §3-§4): the family's tensor names,
//! the row transforms llama.cpp's converter applies to the base weights (so the adapter's B
//! must get the same), and the GGUF container itself, which the merged-model export
//! (gguf_model.rs) writes through too.
//!
//! A is written as it is (`ne = [in, r]`), B after the row transform (`ne = [r, out]`); a
//! fused projection that llama.cpp splits (Baichuan's W_pack) becomes one pair per part with
//! the same A.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::peft::PeftAdapter;
use crate::arch::SplitKind;
use crate::error::{Error, Result};
use crate::model::spec::{MlpKind, ModelSpec, PlannedLinear, Role};

/// The tensor type of the LoRA tensors in a GGUF adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
        }
    }
}

/// One LoRA tensor of a GGUF adapter, in PyTorch orientation (`dims` row-major; GGUF's `ne`
/// is `dims` reversed).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

/// What llama.cpp does to the output rows of a base weight when converting it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowTransform {
    None,
    /// LLaMA's q/k permutation with this many heads (rotate-half → interleaved pairs).
    Permute(usize),
}

/// llama.cpp's name for the architecture of `spec`'s family, or a clear error for families
/// its converter does not handle.
pub fn llama_cpp_arch(spec: &ModelSpec) -> Result<&str> {
    spec.gguf_arch.as_deref().ok_or_else(|| {
        Error::Invalid(format!(
            "GGUF export: llama.cpp has no converter for the {} family, so there is no base GGUF an adapter \
             could apply to; export a PEFT adapter or a merged model instead",
            spec.family_name()
        ))
    })
}

/// The head count of the q/k permutation: LLaMA permutes k with its KV heads; XVERSE's and
/// Baichuan's converters use `_reverse_hf_permute`, which divides by the KV heads instead
/// (the same for their MHA models), and llama.cpp is mirrored exactly.
fn k_permute_heads(arch: &str, heads: usize, kv_heads: usize) -> usize {
    match arch {
        "xverse" | "baichuan" if kv_heads != heads => heads / kv_heads,
        "xverse" | "baichuan" => heads,
        _ => kv_heads,
    }
}

/// Row order of LLaMA's permutation P_n on `rows` rows: GGUF row g is HF row `order[g]`.
/// Within each head, GGUF row 2i is HF row i and GGUF row 2i+1 is HF row hd/2 + i.
pub fn llama_permutation(rows: usize, n_heads: usize) -> Result<Vec<usize>> {
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "GGUF export: cannot permute {rows} rows for {n_heads} heads (each head needs an even number of rows)"
        )));
    }
    let hd = rows / n_heads;
    let mut order = Vec::with_capacity(rows);
    for k in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                order.push(k * hd + j * hd / 2 + i);
            }
        }
    }
    Ok(order)
}

/// Where one linear module of a decoder layer goes in llama.cpp's layout of the base model,
/// after the row transforms its converter applies: the GGUF adapter (on B) and the merged
/// GGUF model (on the weight and its bias) both follow it.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearPlace {
    /// llama.cpp tensors (names without `.weight`), each made of these output rows of the
    /// module, in this order: q/k permuted, a fused projection reordered or split.
    Rows(Vec<(String, Vec<usize>)>),
    /// Expert `index` of the layer's stacked tensor `name` (Mixtral).
    Expert { name: String, index: usize },
    /// The MoE router (`ffn_gate_inp`).
    Router(String),
}

/// `rows` in the order the transform gives them.
fn transform(rows: Vec<usize>, transform: RowTransform) -> Result<Vec<usize>> {
    Ok(match transform {
        RowTransform::None => rows,
        RowTransform::Permute(n) => llama_permutation(rows.len(), n)?.into_iter().map(|i| rows[i]).collect(),
    })
}

/// The place of `planned` (in layer `layer`) in llama.cpp's `arch` layout of `spec`.
pub fn linear_place(spec: &ModelSpec, arch: &str, layer: usize, planned: &PlannedLinear) -> Result<LinearPlace> {
    let permutes = matches!(arch, "llama" | "xverse" | "baichuan");
    let (nh, nkv, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let q_transform = if permutes { RowTransform::Permute(nh) } else { RowTransform::None };
    let k_transform = if permutes { RowTransform::Permute(k_permute_heads(arch, nh, nkv)) } else { RowTransform::None };
    let blk = format!("blk.{layer}");
    let all: Vec<usize> = (0..planned.out_features).collect();
    let one = |name: &str, rows: Vec<usize>| Ok(LinearPlace::Rows(vec![(format!("{blk}.{name}"), rows)]));
    match planned.role {
        Role::Q => one("attn_q", transform(all, q_transform)?),
        Role::K => one("attn_k", transform(all, k_transform)?),
        Role::V => one("attn_v", all),
        Role::Qkv => match (arch, planned.split) {
            // W_pack becomes three tensors; the q and k thirds permuted
            ("baichuan", Some(SplitKind::QkvContiguous)) => {
                let parts = SplitKind::QkvContiguous.qkv_rows(nh, nkv, hd)?;
                Ok(LinearPlace::Rows(vec![
                    (format!("{blk}.attn_q"), transform(parts.q, q_transform)?),
                    (format!("{blk}.attn_k"), transform(parts.k, k_transform)?),
                    (format!("{blk}.attn_v"), parts.v),
                ]))
            }
            // per-group [q…; k; v] (BLOOM per head) reordered to [Q; K; V]
            ("bloom" | "falcon", Some(SplitKind::QkvGrouped)) => {
                let parts = SplitKind::QkvGrouped.qkv_rows(nh, nkv, hd)?;
                one("attn_qkv", parts.q.into_iter().chain(parts.k).chain(parts.v).collect())
            }
            ("qwen" | "phi2" | "chatglm", Some(SplitKind::QkvContiguous)) => one("attn_qkv", all),
            (arch, split) => Err(Error::Invalid(format!(
                "GGUF export: no llama.cpp layout for the fused projection {} ({arch}, {split:?})",
                spec.linear_path(layer, planned)
            ))),
        },
        Role::O => one("attn_output", all),
        // ChatGLM's [gate; up] stays fused in llama.cpp
        Role::GateUp | Role::Up => one("ffn_up", all),
        Role::Gate => one("ffn_gate", all),
        Role::Down => one("ffn_down", all),
        Role::Router => Ok(LinearPlace::Router(format!("{blk}.ffn_gate_inp"))),
        Role::ExpertGate | Role::ExpertUp | Role::ExpertDown => {
            let name = match planned.role {
                Role::ExpertGate => "ffn_gate_exps",
                Role::ExpertUp => "ffn_up_exps",
                _ => "ffn_down_exps",
            };
            Ok(LinearPlace::Expert { name: format!("{blk}.{name}"), index: planned.expert.unwrap_or(0) })
        }
    }
}

/// `rows` of `t`, in order (`t` itself when they are all of them in order).
pub fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    if rows.len() == t.dim(0)? && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(t.clone());
    }
    let order: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(t.index_select(&Tensor::new(order.as_slice(), t.device())?, 0)?)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The adapter's tensors as llama.cpp names and lays them out for a base of `spec`, module by
/// module of the layer plan.
pub fn gguf_tensors(adapter: &PeftAdapter, spec: &ModelSpec) -> Result<Vec<GgufTensor>> {
    let arch = llama_cpp_arch(spec)?;
    let mut out = Vec::new();
    let mut push = |name: String, a: &Tensor, b: Tensor| -> Result<()> {
        out.push(GgufTensor { name: format!("{name}.weight.lora_a"), dims: a.dims().to_vec(), values: values(a)? });
        out.push(GgufTensor { name: format!("{name}.weight.lora_b"), dims: b.dims().to_vec(), values: values(&b)? });
        Ok(())
    };
    let mut used = 0usize;
    let n_experts = match spec.mlp {
        MlpKind::Moe { experts, .. } => experts,
        _ => 0,
    };
    for layer in 0..spec.layers {
        let mut experts: BTreeMap<String, Vec<(usize, &Tensor, &Tensor)>> = BTreeMap::new();
        for planned in &spec.linears {
            let path = spec.linear_path(layer, planned);
            let Some((a, b)) = adapter.pairs.get(&path) else { continue };
            used += 1;
            match linear_place(spec, arch, layer, planned)? {
                // a split projection becomes one pair per part, all with the same A
                LinearPlace::Rows(parts) => {
                    for (name, rows) in parts {
                        push(name, a, select_rows(b, &rows)?)?;
                    }
                }
                LinearPlace::Router(_) => {
                    return Err(Error::Invalid(format!(
                        "GGUF export: LoRA on the MoE router ({path}) cannot be expressed in a llama.cpp adapter; \
                         train without the router among the targets, or export a PEFT adapter or a merged model"
                    )));
                }
                LinearPlace::Expert { name, index } => experts.entry(name).or_default().push((index, a, b)),
            }
        }
        // llama.cpp holds all experts of a layer in one 3-D tensor; their LoRAs stack the same way
        for (name, mut parts) in experts {
            parts.sort_by_key(|p| p.0);
            if parts.len() != n_experts {
                return Err(Error::Invalid(format!(
                    "GGUF export: llama.cpp needs LoRA on all {n_experts} experts of layer {layer} or none \
                     ({name}: {} have one)",
                    parts.len()
                )));
            }
            let a = Tensor::stack(&parts.iter().map(|p| p.1).collect::<Vec<_>>(), 0)?;
            let b = Tensor::stack(&parts.iter().map(|p| p.2).collect::<Vec<_>>(), 0)?;
            push(name, &a, b)?;
        }
    }
    if used != adapter.pairs.len() {
        let planned: std::collections::BTreeSet<String> = spec.all_linears().map(|(_, path, _)| path).collect();
        let stray = adapter.pairs.keys().find(|p| !planned.contains(*p)).cloned().unwrap_or_default();
        return Err(Error::Invalid(format!(
            "GGUF export: the module {stray} is not a linear module inside a decoder layer of this model; llama.cpp \
             adapters cannot hold embedding or lm_head LoRA"
        )));
    }
    Ok(out)
}

/// The adapter's metadata: architecture, type, alpha (for rsLoRA the alpha whose alpha/r is
/// rsLoRA's alpha/√r, since llama.cpp only knows alpha/r), and the chat template if known.
pub fn gguf_metadata(
    adapter: &PeftAdapter,
    arch: &str,
    name: Option<&str>,
    chat_template: Option<&str>,
) -> Vec<(String, Value)> {
    let s = &adapter.settings;
    let alpha = if s.use_rslora { s.alpha * (s.r as f64).sqrt() } else { s.alpha };
    let mut kvs = vec![
        ("general.architecture".to_string(), Value::String(arch.to_string())),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    if let Some(name) = name {
        kvs.push(("general.name".to_string(), Value::String(name.to_string())));
    }
    if let Some(t) = chat_template {
        kvs.push(("tokenizer.chat_template".to_string(), Value::String(t.to_string())));
    }
    kvs
}

const ALIGNMENT: u64 = 32;

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            // an empty array still needs an element type, and llama.cpp checks it: the only one
            // we may write empty is a tokenizer's merges, an array of strings
            w.write_all(&items.first().map_or(8, value_type).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// GGML's type ids, as GGUF tensor infos store them.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

pub(crate) fn byte_size(t: GgmlDType, elems: usize) -> usize {
    elems / t.block_size() * t.type_size()
}

/// An output file path that can be written: not a folder, in a folder that exists.
pub(crate) fn check_output_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Invalid(format!("{} is a folder; give a file name to write to", path.display())));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        return Err(Error::Invalid(format!(
            "{}: the folder to write {} into does not exist; create it first",
            parent.display(),
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        )));
    }
    Ok(())
}

/// One tensor of a GGUF file: its name, PyTorch-order shape (GGUF's `ne` is it reversed) and type.
#[derive(Clone)]
pub(crate) struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml: GgmlDType,
}

/// GGUF v3: header, metadata, tensor infos (offsets from the planned sizes), then tensor i as
/// `produce(i)` makes it, padded to 32 bytes; streamed through `write_via_temp`, so a large model
/// is never in memory whole.
pub(crate) fn write_gguf_file(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    mut produce: impl FnMut(usize) -> Result<QTensor>,
) -> Result<()> {
    write_via_temp(out, |w, tmp| {
        let io = |e| Error::io(tmp, e);
        let mut header = Vec::new();
        header.extend(0x4655_4747u32.to_le_bytes());
        header.extend(3u32.to_le_bytes());
        header.extend((tensors.len() as u64).to_le_bytes());
        header.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            write_str(&mut header, key).map_err(io)?;
            header.extend(value_type(value).to_le_bytes());
            write_value(&mut header, value).map_err(io)?;
        }
        let padded = |n: u64| n.div_ceil(ALIGNMENT) * ALIGNMENT;
        let mut offset = 0u64;
        for p in tensors {
            // llama.cpp's GGML_MAX_NAME is 64 bytes with the terminating NUL
            if p.name.len() >= 64 || p.shape.is_empty() || p.shape.len() > 4 {
                return Err(Error::Invalid(format!("GGUF export: tensor {} cannot be stored in GGUF", p.name)));
            }
            write_str(&mut header, &p.name).map_err(io)?;
            header.extend((p.shape.len() as u32).to_le_bytes());
            for &d in p.shape.iter().rev() {
                header.extend((d as u64).to_le_bytes());
            }
            header.extend(ggml_type_id(p.ggml).to_le_bytes());
            header.extend(offset.to_le_bytes());
            offset += padded(byte_size(p.ggml, p.shape.iter().product()) as u64);
        }
        header.resize(padded(header.len() as u64) as usize, 0);
        w.write_all(&header).map_err(io)?;
        for (i, p) in tensors.iter().enumerate() {
            let q = produce(i)?;
            let data = q.data()?;
            let expected = byte_size(p.ggml, p.shape.iter().product());
            if data.len() != expected {
                return Err(Error::Invalid(format!(
                    "GGUF export: {} came out as {} bytes of {:?}, expected {expected}",
                    p.name,
                    data.len(),
                    p.ggml
                )));
            }
            w.write_all(&data).map_err(io)?;
            w.write_all(&vec![0u8; (padded(data.len() as u64) - data.len() as u64) as usize]).map_err(io)?;
        }
        Ok(())
    })
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temp(path, |w, tmp| w.write_all(bytes).map_err(|e| Error::io(tmp, e)))
}

/// Check `path` (`check_output_path`), let `fill` write the file under a hidden temporary name
/// beside it, sync it and rename it into place; on any error the temporary file is removed and
/// whatever was at `path` stays.
fn write_via_temp(path: &Path, fill: impl FnOnce(&mut BufWriter<File>, &Path) -> Result<()>) -> Result<()> {
    check_output_path(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut w = BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        fill(&mut w, &tmp)?;
        let f = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write `adapter` as a llama.cpp GGUF LoRA adapter for a base of `spec` to `path`.
pub fn write_gguf_adapter(
    adapter: &PeftAdapter,
    spec: &ModelSpec,
    path: &Path,
    dtype: GgufType,
    name: Option<&str>,
    chat_template: Option<&str>,
) -> Result<()> {
    if adapter.settings.use_dora || !adapter.magnitudes.is_empty() {
        return Err(Error::Invalid(
            "a llama.cpp GGUF adapter holds only LoRA's A and B: it has no place for DoRA's magnitude vectors; \
             export a merged model instead (the magnitudes are folded into its weights)"
                .into(),
        ));
    }
    let arch = llama_cpp_arch(spec)?;
    let tensors = gguf_tensors(adapter, spec)?;
    if tensors.is_empty() {
        return Err(Error::Invalid("GGUF export: the adapter has no LoRA tensors".into()));
    }
    let metadata = gguf_metadata(adapter, arch, name, chat_template);
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|t| TensorEntry { name: t.name.clone(), shape: t.dims.clone(), ggml: dtype.ggml() })
        .collect();
    write_gguf_file(path, &metadata, &entries, |i| {
        let t = &tensors[i];
        Ok(QTensor::quantize(&Tensor::from_slice(&t.values, t.dims.as_slice(), &Device::Cpu)?, dtype.ggml())?)
    })
}

/// An Ollama Modelfile for a GGUF adapter: FROM the base, ADAPTER the file, the template
/// when one in Ollama's Go-template syntax is known, and a stop parameter per stop token.
/// Without an adapter, FROM is the (merged) model itself.
pub fn modelfile_text(
    from: &str,
    adapter_file: Option<&str>,
    ollama_template: Option<&str>,
    stop_tokens: &[String],
) -> String {
    let mut text = String::new();
    match adapter_file {
        Some(adapter) => {
            text.push_str(
                "# Ollama Modelfile written by qlora-studio. FROM must be the same base model the adapter was\n",
            );
            text.push_str("# trained on (an Ollama model name or a path to its GGUF).\n");
            text.push_str(&format!("FROM {from}\nADAPTER ./{adapter}\n"));
        }
        None => {
            text.push_str("# Ollama Modelfile written by qlora-studio for the merged model beside it:\n");
            text.push_str("#   ollama create my-model -f Modelfile && ollama run my-model\n");
            text.push_str(&format!("FROM {from}\n"));
        }
    }
    match ollama_template {
        Some(t) => text.push_str(&format!("TEMPLATE \"\"\"{t}\"\"\"\n")),
        None => text.push_str("# TEMPLATE: none given; Ollama uses the base model's template\n"),
    }
    for stop in stop_tokens {
        text.push_str(&format!("PARAMETER stop {}\n", serde_json::Value::String(stop.clone())));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows: GGUF rows (0 1 2 3) take HF rows (0 2 1 3) within each head
        assert_eq!(llama_permutation(8, 2).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(llama_permutation(4, 1).unwrap(), vec![0, 2, 1, 3]);
        assert!(llama_permutation(6, 2).is_err(), "heads of 3 rows have no halves");
    }

    #[test]
    fn k_heads_follow_each_converter() {
        assert_eq!(k_permute_heads("llama", 32, 8), 8);
        // _reverse_hf_permute divides instead
        assert_eq!(k_permute_heads("baichuan", 32, 8), 4);
        assert_eq!(k_permute_heads("xverse", 32, 32), 32);
    }

    #[test]
    fn an_empty_array_is_written_as_strings() {
        // llama.cpp refuses a tokenizer whose merges are not an array of strings, even empty
        let mut bytes = Vec::new();
        write_value(&mut bytes, &Value::Array(Vec::new())).unwrap();
        assert_eq!(bytes, [8u32.to_le_bytes(), [0; 4]].concat().into_iter().chain([0; 4]).collect::<Vec<u8>>());
    }

    #[test]
    fn tensor_data_is_aligned_and_in_info_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let entry = |name: &str, n: usize| TensorEntry { name: name.into(), shape: vec![n], ggml: GgmlDType::F16 };
        let values = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let write = |entries: &[TensorEntry]| {
            write_gguf_file(&path, &[], entries, |i| {
                Ok(QTensor::quantize(&values(entries[i].shape[0]), GgmlDType::F16)?)
            })
        };
        write(&[entry("a", 3), entry("b", 9)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // header 24 bytes, then per tensor: name (8 + 1), n_dims 4, ne 8, type 4, offset 8
        let info = |i: usize| 24 + i * 33;
        let offset = |i: usize| u64::from_le_bytes(bytes[info(i) + 25..info(i) + 33].try_into().unwrap());
        assert_eq!((offset(0), offset(1)), (0, 32), "3 f16 values pad to 32 bytes");
        let data = info(2).div_ceil(32) * 32;
        assert_eq!(bytes.len(), data + 32 + 32);
        assert_eq!(&bytes[data + 32..data + 34], &half::f16::from_f32(1.0).to_le_bytes());
        assert!(write(&[entry(&"x".repeat(64), 1)]).is_err(), "llama.cpp names are under 64 bytes");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "a failed write leaves the earlier file");
    }
}
