//! The Export tab: a checkpoint → PEFT adapter, GGUF adapter (+ Ollama Modelfile) or merged
//! model, through a save dialog, on a worker thread; then where it went and how big it is.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use eframe::egui;

use super::checkpoint_field::CheckpointField;
use super::i18n::{tr, Lang};
use crate::lora::export::{export, ExportFormat, ExportInfo, ExportReport, ExportRequest, TensorDType};
use crate::lora::merge::MergeInto;

pub struct ExportView {
    pub checkpoint: CheckpointField,
    pub format: ExportFormat,
    pub half_precision: bool,
    pub merge_into_dequantized: bool,
    pub modelfile: bool,
    job: Option<JoinHandle<crate::Result<ExportReport>>>,
    pub result: Option<Result<String, String>>,
}

impl Default for ExportView {
    fn default() -> Self {
        Self {
            checkpoint: CheckpointField::default(),
            format: ExportFormat::Peft,
            half_precision: false,
            merge_into_dequantized: true,
            modelfile: true,
            job: None,
            result: None,
        }
    }
}

impl ExportView {
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// `save_target`: a path that replaces the save dialog (tests, scripted use).
    pub fn show(
        &mut self,
        ui: &mut egui::Ui,
        lang: Lang,
        last_checkpoint: Option<PathBuf>,
        save_target: Option<&Path>,
    ) {
        self.poll();
        self.checkpoint.ui(ui, lang, "Checkpoint", last_checkpoint.as_deref());
        ui.radio_value(&mut self.format, ExportFormat::Peft, tr(lang, "PEFT adapter"));
        ui.radio_value(&mut self.format, ExportFormat::Gguf, tr(lang, "GGUF adapter (llama.cpp, Ollama)"));
        ui.radio_value(&mut self.format, ExportFormat::Merged, tr(lang, "Merged model"));
        match self.format {
            ExportFormat::Peft => {
                ui.checkbox(&mut self.half_precision, tr(lang, "bf16 tensors (half the size)"));
            }
            ExportFormat::Gguf => {
                ui.checkbox(&mut self.half_precision, tr(lang, "f16 tensors (half the size)"));
                ui.checkbox(&mut self.modelfile, tr(lang, "Also write an Ollama Modelfile"));
            }
            ExportFormat::Merged => {
                ui.checkbox(
                    &mut self.merge_into_dequantized,
                    tr(lang, "Merge into the dequantized NF4 weights the adapter was trained against (QLoRA)"),
                );
                ui.weak(tr(lang, "A divergence check compares the merged model with base + adapter."));
            }
        }
        let ready = self.checkpoint.path().is_some() && !self.is_busy();
        if ui.add_enabled(ready, egui::Button::new(tr(lang, "Export as…"))).clicked() {
            let target = match save_target {
                Some(p) => Some(p.to_path_buf()),
                None => {
                    let name = match self.format {
                        ExportFormat::Peft => "adapter",
                        ExportFormat::Gguf => "adapter.gguf",
                        ExportFormat::Merged => "merged-model",
                    };
                    rfd::FileDialog::new().set_file_name(name).save_file()
                }
            };
            if let Some(out) = target {
                self.start(out);
            }
        }
        if self.is_busy() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(tr(lang, "Exporting…"));
            });
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
        }
        match &self.result {
            Some(Ok(text)) => {
                ui.label(format!("{}: {text}", tr(lang, "Exported to")));
            }
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, format!("{}: {e}", tr(lang, "Error")));
            }
            None => {}
        }
    }

    fn start(&mut self, out: PathBuf) {
        let dtype = match (self.format, self.half_precision) {
            (_, false) => None,
            (ExportFormat::Gguf, true) => Some(TensorDType::F16),
            (_, true) => Some(TensorDType::Bf16),
        };
        let request = ExportRequest {
            from: self.checkpoint.path().unwrap_or_default(),
            format: self.format,
            base: None,
            out,
            dtype,
            merge_into: if self.merge_into_dequantized {
                MergeInto::Dequantized { double_quant: true }
            } else {
                MergeInto::Original
            },
            modelfile: self.modelfile,
            divergence_check: self.format == ExportFormat::Merged,
            trained_on_nf4: None,
            check_sequences: Vec::new(),
            info: ExportInfo::default(),
        };
        self.result = None;
        self.job = Some(std::thread::spawn(move || export(&request)));
    }

    /// Pick up a finished export. Public so tests can wait on it.
    pub fn poll(&mut self) {
        if !self.job.as_ref().is_some_and(|j| j.is_finished()) {
            return;
        }
        let outcome = self.job.take().expect("checked above").join();
        self.result = Some(match outcome {
            Ok(Ok(report)) => {
                let mut parts: Vec<String> = report
                    .written
                    .iter()
                    .map(|p| format!("{} ({})", p.display(), super::app::human_bytes(size_on_disk(p))))
                    .collect();
                if let Some(d) = report.divergence {
                    parts.push(format!(
                        "top-1 agreement {:.1}%, mean KL {:.2e} with base + adapter",
                        d.top1_agreement * 100.0,
                        d.mean_kl
                    ));
                }
                Ok(parts.join("; "))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the export stopped on an internal error".into()),
        });
    }
}

/// Bytes of a file, or of every file under a folder.
pub fn size_on_disk(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| size_on_disk(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}
