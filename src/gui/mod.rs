//! The eframe application. For now a first window: the architecture table the training
//! panels will be built on, and a pointer to the command line.

use eframe::egui;

use crate::arch::ArchTable;

pub fn run(table: &'static ArchTable) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_inner_size([1000.0, 560.0]).with_title("qlora-studio"),
        ..Default::default()
    };
    eframe::run_native("qlora-studio", options, Box::new(move |_cc| Ok(Box::new(StudioApp { table }))))
        .map_err(|e| anyhow::anyhow!("cannot open the window: {e}; on Linux the GUI needs an X11 or Wayland display"))
}

struct StudioApp {
    table: &'static ArchTable,
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::Panel::top("title").show(ui, |ui| {
            ui.heading("qlora-studio");
            ui.label(
                "LoRA and QLoRA fine-tuning on your own machine. The training panels (model, dataset, \
                 memory estimate, live plots, export) are not built yet: this window shows the model \
                 families qlora-studio knows. Run `qlora-studio --help` for what the command line does today.",
            );
            ui.add_space(4.0);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::both().show(ui, |ui| {
                egui::Grid::new("families").striped(true).num_columns(4).spacing([16.0, 6.0]).show(ui, |ui| {
                    for h in ["Model", "Sizes", "Default LoRA targets", "All linear modules"] {
                        ui.strong(h);
                    }
                    ui.end_row();
                    for family in self.table.families() {
                        let layout = self.table.layout_for(family, None);
                        ui.label(&family.name);
                        ui.label(family.sizes.join(" / "));
                        ui.monospace(family.default_targets.join(", "));
                        ui.monospace(layout.all_linear_names().join(", "));
                        ui.end_row();
                    }
                });
            });
        });
    }
}
