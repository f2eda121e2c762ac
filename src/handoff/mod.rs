//! Handing a run to a multi-GPU trainer, and taking its result back.
//!
//! When a run prepared here fits no local device, [`write`] writes it as a LLaMA-Factory or
//! axolotl job: the dataset converted to the tool's format and split as our trainer splits it,
//! the tool's config YAML key for key from the [`RunConfig`], a DeepSpeed config (ZeRO-2, or
//! ZeRO-3 when the per-GPU estimate does not fit ZeRO-2), a `launch.sh` for N GPUs on M nodes and
//! a README. [`import::read_result`] reads back the folder the tool writes (a PEFT adapter with
//! HF Trainer's trainer_state.json or LLaMA-Factory's trainer_log.jsonl) as a run of ours.

mod dataset;
pub mod import;
mod templates;
mod yaml;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use dataset::Kind as DataKind;
pub use import::{read_result, Imported};
pub use templates::ToolTemplate;

use crate::data::TemplateChoice;
use crate::error::{Error, Result};
use crate::memory::{Estimate, Zero};
use crate::train::{Checkpointing, Mode, RunConfig, Schedule};
use crate::weights::write_atomic;
use yaml::Yaml;

/// The versions the written configs were run with (scripts/check-handoff.sh).
pub const LLAMAFACTORY_VERSION: &str = "0.9.5";
pub const AXOLOTL_VERSION: &str = "0.19.0";

/// The run config as it was handed off, beside the job (read back by `import`).
pub const RUN_CONFIG_FILE: &str = "qlora-studio-run.toml";
/// Where the job writes its result, relative to the job's folder.
pub const OUTPUT_DIR: &str = "output";

/// The trainer a run is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    LlamaFactory,
    Axolotl,
}

impl Tool {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "llamafactory" => Ok(Tool::LlamaFactory),
            "axolotl" => Ok(Tool::Axolotl),
            _ => Err(Error::Invalid(format!("--to {s}: hand the run to llamafactory or axolotl"))),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Tool::LlamaFactory => "LLaMA-Factory",
            Tool::Axolotl => "axolotl",
        }
    }

    /// The config file the job is launched with.
    pub fn config_file(self) -> &'static str {
        match self {
            Tool::LlamaFactory => "llamafactory.yaml",
            Tool::Axolotl => "axolotl.yaml",
        }
    }
}

/// What to hand off, to which tool, for how many GPUs.
#[derive(Debug, Clone)]
pub struct Request {
    pub config: RunConfig,
    pub tool: Tool,
    /// GPUs per node.
    pub gpus: usize,
    pub nodes: usize,
    /// Memory of one GPU on the other machine, for choosing ZeRO-2 or ZeRO-3.
    pub gpu_memory: u64,
    pub out: PathBuf,
    /// Copy a local model folder (or a GGUF file's import) into `out/model`.
    pub copy_model: bool,
}

/// 80 GiB: an A100/H100, when the other machine's cards are not given.
pub const DEFAULT_GPU_MEMORY: u64 = 80 << 30;

/// How the run is laid out on the other machine.
#[derive(Debug, Clone)]
pub struct Plan {
    /// GPUs in all (gpus × nodes).
    pub world: usize,
    pub per_device_batch: usize,
    pub grad_accum: usize,
    /// Ours: batch_size × grad_accum; theirs: per_device_batch × grad_accum × world.
    pub effective_batch: usize,
    pub their_effective_batch: usize,
    pub zero: Zero,
    /// The per-GPU estimates under ZeRO-2 and ZeRO-3 (none when the model's config.json is not
    /// on this machine).
    pub zero2: Option<Estimate>,
    pub zero3: Option<Estimate>,
    pub gpu_memory: u64,
    /// The model as the config names it.
    pub model: String,
    pub template: Option<ToolTemplate>,
    pub targets: Vec<String>,
    pub data: DataKind,
    pub train_records: usize,
    pub validation_records: usize,
    /// What the user should know: an effective batch that could not be kept, a model to copy,
    /// records skipped.
    pub notes: Vec<String>,
}

/// What `write` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub plan: Plan,
}

/// The per-device micro-batch and accumulation that keep `batch × accum` (one device here)
/// across `world` GPUs: the largest micro-batch up to ours that divides it; when none does,
/// the nearest effective batch there is (the larger micro-batch on a tie), and `false`.
pub fn batch_plan(batch: usize, accum: usize, world: usize) -> (usize, usize, bool) {
    let total = batch * accum;
    for b in (1..=batch).rev() {
        if total.is_multiple_of(b * world) {
            return (b, total / (b * world), true);
        }
    }
    let (b, a) = (1..=batch)
        .rev()
        .map(|b| (b, ((total as f64 / (b * world) as f64).round() as usize).max(1)))
        .min_by_key(|&(b, a)| (b * a * world).abs_diff(total))
        .unwrap_or((batch, 1));
    (b, a, false)
}

/// Writes the job for `request.tool` into `request.out`.
pub fn write(request: &Request) -> Result<Written> {
    let Request { config, tool, gpus, nodes, gpu_memory, out, copy_model } = request;
    let tool = *tool;
    if *gpus == 0 || *nodes == 0 {
        return Err(Error::Invalid("--gpus and --nodes must be at least 1".into()));
    }
    config.validate()?;
    let world = gpus * nodes;
    let mut notes = Vec::new();

    // the model: its files here (for the template, the default targets and the estimate), and
    // the name the other machine loads it by
    let local = local_model_dir(&config.model.source);
    let spec = local.as_ref().and_then(|d| crate::memory::presets::spec_for(&d.display().to_string()).ok());
    let (model, copy_from) = model_reference(&config.model.source, local.as_deref(), *copy_model, &mut notes)?;

    let targets = if config.lora.targets.is_empty() {
        match &spec {
            Some(s) => s.default_targets.clone(),
            None => {
                return Err(Error::Invalid(format!(
                    "[lora] targets is empty (the family's default), and {}'s config.json is not on this machine to \
                     say which family it is: name the targets in [lora] targets (e.g. [\"q_proj\", \"v_proj\"] or \
                     [\"all-linear\"]), or download the model first",
                    config.model.source
                )))
            }
        }
    } else {
        config.lora.targets.clone()
    };
    if let Some(s) = &spec {
        s.check_targets(&targets)?;
    }
    let alpha = integer_alpha(config.lora.alpha, tool)?;

    let (per_device_batch, grad_accum, exact) = batch_plan(config.train.batch_size, config.train.grad_accum, world);
    let effective_batch = config.train.batch_size * config.train.grad_accum;
    let their_effective_batch = per_device_batch * grad_accum * world;
    if !exact {
        notes.push(format!(
            "the effective batch {effective_batch} (batch_size {} × grad_accum {}) is not a multiple of {world} GPUs: \
             the job trains with {their_effective_batch} ({per_device_batch} per GPU × {grad_accum} × {world}); \
             change batch_size or grad_accum to keep it exactly",
            config.train.batch_size, config.train.grad_accum
        ));
    }

    // the per-GPU estimate decides the ZeRO stage
    let (zero2, zero3) = match &spec {
        Some(s) => {
            let mut c = config.clone();
            c.train.batch_size = per_device_batch;
            c.model.device = "cuda".into();
            let mut input = c.estimate_input_for(s.clone(), None);
            input.checkpointing = config.train.gradient_checkpointing != Checkpointing::Off;
            (
                crate::memory::estimate_per_gpu(&input, world, Zero::Two).ok(),
                crate::memory::estimate_per_gpu(&input, world, Zero::Three).ok(),
            )
        }
        None => {
            notes.push(format!(
                "{}'s config.json is not on this machine, so the per-GPU memory was not estimated: ZeRO-2 was \
                 chosen; use ds_z3_config.json if it runs out of memory",
                config.model.source
            ));
            (None, None)
        }
    };
    let zero = match (&zero2, &zero3) {
        (Some(z2), Some(z3)) if !z2.fits(*gpu_memory) => {
            if !z3.fits(*gpu_memory) {
                notes.push(format!(
                    "even under ZeRO-3 the estimate ({}) exceeds one GPU's {}: use more GPUs, a shorter max_length, a \
                     smaller batch or QLoRA",
                    gib(z3.high),
                    gib(*gpu_memory)
                ));
            }
            Zero::Three
        }
        _ => Zero::Two,
    };

    // the template
    let template = match dataset_kind_hint(config) {
        Some(DataKind::Text) => None,
        _ => Some(tool_template(config, local.as_deref(), spec.as_ref().map(|s| s.family.as_str()), tool, &mut notes)?),
    };

    std::fs::create_dir_all(out.join("data")).map_err(|e| Error::io(out, e))?;
    let converted = dataset::convert(&config.data, out, tool)?;
    let template = if converted.kind == DataKind::Text { None } else { template };
    if !converted.skipped.is_empty() {
        notes.push(format!(
            "{} bad records were skipped (skip_bad_records), the first: {}",
            converted.skipped.len(),
            converted.skipped[0]
        ));
    }
    let mut files = converted.files.clone();

    let plan = Plan {
        world,
        per_device_batch,
        grad_accum,
        effective_batch,
        their_effective_batch,
        zero,
        zero2,
        zero3,
        gpu_memory: *gpu_memory,
        model,
        template,
        targets,
        data: converted.kind,
        train_records: converted.train_records,
        validation_records: converted.validation_records,
        notes,
    };

    if let Some(from) = copy_from {
        let to = out.join("model");
        copy_dir(&from, &to)?;
        files.push(to);
    }
    let mut put = |name: &str, text: String| -> Result<()> {
        let path = out.join(name);
        write_atomic(&path, text.as_bytes())?;
        files.push(path);
        Ok(())
    };
    let yaml = match tool {
        Tool::LlamaFactory => llamafactory_yaml(config, &plan, alpha),
        Tool::Axolotl => axolotl_yaml(config, &plan, alpha),
    };
    put(tool.config_file(), yaml)?;
    put("ds_z2_config.json", deepspeed_json(Zero::Two))?;
    put("ds_z3_config.json", deepspeed_json(Zero::Three))?;
    put("launch.sh", launch_sh(tool, *gpus, *nodes, copy_from_is_local(&plan)))?;
    set_executable(&out.join("launch.sh"));
    put("README.md", readme(config, tool, *gpus, *nodes, &plan))?;
    // the run as handed off, with its paths absolute, for bringing the result back
    let mut kept = config.clone();
    kept.data.path = absolute(&kept.data.path);
    if let crate::data::Validation::File(p) = &kept.data.validation {
        kept.data.validation = crate::data::Validation::File(absolute(p));
    }
    if Path::new(&kept.model.source).exists() {
        kept.model.source = absolute(Path::new(&kept.model.source)).display().to_string();
    }
    kept.train.output_dir = absolute(&out.join(OUTPUT_DIR));
    kept.save(&out.join(RUN_CONFIG_FILE))?;
    files.push(out.join(RUN_CONFIG_FILE));
    Ok(Written { dir: out.clone(), files, plan })
}

fn copy_from_is_local(plan: &Plan) -> bool {
    plan.model == "model"
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
        }
    })
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The model's folder on this machine, without downloading: a folder, a GGUF file's import, a
/// hub id in the local cache.
fn local_model_dir(source: &str) -> Option<PathBuf> {
    let path = Path::new(source);
    if path.is_dir() {
        return Some(path.to_path_buf());
    }
    let offline = crate::hub::ResolveOptions { download: None, ..Default::default() };
    crate::hub::resolve_with(source, &offline).ok().map(|r| r.dir)
}

/// The name the other machine loads the model by, and the folder to copy to `out/model`.
fn model_reference(
    source: &str,
    local: Option<&Path>,
    copy: bool,
    notes: &mut Vec<String>,
) -> Result<(String, Option<PathBuf>)> {
    let path = Path::new(source);
    if !path.exists() {
        return match crate::hub::parse_hub_id(source) {
            Some(_) => {
                if copy {
                    notes.push(format!(
                        "--copy-model: {source} is a hub id, which the job downloads there; nothing was copied"
                    ));
                }
                Ok((source.to_string(), None))
            }
            None => Err(Error::Invalid(format!(
                "model.source = {source:?} is neither a folder, a GGUF file nor a hub id (owner/name)"
            ))),
        };
    }
    let is_gguf = source.ends_with(".gguf");
    if copy {
        let dir = local.ok_or_else(|| {
            Error::Invalid(format!("{source}: the model could not be read here (import it once in the app first)"))
        })?;
        return Ok(("model".into(), Some(dir.to_path_buf())));
    }
    if is_gguf {
        return match crate::hub::gguf::source_hub_id(path) {
            Some(id) => {
                notes.push(format!(
                    "the job trains on {id}, the model {source} was converted from (its metadata says so), not on \
                     the GGUF file's quantized weights; pass --copy-model to train on the file's weights as imported \
                     here"
                ));
                Ok((id, None))
            }
            None => Err(Error::Invalid(format!(
                "{source}: a GGUF file that names no hub model it came from; pass --copy-model to copy its import \
                 (a Hugging Face folder) into the job"
            ))),
        };
    }
    notes.push(format!(
        "the model is the local folder {source}: copy it to the job's model/ folder (or pass --copy-model), \
         launch.sh checks that it is there"
    ));
    Ok(("model".into(), None))
}

/// Text or conversations, when the [data] table says so without reading the data.
fn dataset_kind_hint(config: &RunConfig) -> Option<DataKind> {
    (config.data.format == crate::data::DataFormat::Text).then_some(DataKind::Text)
}

fn tool_template(
    config: &RunConfig,
    local: Option<&Path>,
    family: Option<&str>,
    tool: Tool,
    notes: &mut Vec<String>,
) -> Result<ToolTemplate> {
    let own = local.and_then(|d| crate::data::ModelTokenizer::from_dir(d).ok()).and_then(|t| t.chat_template);
    match &config.data.template {
        TemplateChoice::Model => match (&own, local) {
            (None, Some(d)) => Err(Error::Invalid(format!(
                "[data] template = \"model\", but {} has no chat_template; name a template in [data] template",
                d.display()
            ))),
            _ => Ok(ToolTemplate::Model),
        },
        TemplateChoice::ModelNamed(name) => Err(Error::Invalid(format!(
            "[data] template = \"model:{name}\": neither LLaMA-Factory nor axolotl picks one of a model's named \
             chat templates; use \"model\" or a named template"
        ))),
        TemplateChoice::Named(name) => templates::map(name, tool),
        TemplateChoice::Auto => match (own, local) {
            (Some(_), _) => Ok(ToolTemplate::Model),
            (None, Some(_)) => templates::map(crate::data::family_template_name(family), tool),
            (None, None) => {
                notes.push(format!(
                    "template = \"auto\" and {} is not on this machine: the job uses the model's own chat template \
                     (as \"auto\" does when the model has one); name a template in [data] template if it has none",
                    config.model.source
                ));
                Ok(ToolTemplate::Model)
            }
        },
    }
}

/// LLaMA-Factory and axolotl take LoRA's alpha as an integer.
fn integer_alpha(alpha: f64, tool: Tool) -> Result<i64> {
    if alpha.fract() != 0.0 {
        return Err(Error::Invalid(format!(
            "[lora] alpha = {alpha}: {} takes an integer lora_alpha; round it (the scale is alpha / r)",
            tool.label()
        )));
    }
    Ok(alpha as i64)
}

/// An interval no run reaches: with HF Trainer's "steps" strategies, only after the last step.
const AT_THE_END: usize = 1_000_000_000;

/// The dropout as written in the run config (0.05, not the f32's 0.05000000074505806).
fn dropout(p: f32) -> f64 {
    p.to_string().parse().unwrap_or(p as f64)
}

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Cosine => "cosine",
        Schedule::Linear => "linear",
        Schedule::Constant => "constant_with_warmup",
    }
}

/// bf16, fp16 or neither (f32), as the run's compute dtype on a GPU ("auto" is bf16 there).
fn precision(config: &RunConfig) -> (bool, bool) {
    match config.model.dtype.as_str() {
        "f32" => (false, false),
        "f16" => (false, true),
        _ => (true, false),
    }
}

fn ds_file(zero: Zero) -> &'static str {
    match zero {
        Zero::Two => "ds_z2_config.json",
        Zero::Three => "ds_z3_config.json",
    }
}

fn llamafactory_yaml(config: &RunConfig, plan: &Plan, alpha: i64) -> String {
    let (l, t, d) = (&config.lora, &config.train, &config.data);
    let mut y = Yaml::default();
    y.comment(&format!(
        "LLaMA-Factory {LLAMAFACTORY_VERSION} job written by qlora-studio handoff: {} GPU(s) in all, {}",
        plan.world,
        plan.zero.label()
    ));
    y.comment("Run it with ./launch.sh (see README.md).");
    y.section("model");
    y.kv("model_name_or_path", plan.model.as_str());
    y.kv("trust_remote_code", true);
    y.section("method");
    y.kv("stage", if plan.data == DataKind::Text { "pt" } else { "sft" });
    y.kv("do_train", true);
    y.kv("finetuning_type", "lora");
    y.kv("lora_rank", l.r);
    y.kv("lora_alpha", alpha);
    y.kv("lora_dropout", dropout(l.dropout));
    let target =
        if plan.targets.iter().any(|t| t == "all-linear") { "all".to_string() } else { plan.targets.join(",") };
    y.kv("lora_target", target);
    y.kv("use_rslora", l.rslora);
    y.kv("use_dora", l.dora);
    if config.model.mode == Mode::Qlora {
        y.kv("quantization_bit", 4);
        y.kv("quantization_method", "bnb");
        y.kv("quantization_type", "nf4");
        y.kv("double_quantization", true);
    }
    y.section("dataset");
    y.kv("dataset_dir", "data");
    y.kv("dataset", dataset::TRAIN_NAME);
    if plan.validation_records > 0 {
        y.kv("eval_dataset", dataset::VALIDATION_NAME);
    }
    match &plan.template {
        Some(ToolTemplate::Named { name, default_system }) => {
            y.kv("template", name.as_str());
            if let Some(s) = default_system {
                y.kv("default_system", s.as_str());
            }
        }
        Some(ToolTemplate::Model) => y.comment("template: left out, so the tokenizer's own chat_template is used"),
        Some(ToolTemplate::Jinja(_)) | None => {}
    }
    y.kv("cutoff_len", d.max_length);
    y.kv("packing", d.packing);
    if plan.data == DataKind::Chat {
        y.kv("train_on_prompt", d.train_on_prompt);
    }
    y.kv("overwrite_cache", true);
    y.section("output");
    y.kv("output_dir", OUTPUT_DIR);
    y.kv("logging_steps", 1);
    if t.checkpoint_every > 0 {
        y.kv("save_strategy", "steps");
        y.kv("save_steps", t.checkpoint_every);
    } else {
        y.kv("save_strategy", "no");
    }
    y.kv("plot_loss", true);
    y.kv("overwrite_output_dir", true);
    y.kv("report_to", "none");
    y.section("train");
    y.kv("per_device_train_batch_size", plan.per_device_batch);
    y.kv("gradient_accumulation_steps", plan.grad_accum);
    y.kv("learning_rate", t.learning_rate);
    if t.max_steps > 0 {
        y.kv("max_steps", t.max_steps);
    } else {
        y.kv("num_train_epochs", t.epochs);
    }
    y.kv("lr_scheduler_type", schedule_name(t.schedule));
    y.kv("warmup_steps", t.warmup_steps);
    y.kv("weight_decay", t.weight_decay);
    y.kv("max_grad_norm", t.max_grad_norm);
    y.kv("optim", "adamw_torch");
    let (bf16, fp16) = precision(config);
    y.kv("bf16", bf16);
    y.kv("fp16", fp16);
    y.kv("seed", t.seed);
    y.kv("disable_gradient_checkpointing", t.gradient_checkpointing == Checkpointing::Off);
    y.kv("deepspeed", ds_file(plan.zero));
    y.kv("ddp_timeout", 180000000);
    if plan.validation_records > 0 {
        y.section("eval");
        y.kv("per_device_eval_batch_size", plan.per_device_batch);
        // our trainer evaluates every eval_every steps and at the end; LLaMA-Factory's do_eval
        // evaluates once more after training
        y.kv("do_eval", true);
        if t.eval_every > 0 {
            y.kv("eval_strategy", "steps");
            y.kv("eval_steps", t.eval_every);
        } else {
            y.kv("eval_strategy", "no");
        }
    }
    y.finish()
}

fn axolotl_yaml(config: &RunConfig, plan: &Plan, alpha: i64) -> String {
    let (l, t, d) = (&config.lora, &config.train, &config.data);
    let mut y = Yaml::default();
    y.comment(&format!(
        "axolotl {AXOLOTL_VERSION} job written by qlora-studio handoff: {} GPU(s) in all, {}",
        plan.world,
        plan.zero.label()
    ));
    y.comment("Run it with ./launch.sh (see README.md).");
    y.section("model");
    y.kv("base_model", plan.model.as_str());
    y.kv("trust_remote_code", true);
    y.section("adapter");
    match config.model.mode {
        Mode::Qlora => {
            y.kv("adapter", "qlora");
            y.kv("load_in_4bit", true);
            y.kv("bnb_config_kwargs", json!({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true}));
        }
        Mode::Lora => y.kv("adapter", "lora"),
    }
    y.kv("lora_r", l.r);
    y.kv("lora_alpha", alpha);
    y.kv("lora_dropout", dropout(l.dropout));
    if plan.targets.iter().any(|t| t == "all-linear") {
        y.kv("lora_target_linear", true);
    } else {
        y.kv("lora_target_modules", plan.targets.clone());
    }
    y.kv("peft_use_rslora", l.rslora);
    y.kv("peft_use_dora", l.dora);
    y.section("dataset");
    match &plan.template {
        Some(ToolTemplate::Model) => y.kv("chat_template", "tokenizer_default"),
        Some(ToolTemplate::Named { name, .. }) => y.kv("chat_template", name.as_str()),
        Some(ToolTemplate::Jinja(text)) => {
            y.kv("chat_template", "jinja");
            y.kv("chat_template_jinja", text.as_str());
        }
        None => {}
    }
    let entry = |file: &str| -> Value {
        match plan.data {
            DataKind::Chat => json!({
                "path": file,
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "message_property_mappings": {"role": "role", "content": "content"},
                "roles_to_train": if d.train_on_prompt { json!(["system", "user", "assistant"]) } else { json!(["assistant"]) },
                "train_on_eos": "turn",
                "split": "train"
            }),
            DataKind::Text => {
                json!({"path": file, "ds_type": "json", "type": "completion", "field": "text", "split": "train"})
            }
        }
    };
    y.list_of_maps("datasets", &[entry(dataset::TRAIN_FILE)]);
    if plan.validation_records > 0 {
        y.list_of_maps("test_datasets", &[entry(dataset::VALIDATION_FILE)]);
    } else {
        y.kv("val_set_size", 0.0);
    }
    y.kv("dataset_prepared_path", "prepared");
    y.kv("sequence_len", d.max_length);
    y.kv("sample_packing", d.packing);
    y.section("output");
    y.kv("output_dir", OUTPUT_DIR);
    y.kv("logging_steps", 1);
    // HF Trainer saves and evaluates after the last step under a "steps" strategy: an interval
    // longer than any run is ours "only at the end" (and the final checkpoint keeps
    // trainer_state.json, the loss curve brought back)
    y.kv("save_strategy", "steps");
    if t.checkpoint_every > 0 {
        y.kv("save_steps", t.checkpoint_every);
    } else {
        y.comment("train.checkpoint_every = 0: only at the end");
        y.kv("save_steps", AT_THE_END);
    }
    if plan.validation_records > 0 {
        y.kv("eval_strategy", "steps");
        if t.eval_every > 0 {
            y.kv("eval_steps", t.eval_every);
        } else {
            y.comment("train.eval_every = 0: only at the end");
            y.kv("eval_steps", AT_THE_END);
        }
    }
    y.section("train");
    y.kv("micro_batch_size", plan.per_device_batch);
    y.kv("gradient_accumulation_steps", plan.grad_accum);
    if t.max_steps > 0 {
        y.kv("max_steps", t.max_steps);
    } else {
        y.kv("num_epochs", t.epochs);
    }
    y.kv("optimizer", "adamw_torch");
    y.kv("lr_scheduler", schedule_name(t.schedule));
    y.kv("learning_rate", t.learning_rate);
    y.kv("warmup_steps", t.warmup_steps);
    y.kv("weight_decay", t.weight_decay);
    y.kv("max_grad_norm", t.max_grad_norm);
    let (bf16, fp16) = precision(config);
    y.kv("bf16", bf16);
    y.kv("fp16", fp16);
    y.kv("tf32", false);
    y.kv("seed", t.seed);
    y.kv("gradient_checkpointing", t.gradient_checkpointing != Checkpointing::Off);
    y.kv("deepspeed", ds_file(plan.zero));
    y.finish()
}

/// DeepSpeed's config with HF Trainer's "auto" values (batch, accumulation, clipping and
/// precision come from the tool's config), as LLaMA-Factory's examples/deepspeed write it.
fn deepspeed_json(zero: Zero) -> String {
    let zero_optimization = match zero {
        Zero::Two => json!({
            "stage": 2,
            "allgather_partitions": true,
            "allgather_bucket_size": 500000000,
            "overlap_comm": false,
            "reduce_scatter": true,
            "reduce_bucket_size": 500000000,
            "contiguous_gradients": true,
            "round_robin_gradients": true
        }),
        Zero::Three => json!({
            "stage": 3,
            "overlap_comm": false,
            "contiguous_gradients": true,
            "sub_group_size": 1000000000,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1000000000,
            "stage3_max_reuse_distance": 1000000000,
            "stage3_gather_16bit_weights_on_model_save": true
        }),
    };
    let config = json!({
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": true,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero_optimization
    });
    format!("{}\n", serde_json::to_string_pretty(&config).expect("JSON values serialise"))
}

fn launch_sh(tool: Tool, gpus: usize, nodes: usize, local_model: bool) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# Trains this job with {} on {gpus} GPU(s) per node × {nodes} node(s). On several nodes run it on\n\
         # every node with NODE_RANK=0..{} and MASTER_ADDR set to node 0's address. Extra arguments are\n\
         # passed on to the trainer (key=value overrides of the config).\n",
        tool.label(),
        nodes.saturating_sub(1)
    ));
    s.push_str("set -eu\ncd \"$(dirname \"$0\")\"\n");
    if local_model {
        s.push_str(
            "if [ ! -f model/config.json ]; then\n    echo \"model/config.json is missing: copy the base model folder to $(pwd)/model\" >&2\n    exit 1\nfi\n",
        );
    }
    s.push_str(&format!(
        "NPROC_PER_NODE=${{NPROC_PER_NODE:-{gpus}}}\nNNODES=${{NNODES:-{nodes}}}\nNODE_RANK=${{NODE_RANK:-0}}\n\
         MASTER_ADDR=${{MASTER_ADDR:-127.0.0.1}}\nMASTER_PORT=${{MASTER_PORT:-29500}}\n"
    ));
    match tool {
        Tool::LlamaFactory => s.push_str(
            "# FORCE_TORCHRUN=0 runs one process without torchrun (a CPU check)\n\
             export FORCE_TORCHRUN=${FORCE_TORCHRUN:-1} NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT\n\
             exec llamafactory-cli train llamafactory.yaml \"$@\"\n",
        ),
        Tool::Axolotl => s.push_str(
            "exec accelerate launch --num_processes \"$((NPROC_PER_NODE * NNODES))\" --num_machines \"$NNODES\" \\\n    \
             --machine_rank \"$NODE_RANK\" --main_process_ip \"$MASTER_ADDR\" --main_process_port \"$MASTER_PORT\" \\\n    \
             -m axolotl.cli.train axolotl.yaml \"$@\"\n",
        ),
    }
    s
}

fn readme(config: &RunConfig, tool: Tool, gpus: usize, nodes: usize, plan: &Plan) -> String {
    let mut s = format!(
        "# A qlora-studio run handed to {}\n\nWritten by `qlora-studio handoff --to {} --gpus {gpus} --nodes {nodes}` \
         from the run config in `{RUN_CONFIG_FILE}` (model `{}`).\n\n",
        tool.label(),
        match tool {
            Tool::LlamaFactory => "llamafactory",
            Tool::Axolotl => "axolotl",
        },
        config.model.source
    );
    s.push_str("## Install\n\n```sh\n");
    match tool {
        Tool::LlamaFactory => s.push_str(&format!(
            "pip install llamafactory=={LLAMAFACTORY_VERSION} deepspeed bitsandbytes   # the configs were checked with llamafactory {LLAMAFACTORY_VERSION}\n"
        )),
        Tool::Axolotl => s.push_str(&format!(
            "pip install axolotl=={AXOLOTL_VERSION} deepspeed   # the configs were written for axolotl {AXOLOTL_VERSION}\n"
        )),
    }
    s.push_str("```\n\n## Run\n\n");
    if plan.model == "model" {
        s.push_str("The base model is the folder `model/` (copy it there if `--copy-model` was not given).\n");
    } else {
        s.push_str(&format!("The base model `{}` is downloaded from the Hugging Face hub.\n", plan.model));
    }
    s.push_str(&format!(
        "Copy this folder to the GPU machine and run `./launch.sh` there ({gpus} GPU(s) per node, {nodes} node(s); \
         on several nodes run it on each with `NODE_RANK` and `MASTER_ADDR` set). Files:\n\n\
         - `{}`: the training config, key for key from the run config;\n\
         - `data/train.jsonl`{}{}: the records as qlora-studio read and split them;\n\
         - `{}` (used) and `{}`: DeepSpeed ZeRO-2 and ZeRO-3;\n\
         - `launch.sh`: the launch command.\n\n",
        tool.config_file(),
        if plan.validation_records > 0 { ", `data/validation.jsonl`" } else { "" },
        if tool == Tool::LlamaFactory { ", `data/dataset_info.json`" } else { "" },
        ds_file(plan.zero),
        ds_file(match plan.zero {
            Zero::Two => Zero::Three,
            Zero::Three => Zero::Two,
        })
    ));
    s.push_str("## The plan\n\n");
    s.push_str(&format!(
        "- {} training records, {} validation records ({}).\n",
        plan.train_records,
        plan.validation_records,
        if plan.data == DataKind::Text { "plain text" } else { "conversations" }
    ));
    s.push_str(&format!(
        "- Effective batch: {} here (batch_size {} × grad_accum {}); on {} GPU(s): {} per GPU × {} accumulation × {} = {}.\n",
        plan.effective_batch,
        config.train.batch_size,
        config.train.grad_accum,
        plan.world,
        plan.per_device_batch,
        plan.grad_accum,
        plan.world,
        plan.their_effective_batch
    ));
    match (&plan.zero2, &plan.zero3) {
        (Some(z2), Some(z3)) => s.push_str(&format!(
            "- Estimated peak per GPU (qlora-studio's estimate of the same step, sharded): ZeRO-2 {}–{}, ZeRO-3 \
             {}–{}, against {} per GPU: {} chosen.\n",
            gib(z2.low),
            gib(z2.high),
            gib(z3.low),
            gib(z3.high),
            gib(plan.gpu_memory),
            plan.zero.label()
        )),
        _ => s.push_str(&format!("- {} chosen (no estimate, see the notes).\n", plan.zero.label())),
    }
    for n in &plan.notes {
        s.push_str(&format!("- Note: {n}\n"));
    }
    s.push_str(&format!(
        "\n## What comes back\n\n`{OUTPUT_DIR}/` holds the LoRA adapter as a PEFT folder (adapter_config.json, \
         adapter_model.safetensors), HF Trainer's `trainer_state.json`{} and a `checkpoint-N` folder per save (the last \
         one after the last step). Copy \
         `{OUTPUT_DIR}/` back next to `{RUN_CONFIG_FILE}` (this folder's layout) and open it in qlora-studio: \
         `qlora-studio import-run {OUTPUT_DIR} --add`, or the Runs tab's \"Add a finished run…\". It then shows its loss \
         curve, and works in Try and Export like a run of qlora-studio's own.\n",
        if tool == Tool::LlamaFactory { " and `trainer_log.jsonl`" } else { " (in its checkpoints)" }
    ));
    s
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
}

#[cfg(not(unix))]
fn set_executable(_: &Path) {}

/// What `handoff` prints: the files, the plan and the notes.
pub fn summary(w: &Written, tool: Tool) -> String {
    let p = &w.plan;
    let mut s = format!("{} job written to {}\n", tool.label(), w.dir.display());
    for f in &w.files {
        s.push_str(&format!("  {}\n", f.strip_prefix(&w.dir).unwrap_or(f).display()));
    }
    s.push_str(&format!(
        "data: {} training and {} validation records\nbatch: {} per GPU × {} accumulation × {} GPUs = {} (here {})\n",
        p.train_records,
        p.validation_records,
        p.per_device_batch,
        p.grad_accum,
        p.world,
        p.their_effective_batch,
        p.effective_batch
    ));
    if let (Some(z2), Some(z3)) = (&p.zero2, &p.zero3) {
        s.push_str(&format!(
            "estimated peak per GPU: ZeRO-2 {} (up to {}), ZeRO-3 {} (up to {}); {} per GPU: {}\n",
            gib(z2.mid),
            gib(z2.high),
            gib(z3.mid),
            gib(z3.high),
            gib(p.gpu_memory),
            p.zero.label()
        ));
    } else {
        s.push_str(&format!("{}\n", p.zero.label()));
    }
    for n in &p.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s.push_str(&format!("run it there: {}/launch.sh\n", w.dir.display()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_batch_is_kept_across_gpus() {
        assert_eq!(batch_plan(4, 4, 8), (2, 1, true));
        assert_eq!(batch_plan(4, 4, 2), (4, 2, true));
        assert_eq!(batch_plan(1, 8, 4), (1, 2, true));
        assert_eq!(batch_plan(1, 1, 1), (1, 1, true));
        // 6 is not a multiple of 4: the nearest, 8, with the larger micro-batch
        assert_eq!(batch_plan(3, 2, 4), (2, 1, false));
        assert_eq!(batch_plan(1, 1, 2), (1, 1, false));
    }

    #[test]
    fn tools_parse_in_their_spellings() {
        assert_eq!(Tool::parse("LLaMA-Factory").unwrap(), Tool::LlamaFactory);
        assert_eq!(Tool::parse("llamafactory").unwrap(), Tool::LlamaFactory);
        assert_eq!(Tool::parse("axolotl").unwrap(), Tool::Axolotl);
        assert!(Tool::parse("deepspeed").is_err());
    }
}
