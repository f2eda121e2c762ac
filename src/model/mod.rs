//! Models: config.json into one `ModelSpec`, checkpoint loading, the generic decoder and the
//! loss. No file dialogs, no threads.

pub mod checkpoint;
pub mod decoder;
pub mod generate;
pub mod inspect;
pub mod loss;
pub mod ops;
pub mod presets;
pub mod spec;

pub use decoder::{BaseWeights, KvCache, Model};
pub use generate::{generate, GenerateOptions};
pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use spec::ModelSpec;
