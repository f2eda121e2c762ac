//! A transformers + bitsandbytes 4-bit checkpoint (fixtures/models/llama_bnb4) loads into our
//! NF4 representation bit-exactly equal to quantizing fixtures/models/llama ourselves; bad
//! files are clear errors.

mod common;

use common::{bits, fixture, fixture_model, offset_ulps_allowed};
use qlora_studio::quant::{bnb, nf4, Absmax, FloatType};
use qlora_studio::weights::{write_safetensors, RawTensor, SafetensorsFile};
use qlora_studio::Error;
use safetensors::tensor::Dtype;

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Every linear of every layer of the 4-bit checkpoint (its config's layer count).
fn prefixes() -> Vec<String> {
    let layers = fixture_model("llama_bnb4").layers;
    (0..layers).flat_map(|i| LINEARS.iter().map(move |l| format!("model.layers.{i}.{l}"))).collect()
}

#[test]
fn bnb_checkpoint_equals_our_quantization() {
    let bnb_file = SafetensorsFile::open(fixture("models/llama_bnb4/model.safetensors")).unwrap();
    let dense = SafetensorsFile::open(fixture("models/llama/model.safetensors")).unwrap();
    let mut seen = 0;
    for prefix in prefixes() {
        assert!(bnb::is_4bit(&bnb_file, &prefix), "{prefix}");
        let loaded = bnb::load_nf4(&bnb_file, &prefix).unwrap();
        assert_eq!(loaded.dtype, FloatType::F32);
        assert_eq!(loaded.blocksize, 64);
        let (w, shape) = dense.f32_values(&format!("{prefix}.weight")).unwrap();
        assert_eq!(loaded.shape, shape, "{prefix}");

        let ours = nf4::quantize(&w, &shape, FloatType::F32, 64, true).unwrap();
        assert_eq!(ours.packed, loaded.packed, "{prefix}: packed bytes");
        let (Absmax::Double(theirs), Absmax::Double(mine)) = (&loaded.absmax, &ours.absmax) else { panic!() };
        let ulps = (mine.offset.to_bits() as i64 - theirs.offset.to_bits() as i64).abs();
        let allowed = offset_ulps_allowed(theirs.codes.len());
        assert!(ulps <= allowed, "{prefix}: offset {} vs {} ({ulps} ulps > {allowed})", mine.offset, theirs.offset);
        // with the stored offset, every downstream value is identical
        let Absmax::Plain(plain) = nf4::quantize(&w, &shape, FloatType::F32, 64, false).unwrap().absmax else {
            panic!()
        };
        let redone = nf4::double_quantize(&plain, theirs.offset);
        assert_eq!(redone.codes, theirs.codes, "{prefix}: absmax codes");
        assert_eq!(bits(&redone.nested_absmax), bits(&theirs.nested_absmax), "{prefix}: nested absmax");
        assert_eq!(bits(&redone.nested_code), bits(&theirs.nested_code), "{prefix}: nested code");
        seen += 1;
    }
    assert_eq!(seen, LINEARS.len() * fixture_model("llama_bnb4").layers);
    let mut all = prefixes();
    all.sort();
    assert_eq!(bnb::quantized_prefixes(&bnb_file), all);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("models/llama_bnb4/config.json")).unwrap()).unwrap();
    assert!(bnb::config_is_4bit(&config).unwrap());
    let plain: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("models/llama/config.json")).unwrap()).unwrap();
    assert!(!bnb::config_is_4bit(&plain).unwrap());
    let mut fp4 = config.clone();
    fp4["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into();
    let m = bnb::config_is_4bit(&fp4).unwrap_err().to_string();
    assert!(m.contains("bnb_4bit_quant_type") && m.contains("fp4"), "{m}");
    // what transformers leaves unquantized stays dense
    assert!(!bnb::is_4bit(&bnb_file, "lm_head"));
    assert_eq!(bnb_file.get("model.embed_tokens.weight").unwrap().dtype(), Dtype::F32);
}

#[test]
fn save_and_load_round_trip() {
    let dir = tempdir();
    let values: Vec<f32> = (0..48 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0).collect();
    for double in [false, true] {
        let q = nf4::quantize(&values, &[48, 64], FloatType::BF16, 64, double).unwrap();
        let path = dir.join(format!("rt_{double}.safetensors"));
        write_safetensors(&path, &bnb::to_bnb_entries("layer.proj", &q).unwrap()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(bnb::load_nf4(&f, "layer.proj").unwrap(), q);
    }
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qls-bnb-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copy the q_proj entries of layer 0, changing one of them with `edit`.
fn doctored(name: &str, edit: impl Fn(&mut RawTensor)) -> std::path::PathBuf {
    let src = SafetensorsFile::open(fixture("models/llama_bnb4/model.safetensors")).unwrap();
    let prefix = "model.layers.0.self_attn.q_proj";
    let mut tensors: Vec<RawTensor> = src
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .map(|k| {
            let v = src.get(&k).unwrap();
            RawTensor { name: k.clone(), dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }
        })
        .collect();
    tensors.iter_mut().for_each(edit);
    let path = tempdir().join(name);
    write_safetensors(&path, &tensors).unwrap();
    path
}

#[test]
fn quant_state_that_disagrees_with_the_data_is_an_error_naming_the_key() {
    // q_proj's [out, in] as the quant state records it, changed to twice as many inputs
    let shape = fixture_model("llama").weight_shape("model.layers.0.self_attn.q_proj.weight");
    let (recorded, wrong) = (format!("[{}, {}]", shape[0], shape[1]), format!("[{}, {}]", shape[0], 2 * shape[1]));
    let path = doctored("wrong_shape.safetensors", |t| {
        if t.name.ends_with("quant_state.bitsandbytes__nf4") {
            let s = String::from_utf8(t.data.clone()).unwrap();
            assert!(s.contains(&recorded), "the quant state records the shape {recorded}: {s}");
            t.data = s.replace(&recorded, &wrong).into_bytes();
            t.shape = vec![t.data.len()];
        }
    });
    let f = SafetensorsFile::open(&path).unwrap();
    let e = bnb::load_nf4(&f, "model.layers.0.self_attn.q_proj").unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, Error::BadEntry { .. }), "{m}");
    assert!(m.contains("wrong_shape.safetensors") && m.contains("q_proj.weight") && m.contains("packed bytes"), "{m}");
}

#[test]
fn malformed_quant_state_and_fp4_are_refused() {
    let path = doctored("bad_json.safetensors", |t| {
        if t.name.ends_with("quant_state.bitsandbytes__nf4") {
            t.data.truncate(20);
            t.shape = vec![20];
        }
    });
    let m = bnb::load_nf4(&SafetensorsFile::open(&path).unwrap(), "model.layers.0.self_attn.q_proj")
        .unwrap_err()
        .to_string();
    assert!(m.contains("bad_json.safetensors") && m.contains("quant_state") && m.contains("JSON"), "{m}");

    let path = doctored("fp4.safetensors", |t| {
        if t.name.ends_with("quant_state.bitsandbytes__nf4") {
            t.name = t.name.replace("__nf4", "__fp4");
        }
    });
    let m = bnb::load_nf4(&SafetensorsFile::open(&path).unwrap(), "model.layers.0.self_attn.q_proj")
        .unwrap_err()
        .to_string();
    assert!(m.contains("FP4") && m.contains("nf4"), "{m}");

    let path = doctored("missing.safetensors", |t| {
        if t.name.ends_with("nested_absmax") {
            t.name = "renamed".into();
        }
    });
    let m = bnb::load_nf4(&SafetensorsFile::open(&path).unwrap(), "model.layers.0.self_attn.q_proj")
        .unwrap_err()
        .to_string();
    assert!(m.contains("nested_absmax") && m.contains("not found"), "{m}");
}

#[test]
fn truncated_or_corrupt_files_are_errors_naming_the_file() {
    let src = std::fs::read(fixture("models/llama_bnb4/model.safetensors")).unwrap();
    let dir = tempdir();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &src[..src.len() / 2]).unwrap();
    let m = SafetensorsFile::open(&truncated).err().unwrap().to_string();
    assert!(m.contains("truncated.safetensors") && m.contains("corrupt"), "{m}");

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let m = SafetensorsFile::open(&garbage).err().unwrap().to_string();
    assert!(m.contains("garbage.safetensors"), "{m}");

    let m = SafetensorsFile::open(dir.join("absent.safetensors")).err().unwrap().to_string();
    assert!(m.contains("absent.safetensors"), "{m}");
}
