//! Shared helpers for integration tests: where the reference fixtures live and what they hold.
#![allow(dead_code)]

pub mod fake_hub;
pub mod gguf_writer;
pub mod gui;
pub mod tiny_llama;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// tests/fixtures in the repository (made by scripts/make-fixtures), or the folder in
/// QLS_FIXTURES when it is set and not empty: another set made by the same generator, perhaps
/// with other shapes. A missing folder fails the test: parity tests must never pass by skipping.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("QLS_FIXTURES").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixture folder {} not found: QLS_FIXTURES names a folder made by scripts/make-fixtures, or unset it to use \
         tests/fixtures",
        dir.display()
    );
    dir
}

pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// A file of fixtures/real (what transformers makes of the real SmolLM2 model): a fixture set
/// made with `make_fixtures.py --skip-real` has none, and the test says so.
pub fn real_fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join("real").join(rel);
    assert!(
        p.is_file(),
        "this test needs fixtures/real/{rel} (SmolLM2-135M-Instruct as transformers reads it), which {} lacks: \
         make the set without --skip-real (scripts/make-fixtures) or copy tests/fixtures/real into it",
        fixtures_dir().display()
    );
    p
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One fixture model's shapes, counts and names, read from its own files, so that the tests hold
/// for any fixture set the generator makes: config.json (the families' own key names), meta.json
/// (LoRA settings, tolerances), adapter/adapter_config.json and adapter_model.safetensors, and
/// reference.safetensors (the input's shape).
pub struct FixtureModel {
    pub name: String,
    pub dir: PathBuf,
    pub config: Value,
    pub meta: Value,
    pub adapter_config: Value,
    /// rows of the embedding: padded_vocab_size where the family has one, else vocab_size
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// reference.safetensors' input_ids is [batch, seq]
    pub batch: usize,
    pub seq: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// adapter_config.json's target_modules, sorted
    pub targets: Vec<String>,
    /// adapter_model.safetensors' keys and shapes, in the file's order
    pub adapter_tensors: Vec<(String, Vec<usize>)>,
}

impl FixtureModel {
    /// The first of these config.json keys that holds a number.
    pub fn config_usize(&self, keys: &[&str]) -> Option<usize> {
        keys.iter().find_map(|k| self.config.get(*k).and_then(Value::as_u64)).map(|v| v as usize)
    }

    /// The shape of an adapter tensor whose key ends with `suffix`.
    pub fn adapter_shape(&self, suffix: &str) -> &[usize] {
        self.adapter_tensors
            .iter()
            .find(|(k, _)| k.ends_with(suffix))
            .map(|(_, s)| s.as_slice())
            .unwrap_or_else(|| panic!("{}: no adapter tensor ends with {suffix}", self.name))
    }

    /// The 2-D shape of a checkpoint weight.
    pub fn weight_shape(&self, key: &str) -> Vec<usize> {
        let f = qlora_studio::weights::SafetensorsFile::open(self.dir.join("model.safetensors")).unwrap();
        f.get(key).unwrap_or_else(|e| panic!("{}: {e}", self.name)).shape().to_vec()
    }
}

/// The fixture model models/`name`.
pub fn fixture_model(name: &str) -> FixtureModel {
    let dir = fixture(&format!("models/{name}"));
    let config = read_json(&dir.join("config.json"));
    let meta = read_json(&dir.join("meta.json"));
    let adapter_config = read_json(&dir.join("adapter/adapter_config.json"));
    let get = |keys: &[&str]| -> Option<usize> {
        keys.iter().find_map(|k| config.get(*k).and_then(Value::as_u64)).map(|v| v as usize)
    };
    let need = |keys: &[&str]| get(keys).unwrap_or_else(|| panic!("{name}: config.json has none of {keys:?}"));
    let hidden = need(&["hidden_size", "n_embd"]);
    let heads = need(&["num_attention_heads", "n_head"]);
    let multi_query_groups =
        if config["multi_query_attention"] == true { get(&["multi_query_group_num"]) } else { None };
    let kv_heads = get(&["num_key_value_heads", "num_kv_heads", "n_head_kv"]).or(multi_query_groups).unwrap_or(heads);
    let reference = qlora_studio::weights::SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let input = reference.get("input_ids").unwrap().shape().to_vec();
    assert_eq!(input.len(), 2, "{name}: input_ids is [batch, seq]");
    let adapter = qlora_studio::weights::SafetensorsFile::open(dir.join("adapter/adapter_model.safetensors")).unwrap();
    let adapter_tensors =
        adapter.keys().into_iter().map(|k| (k.clone(), adapter.get(&k).unwrap().shape().to_vec())).collect();
    let mut targets: Vec<String> = adapter_config["target_modules"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: adapter_config.json has no target_modules list"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    targets.sort();
    let (lora_r, lora_alpha) =
        (adapter_config["r"].as_u64().unwrap() as usize, adapter_config["lora_alpha"].as_f64().unwrap());
    // meta.json describes the same adapter
    assert_eq!(meta["lora"]["r"].as_u64(), Some(lora_r as u64), "{name}: meta.json's LoRA rank");
    assert_eq!(meta["lora"]["alpha"].as_f64(), Some(lora_alpha), "{name}: meta.json's LoRA alpha");
    FixtureModel {
        name: name.to_string(),
        vocab: need(&["padded_vocab_size", "vocab_size"]),
        hidden,
        layers: need(&["num_hidden_layers", "n_layer", "num_layers"]),
        heads,
        kv_heads,
        head_dim: get(&["head_dim", "kv_channels"]).unwrap_or(hidden / heads),
        batch: input[0],
        seq: input[1],
        lora_r,
        lora_alpha,
        targets,
        adapter_tensors,
        dir,
        config,
        meta,
        adapter_config,
    }
}

/// How far rounding a fixture model's weights to bf16 may move its logits, from the logits
/// themselves: each weight moves by at most bf16's unit roundoff (2^-8) of itself, and on the
/// way from the embedding to the logits an input passes through 4 such matmuls a layer (q/k/v,
/// o, gate/up, down) and the lm_head, so to first order the logits move by at most that many
/// roundoffs of their own scale (the largest |logit|). A wrong weight moves them by their size.
pub fn bf16_logits_tolerance(layers: usize, logits: &candle_core::Tensor) -> f32 {
    let scale = logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    (4 * layers + 1) as f32 * 2f32.powi(-8) * scale
}

/// How many ulps our double-quantization offset (an f64 sum of the `blocks` absmax values,
/// rounded once, divided in f32) may be from bitsandbytes' torch.mean, an f32 pairwise sum that
/// may round by half an ulp at each of its ceil(log2 blocks) levels: that, plus half an ulp for
/// each side's division. Everything downstream is compared bit for bit given their offset.
pub fn offset_ulps_allowed(blocks: usize) -> i64 {
    ((blocks as f64).log2().ceil() / 2.0 + 1.0).floor() as i64
}

pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The device the parity tests run on: the CPU, or the GPU when QLS_TEST_DEVICE=cuda (the GPU
/// check runs the same tests there, in a build with the `cuda` feature).
pub fn test_device() -> candle_core::Device {
    match std::env::var("QLS_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            candle_core::Device::new_cuda(0).unwrap_or_else(|e| panic!("QLS_TEST_DEVICE=cuda, but no CUDA device: {e}"))
        }
        Ok("cpu") | Err(_) => candle_core::Device::Cpu,
        Ok(other) => panic!("QLS_TEST_DEVICE={other}: use cpu or cuda"),
    }
}

/// A copy of the folder `from` (and everything under it) at `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
