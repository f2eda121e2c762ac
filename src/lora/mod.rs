//! LoRA on frozen linears: y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scale, as PEFT computes it (and
//! DoRA: the same with a trainable magnitude per output row over the row-normalised W + s·B·A); PEFT
//! adapter import (peft) and export as a PEFT folder, a llama.cpp GGUF adapter or a merged
//! model (export, gguf, merge). Knows nothing of the training loop.

pub mod export;
mod fused;
pub mod gguf;
pub mod gguf_model;
pub mod merge;
pub mod peft;

use std::cell::Cell;

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};

use crate::quant::FrozenLinear;
use crate::rng::Rng;

/// How LoRA is applied: rank, alpha, dropout, rsLoRA and the target module names.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    /// DoRA (PEFT's use_dora): a trainable magnitude per output row.
    pub use_dora: bool,
    pub targets: Vec<String>,
}

impl LoraSettings {
    /// Rank r with alpha 2r on `targets`: no dropout, rsLoRA or DoRA (what benchmarks and tests
    /// start from).
    pub fn with_rank(r: usize, targets: Vec<String>) -> Self {
        Self { r, alpha: 2.0 * r as f64, dropout: 0.0, use_rslora: false, use_dora: false, targets }
    }

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
    /// DoRA's magnitude m [out]: the layer computes m ⊙ (W + s·B·A)·x / ‖W + s·B·A‖ per row.
    pub magnitude: Option<Var>,
    /// DoRA: ‖W‖² per output row of the frozen weight, taken once when the pair is attached.
    pub base_row_sq: Option<Tensor>,
}

impl LoraPair {
    /// The trainable tensors: A, B and DoRA's magnitude.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars = vec![self.a.clone(), self.b.clone()];
        vars.extend(self.magnitude.clone());
        vars
    }
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
        let mut pair =
            LoraPair { a, b, scale: settings.scale(), dropout: settings.dropout, magnitude: None, base_row_sq: None };
        if settings.use_dora {
            // PEFT starts m at the row norms of W + s·B·A, which with B = 0 are W's
            let row_sq = self.base_row_sq(device)?;
            pair.magnitude = Some(Var::from_tensor(&row_sq.sqrt()?)?);
            pair.base_row_sq = Some(row_sq);
        }
        self.lora = Some(pair);
        Ok(())
    }

    /// ‖W‖² over each output row of the frozen weight (dense, or dequantized from NF4 once).
    pub fn base_row_sq(&self, device: &Device) -> candle_core::Result<Tensor> {
        self.base.weight().to_dense(DType::F32, device)?.sqr()?.sum(1)
    }

    /// ‖W + s·B·A‖ over each output row, in f32 and outside the graph (PEFT detaches it),
    /// without forming W + s·B·A: ‖W_i‖² (kept) + 2s·⟨B_i, (W·Aᵀ)_i⟩ + s²·B_i·(A·Aᵀ)·B_iᵀ, from
    /// A·Wᵀ ([r, out], no bias) and A·Aᵀ.
    fn dora_norm_from(&self, lora: &LoraPair, aw: &Tensor, gram: &Tensor) -> candle_core::Result<Tensor> {
        let b = lora.b.as_tensor().detach();
        let row_sq = match &lora.base_row_sq {
            Some(t) => t.clone(),
            None => self.base_row_sq(b.device())?,
        };
        let cross = (&b * aw.t()?)?.sum(1)?;
        let ba_sq = (b.matmul(gram)? * &b)?.sum(1)?;
        let s = lora.scale;
        (row_sq + (cross * (2.0 * s))? + (ba_sq * (s * s))?)?.relu()?.sqrt()
    }

    fn without_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match self.base.bias() {
            Some(bias) => y.broadcast_sub(&bias.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// x: [..., in] → [..., out]. `train` turns dropout on.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let Some(lora) = &self.lora else { return self.base.forward(x) };
        if let Some(magnitude) = &lora.magnitude {
            return self.forward_dora(x, lora, magnitude, train);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return self.forward_fused(x, lora, train);
        }
        self.forward_composite(x, lora, train)
    }

    /// The LoRA linear in candle ops (any device and dtype).
    fn forward_composite(&self, x: &Tensor, lora: &LoraPair, train: bool) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let h = if train && lora.dropout > 0.0 { seeded_dropout(x, lora.dropout, &self.path)? } else { x.clone() };
        // LoRA parameters stay f32 (and so do their gradients and AdamW state); the branch runs
        // in the compute dtype, as PEFT's under autocast: casting the small A and B costs less
        // than an f32 copy of every input.
        let dtype = x.dtype();
        let (a, b) = (lora.a.as_tensor().to_dtype(dtype)?, lora.b.as_tensor().to_dtype(dtype)?);
        let z = h.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        y + (z * lora.scale)?
    }
}

impl LoraLinear {
    /// DoRA as PEFT computes it (lora/dora.py): with s_m = m / ‖W + s·B·A‖ per output row
    /// (the norm detached), y = base(x) + (s_m − 1) ⊙ (x_d·Wᵀ) + s_m ⊙ s·(x_d·Aᵀ·Bᵀ), where x_d
    /// is the dropped-out input (x itself without dropout, and then x·Wᵀ is base(x) less its
    /// bias).
    /// DoRA: m/‖W + s·B·A‖ ⊙ (base(x) + s·x·Aᵀ·Bᵀ) + bias, as PEFT's `lora/dora.py`. Off the
    /// CPU's f32 path, the norm's W·Aᵀ rides along as r extra rows of a base matmul the forward
    /// does anyway (A appended to its input, detached), so W is dequantized once per pass, not
    /// twice (a GPU kernel over all of W each time). Those rows get no gradient: the norm is
    /// outside the graph.
    fn forward_dora(&self, x: &Tensor, lora: &LoraPair, magnitude: &Var, train: bool) -> candle_core::Result<Tensor> {
        let dropped = train && lora.dropout > 0.0;
        let dtype = x.dtype();
        let dims = x.dims();
        let Some((&in_f, lead)) = dims.split_last() else { candle_core::bail!("DoRA linear: input is a scalar") };
        let rows: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(self.base.out_features());
        let a = lora.a.as_tensor().detach();
        let r = a.dim(0)?;
        let gram = a.matmul(&a.t()?)?;
        let with_a_rows = |input: &Tensor| Tensor::cat(&[&input.reshape((rows, in_f))?, &a.to_dtype(dtype)?], 0);
        // splits [rows + r, out] into the input's rows (back to its shape) and A·Wᵀ (f32)
        let split = |y: Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                y.narrow(0, 0, rows)?.reshape(out_dims.as_slice())?,
                y.narrow(0, rows, r)?.detach().to_dtype(DType::F32)?,
            ))
        };
        if x.device().is_cpu() && dtype == DType::F32 {
            // the CPU's one-node LoRA linear with the scale applied inside. Here A·Wᵀ is a pass of
            // its own: the CPU's frozen op on r rows costs little, while appending A to x would
            // keep a copy of x per linear for the backward (+150 MiB on SmolLM2 at 256 tokens)
            let aw = self.without_bias(self.base.forward(&a)?)?;
            let mag_scale = magnitude.as_tensor().broadcast_div(&self.dora_norm_from(lora, &aw, &gram)?)?;
            // the op reads the unscaled output back as (y − bias)/scale: a zero scale (m = 0)
            // takes the composite path instead
            let smallest = mag_scale.abs()?.min_all()?.to_scalar::<f32>()?;
            if smallest > 1e-12 {
                let b_ext = Tensor::cat(&[lora.b.as_tensor(), &mag_scale.unsqueeze(1)?], 1)?;
                if !dropped {
                    // m/‖·‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias
                    return self.fused_op(x, lora.a.as_tensor(), &b_ext, lora.scale, None, true);
                }
                // PEFT's value with dropout, base(x) + (m/‖·‖ − 1) ⊙ base(h) + m/‖·‖ ⊙ s·h·Aᵀ·Bᵀ
                // (h the dropped x, base without its bias there), is the op on h plus the base
                // of what dropout removed, (x − h)·Wᵀ: four [tokens, out] tensors fewer
                let h = seeded_dropout(x, lora.dropout, &self.path)?;
                let scaled = self.fused_op(&h, lora.a.as_tensor(), &b_ext, lora.scale, None, true)?;
                let removed = self.without_bias(self.base.forward(&(x - &h)?)?)?;
                return scaled + removed;
            }
        }
        let h = if dropped { seeded_dropout(x, lora.dropout, &self.path)? } else { x.clone() };
        // the base on the dropped input (PEFT's DoRA term) carries A's rows; without dropout
        // that is the main output itself
        let (base_h, aw) = split(self.base.forward(&with_a_rows(&h)?)?)?;
        let y = if dropped { self.base.forward(x)? } else { base_h.clone() };
        let norm = self.dora_norm_from(lora, &self.without_bias(aw)?, &gram)?;
        let mag_scale = magnitude.as_tensor().broadcast_div(&norm)?.to_dtype(dtype)?;
        let (a, b) = (lora.a.as_tensor().to_dtype(dtype)?, lora.b.as_tensor().to_dtype(dtype)?);
        let lora_y = (h.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * lora.scale)?;
        let base = self.without_bias(base_h)?;
        let dora = ((base.broadcast_mul(&(&mag_scale - 1.0)?)?) + lora_y.broadcast_mul(&mag_scale)?)?;
        y + dora
    }

    /// The CPU's one-node LoRA linear (lora/fused.rs), the same values as `forward`'s
    /// composite path.
    fn forward_fused(&self, x: &Tensor, lora: &LoraPair, train: bool) -> candle_core::Result<Tensor> {
        let dropout =
            (train && lora.dropout > 0.0).then(|| (lora.dropout, Rng::key(DROPOUT_SEED.with(Cell::get), &self.path)));
        self.fused_op(x, lora.a.as_tensor(), lora.b.as_tensor(), lora.scale, dropout, false)
    }

    /// x [..., in] through lora/fused.rs's op; with `dora`, `b` is [B | scale].
    fn fused_op(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: Option<(f32, u64)>,
        dora: bool,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let Some((&in_f, lead)) = dims.split_last() else { candle_core::bail!("LoRA linear: input is a scalar") };
        let rows: usize = lead.iter().product();
        let op = fused::FusedLora { base: self.base.clone(), scale: scale as f32, dropout, dora };
        let y = x.reshape((rows, in_f))?.contiguous()?.apply_op3(a, b, op)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.base.out_features());
        y.reshape(out_dims)
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

/// Inverted dropout with a mask drawn from this thread's seed and the module's path, on the
/// device that holds x. The mask is never stored: the backward draws it again.
pub fn seeded_dropout(x: &Tensor, p: f32, path: &str) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(SeededDropout { key: Rng::key(DROPOUT_SEED.with(Cell::get), path), p })
}

/// Whether element i of the mask drawn from `key` is kept: the top 24 bits of the i-th
/// SplitMix64 output, as a fraction of 2^24 (exact in f32), at least p.
#[inline]
pub fn dropout_keeps(key: u64, i: u64, p: f32) -> bool {
    (Rng::nth(key, i) >> 40) as f32 * (1.0 / 16_777_216.0) >= p
}

/// x ⊙ mask · 1/(1-p): kept elements scaled in f32, then rounded to x's dtype. The CPU twin of
/// kernels/qls.cu's dropout_mul, which computes the same bits.
pub fn dropout_mul_cpu(x: &CpuStorage, layout: &Layout, key: u64, p: f32) -> candle_core::Result<CpuStorage> {
    use half::{bf16, f16};
    use rayon::prelude::*;
    fn run<T: Copy + Send + Sync>(
        x: &[T],
        key: u64,
        p: f32,
        to: impl Fn(f32) -> T + Sync,
        from: impl Fn(T) -> f32 + Sync,
    ) -> Vec<T> {
        let scale = 1.0 / (1.0 - p);
        let mut y: Vec<T> = x.to_vec();
        const CHUNK: usize = 1 << 14;
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ys)| {
            for (j, v) in ys.iter_mut().enumerate() {
                let keep = dropout_keeps(key, (c * CHUNK + j) as u64, p);
                *v = if keep { to(from(*v) * scale) } else { to(0.0) };
            }
        });
        y
    }
    let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("dropout: non-contiguous input") };
    Ok(match x {
        CpuStorage::F32(v) => CpuStorage::F32(run(&v[a..b], key, p, |v| v, |v| v)),
        CpuStorage::BF16(v) => CpuStorage::BF16(run(&v[a..b], key, p, bf16::from_f32, bf16::to_f32)),
        CpuStorage::F16(v) => CpuStorage::F16(run(&v[a..b], key, p, f16::from_f32, f16::to_f32)),
        other => candle_core::bail!("dropout takes f32, bf16 or f16, not {:?}", other.dtype()),
    })
}

/// Dropout whose mask is a function of (key, element index): the forward and the backward
/// (and a checkpointed block's recomputation) draw the same mask with nothing kept between
/// them, on the CPU and on a GPU alike. A plain multiply by a mask tensor would also keep the
/// mask and compute its gradient.
struct SeededDropout {
    key: u64,
    p: f32,
}

impl CustomOp1 for SeededDropout {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dropout_mul_cpu(x, layout, self.key, self.p)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((crate::cuda::dropout_mul(x, layout, self.key, self.p)?, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x ⊙ m)/dx = m: the gradient goes through the same mask
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SeededDropout { key: self.key, p: self.p })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU op against the composite candle ops: output and the gradients of x, A and
    /// B, with dropout (the same masks: both draw from the seed and path) and without, over a
    /// dense and an NF4 base with a bias.
    #[test]
    fn fused_lora_linear_matches_the_composite_ops() {
        use crate::quant::{quantize, FloatType, FrozenWeight};
        let dev = Device::Cpu;
        let (rows, in_f, out_f) = (7, 40, 24);
        let mut rng = Rng::new(5);
        let w = rng.normal(out_f * in_f, 0.0, 0.2);
        let bias = Tensor::from_vec(rng.normal(out_f, 0.0, 0.1), out_f, &dev).unwrap();
        let dense = FrozenWeight::Dense(Tensor::from_vec(w.clone(), (out_f, in_f), &dev).unwrap());
        let nf4 = FrozenWeight::nf4(quantize(&w, &[out_f, in_f], FloatType::F32, 64, true).unwrap(), &dev).unwrap();
        let x = Var::from_vec(rng.normal(2 * rows * in_f, 0.0, 1.0), (2, rows, in_f), &dev).unwrap();
        for weight in [dense, nf4] {
            for dropout in [0.0, 0.3] {
                let mut lin =
                    LoraLinear::new("m.q_proj".into(), FrozenLinear::new(weight.clone(), Some(bias.clone())).unwrap());
                let settings =
                    LoraSettings { r: 4, alpha: 8.0, dropout, use_rslora: false, use_dora: false, targets: vec![] };
                lin.init_lora(&settings, &mut rng, &dev).unwrap();
                let pair = lin.lora.clone().unwrap();
                pair.b.set(&Tensor::from_vec(rng.normal(out_f * 4, 0.0, 0.5), (out_f, 4), &dev).unwrap()).unwrap();
                let run = |fused: bool| {
                    set_dropout_seed(11);
                    let y = if fused {
                        lin.forward(x.as_tensor(), true).unwrap()
                    } else {
                        lin.forward_composite(x.as_tensor(), &pair, true).unwrap()
                    };
                    // a loss that weights every output differently
                    let weights =
                        Tensor::arange(0f32, y.elem_count() as f32, &dev).unwrap().reshape(y.shape()).unwrap();
                    let grads = (&y * ((weights * 0.01).unwrap().sin().unwrap()))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let g = |t: &Tensor| grads.get(t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    [y, g(x.as_tensor()), g(pair.a.as_tensor()), g(pair.b.as_tensor())]
                };
                let (fused, composite) = (run(true), run(false));
                for (name, (f, c)) in ["y", "dx", "dA", "dB"].iter().zip(fused.iter().zip(&composite)) {
                    let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        diff <= 1e-5 * scale.max(1.0),
                        "{name}, dropout {dropout}: fused off by {diff} (scale {scale})"
                    );
                }
            }
        }
    }

    /// DoRA's forward and backward (the fused CPU op in f32, the composite ops in bf16) against
    /// the definition on the dense weight with candle's autograd, m/‖W + s·B·A‖ ⊙ x·(W + s·B·A)ᵀ
    /// plus the bias, the norm detached as PEFT does; the gradients of x, A, B and m (f32), over
    /// an NF4 base with a bias.
    #[test]
    fn dora_forward_and_backward_match_the_dense_definition() {
        use crate::quant::{quantize, FloatType, FrozenWeight};
        let dev = Device::Cpu;
        let (rows, in_f, out_f, r) = (5, 64, 24, 4);
        let mut rng = Rng::new(9);
        let w = rng.normal(out_f * in_f, 0.0, 0.2);
        let bias = Tensor::from_vec(rng.normal(out_f, 0.0, 0.1), out_f, &dev).unwrap();
        let nf4 = FrozenWeight::nf4(quantize(&w, &[out_f, in_f], FloatType::F32, 64, true).unwrap(), &dev).unwrap();
        let mut lin = LoraLinear::new("m.v_proj".into(), FrozenLinear::new(nf4, Some(bias.clone())).unwrap());
        let settings = LoraSettings { r, alpha: 8.0, dropout: 0.0, use_rslora: false, use_dora: true, targets: vec![] };
        lin.init_lora(&settings, &mut rng, &dev).unwrap();
        let pair = lin.lora.clone().unwrap();
        pair.b.set(&Tensor::from_vec(rng.normal(out_f * r, 0.0, 0.5), (out_f, r), &dev).unwrap()).unwrap();
        let m = pair.magnitude.clone().unwrap();
        m.set(&(m.as_tensor() * 1.3).unwrap()).unwrap();
        let x = Var::from_vec(rng.normal(2 * rows * in_f, 0.0, 1.0), (2, rows, in_f), &dev).unwrap();
        let dense = lin.base.weight().to_dense(DType::F32, &dev).unwrap().detach();

        // a loss that weights every output differently; the gradients of x, A, B and m
        let grads_of = |y: &Tensor| {
            let weights = Tensor::arange(0f32, y.elem_count() as f32, &dev).unwrap().reshape(y.shape()).unwrap();
            let y32 = y.to_dtype(DType::F32).unwrap();
            let grads =
                (&y32 * ((weights * 0.01).unwrap().sin().unwrap())).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |t: &Tensor| grads.get(t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = y32.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            [y, g(x.as_tensor()), g(pair.a.as_tensor()), g(pair.b.as_tensor()), g(m.as_tensor())]
        };
        let merged =
            (&dense + (pair.b.as_tensor().matmul(pair.a.as_tensor()).unwrap() * settings.scale()).unwrap()).unwrap();
        let norm = merged.detach().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        let want = grads_of(
            &x.as_tensor()
                .broadcast_matmul(&merged.t().unwrap())
                .unwrap()
                .broadcast_mul(&m.as_tensor().broadcast_div(&norm).unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap(),
        );
        let close = |got: &[f32], want: &[f32], tolerance: f32, what: &str| {
            let scale = want.iter().fold(0f32, |acc, v| acc.max(v.abs()));
            let diff = got.iter().zip(want).fold(0f32, |acc, (a, b)| acc.max((a - b).abs()));
            assert!(diff <= tolerance * scale.max(1.0), "{what}: off by {diff} (scale {scale})");
        };
        let fused = grads_of(&lin.forward(x.as_tensor(), false).unwrap());
        for (name, (got, want)) in ["y", "dx", "dA", "dB", "dm"].iter().zip(fused.iter().zip(&want)) {
            close(got, want, 1e-5, &format!("f32 {name}"));
        }
        // with dropout: PEFT's base(x) + (g − 1) ⊙ base(h) + g ⊙ s·h·Aᵀ·Bᵀ (h the dropped x, that
        // base without the bias), the same mask on both sides
        lin.lora.as_mut().unwrap().dropout = 0.3;
        set_dropout_seed(11);
        let h = seeded_dropout(x.as_tensor(), 0.3, &lin.path).unwrap();
        let g = m.as_tensor().broadcast_div(&norm).unwrap();
        let want_dropped = grads_of(
            &(x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
                + h.broadcast_matmul(&dense.t().unwrap()).unwrap().broadcast_mul(&(&g - 1.0).unwrap()).unwrap()
                + (h.broadcast_matmul(&pair.a.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&pair.b.as_tensor().t().unwrap())
                    .unwrap()
                    * settings.scale())
                .unwrap()
                .broadcast_mul(&g)
                .unwrap())
            .unwrap(),
        );
        set_dropout_seed(11);
        let fused_dropped = grads_of(&lin.forward(x.as_tensor(), true).unwrap());
        for (name, (got, want)) in ["y", "dx", "dA", "dB", "dm"].iter().zip(fused_dropped.iter().zip(&want_dropped)) {
            close(got, want, 1e-5, &format!("f32 with dropout {name}"));
        }
        lin.lora.as_mut().unwrap().dropout = 0.0;
        let bf16 = lin.forward(&x.as_tensor().to_dtype(DType::BF16).unwrap(), false).unwrap();
        close(
            &bf16.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want[0],
            2e-2,
            "bf16 y",
        );
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_scales_the_kept() {
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        set_dropout_seed(3);
        let y = seeded_dropout(&x, 0.25, "m").unwrap().to_vec1::<f32>().unwrap();
        let kept = y.iter().filter(|&&v| v != 0.0).count();
        assert!((7200..7800).contains(&kept), "{kept} of 10000 kept at p = 0.25");
        assert!(y.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        // the same seed and module draw the same mask; another module, another one
        assert_eq!(seeded_dropout(&x, 0.25, "m").unwrap().to_vec1::<f32>().unwrap(), y);
        assert_ne!(seeded_dropout(&x, 0.25, "n").unwrap().to_vec1::<f32>().unwrap(), y);
        // the gradient passes through the kept elements only, scaled alike
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let grads = seeded_dropout(v.as_tensor(), 0.25, "m").unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), y);
    }
}
