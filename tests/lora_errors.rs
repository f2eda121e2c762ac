//! LoRA set-up and adapter import: bad input is a clear error naming the key, fresh LoRA
//! leaves the model unchanged.

mod common;

use candle_core::{DType, Device};
use qlora_studio::lora::LoraSettings;
use qlora_studio::model::{BaseWeights, Model};
use qlora_studio::weights::{write_safetensors, RawTensor, SafetensorsFile};

fn llama() -> Model {
    Model::load(&common::fixture("models/llama"), BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap()
}

fn settings(targets: &[&str]) -> LoraSettings {
    LoraSettings::with_rank(4, targets.iter().map(|s| s.to_string()).collect())
}

#[test]
fn fresh_lora_starts_equal_to_the_base_model() {
    let dev = Device::Cpu;
    let fx = common::fixture_model("llama");
    let top = fx.vocab as u32 - 1;
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, top, 3, 17]], &dev).unwrap();
    let mut model = llama();
    let before = model.forward(&ids, false).unwrap();
    model.add_lora(&settings(&["all-linear"]), 0).unwrap();
    // A and B on each of the 7 linears of every layer
    assert_eq!(model.trainable().len(), 2 * 7 * fx.layers);
    let after = model.forward(&ids, false).unwrap();
    let d = (before - after).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0, "B starts at zero, so the adapted model equals the base");
    // with B = 0 only B gets a gradient; A's is exactly zero until B moves
    let grads = model.forward(&ids, true).unwrap().sum_all().unwrap().backward().unwrap();
    for (key, var) in model.trainable() {
        let g = grads.get(var.as_tensor()).expect("every LoRA tensor is in the graph");
        let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        if key.contains("lora_B") {
            assert!(n > 0.0, "{key}");
        }
    }
}

#[test]
fn unknown_target_lists_the_modules_the_model_has() {
    let e = llama().add_lora(&settings(&["q_proj", "W_pack"]), 0).unwrap_err().to_string();
    assert!(e.contains("W_pack") && e.contains("gate_proj") && e.contains("down_proj"), "{e}");
}

fn adapter_copy(name: &str, edit: impl Fn(&mut Vec<RawTensor>)) -> std::path::PathBuf {
    let src = common::fixture("models/llama/adapter");
    let dir = std::env::temp_dir().join(format!("qls-adapter-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let f = SafetensorsFile::open(src.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<RawTensor> = f
        .keys()
        .into_iter()
        .map(|k| {
            let v = f.get(&k).unwrap();
            RawTensor { name: k.clone(), dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }
        })
        .collect();
    edit(&mut tensors);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
    dir
}

#[test]
fn misshaped_or_missing_adapter_keys_are_named() {
    let fx = common::fixture_model("llama");
    let key = "layers.1.self_attn.v_proj.lora_A.weight";
    let (r, cols) = match fx.adapter_shape(key) {
        [r, cols] => (*r, *cols),
        other => panic!("{key}: {other:?}"),
    };
    assert!(r % 2 == 0, "LoRA rank {r}: the test halves it");
    let dir = adapter_copy("shape", |ts| {
        let t = ts.iter_mut().find(|t| t.name.ends_with(key)).unwrap();
        t.shape = vec![r / 2, 2 * cols]; // same bytes, wrong shape
    });
    let e = llama().load_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains(&format!("[{r}, {cols}]")), "{e}");

    let dir = adapter_copy("missing", |ts| ts.retain(|t| !t.name.ends_with("layers.0.self_attn.q_proj.lora_B.weight")));
    let e = llama().load_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains("layers.0.self_attn.q_proj.lora_B.weight") && e.contains("missing"), "{e}");

    // the last layer's keys renamed to a layer past the model's end
    let (last, beyond) = (format!("layers.{}.", fx.layers - 1), format!("layers.{}.", fx.layers + 5));
    let dir = adapter_copy("foreign", |ts| {
        for t in ts.iter_mut() {
            t.name = t.name.replace(&last, &beyond);
        }
    });
    let e = llama().load_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains(&beyond) && e.contains("not in the model"), "{e}");
}
