//! LoRA on frozen linears: y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scale, as PEFT computes it; PEFT
//! adapter import (peft) and export as a PEFT folder, a llama.cpp GGUF adapter or a merged
//! model (export, gguf, merge). Knows nothing of the training loop.

pub mod export;
pub mod gguf;
pub mod merge;
pub mod peft;

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, Var};

use crate::quant::FrozenLinear;
use crate::rng::Rng;

/// How LoRA is applied: rank, alpha, dropout, rsLoRA and the target module names.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub targets: Vec<String>,
}

impl LoraSettings {
    /// alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The trainable pair of one adapted linear.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// A frozen linear, optionally with a LoRA pair on it.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Full module path in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub base: FrozenLinear,
    pub lora: Option<LoraPair>,
}

impl LoraLinear {
    pub fn new(path: String, base: FrozenLinear) -> Self {
        Self { path, base, lora: None }
    }

    /// The module name users pick and PEFT matches: the last path component.
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }

    /// Attach a fresh pair as PEFT initialises it: A Kaiming-uniform (a = √5, so bound
    /// 1/√in), B zero, so the adapted model starts equal to the base.
    pub fn init_lora(&mut self, settings: &LoraSettings, rng: &mut Rng, device: &Device) -> candle_core::Result<()> {
        let (out_f, in_f) = (self.base.out_features(), self.base.in_features());
        let bound = 1.0 / (in_f as f32).sqrt();
        let a = Var::from_vec(rng.uniform(settings.r * in_f, -bound, bound), (settings.r, in_f), device)?;
        let b = Var::zeros((out_f, settings.r), DType::F32, device)?;
        self.lora = Some(LoraPair { a, b, scale: settings.scale(), dropout: settings.dropout });
        Ok(())
    }

    /// x: [..., in] → [..., out]. `train` turns dropout on.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(lora) = &self.lora else { return Ok(y) };
        let h = if train && lora.dropout > 0.0 { seeded_dropout(x, lora.dropout, &self.path)? } else { x.clone() };
        // LoRA parameters stay f32; the branch runs in f32 and returns in the input's dtype.
        let h = h.to_dtype(DType::F32)?;
        let z = h.broadcast_matmul(&lora.a.as_tensor().t()?)?.broadcast_matmul(&lora.b.as_tensor().t()?)?;
        let dtype = y.dtype();
        y + (z * lora.scale)?.to_dtype(dtype)?
    }
}

thread_local! {
    static DROPOUT_SEED: Cell<u64> = const { Cell::new(0) };
}

/// Seed the LoRA dropout masks of the forward passes that follow on this thread. The trainer
/// sets one per micro-batch, so a run (and a resumed run) repeats exactly; candle's own
/// dropout draws from a generator that cannot be seeded.
pub fn set_dropout_seed(seed: u64) {
    DROPOUT_SEED.with(|s| s.set(seed));
}

/// The seed the next LoRA dropout masks on this thread are drawn from (a recomputed block
/// restores the one its forward ran with).
pub fn dropout_seed() -> u64 {
    DROPOUT_SEED.with(Cell::get)
}

/// Inverted dropout with a mask drawn from this thread's seed and the module's path.
fn seeded_dropout(x: &Tensor, p: f32, path: &str) -> candle_core::Result<Tensor> {
    let mut rng = Rng::for_key(DROPOUT_SEED.with(Cell::get), path);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.next_f64() as f32 >= p { keep } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.apply_op2(&mask, Dropout)
}

/// x ⊙ mask with the mask a constant: candle's multiply would also compute the mask's
/// gradient (four [T, in] tensors per module, kept in the gradient store until the step).
struct Dropout;

impl CustomOp2 for Dropout {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((x.binary_impl::<candle_core::op::Mul>(m, lx, lm)?, lx.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        m: &CudaStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((x.binary_impl::<candle_core::op::Mul>(m, lx, lm)?, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((grad.detach() * mask)?), None))
    }
}
