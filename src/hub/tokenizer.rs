//! A Hugging Face tokenizer.json rebuilt from a GGUF file's `tokenizer.ggml.*` metadata: the
//! byte-level BPE from the token list and merges, and the pre-tokenizer llama.cpp names in
//! `tokenizer.ggml.pre`. candle's TokenizerFromGguf falls back to a prefix-space ByteLevel for
//! unknown pre-tokenizers, which gets SmolLM2 wrong (docs/candle-training.md §15).

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// GGUF tokenizer metadata (`tokenizer.ggml.*`) as read from the file.
pub struct GgufVocabMeta {
    pub model: Option<String>,
    pub pre: Option<String>,
    pub tokens: Option<Vec<String>>,
    pub token_type: Option<Vec<i64>>,
    pub merges: Option<Vec<String>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
}

/// A checked byte-level BPE vocabulary.
pub struct GgufVocab {
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_type: Vec<i64>,
    pub merges: Vec<(String, String)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
}

// llama.cpp's token types
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

// The pre-tokenizer regexes of llama.cpp's `llama-vocab.cpp`, as the models' tokenizer.json hold them.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn read_vocab(meta: &GgufVocabMeta, path: &Path) -> Result<GgufVocab> {
    let model = meta.model.as_deref().unwrap_or("");
    if model != "gpt2" {
        return Err(Error::bad_entry(
            path,
            "tokenizer.ggml.model",
            format!(
                "{model:?}: only byte-level BPE tokenizers (\"gpt2\") can be imported from GGUF yet; use the model's \
                 Hugging Face folder or hub id instead"
            ),
        ));
    }
    let tokens = meta
        .tokens
        .clone()
        .ok_or_else(|| Error::bad_entry(path, "tokenizer.ggml.tokens", "missing: the file has no tokenizer"))?;
    let merges = meta
        .merges
        .as_ref()
        .ok_or_else(|| Error::bad_entry(path, "tokenizer.ggml.merges", "missing: a BPE tokenizer needs its merges"))?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::bad_entry(path, "tokenizer.ggml.merges", format!("entry {m:?} is not \"a b\"")))
        })
        .collect::<Result<Vec<_>>>()?;
    let token_type = meta.token_type.clone().unwrap_or_else(|| vec![1; tokens.len()]);
    if token_type.len() != tokens.len() {
        return Err(Error::bad_entry(
            path,
            "tokenizer.ggml.token_type",
            format!("{} entries for {} tokens", token_type.len(), tokens.len()),
        ));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", meta.bos),
        ("tokenizer.ggml.eos_token_id", meta.eos),
        ("tokenizer.ggml.padding_token_id", meta.pad),
        ("tokenizer.ggml.unknown_token_id", meta.unk),
    ] {
        if id.is_some_and(|i| i as usize >= tokens.len()) {
            return Err(Error::bad_entry(path, key, format!("id {id:?} is outside the {} tokens", tokens.len())));
        }
    }
    Ok(GgufVocab {
        pre: meta.pre.clone().unwrap_or_else(|| "default".into()),
        tokens,
        token_type,
        merges,
        bos: meta.bos,
        eos: meta.eos,
        pad: meta.pad,
        unk: meta.unk,
        add_bos: meta.add_bos,
    })
}

fn byte_level(use_regex: bool) -> Value {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn split(regex: &str) -> Value {
    json!({ "type": "Split", "pattern": { "Regex": regex }, "behavior": "Isolated", "invert": false })
}

/// The tokenizer.json (Hugging Face `tokenizers` format) for a byte-level BPE vocabulary.
pub fn build_tokenizer_json(vocab: &GgufVocab) -> Result<Value> {
    // (normalizer, pre-tokenizer, ignore_merges) per llama.cpp pre-tokenizer name
    let (normalizer, pre_tokenizer, ignore_merges) = match vocab.pre.as_str() {
        // SmolLM2 / StarCoder: digits one by one, then GPT-2's byte-level regex
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Digits", "individual_digits": true }, byte_level(true) ] }),
            false,
        ),
        "llama3" | "llama-bpe" | "smaug-bpe" => (
            Value::Null,
            json!({ "type": "Sequence", "pretokenizers": [split(REGEX_LLAMA3), byte_level(false)] }),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({ "type": "NFC" }),
            json!({ "type": "Sequence", "pretokenizers": [split(REGEX_QWEN2), byte_level(false)] }),
            false,
        ),
        // GPT-2 and anything unnamed: the byte-level regex, and no prefix space
        _ => (Value::Null, byte_level(true), false),
    };
    let mut vocab_map = Map::with_capacity(vocab.tokens.len());
    for (id, tok) in vocab.tokens.iter().enumerate() {
        // duplicates (padding entries in some files) keep their first id
        vocab_map.entry(tok.clone()).or_insert(json!(id));
    }
    let merges: Vec<Value> = vocab.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let added: Vec<Value> = vocab
        .token_type
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, t)| {
            json!({ "id": id, "content": vocab.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": *t != TOKEN_USER_DEFINED })
        })
        .collect();
    let post_processor = match (vocab.add_bos, vocab.bos) {
        (true, Some(bos)) => {
            let bos_tok = &vocab.tokens[bos as usize];
            json!({ "type": "TemplateProcessing",
                "single": [{ "SpecialToken": { "id": bos_tok, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
                "pair": [{ "SpecialToken": { "id": bos_tok, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } },
                         { "SpecialToken": { "id": bos_tok, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } }],
                "special_tokens": { bos_tok: { "id": bos_tok, "ids": [bos], "tokens": [bos_tok] } } })
        }
        _ => json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true }),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab_map, "merges": merges,
        },
    }))
}

/// Texts every imported tokenizer must encode and decode back unchanged.
pub const ROUND_TRIP_SAMPLES: &[&str] = &[
    "Hello world!",
    "The year 2024 has 365 days.",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "café, naïve, Ångström 🙂 日本語",
    "fn main() { println!(\"{}\", 1 + 2); }",
];

/// Load the built tokenizer and check that the samples round-trip, so a wrong pre-tokenizer
/// or a broken vocabulary fails at import rather than as garbled text later.
pub fn check_round_trips(tokenizer_json: &Value, path: &Path) -> Result<Tokenizer> {
    let text = tokenizer_json.to_string();
    let tok: Tokenizer = text.parse().map_err(|e| {
        Error::Invalid(format!("{}: the tokenizer rebuilt from the GGUF metadata is invalid: {e}", path.display()))
    })?;
    for sample in ROUND_TRIP_SAMPLES {
        let enc = tok
            .encode(*sample, false)
            .map_err(|e| Error::Invalid(format!("{}: cannot tokenize {sample:?}: {e}", path.display())))?;
        let back = tok
            .decode(enc.get_ids(), false)
            .map_err(|e| Error::Invalid(format!("{}: cannot decode {sample:?}: {e}", path.display())))?;
        if back != *sample {
            return Err(Error::Invalid(format!(
                "{}: the tokenizer rebuilt from the GGUF metadata does not round-trip {sample:?} (got {back:?})",
                path.display()
            )));
        }
    }
    Ok(tok)
}
