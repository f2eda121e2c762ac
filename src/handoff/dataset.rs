//! The run's dataset as the other tool reads it: the records after our reading (Alpaca,
//! ShareGPT/chat and plain text all become what our templates render), split as our trainer
//! splits them, one JSON object a line:
//! - conversations as `{"messages": [{"role", "content"}, ...]}` (LLaMA-Factory: `sharegpt`
//!   formatting with OpenAI-style tags in data/dataset_info.json; axolotl: `type: chat_template`);
//! - plain-text documents as `{"text": ...}` (LLaMA-Factory: the `pt` stage with a `prompt`
//!   column; axolotl: `type: completion`).
//!
//! LLaMA-Factory's sharegpt converter silently drops a conversation whose turns do not alternate
//! user, assistant after one leading system message, or that does not end with the assistant;
//! our reader already refuses such a record (naming its file and line), so none is lost there.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::Tool;
use crate::data::{Content, DataConfig, Record};
use crate::error::{Error, Result};
use crate::weights::write_atomic;

/// The dataset names in LLaMA-Factory's dataset_info.json.
pub const TRAIN_NAME: &str = "qls_train";
pub const VALIDATION_NAME: &str = "qls_validation";
pub const TRAIN_FILE: &str = "data/train.jsonl";
pub const VALIDATION_FILE: &str = "data/validation.jsonl";

/// Conversations or plain text (a job trains on one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

#[derive(Debug, Clone)]
pub struct Converted {
    pub kind: Kind,
    pub train_records: usize,
    pub validation_records: usize,
    /// Records skipped while reading (skip_bad_records), with where and why.
    pub skipped: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// Reads and splits the dataset as a run does and writes it under `dir` for `tool`.
pub fn convert(config: &DataConfig, dir: &Path, tool: Tool) -> Result<Converted> {
    let split = crate::data::read_split(config)?;
    let kind = kind_of(split.train.iter().chain(&split.validation))?;
    let mut files = Vec::new();
    let write = |records: &[Record], name: &str, files: &mut Vec<PathBuf>| -> Result<()> {
        let path = dir.join(name);
        let mut text = String::new();
        for r in records {
            text.push_str(&record_json(r).to_string());
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())?;
        files.push(path);
        Ok(())
    };
    write(&split.train, TRAIN_FILE, &mut files)?;
    if !split.validation.is_empty() {
        write(&split.validation, VALIDATION_FILE, &mut files)?;
    } else if dir.join(VALIDATION_FILE).is_file() {
        // an earlier job's split in the same folder is not this run's
        let stale = dir.join(VALIDATION_FILE);
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    if tool == Tool::LlamaFactory {
        let path = dir.join("data/dataset_info.json");
        let info = dataset_info(kind, !split.validation.is_empty());
        write_atomic(
            &path,
            format!("{}\n", serde_json::to_string_pretty(&info).expect("JSON values serialise")).as_bytes(),
        )?;
        files.push(path);
    }
    Ok(Converted {
        kind,
        train_records: split.train.len(),
        validation_records: split.validation.len(),
        skipped: split.report.skipped.iter().map(|b| b.to_string()).collect(),
        files,
    })
}

fn kind_of<'a>(records: impl Iterator<Item = &'a Record>) -> Result<Kind> {
    let (mut chat, mut text): (Option<&Record>, Option<&Record>) = (None, None);
    for r in records {
        match r.content {
            Content::Chat(_) => chat = chat.or(Some(r)),
            Content::Text(_) => text = text.or(Some(r)),
        }
    }
    match (chat, text) {
        (Some(c), Some(t)) => Err(Error::Invalid(format!(
            "the dataset mixes conversations ({}) and plain text ({}); a job handed to another tool trains on one \
             kind: point [data] path at the conversations or at the text",
            c.location(),
            t.location()
        ))),
        (None, Some(_)) => Ok(Kind::Text),
        _ => Ok(Kind::Chat),
    }
}

fn record_json(r: &Record) -> Value {
    match &r.content {
        Content::Chat(messages) => json!({
            "messages": messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>()
        }),
        Content::Text(text) => json!({ "text": text }),
    }
}

/// The entries of LLaMA-Factory's data/dataset_info.json.
fn dataset_info(kind: Kind, validation: bool) -> Value {
    let entry = |file: &str| match kind {
        Kind::Chat => json!({
            "file_name": file.trim_start_matches("data/"),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system"
            }
        }),
        Kind::Text => json!({
            "file_name": file.trim_start_matches("data/"),
            "columns": {"prompt": "text"}
        }),
    };
    let mut info = serde_json::Map::new();
    info.insert(TRAIN_NAME.into(), entry(TRAIN_FILE));
    if validation {
        info.insert(VALIDATION_NAME.into(), entry(VALIDATION_FILE));
    }
    Value::Object(info)
}
