//! The Memory panel: the estimate of the run's peak as a stacked bar of its parts against the
//! device's memory, "fits" or "does not fit", the largest sequence and batch that fit, and
//! what to change when it does not — recomputed whenever the settings change.

use eframe::egui;

use super::app::human_bytes;
use super::i18n::{tr, tr_message, trf, Lang};
use crate::data::DataReport;
use crate::memory::{self, fit, Estimate, EstimateInput, Zero};
use crate::train::RunConfig;

const AVAILABLE_RAM: &str = "available RAM";

pub struct MemoryView {
    /// The config the shown estimate belongs to.
    estimated: Option<(RunConfig, Option<DataReport>)>,
    pub input: Option<EstimateInput>,
    pub estimate: Option<Result<Estimate, String>>,
    pub suggestions: Vec<fit::Suggestion>,
    pub largest_seq: Option<usize>,
    pub largest_batch: Option<usize>,
    /// The memory the run must fit in, and what it is.
    pub budget: Option<(u64, String)>,
    gpus: Vec<memory::GpuInfo>,
    /// When the run fits no device here: for cards of common sizes, how many of them it needs
    /// under DeepSpeed ZeRO (the per-GPU estimate), for handing it to a multi-GPU trainer.
    pub cards: Vec<CardsNeeded>,
}

/// GPU cards of one size and how many of them (and which ZeRO stage) the run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CardsNeeded {
    pub card: u64,
    /// The fewest GPUs of the powers of two up to 64, with the stage and its per-GPU peak (the
    /// band's top); None when even 64 are not enough.
    pub needs: Option<(usize, Zero, u64)>,
}

/// Card sizes the offer lists: 24 GiB (RTX 3090/4090), 48 GiB (A6000, L40S), 80 GiB (A100, H100).
const CARD_SIZES: [u64; 3] = [24 << 30, 48 << 30, 80 << 30];

/// The run as it trains on a GPU elsewhere: bf16 with "auto", gradient checkpointing unless it
/// is off, no process of ours around it.
fn on_gpus(config: &RunConfig, input: &EstimateInput) -> EstimateInput {
    let mut c = config.clone();
    c.model.device = "cuda".into();
    let mut gpu = input.clone();
    gpu.device = memory::DeviceKind::Cuda;
    gpu.dtype = c.model.compute_dtype();
    gpu.checkpointing = config.train.gradient_checkpointing != crate::train::Checkpointing::Off;
    gpu.process_bytes = 0;
    gpu
}

/// For each card size, the fewest GPUs (1, 2, 4, … 64) whose per-GPU estimate fits, ZeRO-2 before
/// ZeRO-3 at the same count.
pub fn cards_needed(input: &EstimateInput) -> Vec<CardsNeeded> {
    let counts: Vec<usize> = (0..7).map(|i| 1usize << i).collect();
    let peaks: Vec<(usize, Zero, u64)> = counts
        .iter()
        .flat_map(|&n| [Zero::Two, Zero::Three].map(move |z| (n, z)))
        .filter_map(|(n, z)| memory::estimate_per_gpu(input, n, z).ok().map(|e| (n, z, e.high)))
        .collect();
    CARD_SIZES
        .iter()
        .map(|&card| CardsNeeded { card, needs: peaks.iter().find(|(_, _, high)| *high <= card).copied() })
        .collect()
}

impl MemoryView {
    pub fn new(gpus: Vec<memory::GpuInfo>) -> Self {
        Self {
            estimated: None,
            input: None,
            estimate: None,
            suggestions: Vec::new(),
            largest_seq: None,
            largest_batch: None,
            budget: None,
            gpus,
            cards: Vec::new(),
        }
    }

    /// The GPUs found when the window opened (read once: the driver is not asked per frame).
    pub fn gpus(&self) -> &[memory::GpuInfo] {
        &self.gpus
    }

    /// Recompute when the config or the prepared data changed (the estimate is arithmetic on
    /// config.json: no weights). `data` (the preview's) sizes the largest micro-batch by the
    /// data's longest sequences; without it, batch × max_length.
    pub fn update(&mut self, config: &RunConfig, data: Option<&DataReport>, process_bytes: u64) {
        if self.estimated.as_ref().is_some_and(|(c, d)| c == config && d.as_ref() == data) {
            return;
        }
        self.estimated = Some((config.clone(), data.cloned()));
        self.budget = if config.model.device == "cpu" {
            memory::cli::available_ram().map(|b| (b, AVAILABLE_RAM.to_string()))
        } else {
            let index = config.model.device.strip_prefix("cuda:").and_then(|n| n.parse().ok()).unwrap_or(0);
            self.gpus.iter().find(|g| g.index == index).map(|g| (g.free, format!("free on {}", g.name)))
        };
        let budget = self.budget.as_ref().map(|b| b.0);
        let outcome =
            config.estimate_input(budget, data, process_bytes).and_then(|input| Ok((memory::estimate(&input)?, input)));
        match outcome {
            Ok((est, input)) => {
                (self.suggestions, self.largest_seq, self.largest_batch) = match &self.budget {
                    Some((b, _)) => (
                        if est.fits(*b) { Vec::new() } else { fit::suggestions(&input, *b) },
                        fit::largest_seq(&input, *b),
                        fit::largest_batch(&input, *b),
                    ),
                    None => (Vec::new(), None, None),
                };
                let fits_here = self.budget.as_ref().is_none_or(|(b, _)| est.fits(*b))
                    || self.gpus.iter().any(|g| est.fits(g.total));
                self.cards = if fits_here { Vec::new() } else { cards_needed(&on_gpus(config, &input)) };
                self.estimate = Some(Ok(est));
                self.input = Some(input);
            }
            Err(e) => {
                self.estimate = Some(Err(e.to_string()));
                self.input = None;
                self.cards.clear();
            }
        }
    }

    /// No estimate now, and why (the model is not local yet).
    pub fn clear(&mut self, why: &str) {
        self.estimated = None;
        self.input = None;
        self.suggestions.clear();
        (self.largest_seq, self.largest_batch) = (None, None);
        self.estimate = Some(Err(why.to_string()));
    }

    /// Draws the panel; true when the user takes the offer to hand the run to several GPUs.
    pub fn ui(&self, ui: &mut egui::Ui, lang: Lang) -> bool {
        let est = match &self.estimate {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, tr_message(lang, e));
                return false;
            }
            None => return false,
        };
        ui.label(format!(
            "{}: {} ({} {} – {})",
            tr(lang, "Estimate"),
            human_bytes(est.mid),
            tr(lang, "band"),
            human_bytes(est.low),
            human_bytes(est.high)
        ));
        if let Some(input) = &self.input {
            let state = if input.checkpointing { tr(lang, "on") } else { tr(lang, "off") };
            ui.weak(format!("{}: {state}", tr(lang, "Gradient checkpointing")));
            // the shape the estimate is for: the data's longest sequences once the preview has them
            ui.weak(match self.estimated.as_ref().and_then(|(_, data)| data.as_ref()) {
                Some(d) => trf(
                    lang,
                    "for the largest micro-batch: {} × {} tokens (the longest sequence: {})",
                    &[&input.batch, &input.seq, &d.longest.source],
                ),
                None => trf(
                    lang,
                    "for micro-batches of {} × {} tokens (batch × max length, until the data is read)",
                    &[&input.batch, &input.seq],
                ),
            });
            if est.outside_pool > 0 {
                // what the run's plot shows beside it: the pool's peak within each step
                ui.weak(format!(
                    "{}: {}",
                    tr(lang, "GPU tensors at their peak (the plot's peak in each step)"),
                    human_bytes(est.pool_peak())
                ));
            }
        }
        stacked_bar(ui, est, self.budget.as_ref().map(|b| b.0));
        egui::Grid::new("memory_terms").num_columns(3).striped(true).show(ui, |ui| {
            for (i, t) in est.terms.iter().enumerate() {
                let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
                ui.painter().rect_filled(rect, 2.0, term_color(i));
                ui.label(tr(lang, t.name)).on_hover_text(&t.detail);
                ui.label(human_bytes(t.bytes));
                ui.end_row();
            }
        });
        let Some((budget, what)) = &self.budget else {
            ui.weak(tr(lang, "No device memory to compare with was found."));
            return false;
        };
        let fits = est.fits(*budget);
        let (text, color) = if fits {
            (tr(lang, "fits"), egui::Color32::from_rgb(80, 180, 90))
        } else {
            (tr(lang, "does not fit"), ui.visuals().error_fg_color)
        };
        let what = if what == AVAILABLE_RAM { tr(lang, AVAILABLE_RAM).to_string() } else { tr_message(lang, what) };
        ui.colored_label(color, egui::RichText::new(format!("{text}: {} ({what})", human_bytes(*budget))).strong());
        if let Some(s) = self.largest_seq {
            ui.weak(format!("{}: {s}", tr(lang, "largest sequence that fits")));
        }
        if let Some(b) = self.largest_batch {
            ui.weak(format!("{}: {b}", tr(lang, "largest batch that fits")));
        }
        if !self.suggestions.is_empty() {
            ui.label(egui::RichText::new(tr(lang, "Suggestions")).strong());
            for s in &self.suggestions {
                let mark = if s.estimate.fits(*budget) { "✓" } else { " " };
                let change = s.change.describe(|english| tr(lang, english));
                ui.label(format!("{mark} {change} → {}", human_bytes(s.estimate.mid)));
            }
        }
        self.offer_ui(ui, lang)
    }

    /// When the run fits no device here: the GPUs it needs under ZeRO, and the handoff button.
    fn offer_ui(&self, ui: &mut egui::Ui, lang: Lang) -> bool {
        if self.cards.is_empty() {
            return false;
        }
        ui.label(egui::RichText::new(tr(lang, "On several GPUs (DeepSpeed ZeRO, per-GPU estimate)")).strong());
        for c in &self.cards {
            let card = human_bytes(c.card);
            ui.label(match c.needs {
                Some((n, zero, peak)) => trf(
                    lang,
                    "{} cards: {} × under {} (up to {} each)",
                    &[&card, &n, &zero.label(), &human_bytes(peak)],
                ),
                None => trf(lang, "{} cards: more than 64", &[&card]),
            });
        }
        ui.button(tr(lang, "Hand off to LLaMA-Factory or axolotl…")).clicked()
    }
}

fn term_color(i: usize) -> egui::Color32 {
    const COLORS: [egui::Color32; 10] = [
        egui::Color32::from_rgb(76, 120, 168),
        egui::Color32::from_rgb(245, 133, 24),
        egui::Color32::from_rgb(84, 162, 75),
        egui::Color32::from_rgb(228, 87, 86),
        egui::Color32::from_rgb(114, 183, 178),
        egui::Color32::from_rgb(238, 202, 59),
        egui::Color32::from_rgb(178, 121, 162),
        egui::Color32::from_rgb(255, 157, 166),
        egui::Color32::from_rgb(157, 117, 93),
        egui::Color32::from_rgb(186, 176, 172),
    ];
    COLORS[i % COLORS.len()]
}

/// The parts side by side in one bar, scaled to the larger of the budget and the band's top,
/// with the budget as a vertical line.
fn stacked_bar(ui: &mut egui::Ui, est: &Estimate, budget: Option<u64>) {
    let width = ui.available_width().max(100.0);
    let (rect, response) = ui.allocate_exact_size(egui::vec2(width, 22.0), egui::Sense::hover());
    let scale_max = budget.unwrap_or(0).max(est.high).max(1) as f32;
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 3.0, ui.visuals().extreme_bg_color);
    let mut x = rect.left();
    for (i, t) in est.terms.iter().enumerate() {
        let w = rect.width() * t.bytes as f32 / scale_max;
        let part = egui::Rect::from_min_size(egui::pos2(x, rect.top()), egui::vec2(w, rect.height()));
        painter.rect_filled(part, 0.0, term_color(i));
        x += w;
    }
    let band = |b: u64| rect.left() + rect.width() * b as f32 / scale_max;
    let stroke = egui::Stroke::new(1.0, ui.visuals().text_color());
    painter.line_segment([egui::pos2(band(est.low), rect.bottom()), egui::pos2(band(est.high), rect.bottom())], stroke);
    if let Some(b) = budget {
        let bx = band(b);
        painter.line_segment(
            [egui::pos2(bx, rect.top() - 2.0), egui::pos2(bx, rect.bottom() + 2.0)],
            egui::Stroke::new(2.0, ui.visuals().warn_fg_color),
        );
    }
    let budget = budget.map(human_bytes).unwrap_or_default();
    response.on_hover_text(format!("{} / {budget}", human_bytes(est.mid)));
}
