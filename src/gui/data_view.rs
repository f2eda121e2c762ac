//! The Dataset panel: file or folder, format, template, lengths and split, and a preview made on
//! a worker thread — the first examples with prompt and trained text in two colours, the token
//! length histogram with the max-length cut, and the records that could not be used.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use eframe::egui;
use egui_plot::{Bar, BarChart, VLine};

use super::app::{page_plot, titled_plot};
use super::i18n::{tr, tr_message, trf, Lang};
use crate::data::{self, DataConfig, DataFormat, ModelTokenizer, Preview, TemplateChoice, Validation};

const PREVIEW_EXAMPLES: usize = 5;

#[derive(Default)]
pub struct DataView {
    /// The preview, and the resident memory its tokenizer and data added.
    job: Option<JoinHandle<Result<(Preview, u64), String>>>,
    /// The settings the shown preview was made from (a change makes a new one).
    previewed: Option<(DataConfig, String)>,
    pub preview: Option<Result<Preview, String>>,
    held_bytes: Option<u64>,
}

impl DataView {
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// Pick up a finished preview, and start a new one when the settings changed.
    pub fn update(&mut self, data: &DataConfig, model_dir: Option<&Path>, family: Option<&str>) {
        if self.job.as_ref().is_some_and(|j| j.is_finished()) {
            let job = self.job.take().expect("checked above");
            let outcome = job.join().unwrap_or_else(|_| Err("the preview stopped on an internal error".into()));
            self.held_bytes = outcome.as_ref().ok().map(|(_, held)| *held);
            self.preview = Some(outcome.map(|(preview, _)| preview));
        }
        let Some(model_dir) = model_dir else {
            // the preview tokenizes with the model's tokenizer: none until the model is local
            if self.job.is_none() {
                (self.preview, self.previewed) = (None, None);
            }
            return;
        };
        if data.path.as_os_str().is_empty() || self.job.is_some() {
            return;
        }
        let key = (data.clone(), model_dir.display().to_string());
        if self.previewed.as_ref() == Some(&key) {
            return;
        }
        self.previewed = Some(key);
        let (data, dir, family) = (data.clone(), model_dir.to_path_buf(), family.map(str::to_string));
        self.job = Some(std::thread::spawn(move || {
            let resident = || crate::memory::process_memory().map_or(0, |m| m.rss);
            let before = resident();
            let tok = ModelTokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
            let preview = data::preview(&data, &tok, family.as_deref(), PREVIEW_EXAMPLES).map_err(|e| e.to_string())?;
            // what a run's process holds besides its tensors: the tokenizer and the data, with
            // what the allocator keeps of tokenizing them (resident, so not the heap's count)
            Ok((preview, resident().saturating_sub(before)))
        }));
    }

    pub fn settings(&mut self, ui: &mut egui::Ui, lang: Lang, data: &mut DataConfig) {
        let mut path = data.path.display().to_string();
        ui.horizontal(|ui| {
            let label = ui.label(tr(lang, "Source"));
            if ui
                .add(egui::TextEdit::singleline(&mut path).desired_width(f32::INFINITY))
                .labelled_by(label.id)
                .changed()
            {
                data.path = PathBuf::from(&path);
            }
        });
        ui.horizontal(|ui| {
            if ui.button(tr(lang, "File…")).clicked() {
                if let Some(p) =
                    rfd::FileDialog::new().add_filter("dataset", &["json", "jsonl", "txt", "md"]).pick_file()
                {
                    data.path = p;
                }
            }
            if ui.button(tr(lang, "Folder…")).clicked() {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    data.path = p;
                }
            }
        });
        egui::Grid::new("data_settings").num_columns(2).show(ui, |ui| {
            let label = ui.label(tr(lang, "Format"));
            egui::ComboBox::from_id_salt("format")
                .selected_text(data.format.to_string())
                .show_ui(ui, |ui| {
                    for f in [DataFormat::Auto, DataFormat::Alpaca, DataFormat::ShareGpt, DataFormat::Text] {
                        ui.selectable_value(&mut data.format, f, f.to_string());
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label(tr(lang, "Template"));
            egui::ComboBox::from_id_salt("template")
                .selected_text(data.template.to_string())
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut data.template, TemplateChoice::Auto, "auto")
                        .on_hover_text(tr(lang, "the model's own template, else its family's"));
                    ui.selectable_value(&mut data.template, TemplateChoice::Model, "model");
                    for t in data::named_templates() {
                        ui.selectable_value(&mut data.template, TemplateChoice::Named(t.name.clone()), &t.name);
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label(tr(lang, "Max length"));
            ui.add(egui::DragValue::new(&mut data.max_length).range(16..=32768)).labelled_by(label.id);
            ui.end_row();
            let label = ui.label(tr(lang, "Validation fraction"));
            let mut fraction = match &data.validation {
                Validation::Fraction(f) => *f,
                Validation::File(_) => 0.0,
            };
            if ui.add(egui::DragValue::new(&mut fraction).range(0.0..=0.5).speed(0.01)).labelled_by(label.id).changed()
            {
                data.validation = Validation::Fraction(fraction);
            }
            ui.end_row();
        });
        ui.checkbox(&mut data.packing, tr(lang, "Packing"));
        ui.checkbox(&mut data.train_on_prompt, tr(lang, "Train on prompt tokens too"));
        ui.checkbox(&mut data.skip_bad_records, tr(lang, "Skip bad records (they are counted and listed)"));
    }

    /// The resident memory of a training process of this binary outside its tensors: the binary
    /// and libraries as it starts, plus what the preview's tokenizer and data added.
    pub fn run_process_bytes(&self) -> Option<u64> {
        Some(crate::memory::startup_rss()? + self.held_bytes?)
    }

    /// The dataset as the trainer will prepare it, once the preview has made it.
    pub fn prepared(&self) -> Option<&data::DataReport> {
        self.preview.as_ref()?.as_ref().ok()?.prepared.as_ref()
    }

    /// The preview: records, warnings, coloured examples and the length histogram.
    pub fn preview_ui(&self, ui: &mut egui::Ui, lang: Lang) {
        if self.is_busy() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(tr(lang, "Preview"));
            });
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        let Some(preview) = &self.preview else {
            if !self.is_busy() {
                ui.weak(tr(lang, "The preview comes once the model is local (it uses the model's tokenizer)."));
            }
            return;
        };
        let p = match preview {
            Ok(p) => p,
            Err(e) => {
                ui.colored_label(ui.visuals().error_fg_color, tr_message(lang, e));
                return;
            }
        };
        ui.label(format!(
            "{} {} · {} {} · {}: {}",
            p.records,
            tr(lang, "records"),
            p.lengths.over_max_length,
            tr(lang, "cut by the max length"),
            tr(lang, "Template"),
            p.template.as_deref().unwrap_or("–")
        ));
        if let Some(warning) = p.template_check.as_ref().and_then(|c| c.warning.as_ref()) {
            ui.colored_label(ui.visuals().warn_fg_color, format!("{}: {warning}", tr(lang, "Warning")));
        }
        if !p.skipped.is_empty() {
            egui::CollapsingHeader::new(format!("{} {}", p.skipped.len(), tr(lang, "bad records"))).show(ui, |ui| {
                for b in p.skipped.iter().take(50) {
                    ui.monospace(b.to_string());
                }
            });
        }
        let trained = ui.visuals().selection.bg_fill;
        for ex in &p.examples {
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.weak(trf(lang, "{} · {} tokens, {} trained", &[&ex.source, &ex.tokens, &ex.trained_tokens]));
                let mut job = egui::text::LayoutJob::default();
                for seg in &ex.segments {
                    let mut format = egui::TextFormat {
                        font_id: egui::FontId::monospace(12.0),
                        color: ui.visuals().text_color(),
                        ..Default::default()
                    };
                    if seg.trained {
                        format.background = trained;
                    }
                    if seg.cut {
                        format.color = ui.visuals().weak_text_color();
                        format.strikethrough = egui::Stroke::new(1.0, ui.visuals().weak_text_color());
                    }
                    job.append(&seg.text, 0.0, format);
                }
                job.wrap.max_width = ui.available_width();
                ui.label(job);
            });
        }
        let bars: Vec<Bar> = p
            .lengths
            .histogram
            .iter()
            .map(|b| Bar::new((b.start + b.end) as f64 / 2.0, b.count as f64).width((b.end - b.start).max(1) as f64))
            .collect();
        // the spinner above it comes and goes while a new preview is made
        titled_plot(ui, "lengths", tr(lang, "Token lengths (the line is the max length)"), |ui| {
            page_plot(ui, "lengths")
                .height(120.0)
                .show(ui, |plot| {
                    plot.bar_chart(BarChart::new(tr(lang, "examples"), bars));
                    plot.vline(VLine::new(tr(lang, "Max length"), p.max_length as f64));
                })
                .response
        });
    }
}
