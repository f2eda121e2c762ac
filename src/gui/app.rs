//! The window: a header with the device and the language, the settings on the left (model,
//! dataset, LoRA, training, memory), and the run, its history, a try-out panel and export in
//! the middle. Nothing slow runs on the UI thread: training, loading and exporting happen on
//! worker threads whose results are picked up each frame.

use std::path::{Path, PathBuf};

use eframe::egui;
use serde::{Deserialize, Serialize};

use super::data_view::DataView;
use super::export_view::ExportView;
use super::handoff_view::HandoffView;
use super::i18n::{tr, tr_message, trf, Lang};
use super::memory_view::MemoryView;
use super::run_view::{RunState, RunView};
use super::source_view::{SourceState, SourceView};
use super::try_view::TryView;
use crate::model::inspect::LinearModule;
use crate::model::ModelSpec;
use crate::train::checkpoint;
use crate::train::events::{RunEstimate, RunFinished};
use crate::train::{Checkpointing, Mode, RunConfig, Schedule};

/// What persists between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub lang: Lang,
    pub config: RunConfig,
    /// Output folders of past runs, newest last.
    pub runs: Vec<PathBuf>,
    /// The folder the last export went to, where the next save dialog opens.
    pub last_export_dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { lang: Lang::En, config: demo_config(), runs: Vec::new(), last_export_dir: None }
    }
}

/// The settings file, or the defaults. A file that cannot be read is moved aside (never
/// overwritten) and the message says where it went.
fn load_settings(path: &Path) -> (Settings, Option<(bool, String)>) {
    let Ok(text) = std::fs::read_to_string(path) else { return (Settings::default(), None) };
    match toml::from_str(&text) {
        Ok(settings) => (settings, None),
        Err(e) => {
            let aside = path.with_extension("toml.damaged");
            let kept = match std::fs::rename(path, &aside) {
                Ok(()) => format!("kept as {}", aside.display()),
                Err(r) => format!("and could not be moved aside: {r}"),
            };
            let message =
                format!("{} could not be read ({}); {kept}. Starting from the defaults.", path.display(), e.message());
            (Settings::default(), Some((true, message)))
        }
    }
}

/// Write `settings` to `path` (its folder made when missing), through a temporary name.
fn write_settings(path: &Path, settings: &Settings) -> Result<(), String> {
    // TOML holds text: name the key of a path that is not (serde's error would not)
    settings.config.check_paths_are_text().map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = toml::to_string_pretty(settings).map_err(|e| e.to_string())?;
    crate::weights::write_atomic(path, text.as_bytes()).map_err(|e| e.to_string())
}

/// Adds a run folder (e.g. the result of a job handed to another tool) to the Runs tab of the
/// settings at `path`, for the app's next start; a folder already listed is left where it is.
pub fn add_run_to_settings(path: &Path, dir: &Path) -> Result<(), String> {
    let (mut settings, problem) = load_settings(path);
    if let Some((_, message)) = problem {
        return Err(message);
    }
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !settings.runs.contains(&dir) {
        settings.runs.push(dir);
    }
    write_settings(path, &settings)
}

/// The machine as the header shows it.
struct Machine {
    cores: usize,
    ram: Option<u64>,
    gpus: Vec<crate::memory::GpuInfo>,
}

impl Machine {
    fn describe(&self, lang: Lang) -> String {
        let mut parts: Vec<String> = self
            .gpus
            .iter()
            .map(|g| {
                let cap = g.compute_capability.as_ref().map(|c| trf(lang, ", compute {}", &[c])).unwrap_or_default();
                let (total, free) = (human_bytes(g.total), human_bytes(g.free));
                trf(lang, "GPU {}: {}, {} ({} free)", &[&g.index, &g.name, &total, &free]) + &cap
            })
            .collect();
        let ram = self.ram.map(|b| trf(lang, ", {} RAM", &[&human_bytes(b)])).unwrap_or_default();
        parts.push(trf(lang, "CPU: {} cores", &[&self.cores]) + &ram);
        if !cfg!(feature = "cuda") && !self.gpus.is_empty() {
            parts.push(tr(lang, "built without the cuda feature: training runs on the CPU").to_string());
        }
        parts.join(" · ")
    }
}

/// The built-in demo model and dataset, so Start trains at once on first launch.
pub fn demo_config() -> RunConfig {
    let assets = crate::hub::demo::demo_assets(&crate::hub::app_cache_dir());
    let mut c = RunConfig::default();
    c.model.source = assets.join("model").display().to_string();
    c.model.mode = Mode::Qlora;
    c.data.path = assets.join("dataset.jsonl");
    c.data.max_length = 256;
    c.data.validation = crate::data::Validation::Fraction(0.1);
    // the demo model is small and random: a wide adapter and a brisk rate show learning in seconds
    c.lora.targets = vec!["all-linear".into()];
    c.lora.r = 16;
    c.lora.alpha = 32.0;
    c.train.max_steps = 80;
    c.train.batch_size = 4;
    c.train.learning_rate = 2e-2;
    c.train.warmup_steps = 5;
    c.train.eval_every = 20;
    c.train.checkpoint_every = 20;
    c.train.output_dir = default_runs_dir().join("demo");
    c
}

pub fn default_runs_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join("qlora-studio-runs")
}

pub fn default_settings_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("qlora-studio/settings.toml"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Run,
    Runs,
    Try,
    Export,
}

pub struct StudioApp {
    pub settings: Settings,
    settings_path: Option<PathBuf>,
    pub tab: Tab,
    /// The model source made local and inspected.
    pub source: SourceView,
    pub run: Option<RunView>,
    pub export: ExportView,
    pub data_view: DataView,
    pub memory_view: MemoryView,
    pub try_view: TryView,
    /// Writing the run as a LLaMA-Factory or axolotl job.
    pub handoff: HandoffView,
    /// A save path that replaces the save dialog (tests, scripted use).
    pub export_target: Option<PathBuf>,
    pub status: Option<(bool, String)>,
    family_choice: usize,
    size_choice: usize,
    /// What the header says about the machine (worded in the UI's language each frame).
    machine: Machine,
    sample_prompts_text: String,
    compare: Vec<PathBuf>,
    fonts_installed: bool,
    /// The Runs tab's records, when (and from which list) they were last asked for, and the
    /// worker reading them (the UI thread never reads a checkpoint).
    records: Vec<RunRecord>,
    records_read: Option<(Vec<PathBuf>, std::time::Instant)>,
    records_job: Option<std::thread::JoinHandle<Vec<RunRecord>>>,
    /// The tab drawn last frame (entering the Runs tab re-reads the history).
    shown_tab: Tab,
    /// What was last written to the settings file, and when (changes are saved a second later,
    /// so a killed window loses at most that).
    saved: Option<(Settings, std::time::Instant)>,
    /// Width of the header's right-hand group last frame (it is right-aligned by a gap).
    header_right_width: f32,
    /// Models found in the local Hugging Face cache (read once at start).
    cached_models: Vec<crate::hub::hf_cache::CachedModel>,
    /// Prefer a system CJK font over the bundled subset (tests turn it off to check the subset).
    pub system_fonts: bool,
    /// The next start ignores the memory estimate ("Start anyway" after a refusal).
    ignore_memory_estimate_once: bool,
}

impl StudioApp {
    /// `settings_path`: where settings load from and save to (None: nowhere).
    pub fn new(settings_path: Option<PathBuf>) -> Self {
        let (settings, status) = match settings_path.as_deref() {
            Some(p) => load_settings(p),
            None => (Settings::default(), None),
        };
        let gpus = crate::memory::detect_gpus();
        let machine = Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            ram: crate::memory::total_memory(),
            gpus: gpus.clone(),
        };
        let sample_prompts_text = settings.config.train.sample_prompts.join("\n");
        let mut app = Self {
            settings,
            settings_path,
            tab: Tab::Run,
            source: SourceView::default(),
            run: None,
            export: ExportView::default(),
            data_view: DataView::default(),
            memory_view: MemoryView::new(gpus),
            try_view: TryView::default(),
            handoff: HandoffView::default(),
            export_target: None,
            status,
            family_choice: 0,
            size_choice: 0,
            machine,
            sample_prompts_text,
            compare: Vec::new(),
            fonts_installed: false,
            records: Vec::new(),
            records_read: None,
            records_job: None,
            shown_tab: Tab::Run,
            saved: None,
            header_right_width: 0.0,
            cached_models: crate::hub::hf_cache::list_cached_models(&crate::hub::hf_cache::hf_cache_dir())
                .unwrap_or_default(),
            system_fonts: true,
            ignore_memory_estimate_once: false,
        };
        app.refresh_model_info();
        app
    }

    pub fn lang(&self) -> Lang {
        self.settings.lang
    }

    pub fn config(&self) -> &RunConfig {
        &self.settings.config
    }

    pub fn config_mut(&mut self) -> &mut RunConfig {
        &mut self.settings.config
    }

    /// Write the settings file; when it cannot be written the status line says why (the app
    /// goes on with the settings in memory).
    pub fn save_settings(&mut self) {
        self.saved = Some((self.settings.clone(), std::time::Instant::now()));
        let Some(path) = &self.settings_path else { return };
        if let Err(e) = write_settings(path, &self.settings) {
            self.status = Some((true, format!("the settings could not be saved to {}: {e}", path.display())));
        }
    }

    /// "Save config…" to `path`: an error (a path that is not text, a folder that cannot be
    /// written) goes to the status line.
    pub fn save_config_to(&mut self, path: &Path) {
        match self.settings.config.save(path) {
            Ok(()) => self.status = Some((false, format!("run config saved to {}", path.display()))),
            Err(e) => self.status = Some((true, e.to_string())),
        }
    }

    /// Follow the model source (inspect a folder, pick up an import or download); a newly
    /// inspected model gets its family's default targets unless the chosen ones exist in it.
    pub fn refresh_model_info(&mut self) {
        if !self.source.update(&self.settings.config.model.source) {
            return;
        }
        if let Some(Ok(info)) = self.source.described() {
            // the table picker shows the chosen model's family
            if let Some(i) =
                crate::arch::table().ok().and_then(|t| t.families().iter().position(|f| f.id == info.family_id))
            {
                if i != self.family_choice {
                    (self.family_choice, self.size_choice) = (i, 0);
                }
            }
            let have: Vec<&str> = info.linear_modules.iter().map(|m| m.name.as_str()).collect();
            let targets = &mut self.settings.config.lora.targets;
            if targets.is_empty() || !targets.iter().all(|t| t == "all-linear" || have.contains(&t.as_str())) {
                *targets = info.default_targets.clone();
            }
        }
    }

    /// What the estimate counts for the run's process outside its tensors: a training process
    /// of its own (binary, tokenizer, data) where runs train in one; this window's resident
    /// memory where they train on its thread.
    fn run_process_bytes(&self) -> u64 {
        let own = crate::memory::process_memory().map_or(0, |m| m.rss);
        match crate::train::worker::trains_in_child_process() {
            true => self.data_view.run_process_bytes().unwrap_or(own),
            false => own,
        }
    }

    /// The config the memory estimate reads: the source replaced by its local folder once
    /// there is one (a GGUF import, a download), so the estimate never does that work itself.
    fn config_for_estimate(&self) -> Option<RunConfig> {
        let mut config = self.settings.config.clone();
        match &self.source.state {
            SourceState::Ready { dir, .. } => config.model.source = dir.display().to_string(),
            SourceState::NotDownloaded { preview: Some(_), .. } => {}
            _ => return None,
        }
        Some(config)
    }

    /// Start a run of the current config (or resume from a checkpoint).
    pub fn start_run(&mut self, resume_from: Option<PathBuf>) {
        let mut config = self.settings.config.clone();
        config.train.ignore_memory_estimate |= std::mem::take(&mut self.ignore_memory_estimate_once);
        if let Err(e) = config.validate() {
            self.status = Some((true, e.to_string()));
            return;
        }
        if resume_from.is_none() && checkpoint::latest(&config.train.output_dir).is_some() {
            // a new run never writes over an earlier one: it gets the next free sibling folder
            let fresh = next_free_folder(&config.train.output_dir);
            self.status = Some((
                false,
                format!(
                    "{} holds an earlier run; this one writes to {}",
                    config.train.output_dir.display(),
                    fresh.display()
                ),
            ));
            config.train.output_dir = fresh.clone();
            self.settings.config.train.output_dir = fresh;
        }
        let out = config.train.output_dir.clone();
        if !self.settings.runs.contains(&out) {
            self.settings.runs.push(out);
        }
        self.save_settings();
        if let Some(c) = self.config_for_estimate() {
            let process = self.run_process_bytes();
            self.memory_view.update(&c, self.data_view.prepared(), process);
        }
        let estimate = match &self.memory_view.estimate {
            Some(Ok(e)) => Some(RunEstimate::new(e)),
            _ => None,
        };
        self.run = Some(RunView::start(config, resume_from, estimate));
        self.tab = Tab::Run;
    }

    /// Everything a frame shows.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        if !self.fonts_installed {
            super::fonts::install_cjk_font(ui.ctx(), self.system_fonts);
            self.fonts_installed = true;
        }
        self.take_dropped_files(ui.ctx());
        let changed = self.saved.as_ref().is_none_or(|(s, _)| *s != self.settings);
        if changed {
            if self.saved.as_ref().is_none_or(|(_, at)| at.elapsed().as_secs_f32() > 1.0) {
                self.save_settings();
            } else {
                ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
            }
        }
        if let Some(run) = &mut self.run {
            if let Some(outcome) = run.pump() {
                // the history has a new last checkpoint to show
                self.records_read = None;
                notify(&outcome, self.settings.lang);
                if let Ok(f) = &outcome {
                    self.status = Some((false, finished_text(f)));
                }
            }
            if run.is_active() {
                ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
            }
        }
        self.header(ui);
        egui::Panel::left("settings").resizable(true).default_size(430.0).show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| self.settings_panels(ui));
        });
        egui::CentralPanel::default().show(ui, |ui| self.central(ui));
    }

    fn header(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        egui::Panel::top("header").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("qlora-studio");
                ui.separator();
                ui.label(self.machine.describe(lang));
                // the right-hand group is laid out left to right, after a gap sized from last
                // frame's group, so that Tab goes through it in the order the eye reads it
                let gap = ui.available_width() - self.header_right_width;
                if gap > 0.0 {
                    ui.add_space(gap);
                }
                let start = ui.cursor().min.x;
                if ui.button(tr(lang, "Load config…")).clicked() {
                    if let Some(p) = rfd::FileDialog::new().add_filter("run config", &["toml"]).pick_file() {
                        match RunConfig::load(&p) {
                            Ok(c) => {
                                self.sample_prompts_text = c.train.sample_prompts.join("\n");
                                self.settings.config = c;
                                self.refresh_model_info();
                            }
                            Err(e) => self.status = Some((true, e.to_string())),
                        }
                    }
                }
                if ui.button(tr(lang, "Save config…")).clicked() {
                    // in the run's folder (or beside it, before the run made it), named after it
                    let out = &self.settings.config.train.output_dir;
                    let dir = if out.is_dir() { Some(out.as_path()) } else { out.parent().filter(|p| p.is_dir()) };
                    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or("run".into());
                    let mut dialog = rfd::FileDialog::new().add_filter("run config", &["toml"]);
                    if let Some(dir) = dir {
                        dialog = dialog.set_directory(dir);
                    }
                    if let Some(p) = dialog.set_file_name(format!("{name}.toml")).save_file() {
                        self.save_config_to(&p);
                    }
                }
                let before = self.settings.lang;
                let label = ui.label(tr(lang, "Language"));
                egui::ComboBox::from_id_salt("language")
                    .selected_text(self.settings.lang.label())
                    .show_ui(ui, |ui| {
                        for l in [Lang::En, Lang::Zh] {
                            ui.selectable_value(&mut self.settings.lang, l, l.label());
                        }
                    })
                    .response
                    .labelled_by(label.id);
                if before != self.settings.lang {
                    self.save_settings();
                }
                let width = ui.min_rect().max.x - start;
                if (width - self.header_right_width).abs() > 0.5 {
                    self.header_right_width = width;
                    ui.ctx().request_discard("the header's right-hand group changed width");
                }
            });
            if let Some((is_error, text)) = self.status.clone() {
                let color = if is_error { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
                ui.horizontal(|ui| {
                    ui.colored_label(color, tr_message(lang, &text));
                    if ui.small_button("✕").clicked() {
                        self.status = None;
                    }
                });
            }
        });
    }

    fn settings_panels(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        // ids from the English names, so a language switch keeps what is open
        egui::CollapsingHeader::new(tr(lang, "Model"))
            .id_salt("Model")
            .default_open(true)
            .show(ui, |ui| self.model_panel(ui));
        egui::CollapsingHeader::new(tr(lang, "Dataset"))
            .id_salt("Dataset")
            .default_open(true)
            .show(ui, |ui| self.dataset_panel(ui));
        egui::CollapsingHeader::new(tr(lang, "LoRA"))
            .id_salt("LoRA")
            .default_open(true)
            .show(ui, |ui| self.lora_panel(ui));
        egui::CollapsingHeader::new(tr(lang, "Training"))
            .id_salt("Training")
            .default_open(false)
            .show(ui, |ui| self.training_panel(ui));
        let process = self.run_process_bytes();
        match self.config_for_estimate() {
            Some(c) => self.memory_view.update(&c, self.data_view.prepared(), process),
            None => self
                .memory_view
                .clear(tr(lang, "The estimate comes once the model is local (or pick a size from the table).")),
        }
        let offer = egui::CollapsingHeader::new(tr(lang, "Memory"))
            .id_salt("Memory")
            .default_open(true)
            .show(ui, |ui| self.memory_view.ui(ui, lang))
            .body_returned
            .unwrap_or(false);
        if offer {
            self.handoff.open = true;
        }
        if self.handoff.open {
            let config = self.settings.config.clone();
            let mut header = egui::CollapsingHeader::new(tr(lang, "Hand off to several GPUs")).id_salt("Handoff");
            if offer {
                header = header.open(Some(true));
            }
            header.default_open(true).show(ui, |ui| {
                self.handoff.ui(ui, lang, &config);
                if ui.small_button(tr(lang, "Close")).clicked() {
                    self.handoff.open = false;
                }
            });
        }
    }

    fn model_panel(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        ui.horizontal(|ui| {
            labelled(ui, tr(lang, "Source"), |ui| {
                ui.add(egui::TextEdit::singleline(&mut self.settings.config.model.source).desired_width(f32::INFINITY))
            });
        });
        ui.horizontal(|ui| {
            if ui.button(tr(lang, "Folder…")).clicked() {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    self.settings.config.model.source = p.display().to_string();
                }
            }
            if ui.button(tr(lang, "GGUF file…")).clicked() {
                if let Some(p) = rfd::FileDialog::new().add_filter("GGUF", &["gguf"]).pick_file() {
                    self.settings.config.model.source = p.display().to_string();
                }
            }
        });
        self.family_picker(ui);
        self.hub_cache_picker(ui);
        self.refresh_model_info();
        self.source.status_ui(ui, lang);
        match self.source.described() {
            Some(Ok(info)) => {
                egui::Grid::new("model_info").num_columns(2).show(ui, |ui| {
                    let s = &info.spec;
                    ui.label(tr(lang, "Family"));
                    ui.label(&info.family_name);
                    ui.end_row();
                    ui.label(tr(lang, "Parameters"));
                    ui.label(human_count(info.parameters));
                    ui.end_row();
                    ui.label(tr(lang, "Layers"));
                    ui.label(s.layers.to_string());
                    ui.end_row();
                    ui.label(tr(lang, "Heads"));
                    ui.label(format!("{} (KV {})", s.heads, s.kv_heads));
                    ui.end_row();
                    ui.label(tr(lang, "Vocabulary"));
                    ui.label(s.vocab.to_string());
                    ui.end_row();
                    ui.label(tr(lang, "Context"));
                    ui.label(info.context_length.map(|c| c.to_string()).unwrap_or_else(|| "–".into()));
                    ui.end_row();
                });
            }
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            None => {}
        }
        ui.horizontal(|ui| {
            ui.label(tr(lang, "Mode"));
            ui.radio_value(&mut self.settings.config.model.mode, Mode::Lora, "LoRA");
            ui.radio_value(&mut self.settings.config.model.mode, Mode::Qlora, "QLoRA (NF4)");
        });
        ui.horizontal(|ui| {
            let label = ui.label(tr(lang, "Device"));
            let device = &mut self.settings.config.model.device;
            let gpus = self.memory_view.gpus();
            egui::ComboBox::from_id_salt("device")
                .selected_text(device.clone())
                .show_ui(ui, |ui| {
                    ui.selectable_value(device, "cpu".to_string(), "cpu");
                    if cfg!(feature = "cuda") {
                        for g in gpus {
                            ui.selectable_value(
                                device,
                                format!("cuda:{}", g.index),
                                format!("cuda:{} {}", g.index, g.name),
                            );
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label(tr(lang, "Compute"));
            let auto_dtype = crate::train::ModelConfig { dtype: "auto".into(), ..self.settings.config.model.clone() }
                .compute_dtype();
            let auto = format!("auto ({})", crate::memory::estimate::dtype_name(auto_dtype));
            let dtype = &mut self.settings.config.model.dtype;
            egui::ComboBox::from_id_salt("compute_dtype")
                .selected_text(if dtype == "auto" { auto.to_string() } else { dtype.clone() })
                .show_ui(ui, |ui| {
                    ui.selectable_value(dtype, "auto".to_string(), &auto);
                    for d in ["bf16", "f16", "f32"] {
                        ui.selectable_value(dtype, d.to_string(), d);
                    }
                })
                .response
                .labelled_by(label.id)
                .on_hover_text(tr(
                    lang,
                    "The dtype of the frozen weights and activations. LoRA weights and optimizer state stay f32.",
                ));
        });
    }

    /// The models of the local hub cache, with family, size and whether they are complete.
    fn hub_cache_picker(&mut self, ui: &mut egui::Ui) {
        if self.cached_models.is_empty() {
            return;
        }
        let lang = self.lang();
        ui.horizontal(|ui| {
            let label = ui.label(tr(lang, "Hub cache"));
            egui::ComboBox::from_id_salt("hub_cache")
                .selected_text("…")
                .show_ui(ui, |ui| {
                    for m in &self.cached_models {
                        let text = format!(
                            "{} · {} · {}{}",
                            m.repo_id,
                            m.family.as_deref().unwrap_or("?"),
                            human_bytes(m.size_bytes),
                            if m.complete { "" } else { " · incomplete" }
                        );
                        let pick = ui.add_enabled(m.complete, egui::Button::selectable(false, text));
                        let pick = match &m.problem {
                            Some(p) => pick.on_disabled_hover_text(p),
                            None => pick,
                        };
                        if pick.clicked() {
                            self.settings.config.model.source = m.snapshot.display().to_string();
                        }
                    }
                })
                .response
                .labelled_by(label.id);
        });
    }

    /// Family → size → the well-known hub checkpoint.
    fn family_picker(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        let Ok(table) = crate::arch::table() else { return };
        let families = table.families();
        if families.is_empty() {
            return;
        }
        self.family_choice = self.family_choice.min(families.len() - 1);
        let family = &families[self.family_choice];
        ui.horizontal(|ui| {
            let label = ui.label(tr(lang, "From the table"));
            egui::ComboBox::from_id_salt("family")
                .selected_text(&family.name)
                .show_ui(ui, |ui| {
                    for (i, f) in families.iter().enumerate() {
                        if ui.selectable_value(&mut self.family_choice, i, &f.name).clicked() {
                            self.size_choice = 0;
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            let family = &families[self.family_choice];
            self.size_choice = self.size_choice.min(family.sizes.len().saturating_sub(1));
            let size = family.sizes.get(self.size_choice).cloned().unwrap_or_default();
            let size_label = ui.label(tr(lang, "Size"));
            egui::ComboBox::from_id_salt("size")
                .selected_text(&size)
                .show_ui(ui, |ui| {
                    for (i, s) in family.sizes.iter().enumerate() {
                        // each size with the hub id of its well-known checkpoint
                        let text = match family.checkpoints.get(s) {
                            Some(id) => format!("{s} · {id}"),
                            None => s.clone(),
                        };
                        ui.selectable_value(&mut self.size_choice, i, text);
                    }
                })
                .response
                .labelled_by(size_label.id);
            let hub_id = family.checkpoints.get(&size);
            let use_it = ui.add_enabled(hub_id.is_some(), egui::Button::new(tr(lang, "Use")));
            if let Some(id) = hub_id {
                if use_it.on_hover_text(id).clicked() {
                    self.settings.config.model.source = id.to_string();
                }
            }
        });
    }

    fn dataset_panel(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        self.data_view.settings(ui, lang, &mut self.settings.config.data);
        let (dir, family) = match self.source.info() {
            Some(Ok(info)) => (Some(info.dir.clone()), Some(info.family_id.clone())),
            _ => (None, None),
        };
        self.data_view.update(&self.settings.config.data, dir.as_deref(), family.as_deref());
        egui::CollapsingHeader::new(tr(lang, "Preview")).id_salt("Preview").default_open(true).show(ui, |ui| {
            self.data_view.preview_ui(ui, lang);
        });
    }

    fn lora_panel(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        let lora = &mut self.settings.config.lora;
        egui::Grid::new("lora_settings").num_columns(2).show(ui, |ui| {
            labelled(ui, tr(lang, "Rank r"), |ui| ui.add(egui::Slider::new(&mut lora.r, 1..=256).logarithmic(true)));
            ui.end_row();
            labelled(ui, tr(lang, "Alpha"), |ui| {
                ui.add(egui::DragValue::new(&mut lora.alpha).range(0.5..=1024.0).speed(0.5))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Dropout"), |ui| ui.add(egui::Slider::new(&mut lora.dropout, 0.0..=0.5)));
            ui.end_row();
            ui.label("rsLoRA");
            ui.checkbox(&mut lora.rslora, "α/√r");
            ui.end_row();
            ui.label("DoRA");
            ui.checkbox(&mut lora.dora, tr(lang, "magnitude per output row")).on_hover_text(tr(
                lang,
                "Weight-decomposed LoRA (PEFT's use_dora): a trainable magnitude scales each output row of the \
                 normalised W + s·B·A. Often a little better than LoRA at the same rank; each step costs more.",
            ));
            ui.end_row();
        });
        let Some(Ok(info)) = self.source.described() else { return };
        ui.label(egui::RichText::new(tr(lang, "Target modules")).strong());
        if let Some(note) = &info.default_targets_note {
            ui.weak(note);
        }
        ui.horizontal(|ui| {
            if ui.button(tr(lang, "Table default")).clicked() {
                lora.targets = info.default_targets.clone();
            }
            if ui.button(tr(lang, "Attention")).clicked() {
                lora.targets = info.module_names(|role| role.is_attention());
            }
            if ui.button(tr(lang, "All linear")).clicked() {
                lora.targets = vec!["all-linear".into()];
            }
        });
        let all = lora.targets.iter().any(|t| t == "all-linear");
        if all {
            // expand the preset into its modules so single boxes can be unticked
            lora.targets = info.module_names(|role| role.in_all_linear());
        }
        let selected = |targets: &[String], m: &LinearModule| ModelSpec::targets_select(targets, &m.path);
        for m in &info.linear_modules {
            let mut on = selected(&lora.targets, m);
            let shape = m.shape.map(|[o, i]| format!("{o}×{i}")).unwrap_or_else(|| tr(lang, "packed").into());
            let fused = m.fused.as_ref().map(|f| trf(lang, " · fused {}", &[f])).unwrap_or_default();
            let default = if info.default_targets.iter().any(|t| selected(std::slice::from_ref(t), m)) {
                tr(lang, " · default")
            } else {
                ""
            };
            if ui.checkbox(&mut on, format!("{}  [{shape}] ×{}{fused}{default}", m.name, m.count)).changed() {
                // one name per ticked module: a target that selects several (Qwen's `c_proj`)
                // is split so that this box alone changes
                let targets = lora.targets.clone();
                lora.targets = info
                    .linear_modules
                    .iter()
                    .filter(|x| if x.name == m.name { on } else { selected(&targets, x) })
                    .map(|x| x.name.clone())
                    .collect();
            }
        }
        let params = info.lora_parameters(&lora.targets, lora.r, lora.dora);
        ui.label(format!(
            "{}: {} ({:.3}%) · {}: {}",
            tr(lang, "Trainable parameters"),
            human_count(params),
            100.0 * params as f64 / info.parameters.max(1) as f64,
            tr(lang, "Adapter memory"),
            // f32 weight, gradient and AdamW's two moments
            human_bytes(params as u64 * 16)
        ));
    }

    fn training_panel(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        let t = &mut self.settings.config.train;
        egui::Grid::new("train_settings").num_columns(2).show(ui, |ui| {
            labelled(ui, tr(lang, "Learning rate"), |ui| {
                ui.add(egui::DragValue::new(&mut t.learning_rate).range(1e-7..=1.0).speed(1e-5).max_decimals(7))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Schedule"), |ui| {
                egui::ComboBox::from_id_salt("schedule")
                    .selected_text(format!("{:?}", t.schedule))
                    .show_ui(ui, |ui| {
                        for s in [Schedule::Cosine, Schedule::Linear, Schedule::Constant] {
                            ui.selectable_value(&mut t.schedule, s, format!("{s:?}"));
                        }
                    })
                    .response
            });
            ui.end_row();
            labelled(ui, tr(lang, "Warmup steps"), |ui| {
                ui.add(egui::DragValue::new(&mut t.warmup_steps).range(0..=100000))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Epochs"), |ui| {
                ui.add(egui::DragValue::new(&mut t.epochs).range(0.0..=100.0).speed(0.1))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Max steps (0 = from epochs)"), |ui| {
                ui.add(egui::DragValue::new(&mut t.max_steps).range(0..=1_000_000))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Batch size"), |ui| ui.add(egui::DragValue::new(&mut t.batch_size).range(1..=512)));
            ui.end_row();
            labelled(ui, tr(lang, "Gradient accumulation"), |ui| {
                ui.add(egui::DragValue::new(&mut t.grad_accum).range(1..=512))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Gradient checkpointing"), |ui| {
                let name = |c: Checkpointing| match c {
                    Checkpointing::Off => tr(lang, "off"),
                    Checkpointing::On => tr(lang, "on"),
                    Checkpointing::Auto => tr(lang, "auto (on a GPU; on the CPU when it would not fit otherwise)"),
                };
                egui::ComboBox::from_id_salt("gradient_checkpointing")
                    .selected_text(name(t.gradient_checkpointing))
                    .show_ui(ui, |ui| {
                        for c in [Checkpointing::Auto, Checkpointing::On, Checkpointing::Off] {
                            ui.selectable_value(&mut t.gradient_checkpointing, c, name(c));
                        }
                    })
                    .response
                    .on_hover_text(tr(
                        lang,
                        "Keeps only each layer's input and recomputes the layer in the backward: the same \
                         results with far less memory, for about a third more time per step.",
                    ))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Memory check"), |ui| {
                ui.checkbox(&mut t.ignore_memory_estimate, tr(lang, "start even if the estimate says it does not fit"))
                    .on_hover_text(tr(
                        lang,
                        "A run whose estimate does not fit trains in smaller micro-batches, or is refused with what \
                         to change. Tick this to start it anyway.",
                    ))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Seed"), |ui| ui.add(egui::DragValue::new(&mut t.seed)));
            ui.end_row();
            labelled(ui, tr(lang, "Evaluate every"), |ui| {
                ui.add(egui::DragValue::new(&mut t.eval_every).range(0..=100000))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Checkpoint every"), |ui| {
                ui.add(egui::DragValue::new(&mut t.checkpoint_every).range(0..=100000))
            });
            ui.end_row();
            labelled(ui, tr(lang, "Sample every"), |ui| {
                ui.add(egui::DragValue::new(&mut t.sample_every).range(0..=100000))
            });
            ui.end_row();
        });
        if labelled(ui, tr(lang, "Sample prompts (one per line)"), |ui| {
            ui.add(egui::TextEdit::multiline(&mut self.sample_prompts_text).desired_rows(2))
        })
        .changed()
        {
            t.sample_prompts =
                self.sample_prompts_text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
        }
        let label = ui.label(tr(lang, "Output folder"));
        let mut out = t.output_dir.display().to_string();
        ui.horizontal(|ui| {
            if ui.add(egui::TextEdit::singleline(&mut out)).labelled_by(label.id).changed() {
                t.output_dir = PathBuf::from(&out);
            }
            if ui.button(tr(lang, "Folder…")).clicked() {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    t.output_dir = p;
                }
            }
        });
        if ui
            .button(tr(lang, "Hand off to LLaMA-Factory or axolotl…"))
            .on_hover_text(tr(
                lang,
                "For a run that outgrows this machine: write it as a multi-GPU job for another trainer, and open its \
                 result in the Runs tab.",
            ))
            .clicked()
        {
            self.handoff.open = true;
        }
    }

    fn central(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        ui.horizontal(|ui| {
            let active = self.run.as_ref().is_some_and(|r| r.is_active());
            let start = ui.add_enabled(
                !active,
                egui::Button::new(egui::RichText::new(format!("▶ {}", tr(lang, "Start"))).strong()),
            );
            if start.clicked() {
                self.start_run(None);
            }
            ui.separator();
            ui.selectable_value(&mut self.tab, Tab::Run, tr(lang, "Run"));
            ui.selectable_value(&mut self.tab, Tab::Runs, tr(lang, "Runs"));
            ui.selectable_value(&mut self.tab, Tab::Try, tr(lang, "Try"));
            ui.selectable_value(&mut self.tab, Tab::Export, tr(lang, "Export"));
        });
        ui.separator();
        let tab = self.tab;
        match tab {
            Tab::Run => match &mut self.run {
                Some(run) => {
                    run.controls(ui, lang);
                    // a run refused because its estimate does not fit: the user may insist
                    let refused = matches!(&run.state, RunState::Failed(m) if crate::train::memory_plan::is_refusal(m));
                    if refused
                        && ui
                            .button(tr(lang, "Start anyway"))
                            .on_hover_text(tr(
                                lang,
                                "Starts this run once more, ignoring the memory estimate (the Training section's \
                                 Memory check does so for every run).",
                            ))
                            .clicked()
                    {
                        self.ignore_memory_estimate_once = true;
                    }
                    egui::ScrollArea::vertical().show(ui, |ui| {
                        run.plots(ui, lang);
                        run.samples_and_log(ui, lang);
                    });
                }
                None => {
                    ui.label(tr(lang, "Not started"));
                }
            },
            Tab::Runs => {
                if self.shown_tab != Tab::Runs {
                    self.records_read = None;
                }
                egui::ScrollArea::vertical().show(ui, |ui| self.runs_tab(ui));
            }
            Tab::Try => {
                let adapter = self.latest_checkpoint();
                let c = &self.settings.config;
                let model = c.model.source.clone();
                // prompts to start from: the run's sample prompts, then the dataset's first ones
                self.try_view.suggest(&c.train.sample_prompts, &c.data.path, c.data.format);
                self.try_view.ui(ui, lang, &model, adapter);
            }
            Tab::Export => {
                let last = self.latest_checkpoint();
                let target = self.export_target.as_deref();
                self.export.show(ui, lang, last, target, &mut self.settings.last_export_dir);
            }
        }
        self.shown_tab = tab;
        if self.ignore_memory_estimate_once {
            self.start_run(None);
        }
    }

    /// The newest checkpoint: of the run on screen, else of the newest past run.
    fn latest_checkpoint(&mut self) -> Option<PathBuf> {
        self.run.as_ref().and_then(|r| r.last_checkpoint()).or_else(|| {
            self.refresh_records();
            self.records.first().map(|r| r.checkpoint.clone())
        })
    }

    /// Read the run history again when it was invalidated (a run ended, the Runs tab opened)
    /// or is a few seconds old (a run may be writing): on a worker thread, whose records
    /// replace the shown ones when it is done.
    fn refresh_records(&mut self) {
        if self.records_job.as_ref().is_some_and(|j| j.is_finished()) {
            let job = self.records_job.take().expect("checked above");
            self.records = job.join().unwrap_or_default();
        }
        let stale = self
            .records_read
            .as_ref()
            .is_none_or(|(read, at)| *read != self.settings.runs || at.elapsed() > std::time::Duration::from_secs(3));
        if !stale || self.records_job.is_some() {
            return;
        }
        let dirs = self.settings.runs.clone();
        self.records_read = Some((dirs.clone(), std::time::Instant::now()));
        if dirs.is_empty() {
            self.records.clear();
            return;
        }
        self.records_job =
            Some(std::thread::spawn(move || dirs.iter().rev().filter_map(|d| RunRecord::read(d)).collect()));
    }

    /// Whether the run history is being read (tests wait for it).
    pub fn records_loading(&self) -> bool {
        self.records_job.is_some()
    }

    /// Past runs: their settings, curves, peak memory and final losses; compared on one plot,
    /// reopened, resumed from their last checkpoint, or exported.
    fn runs_tab(&mut self, ui: &mut egui::Ui) {
        let lang = self.lang();
        self.refresh_records();
        if self.records_loading() {
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(50));
        }
        if ui
            .button(tr(lang, "Add a finished run…"))
            .on_hover_text(tr(
                lang,
                "A run folder of qlora-studio, or the output folder of a job handed to LLaMA-Factory or axolotl.",
            ))
            .clicked()
        {
            if let Some(p) = rfd::FileDialog::new().pick_folder() {
                self.add_run_folder(&p);
            }
        }
        let records = self.records.clone();
        if records.is_empty() {
            if self.records_loading() {
                ui.spinner();
            } else {
                ui.label(tr(lang, "No runs yet."));
            }
            return;
        }
        let mut reopen = None;
        let mut resume = None;
        let mut export = None;
        let mut use_settings = None;
        for r in &records {
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.set_width(ui.available_width());
                ui.horizontal_wrapped(|ui| {
                    let mut on = self.compare.contains(&r.dir);
                    if ui.checkbox(&mut on, tr(lang, "Compare")).changed() {
                        if on {
                            self.compare.push(r.dir.clone());
                        } else {
                            self.compare.retain(|d| d != &r.dir);
                        }
                    }
                    ui.strong(last_component(&r.dir.display().to_string())).on_hover_text(r.dir.display().to_string());
                    if let Some(tool) = r.imported {
                        ui.label(trf(lang, "trained by {}", &[&tool]));
                    }
                    ui.label(last_component(&r.config.model.source)).on_hover_text(&r.config.model.source);
                    let c = &r.config;
                    let mode = if c.model.mode == Mode::Qlora { "QLoRA" } else { "LoRA" };
                    let lr = format!("{:.0e}", c.train.learning_rate);
                    let (r, batch, accum) = (c.lora.r, c.train.batch_size, c.train.grad_accum);
                    ui.weak(trf(
                        lang,
                        "{} r={} α={} · lr {} · batch {}×{}",
                        &[&mode, &r, &c.lora.alpha, &lr, &batch, &accum],
                    ))
                    .on_hover_text(c.to_toml());
                });
                ui.horizontal_wrapped(|ui| {
                    ui.label(tr(lang, "Steps"));
                    ui.label(format!("{}/{}", r.state.step, r.state.total_steps));
                    let last = |l: &[(usize, f64)]| l.last().map(|l| format!("{:.4}", l.1)).unwrap_or("–".into());
                    ui.label(format!("· {} {}", tr(lang, "Training loss"), last(&r.state.losses)));
                    ui.label(format!("· {} {}", tr(lang, "Validation loss"), last(&r.state.eval_losses)));
                    let peak = match (r.state.peak_device, r.state.peak_rss) {
                        (Some(d), _) => format!("{} (GPU)", human_bytes(d)),
                        (None, 0) => "–".into(),
                        (None, rss) => format!("{} (RSS)", human_bytes(rss)),
                    };
                    ui.label(format!("· {} {peak}", tr(lang, "Peak memory")));
                });
                ui.horizontal_wrapped(|ui| {
                    if ui.button(tr(lang, "Reopen")).clicked() {
                        reopen = Some(r.clone());
                    }
                    let unfinished = r.imported.is_none() && r.state.step < r.state.total_steps;
                    if ui.add_enabled(unfinished, egui::Button::new(tr(lang, "Resume from last checkpoint"))).clicked()
                    {
                        resume = Some((r.checkpoint.clone(), r.config.clone()));
                    }
                    if ui.button(tr(lang, "Export…")).clicked() {
                        export = Some(r.checkpoint.clone());
                    }
                    if ui.button(tr(lang, "Use its settings")).clicked() {
                        use_settings = Some(r.config.clone());
                    }
                });
            });
        }
        if !self.compare.is_empty() {
            let title = egui::RichText::new(tr(lang, "Training loss of the compared runs")).strong();
            titled_plot(ui, "compare", title, |ui| {
                page_plot(ui, "compare")
                    .height(260.0)
                    .legend(egui_plot::Legend::default())
                    .show(ui, |p| {
                        for r in records.iter().filter(|r| self.compare.contains(&r.dir)) {
                            let points: Vec<[f64; 2]> = r.state.losses.iter().map(|&(s, l)| [s as f64, l]).collect();
                            let name = r.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                            p.line(egui_plot::Line::new(name, egui_plot::PlotPoints::from(points)));
                        }
                    })
                    .response
            });
        }
        if let Some(r) = reopen {
            let end = RunFinished {
                step: r.state.step,
                stopped: r.state.step < r.state.total_steps,
                checkpoint: Some(r.checkpoint.clone()),
                train_loss: r.state.losses.last().map(|l| l.1),
                validation_loss: r.state.eval_losses.last().map(|l| l.1),
            };
            self.run = Some(RunView::from_history(r.config.clone(), &r.state.losses, &r.state.eval_losses, end));
            self.tab = Tab::Run;
        }
        if let Some(ck) = export {
            self.export.checkpoint.set(&ck);
            self.tab = Tab::Export;
        }
        if let Some(config) = use_settings {
            self.sample_prompts_text = config.train.sample_prompts.join("\n");
            self.settings.config = config;
            self.refresh_model_info();
        }
        if let Some((ck, config)) = resume {
            // the record's config is the checkpoint's; the trainer reads the rest on its thread
            self.sample_prompts_text = config.train.sample_prompts.join("\n");
            self.settings.config = config;
            self.start_run(Some(ck));
        }
    }

    /// Lists a finished run in the Runs tab: a run folder of ours, or the result of a job handed
    /// to another tool (its output folder, or the job folder holding output/).
    pub fn add_run_folder(&mut self, dir: &Path) {
        let ours = checkpoint::latest(dir).is_some();
        if !ours && !crate::handoff::import::is_result(dir) {
            self.status = Some((
                true,
                format!(
                    "{}: not a run folder: no checkpoint of qlora-studio and no PEFT adapter with a trainer state or log \
                     of LLaMA-Factory or axolotl",
                    dir.display()
                ),
            ));
            return;
        }
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !self.settings.runs.contains(&dir) {
            self.settings.runs.push(dir);
        }
        self.tab = Tab::Runs;
    }

    /// Model folders, GGUF files and datasets dropped onto the window.
    fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).filter(|p| !p.as_os_str().is_empty()).collect()
        });
        for path in dropped {
            if path.is_dir() && crate::handoff::import::is_result(&path) {
                self.add_run_folder(&path);
                continue;
            }
            let is_model = path.join("config.json").is_file() || path.extension().is_some_and(|e| e == "gguf");
            if is_model {
                self.settings.config.model.source = path.display().to_string();
            } else {
                self.settings.config.data.path = path;
            }
        }
    }
}

/// A past run, read from the newest checkpoint in its output folder.
#[derive(Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    /// The newest checkpoint, or the adapter of a run trained by another tool.
    pub checkpoint: PathBuf,
    pub config: RunConfig,
    pub state: checkpoint::TrainerState,
    /// The tool that trained it, for a run handed off and brought back (it cannot be resumed here).
    pub imported: Option<&'static str>,
}

impl RunRecord {
    /// What a run's card shows, from its newest checkpoint's config and trainer state (not its
    /// adapter or optimizer state). Slow on a big history: call it off the UI thread.
    pub fn read(dir: &Path) -> Option<Self> {
        let Some(ck) = checkpoint::latest(dir) else {
            // the result of a job handed to LLaMA-Factory or axolotl
            let r = crate::handoff::read_result(dir).ok()?;
            return Some(Self {
                dir: dir.to_path_buf(),
                checkpoint: r.adapter,
                config: r.config,
                state: r.state,
                imported: Some(r.tool),
            });
        };
        let (config, state) = checkpoint::read_summary(&ck).ok()?;
        Some(Self { dir: dir.to_path_buf(), checkpoint: ck, config, state, imported: None })
    }
}

/// The last part of a path (a hub id stays whole), for narrow columns.
fn last_component(path: &str) -> String {
    if crate::hub::parse_hub_id(path).is_some() && !Path::new(path).exists() {
        return path.to_string();
    }
    Path::new(path).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| path.to_string())
}

/// `runs/demo` → the first of `runs/demo-2`, `runs/demo-3`, ... that does not exist.
fn next_free_folder(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
    (2..).map(|n| dir.with_file_name(format!("{name}-{n}"))).find(|d| !d.exists()).expect("an unused name")
}

pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1073741824.0 {
        format!("{:.2} GiB", b / 1073741824.0)
    } else if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        // a Modelfile or a config: "0 KiB" would read as empty
        format!("{b:.0} B")
    }
}

/// The status line after a run (kept in English, shown through `tr_message`).
fn finished_text(f: &RunFinished) -> String {
    match (&f.checkpoint, f.stopped) {
        (Some(p), false) => format!("run finished at step {}; adapter in {}", f.step, p.display()),
        (Some(p), true) => format!("run stopped at step {}; adapter in {}", f.step, p.display()),
        (None, false) => format!("run finished at step {}", f.step),
        (None, true) => format!("run stopped at step {}", f.step),
    }
}

/// A desktop notification through the freedesktop `notify-send` tool, where there is one.
fn notify(outcome: &Result<RunFinished, String>, lang: Lang) {
    let (title, body) = match outcome {
        Ok(f) => (tr(lang, "qlora-studio: run finished"), finished_text(f)),
        Err(m) => (tr(lang, "qlora-studio: run failed"), m.clone()),
    };
    let _ = std::process::Command::new("notify-send").arg(title).arg(tr_message(lang, &body)).spawn();
}

/// A plot under its title, in a scope whose id is fixed by `id`: egui_plot takes its focusable
/// response from the Ui's running widget count, so a spinner or a status line that comes and
/// goes above it would change the plot's id and take the keyboard focus away from it. Returns
/// the title's response (for a hint on hover).
pub(crate) fn titled_plot(
    ui: &mut egui::Ui,
    id: &str,
    title: impl Into<egui::WidgetText>,
    plot: impl FnOnce(&mut egui::Ui) -> egui::Response,
) -> egui::Response {
    let scope = egui::UiBuilder::new().scope_id(ui.scope_id().with(id));
    ui.scope_builder(scope, |ui| {
        let title = ui.label(title);
        let plot = plot(ui).labelled_by(title.id);
        if plot.contains_pointer() && ui.input(|i| pans_plots(&i.modifiers)) {
            // the wheel panned the plot: the page under it stays where it is
            ui.input_mut(|i| i.smooth_scroll_delta = egui::Vec2::ZERO);
        }
        title
    })
    .inner
}

/// Shift+wheel pans a plot sideways, Alt+wheel up and down; the wheel alone scrolls the page.
fn pans_plots(modifiers: &egui::Modifiers) -> bool {
    modifiers.shift || modifiers.alt
}

/// A plot for a page that scrolls: the wheel scrolls the page as it does everywhere else, Ctrl
/// (Cmd on a Mac) + wheel zooms, Shift or Alt + wheel pans, dragging pans, and a double-click brings the
/// automatic view back. Its memory (view, hidden lines) is kept under `plot_id(id)`.
pub(crate) fn page_plot<'a>(ui: &egui::Ui, id: &str) -> egui_plot::Plot<'a> {
    egui_plot::Plot::new(id)
        .id(plot_id(id))
        .allow_scroll(ui.input(|i| pans_plots(&i.modifiers)))
        .allow_double_click_reset(true)
}

/// The id under which egui_plot keeps a page plot's view (`egui_plot::PlotMemory`).
pub fn plot_id(id: &str) -> egui::Id {
    egui::Id::unique(("qlora-studio plot", id))
}

/// A label and the widget it names, so screen readers (and UI tests) know what the widget is.
fn labelled(ui: &mut egui::Ui, text: &str, add: impl FnOnce(&mut egui::Ui) -> egui::Response) -> egui::Response {
    let label = ui.label(text);
    add(ui).labelled_by(label.id)
}
