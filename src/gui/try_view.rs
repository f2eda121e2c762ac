//! The Try tab: one prompt, answered by the base model and by the base with the adapter from
//! the latest checkpoint, side by side (generated on a worker thread).

use std::path::PathBuf;
use std::thread::JoinHandle;

use eframe::egui;

use super::checkpoint_field::CheckpointField;
use super::i18n::{tr, Lang};
use crate::hub::try_model::{generate_text, GenerateRequest};

type Answers = (Result<String, String>, Option<Result<String, String>>);

pub struct TryView {
    pub prompt: String,
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
