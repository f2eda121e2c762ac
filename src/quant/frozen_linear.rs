//! The frozen linear: y = x·Wᵀ (+ b) with W frozen, stored dense or in NF4.
//!
//! candle's matmul backward always computes the gradient of both operands, so a frozen weight
//! used through a plain matmul gets a full-size gradient (docs/candle-training.md §5). This op's
//! backward returns only the gradient of x. For NF4 the forward dequantizes into a buffer that
//! dies with the call, and the backward dequantizes again: the graph never holds a dense copy.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::nf4::Nf4Tensor;
use crate::error::{Error, Result};

/// A frozen weight of shape [out, in].
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// A dense tensor in the compute dtype (f32, bf16 or f16).
    Dense(Tensor),
    /// Packed NF4, dequantized to the input's dtype on every use.
    Nf4(Arc<Nf4Tensor>),
}

impl FrozenWeight {
    /// (out_features, in_features)
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(w) => (w.dims()[0], w.dims()[1]),
            FrozenWeight::Nf4(q) => (q.shape[0], q.shape[1]),
        }
    }

    /// The weight as a dense tensor. For NF4 a fresh dequantization, owned by the caller.
    pub fn to_dense(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_dtype(dtype)?.to_device(device),
            FrozenWeight::Nf4(q) => {
                let shape = (q.shape[0], q.shape[1]);
                let t = match dtype {
                    DType::F32 => Tensor::from_vec(q.dequantize_f32(), shape, device)?,
                    DType::BF16 => Tensor::from_vec(q.dequantize_bf16(), shape, device)?,
                    DType::F16 => Tensor::from_vec(q.dequantize_f16(), shape, device)?,
                    other => candle_core::bail!("NF4 weights dequantize to f32, bf16 or f16, not {other:?}"),
                };
                Ok(t)
            }
        }
    }

    /// grad_y · W for a 2-D grad_y [rows, out]; an NF4 weight is dequantized again (into the
    /// reused buffer on the CPU).
    pub fn input_grad(&self, grad_y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Nf4(q) if grad_y.device().is_cpu() => {
                grad_y.contiguous()?.apply_op1_no_bwd(&Nf4MatmulT(q.clone()))
            }
            weight => grad_y.matmul(&weight.to_dense(grad_y.dtype(), grad_y.device())?),
        }
    }

    /// Bytes the frozen weight occupies in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(q) => q.storage_bytes(),
        }
    }
}

/// A linear layer whose weight and bias never receive gradients.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: FrozenWeight, bias: Option<Tensor>) -> Result<Self> {
        if let FrozenWeight::Dense(w) = &weight {
            if w.rank() != 2 {
                return Err(Error::Invalid(format!("a linear weight must be 2-D, got shape {:?}", w.dims())));
            }
        }
        if let FrozenWeight::Nf4(q) = &weight {
            if q.shape.len() != 2 {
                return Err(Error::Invalid(format!("a linear weight must be 2-D, got shape {:?}", q.shape)));
            }
        }
        let (out_f, _) = weight.dims();
        if let Some(b) = &bias {
            if b.dims() != [out_f] {
                return Err(Error::Invalid(format!("bias of shape {:?} for {out_f} outputs", b.dims())));
            }
        }
        // Frozen tensors must not be Vars: detach so that nothing upstream tracks them.
        let weight = match weight {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(w.detach()),
            nf4 => nf4,
        };
        Ok(Self { weight, bias: bias.map(|b| b.detach()) })
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// The input gradient grad_y · W of a 2-D grad_y [rows, out], outside any graph.
    pub fn input_grad(&self, grad_y: &Tensor) -> candle_core::Result<Tensor> {
        self.weight.input_grad(grad_y)
    }

    /// x: [..., in] → [..., out]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, x.device().is_cpu())
    }

    /// The device-generic path (what CUDA runs), callable on any device so that the CPU tests
    /// cover it too.
    pub fn forward_generic(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, false)
    }

    fn forward_with(&self, x: &Tensor, cpu_op: bool) -> candle_core::Result<Tensor> {
        let (out_f, in_f) = self.weight.dims();
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("frozen linear: input is a scalar");
        };
        if last != in_f {
            candle_core::bail!("frozen linear: input has {last} features, the weight expects {in_f}");
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_f))?.contiguous()?;
        let y = if cpu_op {
            x2.apply_op1(FrozenMatmul { weight: self.weight.clone(), bias: self.bias.clone() })?
        } else {
            self.forward_on_device(&x2)?
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(out_f);
        y.reshape(out_dims)
    }
}

impl FrozenLinear {
    /// For devices without a kernel of ours (CUDA for now): compute y with plain tensor ops on
    /// a detached input, so no graph is recorded, then attach the input gradient only. Costs
    /// one output-sized tensor per linear kept until backward; NF4 weights are dequantized on
    /// the host and copied over until the CUDA kernel lands.
    fn forward_on_device(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dense(x2.dtype(), x2.device())?;
        let mut y = x2.detach().matmul(&w.t()?)?;
        drop(w);
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(x2.dtype())?.to_device(x2.device())?)?;
        }
        x2.apply_op2(&y.contiguous()?, AttachInputGrad { weight: self.weight.clone() })
    }
}

/// Returns its second argument unchanged; its backward gives the first argument (x) the
/// gradient grad_y · W and nothing else.
struct AttachInputGrad {
    weight: FrozenWeight,
}

impl CustomOp2 for AttachInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-attach"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_dense(grad_y.dtype(), grad_y.device())?;
        Ok((Some(grad_y.matmul(&w)?), None))
    }
}

/// The custom op behind `FrozenLinear::forward` on the CPU, on a contiguous [rows, in] input.
struct FrozenMatmul {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

// The dequantization buffer is kept per thread and reused: a fresh allocation of a large
// weight costs more in page faults than the dequantization itself. The training thread
// therefore holds one buffer the size of its largest frozen linear, which the memory model
// counts as the transient dequantized weight.
thread_local! {
    static SCRATCH: std::cell::RefCell<Option<CpuStorage>> = const { std::cell::RefCell::new(None) };
}

/// Free this thread's dequantization buffer (it keeps the size of the largest weight seen,
/// which a later, smaller model would otherwise carry: the memory grid measures models one
/// after another on one thread).
pub fn release_dequantize_buffer() {
    SCRATCH.with(|s| s.borrow_mut().take());
}

/// Runs `f` on an NF4 weight dequantized into this thread's CPU buffer of `dtype`.
fn with_dequantized<R>(
    q: &Nf4Tensor,
    dtype: DType,
    f: impl FnOnce(&CpuStorage) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    fn fill<T: Copy + Default + Send>(buf: &mut Vec<T>, q: &Nf4Tensor, convert: impl Fn(f32) -> T + Sync) {
        // truncate keeps the capacity; resize zeroes only what it adds
        buf.truncate(q.numel());
        buf.resize(q.numel(), T::default());
        q.dequantize_into(buf, convert);
    }
    let scratch = SCRATCH.with(|s| s.borrow_mut().take());
    let storage = match (scratch, dtype) {
        (Some(CpuStorage::F32(mut v)), DType::F32) => {
            fill(&mut v, q, |x| x);
            CpuStorage::F32(v)
        }
        (Some(CpuStorage::BF16(mut v)), DType::BF16) => {
            fill(&mut v, q, bf16::from_f32);
            CpuStorage::BF16(v)
        }
        (Some(CpuStorage::F16(mut v)), DType::F16) => {
            fill(&mut v, q, f16::from_f32);
            CpuStorage::F16(v)
        }
        (_, DType::F32) => CpuStorage::F32(q.dequantize_f32()),
        (_, DType::BF16) => CpuStorage::BF16(q.dequantize_bf16()),
        (_, DType::F16) => CpuStorage::F16(q.dequantize_f16()),
        (_, other) => candle_core::bail!("frozen linear: unsupported input dtype {other:?}"),
    };
    let result = f(&storage);
    SCRATCH.with(|s| *s.borrow_mut() = Some(storage));
    result
}

/// grad_x = grad_y · W for an NF4 weight on the CPU, dequantizing into the reused buffer.
struct Nf4MatmulT(Arc<Nf4Tensor>);

impl CustomOp1 for Nf4MatmulT {
    fn name(&self) -> &'static str {
        "frozen-linear-nf4-backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, g_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[rows, out_f] = g_layout.dims() else {
            candle_core::bail!("frozen linear backward: expected a 2-D gradient, got {:?}", g_layout.dims());
        };
        let in_f = self.0.shape[1];
        let grad_x = with_dequantized(&self.0, g.dtype(), |w| {
            g.matmul(w, (1, rows, in_f, out_f), g_layout, &Layout::contiguous((out_f, in_f)))
        })?;
        Ok((grad_x, Shape::from((rows, in_f))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[rows, in_f] = x_layout.dims() else {
            candle_core::bail!("frozen linear: expected a 2-D input, got {:?}", x_layout.dims());
        };
        let (out_f, _) = self.weight.dims();
        let mut y = match &self.weight {
            FrozenWeight::Dense(w) => {
                if w.dtype() != x.dtype() {
                    candle_core::bail!("frozen linear: input is {:?} but the weight is {:?}", x.dtype(), w.dtype());
                }
                // Borrow the weight's storage in place: no copy of a dense weight per call.
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*storage else {
                    candle_core::bail!("frozen linear: input on the CPU, weight on {:?}", w.device());
                };
                x.matmul(ws, (1, rows, out_f, in_f), x_layout, &layout.transpose(0, 1)?)?
            }
            FrozenWeight::Nf4(q) => {
                let w_t = Layout::contiguous((out_f, in_f)).transpose(0, 1)?;
                with_dequantized(q, x.dtype(), |w| x.matmul(w, (1, rows, out_f, in_f), x_layout, &w_t))?
            }
        };
        if let Some(bias) = &self.bias {
            add_bias_rows(&mut y, bias, out_f)?;
        }
        Ok((y, Shape::from((rows, out_f))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // grad_x = grad_y · W, with W dequantized again for NF4; nothing for W or the bias.
        let grad_x = self.weight.input_grad(grad_y)?;
        debug_assert_eq!(grad_x.dims(), x.dims());
        Ok(Some(grad_x))
    }
}

fn add_bias_rows(y: &mut CpuStorage, bias: &Tensor, out_f: usize) -> candle_core::Result<()> {
    let bias = bias.to_device(&Device::Cpu)?;
    match y {
        CpuStorage::F32(v) => add_rows(v, &bias.to_dtype(DType::F32)?.to_vec1::<f32>()?, out_f, |a, b| a + b),
        CpuStorage::BF16(v) => add_rows(v, &bias.to_dtype(DType::BF16)?.to_vec1::<bf16>()?, out_f, |a, b| a + b),
        CpuStorage::F16(v) => add_rows(v, &bias.to_dtype(DType::F16)?.to_vec1::<f16>()?, out_f, |a, b| a + b),
        other => candle_core::bail!("frozen linear: unsupported dtype {:?}", other.dtype()),
    }
    Ok(())
}

fn add_rows<T: Copy>(values: &mut [T], bias: &[T], width: usize, add: impl Fn(T, T) -> T) {
    for row in values.chunks_exact_mut(width) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = add(*v, b);
        }
    }
}
