//! Reading dataset files into records: Alpaca and ShareGPT/chat (JSON array or JSON Lines) and
//! plain text. Every record remembers its file and line so that an error, or the report of a
//! skipped record, can point at it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::DataFormat;
use crate::error::{Error, Result};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation, as chat templates see it (`role`, `content`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into() }
    }
}

/// What a record holds: a conversation to render with a chat template, or a document trained
/// on as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Chat(Vec<Message>),
    Text(String),
}

/// One record of a dataset file and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub file: PathBuf,
    /// 1-based line where the record starts.
    pub line: usize,
    pub content: Content,
}

impl Record {
    pub fn location(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// A record that could not be used: where it is and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRecord {
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is the file as a whole (an empty file).
    pub line: usize,
    /// Index of the record in a JSON array (0-based); shown 1-based.
    pub record: Option<usize>,
    /// The field at fault (`output`, `conversations[2].value`), if one is.
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(i) = self.record {
            write!(f, " (record {})", i + 1)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl BadRecord {
    /// The error a run stops with when bad records are not skipped.
    pub fn into_error(self) -> Error {
        let what = if self.line == 0 { "file" } else { "record" };
        Error::Invalid(format!(
            "{self}. Fix the {what}, or set skip_bad_records = true in [data] to skip bad records (they are counted and listed in the data report)"
        ))
    }
}

/// The records of one file, and those it had to skip.
#[derive(Debug, Default)]
pub struct FileRecords {
    pub records: Vec<Record>,
    pub bad: Vec<BadRecord>,
}

/// File extensions read from a folder.
const DATA_EXTENSIONS: [&str; 5] = ["json", "jsonl", "txt", "text", "md"];

/// The files a dataset path stands for: the file itself, or every data file in the folder
/// (recursively, sorted, hidden files left out).
pub fn dataset_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the folder holds no dataset files (.json, .jsonl, .txt, .text, .md); put the data there or point `path` at a file",
            path.display()
        )));
    }
    Ok(files)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if extension(&path).is_some_and(|e| DATA_EXTENSIONS.contains(&e.as_str())) {
            out.push(path);
        }
    }
    Ok(())
}

fn extension(path: &Path) -> Option<String> {
    path.extension().map(|e| e.to_string_lossy().to_lowercase())
}

/// Reads one file in the given format (`Auto` detects it) and returns the format it used.
/// With `skip_bad` a bad record is listed in `bad` instead of stopping with an error.
pub fn read_file(path: &Path, format: DataFormat, skip_bad: bool) -> Result<(DataFormat, FileRecords)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = line_of(&String::from_utf8_lossy(&e.as_bytes()[..e.utf8_error().valid_up_to()]), usize::MAX);
        Error::Invalid(format!("{}:{}: the file is not UTF-8 text; save it as UTF-8", path.display(), line))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if text.trim().is_empty() {
        let bad = BadRecord {
            file: path.to_path_buf(),
            line: 0,
            record: None,
            field: None,
            reason: "the file is empty: it holds no records".into(),
        };
        if !skip_bad {
            return Err(bad.into_error());
        }
        let format = if format == DataFormat::Auto { DataFormat::Text } else { format };
        return Ok((format, FileRecords { records: Vec::new(), bad: vec![bad] }));
    }
    let format = match format {
        DataFormat::Auto => detect_format(path, text)?,
        f => f,
    };
    let mut out = FileRecords::default();
    match format {
        DataFormat::Text => read_text_blocks(path, text, &mut out),
        DataFormat::Alpaca | DataFormat::ShareGpt => {
            for raw in json_records(path, text)? {
                let parsed = match raw.value {
                    Ok(value) => match format {
                        DataFormat::Alpaca => parse_alpaca(&value),
                        _ => parse_chat(&value),
                    },
                    Err(reason) => Err(FieldError { field: None, reason }),
                };
                match parsed {
                    Ok(messages) => {
                        out.records.push(Record { file: path.into(), line: raw.line, content: Content::Chat(messages) })
                    }
                    Err(e) => {
                        let bad = BadRecord {
                            file: path.into(),
                            line: raw.line,
                            record: raw.index,
                            field: e.field,
                            reason: e.reason,
                        };
                        if !skip_bad {
                            return Err(bad.into_error());
                        }
                        out.bad.push(bad);
                    }
                }
            }
        }
        DataFormat::Auto => unreachable!("detected above"),
    }
    Ok((format, out))
}

/// The format of a file from its extension and, for JSON, the keys of its first record.
pub fn detect_format(path: &Path, text: &str) -> Result<DataFormat> {
    match extension(path).as_deref() {
        Some("txt" | "text" | "md") => return Ok(DataFormat::Text),
        Some("json" | "jsonl") => {}
        other => {
            let first = text.trim_start().chars().next();
            if !matches!(first, Some('[' | '{')) {
                return Err(Error::Invalid(format!(
                    "{}: cannot tell the dataset format from the extension {}; name JSON data .json or .jsonl and                      plain text .txt, or set `format` in [data]",
                    path.display(),
                    other.map_or("(none)".to_string(), |e| format!(".{e}"))
                )));
            }
        }
    }
    let first = json_records(path, text)?.into_iter().find_map(|r| r.value.ok().map(|v| (r.line, v)));
    let Some((line, value)) = first else {
        return Err(Error::Invalid(format!(
            "{}: no record parses as JSON, so its format cannot be detected; fix the file or set `format` in [data]",
            path.display()
        )));
    };
    if value.get("conversations").is_some() || value.get("messages").is_some() {
        Ok(DataFormat::ShareGpt)
    } else if value.get("instruction").is_some() || value.get("output").is_some() {
        Ok(DataFormat::Alpaca)
    } else {
        let keys: Vec<String> = match &value {
            Value::Object(map) => map.keys().map(|k| format!("`{k}`")).collect(),
            _ => vec![],
        };
        Err(Error::Invalid(format!(
            "{}:{}: cannot tell the dataset format: the first record has {}; Alpaca records have `instruction` and `output`, \
             chat records `conversations` (from/value) or `messages` (role/content); rename the fields or set `format` in [data]",
            path.display(),
            line,
            if keys.is_empty() { "no fields".to_string() } else { format!("the fields {}", keys.join(", ")) }
        )))
    }
}

/// Plain text: one document per block of lines separated by blank lines.
fn read_text_blocks(path: &Path, text: &str, out: &mut FileRecords) {
    let mut block: Vec<&str> = Vec::new();
    let mut start = 0;
    let flush = |block: &mut Vec<&str>, start: usize, out: &mut FileRecords| {
        if !block.is_empty() {
            out.records.push(Record { file: path.into(), line: start, content: Content::Text(block.join("\n")) });
            block.clear();
        }
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            flush(&mut block, start, out);
        } else {
            if block.is_empty() {
                start = i + 1;
            }
            block.push(line.trim_end_matches('\r'));
        }
    }
    flush(&mut block, start, out);
}

/// One JSON record before interpretation: its position and value, or why it is not JSON.
struct RawRecord {
    /// Index in a JSON array (in JSON Lines the line says it all).
    index: Option<usize>,
    line: usize,
    value: std::result::Result<Value, String>,
}

/// The records of a JSON array file, or of a JSON Lines file (one object per line).
fn json_records(path: &Path, text: &str) -> Result<Vec<RawRecord>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let offset = text.len() - trimmed.len();
        let spans = array_element_spans(trimmed).map_err(|(at, why)| {
            Error::Invalid(format!(
                "{}:{}: the JSON array is malformed ({why}); fix the file (a JSON validator shows where)",
                path.display(),
                line_of(text, offset + at)
            ))
        })?;
        Ok(spans
            .into_iter()
            .enumerate()
            .map(|(index, (start, end))| {
                let slice = &trimmed[start..end];
                RawRecord {
                    index: Some(index),
                    line: line_of(text, offset + start),
                    value: serde_json::from_str(slice).map_err(|e| {
                        format!(
                            "not valid JSON ({}, at line {} column {} of the record); fix the record",
                            strip_position(&e.to_string()),
                            e.line(),
                            e.column()
                        )
                    }),
                }
            })
            .collect())
    } else {
        // A pretty-printed single object reads as many broken lines; say what it is instead.
        if text.trim().lines().count() > 1 && serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()) {
            return Err(Error::Invalid(format!(
                "{}:1: the file is one JSON object spread over several lines; a dataset is a JSON array of records \
                 ([{{...}}, {{...}}]) or JSON Lines (one record per line)",
                path.display()
            )));
        }
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| RawRecord {
                index: None,
                line: i + 1,
                value: serde_json::from_str(l).map_err(|e| {
                    format!(
                        "not valid JSON ({}, at column {}); each line of a JSON Lines file must be one complete JSON object",
                        strip_position(&e.to_string()),
                        e.column()
                    )
                }),
            })
            .collect())
    }
}

/// serde_json appends " at line L column C"; we say where ourselves.
fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Byte spans of the top-level elements of a JSON array, found by tracking strings and
/// nesting only, so that one malformed element can be reported (or skipped) on its own.
fn array_element_spans(text: &str) -> std::result::Result<Vec<(usize, usize)>, (usize, String)> {
    let bytes = text.as_bytes();
    debug_assert_eq!(bytes.first(), Some(&b'['));
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut start: Option<usize> = None;
    let mut closed_at = None;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
            }
            b'[' | b'{' => {
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
                depth += 1;
            }
            b']' | b'}' => {
                if depth == 0 {
                    return Err((i, format!("unexpected `{}`", b as char)));
                }
                depth -= 1;
                if depth == 0 {
                    if let Some(s) = start.take() {
                        spans.push((s, i));
                    }
                    closed_at = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => match start.take() {
                Some(s) => spans.push((s, i)),
                None => return Err((i, "an empty element between commas".into())),
            },
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
            }
        }
    }
    let Some(end) = closed_at else {
        let why = if in_string { "a string is not closed" } else { "the array is not closed with `]`" };
        return Err((text.len(), why.into()));
    };
    if let Some(extra) = text[end + 1..].find(|c: char| !c.is_whitespace()) {
        return Err((end + 1 + extra, "text after the closing `]`".into()));
    }
    // Trim the whitespace before each separating comma.
    Ok(spans.into_iter().map(|(s, e)| (s, s + text[s..e].trim_end().len())).collect())
}

/// Why a record's content is unusable, and which field.
struct FieldError {
    field: Option<String>,
    reason: String,
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError { field: Some(field.into()), reason: reason.into() }
}

/// A string field: `None` when absent or null, an error when of another type.
fn opt_string(obj: &Value, key: &str) -> std::result::Result<Option<String>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(field_err(key, format!("must be a string, found {}", json_kind(other)))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Alpaca: `instruction`, optional `input`, `output`, optional `system` and `history`
/// (a list of [instruction, response] pairs before this one).
fn parse_alpaca(value: &Value) -> std::result::Result<Vec<Message>, FieldError> {
    if !value.is_object() {
        return Err(FieldError {
            field: None,
            reason: format!("an Alpaca record must be a JSON object, found {}", json_kind(value)),
        });
    }
    let instruction = opt_string(value, "instruction")?.unwrap_or_default();
    let input = opt_string(value, "input")?.unwrap_or_default();
    let output = opt_string(value, "output")?
        .ok_or_else(|| field_err("output", "missing; every Alpaca record needs `instruction` and `output` strings"))?;
    if value.get("instruction").is_none() {
        return Err(field_err("instruction", "missing; every Alpaca record needs `instruction` and `output` strings"));
    }
    if instruction.trim().is_empty() && input.trim().is_empty() {
        return Err(field_err("instruction", "is empty (and so is `input`): there is no prompt"));
    }
    if output.trim().is_empty() {
        return Err(field_err("output", "is empty: there is no response to train on"));
    }
    let mut messages = Vec::new();
    if let Some(system) = opt_string(value, "system")?.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    match value.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            for (i, turn) in turns.iter().enumerate() {
                let pair = turn.as_array().filter(|p| p.len() == 2);
                let strings = pair.and_then(|p| Some((p[0].as_str()?, p[1].as_str()?)));
                let Some((q, a)) = strings else {
                    return Err(field_err(
                        format!("history[{i}]"),
                        "must be a pair of strings [instruction, response]",
                    ));
                };
                messages.push(Message::new(Role::User, q));
                messages.push(Message::new(Role::Assistant, a));
            }
        }
        Some(other) => {
            return Err(field_err(
                "history",
                format!("must be a list of [instruction, response] pairs, found {}", json_kind(other)),
            ))
        }
    }
    let prompt = match (instruction.trim().is_empty(), input.trim().is_empty()) {
        (false, false) => format!("{instruction}\n\n{input}"),
        (false, true) => instruction,
        _ => input,
    };
    messages.push(Message::new(Role::User, prompt));
    messages.push(Message::new(Role::Assistant, output));
    Ok(messages)
}

/// ShareGPT (`conversations`: from/value) or OpenAI-style chat (`messages`: role/content),
/// with an optional top-level `system`.
fn parse_chat(value: &Value) -> std::result::Result<Vec<Message>, FieldError> {
    let (key, role_key, content_key) = if value.get("conversations").is_some() {
        ("conversations", "from", "value")
    } else if value.get("messages").is_some() {
        ("messages", "role", "content")
    } else {
        return Err(FieldError {
            field: Some("conversations".into()),
            reason: "missing; a chat record needs `conversations` (a list of {from, value}) or `messages` (a list of {role, content})".into(),
        });
    };
    let Some(list) = value[key].as_array() else {
        return Err(field_err(key, format!("must be a list of messages, found {}", json_kind(&value[key]))));
    };
    let mut messages = Vec::new();
    if let Some(system) = opt_string(value, "system")?.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    for (i, m) in list.iter().enumerate() {
        let role_name = match m.get(role_key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(field_err(
                    format!("{key}[{i}].{role_key}"),
                    format!("must be a string, found {}", json_kind(other)),
                ))
            }
            None => return Err(field_err(format!("{key}[{i}].{role_key}"), "missing")),
        };
        let role = match role_name.to_lowercase().as_str() {
            "system" => Role::System,
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "model" | "chatgpt" | "bot" => Role::Assistant,
            other => {
                return Err(field_err(
                    format!("{key}[{i}].{role_key}"),
                    format!("unknown speaker {other:?}; use human/gpt/system (or user/assistant/system)"),
                ))
            }
        };
        let content = match m.get(content_key) {
            Some(Value::String(s)) => s.clone(),
            // OpenAI content parts: [{"type": "text", "text": ...}]
            Some(Value::Array(parts)) => {
                let texts: Option<Vec<&str>> = parts
                    .iter()
                    .map(|p| {
                        if p.get("type").and_then(Value::as_str) == Some("text") {
                            p.get("text")?.as_str()
                        } else {
                            None
                        }
                    })
                    .collect();
                texts.map(|t| t.concat()).ok_or_else(|| {
                    field_err(
                        format!("{key}[{i}].{content_key}"),
                        "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    )
                })?
            }
            Some(other) => {
                return Err(field_err(
                    format!("{key}[{i}].{content_key}"),
                    format!("must be a string, found {}", json_kind(other)),
                ))
            }
            None => return Err(field_err(format!("{key}[{i}].{content_key}"), "missing")),
        };
        messages.push(Message { role, content });
    }
    check_turns(&messages, key, messages.len() - list.len())?;
    Ok(messages)
}

/// Chat templates expect: an optional system message first, then user and assistant turns in
/// alternation, ending with the assistant (whose reply is what is trained).
fn check_turns(messages: &[Message], key: &str, offset: usize) -> std::result::Result<(), FieldError> {
    let field = |i: usize| format!("{key}[{}]", i - offset.min(i));
    let mut expect = Role::User;
    let mut turns = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role == Role::System {
            if i != 0 {
                return Err(field_err(field(i), "a system message may only come first"));
            }
            continue;
        }
        if m.role != expect {
            return Err(field_err(
                field(i),
                format!(
                    "expected a {} message here: turns must alternate user, assistant, user, ... starting with the user",
                    expect.as_str()
                ),
            ));
        }
        expect = if expect == Role::User { Role::Assistant } else { Role::User };
        turns += 1;
    }
    if turns == 0 {
        return Err(field_err(key, "has no user or assistant messages"));
    }
    if expect == Role::Assistant {
        return Err(field_err(
            field(messages.len() - 1),
            "the conversation ends with a user message; it must end with the assistant's reply, which is what is trained",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_spans_find_elements_and_lines() {
        let text = "[\n  {\"a\": \"x,]\"},\n  {\"b\": [1, 2]}\n]\n";
        let spans = array_element_spans(text).unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(&text[spans[0].0..spans[0].1], "{\"a\": \"x,]\"}");
        assert_eq!(&text[spans[1].0..spans[1].1], "{\"b\": [1, 2]}");
        assert_eq!(line_of(text, spans[1].0), 3);
        assert!(array_element_spans("[{\"a\": 1}").is_err());
        assert!(array_element_spans("[{\"a\": 1},,{}]").is_err());
        assert!(array_element_spans("[] x").is_err());
        assert_eq!(array_element_spans("[ ]").unwrap(), vec![]);
    }

    #[test]
    fn alpaca_with_history_and_system() {
        let v: Value = serde_json::json!({
            "instruction": "Add", "input": "2+2", "output": "4", "system": "Be brief.",
            "history": [["Hi", "Hello"]]
        });
        let m = parse_alpaca(&v).ok().unwrap();
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User, Role::Assistant]);
        assert_eq!(m[3].content, "Add\n\n2+2");
        let bad = parse_alpaca(&serde_json::json!({"instruction": "x", "history": [["a"]], "output": "y"}));
        assert_eq!(bad.err().unwrap().field.as_deref(), Some("history[0]"));
    }

    #[test]
    fn chat_turn_order_is_checked() {
        let v = serde_json::json!({"messages": [
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
        assert_eq!(parse_chat(&v).err().unwrap().field.as_deref(), Some("messages[1]"));
        let v = serde_json::json!({"conversations": [{"from": "human", "value": "a"}]});
        assert!(parse_chat(&v).err().unwrap().reason.contains("ends with a user message"));
        let v = serde_json::json!({"system": "s", "conversations": [
            {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}]});
        assert_eq!(parse_chat(&v).err().unwrap().field.as_deref(), Some("conversations[2]"));
    }
}
