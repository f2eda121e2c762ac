//! Datasets: formats (Alpaca, ShareGPT/chat, plain text), chat templates, tokenization,
//! truncation and packing, loss masks and the validation split.
//!
//! TEMPORARY minimal stand-in (Alpaca JSONL only) so the trainer builds while the full module
//! is written on the `data` branch; replaced wholesale at merge.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub path: PathBuf,
    pub max_length: usize,
    pub validation_fraction: f64,
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { path: PathBuf::new(), max_length: 512, validation_fraction: 0.0, seed: 0 }
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

pub struct ModelTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub eos_token_id: Option<u32>,
}

impl ModelTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        let tokenizer =
            tokenizers::Tokenizer::from_file(&p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        let eos_token_id = tokenizer.token_to_id("</s>");
        Ok(Self { tokenizer, eos_token_id })
    }
}

pub struct PreparedData {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
}

pub fn prepare(config: &DataConfig, tok: &ModelTokenizer, _family: Option<&str>) -> Result<PreparedData> {
    let text = std::fs::read_to_string(&config.path).map_err(|e| Error::io(&config.path, e))?;
    let mut all = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Invalid(e.to_string()))?;
        let prompt = format!("### Instruction:\n{}\n\n### Response:\n", v["instruction"].as_str().unwrap_or(""));
        let enc = |s: &str| -> Result<Vec<u32>> {
            Ok(tok.tokenizer.encode(s, false).map_err(|e| Error::Invalid(e.to_string()))?.get_ids().to_vec())
        };
        let p = enc(&prompt)?;
        let mut r = enc(v["output"].as_str().unwrap_or(""))?;
        r.extend(tok.eos_token_id);
        let mut input_ids = p.clone();
        input_ids.extend(&r);
        let mut labels = vec![-100i64; p.len()];
        labels.extend(r.iter().map(|&i| i as i64));
        input_ids.truncate(config.max_length);
        labels.truncate(config.max_length);
        all.push(Example { input_ids, labels });
    }
    let n_val = (all.len() as f64 * config.validation_fraction).round() as usize;
    let validation = all.split_off(all.len() - n_val);
    Ok(PreparedData { train: all, validation })
}
