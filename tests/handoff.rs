//! Handing a run to LLaMA-Factory or axolotl (`qlora-studio handoff`): the converted dataset and
//! the configs against the expected files in tests/data/handoff/expected (QLS_BLESS=1 rewrites
//! them after a deliberate change), the errors a user can meet, and results those tools wrote
//! (tests/data/handoff/returned: LLaMA-Factory 0.9.5 and axolotl 0.19.0 on the demo model, from
//! scripts/check-handoff.sh) read back as runs whose adapter evaluates.

mod common;

use std::path::{Path, PathBuf};

use qlora_studio::data::DataConfig;
use qlora_studio::handoff::{self, Request, Tool};
use qlora_studio::memory::Zero;
use qlora_studio::train::{evaluate_dataset, Mode, RunConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data(rel: &str) -> PathBuf {
    repo().join("tests/data/handoff").join(rel)
}

fn request(config: &str, tool: Tool, out: &Path) -> Request {
    Request {
        config: RunConfig::load(&data(config)).unwrap(),
        tool,
        gpus: 4,
        nodes: 2,
        gpu_memory: handoff::DEFAULT_GPU_MEMORY,
        out: out.to_path_buf(),
        copy_model: false,
    }
}

/// Every file under `expected` equals the one written under `got` (or, with QLS_BLESS=1,
/// becomes it).
fn compare_tree(expected: &Path, got: &Path) {
    let bless = std::env::var_os("QLS_BLESS").is_some();
    let mut files = Vec::new();
    let names = ["llamafactory.yaml", "axolotl.yaml", "ds_z2_config.json", "ds_z3_config.json", "launch.sh"];
    for name in names.iter().chain(&["data/train.jsonl", "data/validation.jsonl", "data/dataset_info.json"]) {
        if got.join(name).is_file() || expected.join(name).is_file() {
            files.push(name.to_string());
        }
    }
    assert!(files.len() >= 5, "too few files written in {}", got.display());
    for name in files {
        let (want_path, got_path) = (expected.join(&name), got.join(&name));
        let written = std::fs::read_to_string(&got_path).unwrap_or_else(|_| panic!("{name} was not written"));
        if bless {
            std::fs::create_dir_all(want_path.parent().unwrap()).unwrap();
            std::fs::write(&want_path, &written).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&want_path)
            .unwrap_or_else(|_| panic!("{} is missing (QLS_BLESS=1 writes it)", want_path.display()));
        assert_eq!(written, want, "{name} differs from {}", want_path.display());
    }
}

#[test]
fn a_chat_run_becomes_a_llamafactory_job() {
    let dir = tempfile::tempdir().unwrap();
    let written = handoff::write(&request("chat.toml", Tool::LlamaFactory, dir.path())).unwrap();
    compare_tree(&data("expected/chat-llamafactory"), dir.path());
    let plan = &written.plan;
    // 4 × 4 on one device = 2 per GPU × 1 × 8 GPUs
    assert_eq!((plan.world, plan.per_device_batch, plan.grad_accum, plan.their_effective_batch), (8, 2, 1, 16));
    assert_eq!((plan.train_records, plan.validation_records), (4, 2));
    assert_eq!(plan.zero, Zero::Two, "a tiny model fits an 80 GiB card");
    let readme = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
    for needle in ["llamafactory==0.9.5", "./launch.sh", "NODE_RANK", "ZeRO-2", "import-run", "copy it there"] {
        assert!(readme.contains(needle), "README.md lacks {needle:?}:\n{readme}");
    }
    // the run as handed off, for bringing the result back
    let kept = RunConfig::load(&dir.path().join(handoff::RUN_CONFIG_FILE)).unwrap();
    assert_eq!(kept.lora.r, 16);
    assert!(kept.data.path.is_absolute() && kept.data.path.is_file());
}

#[test]
fn a_chat_run_becomes_an_axolotl_job() {
    let dir = tempfile::tempdir().unwrap();
    handoff::write(&request("chat.toml", Tool::Axolotl, dir.path())).unwrap();
    compare_tree(&data("expected/chat-axolotl"), dir.path());
    assert!(
        !dir.path().join("data/dataset_info.json").exists(),
        "axolotl reads its datasets entry, not LLaMA-Factory's"
    );
}

#[test]
fn a_text_run_becomes_a_pretraining_job() {
    for (tool, name) in [(Tool::LlamaFactory, "text-llamafactory"), (Tool::Axolotl, "text-axolotl")] {
        let dir = tempfile::tempdir().unwrap();
        let mut r = request("text.toml", tool, dir.path());
        (r.gpus, r.nodes) = (4, 1);
        // an earlier job's validation split in the same folder goes: this run has none
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/validation.jsonl"), "{}\n").unwrap();
        let written = handoff::write(&r).unwrap();
        assert!(!dir.path().join("data/validation.jsonl").exists());
        compare_tree(&data(&format!("expected/{name}")), dir.path());
        // 3 × 2 = 6 is not a multiple of 4 GPUs: said, not hidden
        assert!(written.plan.notes.iter().any(|n| n.contains("not a multiple of 4 GPUs")), "{:?}", written.plan.notes);
    }
}

#[test]
fn zero3_is_chosen_when_zero2_does_not_fit_one_card() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = request("chat.toml", Tool::LlamaFactory, dir.path());
    let z2 = {
        let spec = qlora_studio::memory::presets::spec_for(&r.config.model.source).unwrap();
        // as the job trains: on GPUs (bf16), 2 per GPU
        let mut c = r.config.clone();
        c.model.device = "cuda".into();
        c.train.batch_size = 2;
        let mut input = c.estimate_input_for(spec, None);
        input.checkpointing = true;
        let z2 = qlora_studio::memory::estimate_per_gpu(&input, 8, Zero::Two).unwrap();
        let z3 = qlora_studio::memory::estimate_per_gpu(&input, 8, Zero::Three).unwrap();
        assert!(z3.mid < z2.mid, "ZeRO-3 shards more: {} vs {}", z3.mid, z2.mid);
        z2
    };
    r.gpu_memory = z2.high - 1;
    let written = handoff::write(&r).unwrap();
    assert_eq!(written.plan.zero, Zero::Three);
    let yaml = std::fs::read_to_string(dir.path().join("llamafactory.yaml")).unwrap();
    assert!(yaml.contains("deepspeed: \"ds_z3_config.json\""), "{yaml}");
}

#[test]
fn the_per_gpu_estimate_shards_as_zero_does() {
    let spec = qlora_studio::memory::presets::spec_for("llama-2-70b").unwrap();
    let mut c = RunConfig::default();
    c.model.mode = Mode::Qlora;
    c.model.device = "cuda".into();
    c.data.max_length = 2048;
    let mut input = c.estimate_input_for(spec, None);
    input.checkpointing = true;
    let one = qlora_studio::memory::estimate(&input).unwrap();
    let z2 = |n| qlora_studio::memory::estimate_per_gpu(&input, n, Zero::Two).unwrap();
    let z3 = |n| qlora_studio::memory::estimate_per_gpu(&input, n, Zero::Three).unwrap();
    // ZeRO-2 keeps the whole NF4 model on every card; ZeRO-3 splits it
    assert_eq!(z2(8).term("frozen linears"), one.term("frozen linears"));
    assert!(z3(8).term("frozen linears") * 7 < one.term("frozen linears"));
    assert!(z3(8).mid < z3(2).mid && z3(2).mid < z2(2).mid);
    assert!(z2(1).mid >= one.mid, "one GPU under ZeRO-2 is the run plus its buckets");
}

#[test]
fn what_the_other_tool_cannot_take_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // a template LLaMA-Factory has no equivalent of (Phi-2's), named with the key to change
    let mut r = request("chat.toml", Tool::LlamaFactory, dir.path());
    r.config.data.template = "phi".to_string().into();
    let e = handoff::write(&r).unwrap_err().to_string();
    assert!(e.contains("[data] template = \"phi\"") && e.contains("axolotl"), "{e}");
    // axolotl takes it as Jinja
    r.tool = Tool::Axolotl;
    handoff::write(&r).unwrap();
    let yaml = std::fs::read_to_string(dir.path().join("axolotl.yaml")).unwrap();
    assert!(yaml.contains("chat_template: \"jinja\"") && yaml.contains("Instruct: "), "{yaml}");

    // alpha must be an integer
    let mut r = request("chat.toml", Tool::LlamaFactory, dir.path());
    r.config.lora.alpha = 12.5;
    let e = handoff::write(&r).unwrap_err().to_string();
    assert!(e.contains("[lora] alpha = 12.5"), "{e}");

    // one kind of data per job: conversations and text in one folder are refused
    let bad = dir.path().join("chat.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    )
    .unwrap();
    let mut r = request("chat.toml", Tool::Axolotl, &dir.path().join("job"));
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(&bad, mixed.join("a.jsonl")).unwrap();
    std::fs::write(mixed.join("b.txt"), "Some text.\n").unwrap();
    r.config.data = DataConfig { path: mixed, ..Default::default() };
    let e = handoff::write(&r).unwrap_err().to_string();
    assert!(e.contains("mixes conversations") && e.contains("b.txt"), "{e}");

    // GPUs
    let mut r = request("chat.toml", Tool::LlamaFactory, dir.path());
    r.gpus = 0;
    assert!(handoff::write(&r).unwrap_err().to_string().contains("--gpus"));
    assert!(Tool::parse("deepspeed").unwrap_err().to_string().contains("llamafactory or axolotl"));
}

/// A returned folder in a temporary copy (reading it may rewrite its adapter's base), with its
/// run config's relative paths made absolute.
fn returned(tool: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join(tool);
    common::copy_dir(&data(&format!("returned/{tool}")), &job);
    let config = job.join(handoff::RUN_CONFIG_FILE);
    let text = std::fs::read_to_string(&config).unwrap().replace("../../../../../", &format!("{}/", repo().display()));
    std::fs::write(&config, text).unwrap();
    (tmp, job)
}

/// The adapter a result brings back loads onto the base model and evaluates to a finite loss.
fn evaluates(adapter: &Path) -> f64 {
    let model = repo().join("assets/demo/model");
    let data = DataConfig { path: data("returned/validation.jsonl"), max_length: 128, ..Default::default() };
    let report = evaluate_dataset(&model.display().to_string(), Some(adapter), &data, Mode::Lora, "cpu").unwrap();
    assert!(report.loss.is_finite() && report.examples == 5, "loss {} over {}", report.loss, report.examples);
    report.loss
}

#[test]
fn a_llamafactory_result_comes_back_as_a_run() {
    let (_tmp, job) = returned("llamafactory");
    // the job folder or its output/ both open
    assert!(handoff::import::is_result(&job) && handoff::import::is_result(&job.join("output")));
    let r = handoff::read_result(&job).unwrap();
    assert_eq!(r.tool, "LLaMA-Factory");
    assert_eq!(r.dir, job.join("output"));
    assert_eq!((r.state.step, r.state.total_steps), (4, 4));
    // trainer_state.json's log_history, as trainer_log.jsonl has it too
    let log = std::fs::read_to_string(job.join("output/trainer_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(r.state.losses.len(), 4);
    assert!((r.state.losses[0].1 - first["loss"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(r.state.eval_losses.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4]);
    assert_eq!(r.config.lora.r, 8, "the handed-off config");
    // the adapter named its base "model" (the job's copy): pointed at this machine's model
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"].as_str().unwrap(), r.config.model.source);
    assert!(r.adapter.join("adapter_config.json.orig").is_file());
    let trained = evaluates(&r.adapter);
    // reading it again changes nothing more
    let again = handoff::read_result(&job).unwrap();
    assert!(again.notes.is_empty(), "{:?}", again.notes);
    assert!(trained < 9.2959, "the adapter lowered the demo's validation loss: {trained}");
}

#[test]
fn an_axolotl_result_comes_back_as_a_run() {
    let (_tmp, job) = returned("axolotl");
    // no trainer_log.jsonl: the curve comes from the last checkpoint's trainer_state.json, and
    // the adapter config says null for defaults (PEFT 0.20)
    let r = handoff::read_result(&job.join("output")).unwrap();
    assert_eq!(r.tool, "axolotl");
    assert_eq!(r.adapter, job.join("output"));
    assert_eq!((r.state.step, r.state.total_steps, r.state.losses.len()), (4, 4, 4));
    assert!(!r.state.eval_losses.is_empty());
    evaluates(&r.adapter);
}

#[test]
fn a_folder_that_is_no_result_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let e = handoff::read_result(dir.path()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("trainer_log.jsonl"), "{e}");
}
