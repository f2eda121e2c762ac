//! The frozen linear: y = x·Wᵀ (+ b) with W frozen, stored dense or in NF4.
//!
//! candle's matmul backward always computes the gradient of both operands, so a frozen weight
//! used through a plain matmul gets a full-size gradient (docs/candle-training.md §5). This op's
//! backward returns only the gradient of x. For NF4 the forward dequantizes into a buffer that
//! dies with the call, and the backward dequantizes again: the graph never holds a dense copy.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::bf16_matmul::{self, PackedWeight, Rhs};
use super::nf4::Nf4Tensor;
use super::nf4_device::Nf4OnDevice;
use crate::error::{Error, Result};

/// A frozen weight of shape [out, in].
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// A dense tensor in the compute dtype (f32, bf16 or f16).
    Dense(Tensor),
    /// Packed NF4 in host memory, for CPU compute: dequantized on every use by the threaded
    /// CPU kernel into a reused buffer.
    Nf4(Arc<Nf4Tensor>),
    /// Packed NF4 uploaded once to the compute device (a GPU), dequantized there on every use.
    Nf4OnDevice(Arc<Nf4OnDevice>),
    /// Dense bf16 packed once into the bf16 kernel's panels (a CPU run in bf16 on a CPU with
    /// AVX512-BF16): the form its forward multiplies without a gather.
    Bf16Panels(Arc<PackedWeight>),
}

impl FrozenWeight {
    /// An NF4 weight in the form for `device`: kept in host memory for the CPU, uploaded once
    /// for any other device.
    pub fn nf4(q: Nf4Tensor, device: &Device) -> candle_core::Result<Self> {
        if device.is_cpu() {
            Ok(FrozenWeight::Nf4(Arc::new(q)))
        } else {
            Ok(FrozenWeight::Nf4OnDevice(Arc::new(Nf4OnDevice::upload(&q, device)?)))
        }
    }

    /// This weight with a host NF4 tensor moved into the device form on `device` (what a GPU
    /// run holds; on the CPU it lets the tests run the GPU's code path).
    pub fn into_device_form(self, device: &Device) -> candle_core::Result<Self> {
        match self {
            FrozenWeight::Nf4(q) => Ok(FrozenWeight::Nf4OnDevice(Arc::new(Nf4OnDevice::upload(&q, device)?))),
            other => Ok(other),
        }
    }

    /// (out_features, in_features)
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(w) => (w.dims()[0], w.dims()[1]),
            FrozenWeight::Nf4(q) => (q.shape[0], q.shape[1]),
            FrozenWeight::Nf4OnDevice(q) => q.shape,
            FrozenWeight::Bf16Panels(w) => w.dims(),
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
            FrozenWeight::Nf4OnDevice(q) => q.dequantize(dtype)?.to_device(device),
            FrozenWeight::Bf16Panels(w) => {
                Tensor::from_vec(w.to_bf16(), w.dims(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
            }
        }
    }

    /// Bytes the frozen weight occupies in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(q) => q.storage_bytes(),
            FrozenWeight::Nf4OnDevice(q) => q.storage_bytes(),
            FrozenWeight::Bf16Panels(w) => w.bytes(),
        }
    }

    /// Runs `f` on this weight as a CPU storage of `dtype` laid out [out, in]: a dense weight
    /// borrowed in place, an NF4 one dequantized for the call.
    fn with_cpu<R>(
        &self,
        dtype: DType,
        f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let dense_layout = Layout::contiguous(self.dims());
        match self {
            FrozenWeight::Dense(w) => {
                same_dtype(w, dtype)?;
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*storage else {
                    candle_core::bail!("frozen linear: input on the CPU, weight on {:?}", w.device());
                };
                f(ws, layout)
            }
            FrozenWeight::Nf4(q) => with_dequantized(q, dtype, |w| f(w, &dense_layout)),
            FrozenWeight::Nf4OnDevice(q) => f(&q.dequantize_cpu(dtype)?, &dense_layout),
            // (only a non-f32 input gets here: the bf16 kernel multiplies the panels directly)
            FrozenWeight::Bf16Panels(_) => {
                let w = self.to_dense(dtype, &Device::Cpu)?;
                let (storage, _) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*storage else { unreachable!("unpacked on the CPU") };
                f(ws, &dense_layout)
            }
        }
    }

    /// This weight packed into the bf16 kernel's panels when that pays: a dense CPU weight in
    /// bf16 or f32 on a CPU that runs the kernel. The dense tensor is dropped if nothing else
    /// holds it.
    fn into_bf16_panels(self) -> Self {
        let FrozenWeight::Dense(w) = &self else { return self };
        if !w.device().is_cpu() || w.rank() != 2 || !bf16_matmul::has_bf16_dot() {
            return self;
        }
        let (rows, cols) = (w.dims()[0], w.dims()[1]);
        let packed = {
            let (storage, layout) = w.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                    Some(PackedWeight::pack(Rhs::TransposedBf16(&v[a..b]), rows, cols))
                }
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                    Some(PackedWeight::pack(Rhs::TransposedF32(&v[a..b]), rows, cols))
                }
                _ => None,
            }
        };
        match packed {
            Some(packed) => FrozenWeight::Bf16Panels(Arc::new(packed)),
            None => self,
        }
    }

    /// x · Wᵀ (`transposed`, x [rows, in]) or x · W (x [rows, out]) with bf16 operands and f32
    /// sums (`bf16_matmul`); NF4 is dequantized to bf16, as bitsandbytes does for bf16 compute.
    fn bf16_matmul(&self, x: &[f32], rows: usize, transposed: bool) -> candle_core::Result<Vec<f32>> {
        let (out_f, in_f) = self.dims();
        let (k, n) = if transposed { (in_f, out_f) } else { (out_f, in_f) };
        // the weight's elements [a, b) of a CPU storage
        let run = |w: &CpuStorage, (a, b): (usize, usize)| -> candle_core::Result<Vec<f32>> {
            let rhs = match (w, transposed) {
                (CpuStorage::BF16(w), true) => Rhs::TransposedBf16(&w[a..b]),
                (CpuStorage::BF16(w), false) => Rhs::PlainBf16(&w[a..b]),
                (CpuStorage::F32(w), true) => Rhs::TransposedF32(&w[a..b]),
                (CpuStorage::F32(w), false) => Rhs::PlainF32(&w[a..b]),
                (other, _) => candle_core::bail!("frozen linear: a {:?} weight cannot multiply in bf16", other.dtype()),
            };
            Ok(bf16_matmul::matmul(x, rows, k, rhs, n))
        };
        let all = (0, out_f * in_f);
        match self {
            FrozenWeight::Dense(w) => {
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*storage else {
                    candle_core::bail!("frozen linear: input on the CPU, weight on {:?}", w.device());
                };
                match layout.contiguous_offsets() {
                    Some(range) => run(ws, range),
                    // a strided view (not what the loader makes): multiply a contiguous copy
                    None => {
                        let w = w.contiguous()?;
                        drop(storage);
                        FrozenWeight::Dense(w).bf16_matmul(x, rows, transposed)
                    }
                }
            }
            FrozenWeight::Nf4(q) => with_dequantized(q, DType::BF16, |w| run(w, all)),
            FrozenWeight::Nf4OnDevice(q) => run(&q.dequantize_cpu(DType::BF16)?, all),
            FrozenWeight::Bf16Panels(w) => {
                let rhs = if transposed { Rhs::TransposedPacked(w) } else { Rhs::PlainPacked(w) };
                Ok(bf16_matmul::matmul(x, rows, k, rhs, n))
            }
        }
    }

    /// The CUDA counterpart of `with_cpu`: an NF4 weight is dequantized on the device by our
    /// kernel into a buffer freed (back to the stream's pool) when the call returns.
    #[cfg(feature = "cuda")]
    fn with_cuda<R>(
        &self,
        dtype: DType,
        dev: &candle_core::CudaDevice,
        f: impl FnOnce(&CudaStorage, &Layout) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let dense_layout = Layout::contiguous(self.dims());
        match self {
            FrozenWeight::Dense(w) => {
                same_dtype(w, dtype)?;
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cuda(ws) = &*storage else {
                    candle_core::bail!("frozen linear: input on the GPU, weight on {:?}", w.device());
                };
                f(ws, layout)
            }
            FrozenWeight::Nf4OnDevice(q) => f(&crate::cuda::dequantize_nf4(q, dtype, dev)?, &dense_layout),
            // not what a loaded model holds (the loader uploads NF4 once; panels are CPU-only)
            FrozenWeight::Nf4(_) | FrozenWeight::Bf16Panels(_) => {
                let w = self.to_dense(dtype, &Device::Cuda(dev.clone()))?;
                let (storage, _) = w.storage_and_layout();
                let Storage::Cuda(ws) = &*storage else { unreachable!("uploaded to CUDA") };
                f(ws, &dense_layout)
            }
        }
    }
}

/// The contiguous f32 input when this matmul runs on the bf16-operand kernel.
fn bf16_input<'a>(operands: Operands, x: &'a CpuStorage, l: &Layout) -> candle_core::Result<Option<&'a [f32]>> {
    match (operands, x) {
        (Operands::Bf16OnCpu, CpuStorage::F32(_)) => Ok(Some(crate::model::ops::slice(x, l)?)),
        _ => Ok(None),
    }
}

fn same_dtype(w: &Tensor, dtype: DType) -> candle_core::Result<()> {
    if w.dtype() != dtype {
        candle_core::bail!("frozen linear: input is {dtype:?} but the weight is {:?}", w.dtype());
    }
    Ok(())
}

/// A linear layer whose weight and bias never receive gradients.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    /// What the matmul multiplies in (see `with_bf16_operands`).
    operands: Operands,
}

/// The precision of the frozen matmul's operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    /// The input's dtype (the weight is used in it: a dense one must already be).
    AsInput,
    /// On the CPU, an f32 input and the weight rounded to bf16, products summed in f32
    /// (`bf16_matmul`): what a CPU run in bf16 does, with its activations kept in f32.
    Bf16OnCpu,
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
        // (an Nf4OnDevice weight is 2-D by construction)
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
        Ok(Self { weight, bias: bias.map(|b| b.detach()), operands: Operands::AsInput })
    }

    /// Multiply in bf16 with f32 sums when the input is f32 on the CPU (other inputs are
    /// unaffected). The weight may be dense bf16 or f32, or NF4.
    pub fn with_bf16_operands(mut self) -> Self {
        self.operands = Operands::Bf16OnCpu;
        self.weight = self.weight.into_bf16_panels();
        self
    }

    pub fn operands(&self) -> Operands {
        self.operands
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
        input_grad(&self.weight, self.operands, grad_y)
    }

    /// x · Wᵀ (+ b) on a contiguous CPU input [rows, in], outside any graph: the forward of a
    /// fused op that contains this linear (lora's fused LoRA linear).
    pub fn forward_cpu(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<CpuStorage> {
        let op = FrozenMatmul { weight: self.weight.clone(), bias: self.bias.clone(), operands: self.operands };
        Ok(op.cpu_fwd(x, layout)?.0)
    }

    /// grad_y · W on a contiguous CPU gradient [rows, out], outside any graph.
    pub fn input_grad_cpu(&self, grad_y: &CpuStorage, layout: &Layout) -> candle_core::Result<CpuStorage> {
        Ok(FrozenMatmulT { weight: self.weight.clone(), operands: self.operands }.cpu_fwd(grad_y, layout)?.0)
    }

    /// Moves a host NF4 weight to the device form (uploaded once to `device`).
    pub fn into_device_form(self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self { weight: self.weight.into_device_form(device)?, ..self })
    }

    /// x: [..., in] → [..., out]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(x.dtype())?.to_device(x.device())?),
            None => None,
        };
        let y = x2.apply_op1(FrozenMatmul { weight: self.weight.clone(), bias, operands: self.operands })?;
        let mut out_dims = lead.to_vec();
        out_dims.push(out_f);
        y.reshape(out_dims)
    }
}

/// The custom op behind `FrozenLinear::forward` on every device, on a contiguous [rows, in] input.
struct FrozenMatmul {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    operands: Operands,
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
            v.truncate(q.numel());
            v.resize(q.numel(), 0.0);
            q.dequantize_f32_into(&mut v);
            CpuStorage::F32(v)
        }
        (Some(CpuStorage::BF16(mut v)), DType::BF16) => {
            v.truncate(q.numel());
            v.resize(q.numel(), bf16::ZERO);
            q.dequantize_bf16_into(&mut v);
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

/// grad_y · W for a 2-D grad_y [rows, out], outside any graph (the frozen linear's backward).
fn input_grad(weight: &FrozenWeight, operands: Operands, grad_y: &Tensor) -> candle_core::Result<Tensor> {
    grad_y.contiguous()?.apply_op1_no_bwd(&FrozenMatmulT { weight: weight.clone(), operands })
}

/// grad_x = grad_y · W on a contiguous [rows, out] gradient (no graph).
struct FrozenMatmulT {
    weight: FrozenWeight,
    operands: Operands,
}

impl FrozenMatmulT {
    fn shapes(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (out_f, in_f) = self.weight.dims();
        Ok((rows_of(l, out_f, "frozen linear backward: expected a gradient")?, out_f, in_f))
    }
}

/// The rows of a 2-D [rows, width] layout; `what` heads the error otherwise.
fn rows_of(l: &Layout, width: usize, what: &str) -> candle_core::Result<usize> {
    match l.dims() {
        &[rows, w] if w == width => Ok(rows),
        d => candle_core::bail!("{what} of shape [rows, {width}], got {d:?}"),
    }
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-linear-backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out_f, in_f) = self.shapes(gl)?;
        if let Some(g) = bf16_input(self.operands, g, gl)? {
            let grad_x = self.weight.bf16_matmul(g, rows, false)?;
            return Ok((CpuStorage::F32(grad_x), Shape::from((rows, in_f))));
        }
        let grad_x = self.weight.with_cpu(g.dtype(), |w, wl| g.matmul(w, (1, rows, in_f, out_f), gl, wl))?;
        Ok((grad_x, Shape::from((rows, in_f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, out_f, in_f) = self.shapes(gl)?;
        let grad_x =
            self.weight.with_cuda(g.dtype(), &g.device, |w, wl| g.matmul(w, (1, rows, in_f, out_f), gl, wl))?;
        Ok((grad_x, Shape::from((rows, in_f))))
    }
}

impl FrozenMatmul {
    fn shapes(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (out_f, in_f) = self.weight.dims();
        Ok((rows_of(l, in_f, "frozen linear: expected an input")?, out_f, in_f))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out_f, in_f) = self.shapes(x_layout)?;
        let mut y = match bf16_input(self.operands, x, x_layout)? {
            Some(x) => CpuStorage::F32(self.weight.bf16_matmul(x, rows, true)?),
            None => self
                .weight
                .with_cpu(x.dtype(), |w, wl| x.matmul(w, (1, rows, out_f, in_f), x_layout, &wl.transpose(0, 1)?))?,
        };
        if let Some(bias) = &self.bias {
            add_bias_rows(&mut y, bias, out_f)?;
        }
        Ok((y, Shape::from((rows, out_f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, out_f, in_f) = self.shapes(x_layout)?;
        let y = self.weight.with_cuda(x.dtype(), &x.device, |w, wl| {
            x.matmul(w, (1, rows, out_f, in_f), x_layout, &wl.transpose(0, 1)?)
        })?;
        let y = match &self.bias {
            Some(bias) => {
                let (storage, bl) = bias.storage_and_layout();
                let Storage::Cuda(b) = &*storage else { candle_core::bail!("frozen linear: bias not on the GPU") };
                y.binary_impl::<candle_core::op::Add>(
                    b,
                    &Layout::contiguous((rows, out_f)),
                    &bl.broadcast_as((rows, out_f))?,
                )?
            }
            None => y,
        };
        Ok((y, Shape::from((rows, out_f))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // grad_x = grad_y · W, with W dequantized again for NF4; nothing for W or the bias.
        let grad_x = input_grad(&self.weight, self.operands, grad_y)?;
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
