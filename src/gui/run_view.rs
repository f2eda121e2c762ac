//! One training run as the GUI sees it: the trainer's events pumped each frame into curves, a
//! log and a state; the controls that send it commands; and the live plots.

use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use eframe::egui;
use egui_plot::{Corner, HLine, Legend, Line, LineStyle, PlotPoints};

use super::app::{page_plot, titled_plot};
use super::i18n::{tr, tr_message, Lang};
use crate::train::events::{RunEstimate, RunFinished, RunStarted, StepStats};
use crate::train::{Command, RunConfig, TrainEvent};

#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    Loading(String, f32),
    Training,
    Paused,
    Finished(RunFinished),
    Failed(String),
}

pub struct RunView {
    pub config: RunConfig,
    events: Option<Receiver<TrainEvent>>,
    commands: Option<Sender<Command>>,
    handle: Option<JoinHandle<()>>,
    pub state: RunState,
    pub started: Option<RunStarted>,
    pub steps: Vec<StepStats>,
    pub evals: Vec<(usize, f64)>,
    pub samples: Vec<(usize, String, String)>,
    pub checkpoints: Vec<(usize, PathBuf)>,
    pub log: Vec<String>,
    /// The estimate drawn against the peak of each step and the whole: the one made before
    /// the launch, then the run's own (made where it trains, sized by its data).
    pub estimate: Option<RunEstimate>,
}

impl RunView {
    pub fn start(config: RunConfig, resume_from: Option<PathBuf>, estimate: Option<RunEstimate>) -> Self {
        let (events, commands, handle) = crate::train::worker::spawn_run(config.clone(), resume_from);
        Self {
            config,
            events: Some(events),
            commands: Some(commands),
            handle: Some(handle),
            state: RunState::Loading(String::new(), 0.0),
            started: None,
            steps: Vec::new(),
            evals: Vec::new(),
            samples: Vec::new(),
            checkpoints: Vec::new(),
            log: Vec::new(),
            estimate,
        }
    }

    /// A finished run read back from its last checkpoint (the history's "reopen").
    pub fn from_history(config: RunConfig, losses: &[(usize, f64)], evals: &[(usize, f64)], end: RunFinished) -> Self {
        let steps = losses
            .iter()
            .map(|&(step, loss)| StepStats {
                step,
                total_steps: end.step,
                epoch: 0.0,
                loss,
                lr: f64::NAN,
                grad_norm: f64::NAN,
                tokens_per_s: f64::NAN,
                elapsed_s: 0.0,
                eta_s: 0.0,
                memory: Default::default(),
            })
            .collect();
        Self {
            config,
            events: None,
            commands: None,
            handle: None,
            state: RunState::Finished(end),
            started: None,
            steps,
            evals: evals.to_vec(),
            samples: Vec::new(),
            checkpoints: Vec::new(),
            log: Vec::new(),
            estimate: None,
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, RunState::Loading(..) | RunState::Training | RunState::Paused)
    }

    pub fn send(&self, command: Command) {
        if let Some(c) = &self.commands {
            let _ = c.send(command);
        }
    }

    /// Take every event that arrived since the last frame. Returns the final event's outcome
    /// once, when the run ends (for the notification).
    pub fn pump(&mut self) -> Option<Result<RunFinished, String>> {
        let events: Vec<TrainEvent> = match &self.events {
            Some(rx) => rx.try_iter().collect(),
            None => return None,
        };
        let mut ended = None;
        for event in events {
            match event {
                TrainEvent::Loading { stage, fraction } => {
                    self.log.push(stage.clone());
                    self.state = RunState::Loading(stage, fraction);
                }
                TrainEvent::Started(s) => {
                    self.log.push(format!(
                        "training {} of {} parameters on {} examples; {} steps, micro-batch {} × {}",
                        s.trainable_params,
                        s.total_params,
                        s.train_examples,
                        s.total_steps,
                        s.micro_batch,
                        s.grad_accum
                    ));
                    self.estimate = s.estimate.or(self.estimate);
                    self.started = Some(s);
                    self.state = RunState::Training;
                }
                TrainEvent::Notice(text) => self.log.push(format!("note: {text}")),
                TrainEvent::Step(s) => self.steps.push(s),
                TrainEvent::Eval { step, loss } => {
                    self.log.push(format!("step {step}: validation loss {loss:.4}"));
                    self.evals.push((step, loss));
                }
                TrainEvent::Sample { step, prompt, text } => self.samples.push((step, prompt, text)),
                TrainEvent::CheckpointSaved { step, path } => {
                    self.log.push(format!("step {step}: checkpoint {}", path.display()));
                    self.checkpoints.push((step, path));
                }
                TrainEvent::Paused { step } => {
                    self.log.push(format!("paused at step {step}"));
                    self.state = RunState::Paused;
                }
                TrainEvent::Resumed { step } => {
                    self.log.push(format!("resumed at step {step}"));
                    self.state = RunState::Training;
                }
                TrainEvent::Finished(f) => {
                    self.log.push(format!("finished at step {}", f.step));
                    self.state = RunState::Finished(f.clone());
                    ended = Some(Ok(f));
                }
                TrainEvent::Failed { message } => {
                    self.log.push(format!("failed: {message}"));
                    self.state = RunState::Failed(message.clone());
                    ended = Some(Err(message));
                }
            }
        }
        if ended.is_some() {
            self.events = None;
            self.commands = None;
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
        ended
    }

    pub fn last_checkpoint(&self) -> Option<PathBuf> {
        match &self.state {
            RunState::Finished(f) if f.checkpoint.is_some() => f.checkpoint.clone(),
            _ => self.checkpoints.last().map(|c| c.1.clone()),
        }
    }

    /// Status line, progress bar and the controls.
    pub fn controls(&mut self, ui: &mut egui::Ui, lang: Lang) {
        let total = self.started.as_ref().map(|s| s.total_steps).unwrap_or(0);
        let last = self.steps.last();
        let (status, fraction) = match &self.state {
            RunState::Loading(stage, f) => (format!("{}: {}", tr(lang, "Loading"), tr_message(lang, stage)), *f),
            RunState::Training | RunState::Paused => {
                let step = last.map(|s| s.step).unwrap_or(0);
                let eta = last.map(|s| format_duration(s.eta_s)).unwrap_or_default();
                let what = if self.state == RunState::Paused { tr(lang, "Paused") } else { tr(lang, "Training…") };
                (
                    format!("{what} {} {step}/{total} · {} {eta}", tr(lang, "step"), tr(lang, "ETA")),
                    step as f32 / total.max(1) as f32,
                )
            }
            RunState::Finished(f) => {
                let what = if f.stopped { tr(lang, "Stopped") } else { tr(lang, "Finished") };
                let loss = f.train_loss.map(|l| format!(" · {} {l:.4}", tr(lang, "Training loss"))).unwrap_or_default();
                let val =
                    f.validation_loss.map(|l| format!(" · {} {l:.4}", tr(lang, "Validation loss"))).unwrap_or_default();
                (format!("{what} ({} {}){loss}{val}", tr(lang, "step"), f.step), 1.0)
            }
            RunState::Failed(m) => (format!("{}: {}", tr(lang, "Failed"), tr_message(lang, m)), 0.0),
        };
        ui.horizontal(|ui| {
            let active = self.is_active();
            if self.state == RunState::Paused {
                if ui.button(tr(lang, "Resume")).clicked() {
                    self.send(Command::Resume);
                }
            } else if ui.add_enabled(active, egui::Button::new(tr(lang, "Pause"))).clicked() {
                self.send(Command::Pause);
            }
            if ui.add_enabled(active, egui::Button::new(tr(lang, "Stop"))).clicked() {
                self.send(Command::Stop);
            }
            if ui.add_enabled(active, egui::Button::new(tr(lang, "Save now"))).clicked() {
                self.send(Command::SaveNow);
            }
        });
        let color = if matches!(self.state, RunState::Failed(_)) {
            ui.visuals().error_fg_color
        } else {
            ui.visuals().text_color()
        };
        ui.add(egui::ProgressBar::new(fraction).show_percentage());
        ui.colored_label(color, status);
    }

    /// The live plots: loss (training and validation), learning rate, gradient norm,
    /// tokens/s and memory against the estimate. They share the height the page shows, so all
    /// five are in view at the window's default size; below a minimum height each keeps it and
    /// the page scrolls.
    pub fn plots(&self, ui: &mut egui::Ui, lang: Lang) {
        let series = |f: &dyn Fn(&StepStats) -> f64| -> Vec<[f64; 2]> {
            self.steps.iter().map(|s| [s.step as f64, f(s)]).filter(|p| p[1].is_finite()).collect()
        };
        // three rows of plots, each under a title line
        let gap = ui.spacing().item_spacing.y;
        let titles = 3.0 * (ui.text_style_height(&egui::TextStyle::Body) + 2.0 * gap) + 2.0 * gap;
        let free = (ui.available_height() - titles).max(0.0);
        let height = (free * 0.4).max(140.0);
        let small = (free * 0.3).max(100.0);
        titled_plot(ui, "loss", egui::RichText::new(tr(lang, "Loss")).strong(), |ui| {
            page_plot(ui, "loss")
                .height(height)
                .legend(Legend::default())
                .show(ui, |p| {
                    p.line(Line::new(tr(lang, "Training loss"), PlotPoints::from(series(&|s| s.loss))));
                    let evals: Vec<[f64; 2]> = self.evals.iter().map(|&(s, l)| [s as f64, l]).collect();
                    if !evals.is_empty() {
                        p.line(Line::new(tr(lang, "Validation loss"), PlotPoints::from(evals)));
                    }
                })
                .response
        });
        // a small plot of one reading over the steps, from zero up
        let one_line = |ui: &mut egui::Ui, id: &str, title: &str, name: &str, f: &dyn Fn(&StepStats) -> f64| {
            titled_plot(ui, id, title, |ui| {
                page_plot(ui, id)
                    .height(small)
                    .include_y(0.0)
                    .show(ui, |p| p.line(Line::new(name, PlotPoints::from(series(f)))))
                    .response
            });
        };
        ui.columns(2, |cols| {
            one_line(&mut cols[0], "lr", tr(lang, "Learning rate over steps"), "lr", &|s| s.lr);
            one_line(&mut cols[1], "grad_norm", tr(lang, "Gradient norm"), "|g|", &|s| s.grad_norm);
        });
        ui.columns(2, |cols| {
            one_line(&mut cols[0], "throughput", tr(lang, "Tokens/s"), "tokens/s", &|s| s.tokens_per_s);
            titled_plot(&mut cols[1], "memory", tr(lang, "Memory (MiB)"), |ui| self.memory_plot(ui, lang, small))
                .on_hover_text(tr(
                    lang,
                    "Lines of one colour belong together. The peak in each step is the most the run's tensors \
                     held between the step's start and its end, against the estimate of that peak. RSS is the \
                     whole process (binary, data, window, memory kept after a free), against the estimate with \
                     the process around the run.",
                ));
        });
    }

    /// Two pairs, each line in its pair's colour: the peak inside each step against the
    /// estimate of that peak (the run's tensors), and the whole (the process's resident set on
    /// the CPU, the card's use on a GPU) against the estimate with what surrounds the run.
    fn memory_plot(&self, ui: &mut egui::Ui, lang: Lang, height: f32) -> egui::Response {
        const STEP: egui::Color32 = egui::Color32::from_rgb(235, 150, 50);
        const WHOLE: egui::Color32 = egui::Color32::from_rgb(100, 160, 235);
        let mib = |b: u64| b as f64 / 1048576.0;
        let series = |f: &dyn Fn(&crate::memory::MemoryReading) -> Option<u64>| -> Vec<[f64; 2]> {
            self.steps.iter().filter_map(|s| Some([s.step as f64, mib(f(&s.memory)?)])).collect()
        };
        let on_gpu = self.steps.iter().any(|s| s.memory.device_used.is_some());
        // room above the highest line for the legend, so that it covers no line
        let top = self.steps.iter().map(|s| s.memory.rss.max(s.memory.device_used.unwrap_or(0))).max().unwrap_or(0);
        let top = mib(top.max(self.estimate.map_or(0, |e| e.whole)));
        page_plot(ui, "memory")
            .height(height)
            .include_y(0.0)
            .include_y(top * 1.8)
            .legend(Legend::default().position(Corner::LeftTop).text_style(egui::TextStyle::Small))
            .show(ui, |p| {
                // the heap's (CPU) or the pool's (CUDA) high-water mark from the step's start to
                // its end, less what the app held before the run: what the estimate predicts
                let peak = series(&|m| m.step_peak);
                if !peak.is_empty() {
                    let name = tr(lang, "Peak in each step (tensors)");
                    p.line(Line::new(name, PlotPoints::from(peak)).color(STEP).width(2.0));
                }
                if let Some(e) = &self.estimate {
                    // its band as thin lines around the middle, one legend entry for the three
                    let name = tr(lang, "Estimate of that peak");
                    p.hline(HLine::new(name, mib(e.step[1])).color(STEP).width(1.0).style(LineStyle::dashed_dense()));
                    for edge in [e.step[0], e.step[2]] {
                        p.hline(HLine::new(name, mib(edge)).color(STEP).width(0.5).style(LineStyle::dotted_loose()));
                    }
                    if e.whole > e.step[1] {
                        let name = if on_gpu {
                            tr(lang, "Estimate with the CUDA context")
                        } else {
                            tr(lang, "Estimate with the process around the run")
                        };
                        p.hline(
                            HLine::new(name, mib(e.whole)).color(WHOLE).width(1.0).style(LineStyle::dashed_dense()),
                        );
                    }
                }
                let device = series(&|m| m.device_used);
                if on_gpu {
                    p.line(Line::new(tr(lang, "GPU: used on the card"), PlotPoints::from(device)).color(WHOLE));
                }
                // the whole process: binary, data, window and memory the allocator keeps after a free
                let rss = Line::new(tr(lang, "RSS (the whole process)"), PlotPoints::from(series(&|m| Some(m.rss))));
                p.line(if on_gpu { rss } else { rss.color(WHOLE) });
            })
            .response
    }

    pub fn samples_and_log(&self, ui: &mut egui::Ui, lang: Lang) {
        if !self.samples.is_empty() {
            egui::CollapsingHeader::new(tr(lang, "Samples")).id_salt("Samples").default_open(true).show(ui, |ui| {
                for (step, prompt, text) in self.samples.iter().rev().take(12) {
                    ui.label(egui::RichText::new(format!("{} {step} · {prompt}", tr(lang, "step"))).strong());
                    ui.label(text);
                    ui.separator();
                }
            });
        }
        egui::CollapsingHeader::new(tr(lang, "Log")).id_salt("Log").default_open(true).show(ui, |ui| {
            let row = ui.text_style_height(&egui::TextStyle::Monospace);
            // the log is kept in English and shown in the UI's language, the visible rows only
            egui::ScrollArea::vertical().max_height(160.0).stick_to_bottom(true).show_rows(
                ui,
                row,
                self.log.len(),
                |ui, rows| {
                    for line in &self.log[rows] {
                        ui.monospace(tr_message(lang, line));
                    }
                },
            );
        });
    }
}

pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "–".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{estimate, presets, DeviceKind, EstimateInput, Method};

    /// The step's peak is compared with the estimate less what is not the run's tensors: on the
    /// CPU the process around the run, on a GPU the CUDA context and the pool's reserve.
    #[test]
    fn the_plot_compares_the_step_peak_with_the_tensors_part_of_the_estimate() {
        let spec = presets::spec_for("llama-2-7b").unwrap();
        let mut input =
            EstimateInput::new(spec, Method::Qlora { double_quant: true }, vec!["q_proj".into()], 8, 1, 256);
        let tensors = estimate(&input).unwrap();
        input.process_bytes = 300 << 20;
        let plot = RunEstimate::new(&estimate(&input).unwrap());
        assert_eq!(plot.step[1..], [tensors.mid, tensors.high]);
        // (the low edge with a process also allows for pages RSS does not count: a little wider)
        assert!(plot.step[0] <= tensors.low && plot.step[0] >= tensors.low / 10 * 9, "{plot:?} {tensors:?}");
        assert_eq!(plot.whole, tensors.mid + (300 << 20));

        let gpu = estimate(&input.clone().on(DeviceKind::Cuda)).unwrap();
        let plot = RunEstimate::new(&gpu);
        assert!(gpu.outside_pool > 0);
        assert_eq!(plot.step[1], gpu.pool_peak());
        assert_eq!(plot.whole, gpu.mid);
    }
}
