//! Memory-mapped safetensors files whose errors name the file and the key.
//!
//! Both the model loader and the NF4 loader read tensors by name out of checkpoints a user
//! picked; a truncated download or a tensor of the wrong shape must come back as a message
//! that says which file and which key, never as a panic.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the mapping is read-only; a file changed under us while mapped can only
        // give wrong values, which the shape checks below and the caller's checks report.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|cause| Error::Safetensors { path: path.clone(), cause })?;
        Ok(Self { path, mmap, header_len, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        self.metadata.info(key).is_some()
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.metadata.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    pub fn get(&self, key: &str) -> Result<TensorView<'_>> {
        let info =
            self.metadata.info(key).ok_or_else(|| Error::bad_entry(&self.path, key, "tensor not found in the file"))?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let data = self
            .mmap
            .get(start..end)
            .ok_or_else(|| Error::bad_entry(&self.path, key, "data lies past the end of the file (truncated?)"))?;
        TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| Error::bad_entry(&self.path, key, format!("inconsistent tensor: {e}")))
    }

    /// Drop the pages of `key`'s data from this process's resident set once it has been
    /// copied or quantized, so that loading a model holds the loaded model plus one tensor,
    /// not the whole file. The data stays readable: the kernel reads it again if needed.
    pub fn release(&self, key: &str) {
        let Some(info) = self.metadata.info(key) else { return };
        let page = 4096;
        let start = (8 + self.header_len + info.data_offsets.0).div_ceil(page) * page;
        let end = (8 + self.header_len + info.data_offsets.1) / page * page;
        if end > start {
            // SAFETY: the mapping is a read-only, file-backed one: MADV_DONTNEED only drops
            // clean pages, which fault back in from the file with the same contents.
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::bad_entry(&self.path, key, message)
    }

    /// The raw bytes of a tensor stored as U8 (or any dtype, reinterpreted as bytes, as
    /// bitsandbytes does with a non-uint8 `quant_storage`).
    pub fn bytes(&self, key: &str) -> Result<&[u8]> {
        Ok(self.get(key)?.data())
    }

    /// A float tensor (F32, BF16 or F16) widened to f32, with its shape.
    pub fn f32_values(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let view = self.get(key)?;
        let values = bytes_to_f32(view.dtype(), view.data())
            .ok_or_else(|| self.error(key, format!("expected a float tensor, found {:?}", view.dtype())))?;
        Ok((values, view.shape().to_vec()))
    }

    /// The tensor as a candle tensor on `device`, in its stored dtype.
    pub fn tensor(&self, key: &str, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        let view = self.get(key)?;
        candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| self.error(key, format!("cannot load tensor: {e}")))
    }
}

/// Little-endian float data to f32; `None` for non-float dtypes.
pub fn bytes_to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    };
    Some(out)
}

/// One tensor to write into a safetensors file.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Write tensors to `path` through a temporary file and a rename, so that an interrupted
/// write never leaves a half-written checkpoint under the final name.
pub fn write_safetensors(path: &std::path::Path, tensors: &[RawTensor]) -> Result<()> {
    let data = safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), None)
        .map_err(|cause| Error::Safetensors { path: path.to_path_buf(), cause })?;
    write_atomic(path, &data)
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
