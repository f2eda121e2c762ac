//! Datasets: formats (Alpaca, ShareGPT/chat, plain text), chat templates, tokenization,
//! truncation and packing, loss masks and the validation split.
//!
//! [`prepare`] turns the `[data]` table of a run config ([`DataConfig`]) and the model's
//! tokenizer ([`ModelTokenizer`]) into training and validation [`Example`]s and a
//! [`DataReport`]; [`preview`] shows the first examples as the trainer will see them.
//!
//! Formats, detected per file (`format = "auto"`) or forced:
//! - Alpaca: objects with `instruction`, optional `input`, `output`, optional `system` and
//!   `history` ([[instruction, response], ...]), as a JSON array or JSON Lines.
//! - ShareGPT / chat: `conversations` of {from: human|gpt|system, value} or `messages` of
//!   {role: user|assistant|system, content}, optional top-level `system`.
//! - Plain text (.txt, .text, .md): one document per block of lines separated by a blank line;
//!   every token of a document is trained.
//!
//! A folder stands for every such file in it and its subfolders, in sorted order.
//!
//! The `[data]` table of a run config (every key optional but `path`):
//!
//! ```toml
//! [data]
//! path = "data/train.jsonl"   # a file or a folder
//! format = "auto"             # auto | alpaca | sharegpt | text
//! template = "auto"           # auto | model | model:NAME | default | alpaca | chatml | qwen | llama2 | ...
//! max_length = 1024
//! packing = false
//! train_on_prompt = false     # loss on the assistant's replies only
//! validation = 0.05           # a fraction of the records, or a file: "data/val.jsonl"
//! skip_bad_records = false
//! seed = 42
//! ```
//!
//! The loss mask: a conversation is rendered with the template, the byte ranges of the
//! assistant replies are found by rendering it reply by reply, and the rendered text is
//! tokenized once; tokens overlapping a reply (with what the template closes it with, e.g.
//! `<|im_end|>`) are trained, the rest get label -100. When the last reply holds no stop
//! token, the EOS is appended and trained.

mod encode;
mod records;
mod template;
mod tokenizer;

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use encode::{pack, Example, LengthBucket, LengthStats, PackItem, IGNORE};
pub use records::{dataset_files, read_file, BadRecord, Content, FileRecords, Message, Record, Role};
pub use template::{
    check_template, family_template_name, named_template, named_templates, ollama_template_for, ChatTemplate,
    NamedTemplate, TemplateCheck, TemplateChoice, TemplateOrigin,
};
pub use tokenizer::{missing_tokenizer_hint, Encoded, ModelTokenizer, MAKE_TOKENIZER_JSON};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The format of a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Detected per file from its extension and first record.
    #[default]
    Auto,
    Alpaca,
    #[serde(alias = "chat", alias = "share_gpt")]
    ShareGpt,
    #[serde(alias = "txt", alias = "plain")]
    Text,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::ShareGpt => "sharegpt",
            DataFormat::Text => "text",
        })
    }
}

/// The validation set: a fraction of the records (drawn with `seed`), or a file of its own.
/// In TOML: `validation = 0.05` or `validation = "data/val.jsonl"`; 0 means none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Validation {
    Fraction(f64),
    File(PathBuf),
}

impl Default for Validation {
    fn default() -> Self {
        Validation::Fraction(0.0)
    }
}

/// The `[data]` table of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A dataset file, or a folder of them.
    pub path: PathBuf,
    pub format: DataFormat,
    /// `auto`, `model` or a template name (see assets/chat_templates.toml).
    pub template: TemplateChoice,
    /// Examples are cut to this many tokens (and packed up to it).
    pub max_length: usize,
    /// Several examples in one sequence up to max_length.
    pub packing: bool,
    /// Train on the prompt tokens too; by default only the assistant's replies count.
    pub train_on_prompt: bool,
    pub validation: Validation,
    /// Skip records that cannot be used (listed in the report) instead of stopping.
    pub skip_bad_records: bool,
    /// Seed of the validation split.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: PathBuf::new(),
            format: DataFormat::Auto,
            template: TemplateChoice::Auto,
            max_length: 1024,
            packing: false,
            train_on_prompt: false,
            validation: Validation::default(),
            skip_bad_records: false,
            seed: 42,
        }
    }
}

/// Longest sequence accepted; longer is certainly a typo (and would not fit in memory).
const MAX_LENGTH_LIMIT: usize = 1 << 20;

impl DataConfig {
    /// Makes relative paths (the dataset, a validation file) relative to `base`, the folder of
    /// the run config they were written in.
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.path.is_relative() && !self.path.as_os_str().is_empty() {
            self.path = base.join(&self.path);
        }
        if let Validation::File(p) = &mut self.validation {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the settings without reading any file.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::Invalid(
                "[data] path is not set: name the dataset file or folder (e.g. path = \"data/train.jsonl\")".into(),
            ));
        }
        if self.max_length < 2 || self.max_length > MAX_LENGTH_LIMIT {
            return Err(Error::Invalid(format!(
                "[data] max_length = {} is out of range: use 2 to {MAX_LENGTH_LIMIT} tokens (typical: 512 to 4096)",
                self.max_length
            )));
        }
        match &self.validation {
            Validation::Fraction(f) if !(0.0..1.0).contains(f) || f.is_nan() => {
                return Err(Error::Invalid(format!(
                    "[data] validation = {f} is not a fraction in [0, 1): use e.g. 0.05 for 5% of the records, 0 for none, or a file path"
                )));
            }
            Validation::File(p) if p.as_os_str().is_empty() => {
                return Err(Error::Invalid(
                    "[data] validation is an empty path: name a file or give a fraction".into(),
                ));
            }
            Validation::File(p) if p == &self.path => {
                return Err(Error::Invalid(format!(
                    "[data] validation names the training data itself ({}): use a separate file or a fraction",
                    p.display()
                )));
            }
            _ => {}
        }
        if let TemplateChoice::Named(name) = &self.template {
            if named_template(name).is_none() {
                let names: Vec<&str> = named_templates().iter().map(|t| t.name.as_str()).collect();
                return Err(Error::Invalid(format!(
                    "[data] template = {name:?} is not a known template; use \"auto\", \"model\" or one of: {}",
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// A dataset file and what was read from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSummary {
    pub path: PathBuf,
    pub format: DataFormat,
    pub records: usize,
}

/// What preparing the data did, for the log, the GUI and the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    pub files: Vec<FileSummary>,
    /// The format(s) read, e.g. "alpaca" or "alpaca + sharegpt".
    pub format: String,
    /// The chat template used (`model` for the model's own); None when no record needed one.
    pub template: Option<String>,
    pub template_check: Option<TemplateCheck>,
    /// Records read from the files (bad records not counted), and how they were split; records
    /// the template could not render are then listed in `skipped` too.
    pub records: usize,
    pub train_records: usize,
    pub validation_records: usize,
    /// Sequences after packing (equal to the record counts without packing).
    pub train_examples: usize,
    pub validation_examples: usize,
    /// Records that could not be used (only with skip_bad_records; otherwise they stop the run).
    pub skipped: Vec<BadRecord>,
    /// Conversations cut to max_length, and the tokens the cuts dropped (those of records left
    /// out entirely included).
    pub truncated: usize,
    pub dropped_tokens: usize,
    /// Plain-text documents longer than max_length, split into blocks (without packing) or
    /// flowing across packed sequences: nothing of them is dropped.
    pub split_documents: usize,
    /// Records left out because the cut removed every trained token (the reply begins after
    /// max_length).
    pub cut_entirely: Vec<BadRecord>,
    pub train_tokens: usize,
    /// Tokens whose label is trained (not -100).
    pub trained_tokens: usize,
    /// Token lengths of all records (train and validation) before cutting.
    pub lengths: LengthStats,
    /// The longest training sequence: the trainer pads each micro-batch to its longest
    /// sequence, so this sets the largest micro-batch the run sees (and the memory it needs).
    pub longest: Longest,
}

/// The longest training sequence and where it comes from (file:line, or packed sequences).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Longest {
    pub tokens: usize,
    pub source: String,
}

/// The data a run trains on.
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub report: DataReport,
}

/// Records read from a dataset path, with per-file summaries and skipped records.
struct ReadSet {
    records: Vec<Record>,
    files: Vec<FileSummary>,
    skipped: Vec<BadRecord>,
}

fn read_set(path: &Path, format: DataFormat, skip_bad: bool) -> Result<ReadSet> {
    let mut set = ReadSet { records: Vec::new(), files: Vec::new(), skipped: Vec::new() };
    for file in dataset_files(path)? {
        let (format, mut got) = read_file(&file, format, skip_bad)?;
        set.files.push(FileSummary { path: file, format, records: got.records.len() });
        set.records.append(&mut got.records);
        set.skipped.append(&mut got.bad);
    }
    if set.records.is_empty() {
        let skipped = if set.skipped.is_empty() {
            String::new()
        } else {
            format!(
                " ({} bad records skipped, the first: {})",
                set.skipped.len(),
                set.skipped.first().map(|b| b.to_string()).unwrap_or_default()
            )
        };
        return Err(Error::Invalid(format!(
            "{}: the dataset has no usable records{skipped}; add records in Alpaca, ShareGPT/chat or plain-text form",
            path.display()
        )));
    }
    Ok(set)
}

fn format_summary(files: &[FileSummary]) -> String {
    let mut formats: Vec<String> = Vec::new();
    for f in files {
        let name = f.format.to_string();
        if !formats.contains(&name) {
            formats.push(name);
        }
    }
    formats.join(" + ")
}

/// The template for the records, when any is a conversation.
fn template_for<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    config: &DataConfig,
    tokenizer: &ModelTokenizer,
    family_id: Option<&str>,
) -> Result<Option<ChatTemplate>> {
    if records.into_iter().all(|r| matches!(r.content, Content::Text(_))) {
        return Ok(None);
    }
    ChatTemplate::resolve(&config.template, tokenizer, family_id).map(Some)
}

/// Indices of the validation records for a fraction split: a seeded shuffle, so the same seed
/// always holds out the same records.
fn validation_indices(n: usize, fraction: f64, seed: u64, path: &Path) -> Result<Vec<usize>> {
    if fraction <= 0.0 {
        return Ok(Vec::new());
    }
    let n_val = ((n as f64 * fraction).round() as usize).max(1);
    if n_val >= n {
        return Err(Error::Invalid(format!(
            "{}: {n} records are too few to hold out {:.0}% for validation and still train; \
             lower [data] validation or give a separate file",
            path.display(),
            fraction * 100.0
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut val = order[..n_val].to_vec();
    val.sort_unstable();
    Ok(val)
}

/// Tokenizes records and brings them to max_length: a conversation is cut (its start kept), a
/// plain-text document is split into blocks, or left whole for `pack` to cut when packing.
/// Notes what was cut and how much.
fn encode_all(
    records: &[Record],
    template: Option<&ChatTemplate>,
    tokenizer: &ModelTokenizer,
    config: &DataConfig,
    report: &mut DataReport,
    lengths: &mut Vec<usize>,
) -> Result<Vec<PackItem>> {
    // Tokenizing is the slow part of a large dataset; the first error in file order is reported.
    let tokenized: Vec<std::result::Result<encode::Tokenized, BadRecord>> = records
        .par_iter()
        .map(|record| encode::tokenize_record(record, template, tokenizer, config.train_on_prompt))
        .collect();
    let mut out = Vec::with_capacity(records.len());
    for (record, tokenized) in records.iter().zip(tokenized) {
        let mut example = match tokenized {
            Ok(t) => t.example,
            Err(bad) if config.skip_bad_records => {
                report.skipped.push(bad);
                continue;
            }
            Err(bad) => return Err(bad.into_error()),
        };
        lengths.push(example.len());
        if matches!(record.content, Content::Text(_)) {
            if example.len() > config.max_length {
                report.split_documents += 1;
            }
            if config.packing {
                out.push(PackItem { example, document: true, location: record.location() });
            } else {
                let blocks = encode::split_into_blocks(example, config.max_length);
                out.extend(blocks.into_iter().map(|example| PackItem {
                    example,
                    document: true,
                    location: record.location(),
                }));
            }
            continue;
        }
        let prompt_tokens = example.labels.iter().take_while(|&&l| l == IGNORE).count();
        let full_length = example.len();
        if encode::truncate(&mut example, config.max_length) {
            report.truncated += 1;
            report.dropped_tokens += full_length - example.len();
            if example.trained_tokens() == 0 {
                report.dropped_tokens += example.len();
                report.cut_entirely.push(BadRecord {
                    file: record.file.clone(),
                    line: record.line,
                    record: None,
                    field: None,
                    reason: format!(
                        "its prompt has {prompt_tokens} tokens, so max_length = {} cuts the whole reply; raise max_length or shorten the prompt",
                        config.max_length
                    ),
                });
                continue;
            }
        }
        out.push(PackItem { example, document: false, location: record.location() });
    }
    Ok(out)
}

/// The records of a dataset split into training and validation as a run splits them (the same
/// seeded draw of a fraction, or a file of its own), before any template or tokenizer: what a
/// job handed to another tool trains on.
#[derive(Debug, Clone)]
pub struct SplitRecords {
    pub train: Vec<Record>,
    pub validation: Vec<Record>,
    /// The files read, the formats detected and the records skipped (with skip_bad_records).
    pub report: DataReport,
}

/// Reads the dataset and splits it as `prepare` does.
pub fn read_split(config: &DataConfig) -> Result<SplitRecords> {
    config.validate()?;
    let set = read_set(&config.path, config.format, config.skip_bad_records)?;
    let mut report = DataReport {
        format: format_summary(&set.files),
        files: set.files,
        skipped: set.skipped,
        records: set.records.len(),
        ..Default::default()
    };
    let (train, validation) = split_set(set.records, config, &mut report)?;
    report.train_records = train.len();
    report.validation_records = validation.len();
    Ok(SplitRecords { train, validation, report })
}

/// Training and validation records: a seeded fraction of `records`, or the validation file.
fn split_set(records: Vec<Record>, config: &DataConfig, report: &mut DataReport) -> Result<(Vec<Record>, Vec<Record>)> {
    Ok(match &config.validation {
        Validation::Fraction(f) => {
            let val = validation_indices(records.len(), *f, config.seed, &config.path)?;
            let mut train = Vec::new();
            let mut validation = Vec::new();
            for (i, r) in records.into_iter().enumerate() {
                if val.binary_search(&i).is_ok() {
                    validation.push(r);
                } else {
                    train.push(r);
                }
            }
            (train, validation)
        }
        Validation::File(path) => {
            let val = read_set(path, config.format, config.skip_bad_records)?;
            report.files.extend(val.files);
            report.skipped.extend(val.skipped);
            (records, val.records)
        }
    })
}

/// Reads, templates, tokenizes, cuts, splits and (optionally) packs the dataset.
/// `family_id` is the model's row of the architecture table, which picks the template when the
/// model has none of its own.
pub fn prepare(config: &DataConfig, tokenizer: &ModelTokenizer, family_id: Option<&str>) -> Result<PreparedData> {
    let SplitRecords { train: train_records, validation: validation_records, mut report } = read_split(config)?;
    let template = template_for(train_records.iter().chain(&validation_records), config, tokenizer, family_id)?;
    if let Some(t) = &template {
        report.template = Some(t.name.clone());
        report.template_check = Some(check_template(t, tokenizer, family_id));
    }

    let mut lengths = Vec::new();
    let train = encode_all(&train_records, template.as_ref(), tokenizer, config, &mut report, &mut lengths)?;
    let validation = encode_all(&validation_records, template.as_ref(), tokenizer, config, &mut report, &mut lengths)?;
    if train.is_empty() {
        let first = report.skipped.first().or(report.cut_entirely.first()).map(|b| b.to_string()).unwrap_or_default();
        return Err(Error::Invalid(format!(
            "{}: no training example is left: {} records skipped, {} cut away entirely by max_length = {}; the first: {first}",
            config.path.display(),
            report.skipped.len(),
            report.cut_entirely.len(),
            config.max_length
        )));
    }
    let longest_record = match config.packing {
        true => None,
        false => train.iter().max_by_key(|i| i.example.len()).map(|i| i.location.clone()),
    };
    let (train, validation) = if config.packing {
        (pack(train, config.max_length), pack(validation, config.max_length))
    } else {
        let examples = |items: Vec<PackItem>| items.into_iter().map(|e| e.example).collect::<Vec<_>>();
        (examples(train), examples(validation))
    };
    report.longest = Longest {
        tokens: train.iter().map(Example::len).max().unwrap_or(0),
        source: longest_record.unwrap_or_else(|| "packed sequences".into()),
    };
    report.train_examples = train.len();
    report.validation_examples = validation.len();
    report.train_tokens = train.iter().map(Example::len).sum();
    report.trained_tokens = train.iter().map(Example::trained_tokens).sum();
    report.lengths = LengthStats::from_lengths(&lengths, config.max_length);
    Ok(PreparedData { train, validation, report })
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data: {} records in {} file(s), format {}", self.records, self.files.len(), self.format)?;
        if let Some(t) = &self.template {
            writeln!(f, "template: {t}")?;
        }
        if let Some(w) = self.template_check.as_ref().and_then(|c| c.warning.as_ref()) {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(
            f,
            "split: {} train / {} validation records; {} train / {} validation sequences",
            self.train_records, self.validation_records, self.train_examples, self.validation_examples
        )?;
        writeln!(f, "tokens: {} in training sequences, {} trained", self.train_tokens, self.trained_tokens)?;
        writeln!(f, "longest training sequence: {} tokens ({})", self.longest.tokens, self.longest.source)?;
        let l = &self.lengths;
        writeln!(
            f,
            "lengths: min {} / median {} / p90 {} / max {} tokens; {} of {} longer than max_length {}",
            l.min, l.p50, l.p90, l.max, l.over_max_length, l.count, l.max_length
        )?;
        if self.truncated > 0 {
            writeln!(f, "cut: {} conversations, {} tokens dropped", self.truncated, self.dropped_tokens)?;
        }
        if self.split_documents > 0 {
            writeln!(f, "split: {} text documents into max_length blocks, no token dropped", self.split_documents)?;
        }
        for c in &self.cut_entirely {
            writeln!(f, "left out (reply cut away): {c}")?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "skipped {} bad record(s):", self.skipped.len())?;
            for b in &self.skipped {
                writeln!(f, "  {b}")?;
            }
        }
        Ok(())
    }
}

/// A run of text in a previewed example: prompt (not trained), trained, or cut off by
/// max_length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
    /// Beyond max_length: the trainer never sees it.
    pub cut: bool,
}

/// One example as the trainer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewExample {
    /// file:line of the record.
    pub source: String,
    pub segments: Vec<Segment>,
    /// Tokens before cutting, and trained tokens after it.
    pub tokens: usize,
    pub trained_tokens: usize,
    /// A conversation cut at max_length (the rest is dropped).
    pub truncated: bool,
    /// Sequences a plain-text document becomes without packing (more than 1 when it is longer
    /// than max_length: it is split, nothing dropped); 1 for a conversation.
    pub blocks: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    pub examples: Vec<PreviewExample>,
    pub template: Option<String>,
    pub template_check: Option<TemplateCheck>,
    pub format: String,
    pub records: usize,
    pub max_length: usize,
    /// Lengths of every record before cutting; `over_max_length` is how many are longer than
    /// max_length.
    pub lengths: LengthStats,
    /// Of those: conversations cut (and the tokens the cuts drop), and plain-text documents
    /// split into blocks (nothing dropped).
    pub truncated: usize,
    pub dropped_tokens: usize,
    pub split_documents: usize,
    pub skipped: Vec<BadRecord>,
    /// The dataset prepared as the trainer prepares it (split, cut, packed), for the memory
    /// estimate's largest micro-batch; None when it cannot be (the run would say why).
    pub prepared: Option<DataReport>,
}

/// The first `n` records rendered with the template, split into prompt and trained text, and
/// the length distribution of the whole dataset (validation file included).
pub fn preview(config: &DataConfig, tokenizer: &ModelTokenizer, family_id: Option<&str>, n: usize) -> Result<Preview> {
    config.validate()?;
    let mut set = read_set(&config.path, config.format, config.skip_bad_records)?;
    if let Validation::File(path) = &config.validation {
        let mut val = read_set(path, config.format, config.skip_bad_records)?;
        set.records.append(&mut val.records);
        set.files.append(&mut val.files);
        set.skipped.append(&mut val.skipped);
    }
    let template = template_for(&set.records, config, tokenizer, family_id)?;
    let mut lengths = Vec::with_capacity(set.records.len());
    let (mut truncated, mut dropped_tokens, mut split_documents) = (0, 0, 0);
    let mut examples = Vec::new();
    for record in &set.records {
        let tokenized = match encode::tokenize_record(record, template.as_ref(), tokenizer, config.train_on_prompt) {
            Ok(t) => t,
            Err(bad) if config.skip_bad_records => {
                set.skipped.push(bad);
                continue;
            }
            Err(bad) => return Err(bad.into_error()),
        };
        let length = tokenized.example.len();
        lengths.push(length);
        if length > config.max_length {
            if matches!(record.content, Content::Text(_)) {
                split_documents += 1;
            } else {
                truncated += 1;
                dropped_tokens += length - config.max_length;
            }
        }
        if examples.len() < n {
            examples.push(preview_example(record, &tokenized, tokenizer, config.max_length));
        }
    }
    if lengths.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no record could be rendered; see the skipped records: {}",
            config.path.display(),
            set.skipped.first().map(|b| b.to_string()).unwrap_or_default()
        )));
    }
    Ok(Preview {
        examples,
        template: template.as_ref().map(|t| t.name.clone()),
        template_check: template.as_ref().map(|t| check_template(t, tokenizer, family_id)),
        format: format_summary(&set.files),
        records: set.records.len(),
        max_length: config.max_length,
        lengths: LengthStats::from_lengths(&lengths, config.max_length),
        truncated,
        dropped_tokens,
        split_documents,
        skipped: set.skipped,
        prepared: prepare(config, tokenizer, family_id).ok().map(|p| p.report),
    })
}

/// Splits a tokenized record into runs of tokens with the same state, each with the text it
/// covers (the gaps between tokens, such as spaces a tokenizer drops, go with the run before).
fn preview_example(
    record: &Record,
    tokenized: &encode::Tokenized,
    tokenizer: &ModelTokenizer,
    max_length: usize,
) -> PreviewExample {
    let ex = &tokenized.example;
    let text = &tokenized.text;
    // a document longer than max_length goes on in further blocks; only a conversation is cut
    let document = matches!(record.content, Content::Text(_));
    let state = |i: usize| (ex.labels[i] != IGNORE, !document && i >= max_length);
    let mut segments: Vec<Segment> = Vec::new();
    let push = |segments: &mut Vec<Segment>, piece: String, (trained, cut): (bool, bool)| {
        if piece.is_empty() {
            return;
        }
        match segments.last_mut() {
            Some(last) if last.trained == trained && last.cut == cut => last.text.push_str(&piece),
            _ => segments.push(Segment { text: piece, trained, cut }),
        }
    };
    // Where the text of each in-text token starts, so a token's piece runs to the next one's.
    let starts: Vec<Option<usize>> = tokenized.spans.iter().map(|s| s.map(|(s, _)| s)).collect();
    let mut covered = 0;
    for i in 0..ex.len() {
        match tokenized.spans[i] {
            None => {
                let piece = tokenizer.id_to_token(ex.input_ids[i]).unwrap_or_default();
                push(&mut segments, piece, state(i));
            }
            Some((_, end)) => {
                let next = starts[i + 1..].iter().flatten().next().copied().unwrap_or(text.len());
                let stop = end.max(next).min(text.len());
                if stop > covered && text.is_char_boundary(covered) && text.is_char_boundary(stop) {
                    push(&mut segments, text[covered..stop].to_string(), state(i));
                    covered = stop;
                }
            }
        }
    }
    let mut kept = ex.clone();
    let truncated = !document && encode::truncate(&mut kept, max_length);
    PreviewExample {
        source: record.location(),
        segments,
        tokens: ex.len(),
        trained_tokens: kept.trained_tokens(),
        truncated,
        blocks: if document { ex.len().div_ceil(max_length).max(1) } else { 1 },
    }
}

/// Marks around trained text in the plain-text preview.
pub const TRAINED_OPEN: &str = "[[";
pub const TRAINED_CLOSE: &str = "]]";

/// The preview as plain text for the command line: trained text between `[[` and `]]`, the
/// part max_length cuts (never trained) after a `✂` line, then the length distribution.
pub fn render_preview_text(preview: &Preview) -> String {
    let mut out = String::new();
    out.push_str(&format!("format: {}, {} records", preview.format, preview.records));
    if let Some(t) = &preview.template {
        out.push_str(&format!(", template: {t}"));
    }
    out.push('\n');
    if let Some(w) = preview.template_check.as_ref().and_then(|c| c.warning.as_ref()) {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str(&format!("trained text is shown between {TRAINED_OPEN} and {TRAINED_CLOSE}\n"));
    for (i, ex) in preview.examples.iter().enumerate() {
        out.push_str(&format!(
            "\n──── example {} ({}) — {} tokens, {} trained{}\n",
            i + 1,
            ex.source,
            ex.tokens,
            ex.trained_tokens,
            if ex.truncated {
                format!(", cut to {}", preview.max_length)
            } else if ex.blocks > 1 {
                format!(", split into {} blocks of at most {}", ex.blocks, preview.max_length)
            } else {
                String::new()
            }
        ));
        let mut in_cut = false;
        for seg in &ex.segments {
            if seg.cut && !in_cut {
                out.push_str(&format!("\n✂ ---- cut here by max_length {} ----\n", preview.max_length));
                in_cut = true;
            }
            // Past the cut nothing is trained, whatever the mask says.
            if seg.trained && !seg.cut {
                out.push_str(&format!("{TRAINED_OPEN}{}{TRAINED_CLOSE}", seg.text));
            } else {
                out.push_str(&seg.text);
            }
        }
        out.push('\n');
    }
    let l = &preview.lengths;
    out.push_str(&format!(
        "\ntoken lengths of {} records: min {}, median {}, p90 {}, p99 {}, max {}, mean {:.1}\n",
        l.count, l.min, l.p50, l.p90, l.p99, l.max, l.mean
    ));
    out.push_str(&format!(
        "{} of {} records are longer than max_length {}: {} conversations cut ({} tokens dropped), {} text documents split into blocks (nothing dropped)\n",
        l.over_max_length, l.count, preview.max_length, preview.truncated, preview.dropped_tokens, preview.split_documents
    ));
    let widest = l.histogram.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    for b in &l.histogram {
        let bar = "█".repeat((b.count * 40).div_ceil(widest));
        let mark = if b.end > preview.max_length && b.start <= preview.max_length { " ← max_length" } else { "" };
        out.push_str(&format!("{:>6}–{:<6} {:>6} {bar}{mark}\n", b.start, b.end - 1, b.count));
    }
    if let Some(p) = &preview.prepared {
        out.push_str(&format!(
            "{} training sequences of {} tokens ({} trained); the longest: {} tokens ({})\n",
            p.train_examples, p.train_tokens, p.trained_tokens, p.longest.tokens, p.longest.source
        ));
    }
    if !preview.skipped.is_empty() {
        out.push_str(&format!("\nskipped {} bad record(s):\n", preview.skipped.len()));
        for b in &preview.skipped {
            out.push_str(&format!("  {b}\n"));
        }
    }
    out
}

impl fmt::Display for Preview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_preview_text(self))
    }
}
