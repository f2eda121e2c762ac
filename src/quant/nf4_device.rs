//! NF4 weights resident on the compute device: the packed codes and the scales (plain, or the
//! double-quantized codes with their nested scales) uploaded once at load, and dequantized there
//! on every use into a buffer that lives only for the one matmul, as bitsandbytes does.
//!
//! This is what a GPU run holds. The same representation works on the CPU device, where the
//! dequantization runs the same arithmetic in Rust, so the tests exercise the GPU's code path
//! and check it against the host form bit for bit.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use super::nf4::{Absmax, Nf4Tensor, NF4_CODE};

/// The per-block scales as device tensors.
#[derive(Clone, Debug)]
pub enum DeviceScales {
    /// f32 [blocks]
    Plain(Tensor),
    /// u8 codes [blocks] into `nested_code` (f32 [256]), times `nested_absmax` (f32 [blocks /
    /// nested_blocksize]), plus `offset`.
    Double { codes: Tensor, nested_absmax: Tensor, nested_code: Tensor, nested_blocksize: usize, offset: f32 },
}

/// A 2-D NF4 weight whose parts live on one device.
#[derive(Clone, Debug)]
pub struct Nf4OnDevice {
    /// (out, in)
    pub shape: (usize, usize),
    pub blocksize: usize,
    /// u8 [ceil(numel / 2)], the even element in the high nibble.
    pub packed: Tensor,
    pub scales: DeviceScales,
}

impl Nf4OnDevice {
    /// Uploads a validated host NF4 tensor (one copy per part, once).
    pub fn upload(q: &Nf4Tensor, device: &Device) -> candle_core::Result<Self> {
        let &[out_f, in_f] = q.shape.as_slice() else {
            candle_core::bail!("an NF4 linear weight must be 2-D, got shape {:?}", q.shape);
        };
        let bytes = |v: &[u8]| Tensor::from_slice(v, v.len(), device);
        let floats = |v: &[f32]| Tensor::from_slice(v, v.len(), device);
        let scales = match &q.absmax {
            Absmax::Plain(a) => DeviceScales::Plain(floats(a)?),
            Absmax::Double(dq) => DeviceScales::Double {
                codes: bytes(&dq.codes)?,
                nested_absmax: floats(&dq.nested_absmax)?,
                nested_code: floats(&dq.nested_code)?,
                nested_blocksize: dq.nested_blocksize,
                offset: dq.offset,
            },
        };
        Ok(Self { shape: (out_f, in_f), blocksize: q.blocksize, packed: bytes(&q.packed)?, scales })
    }

    pub fn numel(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// Device bytes held: codes plus scales.
    pub fn storage_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        size(&self.packed)
            + match &self.scales {
                DeviceScales::Plain(a) => size(a),
                DeviceScales::Double { codes, nested_absmax, nested_code, .. } => {
                    size(codes) + size(nested_absmax) + size(nested_code) + 4
                }
            }
    }

    /// The dense weight [out, in] in `dtype` (f32, bf16 or f16) on this device, outside any
    /// graph: the same bits as `Nf4Tensor::dequantize_*` and bitsandbytes.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let device = self.packed.device().clone();
        let storage = match &device {
            Device::Cpu => Storage::Cpu(self.dequantize_cpu(dtype)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => Storage::Cuda(crate::cuda::dequantize_nf4(self, dtype, dev)?),
            other => candle_core::bail!("NF4 weights cannot be dequantized on {other:?}"),
        };
        Ok(Tensor::from_storage(storage, self.shape, candle_core::op::BackpropOp::none(), false))
    }

    /// The CPU twin of the kernel (kernels/qls.cu, nf4_dequant): one byte, two elements.
    pub fn dequantize_cpu(&self, dtype: DType) -> candle_core::Result<CpuStorage> {
        let packed = cpu_slice::<u8>(&self.packed)?;
        let scale: Box<dyn Fn(usize) -> f32 + Sync> = match &self.scales {
            DeviceScales::Plain(a) => {
                let a = cpu_slice::<f32>(a)?;
                Box::new(move |b| a[b])
            }
            DeviceScales::Double { codes, nested_absmax, nested_code, nested_blocksize, offset } => {
                let (codes, nested, table) =
                    (cpu_slice::<u8>(codes)?, cpu_slice::<f32>(nested_absmax)?, cpu_slice::<f32>(nested_code)?);
                let (nb, offset) = (*nested_blocksize, *offset);
                Box::new(move |b| table[codes[b] as usize] * nested[b / nb] + offset)
            }
        };
        let n = self.numel();
        let bs = self.blocksize;
        fn fill<T: Copy + Default>(
            n: usize,
            bs: usize,
            packed: &[u8],
            scale: &dyn Fn(usize) -> f32,
            f: impl Fn(f32) -> T,
        ) -> Vec<T> {
            let mut out = vec![T::default(); n];
            for (i, &byte) in packed.iter().enumerate() {
                let e = 2 * i;
                let s = scale(e / bs);
                out[e] = f(NF4_CODE[(byte >> 4) as usize] * s);
                if e + 1 < n {
                    out[e + 1] = f(NF4_CODE[(byte & 0x0f) as usize] * s);
                }
            }
            out
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(fill(n, bs, &packed, &*scale, |v| v)),
            DType::BF16 => CpuStorage::BF16(fill(n, bs, &packed, &*scale, half::bf16::from_f32)),
            DType::F16 => CpuStorage::F16(fill(n, bs, &packed, &*scale, half::f16::from_f32)),
            other => candle_core::bail!("NF4 weights dequantize to f32, bf16 or f16, not {other:?}"),
        })
    }
}

/// A contiguous CPU tensor's elements (a copy: these are small or read once per call).
fn cpu_slice<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::{quantize, FloatType};

    #[test]
    fn device_form_dequantizes_to_the_same_bits_as_the_host_form() {
        let values: Vec<f32> = (0..7 * 9 + 40 * 24).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        for double in [false, true] {
            for (out_f, in_f) in [(40, 24), (7, 9)] {
                let q = quantize(&values[..out_f * in_f], &[out_f, in_f], FloatType::F32, 64, double).unwrap();
                let d = Nf4OnDevice::upload(&q, &Device::Cpu).unwrap();
                let bits32 = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                let got = d.dequantize(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(bits32(got), bits32(q.dequantize_f32()));
                let got = d.dequantize(DType::BF16).unwrap().flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                assert_eq!(got, q.dequantize_bf16());
                let got = d.dequantize(DType::F16).unwrap().flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
                assert_eq!(got, q.dequantize_f16());
                assert_eq!(d.storage_bytes(), q.storage_bytes());
            }
        }
    }

    /// The kernel's code table is the one the CPU uses, bit for bit.
    #[test]
    fn kernel_code_table_is_the_cpu_table() {
        let source = include_str!("../../kernels/qls.cu");
        let table =
            source.split("NF4_CODE[16] = {").nth(1).and_then(|s| s.split('}').next()).expect("NF4_CODE in qls.cu");
        let values: Vec<f32> = table.split(',').map(|v| v.trim().trim_end_matches('f').parse().unwrap()).collect();
        assert_eq!(values.len(), 16);
        for (k, c) in values.iter().zip(NF4_CODE) {
            assert_eq!(k.to_bits(), c.to_bits(), "{k} vs {c}");
        }
    }
}
