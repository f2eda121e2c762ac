//! Tokenizers for tests, written as tokenizer.json files the `tokenizers` crate reads.
//!
//! `byte_level` is GPT-2's byte-level BPE with no merges: every byte of the text is one token,
//! so a test can count tokens from byte lengths, and special tokens (added tokens) are one
//! token each. Ids: the 256 bytes are 0..256 in byte order, special tokens follow from 256 in
//! the order given.

use std::path::Path;

use serde_json::{json, Value};

/// The special tokens of the ChatML test model.
pub const CHATML_SPECIALS: [&str; 4] = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"];

/// SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its
/// tokenizer_config.json has it.
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's map from bytes to printable characters.
pub fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap();
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(next).unwrap();
            printable.push(b);
            next += 1;
        }
    }
    chars
}

/// Id of a special token of a tokenizer written by [`write_byte_level`].
pub fn special_id(specials: &[&str], token: &str) -> u32 {
    256 + specials.iter().position(|s| *s == token).expect("token is one of the specials") as u32
}

/// Ids of plain text (no special tokens) under [`write_byte_level`]: its bytes.
pub fn byte_ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Writes a byte-level tokenizer.json with these special tokens into `dir`.
pub fn write_byte_level(dir: &Path, specials: &[&str]) {
    let chars = byte_to_char();
    let vocab: serde_json::Map<String, Value> =
        chars.iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        // As GPT-2, Qwen and SmolLM ship it: offsets of tokens made only of spaces shrink to
        // nothing, which the loss mask must cope with.
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
}

pub fn write_json(dir: &Path, name: &str, value: &Value) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A model folder with the ChatML specials, `<s>` as BOS and `<|im_end|>` as EOS (as ChatML
/// models have it), and tokenizer_config.json holding `chat_template` when given.
pub fn chatml_model_dir(chat_template: Option<&str>) -> tempfile::TempDir {
    model_dir(
        &CHATML_SPECIALS,
        json!({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>", "special": true}, "add_bos_token": false}),
        chat_template,
    )
}

/// A model folder with `<s>`/`</s>` as BOS/EOS (a LLaMA-like base model) and no chat template
/// unless given.
pub fn base_model_dir(chat_template: Option<&str>) -> tempfile::TempDir {
    model_dir(&CHATML_SPECIALS, json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}), chat_template)
}

/// A model folder: a byte-level tokenizer.json with `specials` and this tokenizer_config.json
/// (plus `chat_template`, when given).
pub fn model_dir(specials: &[&str], mut config: Value, chat_template: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_byte_level(dir.path(), specials);
    if let Some(t) = chat_template {
        config["chat_template"] = json!(t);
    }
    write_json(dir.path(), "tokenizer_config.json", &config);
    dir
}
