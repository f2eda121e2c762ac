//! Models: config.json into one `ModelSpec`, checkpoint loading, the generic decoder and the
//! loss. No file dialogs, no threads.

pub mod checkpoint;
pub mod decoder;
pub mod inspect;
pub mod loss;
pub mod ops;
pub mod presets;
pub mod spec;

pub use decoder::{BaseWeights, Model};
pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use spec::ModelSpec;
