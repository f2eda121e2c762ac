//! GGUF import on a file this test writes from a fixture checkpoint the way llama.cpp's
//! converter does (q/k rows permuted per head, tied names, tokenizer metadata): the imported
//! folder must reproduce transformers' logits for the original checkpoint, and the rebuilt
//! tokenizer must follow the BPE merges.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use qlora_studio::hub::gguf;
use qlora_studio::model::{BaseWeights, Model};
use qlora_studio::weights::SafetensorsFile;

/// GPT-2's byte → printable character table (the byte-level alphabet).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> =
        ('!' as u32..='~' as u32).chain('¡' as u32..='¬' as u32).chain('®' as u32..='ÿ' as u32).collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if let Some(pos) = printable.iter().position(|&p| p == b) {
            chars[b as usize] = char::from_u32(printable[pos]).unwrap();
        } else {
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    printable.clear();
    chars
}

/// Merged tokens take the slots of bytes 1..=5, which no test text uses.
const MERGES: [(&str, &str); 5] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")];

fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(|c| c.to_string()).collect();
    for (slot, (a, b)) in MERGES.iter().enumerate() {
        tokens[slot + 1] = format!("{a}{b}");
    }
    tokens
}

/// llama.cpp's `LlamaModel.permute`: GGUF row k·hd + 2i + j = Hugging Face row k·hd + j·hd/2 + i.
fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for k in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let gguf_row = k * hd + 2 * i + j;
                let hf_row = k * hd + j * hd / 2 + i;
                out[gguf_row * cols..(gguf_row + 1) * cols].copy_from_slice(&w[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

fn write_gguf_from_fixture(fixture: &Path, out: &Path, arch: &str) {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| config[k].as_u64().unwrap() as u32;
    let (heads, kv_heads, head_dim) = (n("num_attention_heads"), n("num_key_value_heads"), n("head_dim"));
    let st = SafetensorsFile::open(fixture.join("model.safetensors")).unwrap();
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for key in st.keys() {
        let t = st.tensor(&key, &dev).unwrap().to_dtype(DType::F32).unwrap();
        let name = key
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            let (rows, cols) = t.dims2().unwrap();
            let h = if name.ends_with("attn_q.weight") { heads } else { kv_heads };
            let w = permute_rows(&t.flatten_all().unwrap().to_vec1().unwrap(), rows, cols, h as usize);
            Tensor::from_vec(w, (rows, cols), &dev).unwrap()
        } else {
            t
        };
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let s = |v: &str| Value::String(v.to_string());
    let tokens = vocab();
    let mut token_type = vec![Value::I32(1); tokens.len()];
    token_type[0] = Value::I32(3); // byte 0 as a control token, as <|endoftext|> would be
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("tiny test llama")),
        ("llama.block_count".into(), Value::U32(n("num_hidden_layers"))),
        ("llama.context_length".into(), Value::U32(n("max_position_embeddings"))),
        ("llama.embedding_length".into(), Value::U32(n("hidden_size"))),
        ("llama.feed_forward_length".into(), Value::U32(n("intermediate_size"))),
        ("llama.attention.head_count".into(), Value::U32(heads)),
        ("llama.attention.head_count_kv".into(), Value::U32(kv_heads)),
        ("llama.rope.dimension_count".into(), Value::U32(head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(config["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config["rms_norm_eps"].as_f64().unwrap() as f32)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(token_type)),
        ("tokenizer.ggml.merges".into(), Value::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"),
        ),
    ];
    let mut f = std::fs::File::create(out).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

#[test]
fn imported_gguf_reproduces_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = common::fixture("models/llama_gqa_all_linear");
    let file = tmp.path().join("tiny.gguf");
    write_gguf_from_fixture(&fixture, &file, "llama");

    let cache = tmp.path().join("cache");
    let dir = gguf::import_cached(&file, &cache).unwrap();
    assert!(dir.starts_with(cache.join("gguf")));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).is_file(), "{f} missing from the import");
    }
    // the second import reuses the folder
    let stamp = std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap();
    assert_eq!(gguf::import_cached(&file, &cache).unwrap(), dir);
    assert_eq!(std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap(), stamp);

    // a changed file is imported again, and the stale import is removed
    let file_again = std::fs::read(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&file, &file_again).unwrap();
    let dir_again = gguf::import_cached(&file, &cache).unwrap();
    if dir_again != dir {
        assert!(!dir.exists(), "the stale import {} is still there", dir.display());
    }
    let dir = dir_again;

    let dev = Device::Cpu;
    let reference = SafetensorsFile::open(fixture.join("reference.safetensors")).unwrap();
    let ids = reference.tensor("input_ids", &dev).unwrap();
    let model = Model::load(&dir, BaseWeights::Dense(DType::F32), &dev).unwrap();
    assert_eq!((model.spec.heads, model.spec.kv_heads), (4, 2));
    assert!(!model.spec.tie_embeddings, "the GGUF has output.weight");
    let logits = model.forward(&ids, false).unwrap();
    let want = reference.tensor("logits", &dev).unwrap();
    let d = (logits - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "imported GGUF logits differ from transformers' by {d}");

    // the BPE follows the merges by rank; the byte-level alphabet covers the rest
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let pieces = |text: &str| -> Vec<String> { tok.encode(text, false).unwrap().get_tokens().to_vec() };
    assert_eq!(pieces("the other"), ["t", "he", "Ġ", "o", "t", "he", "r"]);
    assert_eq!(pieces(" the inner"), ["Ġthe", "Ġ", "in", "n", "er"]);
    assert_eq!(tok.decode(tok.encode("Ångström 🙂\n", false).unwrap().get_ids(), false).unwrap(), "Ångström 🙂\n");

    let tok_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tok_config["eos_token"], vocab()[0].as_str());
    assert!(tok_config["chat_template"].as_str().unwrap().contains("m['role']"));
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], 0);
}

#[test]
fn unsupported_gguf_architectures_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("other.gguf");
    write_gguf_from_fixture(&common::fixture("models/llama_gqa_all_linear"), &file, "mamba");
    let err = gguf::import_cached(&file, &tmp.path().join("cache")).unwrap_err().to_string();
    assert!(err.contains("\"mamba\"") && err.contains("llama"), "{err}");
    // nothing half-written is left to be reused
    let leftovers = std::fs::read_dir(tmp.path().join("cache/gguf")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0);

    let not_gguf = tmp.path().join("broken.gguf");
    std::fs::write(&not_gguf, b"GGUF but not really").unwrap();
    let err = gguf::import_cached(&not_gguf, &tmp.path().join("cache")).unwrap_err().to_string();
    assert!(err.contains("broken.gguf") && err.contains("GGUF"), "{err}");
}
