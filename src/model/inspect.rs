//! What a checkpoint folder holds, read from config.json and the safetensors headers only (no
//! weights loaded): the family, the shape figures, and the linear modules LoRA can target with
//! their shapes, so a picker can be filled before anything is loaded.

use std::path::{Path, PathBuf};

use crate::arch;
use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::spec::{PlannedLinear, Role};
use crate::model::ModelSpec;

#[derive(Debug, Clone, PartialEq)]
pub struct LinearModule {
    /// The module name targets use (`q_proj`, `W_pack`, ...).
    pub name: String,
    /// The full path of its first instance (layer 0, expert 0), which targets are matched on.
    pub path: String,
    pub role: Role,
    /// [out, in] of one instance; `None` when stored packed (4-bit checkpoints).
    pub shape: Option<[usize; 2]>,
    /// How many instances the model has (layers × experts).
    pub count: usize,
    /// For a fused projection, what it holds ("q, k, v", "gate, up").
    pub fused: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub dir: PathBuf,
    pub family_id: String,
    pub family_name: String,
    pub spec: ModelSpec,
    /// max_position_embeddings (or the family's name for it), when the config gives one.
    pub context_length: Option<usize>,
    /// Parameters in the checkpoint (4-bit packed weights counted as two per byte).
    pub parameters: usize,
    pub linear_modules: Vec<LinearModule>,
    /// The family's default targets as this checkpoint names them.
    pub default_targets: Vec<String>,
    /// Set when the table's default module is named differently in this checkpoint.
    pub default_targets_note: Option<String>,
}

impl ModelInfo {
    /// The names of the modules whose role passes `keep`, in plan order (the target presets).
    pub fn module_names(&self, keep: impl Fn(Role) -> bool) -> Vec<String> {
        self.linear_modules.iter().filter(|m| keep(m.role)).map(|m| m.name.clone()).collect()
    }

    /// Trainable parameters of LoRA with rank `r` on `targets` ("all-linear" for all).
    pub fn lora_parameters(&self, targets: &[String], r: usize, dora: bool) -> usize {
        // DoRA adds a magnitude per output row
        let per_module = |[o, i]: [usize; 2]| r * (o + i) + if dora { o } else { 0 };
        self.linear_modules
            .iter()
            .filter(|m| ModelSpec::targets_select(targets, &m.path))
            .filter_map(|m| m.shape.map(|shape| per_module(shape) * m.count))
            .sum()
    }
}

/// What a model is from its config.json alone, for a well-known checkpoint not downloaded yet:
/// the linear modules and their shapes as the decoder would build them (`dir` stays empty).
pub fn inspect_config(config: &serde_json::Value, what: &str) -> Result<ModelInfo> {
    let table = arch::table()?;
    let recognised = table.recognise(config)?;
    let spec = ModelSpec::from_config(config, &recognised, what)?;
    let linear_modules = planned_modules(&spec, |_, l| Some(l.shape()));
    let (default_targets, default_targets_note) = defaults(&recognised);
    Ok(ModelInfo {
        dir: PathBuf::new(),
        family_id: recognised.family.id.clone(),
        family_name: recognised.family.name.clone(),
        parameters: spec.parameter_count(),
        context_length: context_length(config),
        spec,
        linear_modules,
        default_targets,
        default_targets_note,
    })
}

/// The layer plan's modules grouped by name, each with the shape `shape_of` gives its first
/// instance (layer 0) and the count of all instances (layers × experts).
fn planned_modules(
    spec: &ModelSpec,
    shape_of: impl Fn(&str, &PlannedLinear) -> Option<[usize; 2]>,
) -> Vec<LinearModule> {
    let mut modules: Vec<LinearModule> = Vec::new();
    for l in &spec.linears {
        if let Some(m) = modules.iter_mut().find(|m| m.name == l.name) {
            m.count += spec.layers;
            continue;
        }
        let fused = l.split.map(|split| match split {
            arch::SplitKind::GateUp => "gate, up".to_string(),
            _ => "q, k, v".to_string(),
        });
        let path = spec.linear_path(0, l);
        let shape = shape_of(&path, l);
        modules.push(LinearModule { name: l.name.clone(), path, role: l.role, shape, count: spec.layers, fused });
    }
    modules
}

fn defaults(recognised: &arch::Recognised<'_>) -> (Vec<String>, Option<String>) {
    let default_targets = recognised.default_targets();
    let note = (default_targets != recognised.family.default_targets).then(|| {
        format!(
            "the table's default for {} is {}; this checkpoint's layout names it {}",
            recognised.family.name,
            recognised.family.default_targets.join(","),
            default_targets.join(",")
        )
    });
    (default_targets, note)
}

fn context_length(config: &serde_json::Value) -> Option<usize> {
    ["max_position_embeddings", "seq_length", "n_positions", "model_max_length"]
        .iter()
        .find_map(|k| config.get(*k).and_then(|v| v.as_u64()))
        .map(|v| v as usize)
}

pub fn inspect(dir: &Path) -> Result<ModelInfo> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", config_path.display())))?;
    let table = arch::table()?;
    let recognised = table.recognise(&config)?;
    let spec = ModelSpec::from_config(&config, &recognised, &config_path.display().to_string())?;
    let checkpoint = Checkpoint::open(dir)?;

    let mut parameters = 0usize;
    // buffers some checkpoints carry (rotary frequencies) are not parameters
    for key in checkpoint.keys().into_iter().filter(|k| !k.ends_with(".inv_freq")) {
        if let Ok(view) = checkpoint.file_of(&key).and_then(|f| f.get(&key)) {
            let n: usize = view.shape().iter().product();
            parameters += if view.dtype() == safetensors::Dtype::U8 { 2 * n } else { n };
        }
    }

    // shapes as stored (4-bit packed weights have none)
    let linear_modules = planned_modules(&spec, |path, _| {
        let key = format!("{path}.weight");
        checkpoint.file_of(&key).and_then(|f| f.get(&key)).ok().and_then(|v| match v.shape() {
            [o, i] if v.dtype() != safetensors::Dtype::U8 => Some([*o, *i]),
            _ => None,
        })
    });
    let (default_targets, default_targets_note) = defaults(&recognised);
    let context_length = context_length(&config);
    Ok(ModelInfo {
        dir: dir.to_path_buf(),
        family_id: recognised.family.id.clone(),
        family_name: recognised.family.name.clone(),
        spec,
        context_length,
        parameters,
        linear_modules,
        default_targets,
        default_targets_note,
    })
}
