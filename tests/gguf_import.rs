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
    assert_eq!((model.spec.heads, model.spec.kv_heads), (4, 2));
    assert!(!model.spec.tie_embeddings, "the GGUF has output.weight");
    let logits = model.forward(&ids, false).unwrap();
    let want = reference.tensor("logits", &dev).unwrap();
    let d = (logits - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "imported GGUF logits differ from transformers' by {d}");

    // the BPE follows the merges by rank; the byte-level alphabet covers the rest
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
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
