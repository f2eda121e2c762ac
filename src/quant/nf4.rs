//! NF4 quantization and double quantization exactly as bitsandbytes 0.50.2 does it on the
//! CPU (docs/nf4.md has the algorithm, section by section; the § marks below point there).

use half::{bf16, f16};
use rayon::prelude::*;
use rayon::slice::ParallelSliceMut;

use crate::error::{Error, Result};

/// The 16 NF4 code values (§2), ascending; index 7 is exactly zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The default 4-bit block size, and the only one transformers writes.
pub const BLOCKSIZE: usize = 64;
/// Block size of the second-level quantization of absmax (§5.1).
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes' signed 8-bit dynamic map (§5.3). It depends on PyTorch's f32 arithmetic, so it
/// is embedded rather than recomputed.
#[rustfmt::skip]
pub const DYNAMIC_CODE: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.,
];

/// The dtype a weight had before quantization, which is also the dtype it dequantizes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    BF16,
    F16,
}

impl FloatType {
    /// The name bitsandbytes writes in the quant-state JSON (`torch.` prefix dropped).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::BF16 => "bfloat16",
            FloatType::F16 => "float16",
        }
    }

    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Some(FloatType::F32),
            "bfloat16" => Some(FloatType::BF16),
            "float16" | "half" => Some(FloatType::F16),
            _ => None,
        }
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            FloatType::F32 => candle_core::DType::F32,
            FloatType::BF16 => candle_core::DType::BF16,
            FloatType::F16 => candle_core::DType::F16,
        }
    }
}

/// The per-block scales: plain f32, or double-quantized to 8-bit codes (§5).
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

/// absmax quantized to 8 bits with the dynamic map, in blocks of 256, around `offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub nested_code: Vec<f32>,
    pub nested_blocksize: usize,
    pub offset: f32,
}

impl DoubleQuant {
    /// The f32 absmax of block `b` (§5.4): one multiply, then one add.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        self.nested_code[self.codes[b] as usize] * self.nested_absmax[b / self.nested_blocksize] + self.offset
    }
}

/// A weight stored as bitsandbytes stores it: packed 4-bit codes, even element in the high
/// nibble, plus per-block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    pub dtype: FloatType,
    pub blocksize: usize,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double(_))
    }

    /// Bytes this weight occupies: packed codes plus scales.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Double(dq) => dq.codes.len() + 4 * dq.nested_absmax.len() + 4 * dq.nested_code.len() + 4,
            }
    }

    /// The f32 scale of every block.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(dq) => (0..dq.codes.len()).map(|b| dq.absmax(b)).collect(),
        }
    }

    /// Checks that the parts agree with each other, so that dequantization cannot index out of
    /// bounds. Loaders call this on everything read from a file.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.numel();
        if !(32..=4096).contains(&self.blocksize) || !self.blocksize.is_power_of_two() {
            return Err(format!("blocksize {} is not a power of two in 32..=4096", self.blocksize));
        }
        if self.packed.len() != n.div_ceil(2) {
            return Err(format!(
                "{} packed bytes for shape {:?} ({} elements need {})",
                self.packed.len(),
                self.shape,
                n,
                n.div_ceil(2)
            ));
        }
        let n_blocks = self.n_blocks();
        match &self.absmax {
            Absmax::Plain(a) if a.len() != n_blocks => {
                Err(format!("{} absmax values for {} blocks of {}", a.len(), n_blocks, self.blocksize))
            }
            Absmax::Double(dq) => {
                if dq.codes.len() != n_blocks {
                    return Err(format!(
                        "{} absmax codes for {} blocks of {}",
                        dq.codes.len(),
                        n_blocks,
                        self.blocksize
                    ));
                }
                if dq.nested_blocksize == 0 || dq.nested_absmax.len() != n_blocks.div_ceil(dq.nested_blocksize) {
                    return Err(format!(
                        "{} nested absmax values for {} blocks in nested blocks of {}",
                        dq.nested_absmax.len(),
                        n_blocks,
                        dq.nested_blocksize
                    ));
                }
                if dq.nested_code.len() != 256 {
                    return Err(format!("nested code table has {} entries, expected 256", dq.nested_code.len()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Dequantize to f32 (§4, §5.4).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_f32_into(&mut out);
        out
    }

    /// `dequantize_f32` into `out`: sixteen codes at a time where the CPU has AVX-512 (the same
    /// bits: the same f32 products), else element by element. A QLoRA step in f32 dequantizes
    /// every frozen weight in its forward and again in its backward.
    pub fn dequantize_f32_into(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.blocksize.is_multiple_of(32) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked above; a full block reads bs / 2 bytes.
            self.for_each_block(out, |bytes, scale, block| unsafe { dequant_block_f32(bytes, scale, block) });
            return;
        }
        self.dequantize_into(out, |v| v);
    }

    /// Dequantize to bf16, the f32 product rounded once to nearest even.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; self.numel()];
        self.dequantize_bf16_into(&mut out);
        out
    }

    /// `dequantize_bf16` into `out`: sixteen codes at a time with AVX512-BF16's rounding where
    /// the CPU has it (the same bits: both round the same f32 product to nearest even, and NF4
    /// products of real scales are never subnormal), else element by element.
    pub fn dequantize_bf16_into(&self, out: &mut [bf16]) {
        #[cfg(target_arch = "x86_64")]
        if self.blocksize.is_multiple_of(32) && crate::quant::bf16_matmul::has_bf16_dot() {
            // SAFETY: AVX-512F and AVX512-BF16 checked above; a full block reads bs / 2 bytes.
            self.for_each_block(out, |bytes, scale, block| unsafe { dequant_block_bf16(bytes, scale, block) });
            return;
        }
        self.dequantize_into(out, bf16::from_f32);
    }

    pub fn dequantize_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.numel()];
        self.dequantize_into(&mut out, f16::from_f32);
        out
    }

    /// Dequantize into `out` (numel elements), converting each f32 product with `convert`.
    /// Blocks are independent, so chunks of blocks run in parallel.
    pub fn dequantize_into<T: Copy + Send>(&self, out: &mut [T], convert: impl Fn(f32) -> T + Sync) {
        // Each byte holds two codes; look both up at once.
        let pairs: [[f32; 2]; 256] = std::array::from_fn(|byte| [NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0f]]);
        self.for_each_block(out, |bytes, scale, block| {
            let last_byte = bytes.get(block.len() / 2).copied();
            let mut pairs_out = block.chunks_exact_mut(2);
            for (o, &byte) in (&mut pairs_out).zip(bytes) {
                let [hi, lo] = pairs[byte as usize];
                o[0] = convert(hi * scale);
                o[1] = convert(lo * scale);
            }
            // odd element count: the last element is the high nibble of the last byte
            if let ([last], Some(byte)) = (pairs_out.into_remainder(), last_byte) {
                *last = convert(pairs[byte as usize][0] * scale);
            }
        });
    }

    /// Runs `f(codes from the block's first byte on, scale, the block's outputs)` for every
    /// block of `out` (numel elements); chunks of blocks run in parallel, as blocks are
    /// independent.
    fn for_each_block<T: Send>(&self, out: &mut [T], f: impl Fn(&[u8], f32, &mut [T]) + Sync) {
        assert_eq!(out.len(), self.numel(), "output length must equal the element count");
        let bs = self.blocksize;
        const BLOCKS_PER_TASK: usize = 256;
        out.par_chunks_mut(bs * BLOCKS_PER_TASK).enumerate().for_each(|(task, chunk)| {
            for (j, block) in chunk.chunks_mut(bs).enumerate() {
                let b = task * BLOCKS_PER_TASK + j;
                let scale = match &self.absmax {
                    Absmax::Plain(a) => a[b],
                    Absmax::Double(dq) => dq.absmax(b),
                };
                // bs is even, so a block starts on a byte boundary.
                f(&self.packed[b * bs / 2..], scale, block);
            }
        });
    }
}

/// Sixteen bytes of codes (32 values) as f32: the high nibbles (the even elements) and the low
/// nibbles (the odd ones), each looked up in the code table and scaled.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn decode_32(bytes: *const u8, scale: f32) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::{
        _mm512_and_si512, _mm512_cvtepu8_epi32, _mm512_loadu_ps, _mm512_mul_ps, _mm512_permutexvar_ps,
        _mm512_set1_epi32, _mm512_set1_ps, _mm512_srli_epi32, _mm_loadu_si128,
    };
    let table = _mm512_loadu_ps(NF4_CODE.as_ptr());
    let scale = _mm512_set1_ps(scale);
    let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes as *const _));
    let even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), scale);
    let odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(15)), table), scale);
    (even, odd)
}

/// The elements of a block past its last full 32, element by element.
fn dequant_tail<T>(bytes: &[u8], scale: f32, block: &mut [T], from: usize, convert: impl Fn(f32) -> T) {
    for (e, out) in block.iter_mut().enumerate().skip(from) {
        let byte = bytes[e / 2];
        let code = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
        *out = convert(NF4_CODE[code as usize] * scale);
    }
}

/// One block of codes to bf16: a full block 32 codes at a time, a short last block by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dequant_block_bf16(bytes: &[u8], scale: f32, block: &mut [bf16]) {
    use std::arch::x86_64::_mm512_storeu_si512;
    let full = block.len() / 32;
    for i in 0..full {
        let (even, odd) = decode_32(bytes.as_ptr().add(16 * i), scale);
        let pairs = crate::quant::bf16_matmul::bf16_pairs(even, odd);
        _mm512_storeu_si512(block.as_mut_ptr().add(32 * i) as *mut _, pairs);
    }
    dequant_tail(bytes, scale, block, full * 32, bf16::from_f32);
}

/// One block of codes to f32: a full block 32 codes at a time, even and odd elements
/// interleaved back, a short last block by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_block_f32(bytes: &[u8], scale: f32, block: &mut [f32]) {
    use std::arch::x86_64::{_mm512_permutex2var_ps, _mm512_setr_epi32, _mm512_storeu_ps};
    // element 2j of a half is even[j], 2j + 1 is odd[j]
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let full = block.len() / 32;
    for i in 0..full {
        let (even, odd) = decode_32(bytes.as_ptr().add(16 * i), scale);
        _mm512_storeu_ps(block.as_mut_ptr().add(32 * i), _mm512_permutex2var_ps(even, first, odd));
        _mm512_storeu_ps(block.as_mut_ptr().add(32 * i + 16), _mm512_permutex2var_ps(even, second, odd));
    }
    dequant_tail(bytes, scale, block, full * 32, |v| v);
}

/// Quantization thresholds m_i = (c_i + c_{i+1}) / 2 computed in f32 (§2).
fn thresholds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The code of a scaled value: the first i with s <= m_i, else 15 (ties go to the lower code).
#[inline]
fn nf4_code(s: f32, m: &[f32; 15]) -> u8 {
    // Branch-free count of thresholds strictly below s equals the first i with s <= m_i.
    let mut q = 0u8;
    for &t in m {
        q += (s > t) as u8;
    }
    q
}

/// Quantize `values` (a tensor of `shape`, row-major) to NF4 with the given block size, with
/// or without double quantization of the scales (§3, §5).
pub fn quantize(
    values: &[f32],
    shape: &[usize],
    dtype: FloatType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let n: usize = shape.iter().product();
    if values.len() != n {
        return Err(Error::Invalid(format!("{} values for shape {:?}", values.len(), shape)));
    }
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::Invalid(format!("NF4 block size {blocksize} is not a power of two in 32..=4096")));
    }
    let (packed, absmax) = quantize_blocks(values, blocksize);
    let absmax = if double_quant {
        let offset = absmax_offset(&absmax);
        Absmax::Double(double_quantize(&absmax, offset))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor { shape: shape.to_vec(), dtype, blocksize, packed, absmax })
}

/// Quantize bf16 values: each converts to f32 exactly, then as `quantize`.
pub fn quantize_bf16(values: &[bf16], shape: &[usize], blocksize: usize, double_quant: bool) -> Result<Nf4Tensor> {
    let wide: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
    quantize(&wide, shape, FloatType::BF16, blocksize, double_quant)
}

/// Packed codes and f32 absmax per block (§3 steps 1-7).
fn quantize_blocks(values: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    let m = thresholds();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    const BLOCKS_PER_TASK: usize = 64;
    packed.par_chunks_mut(bs / 2 * BLOCKS_PER_TASK).zip(absmax.par_chunks_mut(BLOCKS_PER_TASK)).enumerate().for_each(
        |(task, (packed, absmax))| {
            for (j, (out, amax)) in packed.chunks_mut(bs / 2).zip(absmax.iter_mut()).enumerate() {
                let start = (task * BLOCKS_PER_TASK + j) * bs;
                let block = &values[start..(start + bs).min(n)];
                let a = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
                *amax = a;
                let r = 1.0 / a.max(1e-38);
                let code = |v: f32| nf4_code((v * r).clamp(-1.0, 1.0), &m);
                for (k, o) in out.iter_mut().enumerate() {
                    let hi = code(block[2 * k]);
                    // an odd element count pads with s = 0, code 7
                    let lo = block.get(2 * k + 1).map_or(7, |&v| code(v));
                    *o = (hi << 4) | lo;
                }
            }
        },
    );
    (packed, absmax)
}

/// The double-quantization offset (§5.2): mean of absmax accumulated in f64, rounded to f32,
/// divided in f32. bitsandbytes' own value (torch.mean) can differ by one ulp; readers of a
/// checkpoint always use the stored offset.
pub fn absmax_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    (sum as f32) / absmax.len() as f32
}

/// Quantize absmax − offset to 8 bits with the dynamic map in blocks of 256 (§5.1), with
/// bitsandbytes' 65,536-entry lookup-table rounding.
pub fn double_quantize(absmax: &[f32], offset: f32) -> DoubleQuant {
    let lut = dynamic_map_lut();
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centered.chunks(NESTED_BLOCKSIZE) {
        let amax = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        nested_absmax.push(amax);
        if amax == 0.0 {
            // bitsandbytes gives code 0 for an all-zero nested block
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let r = 1.0 / amax;
        for &a in block {
            let v = (a * r).clamp(-1.0, 1.0);
            let k = (((v + 1.0) * 0.5) * 65535.0 + 0.5) as usize; // truncation, as the C++ cast
            codes.push(lut[k.min(65535)]);
        }
    }
    DoubleQuant { codes, nested_absmax, nested_code: DYNAMIC_CODE.to_vec(), nested_blocksize: NESTED_BLOCKSIZE, offset }
}

/// LUT[k] = number of dynamic-map midpoints strictly below the grid value g_k = -1 + 2k/65535.
fn dynamic_map_lut() -> &'static [u8; 65536] {
    static LUT: std::sync::OnceLock<Box<[u8; 65536]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mids: Vec<f32> = (0..255).map(|j| 0.5 * (DYNAMIC_CODE[j] + DYNAMIC_CODE[j + 1])).collect();
        let mut lut = Box::new([0u8; 65536]);
        let mut below = 0usize;
        for (k, slot) in lut.iter_mut().enumerate() {
            let g = -1.0f32 + (2.0 * k as f32) / 65535.0;
            while below < mids.len() && mids[below] < g {
                below += 1;
            }
            *slot = below as u8;
        }
        lut
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_table_bits_match_the_documented_values() {
        let bits: Vec<u32> = NF4_CODE.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits[1], 0xbf3239b1);
        assert_eq!(bits[6], 0xbdba7871);
        assert_eq!(bits[8], 0x3da2faff);
        assert_eq!(bits[14], 0x3f3913b3);
        assert_eq!(DYNAMIC_CODE[127], 0.0);
        assert_eq!(DYNAMIC_CODE[255], 1.0);
        let m = thresholds();
        assert_eq!(m[0], -0.848_096_4);
        assert_eq!(m[14], 0.861_478_45);
    }

    #[test]
    fn value_exactly_on_a_threshold_goes_to_the_lower_code() {
        let m = thresholds();
        for (i, &t) in m.iter().enumerate() {
            assert_eq!(nf4_code(t, &m) as usize, i, "threshold {i}");
            assert_eq!(nf4_code(f32::from_bits(t.to_bits()) + 1e-7, &m) as usize, i + 1);
        }
        assert_eq!(nf4_code(-1.0, &m), 0);
        assert_eq!(nf4_code(1.0, &m), 15);
        assert_eq!(nf4_code(0.0, &m), 7);
    }

    #[test]
    fn an_all_zero_block_gives_code_seven_and_zero_absmax() {
        let mut values = vec![0.5f32; 128];
        values[64..].fill(0.0);
        let q = quantize(&values, &[2, 64], FloatType::F32, 64, false).unwrap();
        assert_eq!(q.absmax, Absmax::Plain(vec![0.5, 0.0]));
        assert!(q.packed[32..].iter().all(|&b| b == 0x77));
        assert!(q.dequantize_f32()[64..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn vectorized_f32_dequantization_gives_the_scalar_bits() {
        let values: Vec<f32> = (0..64 * 7 + 5).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for double_quant in [false, true] {
            let q = quantize(&values, &[values.len()], FloatType::F32, 64, double_quant).unwrap();
            let mut scalar = vec![0f32; q.numel()];
            q.dequantize_into(&mut scalar, |v| v);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&q.dequantize_f32()), bits(&scalar));
        }
    }

    #[test]
    fn partial_last_block_and_odd_count() {
        // 67 elements: one full block, one block of 3, and a padding nibble
        let values: Vec<f32> = (0..67).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let q = quantize(&values, &[67], FloatType::F32, 64, false).unwrap();
        assert_eq!(q.packed.len(), 34);
        assert_eq!(q.n_blocks(), 2);
        let Absmax::Plain(a) = &q.absmax else { unreachable!() };
        assert_eq!(a[1], 36.0 / 7.0); // max |x| over elements 64..67
        assert_eq!(q.packed[33] & 0x0f, 7, "padding nibble is code 7");
        // the three values of the last block are the largest of their block: each is at
        // most absmax, the last one equal to it, so it decodes exactly
        let d = q.dequantize_f32();
        assert_eq!(d.len(), 67);
        assert_eq!(d[66], 36.0 / 7.0);
        q.validate().unwrap();
    }

    #[test]
    fn double_quant_round_trip_is_close_to_plain() {
        let values: Vec<f32> =
            (0..64 * 600).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 64) as f32 * 0.01)).collect();
        let plain = quantize(&values, &[600, 64], FloatType::F32, 64, false).unwrap();
        let dq = quantize(&values, &[600, 64], FloatType::F32, 64, true).unwrap();
        assert_eq!(plain.packed, dq.packed, "double quantization leaves the codes alone");
        let (a, b) = (plain.absmax_f32(), dq.absmax_f32());
        // 8-bit dynamic codes: the error is a small fraction of the largest centred scale
        let spread = a.iter().fold(0f32, |m, v| m.max(*v));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 0.01 * spread, "{x} vs {y}");
        }
        dq.validate().unwrap();
        assert!(dq.storage_bytes() < plain.storage_bytes());
    }

    #[test]
    fn validate_rejects_mismatched_parts() {
        let mut q = quantize(&[1.0; 128], &[2, 64], FloatType::F32, 64, false).unwrap();
        q.packed.pop();
        assert!(q.validate().unwrap_err().contains("packed bytes"));
    }
}
