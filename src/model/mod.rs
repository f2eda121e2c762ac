//! Models: config.json into one `ModelSpec`, checkpoint loading, the generic decoder and the
//! loss. No file dialogs, no threads.

pub mod attention;
pub mod block;
pub mod checkpoint;
pub mod decoder;
pub mod generate;
pub mod inspect;
pub mod loss;
pub mod ops;
pub mod presets;
pub mod recompute;
pub mod spec;

pub use decoder::{BaseWeights, KvCache, Model};
pub use generate::{generate, GenerateOptions};
pub use loss::{causal_lm_loss, chunked_lm_loss, IGNORE_INDEX};
pub use spec::ModelSpec;

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers of the op tests.
    use candle_core::{Device, Tensor};

    /// Standard normal values of `shape`, the same for a given seed.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(crate::rng::Rng::new(seed).normal(n, 0.0, 1.0), shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
}
