//! Frozen base weights: NF4 exactly as bitsandbytes stores it, and the frozen-linear op
//! whose backward returns only the input gradient. Knows nothing of LoRA.

pub mod bf16_matmul;
pub mod bnb;
pub mod frozen_linear;
pub mod k_quants;
pub mod nf4;
pub mod nf4_device;

pub use frozen_linear::{FrozenLinear, FrozenWeight};
pub use nf4::{quantize, quantize_bf16, Absmax, DoubleQuant, FloatType, Nf4Tensor, BLOCKSIZE, NF4_CODE};
