//! GGUF model files (llama.cpp, Ollama) turned into a Hugging Face folder the loader reads:
//! every tensor dequantized to f32 with candle's GGUF reader, llama.cpp's q/k row permutation
//! undone, config.json, tokenizer.json, tokenizer_config.json and generation_config.json rebuilt
//! from the metadata. The folder is materialised once in the cache and reused.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;

use super::tokenizer::{self, GgufVocabMeta};
use crate::error::{Error, Result};

/// Bumped whenever the folder an import writes changes, so stale imports are redone.
const IMPORT_VERSION: u32 = 2;
/// Written last: a folder without it is an interrupted import.
const DONE_MARKER: &str = "qls-gguf-import.json";

/// Typed access to a GGUF file's metadata, with errors naming the file and key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::bad_entry(self.path, key, message)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => return Err(self.err(key, format!("expected a whole number, found {other:?}"))),
        };
        Ok(Some(n))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, "missing; the file may not be a complete model GGUF"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.get(key) {
            None => None,
            Some(Value::F32(x)) => Some(*x as f64),
            Some(Value::F64(x)) => Some(*x),
            Some(other) => return Err(self.err(key, format!("expected a number, found {other:?}"))),
        })
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(key, format!("expected a string, found {other:?}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Array(items) = v else { return Err(self.err(key, "expected an array of strings")) };
        items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.err(key, format!("expected strings, found {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Array(items) = v else { return Err(self.err(key, "expected an array of numbers")) };
        items
            .iter()
            .map(|i| match i {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(self.err(key, format!("expected numbers, found {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Array(items) = v else { return Err(self.err(key, "expected an array of integers")) };
        items
            .iter()
            .map(|i| match i {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                other => Err(self.err(key, format!("expected integers, found {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The architectures this importer understands, as `general.architecture` names them.
const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2"];

/// The Hugging Face name of a GGUF tensor and how many heads its rows are permuted over.
struct Mapped {
    name: String,
    /// Some(heads): llama.cpp interleaved this q/k weight's rows per head; undo it.
    unpermute_heads: Option<usize>,
}

fn map_tensor_name(gguf_name: &str, arch: &str, heads: usize, kv_heads: usize) -> Option<Mapped> {
    let plain = |name: String| Some(Mapped { name, unpermute_heads: None });
    match gguf_name {
        "token_embd.weight" => return plain("model.embed_tokens.weight".into()),
        "output_norm.weight" => return plain("model.norm.weight".into()),
        "output.weight" => return plain("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    // Only LLaMA's converter permutes; Qwen2 uses the rotate-half layout as stored.
    let permuted = arch == "llama";
    let (hf, unpermute_heads) = match module {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", permuted.then_some(heads)),
        "attn_k" => ("self_attn.k_proj", permuted.then_some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    // biases are 1-D: their rows are permuted the same way
    Some(Mapped { name: format!("model.layers.{layer}.{hf}.{kind}"), unpermute_heads })
}

/// llama.cpp's converter stores q/k rows of each head as interleaved pairs: GGUF row `2i + j`
/// of a head is Hugging Face row `j·hd/2 + i` (docs/adapter-formats.md §4.4). This is the
/// inverse, on a tensor whose first dimension is the rows.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / heads;
    t.reshape((heads, hd / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// The folder a GGUF file is imported into: `<cache>/gguf/<stem>-<fingerprint>`.
pub fn import_dir_for(gguf: &Path, cache_root: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(gguf).map_err(|e| Error::io(gguf, e))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let canonical = std::fs::canonicalize(gguf).unwrap_or_else(|_| gguf.to_path_buf());
    let key = format!(
        "{}|{}|{}|{}",
        canonical.display(),
        meta.len(),
        modified.map(|d| d.as_nanos()).unwrap_or(0),
        IMPORT_VERSION
    );
    let stem = gguf.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let stem: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    Ok(cache_root.join("gguf").join(format!("{stem}-{:016x}", fnv1a(key.as_bytes()))))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The folder of an earlier complete import of `gguf`, if there is one (no work done).
pub fn imported(gguf: &Path, cache_root: &Path) -> Option<PathBuf> {
    let dir = import_dir_for(gguf, cache_root).ok()?;
    dir.join(DONE_MARKER).is_file().then_some(dir)
}

/// Import `gguf` into the cache under `cache_root` (reusing an earlier complete import) and
/// return the folder.
pub fn import_cached(gguf: &Path, cache_root: &Path) -> Result<PathBuf> {
    if let Some(dir) = imported(gguf, cache_root) {
        return Ok(dir);
    }
    let dir = import_dir_for(gguf, cache_root)?;
    let parent = dir.parent().unwrap_or(cache_root);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    // Built beside the final name and renamed, so an interrupted import is never reused.
    static IMPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = IMPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.with_extension(format!("tmp-{}-{n}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = convert(gguf, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.join(DONE_MARKER).is_file() {
        // another import of the same file finished first: use it
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    remove_stale_imports(gguf, &dir);
    Ok(dir)
}

/// Earlier imports of the same file (an older importer, a changed file) are hundreds of MB
/// each: remove the complete ones that name the same source.
fn remove_stale_imports(gguf: &Path, current: &Path) {
    let (Some(parent), Ok(source)) = (current.parent(), std::fs::canonicalize(gguf)) else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir == current {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(DONE_MARKER)) else { continue };
        let marker: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let same = marker.get("source").and_then(|s| s.as_str()).and_then(|s| std::fs::canonicalize(s).ok());
        if same.as_deref() == Some(source.as_path()) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The Hugging Face hub id a GGUF file says it was converted from, when its metadata names
/// one: `general.source.huggingface.repository`, or a huggingface.co address in
/// `general.source.url` / `general.base_model.0.repo_url` (as llama.cpp's converter writes them).
pub fn source_hub_id(gguf: &Path) -> Option<String> {
    let mut reader = BufReader::new(File::open(gguf).ok()?);
    let content = Content::read(&mut reader).ok()?;
    let text = |key: &str| match content.metadata.get(key) {
        Some(Value::String(s)) => Some(s.trim().to_string()),
        _ => None,
    };
    let from_url = |url: String| {
        let rest = url.split("huggingface.co/").nth(1)?;
        let mut parts = rest.split('/').filter(|p| !p.is_empty());
        Some(format!("{}/{}", parts.next()?, parts.next()?))
    };
    text("general.source.huggingface.repository")
        .filter(|id| id.split('/').count() == 2)
        .or_else(|| text("general.source.url").and_then(from_url))
        .or_else(|| text("general.base_model.0.repo_url").and_then(from_url))
}

/// Write the Hugging Face folder for `gguf` into `out` (which must exist).
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let file = File::open(gguf).map_err(|e| Error::io(gguf, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        Error::Invalid(format!("{}: not a readable GGUF file ({e}); download it again", gguf.display()))
    })?;
    let meta = Meta { path: gguf, map: &content.metadata };
    let arch = meta.opt_str("general.architecture")?.unwrap_or("").to_string();
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        return Err(Error::Invalid(format!(
            "{}: GGUF architecture {arch:?} cannot be imported yet (supported: {}); use the model's Hugging Face \
             folder or hub id instead",
            gguf.display(),
            SUPPORTED_ARCHS.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let layers = meta.usize(&key("block_count"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta.opt_u64(&key("attention.head_count_kv"))?.map(|n| n as usize).unwrap_or(heads);
    let head_dim = meta.opt_u64(&key("attention.key_length"))?.map(|n| n as usize).unwrap_or(hidden / heads.max(1));
    if let Some(rot) = meta.opt_u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(meta.err(&key("rope.dimension_count"), "partial rotary embeddings are not supported"));
        }
    }
    if meta.get(&key("rope.scaling.type")).is_some() || content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(meta.err(&key("rope.scaling.type"), "RoPE scaling is not supported yet"));
    }
    if meta.opt_u64(&key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(meta.err(&key("expert_count"), "mixture-of-experts GGUF files are not supported yet"));
    }
    let vocab = tokenizer::read_vocab(&meta_view(&meta)?, gguf)?;
    let vocab_size = vocab.tokens.len();

    // Tensors: name map first, so the safetensors header can be written before the data.
    let mut entries: Vec<(String, Mapped, Vec<usize>)> = Vec::new();
    for (name, info) in &content.tensor_infos {
        let Some(mapped) = map_tensor_name(name, &arch, heads, kv_heads) else {
            return Err(Error::Invalid(format!(
                "{}: tensor {name:?} has no Hugging Face equivalent this importer knows",
                gguf.display()
            )));
        };
        entries.push((name.clone(), mapped, info.shape.dims().to_vec()));
    }
    entries.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let tied = !content.tensor_infos.contains_key("output.weight");
    let embed_rows = entries.iter().find(|e| e.1.name == "model.embed_tokens.weight").map(|e| e.2[0]);
    if embed_rows != Some(vocab_size) {
        return Err(Error::Invalid(format!(
            "{}: token_embd.weight has {embed_rows:?} rows but the tokenizer has {vocab_size} tokens",
            gguf.display()
        )));
    }
    let intermediate = meta.usize(&key("feed_forward_length"))?;

    let device = Device::Cpu;
    write_safetensors_streaming(&out.join("model.safetensors"), &entries, |gguf_name, mapped| {
        let q = content
            .tensor(&mut reader, gguf_name, &device)
            .map_err(|e| Error::Invalid(format!("{}: tensor {gguf_name}: {e}", gguf.display())))?;
        let t = q.dequantize(&device)?;
        let t = match mapped.unpermute_heads {
            Some(n) => unpermute_rows(&t, n)?,
            None => t,
        };
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    })?;

    let qkv_bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let (model_type, class) = match arch.as_str() {
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "max_position_embeddings": meta.opt_u64(&key("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "torch_dtype": "float32",
        "_name_or_path": meta.opt_str("general.name")?.unwrap_or(""),
        "qls_imported_from": gguf.display().to_string(),
    });
    if arch == "llama" {
        config["attention_bias"] = json!(qkv_bias);
        config["mlp_bias"] = json!(false);
    }
    write_json(&out.join("config.json"), &config)?;

    let tokenizer_json = tokenizer::build_tokenizer_json(&vocab)?;
    tokenizer::check_round_trips(&tokenizer_json, gguf)?;
    write_json(&out.join("tokenizer.json"), &tokenizer_json)?;
    let token = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
    let mut tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": false,
        "bos_token": token(vocab.bos),
        "eos_token": token(vocab.eos),
        "pad_token": token(vocab.pad),
        "unk_token": token(vocab.unk),
        "model_max_length": meta.opt_u64(&key("context_length"))?.unwrap_or(2048),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(template) = meta.opt_str("tokenizer.chat_template")? {
        tok_config["chat_template"] = json!(template);
    }
    write_json(&out.join("tokenizer_config.json"), &tok_config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({ "bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": vocab.pad }),
    )?;
    write_json(
        &out.join(DONE_MARKER),
        &json!({ "source": gguf.display().to_string(), "import_version": IMPORT_VERSION, "architecture": arch }),
    )
}

/// The tokenizer-relevant metadata as plain values, for `tokenizer::read_vocab`.
fn meta_view(meta: &Meta<'_>) -> Result<GgufVocabMeta> {
    Ok(GgufVocabMeta {
        model: meta.opt_str("tokenizer.ggml.model")?.map(str::to_string),
        pre: meta.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        token_type: meta.ints("tokenizer.ggml.token_type")?,
        merges: meta.strings("tokenizer.ggml.merges")?,
        scores: meta.floats("tokenizer.ggml.scores")?,
        add_space_prefix: meta.opt_bool("tokenizer.ggml.add_space_prefix"),
        bos: meta.opt_u64("tokenizer.ggml.bos_token_id")?.map(|n| n as u32),
        eos: meta.opt_u64("tokenizer.ggml.eos_token_id")?.map(|n| n as u32),
        pad: meta.opt_u64("tokenizer.ggml.padding_token_id")?.map(|n| n as u32),
        unk: meta.opt_u64("tokenizer.ggml.unknown_token_id")?.map(|n| n as u32),
        add_bos: meta.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// A float32 safetensors file written tensor by tensor, so a large model never sits in memory
/// twice: the header is computed from the shapes, then `values` produces each tensor in turn.
fn write_safetensors_streaming(
    path: &Path,
    entries: &[(String, Mapped, Vec<usize>)],
    mut values: impl FnMut(&str, &Mapped) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (_, mapped, shape) in entries {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            mapped.name.clone(),
            json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // the data starts 8-byte aligned, padded with spaces as the format allows
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let io = |e| Error::io(&tmp, e);
    let mut w = BufWriter::new(File::create(&tmp).map_err(io)?);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    for (gguf_name, mapped, shape) in entries {
        let v = values(gguf_name, mapped)?;
        if v.len() != shape.iter().product::<usize>() {
            return Err(Error::Invalid(format!(
                "tensor {gguf_name}: dequantized to {} values, expected {shape:?}",
                v.len()
            )));
        }
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file holding only `metadata` (string values).
    fn gguf_with(dir: &Path, name: &str, metadata: &[(&str, &str)]) -> PathBuf {
        let path = dir.join(name);
        let values: Vec<(&str, Value)> = metadata.iter().map(|(k, v)| (*k, Value::String(v.to_string()))).collect();
        let refs: Vec<(&str, &Value)> = values.iter().map(|(k, v)| (*k, v)).collect();
        let mut file = File::create(&path).unwrap();
        candle_core::quantized::gguf_file::write(&mut file, &refs, &[]).unwrap();
        path
    }

    #[test]
    fn the_source_hub_id_comes_from_the_converters_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let arch = ("general.architecture", "llama");
        let repo = gguf_with(dir.path(), "a.gguf", &[arch, ("general.source.huggingface.repository", "Org/Model-7B")]);
        assert_eq!(source_hub_id(&repo).as_deref(), Some("Org/Model-7B"));
        let url =
            gguf_with(dir.path(), "b.gguf", &[arch, ("general.source.url", "https://huggingface.co/Org/M/tree/main")]);
        assert_eq!(source_hub_id(&url).as_deref(), Some("Org/M"));
        let base = gguf_with(
            dir.path(),
            "c.gguf",
            &[arch, ("general.base_model.0.repo_url", "https://huggingface.co/B/Base")],
        );
        assert_eq!(source_hub_id(&base).as_deref(), Some("B/Base"));
        // a name and an organisation (as SmolLM2's file has) say no repository
        let none =
            gguf_with(dir.path(), "d.gguf", &[arch, ("general.name", "Smollm2 135M"), ("general.organization", "HF")]);
        assert_eq!(source_hub_id(&none), None);
        assert_eq!(source_hub_id(&dir.path().join("missing.gguf")), None);
    }
}
