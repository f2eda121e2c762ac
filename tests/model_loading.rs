//! Loading: sharded checkpoints, 16-bit weights, quantizing to NF4 at load, and the errors a
//! user meets with a wrong folder.

mod common;

use candle_core::{DType, Device, Tensor};
use qlora_studio::lora::LoraSettings;
use qlora_studio::model::{BaseWeights, Model};
use qlora_studio::weights::{write_safetensors, RawTensor, SafetensorsFile};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qls-load-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn raw_tensors(path: &std::path::Path) -> Vec<RawTensor> {
    let f = SafetensorsFile::open(path).unwrap();
    f.keys()
        .into_iter()
        .map(|k| {
            let v = f.get(&k).unwrap();
            RawTensor { name: k.clone(), dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }
        })
        .collect()
}

fn reference(name: &str, key: &str) -> Tensor {
    SafetensorsFile::open(common::fixture(&format!("models/{name}/reference.safetensors")))
        .unwrap()
        .tensor(key, &Device::Cpu)
        .unwrap()
}

#[test]
fn sharded_checkpoint_with_index() {
    let src = common::fixture("models/llama");
    let dir = temp("shards");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors = raw_tensors(&src.join("model.safetensors"));
    let (first, second): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|t| !t.name.contains("layers.1."));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &first), ("model-00002-of-00002.safetensors", &second)] {
        write_safetensors(&dir.join(file), part).unwrap();
        for t in part.iter() {
            map.insert(t.name.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    let logits = model.forward(&reference("llama", "input_ids"), false).unwrap();
    assert!(max_abs_diff(&logits, &reference("llama", "logits")) <= 1e-4);
}

#[test]
fn bf16_weights_load_in_f32_and_bf16() {
    let src = common::fixture("models/llama");
    let dir = temp("bf16");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let dev = Device::Cpu;
    let f = SafetensorsFile::open(src.join("model.safetensors")).unwrap();
    let tensors: Vec<RawTensor> = f
        .keys()
        .into_iter()
        .map(|k| {
            let t = f.tensor(&k, &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let data: Vec<u8> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            RawTensor { name: k.clone(), dtype: safetensors::Dtype::BF16, shape: t.dims().to_vec(), data }
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    let ids = reference("llama", "input_ids");
    let want = reference("llama", "logits");
    // bf16 rounding of weights (and activations) only
    let tolerance = common::bf16_logits_tolerance(common::fixture_model("llama").layers, &want);
    for dtype in [DType::F32, DType::BF16] {
        let model = Model::load(&dir, BaseWeights::Dense(dtype), &dev).unwrap();
        let logits = model.forward(&ids, false).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let d = max_abs_diff(&logits, &want);
        assert!(d < tolerance, "{dtype:?}: logits differ by {d} (tolerance {tolerance})");
    }
}

#[test]
fn quantizing_at_load_equals_the_bitsandbytes_checkpoint() {
    // models/llama quantized by us at load gives what transformers + bitsandbytes computed on
    // the same weights quantized by bitsandbytes (llama_bnb4's base logits).
    let base = BaseWeights::Nf4 { double_quant: true, compute: DType::F32 };
    let model = Model::load(&common::fixture("models/llama"), base, &Device::Cpu).unwrap();
    let logits = model.forward(&reference("llama_bnb4", "input_ids"), false).unwrap();
    let d = max_abs_diff(&logits, &reference("llama_bnb4", "logits"));
    assert!(d <= 1e-4, "logits differ by {d}");
}

#[test]
fn rslora_scale_and_dropout() {
    let s = LoraSettings {
        r: 16,
        alpha: 32.0,
        dropout: 0.1,
        use_rslora: false,
        use_dora: false,
        targets: vec!["q_proj".into()],
    };
    assert_eq!(s.scale(), 2.0);
    assert_eq!(LoraSettings { use_rslora: true, ..s.clone() }.scale(), 8.0);
    // dropout acts in training only, on the LoRA branch only
    let mut model =
        Model::load(&common::fixture("models/llama"), BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    model.load_adapter(&common::fixture("models/llama/adapter")).unwrap();
    for lin in model.linears_mut() {
        if let Some(pair) = &mut lin.lora {
            pair.dropout = 0.5;
        }
    }
    let ids = reference("llama", "input_ids");
    let eval = model.forward(&ids, false).unwrap();
    assert!(max_abs_diff(&eval, &reference("llama", "lora_logits")) <= 1e-4);
    let train = model.forward(&ids, true).unwrap();
    assert!(max_abs_diff(&train, &eval) > 1e-3, "dropout changed nothing in training mode");
}

#[test]
fn wrong_folders_are_clear_errors() {
    let dir = temp("empty");
    let e = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(common::fixture("models/llama/config.json"), dir.join("config.json")).unwrap();
    let e = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // a checkpoint that lacks a layer
    let tensors: Vec<RawTensor> = raw_tensors(&common::fixture("models/llama/model.safetensors"))
        .into_iter()
        .filter(|t| !t.name.contains("layers.1.mlp.up_proj"))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    let e = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("not found"), "{e}");
}

/// A checkpoint described from its config.json alone (a model not downloaded yet) lists the same
/// linear modules, shapes and parameter count as the one read from its safetensors headers.
#[test]
fn a_config_alone_describes_the_checkpoint_as_its_headers_do() {
    use qlora_studio::model::inspect::{inspect, inspect_config};
    let models = common::fixtures_dir().join("models");
    let mut checked = 0;
    for entry in std::fs::read_dir(&models).unwrap().flatten() {
        let dir = entry.path();
        if dir.file_name().unwrap().to_string_lossy().contains("bnb4") {
            continue; // packed 4-bit weights: the headers give no [out, in]
        }
        let from_headers = inspect(&dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let from_config = inspect_config(&config, "test").unwrap();
        let name = dir.display();
        assert_eq!(from_config.family_id, from_headers.family_id, "{name}");
        assert_eq!(from_config.default_targets, from_headers.default_targets, "{name}");
        let sorted = |mut v: Vec<qlora_studio::model::inspect::LinearModule>| {
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        assert_eq!(sorted(from_config.linear_modules), sorted(from_headers.linear_modules), "{name}");
        assert_eq!(from_config.parameters, from_headers.parameters, "{name}: parameters");
        checked += 1;
    }
    assert!(checked > 0, "no fixture models in {}", models.display());
}

/// The LoRA panel's presets pick the modules of their roles and nothing else, and the
/// trainable-parameter count the panel shows is what the model then trains: on Qwen v1 the
/// attention preset is c_attn and attn.c_proj, not the MLP's c_proj (which PEFT would also
/// match by the bare name `c_proj`).
#[test]
fn target_presets_select_exactly_their_modules() {
    use qlora_studio::model::inspect::inspect;
    use qlora_studio::model::spec::Role;
    let models = common::fixtures_dir().join("models");
    for entry in std::fs::read_dir(&models).unwrap().flatten() {
        let dir = entry.path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("bnb4") {
            continue; // packed: the panel cannot count its parameters from the headers
        }
        let info = inspect(&dir).unwrap();
        type Preset = fn(Role) -> bool;
        let presets: [(&str, Preset); 2] =
            [("attention", |r: Role| r.is_attention()), ("all linear", |r: Role| r.in_all_linear())];
        for (preset, keep) in presets {
            let targets = info.module_names(keep);
            let mut model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
            let settings = LoraSettings::with_rank(4, targets.clone());
            model.add_lora(&settings, 0).unwrap();
            let roles: std::collections::BTreeMap<String, Role> =
                model.spec.all_linears().map(|(_, path, l)| (path, l.role)).collect();
            for lin in model.linears() {
                assert_eq!(lin.lora.is_some(), keep(roles[&lin.path]), "{name}, {preset}: {} ({targets:?})", lin.path);
            }
            let trained: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(trained, info.lora_parameters(&targets, 4, false), "{name}, {preset}: {targets:?}");
        }
        if name == "qwen" {
            assert_eq!(info.module_names(|r| r.is_attention()), ["c_attn", "attn.c_proj"]);
        }
    }
}
