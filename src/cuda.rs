//! Launching our own kernels (kernels/qls.cu, compiled to PTX by build.rs) on candle's CUDA
//! device, on its stream, so they run in order with candle's work. Only with the `cuda` feature.
//! Each launcher's CPU twin sits beside its caller and is what the CPU tests check.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::quant::nf4_device::{DeviceScales, Nf4OnDevice};

type Res<T> = candle_core::Result<T>;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/qls.ptx"));
const MODULE: &str = "qls";

/// A grid-stride launch over `n` items: enough blocks to fill any card, never more than needed.
fn grid(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn suffix(dtype: DType) -> Res<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("our CUDA kernels take f32, bf16 or f16, not {other:?}"),
    }
}

/// The storage of a whole contiguous tensor, held readable while a kernel is queued on it.
fn whole_storage(t: &Tensor) -> Res<impl std::ops::Deref<Target = Storage> + '_> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("expected a whole contiguous tensor");
    }
    Ok(storage)
}

/// The CUDA slice of a storage from `whole_storage`.
fn cuda_slice<T: candle_core::cuda_backend::CudaDType>(s: &Storage) -> Res<&CudaSlice<T>> {
    let Storage::Cuda(s) = s else { candle_core::bail!("expected a CUDA tensor, found one on {:?}", s.device()) };
    s.as_cuda_slice::<T>()
}

/// NF4 → `dtype` on the device, into a fresh buffer from candle's stream-ordered pool.
pub fn dequantize_nf4(q: &Nf4OnDevice, dtype: DType, dev: &CudaDevice) -> Res<CudaStorage> {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        q: &Nf4OnDevice,
        dtype: DType,
        dev: &CudaDevice,
    ) -> Res<CudaStorage> {
        let n = q.numel();
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (n64, bs) = (n as u64, q.blocksize as u32);
        let packed = whole_storage(&q.packed)?;
        let packed = cuda_slice::<u8>(&packed)?;
        match &q.scales {
            DeviceScales::Plain(absmax) => {
                let absmax = whole_storage(absmax)?;
                let func =
                    dev.get_or_load_custom_func(&format!("nf4_dequant_plain_{}", suffix(dtype)?), MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(packed).arg(cuda_slice::<f32>(&absmax)?).arg(&n64).arg(&bs).arg(&out);
                // SAFETY: argument types match the kernel's signature in kernels/qls.cu.
                unsafe { b.launch(grid(n.div_ceil(2))) }.w()?;
            }
            DeviceScales::Double { codes, nested_absmax, nested_code, nested_blocksize, offset } => {
                let (codes, nested, table) =
                    (whole_storage(codes)?, whole_storage(nested_absmax)?, whole_storage(nested_code)?);
                let func =
                    dev.get_or_load_custom_func(&format!("nf4_dequant_double_{}", suffix(dtype)?), MODULE, PTX)?;
                let nb = *nested_blocksize as u32;
                let mut b = func.builder();
                b.arg(packed).arg(cuda_slice::<u8>(&codes)?).arg(cuda_slice::<f32>(&nested)?);
                b.arg(cuda_slice::<f32>(&table)?).arg(offset).arg(&nb).arg(&n64).arg(&bs).arg(&out);
                // SAFETY: argument types match the kernel's signature in kernels/qls.cu.
                unsafe { b.launch(grid(n.div_ceil(2))) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    match dtype {
        DType::F32 => run::<f32>(q, dtype, dev),
        DType::BF16 => run::<bf16>(q, dtype, dev),
        DType::F16 => run::<f16>(q, dtype, dev),
        other => candle_core::bail!("NF4 weights dequantize to f32, bf16 or f16, not {other:?}"),
    }
}

/// y = x ⊙ mask(key) · 1/(1-p), the mask drawn on the device from the module's key
/// (twin: lora::dropout_mul_cpu).
pub fn dropout_mul(x: &CudaStorage, layout: &Layout, key: u64, p: f32) -> Res<CudaStorage> {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        x: &CudaStorage,
        layout: &Layout,
        key: u64,
        p: f32,
    ) -> Res<CudaStorage> {
        let dev = &x.device;
        let src = contiguous::<T>(x, layout)?;
        let n = layout.shape().elem_count();
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(&format!("dropout_mul_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (n64, keep) = (n as u64, 1.0f32 / (1.0 - p));
        let mut b = func.builder();
        b.arg(&src).arg(&out).arg(&n64).arg(&key).arg(&p).arg(&keep);
        // SAFETY: argument types match the kernel's signature in kernels/qls.cu.
        unsafe { b.launch(grid(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, key, p),
        DType::BF16 => run::<bf16>(x, layout, key, p),
        DType::F16 => run::<f16>(x, layout, key, p),
        other => candle_core::bail!("dropout takes f32, bf16 or f16, not {other:?}"),
    }
}

/// The rows of a contiguous storage as a kernel reads them: (slice from the layout's start).
fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
) -> Res<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("our kernels take contiguous tensors")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn rows_launch(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// softmax(scores · scale + mask + ALiBi) by rows, f32 probabilities (twin: ops::MaskedSoftmax).
pub fn masked_softmax(
    x: &CudaStorage,
    layout: &Layout,
    mask: &crate::model::ops::ScoreMask,
    heads: usize,
    queries: usize,
) -> Res<CudaStorage> {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        x: &CudaStorage,
        layout: &Layout,
        mask: &crate::model::ops::ScoreMask,
        heads: usize,
        queries: usize,
    ) -> Res<CudaStorage> {
        let dev = &x.device;
        let keys = *layout.dims().last().unwrap_or(&1);
        let rows = layout.shape().elem_count() / keys.max(1);
        let input = contiguous::<T>(x, layout)?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<f32>(rows * keys)? };
        // without ALiBi the kernel reads no slope: any f32 buffer stands in
        let slopes = match &mask.slopes {
            Some(s) => dev.clone_htod(s.as_slice())?,
            None => dev.alloc_zeros::<f32>(1)?,
        };
        let func = dev.get_or_load_custom_func(&format!("masked_softmax_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (keys32, queries32, heads32) = (keys as u32, queries as u32, heads as u32);
        let (qs, ks, window) = (mask.query_start as u64, mask.key_start as u64, mask.window.unwrap_or(0) as u64);
        let (scale, has_slopes) = (mask.scale as f32, mask.slopes.is_some() as u32);
        let mut b = func.builder();
        b.arg(&input).arg(&out).arg(&keys32).arg(&queries32).arg(&heads32).arg(&qs).arg(&ks).arg(&window);
        b.arg(&scale).arg(&slopes).arg(&has_slopes);
        // SAFETY: argument types match the kernel's signature in kernels/qls.cu.
        unsafe { b.launch(rows_launch(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, layout, mask, heads, queries),
        DType::BF16 => run::<bf16>(x, layout, mask, heads, queries),
        DType::F16 => run::<f16>(x, layout, mask, heads, queries),
        other => candle_core::bail!("masked softmax takes f32, bf16 or f16, not {other:?}"),
    }
}

/// y · (g − Σ g·y) by rows, f32 (twin: ops::SoftmaxBwd).
pub fn softmax_backward(y: &CudaStorage, ly: &Layout, g: &CudaStorage, lg: &Layout) -> Res<CudaStorage> {
    let dev = &y.device;
    let n = *ly.dims().last().unwrap_or(&1);
    let rows = ly.shape().elem_count() / n.max(1);
    let (yv, gv) = (contiguous::<f32>(y, ly)?, contiguous::<f32>(g, lg)?);
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(rows * n)? };
    let func = dev.get_or_load_custom_func("softmax_backward_f32", MODULE, PTX)?;
    let n32 = n as u32;
    let mut b = func.builder();
    b.arg(&yv).arg(&gv).arg(&out).arg(&n32);
    // SAFETY: argument types match the kernel's signature in kernels/qls.cu.
    unsafe { b.launch(rows_launch(rows)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
