//! Training: the RunConfig, the trainer thread with its events and commands, AdamW with the
//! learning-rate schedule, and checkpoints that a run resumes from exactly.

pub mod checkpoint;
pub mod config;
pub mod console;
pub mod events;
pub mod memory_plan;
pub mod optim;
pub mod schedule;
pub mod trainer;
pub mod worker;

pub use config::{Checkpointing, Mode, ModelConfig, RunConfig, Schedule};
pub use events::{Command, TrainEvent};
pub use trainer::{device_of, evaluate_dataset, preview_run, run, spawn, EvalReport};
