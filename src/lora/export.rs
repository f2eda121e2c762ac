//! Export of a trained adapter: a PEFT adapter folder, a llama.cpp GGUF adapter (gguf.rs) or a
//! merged model (merge.rs), and the `export` job the command line and the GUI run.
//!
//! Every output is written under a temporary name and renamed into place, and an existing
//! folder is only ever replaced whole, never half overwritten.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use super::gguf::{self, GgufType};
use super::gguf_model::{self, GgufQuant};
use super::merge::{self, Divergence, MergeInto, MergeOptions};
use super::peft::{read_adapter, PeftAdapter};
use crate::error::{Error, Result};
use crate::model::{BaseWeights, ModelSpec};
use crate::weights::RawTensor;

/// The float type of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorDType {
    F32,
    Bf16,
    F16,
}

impl TensorDType {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(TensorDType::F32),
            "bf16" | "bfloat16" => Ok(TensorDType::Bf16),
            "f16" | "float16" | "fp16" => Ok(TensorDType::F16),
            other => Err(Error::Invalid(format!("unknown dtype {other:?}: use f32, bf16 or f16"))),
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            TensorDType::F32 => Dtype::F32,
            TensorDType::Bf16 => Dtype::BF16,
            TensorDType::F16 => Dtype::F16,
        }
    }

    /// transformers' name, as config.json's `torch_dtype` / `dtype` give it.
    pub fn torch_name(self) -> &'static str {
        match self {
            TensorDType::F32 => "float32",
            TensorDType::Bf16 => "bfloat16",
            TensorDType::F16 => "float16",
        }
    }
}

/// f32 values as little-endian bytes of `dtype`.
pub fn encode(values: &[f32], dtype: TensorDType) -> Vec<u8> {
    match dtype {
        TensorDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorDType::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        TensorDType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    }
}

fn raw(name: String, t: &Tensor, dtype: TensorDType) -> Result<RawTensor> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(RawTensor { name, dtype: dtype.safetensors(), shape: t.dims().to_vec(), data: encode(&values, dtype) })
}

/// What the trainer knows about the run, for the model card and the chat metadata. Every
/// field is optional.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// The base model as users name it (a hub id); else the base folder is used.
    pub base_model: Option<String>,
    /// The run's RunConfig as TOML text.
    pub run_config: Option<String>,
    pub dataset_name: Option<String>,
    /// Number of training examples.
    pub dataset_size: Option<usize>,
    pub steps: Option<usize>,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// The chat template (Jinja, as in tokenizer_config.json) the model was trained with.
    pub chat_template: Option<String>,
    /// Strings that end a reply (e.g. `<|im_end|>`).
    pub stop_tokens: Vec<String>,
    /// The same template in Ollama's Go-template syntax, for the Modelfile's TEMPLATE.
    pub ollama_template: Option<String>,
    /// A line for the model card about the base (e.g. the GGUF file it was trained on).
    pub base_note: Option<String>,
}

/// The safetensors header metadata PEFT writes.
fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

pub(crate) fn write_safetensors_file(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let data = safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), Some(pt_metadata()))
        .map_err(|cause| Error::Safetensors { path: path.to_path_buf(), cause })?;
    gguf::write_file_atomically(path, &data)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Build a folder at `out` by filling a temporary sibling and renaming it into place. An
/// existing `out` is replaced only when it is empty or holds one of `marker_files` (an
/// earlier export of the same kind), so a wrong path never costs the user a folder.
pub fn replace_folder(out: &Path, marker_files: &[&str], fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder name to export to", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: the folder to export into does not exist; create it first",
            parent.display()
        )));
    }
    if out.exists() {
        let replaceable = out.is_dir()
            && (marker_files.iter().any(|m| out.join(m).exists())
                || std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none());
        if !replaceable {
            return Err(Error::Invalid(format!(
                "{} already exists and is not an earlier export of this kind; choose a new folder name",
                out.display()
            )));
        }
    }
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        // swap: the old folder moves aside first, so `out` is always either old or new
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        if let Err(e) = std::fs::rename(&tmp, out) {
            let _ = std::fs::rename(&old, out);
            return Err(Error::io(out, e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    }
    Ok(())
}

/// The module names of the adapted linears (what PEFT's target_modules matches), sorted: the
/// adapter's own target that selects each (`attn.c_proj`, so that PEFT does not also adapt
/// Qwen's `mlp.c_proj`), else the last part of its path.
fn adapted_names(adapter: &PeftAdapter) -> Vec<String> {
    let targets = &adapter.settings.targets;
    let name = |path: &String| match targets.iter().find(|t| crate::arch::target_matches(path, t)) {
        Some(target) => target.clone(),
        None => path.rsplit('.').next().unwrap_or(path).to_string(),
    };
    let names: BTreeSet<String> = adapter.pairs.keys().map(name).collect();
    names.into_iter().collect()
}

/// adapter_config.json with every field PEFT 0.21 writes (docs/adapter-formats.md §1.4).
pub fn adapter_config_json(adapter: &PeftAdapter, base_model: Option<&str>) -> serde_json::Value {
    let s = &adapter.settings;
    let alpha = if s.alpha.fract() == 0.0 { serde_json::json!(s.alpha as i64) } else { serde_json::json!(s.alpha) };
    serde_json::json!({
        "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
        "base_model_name_or_path": base_model, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
        "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": false,
        "lora_dropout": s.dropout, "lora_ga_config": null, "megatron_config": null,
        "megatron_core": "megatron.core", "modules_to_save": null, "monteclora_config": null,
        "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": s.r,
        "rank_pattern": {}, "revision": null, "target_modules": adapted_names(adapter),
        "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
        "use_bdlora": null, "use_dora": s.use_dora, "use_qalora": false, "use_rslora": s.use_rslora,
        "velora_config": null
    })
}

/// The README.md model card of an export.
pub fn model_card(kind: &str, base_model: Option<&str>, adapter: &PeftAdapter, info: &ExportInfo) -> String {
    let base = base_model.unwrap_or("unknown");
    let s = &adapter.settings;
    let mut md = String::new();
    md.push_str("---\n");
    if base_model.is_some() {
        md.push_str(&format!("base_model: {}\n", serde_json::Value::String(base.to_string())));
    }
    md.push_str("library_name: peft\ntags:\n- lora\n- qlora-studio\n---\n\n");
    md.push_str(&format!("# {kind} for {base}\n\nTrained with qlora-studio.\n\n"));
    md.push_str(&format!("- Base model: `{base}`\n"));
    if let Some(note) = &info.base_note {
        md.push_str(&format!("- {note}\n"));
    }
    md.push_str(&format!(
        "- LoRA: r = {}, alpha = {}, dropout = {}, rsLoRA = {}, DoRA = {}, modules: {}\n",
        s.r,
        s.alpha,
        s.dropout,
        s.use_rslora,
        s.use_dora,
        adapted_names(adapter).join(", ")
    ));
    if let Some(name) = &info.dataset_name {
        match info.dataset_size {
            Some(n) => md.push_str(&format!("- Dataset: {name} ({n} examples)\n")),
            None => md.push_str(&format!("- Dataset: {name}\n")),
        }
    }
    if let Some(steps) = info.steps {
        md.push_str(&format!("- Steps: {steps}\n"));
    }
    if let Some(l) = info.final_train_loss {
        md.push_str(&format!("- Final training loss: {l:.4}\n"));
    }
    if let Some(l) = info.final_val_loss {
        md.push_str(&format!("- Final validation loss: {l:.4}\n"));
    }
    if !info.stop_tokens.is_empty() {
        let stops: Vec<String> = info.stop_tokens.iter().map(|t| format!("`{t}`")).collect();
        md.push_str(&format!("- Stop tokens: {}\n", stops.join(", ")));
    }
    if let Some(t) = &info.chat_template {
        md.push_str(&format!("\n## Chat template\n\nAlso in `chat_template.jinja`.\n\n```jinja\n{t}\n```\n"));
    }
    if let Some(c) = &info.run_config {
        md.push_str(&format!("\n## Run configuration\n\n```toml\n{}\n```\n", c.trim_end()));
    }
    md.push_str(
        "\n## Use\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n\
         model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n",
    );
    md
}

/// Write `adapter` as a PEFT adapter folder at `out`: adapter_model.safetensors (f32 unless
/// asked), adapter_config.json, README.md, and chat_template.jinja when a template is known.
/// `base_model` goes into base_model_name_or_path.
pub fn write_peft_adapter(
    adapter: &PeftAdapter,
    out: &Path,
    dtype: TensorDType,
    base_model: Option<&str>,
    info: &ExportInfo,
) -> Result<()> {
    if adapter.pairs.is_empty() {
        return Err(Error::Invalid("the adapter has no LoRA tensors to export".into()));
    }
    let r = adapter.settings.r;
    let mut tensors = Vec::new();
    for (path, (a, b)) in &adapter.pairs {
        // per-module ranks would need rank_pattern, which the adapters we make never have
        if a.dim(0)? != r || b.dim(1)? != r {
            return Err(Error::Invalid(format!("{path}: LoRA rank {} differs from the adapter's r = {r}", a.dim(0)?)));
        }
        tensors.push(raw(format!("base_model.model.{path}.lora_A.weight"), a, dtype)?);
        tensors.push(raw(format!("base_model.model.{path}.lora_B.weight"), b, dtype)?);
        if let Some(m) = adapter.magnitudes.get(path) {
            // PEFT's own name for DoRA's magnitude in a saved adapter (no `.weight`)
            tensors.push(raw(format!("base_model.model.{path}.lora_magnitude_vector"), m, dtype)?);
        }
    }
    let config = adapter_config_json(adapter, base_model);
    replace_folder(out, &["adapter_config.json"], |dir| {
        write_safetensors_file(&dir.join("adapter_model.safetensors"), &tensors)?;
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
        write_text(&dir.join("adapter_config.json"), &text)?;
        write_text(&dir.join("README.md"), &model_card("LoRA adapter", base_model, adapter, info))?;
        if let Some(t) = &info.chat_template {
            write_text(&dir.join("chat_template.jinja"), t)?;
        }
        Ok(())
    })
}

/// Read config.json of a model folder into its `ModelSpec` (no weights are read).
pub fn spec_of(dir: &Path) -> Result<ModelSpec> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", config_path.display())))?;
    let recognised = crate::arch::table()?.recognise(&config).map_err(|e| match e {
        Error::UnknownFamily(m) => Error::UnknownFamily(format!("{}: {m}", config_path.display())),
        other => other,
    })?;
    ModelSpec::from_config(&config, &recognised, &config_path.display().to_string())
}

/// The chat template of a model folder: tokenizer_config.json's `chat_template` (a string),
/// else chat_template.jinja.
pub fn base_chat_template(dir: &Path) -> Option<String> {
    let from_config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("chat_template").and_then(|t| t.as_str()).map(str::to_string));
    from_config.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
}

/// The PEFT adapter folder inside `from`: `from` itself, or its `adapter/` subfolder.
pub fn adapter_dir(from: &Path) -> Result<PathBuf> {
    if !from.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such folder; give a PEFT adapter folder or a training checkpoint folder",
            from.display()
        )));
    }
    for dir in [from.to_path_buf(), from.join("adapter")] {
        if dir.join("adapter_config.json").is_file() {
            if !dir.join("adapter_model.safetensors").is_file() {
                return Err(Error::Invalid(format!(
                    "{}: adapter_config.json without adapter_model.safetensors (an adapter_model.bin is not read: \
                     save the adapter in safetensors form)",
                    dir.display()
                )));
            }
            return Ok(dir);
        }
    }
    Err(Error::Invalid(format!(
        "{}: neither a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) nor a checkpoint \
         folder holding one",
        from.display()
    )))
}

/// The base model folder: `explicit` if given, else base_model_name_or_path of the adapter
/// (read from `adapter_dir`) when it is a local folder with a config.json.
pub fn base_dir(adapter: &PeftAdapter, adapter_dir: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if !dir.join("config.json").is_file() {
            return Err(Error::Invalid(format!(
                "{}: not a model folder with a config.json; pass the base model's folder with --model",
                dir.display()
            )));
        }
        return Ok(dir.to_path_buf());
    }
    match (adapter.local_base(adapter_dir), adapter.base_model.as_deref()) {
        (Some(dir), _) => Ok(dir),
        // a .gguf file (imported as training imported it, again if the import is gone) or a
        // hub id in the local cache: resolved as training resolved it, without downloading
        (None, Some(name)) => crate::hub::resolve_with(name, &offline()).map(|r| r.dir).map_err(|e| {
            Error::Invalid(format!(
                "the adapter's base model {name:?} (base_model_name_or_path in adapter_config.json) is not a local \
                 model folder, GGUF file or cached hub model ({e}); pass the base model's folder with --model"
            ))
        }),
        (None, None) => Err(Error::Invalid(
            "the adapter does not name its base model (base_model_name_or_path); pass --model BASE_DIR".into(),
        )),
    }
}

fn offline() -> crate::hub::ResolveOptions {
    crate::hub::ResolveOptions { download: None, ..Default::default() }
}

/// What a PEFT export names as its base when the adapter was trained on a GGUF file, which PEFT
/// cannot load: the hub id the file says it came from, else the Hugging Face folder it was
/// imported into; and the model card's line saying which file it was.
fn peft_base_for_gguf(gguf: &str) -> Result<(String, String)> {
    let file = Path::new(gguf);
    if let Some(id) = crate::hub::gguf::source_hub_id(file) {
        return Ok((id.clone(), format!("Trained on the GGUF file `{gguf}`, converted from `{id}`")));
    }
    let dir = crate::hub::resolve_with(gguf, &offline())?.dir;
    Ok((
        dir.display().to_string(),
        format!(
            "Trained on the GGUF file `{gguf}` (its metadata names no Hugging Face source), imported by qlora-studio \
             into the Hugging Face folder named as the base above"
        ),
    ))
}

/// Check that the adapter fits the base of `spec` without loading weights: every pair's
/// module is a linear of the base, with the shapes the base's config implies.
pub fn check_adapter_fits(adapter: &PeftAdapter, spec: &ModelSpec, base: &Path) -> Result<()> {
    let foreign = spec.unknown_targets(&adapter.settings.targets);
    if !foreign.is_empty() {
        return Err(Error::Invalid(format!(
            "the adapter targets {}, which {} ({}) does not have (its linear modules: {}); is --model the \
             adapter's base model?",
            foreign.join(", "),
            base.display(),
            spec.family_name(),
            spec.linear_names().join(", ")
        )));
    }
    let paths: BTreeSet<String> = spec.all_linears().map(|(_, path, _)| path).collect();
    if let Some(p) = adapter.pairs.keys().find(|p| !paths.contains(*p)) {
        return Err(Error::Invalid(format!(
            "the adapter has LoRA on {p}, which is not a linear module of {} ({} layers); is --model the \
             adapter's base model?",
            base.display(),
            spec.layers
        )));
    }
    Ok(())
}

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Peft,
    Gguf,
    Merged,
    /// The merged model as one llama.cpp GGUF file in this quantization.
    GgufModel(GgufQuant),
}

impl ExportFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "peft" => Ok(ExportFormat::Peft),
            "gguf" => Ok(ExportFormat::Gguf),
            "merged" => Ok(ExportFormat::Merged),
            "gguf-model" => Ok(ExportFormat::GgufModel(GgufQuant::Q4KM)),
            other => {
                Err(Error::Invalid(format!("unknown export format {other:?}: use peft, gguf, merged or gguf-model")))
            }
        }
    }
}

/// One export job.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// A PEFT adapter folder or a training checkpoint folder holding one.
    pub from: PathBuf,
    pub format: ExportFormat,
    /// The base model folder; default: the adapter's base_model_name_or_path.
    pub base: Option<PathBuf>,
    /// A folder (peft, merged) or a .gguf file (gguf).
    pub out: PathBuf,
    /// Tensor type; default f32 for adapters and the base's own types for a merged model.
    pub dtype: Option<TensorDType>,
    pub merge_into: MergeInto,
    /// Also write an Ollama Modelfile beside a GGUF adapter.
    pub modelfile: bool,
    /// For a merged model: compare it with base + adapter on a few token sequences.
    pub divergence_check: bool,
    /// The adapter was trained on the NF4 base (QLoRA): the divergence check's reference is
    /// then the NF4 base + adapter. `None`: assume so when merging into the dequantized weights.
    pub trained_on_nf4: Option<bool>,
    /// Token ids the divergence check runs on (e.g. a few tokenized prompts); empty: four
    /// random sequences.
    pub check_sequences: Vec<Vec<u32>>,
    pub info: ExportInfo,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub written: Vec<PathBuf>,
    pub divergence: Option<Divergence>,
}

/// Whether two paths name the same existing file or folder.
pub(crate) fn same_place(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Run one export job.
pub fn export(req: &ExportRequest) -> Result<ExportReport> {
    let device = Device::Cpu;
    let dir = adapter_dir(&req.from)?;
    if same_place(&req.out, &req.from) || same_place(&req.out, &dir) {
        return Err(Error::Invalid(format!(
            "{}: the export would replace the folder it reads from; choose another output path",
            req.out.display()
        )));
    }
    let adapter = read_adapter(&dir, &device)?;
    let mut info = req.info.clone();
    if info.run_config.is_none() {
        info.run_config = std::fs::read_to_string(req.from.join("run.toml")).ok();
    }
    // a trainer checkpoint says whether its adapter was trained on the NF4 base
    let run = info.run_config.as_deref().and_then(|t| crate::train::RunConfig::from_toml_str(t, "run.toml").ok());
    let trained_on_nf4 = req.trained_on_nf4.or_else(|| run.as_ref().map(|c| c.model.mode == crate::train::Mode::Qlora));
    match req.format {
        ExportFormat::Peft => {
            let dtype = req.dtype.unwrap_or(TensorDType::F32);
            let base_name = match (&info.base_model, &req.base) {
                (Some(name), _) => Some(name.clone()),
                (None, Some(base)) => {
                    let spec = spec_of(base)?;
                    check_adapter_fits(&adapter, &spec, base)?;
                    Some(base.display().to_string())
                }
                (None, None) => adapter.base_model.clone(),
            };
            let base_name = match base_name {
                Some(name) if name.to_ascii_lowercase().ends_with(".gguf") => {
                    let (name, note) = peft_base_for_gguf(&name)?;
                    info.base_note.get_or_insert(note);
                    Some(name)
                }
                other => other,
            };
            write_peft_adapter(&adapter, &req.out, dtype, base_name.as_deref(), &info)?;
            Ok(ExportReport { written: vec![req.out.clone()], divergence: None })
        }
        ExportFormat::Gguf => {
            let dtype = match req.dtype.unwrap_or(TensorDType::F32) {
                TensorDType::F32 => GgufType::F32,
                TensorDType::F16 => GgufType::F16,
                TensorDType::Bf16 => {
                    return Err(Error::Invalid("GGUF adapters are written in f32 or f16; choose one of those".into()))
                }
            };
            let base = base_dir(&adapter, &dir, req.base.as_deref())?;
            let spec = spec_of(&base)?;
            check_adapter_fits(&adapter, &spec, &base)?;
            let template = info.chat_template.clone().or_else(|| base_chat_template(&base));
            let name = info.base_model.clone().map(|b| format!("{b} LoRA"));
            gguf::write_gguf_adapter(&adapter, &spec, &req.out, dtype, name.as_deref(), template.as_deref())?;
            let mut written = vec![req.out.clone()];
            if req.modelfile {
                let file = req.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                // Ollama's FROM takes a .gguf file as it is: the file a GGUF-based run trained on
                let trained_on_gguf = adapter.base_model.clone().filter(|b| b.to_ascii_lowercase().ends_with(".gguf"));
                let from = info.base_model.clone().or(trained_on_gguf).unwrap_or_else(|| base.display().to_string());
                let text = gguf::modelfile_text(&from, Some(&file), info.ollama_template.as_deref(), &info.stop_tokens);
                let path = req.out.with_file_name("Modelfile");
                gguf::write_file_atomically(&path, text.as_bytes())?;
                written.push(path);
            }
            Ok(ExportReport { written, divergence: None })
        }
        ExportFormat::Merged => {
            let base = base_dir(&adapter, &dir, req.base.as_deref())?;
            let spec = spec_of(&base)?;
            check_adapter_fits(&adapter, &spec, &base)?;
            let opts = MergeOptions { into: req.merge_into, dtype: req.dtype, ..MergeOptions::default() };
            if info.base_model.is_none() {
                info.base_model = Some(base.display().to_string());
            }
            merge::write_merged_model(&adapter, &base, &req.out, &opts, &info)?;
            let divergence = if req.divergence_check {
                let reference = match (req.merge_into, trained_on_nf4) {
                    (MergeInto::Dequantized { double_quant }, None | Some(true)) => {
                        BaseWeights::Nf4 { double_quant, compute: DType::F32 }
                    }
                    (MergeInto::Original, Some(true)) => BaseWeights::Nf4 { double_quant: true, compute: DType::F32 },
                    _ => BaseWeights::Dense(DType::F32),
                };
                Some(merge::divergence_check(&dir, &base, &req.out, reference, &req.check_sequences, &device)?)
            } else {
                None
            };
            Ok(ExportReport { written: vec![req.out.clone()], divergence })
        }
        ExportFormat::GgufModel(quant) => {
            let base = base_dir(&adapter, &dir, req.base.as_deref())?;
            let spec = spec_of(&base)?;
            check_adapter_fits(&adapter, &spec, &base)?;
            // refused before any weight is merged
            gguf_model::model_arch(&spec)?;
            gguf::check_output_path(&req.out)?;
            if info.base_model.is_none() {
                info.base_model = Some(base.display().to_string());
            }
            let file = req.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // the merged checkpoint is written beside the output first (in the base's own dtype),
            // then read back tensor by tensor into the GGUF, and removed
            let scratch = req.out.with_file_name(format!(".{file}.merged-{}", std::process::id()));
            let opts = MergeOptions { into: req.merge_into, dtype: None, ..MergeOptions::default() };
            // a run on a named template: the GGUF carries that one, not the base's own
            if info.chat_template.is_none() {
                info.chat_template = run.as_ref().and_then(|c| run_template(&c.data.template, &spec, &base));
            }
            if info.stop_tokens.is_empty() {
                info.stop_tokens = base_eos_token(&base).into_iter().collect();
            }
            let gguf_info = gguf_model::GgufModelInfo {
                name: info.base_model.as_deref().map(|b| format!("{} (merged LoRA)", model_name(b))),
                chat_template: info.chat_template.clone(),
            };
            let result = merge::write_merged_model(&adapter, &base, &scratch, &opts, &info)
                .and_then(|()| gguf_model::write_gguf_model(&scratch, &spec, quant, &req.out, &gguf_info));
            let _ = std::fs::remove_dir_all(&scratch);
            result?;
            let mut written = vec![req.out.clone()];
            if req.modelfile {
                let template = info.ollama_template.clone().or_else(|| {
                    let jinja = info.chat_template.clone().or_else(|| base_chat_template(&base))?;
                    crate::data::ollama_template_for(&jinja).map(str::to_string)
                });
                let text = gguf::modelfile_text(&format!("./{file}"), None, template.as_deref(), &info.stop_tokens);
                let path = req.out.with_file_name("Modelfile");
                gguf::write_file_atomically(&path, text.as_bytes())?;
                written.push(path);
            }
            Ok(ExportReport { written, divergence: None })
        }
    }
}

/// The Jinja template a run's `[data] template` choice means for `base`.
fn run_template(choice: &crate::data::TemplateChoice, spec: &ModelSpec, base: &Path) -> Option<String> {
    use crate::data::{family_template_name, named_template, TemplateChoice};
    match choice {
        TemplateChoice::Named(name) => named_template(name).map(|t| t.template.clone()),
        TemplateChoice::Auto => base_chat_template(base)
            .or_else(|| named_template(family_template_name(Some(&spec.family))).map(|t| t.template.clone())),
        TemplateChoice::Model | TemplateChoice::ModelNamed(_) => base_chat_template(base),
    }
}

/// The base tokenizer's end-of-sequence token (tokenizer_config.json), a reply's stop string.
fn base_eos_token(base: &Path) -> Option<String> {
    let text = std::fs::read_to_string(base.join("tokenizer_config.json")).ok()?;
    let tc: serde_json::Value = serde_json::from_str(&text).ok()?;
    let eos = &tc["eos_token"];
    eos.as_str().or_else(|| eos["content"].as_str()).map(str::to_string)
}

/// The last part of a hub id or path, for `general.name`.
fn model_name(base: &str) -> &str {
    let trimmed = base.trim_end_matches(['/', '\\']);
    trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed)
}
