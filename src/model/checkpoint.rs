//! A Hugging Face checkpoint folder: model.safetensors, or shards listed in
//! model.safetensors.index.json, read by key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::decoder::BaseWeights;
use crate::quant::{bnb, nf4, FloatType, FrozenWeight};
use crate::weights::SafetensorsFile;

/// Where the decoder's weights come from: a checkpoint on disk, or generated ones for
/// benchmarks and tests.
pub trait WeightSource {
    fn contains(&self, key: &str) -> bool;

    /// A float tensor in `dtype`, with its shape checked against `shape`.
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// The frozen weight of the linear at `prefix`: NF4 as stored in a bitsandbytes
    /// checkpoint, else dense, quantized here when `base` asks for NF4.
    fn linear_weight(
        &self,
        prefix: &str,
        shape: [usize; 2],
        base: BaseWeights,
        device: &Device,
    ) -> Result<FrozenWeight>;
}

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// key → index into `files`
    index: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_entry(&index_path, "weight_map", format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad_entry(&index_path, "weight_map", "missing or not an object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(Error::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json; choose a folder with safetensors weights",
                dir.display()
            )));
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            let file = SafetensorsFile::open(dir.join(&name))?;
            for key in file.keys() {
                index.insert(key, files.len());
            }
            files.push(file);
        }
        Ok(Self { dir: dir.to_path_buf(), files, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.index.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The file that holds `key`; the error names the folder and the key.
    pub fn file_of(&self, key: &str) -> Result<&SafetensorsFile> {
        self.index.get(key).map(|&i| &self.files[i]).ok_or_else(|| {
            Error::bad_entry(&self.dir, key, "weight not found in the checkpoint (is this the right model folder?)")
        })
    }
}

impl WeightSource for Checkpoint {
    fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let file = self.file_of(key)?;
        let t = file.tensor(key, device)?;
        file.release(key);
        if t.dims() != shape {
            return Err(file.error(key, format!("shape {:?}, expected {:?} from config.json", t.dims(), shape)));
        }
        Ok(t.to_dtype(dtype)?)
    }

    fn linear_weight(
        &self,
        prefix: &str,
        shape: [usize; 2],
        base: BaseWeights,
        device: &Device,
    ) -> Result<FrozenWeight> {
        let weight_key = format!("{prefix}.weight");
        let file = self.file_of(&weight_key)?;
        let wrong_shape =
            |got: &[usize]| file.error(&weight_key, format!("shape {got:?}, expected {shape:?} from config.json"));
        if bnb::is_4bit(file, prefix) {
            let q = bnb::load_nf4(file, prefix)?;
            if q.shape != shape {
                return Err(wrong_shape(&q.shape));
            }
            return Ok(FrozenWeight::nf4(q, device)?);
        }
        match base {
            BaseWeights::Dense(dtype) => Ok(FrozenWeight::Dense(self.tensor(&weight_key, &shape, dtype, device)?)),
            BaseWeights::Nf4 { double_quant, .. } => {
                // Quantized tensor by tensor: loading never holds more than one dense weight.
                let stored = match file.get(&weight_key)?.dtype() {
                    safetensors::Dtype::BF16 => FloatType::BF16,
                    safetensors::Dtype::F16 => FloatType::F16,
                    _ => FloatType::F32,
                };
                let (values, got) = file.f32_values(&weight_key)?;
                file.release(&weight_key);
                if got != shape {
                    return Err(wrong_shape(&got));
                }
                let q = nf4::quantize(&values, &shape, stored, nf4::BLOCKSIZE, double_quant)?;
                Ok(FrozenWeight::nf4(q, device)?)
            }
        }
    }
}
