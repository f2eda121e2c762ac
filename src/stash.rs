//! Custom ops whose forward is computed with tensor ops outside the op, so that the graph
//! records only the op and what it chooses to keep (the attention op, the chunked loss, the
//! recomputed block). The op's `*_fwd` hands back a copy of the stashed result: candle builds
//! an op's output from the storage its forward returns, and cannot adopt an existing tensor.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, Layout, Shape, Storage, Tensor};

/// The result of an op's forward, computed before the op is applied.
#[derive(Default)]
pub struct Stash(Mutex<Option<Tensor>>);

impl Stash {
    pub fn new(result: Tensor) -> Self {
        Stash(Mutex::new(Some(result)))
    }

    /// Takes the stashed result: an op's forward runs once, and the result must not outlive it
    /// inside the op (the graph keeps the op until the backward).
    fn take(&self) -> candle_core::Result<Tensor> {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        taken.ok_or_else(|| candle_core::Error::Msg("a stashed op result was used twice".into()))
    }

    pub fn cpu_fwd(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((copy_out(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("stashed result on {:?}, op run on the CPU", t.device()),
        }
    }

    pub fn cuda_fwd(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((copy_out(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("stashed result on {:?}, op run on CUDA", t.device()),
        }
    }
}

/// A contiguous copy of the elements `layout` selects.
fn copy_out<S>(storage: &S, layout: &Layout) -> candle_core::Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new storage is written by copy_strided_src below.
    let mut dst = unsafe { storage.device().alloc_uninit(layout.shape(), storage.dtype())? };
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}
