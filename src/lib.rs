//! qlora-studio: point-and-click LoRA and QLoRA fine-tuning of decoder-only LLMs.
//!
//! The module map and the path of a run are described in DESIGN.md of the shared folder;
//! in short: `arch` knows the families, `quant` the frozen weights, and the binary's command
//! line and GUI drive them.

pub mod arch;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod gui;
pub mod handoff;
pub mod hub;
pub mod lora;
pub mod memory;
pub mod model;
pub mod quant;
pub mod rng;
mod stash;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
