//! The architecture table: every row as the project's table gives it, and every fixture's
//! config.json recognised as the right family.

mod common;

use qlora_studio::arch::{self, SplitKind};

/// The project's table, verbatim: model, sizes, default module.
const TABLE: [(&str, &str, &str); 15] = [
    ("Baichuan", "7B/13B", "W_pack"),
    ("Baichuan2", "7B/13B", "W_pack"),
    ("BLOOM", "560M/1.1B/1.7B/3B/7.1B/176B", "query_key_value"),
    ("BLOOMZ", "560M/1.1B/1.7B/3B/7.1B/176B", "query_key_value"),
    ("ChatGLM3", "6B", "query_key_value"),
    ("Falcon", "7B/40B/180B", "query_key_value"),
    ("InternLM", "7B/20B", "q_proj,v_proj"),
    ("LLaMA", "7B/13B/33B/65B", "q_proj,v_proj"),
    ("LLaMA-2", "7B/13B/70B", "q_proj,v_proj"),
    ("Mistral", "7B", "q_proj,v_proj"),
    ("Mixtral", "8x7B", "q_proj,v_proj"),
    ("Phi-1.5/2", "1.3B/2.7B", "Wqkv"),
    ("Qwen", "1.8B/7B/14B/72B", "c_attn"),
    ("XVERSE", "7B/13B/65B", "q_proj,v_proj"),
    ("Yi", "6B/34B", "q_proj,v_proj"),
];

#[test]
fn every_row_is_in_the_table_exactly() {
    let t = arch::table().unwrap();
    assert_eq!(t.families().len(), TABLE.len());
    for (f, (name, sizes, targets)) in t.families().iter().zip(TABLE) {
        assert_eq!(f.name, name);
        assert_eq!(f.sizes.join("/"), sizes, "{name}");
        assert_eq!(f.default_targets.join(","), targets, "{name}");
        // the default layout has the default targets and an all-linear preset containing them
        let r = t.layout_for(f, None);
        r.check_targets(&r.default_targets()).unwrap();
        for target in &f.default_targets {
            assert!(r.all_linear_names().contains(target), "{name}: {target}");
        }
    }
}

/// fixture folder → (family id, layout, default targets in that layout, fused split of the
/// default target if fused)
const FIXTURES: [(&str, &str, &str, &str, Option<SplitKind>); 20] = [
    ("baichuan_7b", "baichuan", "baichuan", "W_pack", Some(SplitKind::QkvContiguous)),
    ("baichuan_13b", "baichuan", "baichuan", "W_pack", Some(SplitKind::QkvContiguous)),
    ("baichuan2_7b", "baichuan2", "baichuan", "W_pack", Some(SplitKind::QkvContiguous)),
    ("baichuan2_13b", "baichuan2", "baichuan", "W_pack", Some(SplitKind::QkvContiguous)),
    ("bloom", "bloom", "bloom", "query_key_value", Some(SplitKind::QkvGrouped)),
    ("chatglm3", "chatglm3", "chatglm", "query_key_value", Some(SplitKind::QkvContiguous)),
    ("falcon_7b_style", "falcon", "falcon", "query_key_value", Some(SplitKind::QkvGrouped)),
    ("falcon_40b_style", "falcon", "falcon", "query_key_value", Some(SplitKind::QkvGrouped)),
    ("internlm", "internlm", "llama", "q_proj,v_proj", None),
    ("llama", "llama", "llama", "q_proj,v_proj", None),
    ("llama_bnb4", "llama", "llama", "q_proj,v_proj", None),
    ("llama_gqa_all_linear", "llama", "llama", "q_proj,v_proj", None),
    ("llama_tied", "llama", "llama", "q_proj,v_proj", None),
    ("mistral", "mistral", "llama", "q_proj,v_proj", None),
    ("mixtral", "mixtral", "mixtral", "q_proj,v_proj", None),
    ("phi", "phi", "phi", "q_proj,k_proj,v_proj", None),
    ("phi_msft", "phi", "phi_msft", "Wqkv", Some(SplitKind::QkvContiguous)),
    ("qwen", "qwen", "qwen", "c_attn", Some(SplitKind::QkvContiguous)),
    ("qwen2", "qwen", "qwen2", "q_proj,k_proj,v_proj", None),
    ("xverse", "xverse", "llama", "q_proj,v_proj", None),
];

#[test]
fn every_fixture_config_is_recognised() {
    let t = arch::table().unwrap();
    for (dir, family, layout, targets, split) in FIXTURES {
        let r = t.recognise_file(&common::fixture(&format!("models/{dir}/config.json"))).unwrap();
        assert_eq!(r.family.id, family, "{dir}");
        assert_eq!(r.layout_name, layout, "{dir}");
        assert_eq!(r.default_targets().join(","), targets, "{dir}");
        let first = &r.default_targets()[0];
        assert_eq!(r.layout.fused(first).map(|f| f.split), split, "{dir}");
    }
}

#[test]
fn fixture_adapters_target_modules_the_layout_has() {
    // The PEFT adapters in the fixtures name real modules of each model: our layout must know
    // every one of them (the "all linear" fixtures included).
    let t = arch::table().unwrap();
    for (dir, ..) in FIXTURES {
        let r = t.recognise_file(&common::fixture(&format!("models/{dir}/config.json"))).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture(&format!("models/{dir}/adapter/adapter_config.json"))).unwrap(),
        )
        .unwrap();
        let targets: Vec<String> =
            cfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        r.check_targets(&targets).unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
}

#[test]
fn fixture_checkpoints_hold_the_layer_plan() {
    // Every linear of the layer plan exists as a weight in every layer of the fixture
    // checkpoint, with the plan's shape (4-bit packed weights have none to compare), and the
    // checkpoint holds no other linear weight inside the layers.
    let t = arch::table().unwrap();
    for (dir, ..) in FIXTURES {
        let config_path = common::fixture(&format!("models/{dir}/config.json"));
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        let spec = qlora_studio::model::ModelSpec::from_config(&config, &t.recognise(&config).unwrap(), dir).unwrap();
        let file =
            qlora_studio::weights::SafetensorsFile::open(common::fixture(&format!("models/{dir}/model.safetensors")))
                .unwrap();
        let mut planned = std::collections::BTreeSet::new();
        for (_, path, linear) in spec.all_linears() {
            let key = format!("{path}.weight");
            let view = file.get(&key).unwrap_or_else(|_| panic!("{dir}: no {key} in the checkpoint"));
            if view.dtype() != safetensors::Dtype::U8 {
                assert_eq!(view.shape(), linear.shape(), "{dir}: {key}");
            }
            planned.insert(key);
        }
        let stray: Vec<String> = file
            .keys()
            .into_iter()
            .filter(|k| k.ends_with(".weight") && file.get(k).is_ok_and(|v| v.shape().len() == 2))
            .filter(|k| (0..spec.layers).any(|i| k.starts_with(&format!("{}.", spec.layer_prefix(i)))))
            .filter(|k| !planned.contains(k))
            .collect();
        assert!(stray.is_empty(), "{dir}: 2-D weights in the layers the plan does not name: {stray:?}");
    }
}

/// The table's well-known checkpoints and the estimator's presets agree: each preset's hub id is
/// a checkpoint of the family its config is recognised as, so picking a size in the GUI finds
/// the preset's estimate before anything is downloaded.
#[test]
fn presets_are_checkpoints_of_the_family_they_are_recognised_as() {
    let table = arch::table().unwrap();
    assert_eq!(
        table.families().iter().find(|f| f.id == "llama2").unwrap().checkpoints.get("7B").map(String::as_str),
        Some("meta-llama/Llama-2-7b-hf")
    );
    for name in qlora_studio::memory::presets::names() {
        let config = qlora_studio::memory::presets::config(&name).unwrap();
        let hub_id = config["_name_or_path"].as_str().unwrap_or_else(|| panic!("preset {name} has no hub id"));
        let family = table.recognise(&config).unwrap().family;
        assert!(
            family.checkpoints.values().any(|id| id == hub_id),
            "{name}: {hub_id} is not a {} checkpoint",
            family.id
        );
        assert_eq!(qlora_studio::memory::presets::config(hub_id).unwrap(), config, "{name} by its hub id");
    }
}
