//! `RunConfig`: the one contract between the GUI, the command line and the trainer. Every
//! checkpoint carries the one it came from, so any run can be repeated or resumed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::error::{Error, Result};
use crate::lora::LoraSettings;

/// Frozen base weights: dense 16/32-bit (LoRA) or 4-bit NF4 (QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lora,
    #[default]
    Qlora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Per-block gradient checkpointing: keep only each block's input and recompute the block in
/// the backward (the same losses and gradients, far less memory, about a third more time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    Off,
    On,
    /// On when the memory estimate says the run would not fit otherwise.
    #[default]
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A model folder, a hub id (`owner/name`) or a GGUF file.
    pub source: String,
    pub mode: Mode,
    /// Compute dtype of the frozen weights and activations: "auto" (bf16 on a GPU; on the CPU
    /// bf16 where its matmuls are faster than f32's, else f32), "f32", "bf16" or "f16". LoRA
    /// weights and the optimizer state are f32 in every case; on the CPU, bf16 keeps the
    /// activations in f32 and multiplies the frozen weights in bf16 with f32 sums.
    pub dtype: String,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
}

impl ModelConfig {
    /// The compute dtype this run uses: "auto" is bf16 on a GPU (tensor cores; Ampere and newer
    /// have it) and on a CPU whose bf16 dot products beat its f32 FMA
    /// (`bf16_matmul::pays_on_this_cpu`), else f32.
    pub fn compute_dtype(&self) -> candle_core::DType {
        use candle_core::DType;
        match self.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "auto" if self.device != "cpu" || crate::quant::bf16_matmul::pays_on_this_cpu() => DType::BF16,
            _ => DType::F32,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { source: String::new(), mode: Mode::Qlora, dtype: "auto".into(), device: "cpu".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Module names, "all-linear", or empty for the family's default from the table.
    pub targets: Vec<String>,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// DoRA: a trainable magnitude per output row of each adapted linear (PEFT's use_dora).
    pub dora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { targets: Vec::new(), r: 8, alpha: 16.0, dropout: 0.05, rslora: false, dora: false }
    }
}

impl LoraConfig {
    /// The settings for the model, with the family's default targets filled in when none are given.
    pub fn settings(&self, default_targets: &[String]) -> LoraSettings {
        let targets = if self.targets.is_empty() { default_targets.to_vec() } else { self.targets.clone() };
        LoraSettings {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.rslora,
            use_dora: self.dora,
            targets,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Examples per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Passes over the training set; ignored when max_steps is set.
    pub epochs: f64,
    /// Optimizer steps; 0 = from epochs.
    pub max_steps: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Validation loss every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Generate from `sample_prompts` every N steps (0 = never).
    pub sample_every: usize,
    pub sample_prompts: Vec<String>,
    pub sample_max_tokens: usize,
    /// Where checkpoints and the final adapter go.
    pub output_dir: PathBuf,
    /// Measure one forward+backward on the longest batch first, and shrink the micro-batch if
    /// it does not fit.
    pub probe: bool,
    /// "off", "on" or "auto" (on when the run would not fit in memory otherwise).
    pub gradient_checkpointing: Checkpointing,
    /// Start even when the memory estimate's lower bound is more than the memory available
    /// (otherwise the run trains in smaller micro-batches or is refused with what to change).
    pub ignore_memory_estimate: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            grad_accum: 1,
            epochs: 1.0,
            max_steps: 0,
            learning_rate: 2e-4,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            checkpoint_every: 0,
            sample_every: 0,
            sample_prompts: Vec::new(),
            sample_max_tokens: 48,
            output_dir: PathBuf::from("runs/run"),
            probe: true,
            gradient_checkpointing: Checkpointing::Auto,
            ignore_memory_estimate: false,
        }
    }
}

/// Everything a run needs, as the `[model]`, `[lora]`, `[data]` and `[train]` tables of a TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let config: RunConfig = toml::from_str(text).map_err(|e| {
            let place = e.span().map(|s| format!(" line {}", line_of(text, s.start))).unwrap_or_default();
            Error::Invalid(format!("{origin}{place}: {}", e.message()))
        })?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut config = Self::from_toml_str(&text, &path.display().to_string())?;
        // paths in a config file are relative to its folder
        let base = path.parent().unwrap_or(Path::new("."));
        config.data.resolve_paths(base);
        if !config.train.output_dir.as_os_str().is_empty() && config.train.output_dir.is_relative() {
            config.train.output_dir = base.join(&config.train.output_dir);
        }
        let local_model = base.join(&config.model.source);
        if !config.model.source.is_empty() && Path::new(&config.model.source).is_relative() && local_model.exists() {
            config.model.source = local_model.display().to_string();
        }
        config.validate().map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// Write to `path` through a temporary name. A path in the config that is not text (not
    /// valid UTF-8) cannot be written to TOML: the error names its key.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check_paths_are_text()?;
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("{}: the run config cannot be written: {e}", path.display())))?;
        crate::weights::write_atomic(path, text.as_bytes())
    }

    /// TOML (and so a config file, a checkpoint, the settings) holds text only: every path of
    /// the config must be valid UTF-8.
    pub fn check_paths_are_text(&self) -> Result<()> {
        let mut paths = vec![("data.path", &self.data.path), ("train.output_dir", &self.train.output_dir)];
        if let crate::data::Validation::File(file) = &self.data.validation {
            paths.push(("data.validation", file));
        }
        match paths.into_iter().find(|(_, p)| p.to_str().is_none()) {
            Some((key, p)) => Err(Error::Invalid(format!(
                "{key} = {} is not valid UTF-8, and a run config holds text only: rename that file or \
                 folder, or choose another",
                p.display()
            ))),
            None => Ok(()),
        }
    }

    /// Every setting a run cannot start with, named by its key.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                problems.push(msg.to_string());
            }
        };
        let (m, l, t) = (&self.model, &self.lora, &self.train);
        check(!m.source.trim().is_empty(), "model.source is empty: give a model folder, a hub id or a GGUF file");
        check(
            ["auto", "f32", "bf16", "f16"].contains(&m.dtype.as_str()),
            "model.dtype must be \"auto\", \"f32\", \"bf16\" or \"f16\"",
        );
        check(
            m.device == "cpu"
                || m.device == "cuda"
                || m.device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()),
            "model.device must be \"cpu\", \"cuda\" or \"cuda:N\"",
        );
        check(l.r >= 1, "lora.r must be at least 1");
        check(l.alpha > 0.0, "lora.alpha must be positive");
        check((0.0..1.0).contains(&l.dropout), "lora.dropout must be in [0, 1)");
        check(t.batch_size >= 1, "train.batch_size must be at least 1");
        check(t.grad_accum >= 1, "train.grad_accum must be at least 1");
        check(t.max_steps > 0 || t.epochs > 0.0, "train.epochs or train.max_steps must be positive");
        check(t.learning_rate > 0.0 && t.learning_rate.is_finite(), "train.learning_rate must be positive");
        check(t.weight_decay >= 0.0, "train.weight_decay must not be negative");
        check(t.max_grad_norm >= 0.0, "train.max_grad_norm must not be negative (0 turns clipping off)");
        check(!t.output_dir.as_os_str().is_empty(), "train.output_dir is empty");
        check(
            t.sample_every == 0 || !t.sample_prompts.is_empty(),
            "train.sample_every is set but train.sample_prompts is empty",
        );
        if let Err(e) = self.data.validate() {
            problems.push(e.to_string());
        }
        if let Err(e) = self.check_paths_are_text() {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(problems.join("; ")))
        }
    }
}

impl RunConfig {
    /// What the memory estimator needs, from this config and the model's config.json (no
    /// weights are read), sized by the data when it has been prepared (`data`, see
    /// `estimate_input_for`). Gradient checkpointing is as `checkpointing_in` decides for the
    /// memory `budget`. `process_bytes`: the resident memory of the process the run will be,
    /// outside its tensors (`EstimateInput::process_bytes`).
    pub fn estimate_input(
        &self,
        budget: Option<u64>,
        data: Option<&crate::data::DataReport>,
        process_bytes: u64,
    ) -> Result<crate::memory::EstimateInput> {
        let spec = crate::memory::presets::spec_for(&self.model_config_path()?)?;
        let mut input = self.estimate_input_for(spec, data);
        input.process_bytes = process_bytes;
        input.checkpointing = self.checkpointing_in(&input, budget);
        Ok(input)
    }

    /// The model's config.json, the tokenizer beside it and the dataset prepared as the trainer
    /// will prepare it: what the estimate needs to size the largest micro-batch. Reads no
    /// weights and downloads nothing.
    pub fn prepare_data_offline(&self) -> Result<crate::data::DataReport> {
        let dir = self.model_config_path()?;
        let spec = crate::memory::presets::spec_for(&dir)?;
        let tokenizer = crate::data::ModelTokenizer::from_dir(Path::new(&dir))?;
        Ok(crate::data::prepare(&self.data, &tokenizer, Some(&spec.family))?.report)
    }

    /// Whether the run checkpoints: as set; with "auto", always on a GPU (its memory is the
    /// scarce part, and the recomputation costs about a third more time), and on the CPU when
    /// the estimate without it does not fit in `budget` (off when the budget is unknown).
    pub fn checkpointing_in(&self, input: &crate::memory::EstimateInput, budget: Option<u64>) -> bool {
        match self.train.gradient_checkpointing {
            Checkpointing::Off => false,
            Checkpointing::On => true,
            Checkpointing::Auto if input.device == crate::memory::DeviceKind::Cuda => true,
            Checkpointing::Auto => budget.is_some_and(|b| {
                let mut plain = input.clone();
                plain.checkpointing = false;
                crate::memory::estimate(&plain).is_ok_and(|e| !e.fits(b))
            }),
        }
    }

    /// The estimator's input for a model of `spec`, without checkpointing. The trainer pads
    /// each micro-batch to its longest sequence and its probe runs the longest first, so with
    /// the prepared `data` the largest micro-batch is `min(batch_size, sequences)` × the longest
    /// training sequence; without it, batch_size × max_length (what packing that fills every
    /// sequence makes).
    pub fn estimate_input_for(
        &self,
        spec: crate::model::ModelSpec,
        data: Option<&crate::data::DataReport>,
    ) -> crate::memory::EstimateInput {
        use crate::memory::{DeviceKind, EstimateInput, Method};
        let method = match self.model.mode {
            Mode::Lora => Method::Lora,
            Mode::Qlora => Method::Qlora { double_quant: true },
        };
        let targets =
            if self.lora.targets.is_empty() { spec.default_targets.clone() } else { self.lora.targets.clone() };
        let device = if self.model.device == "cpu" { DeviceKind::Cpu } else { DeviceKind::Cuda };
        let (batch, seq) = match data {
            Some(d) if d.train_examples > 0 => {
                (self.train.batch_size.min(d.train_examples), d.longest.tokens.clamp(2, self.data.max_length.max(2)))
            }
            _ => (self.train.batch_size, self.data.max_length),
        };
        let mut input = EstimateInput::new(spec, method, targets, self.lora.r, batch, seq).on(device);
        input.dropout = self.lora.dropout;
        input.dora = self.lora.dora;
        input.dtype = self.model.compute_dtype();
        input
    }

    /// The model's config.json without downloading: a folder, a GGUF import already made, a
    /// hub id in the local cache, or one of the estimator's preset names.
    fn model_config_path(&self) -> Result<String> {
        let source = &self.model.source;
        if Path::new(source).exists() && !source.ends_with(".gguf") {
            return Ok(source.clone());
        }
        let offline = crate::hub::ResolveOptions { download: None, ..Default::default() };
        match crate::hub::resolve_with(source, &offline) {
            Ok(resolved) => Ok(resolved.dir.display().to_string()),
            // a preset name (the famous shapes), or a clear error naming the source
            Err(_) if crate::memory::presets::is_preset(source) => Ok(source.clone()),
            Err(e) => Err(e),
        }
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() {
        let mut c = RunConfig::default();
        c.model.source = "models/tiny".into();
        c.lora.targets = vec!["q_proj".into(), "v_proj".into()];
        c.train.sample_prompts = vec!["Hello".into()];
        let back = RunConfig::from_toml_str(&c.to_toml(), "test").unwrap();
        assert_eq!(back, c);
    }

    /// A folder or file name that is not UTF-8 (possible on Linux) cannot go into TOML: saving
    /// the config and starting a run say which key, and nothing panics.
    #[cfg(unix)]
    #[test]
    fn a_path_that_is_not_utf8_is_an_error_naming_its_key() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let mut c = RunConfig::default();
        c.model.source = "models/tiny".into();
        c.train.output_dir = dir.path().join(std::ffi::OsStr::from_bytes(b"run-\xff"));
        let file = dir.path().join("run.toml");
        let message = c.save(&file).unwrap_err().to_string();
        assert!(message.contains("train.output_dir") && message.contains("UTF-8"), "{message}");
        assert!(!file.exists(), "nothing written");
        assert!(c.validate().unwrap_err().to_string().contains("train.output_dir"));
        c.train.output_dir = dir.path().join("run");
        c.data.path = dir.path().join(std::ffi::OsStr::from_bytes(b"data-\xfe.jsonl"));
        assert!(c.save(&file).unwrap_err().to_string().contains("data.path"));
        c.data.path = dir.path().join("data.jsonl");
        c.save(&file).unwrap();
        assert!(file.is_file());
    }

    #[test]
    fn auto_checkpointing_turns_on_only_when_the_run_would_not_fit() {
        let spec = crate::memory::grid::preset_spec("smollm2-135m").unwrap();
        let mut c = RunConfig::default();
        c.data.max_length = 1024;
        let input = c.estimate_input_for(spec, None);
        let plain = crate::memory::estimate(&input).unwrap();
        assert!(!input.checkpointing);
        c.train.gradient_checkpointing = Checkpointing::Auto;
        assert!(c.checkpointing_in(&input, Some(plain.high / 2)), "does not fit: on");
        assert!(!c.checkpointing_in(&input, Some(plain.high * 2)), "fits: off");
        assert!(!c.checkpointing_in(&input, None), "no budget known: off");
        c.train.gradient_checkpointing = Checkpointing::On;
        assert!(c.checkpointing_in(&input, Some(u64::MAX)));
        c.train.gradient_checkpointing = Checkpointing::Off;
        assert!(!c.checkpointing_in(&input, Some(1)));
        let back = RunConfig::from_toml_str("[train]\ngradient_checkpointing = \"on\"\n", "t").unwrap();
        assert_eq!(back.train.gradient_checkpointing, Checkpointing::On);
        let e = RunConfig::from_toml_str("[train]\ngradient_checkpointing = \"yes\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = RunConfig::from_toml_str("[train]\nbatch_sise = 4\n", "run.toml").unwrap_err().to_string();
        assert!(e.contains("run.toml line 2") && e.contains("batch_sise"), "{e}");
        let e = RunConfig::from_toml_str("[lora]\nr = \"eight\"\n", "run.toml").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let mut c = RunConfig::default();
        c.model.source = "m".into();
        c.lora.r = 0;
        c.train.learning_rate = 0.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("lora.r") && e.contains("train.learning_rate"), "{e}");
    }
}
