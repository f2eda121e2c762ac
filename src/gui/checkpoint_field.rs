//! A checkpoint (adapter) folder chosen by typing, by the folder dialog, or as the newest
//! checkpoint; it follows the newest one until the user picks another.

use std::path::{Path, PathBuf};

use eframe::egui;

use super::i18n::{tr, Lang};

#[derive(Debug, Default)]
pub struct CheckpointField {
    pub text: String,
    /// The newest checkpoint last proposed; while the field still holds it, newer ones replace it.
    proposed: Option<PathBuf>,
}

impl CheckpointField {
    /// Set by the program (e.g. "export this run"): kept until the user changes it.
    pub fn set(&mut self, path: &Path) {
        self.text = path.display().to_string();
        self.proposed = None;
    }

    /// The chosen folder, if any.
    pub fn path(&self) -> Option<PathBuf> {
        Some(PathBuf::from(self.text.trim())).filter(|p| !p.as_os_str().is_empty())
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, lang: Lang, label: &'static str, latest: Option<&Path>) {
        let untouched =
            self.text.is_empty() || self.proposed.as_ref().is_some_and(|p| p.display().to_string() == self.text);
        if untouched && latest.is_some() && latest != self.proposed.as_deref() {
            self.proposed = latest.map(Path::to_path_buf);
            self.text = latest.map(|c| c.display().to_string()).unwrap_or_default();
        }
        ui.horizontal(|ui| {
            let label = ui.label(tr(lang, label));
            let buttons = if latest.is_some() { 240.0 } else { 80.0 };
            ui.add(
                egui::TextEdit::singleline(&mut self.text).desired_width((ui.available_width() - buttons).max(120.0)),
            )
            .labelled_by(label.id);
            if ui.button(tr(lang, "Folder…")).clicked() {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    self.set(&p);
                }
            }
            if let Some(c) = latest {
                if ui.button(tr(lang, "Use the last checkpoint")).clicked() {
                    self.set(c);
                }
            }
        });
    }
}
