//! A tiny LLaMA checkpoint folder made on the spot: config.json, random weights, and a
//! word-level tokenizer whose vocabulary is every word of the given texts.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use qlora_studio::rng::Rng;
use qlora_studio::weights::{f32_bytes, write_safetensors, RawTensor};

pub struct TinyLlama {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub seed: u64,
    /// At least this many token ids (placeholder words fill the vocabulary), so another
    /// tokenizer of that size can be swapped in.
    pub min_vocab: usize,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self { hidden: 64, layers: 2, heads: 4, kv_heads: 2, intermediate: 128, seed: 7, min_vocab: 0 }
    }
}

pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];

/// The words of `texts` as the tokenizer's pre-tokenizer (Whitespace: `\w+|[^\w\s]+`) splits them.
fn words(texts: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in texts {
        let mut word = String::new();
        let mut word_is_alnum = true;
        for ch in t.chars() {
            let alnum = ch.is_alphanumeric() || ch == '_';
            if (ch.is_whitespace() || alnum != word_is_alnum) && !word.is_empty() {
                out.insert(std::mem::take(&mut word));
            }
            if !ch.is_whitespace() {
                word_is_alnum = alnum;
                word.push(ch);
            }
        }
        if !word.is_empty() {
            out.insert(word);
        }
    }
    out
}

impl TinyLlama {
    /// Write the folder; returns the vocabulary size.
    pub fn write(&self, dir: &Path, texts: &[String]) -> usize {
        std::fs::create_dir_all(dir).unwrap();
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for t in SPECIAL_TOKENS.iter().map(|s| s.to_string()).chain(words(texts)) {
            let id = vocab.len() as u32;
            vocab.entry(t).or_insert(id);
        }
        while vocab.len() < self.min_vocab {
            let id = vocab.len() as u32;
            vocab.insert(format!("<placeholder_{id}>"), id);
        }
        let vocab_size = vocab.len();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
        let tokenizer_config = serde_json::json!({
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "add_bos_token": false,
        });
        std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();

        let config = serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate, "vocab_size": vocab_size,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": false, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

        let (h, kv) = (self.hidden, self.kv_heads * (self.hidden / self.heads));
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![vocab_size, h]),
            ("model.norm.weight".into(), vec![h]),
            ("lm_head.weight".into(), vec![vocab_size, h]),
        ];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("mlp.gate_proj.weight", vec![self.intermediate, h]),
                ("mlp.up_proj.weight", vec![self.intermediate, h]),
                ("mlp.down_proj.weight", vec![h, self.intermediate]),
            ] {
                shapes.push((format!("{p}.{name}"), shape));
            }
        }
        let tensors: Vec<RawTensor> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values = if shape.len() == 1 {
                    vec![1.0f32; n]
                } else {
                    Rng::for_key(self.seed, &name).normal(n, 0.0, 0.5 / (shape[1] as f32).sqrt())
                };
                RawTensor { name, dtype: safetensors::Dtype::F32, shape, data: f32_bytes(&values) }
            })
            .collect();
        write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
        vocab_size
    }
}
