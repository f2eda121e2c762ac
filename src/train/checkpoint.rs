//! Trainer checkpoints: a folder holding the adapter as a PEFT adapter (so every tool that reads
//! PEFT adapters reads a checkpoint), the optimizer state, the trainer's position and the
//! RunConfig. Written under a temporary name and renamed, so a crash never leaves half a
//! checkpoint under the final name.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use crate::error::{Error, Result};
use crate::lora::export::{write_peft_adapter, ExportInfo, TensorDType};
use crate::lora::peft::PeftAdapter;
use crate::lora::LoraSettings;
use crate::model::Model;
use crate::weights::{write_atomic, write_safetensors, RawTensor, SafetensorsFile};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const RUN_CONFIG: &str = "run.toml";

/// Where the trainer stands; enough, with the adapter and optimizer state, to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Data position: the epoch and how many of its (shuffled) examples were consumed.
    pub epoch: usize,
    pub epoch_position: usize,
    /// AdamW's bias-correction step.
    pub optimizer_step: u64,
    /// The micro-batch the probe chose (it may be smaller than the config's batch size).
    pub micro_batch: usize,
    /// (step, training loss) of every step so far, and (step, validation loss) of every eval.
    pub losses: Vec<(usize, f64)>,
    pub eval_losses: Vec<(usize, f64)>,
    /// The highest memory readings so far, for the run history: the process's resident set and,
    /// on CUDA, the device memory in use (0 / None in checkpoints of older versions).
    #[serde(default)]
    pub peak_rss: u64,
    #[serde(default)]
    pub peak_device: Option<u64>,
}

/// The folder name of the checkpoint after `step` steps.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step:06}"))
}

fn f32_raw(name: String, t: &Tensor) -> Result<RawTensor> {
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(RawTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape: t.dims().to_vec(),
        data: crate::weights::f32_bytes(&values),
    })
}

/// What a checkpoint holds beyond the model.
pub struct CheckpointContents<'a> {
    pub config: &'a RunConfig,
    pub settings: &'a LoraSettings,
    /// The base model as the adapter config should name it (hub id or folder).
    pub base_model: &'a str,
    pub state: &'a TrainerState,
    /// (PEFT key, first moment, second moment) of each trainable tensor.
    pub moments: Vec<(String, Tensor, Tensor)>,
    /// What the adapter's model card says (dataset, losses, chat template, ...).
    pub info: ExportInfo,
}

/// Write the checkpoint of `model` into `dir` (replacing an older one of the same step).
pub fn save(dir: &Path, model: &Model, contents: &CheckpointContents<'_>) -> Result<()> {
    let mut tmp_name = dir.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.with_file_name(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }

    // the adapter as a PEFT folder (with its model card), then the trainer's own files beside it
    let adapter = PeftAdapter::from_model(model, contents.settings)?;
    write_peft_adapter(&adapter, &tmp, TensorDType::F32, Some(contents.base_model), &contents.info)?;
    let mut moments = Vec::with_capacity(contents.moments.len() * 2);
    for (key, m, v) in &contents.moments {
        moments.push(f32_raw(format!("{key}.exp_avg"), m)?);
        moments.push(f32_raw(format!("{key}.exp_avg_sq"), v)?);
    }
    write_safetensors(&tmp.join(OPTIMIZER_STATE), &moments)?;
    write_json(&tmp.join(TRAINER_STATE), &serde_json::to_value(contents.state).expect("state serialises"))?;
    contents.config.save(&tmp.join(RUN_CONFIG))?;

    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// A checkpoint read back: its config, state and optimizer moments keyed by PEFT key.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub state: TrainerState,
    pub moments: std::collections::HashMap<String, (Tensor, Tensor)>,
}

/// Read a checkpoint folder's config, state and optimizer state (the adapter itself is loaded
/// onto the model with `Model::load_adapter`).
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let (config, state) = read_summary(dir)?;
    let file = SafetensorsFile::open(dir.join(OPTIMIZER_STATE))?;
    let mut moments = std::collections::HashMap::new();
    for key in file.keys() {
        if let Some(base) = key.strip_suffix(".exp_avg") {
            let m = file.tensor(&key, device)?;
            let v = file.tensor(&format!("{base}.exp_avg_sq"), device)?;
            moments.insert(base.to_string(), (m, v));
        }
    }
    Ok(LoadedCheckpoint { dir: dir.to_path_buf(), config, state, moments })
}

/// A checkpoint's config and trainer state only (small text files): what the run history
/// shows, without the optimizer state `load` reads.
pub fn read_summary(dir: &Path) -> Result<(RunConfig, TrainerState)> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such checkpoint folder (checkpoints are the checkpoint-NNNNNN folders in a run's output folder)",
            dir.display()
        )));
    }
    let config = RunConfig::load(&dir.join(RUN_CONFIG))?;
    let state_path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not a trainer state: {e}", state_path.display())))?;
    Ok((config, state))
}

/// The newest checkpoint folder in a run's output folder.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(TRAINER_STATE).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
}
