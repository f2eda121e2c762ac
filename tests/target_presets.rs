//! The LoRA panel's presets as other tools read them: the target_modules an exported adapter
//! names must make PEFT adapt exactly the modules we trained. PEFT matches a target key when a
//! module's name equals it or ends with "." + key, so on Qwen (v1), where attention and MLP both
//! have a `c_proj`, the attention preset must say `attn.c_proj`.

mod common;

use candle_core::{DType, Device};
use qlora_studio::arch::target_matches;
use qlora_studio::lora::export::adapter_config_json;
use qlora_studio::lora::peft::PeftAdapter;
use qlora_studio::lora::LoraSettings;
use qlora_studio::model::inspect::inspect;
use qlora_studio::model::{BaseWeights, Model};

/// What PEFT does with a target_modules list: the module paths it puts LoRA on.
fn peft_would_adapt(target_modules: &[String], path: &str) -> bool {
    target_modules.iter().any(|t| target_matches(path, t))
}

#[test]
fn exported_target_modules_adapt_in_peft_exactly_what_was_trained() {
    let models = common::fixtures_dir().join("models");
    let mut checked_qwen = false;
    for name in ["qwen", "llama", "mixtral", "chatglm3"] {
        let dir = models.join(name);
        let info = inspect(&dir).unwrap();
        type Preset = fn(qlora_studio::model::spec::Role) -> bool;
        let presets: [(&str, Preset); 2] = [("attention", |r| r.is_attention()), ("all linear", |r| r.in_all_linear())];
        for (preset, keep) in presets {
            let targets = info.module_names(keep);
            let mut model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
            let settings = LoraSettings::with_rank(2, targets.clone());
            model.add_lora(&settings, 0).unwrap();
            let adapter = PeftAdapter::from_model(&model, &settings).unwrap();
            let config = adapter_config_json(&adapter, None);
            let written: Vec<String> = serde_json::from_value(config["target_modules"].clone()).unwrap();
            for lin in model.linears() {
                assert_eq!(
                    peft_would_adapt(&written, &lin.path),
                    lin.lora.is_some(),
                    "{name}, {preset}: {} with target_modules {written:?}",
                    lin.path
                );
            }
            if name == "qwen" && preset == "attention" {
                assert_eq!(written, ["attn.c_proj", "c_attn"]);
                checked_qwen = true;
            }
        }
    }
    assert!(checked_qwen);
}
