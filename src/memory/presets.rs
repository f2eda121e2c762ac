//! Real model configs kept in assets/model_configs.json, so the estimate can answer for the
//! famous shapes before anything is downloaded.

use serde_json::Value;

use crate::model::ModelSpec;
use crate::{Error, Result};

const CONFIGS: &str = include_str!("../../assets/model_configs.json");

fn all() -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(CONFIGS) {
        Ok(Value::Object(map)) => Ok(map.into_iter().filter(|(k, _)| !k.starts_with('_')).collect()),
        Ok(_) => Err(Error::Invalid("assets/model_configs.json: expected an object of configs".into())),
        Err(e) => Err(Error::Invalid(format!("assets/model_configs.json: {e}"))),
    }
}

/// The preset names, in the file's order.
pub fn names() -> Vec<String> {
    all().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// Whether `name` is a preset name or the hub id of one.
pub fn is_preset(name: &str) -> bool {
    config(name).is_ok()
}

/// The config.json of a model preset, by its name or its hub id (`_name_or_path`).
pub fn config(name: &str) -> Result<Value> {
    let map = all()?;
    let by_name = map.get(&name.to_ascii_lowercase());
    let by_hub_id = || {
        map.values()
            .find(|c| c.get("_name_or_path").and_then(|n| n.as_str()).is_some_and(|n| n.eq_ignore_ascii_case(name)))
    };
    by_name.or_else(by_hub_id).cloned().ok_or_else(|| {
        Error::Invalid(format!(
            "no model preset {name:?}; presets: {}",
            map.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })
}

/// The `ModelSpec` of a config.json, recognised through the architecture table.
pub fn spec_of(config: &Value, what: &str) -> Result<ModelSpec> {
    let table = crate::arch::table()?;
    let recognised = table.recognise(config)?;
    ModelSpec::from_config(config, &recognised, what)
}

/// The spec of a model folder (its config.json), a config.json file, or a preset name.
pub fn spec_for(model: &str) -> Result<ModelSpec> {
    let path = std::path::Path::new(model);
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    if file.is_file() {
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", file.display())))?;
        return spec_of(&config, &file.display().to_string());
    }
    super::grid::preset_spec(model)
}
