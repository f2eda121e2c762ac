//! SentencePiece model files (`tokenizer.model`), for model folders that ship no
//! tokenizer.json. The protobuf is read with prost (only the fields a BPE vocabulary needs) and
//! the vocabulary goes through the same builder as a GGUF file's LLaMA vocabulary
//! (hub::tokenizer), which lays it out as LLaMA-2's published tokenizer.json does.

use std::path::Path;

use prost::Message;
use tokenizers::Tokenizer;

use super::tokenizer::{build_tokenizer_json, check_round_trips, sentencepiece_merges, GgufVocab, VocabKind};
use crate::error::{Error, Result};

/// `sentencepiece_model.proto`, the fields read here (numbers and defaults as there).
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: llama.cpp's token types
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM 1 (the default), BPE 2, WORD 3, CHAR 4
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "24")]
    treat_whitespace_as_suffix: Option<bool>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    eos_id: Option<i32>,
    #[prost(int32, optional, tag = "43")]
    pad_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    /// empty for the identity rule
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    remove_extra_whitespaces: Option<bool>,
}

/// A tokenizer built from `path` (a tokenizer.model), with its BOS and EOS piece names.
/// `add_bos` puts the BOS before each sequence (tokenizer_config.json's `add_bos_token`).
pub fn tokenizer_from_model(path: &Path, add_bos: bool) -> Result<(Tokenizer, Option<String>, Option<String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Invalid(format!("{}: not a SentencePiece model file ({e})", path.display())))?;
    let vocab = vocabulary(&model, add_bos, path)?;
    let name = |id: Option<u32>| id.map(|i| vocab.tokens[i as usize].clone());
    let (bos, eos) = (name(vocab.bos), name(vocab.eos));
    let json = build_tokenizer_json(&vocab)?;
    Ok((check_round_trips(&json, path)?, bos, eos))
}

/// A SentencePiece model's pieces as llama.cpp's converter writes them to GGUF (`llama`
/// tokenizer): piece, score and type per id, the special ids and the dummy-prefix flag.
pub struct Pieces {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// llama.cpp's token types, which are SentencePiece's piece types.
    pub kinds: Vec<i32>,
    pub unk: Option<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_space_prefix: bool,
}

/// The pieces of the tokenizer.model at `path`, for a GGUF export (the same checks as reading
/// it to train: what llama.cpp's `llama` tokenizer could not reproduce is refused).
pub fn pieces(path: &Path) -> Result<Pieces> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Invalid(format!("{}: not a SentencePiece model file ({e})", path.display())))?;
    let vocab = vocabulary(&model, false, path)?;
    Ok(Pieces {
        scores: model.pieces.iter().map(|p| p.score.unwrap_or(0.0)).collect(),
        kinds: model.pieces.iter().map(|p| p.kind.unwrap_or(1)).collect(),
        add_space_prefix: matches!(vocab.kind, VocabKind::SentencePiece { add_space_prefix: true }),
        tokens: vocab.tokens,
        unk: vocab.unk,
        bos: vocab.bos,
        eos: vocab.eos,
    })
}

/// What a converted tokenizer cannot reproduce is refused, with the way out.
fn vocabulary(model: &ModelProto, add_bos: bool, path: &Path) -> Result<GgufVocab> {
    let unsupported = |what: &str| {
        Error::Invalid(format!(
            "{}: {what}, which qlora-studio does not convert; make tokenizer.json once with transformers, {}",
            path.display(),
            crate::data::MAKE_TOKENIZER_JSON
        ))
    };
    let trainer = model.trainer_spec.clone().unwrap_or_default();
    let normalizer = model.normalizer_spec.clone().unwrap_or_default();
    if trainer.model_type.unwrap_or(1) != 2 {
        return Err(unsupported("a Unigram (or word/char) SentencePiece model; only BPE ones are read"));
    }
    if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
        return Err(unsupported("whitespace as a suffix"));
    }
    // a rule other than identity comes as a compiled character map
    if normalizer.precompiled_charsmap.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported(&format!(
            "the Unicode normalization rule {:?}",
            normalizer.name.as_deref().unwrap_or("nmt_nfkc")
        )));
    }
    if normalizer.remove_extra_whitespaces.unwrap_or(true) {
        return Err(unsupported("removal of repeated spaces"));
    }
    if !trainer.byte_fallback.unwrap_or(false) {
        return Err(unsupported("no byte fallback (characters outside the vocabulary become <unk>)"));
    }
    if model.pieces.is_empty() {
        return Err(Error::Invalid(format!("{}: a SentencePiece model without pieces", path.display())));
    }
    let tokens: Vec<String> = model.pieces.iter().map(|p| p.piece.clone().unwrap_or_default()).collect();
    let scores: Vec<f32> = model.pieces.iter().map(|p| p.score.unwrap_or(0.0)).collect();
    let token_type: Vec<i64> = model.pieces.iter().map(|p| i64::from(p.kind.unwrap_or(1))).collect();
    // negative ids mean "none"
    let id = |v: Option<i32>, default: i32| {
        u32::try_from(v.unwrap_or(default)).ok().filter(|&i| (i as usize) < tokens.len())
    };
    Ok(GgufVocab {
        kind: VocabKind::SentencePiece { add_space_prefix: normalizer.add_dummy_prefix.unwrap_or(true) },
        merges: sentencepiece_merges(&tokens, &scores),
        bos: id(trainer.bos_id, 1),
        eos: id(trainer.eos_id, 2),
        pad: id(trainer.pad_id, -1),
        unk: id(trainer.unk_id, 0),
        add_bos,
        tokens,
        token_type,
    })
}
