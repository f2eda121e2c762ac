//! The eframe application: one window from model choice to exported adapter. The UI thread
//! only draws and sends commands; loading, training and exporting run on worker threads.

pub mod app;
pub mod checkpoint_field;
pub mod data_view;
pub mod export_view;
pub mod fonts;
pub mod handoff_view;
pub mod i18n;
pub mod memory_view;
pub mod run_view;
pub mod source_view;
pub mod try_view;

use eframe::egui;

pub use app::StudioApp;

struct EframeApp(StudioApp);

impl eframe::App for EframeApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.0.show(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.0.save_settings();
    }
}

pub fn run() -> anyhow::Result<()> {
    // a run that dies (out of memory) takes its own process down, not the window
    crate::train::worker::train_in_child_process(true);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([900.0, 560.0])
            .with_drag_and_drop(true)
            .with_title("qlora-studio"),
        ..Default::default()
    };
    eframe::run_native(
        "qlora-studio",
        options,
        Box::new(|_cc| Ok(Box::new(EframeApp(StudioApp::new(app::default_settings_path()))))),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}; on Linux the GUI needs an X11 or Wayland display"))
}
