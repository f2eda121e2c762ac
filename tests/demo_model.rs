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
