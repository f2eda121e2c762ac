//! The Export tab: a checkpoint → PEFT adapter, GGUF adapter (+ Ollama Modelfile) or merged
//! model, through a save dialog, on a worker thread; then where it went and how big it is.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use eframe::egui;

use super::checkpoint_field::CheckpointField;
use super::i18n::{tr, tr_message, Lang};
use crate::lora::export::{export, ExportFormat, ExportInfo, ExportReport, ExportRequest, TensorDType};
use crate::lora::gguf_model::GgufQuant;
use crate::lora::merge::MergeInto;

pub struct ExportView {
    pub checkpoint: CheckpointField,
    pub format: ExportFormat,
    pub half_precision: bool,
    pub merge_into_dequantized: bool,
    pub modelfile: bool,
    /// The quantization the merged-GGUF choice uses (kept while another format is chosen).
    pub gguf_quant: GgufQuant,
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
            gguf_quant: GgufQuant::Q4KM,
            job: None,
            result: None,
        }
    }
}

impl ExportView {
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// `save_target`: a path that replaces the save dialog (tests, scripted use). `last_dir`:
    /// the folder the last export went to (the dialog opens there; an export sets it).
    pub fn show(
        &mut self,
        ui: &mut egui::Ui,
        lang: Lang,
        last_checkpoint: Option<PathBuf>,
        save_target: Option<&Path>,
        last_dir: &mut Option<PathBuf>,
    ) {
        self.poll();
        self.checkpoint.ui(ui, lang, "Checkpoint", last_checkpoint.as_deref());
        ui.radio_value(&mut self.format, ExportFormat::Peft, tr(lang, "PEFT adapter"));
        ui.radio_value(&mut self.format, ExportFormat::Gguf, tr(lang, "GGUF adapter (llama.cpp, Ollama)"));
        ui.radio_value(&mut self.format, ExportFormat::Merged, tr(lang, "Merged model"));
        let gguf_model = ExportFormat::GgufModel(self.gguf_quant);
        ui.radio_value(&mut self.format, gguf_model, tr(lang, "Merged model as one GGUF (llama.cpp, Ollama)"));
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
            ExportFormat::GgufModel(_) => {
                ui.horizontal(|ui| {
                    ui.label(tr(lang, "Quantization:"));
                    for quant in GgufQuant::ALL {
                        ui.radio_value(&mut self.gguf_quant, quant, quant.label());
                    }
                });
                self.format = ExportFormat::GgufModel(self.gguf_quant);
                ui.checkbox(
                    &mut self.merge_into_dequantized,
                    tr(lang, "Merge into the dequantized NF4 weights the adapter was trained against (QLoRA)"),
                );
                ui.checkbox(&mut self.modelfile, tr(lang, "Also write an Ollama Modelfile"));
            }
        }
        let ready = self.checkpoint.path().is_some() && !self.is_busy();
        if ui.add_enabled(ready, egui::Button::new(tr(lang, "Export as…"))).clicked() {
            let target = match save_target {
                Some(p) => Some(p.to_path_buf()),
                None => {
                    let checkpoint = self.checkpoint.path().unwrap_or_default();
                    let (dir, name) = save_suggestion(&checkpoint, self.format, last_dir.as_deref());
                    rfd::FileDialog::new().set_directory(dir).set_file_name(name).save_file()
                }
            };
            if let Some(out) = target {
                *last_dir = out.parent().map(Path::to_path_buf).filter(|d| !d.as_os_str().is_empty());
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
                // what was written, then the merge's divergence check: each part a message
                let parts: Vec<String> = text.split("; ").map(|part| tr_message(lang, part)).collect();
                ui.label(format!("{}: {}", tr(lang, "Exported to"), parts.join("; ")));
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

/// Where the save dialog opens and the name it proposes for exporting `checkpoint`: the last
/// export's folder when there is one, else the run's folder (the checkpoint's parent); the name
/// says what it is, `<model>-<run>-step<N>-<format>` (the GGUF a file, the others folders).
pub fn save_suggestion(checkpoint: &Path, format: ExportFormat, last_dir: Option<&Path>) -> (PathBuf, String) {
    let run_dir = checkpoint.parent().unwrap_or(checkpoint);
    let dir = last_dir.filter(|d| d.is_dir()).unwrap_or(run_dir).to_path_buf();
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    // the model as the checkpoint's run config names it: a folder's or a hub id's last part
    let model = std::fs::read_to_string(checkpoint.join(crate::train::checkpoint::RUN_CONFIG))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("model")?.get("source")?.as_str().map(str::to_string))
        .map(|source| {
            let source = Path::new(source.trim_end_matches(['/', '\\']));
            // a GGUF file's name without its extension
            let gguf = source.extension().is_some_and(|e| e == "gguf");
            if gguf {
                source.file_stem().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
            } else {
                name_of(source)
            }
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "model".into());
    let step = name_of(checkpoint).strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok());
    let mut parts = vec![model, name_of(run_dir)];
    parts.extend(step.map(|s| format!("step{s}")));
    let stem: String = parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| if c.is_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .collect();
    let name = match format {
        ExportFormat::Peft => format!("{stem}-peft"),
        ExportFormat::Gguf => format!("{stem}-lora.gguf"),
        ExportFormat::Merged => format!("{stem}-merged"),
        ExportFormat::GgufModel(quant) => format!("{stem}-{}.gguf", quant.label()),
    };
    (dir, name)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The save dialog opens in the run's folder (the last export's once there is one), with a
    /// name made of the model, the run, the step and the format.
    #[test]
    fn the_save_dialog_starts_in_the_run_folder_with_a_name_that_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/colors");
        let ck = run.join("checkpoint-000080");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join("run.toml"), "[model]\nsource = \"HuggingFaceTB/SmolLM2-135M\"\n").unwrap();
        let (at, name) = save_suggestion(&ck, ExportFormat::Peft, None);
        assert_eq!(at, run);
        assert_eq!(name, "SmolLM2-135M-colors-step80-peft");
        assert_eq!(save_suggestion(&ck, ExportFormat::Gguf, None).1, "SmolLM2-135M-colors-step80-lora.gguf");
        assert_eq!(save_suggestion(&ck, ExportFormat::Merged, None).1, "SmolLM2-135M-colors-step80-merged");
        let q4 = ExportFormat::GgufModel(GgufQuant::Q4KM);
        assert_eq!(save_suggestion(&ck, q4, None).1, "SmolLM2-135M-colors-step80-Q4_K_M.gguf");

        // a local folder or a GGUF file gives its own name
        std::fs::write(ck.join("run.toml"), "[model]\nsource = \"/models/tiny llama/\"\n").unwrap();
        assert_eq!(save_suggestion(&ck, ExportFormat::Peft, None).1, "tiny-llama-colors-step80-peft");
        std::fs::write(ck.join("run.toml"), "[model]\nsource = \"/models/qwen2-0.5b.gguf\"\n").unwrap();
        assert_eq!(save_suggestion(&ck, ExportFormat::Peft, None).1, "qwen2-0.5b-colors-step80-peft");

        // the last export's folder wins while it exists
        let exports = dir.path().join("exports");
        std::fs::create_dir_all(&exports).unwrap();
        assert_eq!(save_suggestion(&ck, ExportFormat::Peft, Some(&exports)).0, exports);
        assert_eq!(save_suggestion(&ck, ExportFormat::Peft, Some(&dir.path().join("gone"))).0, run);
    }
}
