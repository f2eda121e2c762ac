//! GGUF import on a file this test writes from a fixture checkpoint the way llama.cpp's
//! converter does (q/k rows permuted per head, tied names, tokenizer metadata): the imported
//! folder must reproduce transformers' logits for the original checkpoint, and the rebuilt
//! tokenizer must follow the BPE merges.

mod common;

use candle_core::{DType, Device};
use common::gguf_writer::{vocab, write_gguf_from_fixture};
use qlora_studio::hub::gguf;
use qlora_studio::model::{BaseWeights, Model};
use qlora_studio::weights::SafetensorsFile;

#[test]
fn imported_gguf_reproduces_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = common::fixture("models/llama_gqa_all_linear");
    let file = tmp.path().join("tiny.gguf");
    write_gguf_from_fixture(&fixture, &file, "llama");

    let cache = tmp.path().join("cache");
    let dir = gguf::import_cached(&file, &cache).unwrap();
    assert!(dir.starts_with(cache.join("gguf")));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).is_file(), "{f} missing from the import");
    }
    // the second import reuses the folder
    let stamp = std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap();
    assert_eq!(gguf::import_cached(&file, &cache).unwrap(), dir);
    assert_eq!(std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap(), stamp);

    // a changed file is imported again, and the stale import is removed
    let file_again = std::fs::read(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&file, &file_again).unwrap();
    let dir_again = gguf::import_cached(&file, &cache).unwrap();
    if dir_again != dir {
        assert!(!dir.exists(), "the stale import {} is still there", dir.display());
    }
    let dir = dir_again;

    let dev = Device::Cpu;
    let reference = SafetensorsFile::open(fixture.join("reference.safetensors")).unwrap();
    let ids = reference.tensor("input_ids", &dev).unwrap();
    let model = Model::load(&dir, BaseWeights::Dense(DType::F32), &dev).unwrap();
    let fx = common::fixture_model("llama_gqa_all_linear");
    assert!(fx.kv_heads < fx.heads, "the fixture is a GQA model");
    assert_eq!((model.spec.heads, model.spec.kv_heads), (fx.heads, fx.kv_heads));
    assert!(!model.spec.tie_embeddings, "the GGUF has output.weight");
    let logits = model.forward(&ids, false).unwrap();
    let want = reference.tensor("logits", &dev).unwrap();
    let d = (logits - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "imported GGUF logits differ from transformers' by {d}");

    // the BPE follows the merges by rank; the byte-level alphabet covers the rest
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), fx.vocab, "one token for each row of the embedding");
    let pieces = |text: &str| -> Vec<String> { tok.encode(text, false).unwrap().get_tokens().to_vec() };
    assert_eq!(pieces("the other"), ["t", "he", "Ġ", "o", "t", "he", "r"]);
    assert_eq!(pieces(" the inner"), ["Ġthe", "Ġ", "in", "n", "er"]);
    assert_eq!(tok.decode(tok.encode("Ångström 🙂\n", false).unwrap().get_ids(), false).unwrap(), "Ångström 🙂\n");

    let tok_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tok_config["eos_token"], vocab()[0].as_str());
    assert!(tok_config["chat_template"].as_str().unwrap().contains("m['role']"));
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], 0);
}

#[test]
fn unsupported_gguf_architectures_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("other.gguf");
    write_gguf_from_fixture(&common::fixture("models/llama_gqa_all_linear"), &file, "mamba");
    let err = gguf::import_cached(&file, &tmp.path().join("cache")).unwrap_err().to_string();
    assert!(err.contains("\"mamba\"") && err.contains("llama"), "{err}");
    // nothing half-written is left to be reused
    let leftovers = std::fs::read_dir(tmp.path().join("cache/gguf")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0);

    let not_gguf = tmp.path().join("broken.gguf");
    std::fs::write(&not_gguf, b"GGUF but not really").unwrap();
    let err = gguf::import_cached(&not_gguf, &tmp.path().join("cache")).unwrap_err().to_string();
    assert!(err.contains("broken.gguf") && err.contains("GGUF"), "{err}");
}

/// A run trained on a .gguf file records the file as its base (base_model_name_or_path): its
/// exports resolve the file as training did (re-importing it when the import is gone), and a
/// PEFT export names a base PEFT can load.
#[test]
fn a_run_on_a_gguf_base_exports_like_any_other() {
    use qlora_studio::lora::export::{export, ExportFormat, ExportInfo, ExportRequest};
    use qlora_studio::lora::merge::MergeInto;
    let tmp = tempfile::tempdir().unwrap();
    // the app's cache, where training imported the file (the other tests here name theirs)
    let cache = tmp.path().join("cache");
    std::env::set_var("QLS_CACHE_DIR", &cache);
    let fixture = common::fixture("models/llama_gqa_all_linear");
    let file = tmp.path().join("tiny.gguf");
    write_gguf_from_fixture(&fixture, &file, "llama");
    let imported = gguf::import_cached(&file, &cache).unwrap();
    // the run's adapter, naming the .gguf file as its base, as the trainer writes it
    let run = tmp.path().join("checkpoint-000002");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(fixture.join("adapter/adapter_model.safetensors"), run.join("adapter_model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("adapter/adapter_config.json")).unwrap()).unwrap();
    config["base_model_name_or_path"] = file.display().to_string().into();
    std::fs::write(run.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::remove_dir_all(&imported).unwrap();

    let request = |format, out: &std::path::Path| ExportRequest {
        from: run.clone(),
        format,
        base: None,
        out: out.to_path_buf(),
        dtype: None,
        merge_into: MergeInto::Original,
        modelfile: true,
        divergence_check: true,
        trained_on_nf4: Some(false),
        check_sequences: Vec::new(),
        info: ExportInfo::default(),
    };
    std::fs::create_dir_all(tmp.path().join("out")).unwrap();
    let adapter_gguf = tmp.path().join("out/adapter.gguf");
    export(&request(ExportFormat::Gguf, &adapter_gguf)).unwrap();
    assert!(adapter_gguf.is_file() && imported.join("config.json").is_file(), "the base was imported again");
    let modelfile = std::fs::read_to_string(tmp.path().join("out/Modelfile")).unwrap();
    assert!(modelfile.contains(&format!("FROM {}", file.display())), "Ollama runs the .gguf itself:\n{modelfile}");

    let merged = tmp.path().join("merged");
    let report = export(&request(ExportFormat::Merged, &merged)).unwrap();
    assert!(merged.join("config.json").is_file());
    assert!(report.divergence.unwrap().top1_agreement > 0.99);

    let peft = tmp.path().join("peft");
    export(&request(ExportFormat::Peft, &peft)).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    // no hub id in this file's metadata: the Hugging Face folder it was imported into
    let base = written["base_model_name_or_path"].as_str().unwrap();
    assert_eq!(std::path::Path::new(base), imported, "PEFT gets a base it can load");
    let card = std::fs::read_to_string(peft.join("README.md")).unwrap();
    assert!(card.contains("tiny.gguf"), "the model card names the file:\n{card}");
}
