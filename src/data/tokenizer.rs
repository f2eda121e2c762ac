//! A model's tokenizer as a fine-tuning run needs it: tokenizer.json (tokenizers crate), the
//! chat template and special tokens of tokenizer_config.json, and the end-of-sequence ids of
//! generation_config.json.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Token ids with the byte span of the text each one covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    /// The folder it was read from (or a label for one built in memory).
    pub source: PathBuf,
    /// The model's chat template: tokenizer_config.json `chat_template` (a string, or the entry
    /// named "default" of a list), else chat_template.jinja / chat_template.json.
    pub chat_template: Option<String>,
    /// Every named template of a list-valued `chat_template` (e.g. "default", "tool_use").
    pub named_chat_templates: BTreeMap<String, String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Ids that end a reply: `eos_token` and generation_config.json's `eos_token_id`(s).
    pub stop_token_ids: Vec<u32>,
    /// tokenizer_config.json `add_bos_token`, when given.
    pub add_bos_token: Option<bool>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.chat_template.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_token_ids", &self.stop_token_ids)
            .finish()
    }
}

/// The transformers call that writes a folder's tokenizer.json from its slow tokenizer.
pub const MAKE_TOKENIZER_JSON: &str = "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`";

/// What to do about a model folder without tokenizer.json, from what it has instead.
pub fn missing_tokenizer_hint(dir: &Path) -> String {
    let has = |name: &str| dir.join(name).is_file();
    if has("qwen.tiktoken") {
        "the folder has a tiktoken tokenizer (qwen.tiktoken), which is not read: use a checkpoint that ships \
         tokenizer.json (Qwen1.5 and later do)"
            .into()
    } else if has("vocab.json") {
        format!(
            "the folder has only a slow tokenizer (vocab.json, merges.txt): convert it once with transformers, \
             {MAKE_TOKENIZER_JSON}, which writes tokenizer.json"
        )
    } else {
        "download the model's tokenizer files (tokenizer.json, tokenizer_config.json) into the folder".into()
    }
}

impl ModelTokenizer {
    /// Reads tokenizer.json (or a SentencePiece tokenizer.model), tokenizer_config.json, chat_template.jinja /
    /// chat_template.json and generation_config.json (optional) from a model folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("{}: no such model folder", dir.display())));
        }
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let tok_path = dir.join("tokenizer.json");
        let sentencepiece_path = dir.join("tokenizer.model");
        let tokenizer = if tok_path.is_file() {
            Tokenizer::from_file(&tok_path).map_err(|e| {
                Error::Invalid(format!("{}: not a tokenizer the tokenizers library reads: {e}", tok_path.display()))
            })?
        } else if sentencepiece_path.is_file() {
            // LlamaTokenizer's default: a BOS before each sequence
            let add_bos = config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(Value::as_bool).unwrap_or(true);
            let (tokenizer, bos, eos) = crate::hub::sentencepiece::tokenizer_from_model(&sentencepiece_path, add_bos)?;
            // a config that names no BOS or EOS gets the model file's
            if let Some(fields) = config.get_or_insert_with(|| Value::Object(Default::default())).as_object_mut() {
                for (key, name) in [("bos_token", bos), ("eos_token", eos)] {
                    if let Some(name) = name {
                        fields.entry(key).or_insert(Value::String(name));
                    }
                }
            }
            tokenizer
        } else {
            return Err(Error::Invalid(format!(
                "{}: tokenizer.json is missing; {}",
                dir.display(),
                missing_tokenizer_hint(dir)
            )));
        };
        let mut tok = Self::from_parts(tokenizer, config.as_ref(), &config_path)?;
        tok.source = dir.to_path_buf();

        if tok.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            let json = dir.join("chat_template.json");
            if jinja.is_file() {
                tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
            } else if json.is_file() {
                let v = read_json(&json)?;
                let (default, named) = chat_templates(v.get("chat_template"), &json)?;
                tok.chat_template = default;
                tok.named_chat_templates = named;
            }
        }

        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen = read_json(&gen_path)?;
            match gen.get("eos_token_id") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let ids: Option<Vec<u32>> = match v {
                        Value::Array(a) => a.iter().map(as_u32).collect(),
                        v => as_u32(v).map(|id| vec![id]),
                    };
                    let ids = ids.ok_or_else(|| {
                        Error::bad_entry(
                            &gen_path,
                            "eos_token_id",
                            format!("must be a token id or a list of ids, found {v}"),
                        )
                    })?;
                    for id in ids {
                        if !tok.stop_token_ids.contains(&id) {
                            tok.stop_token_ids.push(id);
                        }
                    }
                    if tok.eos_token_id.is_none() {
                        tok.eos_token_id = tok.stop_token_ids.first().copied();
                        tok.eos_token = tok.eos_token_id.and_then(|id| tok.tokenizer.id_to_token(id));
                    }
                }
            }
        }
        Ok(tok)
    }

    /// A tokenizer with the settings of a tokenizer_config.json already parsed (`config_path`
    /// only names it in errors).
    pub fn from_parts(tokenizer: Tokenizer, config: Option<&Value>, config_path: &Path) -> Result<Self> {
        let empty = Value::Object(Default::default());
        let config = config.unwrap_or(&empty);
        let (chat_template, named_chat_templates) = chat_templates(config.get("chat_template"), config_path)?;
        let token = |key: &str| -> Result<Option<String>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(Error::bad_entry(config_path, key, "an object must have a string `content`")),
                },
                Some(v) => Err(Error::bad_entry(
                    config_path,
                    key,
                    format!("must be a string or {{\"content\": ...}}, found {v}"),
                )),
            }
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;
        let id_of = |name: &Option<String>, key: &str| -> Result<Option<u32>> {
            match name {
                None => Ok(None),
                Some(t) => tokenizer.token_to_id(t).map(Some).ok_or_else(|| {
                    Error::bad_entry(config_path, key, format!("the token {t:?} is not in tokenizer.json's vocabulary"))
                }),
            }
        };
        let bos_token_id = id_of(&bos_token, "bos_token")?;
        let eos_token_id = id_of(&eos_token, "eos_token")?;
        let add_bos_token = match config.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err(Error::bad_entry(config_path, "add_bos_token", format!("must be true or false, found {v}")))
            }
        };
        Ok(ModelTokenizer {
            tokenizer,
            source: config_path.parent().map(Path::to_path_buf).unwrap_or_default(),
            chat_template,
            named_chat_templates,
            bos_token,
            eos_token,
            bos_token_id,
            eos_token_id,
            stop_token_ids: eos_token_id.into_iter().collect(),
            add_bos_token,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Token ids and byte offsets of `text`. `add_special_tokens` applies the tokenizer's
    /// post-processor (e.g. LLaMA's leading `<s>`); rendered chat templates are encoded
    /// without it, as transformers' `apply_chat_template` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Invalid(format!("tokenizer of {}: cannot encode text: {e}", self.source.display())))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Invalid(format!("tokenizer of {}: cannot decode: {e}", self.source.display())))
    }

    /// Whether `id` ends a reply.
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_token_ids.contains(&id)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Invalid(format!(
            "{}:{}: not valid JSON ({e}); download or save the file again",
            path.display(),
            e.line()
        ))
    })
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// `chat_template` as a string, or a list of {name, template}: the default one and the named.
fn chat_templates(value: Option<&Value>, path: &Path) -> Result<(Option<String>, BTreeMap<String, String>)> {
    match value {
        None | Some(Value::Null) => Ok((None, BTreeMap::new())),
        Some(Value::String(s)) => Ok((Some(s.clone()), BTreeMap::new())),
        Some(Value::Array(list)) => {
            let mut named = BTreeMap::new();
            for (i, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(Error::bad_entry(
                        path,
                        format!("chat_template[{i}]"),
                        "each entry of a chat_template list needs string `name` and `template`",
                    ));
                };
                named.insert(name.to_string(), template.to_string());
            }
            // transformers uses the one named "default"; a list of one has no choice to make.
            let default = named.get("default").or(if named.len() == 1 { named.values().next() } else { None }).cloned();
            Ok((default, named))
        }
        Some(v) => Err(Error::bad_entry(
            path,
            "chat_template",
            format!("must be a string or a list of {{name, template}}, found {v}"),
        )),
    }
}
