//! The Try tab: one prompt, answered by the base model and by the base with the adapter from
//! the latest checkpoint, side by side (generated on a worker thread). Prompts to start from
//! are offered: the run's sample prompts and the dataset's first instructions.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use eframe::egui;

use super::checkpoint_field::CheckpointField;
use super::i18n::{tr, Lang};
use crate::data::{self, DataFormat};
use crate::hub::try_model::{generate_text, GenerateRequest};

type Answers = (Result<String, String>, Option<Result<String, String>>);

/// How many of the dataset's first user turns are offered.
const DATASET_PROMPTS: usize = 5;

pub struct TryView {
    pub prompt: String,
    /// The prompts offered: the run's sample prompts, then the dataset's first instructions.
    pub suggestions: Vec<String>,
    /// The dataset whose first instructions were read (or are being read), and the worker.
    read_from: Option<(PathBuf, DataFormat)>,
    dataset_job: Option<JoinHandle<Vec<String>>>,
    dataset_prompts: Vec<String>,
    /// The empty prompt was filled with the first suggestion once; after that it is the user's.
    prefilled: bool,
    /// The adapter (checkpoint) folder compared with the base model.
    pub adapter: CheckpointField,
    pub max_tokens: usize,
    pub chat: bool,
    job: Option<JoinHandle<Answers>>,
    pub answers: Option<Answers>,
}

impl Default for TryView {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            suggestions: Vec::new(),
            read_from: None,
            dataset_job: None,
            dataset_prompts: Vec::new(),
            prefilled: false,
            adapter: CheckpointField::default(),
            max_tokens: 64,
            chat: true,
            job: None,
            answers: None,
        }
    }
}

impl TryView {
    pub fn is_busy(&self) -> bool {
        self.job.as_ref().is_some_and(|j| !j.is_finished())
    }

    /// Whether the dataset's first instructions are being read (tests wait for it).
    pub fn is_reading_dataset(&self) -> bool {
        self.dataset_job.is_some()
    }

    /// Offer `sample_prompts` and the first instructions of the dataset at `data` (read once
    /// per dataset, on a worker thread); an empty prompt starts as the first of them.
    pub fn suggest(&mut self, sample_prompts: &[String], data: &Path, format: DataFormat) {
        if self.dataset_job.as_ref().is_some_and(|j| j.is_finished()) {
            let job = self.dataset_job.take().expect("checked above");
            self.dataset_prompts = job.join().unwrap_or_default();
        }
        let key = (data.to_path_buf(), format);
        if self.read_from.as_ref() != Some(&key) && self.dataset_job.is_none() {
            self.read_from = Some(key);
            let data = data.to_path_buf();
            self.dataset_job = Some(std::thread::spawn(move || first_instructions(&data, format, DATASET_PROMPTS)));
        }
        let mut all: Vec<String> = sample_prompts.iter().filter(|p| !p.trim().is_empty()).cloned().collect();
        for p in &self.dataset_prompts {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        self.suggestions = all;
        if !self.prefilled && self.prompt.is_empty() && self.dataset_job.is_none() {
            if let Some(first) = self.suggestions.first() {
                self.prompt = first.clone();
                self.prefilled = true;
            }
        }
    }

    pub fn poll(&mut self) {
        if self.job.as_ref().is_some_and(|j| j.is_finished()) {
            let job = self.job.take().expect("checked above");
            self.answers =
                Some(job.join().unwrap_or_else(|_| (Err("generation stopped on an internal error".into()), None)));
        }
    }

    /// `latest`: the newest checkpoint (of the run on screen, else of the newest past run),
    /// proposed until the user picks another adapter.
    pub fn ui(&mut self, ui: &mut egui::Ui, lang: Lang, model: &str, latest: Option<PathBuf>) {
        self.poll();
        self.adapter.ui(ui, lang, "Adapter", latest.as_deref());
        let adapter = self.adapter.path();
        if self.dataset_job.is_some() {
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        if !self.suggestions.is_empty() {
            ui.horizontal(|ui| {
                let label = ui.label(tr(lang, "Suggested prompts"));
                egui::ComboBox::from_id_salt("suggested_prompts")
                    .selected_text("…")
                    .width(ui.available_width().min(480.0))
                    .show_ui(ui, |ui| {
                        for s in &self.suggestions {
                            // one line each: the first line of the prompt, shortened
                            let line = s.lines().next().unwrap_or_default();
                            let short: String = line.chars().take(80).collect();
                            let text = if short.len() < s.len() { format!("{short}…") } else { short };
                            if ui.selectable_label(self.prompt == *s, text).on_hover_text(s).clicked() {
                                self.prompt = s.clone();
                                self.prefilled = true;
                            }
                        }
                    })
                    .response
                    .labelled_by(label.id);
            });
        }
        let label = ui.label(tr(lang, "Prompt"));
        ui.add(egui::TextEdit::multiline(&mut self.prompt).desired_rows(3).desired_width(f32::INFINITY))
            .labelled_by(label.id);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.chat, tr(lang, "As a chat turn (the model's template)"));
            let label = ui.label(tr(lang, "Max new tokens"));
            ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=2048)).labelled_by(label.id);
        });
        let ready = !self.prompt.trim().is_empty() && !self.is_busy() && !model.is_empty();
        if ui.add_enabled(ready, egui::Button::new(tr(lang, "Generate"))).clicked() {
            self.start(model.to_string(), adapter.clone());
        }
        if adapter.is_none() {
            ui.weak(tr(lang, "No checkpoint yet: train first to compare with the adapter."));
        }
        if self.is_busy() {
            ui.spinner();
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        let Some((base, tuned)) = &self.answers else { return };
        ui.columns(2, |cols| {
            cols[0].strong(tr(lang, "Without adapter"));
            show_answer(&mut cols[0], base);
            cols[1].strong(tr(lang, "With adapter"));
            if let Some(t) = tuned {
                show_answer(&mut cols[1], t);
            }
        });
    }

    fn start(&mut self, model: String, adapter: Option<PathBuf>) {
        let request = GenerateRequest {
            model,
            adapter: None,
            prompt: self.prompt.clone(),
            chat: self.chat,
            max_new_tokens: self.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            resolve: Default::default(),
        };
        self.answers = None;
        self.job = Some(std::thread::spawn(move || {
            let run = |r: &GenerateRequest| generate_text(r, |_| {}).map(|g| g.text).map_err(|e| e.to_string());
            let base = run(&request);
            let tuned = adapter.map(|a| run(&GenerateRequest { adapter: Some(a), ..request.clone() }));
            (base, tuned)
        }));
    }
}

/// The first user turns of the dataset's first file (records without one, plain text, are
/// passed over); nothing when it cannot be read (the Dataset panel says why).
fn first_instructions(path: &Path, format: DataFormat, n: usize) -> Vec<String> {
    let Some(file) = data::dataset_files(path).ok().and_then(|f| f.into_iter().next()) else { return Vec::new() };
    let Ok((_, read)) = data::read_file(&file, format, true) else { return Vec::new() };
    read.records
        .iter()
        .filter_map(|r| match &r.content {
            data::Content::Chat(messages) => {
                messages.iter().find(|m| m.role == data::Role::User).map(|m| m.content.trim().to_string())
            }
            data::Content::Text(_) => None,
        })
        .filter(|p| !p.is_empty())
        .take(n)
        .collect()
}

fn show_answer(ui: &mut egui::Ui, answer: &Result<String, String>) {
    match answer {
        Ok(text) => {
            ui.label(text);
        }
        Err(e) => {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }
}
