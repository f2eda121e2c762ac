//! One training run as the GUI sees it: the trainer's events pumped each frame into curves, a
//! log and a state; the controls that send it commands; and the live plots.

use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use eframe::egui;
use egui_plot::{HLine, Legend, Line, Plot, PlotPoints};

use super::app::titled_plot;
use super::i18n::{tr, Lang};
use crate::train::events::{RunFinished, RunStarted, StepStats};
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
    /// The pre-launch estimate of the peak, in bytes, drawn against the readings.
    pub estimate_bytes: Option<u64>,
}

impl RunView {
    pub fn start(config: RunConfig, resume_from: Option<PathBuf>, estimate_bytes: Option<u64>) -> Self {
        let (events, commands, handle) = crate::train::spawn(config.clone(), resume_from);
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
            estimate_bytes,
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
            estimate_bytes: None,
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
            RunState::Loading(stage, f) => (format!("{}: {stage}", tr(lang, "Loading")), *f),
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
            RunState::Failed(m) => (format!("{}: {m}", tr(lang, "Failed")), 0.0),
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
    /// tokens/s and memory against the estimate.
    pub fn plots(&self, ui: &mut egui::Ui, lang: Lang) {
        let series = |f: &dyn Fn(&StepStats) -> f64| -> Vec<[f64; 2]> {
            self.steps.iter().map(|s| [s.step as f64, f(s)]).filter(|p| p[1].is_finite()).collect()
        };
        let height = (ui.available_height() * 0.45).clamp(140.0, 320.0);
        titled_plot(ui, "loss", egui::RichText::new(tr(lang, "Loss")).strong(), |ui| {
            Plot::new("loss")
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
        let small = (height * 0.6).max(110.0);
        // a small plot of one reading over the steps
        let one_line = |ui: &mut egui::Ui, id: &str, title: &str, name: &str, f: &dyn Fn(&StepStats) -> f64| {
            titled_plot(ui, id, title, |ui| {
                Plot::new(id).height(small).show(ui, |p| p.line(Line::new(name, PlotPoints::from(series(f))))).response
            });
        };
        ui.columns(2, |cols| {
            one_line(&mut cols[0], "lr", tr(lang, "Learning rate over steps"), "lr", &|s| s.lr);
            one_line(&mut cols[1], "grad_norm", tr(lang, "Gradient norm"), "|g|", &|s| s.grad_norm);
        });
        ui.columns(2, |cols| {
            one_line(&mut cols[0], "throughput", tr(lang, "Tokens/s"), "tokens/s", &|s| s.tokens_per_s);
            titled_plot(&mut cols[1], "memory", tr(lang, "Memory (MiB)"), |ui| {
                Plot::new("memory")
                    .height(small)
                    .legend(Legend::default())
                    .show(ui, |p| {
                        let mib = |b: u64| b as f64 / 1048576.0;
                        // the process, window included: above the estimate on small models
                        let rss = tr(lang, "RSS (the whole app)");
                        p.line(Line::new(rss, PlotPoints::from(series(&|s| mib(s.memory.rss)))));
                        // live heap bytes (the tensors) where the counting allocator is installed:
                        // what the estimate predicts
                        let heap = series(&|s| s.memory.heap_live.map(mib).unwrap_or(f64::NAN));
                        if !heap.is_empty() {
                            p.line(Line::new(tr(lang, "live heap (tensors)"), PlotPoints::from(heap)));
                        }
                        // on a GPU: our tensors' peak within each step (the pool's high-water
                        // mark: what the estimate predicts) and the card's use (context and
                        // other processes included)
                        let pool = series(&|s| s.memory.pool_peak.map(mib).unwrap_or(f64::NAN));
                        if !pool.is_empty() {
                            p.line(Line::new(tr(lang, "GPU: tensors, peak of the step"), PlotPoints::from(pool)));
                        }
                        let device = series(&|s| s.memory.device_used.map(mib).unwrap_or(f64::NAN));
                        if !device.is_empty() {
                            p.line(Line::new(tr(lang, "GPU: used on the card"), PlotPoints::from(device)));
                        }
                        if let Some(e) = self.estimate_bytes {
                            p.hline(HLine::new(tr(lang, "Estimate"), mib(e)));
                        }
                    })
                    .response
            });
        });
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
            egui::ScrollArea::vertical().max_height(160.0).stick_to_bottom(true).show(ui, |ui| {
                for line in &self.log {
                    ui.monospace(line);
                }
            });
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
