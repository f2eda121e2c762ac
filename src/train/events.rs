//! What the trainer thread says (`TrainEvent`) and what it listens to (`Command`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::MemoryReading;

/// Sent by the trainer thread, in this order: Loading…, Started, then Step / Eval / Sample /
/// CheckpointSaved / Notice / Paused / Resumed as they happen, and one Finished or Failed last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainEvent {
    /// What is being loaded, and how far along the whole loading is (0..=1).
    Loading {
        stage: String,
        fraction: f32,
    },
    Started(RunStarted),
    /// Something the user should know that does not stop the run (a template warning, a
    /// micro-batch halved after the probe, a resumed position).
    Notice(String),
    Step(StepStats),
    Eval {
        step: usize,
        loss: f64,
    },
    Sample {
        step: usize,
        prompt: String,
        text: String,
    },
    CheckpointSaved {
        step: usize,
        path: PathBuf,
    },
    Paused {
        step: usize,
    },
    Resumed {
        step: usize,
    },
    Finished(RunFinished),
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    pub trainable_params: usize,
    pub total_params: usize,
    pub train_examples: usize,
    pub train_tokens: usize,
    pub validation_examples: usize,
    pub total_steps: usize,
    /// The step the run starts from (non-zero when resumed).
    pub first_step: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Peak memory the probe step measured, in bytes, when a probe ran.
    pub probe_peak_bytes: Option<u64>,
    /// Whether blocks are recomputed in the backward (gradient checkpointing).
    pub gradient_checkpointing: bool,
    /// The memory estimate the run was planned with, made in the process that trains.
    #[serde(default)]
    pub estimate: Option<RunEstimate>,
}

/// A memory estimate in the terms a run's readings compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEstimate {
    /// The run's tensors at their peak inside a step, the band's low, middle and high: what a
    /// step's `MemoryReading::step_peak` is compared with.
    pub step: [u64; 3],
    /// With what surrounds the run: on the CPU the rest of the process (binary, data, window;
    /// against RSS), on a GPU the CUDA context and the pool's reserve (against the card's use).
    pub whole: u64,
}

impl RunEstimate {
    pub fn new(e: &crate::memory::Estimate) -> Self {
        // on the CPU the estimate counts the process around the run as a part of its own (its
        // band's low edge then also allows for pages RSS does not count: a little wider here)
        let outside = e.outside_pool + e.process;
        Self { step: [e.low, e.mid, e.high].map(|b| b.saturating_sub(outside)), whole: e.mid }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based optimizer step.
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    /// The process's memory after the step (on CUDA also the device's).
    pub memory: MemoryReading,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFinished {
    pub step: usize,
    /// True when the user stopped the run before its last step.
    pub stopped: bool,
    /// The last checkpoint (the adapter with its optimizer state and config).
    pub checkpoint: Option<PathBuf>,
    pub train_loss: Option<f64>,
    pub validation_loss: Option<f64>,
}

/// Sent to the trainer thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Pause,
    Resume,
    /// Finish the current step, save a checkpoint and end.
    Stop,
    /// Save a checkpoint after the current step.
    SaveNow,
}
