//! Bringing a handed-off run back: the folder LLaMA-Factory or axolotl wrote (a PEFT adapter,
//! HF Trainer's trainer_state.json, LLaMA-Factory's trainer_log.jsonl, checkpoint-N folders)
//! read as a run of ours: its config (the one handed off, from the job's folder), its loss
//! curves and the adapter that Try and Export load.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::RUN_CONFIG_FILE;
use crate::error::{Error, Result};
use crate::train::checkpoint::TrainerState;
use crate::train::RunConfig;
use crate::weights::write_atomic;

/// A result folder read back.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The folder the tool wrote (its output_dir).
    pub dir: PathBuf,
    /// The PEFT adapter: the folder itself, or its newest checkpoint-N.
    pub adapter: PathBuf,
    pub config: RunConfig,
    pub state: TrainerState,
    /// Which tool wrote it, as far as its files say.
    pub tool: &'static str,
    /// What was read or changed, for the user.
    pub notes: Vec<String>,
}

const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Whether `dir` looks like a result of another trainer (and not a run of ours): a PEFT adapter
/// with a trainer state or log, in it or in its `output/`.
pub fn is_result(dir: &Path) -> bool {
    result_root(dir).is_some()
}

fn result_root(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(super::OUTPUT_DIR)].into_iter().find(|d| {
        let has_log = d.join("trainer_log.jsonl").is_file()
            || d.join("trainer_state.json").is_file()
            || newest_checkpoint(d).is_some_and(|c| c.join("trainer_state.json").is_file());
        let has_adapter = d.join(ADAPTER_CONFIG).is_file() || newest_checkpoint(d).is_some();
        // a run of ours has run.toml in its checkpoints
        let ours = crate::train::checkpoint::latest(d).is_some_and(|c| c.join("run.toml").is_file());
        has_log && has_adapter && !ours
    })
}

/// The newest `checkpoint-N` folder holding a PEFT adapter.
fn newest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step: usize = e.file_name().to_string_lossy().strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(ADAPTER_CONFIG).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Reads the result folder `dir` (the tool's output_dir, or the job folder holding `output/`).
/// When the adapter's base_model_name_or_path does not name a model on this machine (the job's
/// `model` folder, a path of the other machine), it is set to the model the run was handed off
/// with, keeping the tool's file as adapter_config.json.orig.
pub fn read_result(dir: &Path) -> Result<Imported> {
    let root = result_root(dir).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not the output of a LLaMA-Factory or axolotl job: no PEFT adapter (adapter_config.json) with a \
             trainer_state.json or trainer_log.jsonl in it or in its output/ folder",
            dir.display()
        ))
    })?;
    let mut notes = Vec::new();
    let adapter = if root.join(ADAPTER_CONFIG).is_file() {
        root.clone()
    } else {
        let ck = newest_checkpoint(&root).expect("result_root checked it");
        notes.push(format!("no final adapter in {}: the newest checkpoint {} is used", root.display(), ck.display()));
        ck
    };
    let log = root.join("trainer_log.jsonl");
    let tool = if log.is_file() { "LLaMA-Factory" } else { "axolotl" };
    let state_file = [root.join("trainer_state.json"), adapter.join("trainer_state.json")]
        .into_iter()
        .chain(newest_checkpoint(&root).map(|c| c.join("trainer_state.json")))
        .find(|p| p.is_file());
    let mut state = match &state_file {
        Some(p) => state_from_trainer_state(p)?,
        None => state_from_log(&log)?,
    };
    if state.losses.is_empty() && log.is_file() {
        let from_log = state_from_log(&log)?;
        state.losses = from_log.losses;
    }
    // LLaMA-Factory's evaluation after training (do_eval) is in eval_results.json only
    let final_eval = root.join("eval_results.json");
    if final_eval.is_file() && state.eval_losses.last().is_none_or(|(s, _)| *s < state.step) {
        if let Some(loss) = read_json(&final_eval)?.get("eval_loss").and_then(Value::as_f64) {
            state.eval_losses.push((state.step, loss));
        }
    }

    // the run config as handed off, in the job folder (the result's parent) or beside it
    let config_file = [root.join(RUN_CONFIG_FILE), root.parent().map(|p| p.join(RUN_CONFIG_FILE)).unwrap_or_default()]
        .into_iter()
        .find(|p| p.is_file());
    let adapter_config_path = adapter.join(ADAPTER_CONFIG);
    let adapter_config = read_json(&adapter_config_path)?;
    let mut config = match &config_file {
        Some(p) => RunConfig::load(p)?,
        None => {
            notes.push(format!(
                "no {RUN_CONFIG_FILE} beside {}: the settings shown come from adapter_config.json",
                root.display()
            ));
            config_from_adapter(&adapter_config)
        }
    };
    config.train.output_dir = root.clone();

    // the adapter's base, as this machine finds it
    let base = adapter_config.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default().to_string();
    let resolvable = !base.is_empty()
        && (Path::new(&base).join("config.json").is_file()
            || adapter.join(&base).join("config.json").is_file()
            || (crate::hub::parse_hub_id(&base).is_some() && !Path::new(&base).exists() && base.contains('/')));
    if !resolvable && config_file.is_some() && config.model.source != base {
        let mut fixed = adapter_config.clone();
        fixed["base_model_name_or_path"] = Value::String(config.model.source.clone());
        let orig = adapter.join("adapter_config.json.orig");
        if !orig.exists() {
            std::fs::copy(&adapter_config_path, &orig).map_err(|e| Error::io(&orig, e))?;
        }
        write_atomic(&adapter_config_path, serde_json::to_string_pretty(&fixed).expect("JSON serialises").as_bytes())?;
        notes.push(format!(
            "the adapter's base model {base:?} is not on this machine: set to {} (the model the run was handed off \
             with); the tool's file is adapter_config.json.orig",
            config.model.source
        ));
    }
    Ok(Imported { dir: root, adapter, config, state, tool, notes })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", path.display())))
}

fn empty_state() -> TrainerState {
    TrainerState {
        step: 0,
        total_steps: 0,
        epoch: 0,
        epoch_position: 0,
        optimizer_step: 0,
        micro_batch: 0,
        losses: Vec::new(),
        eval_losses: Vec::new(),
        peak_rss: 0,
        peak_device: None,
    }
}

/// HF Trainer's trainer_state.json: `log_history` entries with `loss` or `eval_loss` and
/// `step`, `global_step`, `max_steps`.
fn state_from_trainer_state(path: &Path) -> Result<TrainerState> {
    let v = read_json(path)?;
    let history = v
        .get("log_history")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::bad_entry(path, "log_history", "missing: not HF Trainer's trainer_state.json"))?;
    let mut state = empty_state();
    for entry in history {
        let Some(step) = entry.get("step").and_then(Value::as_u64) else { continue };
        if let Some(loss) = entry.get("loss").and_then(Value::as_f64) {
            state.losses.push((step as usize, loss));
        }
        if let Some(loss) = entry.get("eval_loss").and_then(Value::as_f64) {
            state.eval_losses.push((step as usize, loss));
        }
    }
    state.step = v.get("global_step").and_then(Value::as_u64).unwrap_or(0) as usize;
    state.total_steps = v.get("max_steps").and_then(Value::as_u64).map_or(state.step, |m| m as usize);
    state.micro_batch = v.get("train_batch_size").and_then(Value::as_u64).unwrap_or(0) as usize;
    state.epoch = v.get("epoch").and_then(Value::as_f64).unwrap_or(0.0).ceil() as usize;
    Ok(state)
}

/// LLaMA-Factory's trainer_log.jsonl: one object a logging step, `current_steps`,
/// `total_steps`, `loss` (and `eval_loss` on evaluation lines).
fn state_from_log(path: &Path) -> Result<TrainerState> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut state = empty_state();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{}:{}: not a JSON line: {e}", path.display(), i + 1)))?;
        let step = v.get("current_steps").and_then(Value::as_u64).unwrap_or(0) as usize;
        if let Some(loss) = v.get("loss").and_then(Value::as_f64) {
            state.losses.push((step, loss));
        }
        if let Some(loss) = v.get("eval_loss").and_then(Value::as_f64) {
            state.eval_losses.push((step, loss));
        }
        state.step = state.step.max(step);
        state.total_steps = v.get("total_steps").and_then(Value::as_u64).map_or(state.total_steps, |t| t as usize);
    }
    Ok(state)
}

/// What adapter_config.json says of the run when the handed-off config is not there.
fn config_from_adapter(a: &Value) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.source = a.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default().to_string();
    c.model.mode = crate::train::Mode::Lora;
    c.lora.r = a.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    c.lora.alpha = a.get("lora_alpha").and_then(Value::as_f64).unwrap_or(16.0);
    c.lora.dropout = a.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    c.lora.rslora = a.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    c.lora.dora = a.get("use_dora").and_then(Value::as_bool).unwrap_or(false);
    c.lora.targets = match a.get("target_modules") {
        Some(Value::Array(t)) => t.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    c
}

/// What `import-run` prints: the run, its curve in brief, the adapter and the notes.
pub fn summary(r: &Imported) -> String {
    let mut s = format!(
        "{} result in {}\nmodel:    {}\nadapter:  {}\nsteps:    {}/{}\n",
        r.tool,
        r.dir.display(),
        r.config.model.source,
        r.adapter.display(),
        r.state.step,
        r.state.total_steps
    );
    let curve = |l: &[(usize, f64)]| l.iter().map(|(s, v)| format!("{s}:{v:.4}")).collect::<Vec<_>>().join(" ");
    s.push_str(&format!("training loss:   {}\n", curve(&r.state.losses)));
    if !r.state.eval_losses.is_empty() {
        s.push_str(&format!("validation loss: {}\n", curve(&r.state.eval_losses)));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}
