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
    /// SentencePiece piece scores (`tokenizer.ggml.scores`).
    pub scores: Option<Vec<f32>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    /// SentencePiece's "▁" before the text (`tokenizer.ggml.add_space_prefix`, default true).
    pub add_space_prefix: Option<bool>,
}

/// Which tokenizer a GGUF holds.
#[derive(Debug, Clone, PartialEq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with merges and the pre-tokenizer llama.cpp names.
    ByteLevelBpe { pre: String },
    /// `llama`: SentencePiece BPE (LLaMA-1/2, Mistral, TinyLlama) with byte fallback; the
    /// merges are derived from the piece scores as transformers' converter does.
    SentencePiece { add_space_prefix: bool },
}

/// A checked vocabulary.
pub struct GgufVocab {
    pub kind: VocabKind,
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
pub const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const REGEX_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn read_vocab(meta: &GgufVocabMeta, path: &Path) -> Result<GgufVocab> {
    let model = meta.model.as_deref().unwrap_or("");
    let tokens = meta
        .tokens
        .clone()
        .ok_or_else(|| Error::bad_entry(path, "tokenizer.ggml.tokens", "missing: the file has no tokenizer"))?;
    let (kind, merges) = match model {
        "gpt2" => {
            let merges = meta
                .merges
                .as_ref()
                .ok_or_else(|| {
                    Error::bad_entry(path, "tokenizer.ggml.merges", "missing: a BPE tokenizer needs its merges")
                })?
                .iter()
                .map(|m| {
                    m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                        Error::bad_entry(path, "tokenizer.ggml.merges", format!("entry {m:?} is not \"a b\""))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (VocabKind::ByteLevelBpe { pre: meta.pre.clone().unwrap_or_else(|| "default".into()) }, merges)
        }
        "llama" => {
            let scores = meta.scores.as_ref().ok_or_else(|| {
                Error::bad_entry(path, "tokenizer.ggml.scores", "missing: a SentencePiece tokenizer needs its scores")
            })?;
            if scores.len() != tokens.len() {
                return Err(Error::bad_entry(
                    path,
                    "tokenizer.ggml.scores",
                    format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            let kind = VocabKind::SentencePiece { add_space_prefix: meta.add_space_prefix.unwrap_or(true) };
            (kind, sentencepiece_merges(&tokens, scores))
        }
        other => {
            return Err(Error::bad_entry(
                path,
                "tokenizer.ggml.model",
                format!(
                "{other:?}: only BPE tokenizers (\"gpt2\" byte-level, \"llama\" SentencePiece) can be imported from \
                     GGUF yet; use the model's Hugging Face folder or hub id instead"
            ),
            ))
        }
    };
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
        kind,
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

/// BPE merges of a SentencePiece vocabulary, as transformers' `SentencePieceExtractor`: every
/// split of a piece into two pieces of the vocabulary is a merge, ranked by the merged
/// piece's score (highest first), ties by the ids of the halves.
pub fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().rev().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (merged, piece) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..split]), ids.get(&piece[split..])) {
                local.push((l, r));
            }
        }
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (scores[merged], merged, l, r)));
    }
    // stable: equal scores keep the vocabulary order
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

fn byte_level(use_regex: bool) -> Value {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn split(regex: &str) -> Value {
    json!({ "type": "Split", "pattern": { "Regex": regex }, "behavior": "Isolated", "invert": false })
}

/// The tokenizer.json (Hugging Face `tokenizers` format) for a byte-level BPE vocabulary.
pub fn build_tokenizer_json(vocab: &GgufVocab) -> Result<Value> {
    let pre = match &vocab.kind {
        VocabKind::ByteLevelBpe { pre } => pre.as_str(),
        VocabKind::SentencePiece { add_space_prefix } => return Ok(sentencepiece_json(vocab, *add_space_prefix)),
    };
    // (normalizer, pre-tokenizer, ignore_merges) per llama.cpp pre-tokenizer name
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
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
    let added = added_tokens(vocab);
    let post_processor = post_processor(vocab).unwrap_or_else(
        || json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true }),
    );
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

/// Unknown, control and user-defined tokens: matched whole, before the model sees the text.
fn added_tokens(vocab: &GgufVocab) -> Vec<Value> {
    vocab
        .token_type
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, t)| {
            json!({ "id": id, "content": vocab.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": *t != TOKEN_USER_DEFINED })
        })
        .collect()
}

/// BOS before each sequence when the file asks for it.
fn post_processor(vocab: &GgufVocab) -> Option<Value> {
    let bos = vocab.bos.filter(|_| vocab.add_bos)?;
    let bos_tok = &vocab.tokens[bos as usize];
    Some(json!({ "type": "TemplateProcessing",
        "single": [{ "SpecialToken": { "id": bos_tok, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
        "pair": [{ "SpecialToken": { "id": bos_tok, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } },
                 { "SpecialToken": { "id": bos_tok, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } }],
        "special_tokens": { bos_tok: { "id": bos_tok, "ids": [bos], "tokens": [bos_tok] } } }))
}

/// LLaMA-2's tokenizer.json layout: "▁" for spaces (and before the text), BPE with byte
/// fallback (<0xXX> pieces), decoded back with the prefix space stripped.
fn sentencepiece_json(vocab: &GgufVocab, add_space_prefix: bool) -> Value {
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({ "type": "Prepend", "prepend": "▁" }));
    }
    normalizers.push(json!({ "type": "Replace", "pattern": { "String": " " }, "content": "▁" }));
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": "▁" }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if add_space_prefix {
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }
    let mut vocab_map = Map::with_capacity(vocab.tokens.len());
    for (id, tok) in vocab.tokens.iter().enumerate() {
        vocab_map.entry(tok.clone()).or_insert(json!(id));
    }
    let merges: Vec<Value> = vocab.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let unk = vocab.unk.map(|u| vocab.tokens[u as usize].clone());
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(vocab),
        "normalizer": { "type": "Sequence", "normalizers": normalizers },
        "pre_tokenizer": null,
        "post_processor": post_processor(vocab),
        "decoder": { "type": "Sequence", "decoders": decoders },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges,
        },
    })
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
        Error::Invalid(format!("{}: the tokenizer rebuilt from this file is invalid: {e}", path.display()))
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
                "{}: the tokenizer rebuilt from this file does not round-trip {sample:?} (got {back:?})",
                path.display()
            )));
        }
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece vocabulary: specials, the 256 byte pieces, then pieces whose score
    /// falls with their id (earlier merges first).
    fn spm_meta() -> GgufVocabMeta {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(["▁", "t", "h", "e", "o", "r", "he", "▁t", "▁the", "er"].map(String::from));
        let mut token_type = vec![2, 3, 3];
        token_type.extend(std::iter::repeat_n(6, 256));
        token_type.extend(std::iter::repeat_n(1, 10));
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        GgufVocabMeta {
            model: Some("llama".into()),
            pre: None,
            tokens: Some(tokens),
            token_type: Some(token_type),
            merges: None,
            scores: Some(scores),
            bos: Some(1),
            eos: Some(2),
            pad: None,
            unk: Some(0),
            add_bos: true,
            add_space_prefix: None,
        }
    }

    #[test]
    fn sentencepiece_vocab_becomes_a_byte_fallback_bpe() {
        let path = Path::new("test.gguf");
        let vocab = read_vocab(&spm_meta(), path).unwrap();
        // he (score −265) before ▁t (−266) before ▁t+he (−267) before e+r (−268)
        assert_eq!(
            vocab.merges,
            [("h", "e"), ("▁", "t"), ("▁t", "he"), ("e", "r")].map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let tok = check_round_trips(&build_tokenizer_json(&vocab).unwrap(), path).unwrap();
        let enc = tok.encode("the other", true).unwrap();
        // <s>, then "▁the▁other": he, ▁t, ▁the apply; "er" cannot (its e is in "he")
        assert_eq!(enc.get_tokens(), ["<s>", "▁the", "▁", "o", "t", "he", "r"]);
        // characters outside the vocabulary fall back to their UTF-8 bytes
        let enc = tok.encode("é", false).unwrap();
        assert_eq!(enc.get_tokens(), ["▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "é");
    }

    #[test]
    fn unknown_tokenizer_models_are_refused() {
        let meta = GgufVocabMeta { model: Some("bert".into()), ..spm_meta() };
        let err = read_vocab(&meta, Path::new("x.gguf")).err().unwrap().to_string();
        assert!(err.contains("\"bert\"") && err.contains("tokenizer.ggml.model"), "{err}");
    }
}
