//! NF4 against bitsandbytes 0.50.2 (fixtures/nf4): bit for bit, for every case its meta.json lists.

mod common;

use common::{bits, fixture, offset_ulps_allowed};
use half::bf16;
use qlora_studio::quant::nf4::{self, absmax_offset, double_quantize, DYNAMIC_CODE};
use qlora_studio::quant::{Absmax, DoubleQuant, FloatType, Nf4Tensor, NF4_CODE};
use qlora_studio::weights::SafetensorsFile;
use safetensors::tensor::Dtype;

struct Case {
    name: String,
    shape: Vec<usize>,
    dtype: FloatType,
    blocksize: usize,
    nested_blocksize: usize,
}

/// The cases nf4/meta.json lists (name, shape, dtype, block sizes); there must be some.
fn cases() -> Vec<Case> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("nf4/meta.json")).unwrap()).unwrap();
    let n = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let cases: Vec<Case> = meta["cases"]
        .as_array()
        .expect("nf4/meta.json lists its cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            shape: c["shape"].as_array().unwrap().iter().map(n).collect(),
            dtype: match c["dtype"].as_str().unwrap() {
                "float32" => FloatType::F32,
                "bfloat16" => FloatType::BF16,
                "float16" => FloatType::F16,
                other => panic!("nf4/meta.json: dtype {other}"),
            },
            blocksize: n(&c["blocksize"]),
            nested_blocksize: n(&c["nested_blocksize"]),
        })
        .collect();
    assert!(!cases.is_empty(), "nf4/meta.json lists no cases");
    cases
}

fn open() -> SafetensorsFile {
    SafetensorsFile::open(fixture("nf4/nf4_cases.safetensors")).unwrap()
}

fn f32s(f: &SafetensorsFile, key: &str) -> Vec<f32> {
    f.f32_values(key).unwrap().0
}

/// The reference dequantization as raw bits of its stored dtype.
fn stored_bits(f: &SafetensorsFile, key: &str) -> Vec<u32> {
    let v = f.get(key).unwrap();
    match v.dtype() {
        Dtype::F32 => v.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => v.data().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        other => panic!("{key}: unexpected dtype {other:?}"),
    }
}

fn our_bits(t: &Nf4Tensor) -> Vec<u32> {
    match t.dtype {
        FloatType::F32 => bits(&t.dequantize_f32()),
        FloatType::BF16 => t.dequantize_bf16().iter().map(|v| v.to_bits() as u32).collect(),
        FloatType::F16 => t.dequantize_f16().iter().map(|v| v.to_bits() as u32).collect(),
    }
}

fn quantize_case(f: &SafetensorsFile, c: &Case, double: bool) -> Nf4Tensor {
    let key = format!("{}.weight", c.name);
    match c.dtype {
        FloatType::BF16 => {
            let view = f.get(&key).unwrap();
            assert_eq!(view.dtype(), Dtype::BF16);
            let values: Vec<bf16> = view.data().chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
            nf4::quantize_bf16(&values, &c.shape, c.blocksize, double).unwrap()
        }
        _ => nf4::quantize(&f32s(f, &key), &c.shape, c.dtype, c.blocksize, double).unwrap(),
    }
}

#[test]
fn code_tables_equal_the_fixtures() {
    let f = open();
    for c in &cases() {
        assert_eq!(bits(&f32s(&f, &format!("{}.plain.code", c.name))), bits(&NF4_CODE), "{}", c.name);
        assert_eq!(bits(&f32s(&f, &format!("{}.dq.nested_code", c.name))), bits(&DYNAMIC_CODE), "{}", c.name);
    }
}

#[test]
fn plain_quantization_is_bit_exact() {
    let f = open();
    for c in &cases() {
        let q = quantize_case(&f, c, false);
        assert_eq!(q.packed, f.bytes(&format!("{}.plain.packed", c.name)).unwrap(), "{} packed", c.name);
        let Absmax::Plain(a) = &q.absmax else { panic!() };
        assert_eq!(bits(a), bits(&f32s(&f, &format!("{}.plain.absmax", c.name))), "{} absmax", c.name);
        assert_eq!(our_bits(&q), stored_bits(&f, &format!("{}.plain.dequant", c.name)), "{} dequant", c.name);
    }
}

#[test]
fn dequantizing_bitsandbytes_bytes_is_bit_exact() {
    let f = open();
    for c in &cases() {
        // plain: bitsandbytes' own bytes and absmax
        let plain = Nf4Tensor {
            shape: c.shape.clone(),
            dtype: c.dtype,
            blocksize: c.blocksize,
            packed: f.bytes(&format!("{}.plain.packed", c.name)).unwrap().to_vec(),
            absmax: Absmax::Plain(f32s(&f, &format!("{}.plain.absmax", c.name))),
        };
        plain.validate().unwrap();
        assert_eq!(our_bits(&plain), stored_bits(&f, &format!("{}.plain.dequant", c.name)), "{}", c.name);
        // double quantized: bitsandbytes' codes, nested absmax and offset
        let dq = Nf4Tensor {
            absmax: Absmax::Double(DoubleQuant {
                codes: f.bytes(&format!("{}.dq.absmax", c.name)).unwrap().to_vec(),
                nested_absmax: f32s(&f, &format!("{}.dq.nested_absmax", c.name)),
                nested_code: f32s(&f, &format!("{}.dq.nested_code", c.name)),
                nested_blocksize: c.nested_blocksize,
                offset: f32s(&f, &format!("{}.dq.offset", c.name))[0],
            }),
            packed: f.bytes(&format!("{}.dq.packed", c.name)).unwrap().to_vec(),
            ..plain
        };
        dq.validate().unwrap();
        assert_eq!(our_bits(&dq), stored_bits(&f, &format!("{}.dq.dequant", c.name)), "{} dq", c.name);
    }
}

#[test]
fn double_quantization_is_bit_exact_given_the_offset() {
    let f = open();
    for c in &cases() {
        let plain = quantize_case(&f, c, false);
        let Absmax::Plain(absmax) = &plain.absmax else { panic!() };
        let reference_offset = f32s(&f, &format!("{}.dq.offset", c.name))[0];
        // our own offset: within the rounding of torch.mean's f32 sum
        let ours = absmax_offset(absmax);
        let ulps = (ours.to_bits() as i64 - reference_offset.to_bits() as i64).abs();
        let allowed = offset_ulps_allowed(absmax.len());
        assert!(ulps <= allowed, "{}: offset {ours} vs {reference_offset} ({ulps} ulps > {allowed})", c.name);

        let dq = double_quantize(absmax, reference_offset);
        assert_eq!(dq.codes, f.bytes(&format!("{}.dq.absmax", c.name)).unwrap(), "{} codes", c.name);
        assert_eq!(
            bits(&dq.nested_absmax),
            bits(&f32s(&f, &format!("{}.dq.nested_absmax", c.name))),
            "{} nested absmax",
            c.name
        );
        let full = Nf4Tensor { absmax: Absmax::Double(dq), ..plain.clone() };
        assert_eq!(our_bits(&full), stored_bits(&f, &format!("{}.dq.dequant", c.name)), "{} dq dequant", c.name);

        // the whole pipeline with our own offset: packed bytes are untouched by double quant
        let ours_full = quantize_case(&f, c, true);
        assert_eq!(ours_full.packed, f.bytes(&format!("{}.dq.packed", c.name)).unwrap(), "{}", c.name);
    }
}
