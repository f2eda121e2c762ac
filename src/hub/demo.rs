//! The built-in demo model (assets/demo/model): a tiny LLaMA with seeded random weights and a
//! small byte-level BPE with a ChatML template, so the app has something to fine-tune offline
//! at once. `examples/make_demo_model.rs` writes it; a test checks the committed copy is what
//! this code makes. The binary carries a copy of assets/demo for when it runs away from the
//! repository.

use std::path::Path;

use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::{f32_bytes, write_safetensors, RawTensor};

/// The demo model's chat template: ChatML, written as hub models write it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
     message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub const DEMO_SEED: u64 = 20_241_128;
const LM_HEAD_STD: f32 = 0.3;
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const VOCAB: usize = 512;
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTERMEDIATE: usize = 176;

/// The folder of the demo model in the repository.
pub fn demo_model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model")
}

/// assets/demo, built into the binary: an installed copy (`cargo install`, a package) has no
/// repository beside it.
const BUILT_IN: &[(&str, &[u8])] = &[
    ("dataset.jsonl", include_bytes!("../../assets/demo/dataset.jsonl")),
    ("README.md", include_bytes!("../../assets/demo/README.md")),
    ("model/README.md", include_bytes!("../../assets/demo/model/README.md")),
    ("model/config.json", include_bytes!("../../assets/demo/model/config.json")),
    ("model/generation_config.json", include_bytes!("../../assets/demo/model/generation_config.json")),
    ("model/model.safetensors", include_bytes!("../../assets/demo/model/model.safetensors")),
    ("model/tokenizer.json", include_bytes!("../../assets/demo/model/tokenizer.json")),
    ("model/tokenizer_config.json", include_bytes!("../../assets/demo/model/tokenizer_config.json")),
];

/// The demo folder (`model/` and `dataset.jsonl`): the repository's assets/demo when the binary
/// was built from a checkout that is still there, else the built-in copy, written once under
/// `app_cache`. When neither is possible, the repository's path (the first Start then names it).
pub fn demo_assets(app_cache: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    if BUILT_IN.iter().all(|(name, _)| repo.join(name).is_file()) {
        return repo;
    }
    let dir = app_cache.join(concat!("demo-", env!("CARGO_PKG_VERSION")));
    if write_built_in_demo(&dir).is_ok() {
        dir
    } else {
        repo
    }
}

/// Write the built-in demo to `dir`, unless a complete copy is there. The files go to a
/// temporary folder first, so an interrupted write never looks complete.
pub fn write_built_in_demo(dir: &Path) -> Result<()> {
    let complete = |d: &Path| {
        BUILT_IN.iter().all(|(name, bytes)| d.join(name).metadata().is_ok_and(|m| m.len() == bytes.len() as u64))
    };
    if complete(dir) {
        return Ok(());
    }
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, bytes) in BUILT_IN {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// The text the demo tokenizer's merges are learned from.
const CORPUS: &str = "Fine-tuning adapts a pretrained language model to a task with a small dataset. \
LoRA trains two small matrices beside each frozen weight; QLoRA keeps the frozen weights in four bits. \
The user picks a model and a dataset, sets the rank, alpha and target modules, and watches the loss fall. \
Question: What is the capital of France? Answer: The capital of France is Paris. \
Question: What is two plus two? Answer: Two plus two is four. \
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. \
Once upon a time there was a small model that wanted to learn. It read the same stories again and again, \
and every time the loss went down a little. In the end it could answer the questions it was trained on. \
<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a tiny demo model.<|im_end|>\n";

fn tokenizer() -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| Error::Invalid(format!("demo tokenizer: {e}"));
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let specials = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    // repeated so that the merges of rarer words reach the minimum frequency
    let lines: Vec<String> = CORPUS.split(". ").map(|s| s.to_string()).collect();
    let corpus: Vec<&String> = std::iter::repeat_n(&lines, 3).flatten().collect();
    tok.train(&mut trainer, corpus.into_iter()).map_err(err)?;
    Ok(tok)
}

/// Write the demo model into `dir` (created if missing).
pub fn write_demo_model(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok = tokenizer()?;
    let vocab = tok.get_vocab_size(true);
    if vocab > VOCAB {
        return Err(Error::Invalid(format!("demo tokenizer has {vocab} tokens, more than {VOCAB}")));
    }
    let id = |t: &str| tok.token_to_id(t).ok_or_else(|| Error::Invalid(format!("demo tokenizer lacks {t}")));
    let (eos, bos) = (id("<|im_end|>")?, id("<|im_start|>")?);
    let pad = id("<|endoftext|>")?;
    let tok_json = tok.to_string(true).map_err(|e| Error::Invalid(format!("demo tokenizer: {e}")))?;
    std::fs::write(dir.join("tokenizer.json"), tok_json).map_err(|e| Error::io(dir.join("tokenizer.json"), e))?;

    let head_dim = HIDDEN / HEADS;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": VOCAB,
        "tie_word_embeddings": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "_name_or_path": "qlora-studio-demo",
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": null,
            "add_bos_token": false,
            "model_max_length": 512,
            "clean_up_tokenization_spaces": false,
            "chat_template": CHATML_TEMPLATE,
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({ "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad }),
    )?;

    // seeded normal(0, 0.02) weights, norms at one, each tensor from its own name
    let scaled = |name: &str, shape: &[usize], std: f32| RawTensor {
        name: name.to_string(),
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        data: f32_bytes(&Rng::for_key(DEMO_SEED, name).normal(shape.iter().product(), 0.0, std)),
    };
    let normal = |name: &str, shape: &[usize]| scaled(name, shape, 0.02);
    let ones = |name: &str| RawTensor {
        name: name.to_string(),
        dtype: safetensors::Dtype::F32,
        shape: vec![HIDDEN],
        data: f32_bytes(&vec![1.0; HIDDEN]),
    };
    let (q, kv) = (HEADS * head_dim, KV_HEADS * head_dim);
    let mut tensors = vec![
        normal("model.embed_tokens.weight", &[VOCAB, HIDDEN]),
        ones("model.norm.weight"),
        // a separate output layer at a scale whose logits can span a trained model's range
        // (with the embedding's 0.02, logits stay within about ±1 and LoRA cannot move the loss
        // far below ln(vocab))
        scaled("lm_head.weight", &[VOCAB, HIDDEN], LM_HEAD_STD),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.push(ones(&format!("{p}.input_layernorm.weight")));
        tensors.push(ones(&format!("{p}.post_attention_layernorm.weight")));
        for (name, shape) in [
            ("self_attn.q_proj", [q, HIDDEN]),
            ("self_attn.k_proj", [kv, HIDDEN]),
            ("self_attn.v_proj", [kv, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, q]),
            ("mlp.gate_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTERMEDIATE]),
        ] {
            tensors.push(normal(&format!("{p}.{name}.weight"), &shape));
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    write_safetensors(&dir.join("model.safetensors"), &tensors)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
