//! The built-in demo model (assets/demo/model): a complete folder the loader reads, small, and
//! exactly what `hub::demo::write_demo_model` makes.

use candle_core::{DType, Device, Tensor};
use qlora_studio::data::{ChatTemplate, Message, ModelTokenizer, Role, TemplateChoice, TemplateOrigin};
use qlora_studio::hub::{self, demo};
use qlora_studio::model::{generate, BaseWeights, GenerateOptions, Model};

#[test]
fn demo_model_loads_and_generates() {
    let dir = demo::demo_model_dir();
    let check = hub::check_folder(&dir).unwrap();
    assert_eq!(check.family, "llama");
    assert!(check.has_tokenizer_config && check.has_generation_config);
    let size: u64 = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
    assert!(size < 5 << 20, "the demo model takes {size} bytes; keep it well under 5 MB");

    let model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::resolve(&TemplateChoice::Auto, &tok, Some("llama")).unwrap();
    assert_eq!(template.origin, TemplateOrigin::Model);
    let text = template.render(&[Message::new(Role::User, "Hello")], true, &tok).unwrap();
    let tok = tok.tokenizer();
    assert_eq!(text, "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    let logits =
        model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), false).unwrap();
    assert_eq!(logits.dims(), &[1, ids.len(), 512]);
    let out = generate(&model, &ids, &GenerateOptions { max_new_tokens: 5, ..Default::default() }).unwrap();
    assert!(out.len() <= 5 && out.iter().all(|&t| t < 512));
}

#[test]
fn committed_demo_model_is_what_the_generator_makes() {
    let tmp = tempfile::tempdir().unwrap();
    demo::write_demo_model(tmp.path()).unwrap();
    for name in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        let made = std::fs::read(tmp.path().join(name)).unwrap();
        let committed = std::fs::read(demo::demo_model_dir().join(name)).unwrap();
        assert!(made == committed, "assets/demo/model/{name} differs from what write_demo_model makes");
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_binary_carries_the_whole_demo_for_use_away_from_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("demo");
    demo::write_built_in_demo(&copy).unwrap();
    let assets = demo::demo_model_dir().parent().unwrap().to_path_buf();
    assert_eq!(files_under(&copy), files_under(&assets), "assets/demo and the built-in copy hold different files");
    for name in files_under(&assets) {
        assert!(std::fs::read(copy.join(&name)).unwrap() == std::fs::read(assets.join(&name)).unwrap(), "{name}");
    }
    hub::check_folder(&copy.join("model")).unwrap();

    // a damaged copy (a file cut short) is written again; a complete one is left alone
    std::fs::write(copy.join("model/config.json"), b"{").unwrap();
    demo::write_built_in_demo(&copy).unwrap();
    assert_eq!(
        std::fs::read(copy.join("model/config.json")).unwrap(),
        std::fs::read(assets.join("model/config.json")).unwrap()
    );
    assert!(!tmp.path().join("demo.partial").exists());
}
