//! A GGUF file written from a fixture checkpoint the way llama.cpp's converter writes one (q/k
//! rows permuted per head, llama.cpp tensor names, a byte-level BPE tokenizer in the metadata,
//! padded to the checkpoint's vocabulary).
#![allow(dead_code)]

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use qlora_studio::weights::SafetensorsFile;

/// GPT-2's byte → printable character table (the byte-level alphabet).
pub fn byte_chars() -> Vec<char> {
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
pub const MERGES: [(&str, &str); 5] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")];

pub fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(|c| c.to_string()).collect();
    for (slot, (a, b)) in MERGES.iter().enumerate() {
        tokens[slot + 1] = format!("{a}{b}");
    }
    tokens
}

/// llama.cpp's `LlamaModel.permute`: GGUF row k·hd + 2i + j = Hugging Face row k·hd + j·hd/2 + i.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
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

pub fn write_gguf_from_fixture(fixture: &Path, out: &Path, arch: &str) {
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
    // the byte-level vocabulary, padded to the embedding's rows as llama.cpp's converter pads one:
    // "[PAD<id>]" tokens of type UNUSED (5), which no merge makes
    let mut tokens = vocab();
    let rows = config["vocab_size"].as_u64().unwrap() as usize;
    assert!(rows >= tokens.len(), "the fixture's vocabulary ({rows}) is smaller than the byte-level one");
    let bytes = tokens.len();
    tokens.extend((bytes..rows).map(|id| format!("[PAD{id}]")));
    let mut token_type = vec![Value::I32(1); bytes];
    token_type.resize(rows, Value::I32(5));
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
