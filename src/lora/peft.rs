//! Reading a PEFT LoRA adapter folder: adapter_config.json and adapter_model.safetensors
//! (keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and with DoRA
//! `.lora_magnitude_vector`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

use super::{LoraLinear, LoraPair, LoraSettings};
use crate::error::{Error, Result};
use crate::model::spec::ModelSpec;
use crate::weights::SafetensorsFile;

// PEFT writes `null` for settings left at their default (PEFT 0.20: `fan_in_fan_out`), so every
// optional key takes null as its default.
#[derive(Debug, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default, deserialize_with = "null_as_default")]
    lora_dropout: f32,
    #[serde(default, deserialize_with = "null_as_default")]
    use_rslora: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    use_dora: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    fan_in_fan_out: bool,
    target_modules: serde_json::Value,
    #[serde(default, deserialize_with = "null_as_default")]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An adapter read from disk: its settings and the A/B tensors by module path.
pub struct PeftAdapter {
    pub settings: LoraSettings,
    /// module path → (A [r, in], B [out, r])
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
    /// DoRA: module path → magnitude m [out] (every pair has one when settings.use_dora)
    pub magnitudes: BTreeMap<String, Tensor>,
    /// The base model named in adapter_config.json (a hub id or a folder), if any.
    pub base_model: Option<String>,
}

const KEY_PREFIX: &str = "base_model.model.";

pub fn read_adapter(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let cfg: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not a PEFT adapter config: {e}", config_path.display())))?;
    let bad = |key: &str, message: String| Error::bad_entry(&config_path, key, message);
    if let Some(t) = cfg.peft_type.as_deref().filter(|t| *t != "LORA") {
        return Err(bad("peft_type", format!("{t:?} adapters are not LoRA adapters")));
    }
    if cfg.fan_in_fan_out {
        return Err(bad(
            "fan_in_fan_out",
            "true is only meaningful for GPT-2 Conv1D layers, which no supported family has".into(),
        ));
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return Err(bad("rank_pattern", "per-module ranks or alphas are not supported".into()));
    }
    let targets: Vec<String> = match &cfg.target_modules {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(s) if s == "all-linear" => vec![s.clone()],
        other => return Err(bad("target_modules", format!("expected a list of module names, found {other}"))),
    };
    let settings = LoraSettings {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.use_rslora,
        use_dora: cfg.use_dora,
        targets,
    };

    let weights_path = dir.join("adapter_model.safetensors");
    let file = SafetensorsFile::open(&weights_path)?;
    let mut a_by_path = BTreeMap::new();
    let mut b_by_path = BTreeMap::new();
    let mut magnitudes = BTreeMap::new();
    for key in file.keys() {
        let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
            return Err(file.error(&key, format!("not a LoRA key (expected `{KEY_PREFIX}<module>.lora_A.weight`)")));
        };
        let tensor = || -> Result<Tensor> { Ok(file.tensor(&key, device)?.to_dtype(DType::F32)?) };
        if let Some(path) = rest.strip_suffix(".lora_A.weight") {
            a_by_path.insert(path.to_string(), tensor()?);
        } else if let Some(path) = rest.strip_suffix(".lora_B.weight") {
            b_by_path.insert(path.to_string(), tensor()?);
        } else if let Some(path) =
            rest.strip_suffix(".lora_magnitude_vector").or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
        {
            magnitudes.insert(path.to_string(), tensor()?);
        } else {
            return Err(file
                .error(&key, "only lora_A / lora_B weights are supported (no embeddings, biases or modules_to_save)"));
        }
    }
    let mut pairs = BTreeMap::new();
    for (path, a) in a_by_path {
        let b = b_by_path
            .remove(&path)
            .ok_or_else(|| file.error(&format!("{KEY_PREFIX}{path}.lora_B.weight"), "missing: lora_A has no lora_B"))?;
        pairs.insert(path, (a, b));
    }
    if let Some(path) = b_by_path.keys().next() {
        return Err(file.error(&format!("{KEY_PREFIX}{path}.lora_A.weight"), "missing: lora_B has no lora_A"));
    }
    // DoRA: a magnitude for every pair, and none without use_dora
    if let Some(path) = magnitudes.keys().find(|p| !pairs.contains_key(*p)) {
        return Err(
            file.error(&format!("{KEY_PREFIX}{path}.lora_magnitude_vector"), "a magnitude without its LoRA pair")
        );
    }
    match (settings.use_dora, pairs.keys().find(|p| !magnitudes.contains_key(*p))) {
        (true, Some(path)) => {
            return Err(file.error(&format!("{KEY_PREFIX}{path}.lora_magnitude_vector"), "missing: use_dora is true"))
        }
        (false, _) if !magnitudes.is_empty() => {
            return Err(bad("use_dora", "false, but the adapter file holds DoRA magnitude vectors".into()))
        }
        _ => {}
    }
    Ok(PeftAdapter { settings, pairs, magnitudes, base_model: cfg.base_model_name_or_path.filter(|s| !s.is_empty()) })
}

impl PeftAdapter {
    /// Put the adapter's pairs on the matching linears; every pair must find its module and
    /// have the module's shapes.
    pub fn apply<'a>(&self, linears: impl Iterator<Item = &'a mut LoraLinear>, dir: &Path) -> Result<()> {
        let weights_path = dir.join("adapter_model.safetensors");
        let mut used = std::collections::BTreeSet::new();
        for lin in linears {
            let Some((a, b)) = self.pairs.get(&lin.path) else { continue };
            let (out_f, in_f, r) = (lin.base.out_features(), lin.base.in_features(), self.settings.r);
            for (key, t, want) in [("lora_A", a, [r, in_f]), ("lora_B", b, [out_f, r])] {
                if t.dims() != want {
                    return Err(Error::bad_entry(
                        &weights_path,
                        format!("{KEY_PREFIX}{}.{key}.weight", lin.path),
                        format!("shape {:?}, expected {:?} for this model with r = {r}", t.dims(), want),
                    ));
                }
            }
            let magnitude = match self.magnitudes.get(&lin.path) {
                Some(m) if m.dims() != [out_f] => {
                    return Err(Error::bad_entry(
                        &weights_path,
                        format!("{KEY_PREFIX}{}.lora_magnitude_vector", lin.path),
                        format!("shape {:?}, expected [{out_f}] (one per output row)", m.dims()),
                    ))
                }
                Some(m) => Some(Var::from_tensor(m)?),
                None => None,
            };
            let base_row_sq = magnitude.as_ref().map(|_| lin.base_row_sq(a.device())).transpose()?;
            lin.lora = Some(LoraPair {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
                scale: self.settings.scale(),
                dropout: self.settings.dropout,
                magnitude,
                base_row_sq,
            });
            used.insert(lin.path.clone());
        }
        if let Some(path) = self.pairs.keys().find(|p| !used.contains(*p)) {
            return Err(Error::bad_entry(
                &weights_path,
                format!("{KEY_PREFIX}{path}.lora_A.weight"),
                "this module is not in the model: is the adapter for this base model?",
            ));
        }
        Ok(())
    }
}

impl PeftAdapter {
    /// The adapter on `model`'s LoRA pairs, with the settings they were made with.
    pub fn from_model(model: &crate::model::Model, settings: &LoraSettings) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        let mut magnitudes = BTreeMap::new();
        for lin in model.linears() {
            if let Some(pair) = &lin.lora {
                pairs.insert(lin.path.clone(), (pair.a.as_tensor().detach(), pair.b.as_tensor().detach()));
                if let Some(m) = &pair.magnitude {
                    magnitudes.insert(lin.path.clone(), m.as_tensor().detach());
                }
            }
        }
        if pairs.is_empty() {
            return Err(Error::Invalid("the model has no LoRA layers to export".into()));
        }
        let settings = LoraSettings { use_dora: !magnitudes.is_empty(), ..settings.clone() };
        Ok(PeftAdapter { settings, pairs, magnitudes, base_model: None })
    }

    /// The base model folder named by base_model_name_or_path, when it is a local folder with
    /// a config.json: as given (relative to the working folder, as PEFT reads it), or relative
    /// to the adapter folder `dir`.
    pub fn local_base(&self, dir: &Path) -> Option<std::path::PathBuf> {
        let name = Path::new(self.base_model.as_deref()?);
        let mut candidates = vec![name.to_path_buf()];
        if name.is_relative() {
            candidates.push(dir.join(name));
        }
        candidates.into_iter().find(|c| c.join("config.json").is_file())
    }

    /// Check that this adapter (read from `dir`) was made for a model like `spec`: every
    /// target must select one of its linear modules, and when adapter_config.json names a
    /// local base folder, that base must be of a family with interchangeable weights. Shapes
    /// are checked when the pairs are applied.
    pub fn check_base(&self, spec: &ModelSpec, dir: &Path) -> Result<()> {
        let config_path = dir.join("adapter_config.json");
        let linear_names = spec.linear_names();
        let foreign = spec.unknown_targets(&self.settings.targets);
        if !foreign.is_empty() {
            return Err(Error::bad_entry(
                &config_path,
                "target_modules",
                format!(
                    "names {}, which this {} model does not have (its linear modules: {}); the adapter was made \
                     for another model family: load it onto its own base model",
                    foreign.join(", "),
                    spec.family,
                    linear_names.join(", ")
                ),
            ));
        }
        if let (Some(base), Some(base_dir)) = (self.base_model.as_deref(), self.local_base(dir)) {
            let table = crate::arch::table()?;
            if let Ok(recognised) = table.recognise_file(&base_dir.join("config.json")) {
                let ours = table.family(&spec.family).map_or(spec.family.as_str(), |f| f.weights_group());
                if recognised.family.weights_group() != ours {
                    return Err(Error::bad_entry(
                        &config_path,
                        "base_model_name_or_path",
                        format!(
                            "the adapter was trained on {base}, a {} model, but this model is {}: load it onto \
                             a {} base",
                            recognised.family.id, spec.family, recognised.family.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
