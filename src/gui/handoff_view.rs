//! "Hand off": the run written as a LLaMA-Factory or axolotl job for several GPUs (the
//! `handoff` module), from the Training section or offered by the Memory panel when the run fits
//! no device here. The job is written on a worker thread; the panel says where and what.

use std::path::PathBuf;

use eframe::egui;

use super::i18n::{tr, tr_message, trf, Lang};
use crate::handoff::{self, Tool};
use crate::train::RunConfig;

pub struct HandoffView {
    /// Whether the panel is shown (the Memory panel's offer opens it).
    pub open: bool,
    pub tool: Tool,
    pub gpus: usize,
    pub nodes: usize,
    /// One GPU's memory there, GiB.
    pub gpu_memory_gib: f64,
    pub copy_model: bool,
    /// The job folder.
    pub out: String,
    job: Option<std::thread::JoinHandle<Result<String, String>>>,
    /// The summary of the job written, or why not.
    pub result: Option<Result<String, String>>,
}

impl Default for HandoffView {
    fn default() -> Self {
        Self {
            open: false,
            tool: Tool::LlamaFactory,
            gpus: 8,
            nodes: 1,
            gpu_memory_gib: (handoff::DEFAULT_GPU_MEMORY >> 30) as f64,
            copy_model: false,
            out: String::new(),
            job: None,
            result: None,
        }
    }
}

impl HandoffView {
    /// Writes the job for `config` on a worker thread (the dataset is read and converted there).
    pub fn write(&mut self, config: &RunConfig) {
        if self.job.is_some() {
            return;
        }
        let out = if self.out.trim().is_empty() {
            config.train.output_dir.with_file_name(format!(
                "{}-{}",
                config.train.output_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or("run".into()),
                match self.tool {
                    Tool::LlamaFactory => "llamafactory",
                    Tool::Axolotl => "axolotl",
                }
            ))
        } else {
            PathBuf::from(self.out.trim())
        };
        self.out = out.display().to_string();
        let request = handoff::Request {
            config: config.clone(),
            tool: self.tool,
            gpus: self.gpus.max(1),
            nodes: self.nodes.max(1),
            gpu_memory: (self.gpu_memory_gib.max(1.0) * (1u64 << 30) as f64) as u64,
            out,
            copy_model: self.copy_model,
        };
        self.result = None;
        self.job = Some(std::thread::spawn(move || {
            handoff::write(&request).map(|w| handoff::summary(&w, request.tool)).map_err(|e| e.to_string())
        }));
    }

    /// Whether a job is being written (tests wait for it).
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    fn poll(&mut self) {
        if self.job.as_ref().is_some_and(|j| j.is_finished()) {
            let job = self.job.take().expect("checked above");
            self.result = Some(job.join().unwrap_or_else(|_| Err("writing the job failed unexpectedly".into())));
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, lang: Lang, config: &RunConfig) {
        self.poll();
        if self.busy() {
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        ui.weak(tr(
            lang,
            "Writes this run as a job for LLaMA-Factory or axolotl on several GPUs: the data, the config, DeepSpeed \
             and a launch script. Its result opens in the Runs tab.",
        ));
        egui::Grid::new("handoff_settings").num_columns(2).show(ui, |ui| {
            ui.label(tr(lang, "Trainer"));
            egui::ComboBox::from_id_salt("handoff_tool").selected_text(self.tool.label()).show_ui(ui, |ui| {
                for t in [Tool::LlamaFactory, Tool::Axolotl] {
                    ui.selectable_value(&mut self.tool, t, t.label());
                }
            });
            ui.end_row();
            ui.label(tr(lang, "GPUs per node"));
            ui.add(egui::DragValue::new(&mut self.gpus).range(1..=64));
            ui.end_row();
            ui.label(tr(lang, "Nodes"));
            ui.add(egui::DragValue::new(&mut self.nodes).range(1..=1024));
            ui.end_row();
            ui.label(tr(lang, "Memory per GPU (GiB)"));
            ui.add(egui::DragValue::new(&mut self.gpu_memory_gib).range(1.0..=1024.0).speed(1.0));
            ui.end_row();
            ui.label(tr(lang, "Job folder"));
            ui.horizontal(|ui| {
                ui.add(egui::TextEdit::singleline(&mut self.out).hint_text(tr(lang, "beside the output folder")));
                if ui.button(tr(lang, "Folder…")).clicked() {
                    if let Some(p) = rfd::FileDialog::new().pick_folder() {
                        self.out = p.display().to_string();
                    }
                }
            });
            ui.end_row();
        });
        ui.checkbox(&mut self.copy_model, tr(lang, "copy a local model into the job"));
        ui.horizontal(|ui| {
            let button = egui::Button::new(trf(lang, "Write the {} job", &[&self.tool.label()]));
            if ui.add_enabled(!self.busy(), button).clicked() {
                self.write(config);
            }
            if self.busy() {
                ui.spinner();
            }
        });
        match &self.result {
            Some(Ok(summary)) => {
                ui.label(egui::RichText::new(tr(lang, "Job written")).strong());
                ui.add(egui::Label::new(egui::RichText::new(summary).monospace().small()).wrap());
            }
            Some(Err(e)) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!("{}: {}", tr(lang, "Error"), tr_message(lang, e)),
                );
            }
            None => {}
        }
    }
}
