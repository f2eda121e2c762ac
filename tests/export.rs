//! Export: PEFT adapters round-trip the fixtures, merged models compute what base + adapter
//! compute, GGUF adapters read back (candle's reader) with llama.cpp's names and row
//! transforms computed here independently from docs/adapter-formats.md §4.4, and bad input
//! is a clear error.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use qlora_studio::lora::export::{export, write_peft_adapter, ExportFormat, ExportInfo, ExportRequest, TensorDType};
use qlora_studio::lora::gguf::{write_gguf_adapter, GgufType};
use qlora_studio::lora::merge::{divergence, sample_sequences, write_merged_model, MergeInto, MergeOptions};
use qlora_studio::lora::peft::{read_adapter, PeftAdapter};
use qlora_studio::lora::LoraSettings;
use qlora_studio::model::{BaseWeights, Model};
use qlora_studio::weights::SafetensorsFile;

const F32: BaseWeights = BaseWeights::Dense(DType::F32);

/// Every fixture with a dense f32 base.
const DENSE_FIXTURES: &[&str] = &[
    "llama",
    "llama_gqa_all_linear",
    "llama_tied",
    "mistral",
    "mixtral",
    "qwen2",
    "falcon_7b_style",
    "falcon_40b_style",
    "bloom",
    "phi",
    "baichuan_7b",
    "baichuan_13b",
    "baichuan2_7b",
    "baichuan2_13b",
    "internlm",
    "qwen",
    "xverse",
    "phi_msft",
    "chatglm3",
];

fn model_dir(name: &str) -> PathBuf {
    common::fixture(&format!("models/{name}"))
}

fn adapter(name: &str) -> PeftAdapter {
    read_adapter(&model_dir(name).join("adapter"), &Device::Cpu).unwrap()
}

fn reference(name: &str, key: &str) -> Tensor {
    SafetensorsFile::open(model_dir(name).join("reference.safetensors")).unwrap().tensor(key, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn lora_model(name: &str, base: BaseWeights) -> Model {
    let mut m = Model::load(&model_dir(name), base, &Device::Cpu).unwrap();
    m.load_adapter(&model_dir(name).join("adapter")).unwrap_or_else(|e| panic!("{name}: {e}"));
    m
}

fn f32_values(path: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    SafetensorsFile::open(path).unwrap().f32_values(key).unwrap()
}

#[test]
fn peft_export_round_trips_every_fixture_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    for name in DENSE_FIXTURES.iter().chain(&["llama_bnb4", "llama_dora"]) {
        let src = model_dir(name).join("adapter");
        let out = tmp.path().join(name);
        write_peft_adapter(&adapter(name), &out, TensorDType::F32, Some("some/base"), &ExportInfo::default()).unwrap();
        let (a, b) = (
            SafetensorsFile::open(src.join("adapter_model.safetensors")).unwrap(),
            SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap(),
        );
        assert_eq!(a.keys(), b.keys(), "{name}: keys");
        for key in a.keys() {
            let (va, vb) = (a.get(&key).unwrap(), b.get(&key).unwrap());
            assert_eq!(va.shape(), vb.shape(), "{name}: {key}");
            assert_eq!(va.dtype(), vb.dtype(), "{name}: {key}");
            assert_eq!(va.data(), vb.data(), "{name}: {key} values");
        }
        // the config as PEFT reads it: same settings as the fixture's
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
        };
        let (want, got) = (read(&src), read(&out));
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "use_dora",
            "bias",
            "fan_in_fan_out",
        ] {
            assert_eq!(want[key], got[key], "{name}: {key}");
        }
        let sorted = |v: &serde_json::Value| {
            let mut t: Vec<String> = v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
            t.sort();
            t
        };
        assert_eq!(sorted(&want["target_modules"]), sorted(&got["target_modules"]), "{name}");
        assert_eq!(got["base_model_name_or_path"], "some/base");
        assert!(std::fs::read_to_string(out.join("README.md")).unwrap().contains("some/base"));
    }
}

#[test]
fn exported_adapter_from_a_model_gives_the_reference_lora_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "llama_gqa_all_linear";
    let model = lora_model(name, F32);
    let settings = adapter(name).settings;
    let exported = PeftAdapter::from_model(&model, &settings).unwrap();
    let out = tmp.path().join("bf16");
    let info = ExportInfo {
        dataset_name: Some("alpaca-tiny".into()),
        dataset_size: Some(52),
        steps: Some(100),
        final_train_loss: Some(1.25),
        final_val_loss: Some(1.5),
        run_config: Some("[lora]\nr = 8\n".into()),
        chat_template: Some("{{ messages }}".into()),
        stop_tokens: vec!["</s>".into()],
        ..ExportInfo::default()
    };
    write_peft_adapter(&exported, &out, TensorDType::Bf16, Some("base"), &info).unwrap();
    // bf16 keys hold the bf16 rounding of the model's values
    let src = model_dir(name).join("adapter/adapter_model.safetensors");
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
    assert_eq!(
        SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap().get(key).unwrap().dtype(),
        safetensors::Dtype::BF16
    );
    let (want, _) = f32_values(&src, key);
    let (got, _) = f32_values(&out.join("adapter_model.safetensors"), key);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(half::bf16::from_f32(*w).to_f32(), *g);
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for part in ["alpaca-tiny (52 examples)", "Steps: 100", "1.2500", "1.5000", "r = 8", "`</s>`", "{{ messages }}"] {
        assert!(card.contains(part), "model card lacks {part:?}:\n{card}");
    }
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), "{{ messages }}");

    // f32 export loads back onto the base and gives PEFT's logits
    let out = tmp.path().join("f32");
    write_peft_adapter(&exported, &out, TensorDType::F32, None, &ExportInfo::default()).unwrap();
    let mut reloaded = Model::load(&model_dir(name), F32, &Device::Cpu).unwrap();
    reloaded.load_adapter(&out).unwrap();
    let logits = reloaded.forward(&reference(name, "input_ids"), false).unwrap();
    let d = max_abs_diff(&logits, &reference(name, "lora_logits"));
    assert!(d <= 1e-4, "logits differ by {d}");
}

fn merged_logits_match(
    name: &str,
    base: BaseWeights,
    into: MergeInto,
    opts_dtype: Option<TensorDType>,
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let opts = MergeOptions { into, dtype: opts_dtype, ..MergeOptions::default() };
    write_merged_model(&adapter(name), &model_dir(name), &out, &opts, &ExportInfo::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let ids = reference(name, "input_ids");
    let want = lora_model(name, base).forward(&ids, false).unwrap();
    let merged = Model::load(&out, F32, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let got = merged.forward(&ids, false).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "{name}: merged logits differ from base + adapter by {d}");
    (tmp, out)
}

/// DoRA: the merge folds the magnitudes into the weights (the merged model computes what base +
/// adapter compute); a GGUF adapter, which has no place for them, is refused with the way out.
#[test]
fn dora_merges_and_refuses_a_gguf_adapter() {
    merged_logits_match("llama_dora", F32, MergeInto::Original, None);
    let dora = adapter("llama_dora");
    assert!(dora.settings.use_dora && dora.magnitudes.len() == dora.pairs.len());
    let spec = qlora_studio::lora::export::spec_of(&model_dir("llama_dora")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = write_gguf_adapter(&dora, &spec, &tmp.path().join("a.gguf"), GgufType::F32, None, None).unwrap_err();
    assert!(e.to_string().contains("DoRA") && e.to_string().contains("merged"), "{e}");
    assert!(!tmp.path().join("a.gguf").exists());
}

#[test]
fn merged_model_equals_base_plus_adapter_for_every_family() {
    for name in DENSE_FIXTURES {
        let (_tmp, out) = merged_logits_match(name, F32, MergeInto::Original, None);
        // the merged model is not the base model: the adapter changed it
        let base = Model::load(&model_dir(name), F32, &Device::Cpu).unwrap();
        let ids = reference(name, "input_ids");
        let d = max_abs_diff(
            &base.forward(&ids, false).unwrap(),
            &Model::load(&out, F32, &Device::Cpu).unwrap().forward(&ids, false).unwrap(),
        );
        assert!(d > 1e-2, "{name}: merging changed nothing");
    }
}

#[test]
fn merge_into_dequantized_nf4_weights() {
    // a 4-bit checkpoint: its NF4 weights dequantized, plus the delta
    let (_tmp, out) = merged_logits_match(
        "llama_bnb4",
        BaseWeights::Nf4 { double_quant: true, compute: DType::F32 },
        MergeInto::Dequantized { double_quant: true },
        None,
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none(), "the merged model is not 4-bit");
    let merged = Model::load(&out, F32, &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &merged.forward(&reference("llama_bnb4", "input_ids"), false).unwrap(),
        &reference("llama_bnb4", "lora_logits"),
    );
    assert!(d <= 1e-4, "merged model vs bitsandbytes + PEFT: {d}");
    // the original 16-bit weights are not in a 4-bit checkpoint
    let e = write_merged_model(
        &adapter("llama_bnb4"),
        &model_dir("llama_bnb4"),
        Path::new("/tmp/never"),
        &MergeOptions::default(),
        &ExportInfo::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4-bit") && e.contains("--merge-into dequantized"), "{e}");
}

#[test]
fn divergence_of_original_and_dequantized_merges_against_the_qlora_model() {
    // a dense checkpoint quantized at load, as a QLoRA run trains on it
    let nf4 = BaseWeights::Nf4 { double_quant: true, compute: DType::F32 };
    let name = "llama_gqa_all_linear";
    let (_tmp1, dequantized) = merged_logits_match(name, nf4, MergeInto::Dequantized { double_quant: true }, None);
    let (_tmp2, original) = merged_logits_match(name, F32, MergeInto::Original, None);
    let qlora = lora_model(name, nf4);
    let vocab = common::fixture_model(name).vocab;
    let seqs = sample_sequences(vocab, 3, 16, 7);
    assert!(seqs.iter().all(|s| s.len() == 16 && s.iter().all(|&t| (t as usize) < vocab)));
    let same = divergence(&qlora, &Model::load(&dequantized, F32, &Device::Cpu).unwrap(), &seqs).unwrap();
    let other = divergence(&qlora, &Model::load(&original, F32, &Device::Cpu).unwrap(), &seqs).unwrap();
    assert_eq!(same.positions, 48);
    assert_eq!(same.top1_agreement, 1.0);
    assert!(same.mean_kl.abs() < 1e-6, "{same:?}");
    assert!(other.mean_kl > 10.0 * same.mean_kl.abs().max(1e-9) && other.max_abs_logit_diff > 1e-3, "{other:?}");

    // mean KL computed independently on plain vectors
    let ids = Tensor::new(seqs[0].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let base = Model::load(&model_dir(name), F32, &Device::Cpu).unwrap();
    let (p, q) = (qlora.forward(&ids, false).unwrap(), base.forward(&ids, false).unwrap());
    let rows = |t: &Tensor| t.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let log_softmax = |row: &[f32]| {
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&x| x as f64 - lse).collect::<Vec<f64>>()
    };
    let (pr, qr) = (rows(&p), rows(&q));
    let want: f64 = pr
        .iter()
        .zip(&qr)
        .map(|(a, b)| {
            let (la, lb) = (log_softmax(a), log_softmax(b));
            la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>()
        })
        .sum::<f64>()
        / pr.len() as f64;
    let got = divergence(&qlora, &base, &seqs[..1]).unwrap();
    assert!((got.mean_kl - want).abs() <= 1e-4 * want.max(1e-3), "{} vs {want}", got.mean_kl);
    assert!(got.top1_agreement < 1.0, "the adapter changes some top-1 predictions");
}

#[test]
fn sharded_bf16_merge_with_tokenizer_files_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    // a base folder with a tokenizer_config.json beside the fixture's files
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::write(base.join(f), std::fs::read(model_dir("llama").join(f)).unwrap()).unwrap();
    }
    std::fs::write(base.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    let out = tmp.path().join("merged");
    let opts = MergeOptions { dtype: Some(TensorDType::Bf16), max_shard_bytes: 100_000, ..MergeOptions::default() };
    let info = ExportInfo { chat_template: Some("{{ bos_token }}".into()), ..ExportInfo::default() };
    write_merged_model(&adapter("llama"), &base, &out, &opts, &info).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1 && !out.join("model.safetensors").exists());
    let n = shards.len();
    assert!(shards.iter().all(|s| s.ends_with(&format!("-of-{n:05}.safetensors"))), "{shards:?}");
    let src_keys = SafetensorsFile::open(base.join("model.safetensors")).unwrap().keys();
    assert_eq!(map.keys().cloned().collect::<Vec<_>>(), src_keys);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!((tc["eos_token"].as_str(), tc["chat_template"].as_str()), (Some("</s>"), Some("{{ bos_token }}")));
    assert!(out.join("generation_config.json").exists());
    // our loader reads the shards; bf16 rounding only
    let merged = Model::load(&out, F32, &Device::Cpu).unwrap();
    let want = reference("llama", "lora_logits");
    let d = max_abs_diff(&merged.forward(&reference("llama", "input_ids"), false).unwrap(), &want);
    let tolerance = common::bf16_logits_tolerance(common::fixture_model("llama").layers, &want);
    assert!(d < tolerance, "bf16 merged logits differ by {d} (tolerance {tolerance})");
    // exporting again replaces the folder whole
    write_merged_model(&adapter("llama"), &base, &out, &MergeOptions::default(), &info).unwrap();
    assert!(out.join("model.safetensors").exists() && !out.join("model.safetensors.index.json").exists());
}

// ---------------------------------------------------------------------------------------------
// GGUF

struct Gguf {
    content: gguf_file::Content,
    bytes: Vec<u8>,
}

impl Gguf {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        Gguf { content, bytes }
    }

    fn string(&self, key: &str) -> String {
        self.content.metadata[key].to_string().unwrap().clone()
    }

    fn tensor(&self, name: &str) -> Tensor {
        let mut f = std::io::Cursor::new(&self.bytes);
        self.content.tensor(&mut f, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        n.sort();
        n
    }
}

fn write_gguf(name: &str, a: &PeftAdapter, dtype: GgufType, template: Option<&str>) -> Gguf {
    // unique per call: tests run in parallel and write the same fixtures
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("qls-gguf-{}-{n}-{name}.gguf", std::process::id()));
    let spec = qlora_studio::lora::export::spec_of(&model_dir(name)).unwrap();
    write_gguf_adapter(a, &spec, &path, dtype, None, template).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = Gguf::read(&path);
    std::fs::remove_file(&path).unwrap();
    g
}

fn pair<'a>(a: &'a PeftAdapter, path: &str) -> &'a (Tensor, Tensor) {
    a.pairs.get(path).unwrap_or_else(|| panic!("no pair {path}"))
}

/// The docs' formula: P_n(B) = B.reshape(n, 2, hd/2, r).swapaxes(1, 2).reshape(out, r).
fn llama_permute(b: &Tensor, n: usize) -> Tensor {
    let (out, r) = b.dims2().unwrap();
    b.reshape((n, 2, out / n / 2, r)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((out, r)).unwrap()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = max_abs_diff(got, want);
    assert_eq!(d, 0.0, "{what}: values differ by {d}");
}

#[test]
fn gguf_llama_gqa_permutes_q_and_k_rows() {
    let name = "llama_gqa_all_linear";
    let fx = common::fixture_model(name);
    let a = adapter(name);
    let g = write_gguf(name, &a, GgufType::F32, Some("{% for m in messages %}{{ m.content }}{% endfor %}"));
    assert_eq!(g.string("general.architecture"), "llama");
    assert_eq!(g.string("general.type"), "adapter");
    assert_eq!(g.string("adapter.type"), "lora");
    assert_eq!(g.content.metadata["adapter.lora.alpha"].to_f32().unwrap(), fx.lora_alpha as f32);
    assert_eq!(g.string("tokenizer.chat_template"), "{% for m in messages %}{{ m.content }}{% endfor %}");
    let mut want: Vec<String> = Vec::new();
    for l in 0..fx.layers {
        for t in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            want.push(format!("blk.{l}.{t}.weight.lora_a"));
            want.push(format!("blk.{l}.{t}.weight.lora_b"));
        }
    }
    want.sort();
    assert_eq!(g.names(), want);
    // q rows permuted per query head, k rows per KV head
    assert!(fx.kv_heads < fx.heads, "{name} is a GQA model");
    for l in 0..fx.layers {
        let p = format!("model.layers.{l}.self_attn");
        let (qa, qb) = pair(&a, &format!("{p}.q_proj"));
        let (_, kb) = pair(&a, &format!("{p}.k_proj"));
        let (_, vb) = pair(&a, &format!("{p}.v_proj"));
        let (_, db) = pair(&a, &format!("model.layers.{l}.mlp.down_proj"));
        assert_same(&g.tensor(&format!("blk.{l}.attn_q.weight.lora_a")), qa, "q A as is");
        assert_same(&g.tensor(&format!("blk.{l}.attn_q.weight.lora_b")), &llama_permute(qb, fx.heads), "q B");
        assert_same(&g.tensor(&format!("blk.{l}.attn_k.weight.lora_b")), &llama_permute(kb, fx.kv_heads), "k B");
        assert_same(&g.tensor(&format!("blk.{l}.attn_v.weight.lora_b")), vb, "v B unpermuted");
        assert_same(&g.tensor(&format!("blk.{l}.ffn_down.weight.lora_b")), db, "down B");
        // the permutation is not the identity on this fixture
        assert!(max_abs_diff(&llama_permute(qb, fx.heads), qb) > 0.0);
    }
    // GGUF's ne is the PyTorch shape reversed: A is [in, r], B [r, out]
    let info = &g.content.tensor_infos["blk.0.attn_k.weight.lora_b"];
    assert_eq!(info.shape.dims(), fx.adapter_shape("layers.0.self_attn.k_proj.lora_B.weight"));
    assert_eq!(info.ggml_dtype, candle_core::quantized::GgmlDType::F32);
}

#[test]
fn gguf_fused_qkv_reorders_and_splits() {
    // BLOOM: per-head [q_h; k_h; v_h] → [Q; K; V], one attn_qkv
    let a = adapter("bloom");
    let g = write_gguf("bloom", &a, GgufType::F32, None);
    assert_eq!(g.string("general.architecture"), "bloom");
    let (_, b) = pair(&a, "transformer.h.0.self_attention.query_key_value");
    let fx = common::fixture_model("bloom");
    let (nh, hd, r) = (fx.heads, fx.head_dim, fx.lora_r);
    let v = b.reshape((nh, 3, hd, r)).unwrap();
    let part = |j: usize| v.narrow(1, j, 1).unwrap().reshape((nh * hd, r)).unwrap();
    let want = Tensor::cat(&[part(0), part(1), part(2)], 0).unwrap();
    assert_same(&g.tensor("blk.0.attn_qkv.weight.lora_b"), &want, "bloom qkv");
    assert!(max_abs_diff(&want, b) > 0.0);

    // Falcon 40B style: (nkv, nh/nkv + 2, hd) groups → [Q; K; V]
    let a = adapter("falcon_40b_style");
    let g = write_gguf("falcon_40b_style", &a, GgufType::F32, None);
    assert_eq!(g.string("general.architecture"), "falcon");
    let (_, b) = pair(&a, "transformer.h.1.self_attention.query_key_value");
    let fx = common::fixture_model("falcon_40b_style");
    let (nkv, per, hd, r) = (fx.kv_heads, fx.heads / fx.kv_heads, fx.head_dim, fx.lora_r);
    let v = b.reshape((nkv, per + 2, hd, r)).unwrap();
    let q = v.narrow(1, 0, per).unwrap().reshape((nkv * per * hd, r)).unwrap();
    let k = v.narrow(1, per, 1).unwrap().reshape((nkv * hd, r)).unwrap();
    let vv = v.narrow(1, per + 1, 1).unwrap().reshape((nkv * hd, r)).unwrap();
    assert_same(&g.tensor("blk.1.attn_qkv.weight.lora_b"), &Tensor::cat(&[q, k, vv], 0).unwrap(), "falcon qkv");

    // Baichuan: W_pack → attn_q, attn_k, attn_v sharing A; q and k thirds permuted
    let a = adapter("baichuan_7b");
    let g = write_gguf("baichuan_7b", &a, GgufType::F32, None);
    assert_eq!(g.string("general.architecture"), "baichuan");
    let fx = common::fixture_model("baichuan_7b");
    // A and B of q, k and v in every layer
    assert_eq!(g.names().len(), fx.layers * 3 * 2);
    let (wa, wb) = pair(&a, "model.layers.0.self_attn.W_pack");
    let h = fx.hidden;
    for (i, t) in ["attn_q", "attn_k", "attn_v"].iter().enumerate() {
        assert_same(&g.tensor(&format!("blk.0.{t}.weight.lora_a")), wa, "shared A");
        let third = wb.narrow(0, i * h, h).unwrap();
        let want = if i < 2 { llama_permute(&third, fx.heads) } else { third };
        assert_same(&g.tensor(&format!("blk.0.{t}.weight.lora_b")), &want, t);
    }

    // Qwen2 (NeoX RoPE), ChatGLM3 and Qwen v1: names only, rows untouched
    for (name, arch, path, tensor) in [
        ("qwen2", "qwen2", "model.layers.0.self_attn.q_proj", "blk.0.attn_q"),
        ("chatglm3", "chatglm", "transformer.encoder.layers.1.self_attention.query_key_value", "blk.1.attn_qkv"),
        ("qwen", "qwen", "transformer.h.0.attn.c_attn", "blk.0.attn_qkv"),
        ("phi_msft", "phi2", "transformer.h.0.mixer.Wqkv", "blk.0.attn_qkv"),
        ("phi", "phi2", "model.layers.0.self_attn.dense", "blk.0.attn_output"),
        ("xverse", "xverse", "model.layers.0.self_attn.v_proj", "blk.0.attn_v"),
    ] {
        let a = adapter(name);
        let g = write_gguf(name, &a, GgufType::F32, None);
        assert_eq!(g.string("general.architecture"), arch, "{name}");
        assert_same(&g.tensor(&format!("{tensor}.weight.lora_b")), &pair(&a, path).1, name);
    }
}

#[test]
fn gguf_f16_rslora_alpha_and_moe_experts() {
    let name = "llama";
    let fx = common::fixture_model(name);
    let mut a = adapter(name);
    a.settings.use_rslora = true;
    let g = write_gguf(name, &a, GgufType::F16, None);
    // llama.cpp scales by alpha/r: rsLoRA's alpha/√r needs alpha·√r
    let alpha = g.content.metadata["adapter.lora.alpha"].to_f32().unwrap();
    let want = (fx.lora_alpha * (fx.lora_r as f64).sqrt()) as f32;
    assert!((alpha - want).abs() < 1e-4 * want, "{alpha} vs {want}");
    assert!(!g.content.metadata.contains_key("tokenizer.chat_template"));
    let (_, vb) = pair(&a, "model.layers.1.self_attn.v_proj");
    let info = &g.content.tensor_infos["blk.1.attn_v.weight.lora_b"];
    assert_eq!(info.ggml_dtype, candle_core::quantized::GgmlDType::F16);
    let want = vb.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    assert_same(&g.tensor("blk.1.attn_v.weight.lora_b"), &want, "f16 B");

    // Mixtral: expert LoRAs stack into 3-D tensors [E, r, in] / [E, out, r]
    let mut model = Model::load(&model_dir("mixtral"), F32, &Device::Cpu).unwrap();
    let settings = LoraSettings::with_rank(4, vec!["w1".into(), "w2".into(), "q_proj".into()]);
    model.add_lora(&settings, 3).unwrap();
    let a = PeftAdapter::from_model(&model, &settings).unwrap();
    let g = write_gguf("mixtral", &a, GgufType::F32, None);
    let mixtral = common::fixture_model("mixtral");
    let e = mixtral.config_usize(&["num_local_experts"]).expect("mixtral's config names its experts");
    let ea = g.tensor("blk.0.ffn_gate_exps.weight.lora_a");
    assert_eq!(ea.dims(), &[e, settings.r, mixtral.hidden]);
    let (a2, _) = pair(&a, "model.layers.0.block_sparse_moe.experts.2.w1");
    assert_same(&ea.get(2).unwrap(), a2, "expert 2 A");
    assert_eq!(g.tensor("blk.1.ffn_down_exps.weight.lora_b").dims()[0], e);
    assert!(g.names().iter().all(|n| !n.contains("ffn_up")));
    // LoRA on the router has no place in a llama.cpp adapter
    let mut model = Model::load(&model_dir("mixtral"), F32, &Device::Cpu).unwrap();
    let settings = LoraSettings { targets: vec!["gate".into()], ..settings };
    model.add_lora(&settings, 3).unwrap();
    let a = PeftAdapter::from_model(&model, &settings).unwrap();
    let spec = qlora_studio::lora::export::spec_of(&model_dir("mixtral")).unwrap();
    let e = write_gguf_adapter(&a, &spec, &std::env::temp_dir().join("qls-never.gguf"), GgufType::F32, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("router"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The export job and its errors

fn request(from: &Path, format: ExportFormat, base: Option<&Path>, out: &Path) -> ExportRequest {
    ExportRequest {
        from: from.to_path_buf(),
        format,
        base: base.map(Path::to_path_buf),
        out: out.to_path_buf(),
        dtype: None,
        merge_into: MergeInto::Original,
        modelfile: false,
        divergence_check: false,
        trained_on_nf4: None,
        check_sequences: Vec::new(),
        info: ExportInfo::default(),
    }
}

/// A training checkpoint folder: the PEFT adapter naming its base folder, and run.toml.
fn checkpoint(tmp: &Path, name: &str) -> PathBuf {
    let ckpt = tmp.join(format!("checkpoint-{name}"));
    std::fs::create_dir_all(&ckpt).unwrap();
    let src = model_dir(name).join("adapter");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    config["base_model_name_or_path"] = model_dir(name).display().to_string().into();
    std::fs::write(ckpt.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::write(
        ckpt.join("adapter_model.safetensors"),
        std::fs::read(src.join("adapter_model.safetensors")).unwrap(),
    )
    .unwrap();
    std::fs::write(ckpt.join("run.toml"), "[run]\nname = \"tiny\"\n").unwrap();
    ckpt
}

#[test]
fn export_job_from_a_checkpoint_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path(), "llama");
    // PEFT: the run's config goes into the card
    let out = tmp.path().join("peft");
    export(&request(&ckpt, ExportFormat::Peft, None, &out)).unwrap();
    assert!(std::fs::read_to_string(out.join("README.md")).unwrap().contains("name = \"tiny\""));
    // GGUF with a Modelfile, the base found through base_model_name_or_path
    let gguf_out = tmp.path().join("adapter.gguf");
    let mut req = request(&ckpt, ExportFormat::Gguf, None, &gguf_out);
    req.modelfile = true;
    req.dtype = Some(TensorDType::F16);
    req.info.stop_tokens = vec!["</s>".into()];
    let report = export(&req).unwrap();
    assert_eq!(report.written.len(), 2);
    let fx = common::fixture_model("llama");
    // one GGUF tensor for each PEFT tensor (llama: nothing fused to split)
    assert_eq!(Gguf::read(&gguf_out).names().len(), fx.adapter_tensors.len());
    let modelfile = std::fs::read_to_string(tmp.path().join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("ADAPTER ./adapter.gguf") && modelfile.contains("PARAMETER stop \"</s>\""),
        "{modelfile}"
    );
    // merged, with the divergence check: the merge keeps the adapter's predictions
    let mut req = request(&ckpt, ExportFormat::Merged, None, &tmp.path().join("merged"));
    req.divergence_check = true;
    let d = export(&req).unwrap().divergence.unwrap();
    assert_eq!(d.top1_agreement, 1.0);
    assert!(d.mean_kl.abs() < 1e-6 && d.positions == 128, "{d:?}");

    // a base named relative to the checkpoint folder, and the check on given token ids
    std::os::unix::fs::symlink(model_dir("llama"), tmp.path().join("base")).unwrap();
    let config_path = ckpt.join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["base_model_name_or_path"] = "../base".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut req = request(&ckpt, ExportFormat::Merged, None, &tmp.path().join("merged"));
    req.divergence_check = true;
    let vocab = fx.vocab as u32;
    req.check_sequences = vec![vec![1, 2, 3, 4], vec![vocab - 1, 7]];
    assert_eq!(export(&req).unwrap().divergence.unwrap().positions, 6);
    req.check_sequences = vec![vec![1, vocab]];
    let e = export(&req).unwrap_err().to_string();
    assert!(e.contains(&vocab.to_string()) && e.contains("vocabulary"), "{e}");
}

#[test]
fn bad_paths_and_mismatched_bases_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |req: ExportRequest| export(&req).unwrap_err().to_string();
    let out = tmp.path().join("out");

    let e = err(request(&tmp.path().join("nope"), ExportFormat::Peft, None, &out));
    assert!(e.contains("nope") && e.contains("no such folder"), "{e}");
    let e = err(request(tmp.path(), ExportFormat::Peft, None, &out));
    assert!(e.contains("neither a PEFT adapter folder"), "{e}");
    // the fixture adapters name "." as their base: not a model folder
    let e = err(request(&model_dir("llama").join("adapter"), ExportFormat::Gguf, None, &out));
    assert!(e.contains("--model"), "{e}");
    // a LLaMA adapter on Baichuan
    let e =
        err(request(&model_dir("llama").join("adapter"), ExportFormat::Merged, Some(&model_dir("baichuan_7b")), &out));
    assert!(e.contains("q_proj") && e.contains("W_pack"), "{e}");
    // same names, other shapes (GQA adapter on an MHA base)
    let e = err(request(
        &model_dir("llama_gqa_all_linear").join("adapter"),
        ExportFormat::Merged,
        Some(&model_dir("llama")),
        &out,
    ));
    assert!(e.contains("k_proj") && e.contains("base model"), "{e}");
    assert!(!out.exists(), "a failed export leaves nothing behind");
    // a GGUF adapter needs a file name in an existing folder
    let e =
        err(request(&model_dir("llama").join("adapter"), ExportFormat::Gguf, Some(&model_dir("llama")), tmp.path()));
    assert!(e.contains("is a folder"), "{e}");
    let e = err(request(
        &model_dir("llama").join("adapter"),
        ExportFormat::Gguf,
        Some(&model_dir("llama")),
        &tmp.path().join("missing/a.gguf"),
    ));
    assert!(e.contains("does not exist"), "{e}");
    // bf16 GGUF is refused with what to choose
    let mut req = request(&model_dir("llama").join("adapter"), ExportFormat::Gguf, Some(&model_dir("llama")), &out);
    req.dtype = Some(TensorDType::Bf16);
    assert!(err(req).contains("f32 or f16"));
    // never over the folders an export reads
    let ckpt = checkpoint(tmp.path(), "llama");
    let e = err(request(&ckpt, ExportFormat::Peft, None, &ckpt));
    assert!(e.contains("reads from"), "{e}");
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("config.json"), std::fs::read(model_dir("llama").join("config.json")).unwrap()).unwrap();
    std::fs::write(
        base.join("model.safetensors"),
        std::fs::read(model_dir("llama").join("model.safetensors")).unwrap(),
    )
    .unwrap();
    let e = err(request(&ckpt, ExportFormat::Merged, Some(&base), &base));
    assert!(e.contains("its own base model"), "{e}");
    assert!(base.join("model.safetensors").exists());
    // an existing folder that is not an export is never replaced
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("notes.txt"), "mine").unwrap();
    let e = err(request(&model_dir("llama").join("adapter"), ExportFormat::Peft, None, &keep));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_to_string(keep.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn importing_an_adapter_onto_another_family_is_refused() {
    // target names the model lacks
    let mut llama = Model::load(&model_dir("llama"), F32, &Device::Cpu).unwrap();
    let e = llama.load_adapter(&model_dir("baichuan_7b").join("adapter")).unwrap_err().to_string();
    assert!(e.contains("target_modules") && e.contains("W_pack") && e.contains("q_proj"), "{e}");
    // same module names, but the adapter names a Mistral base
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path(), "mistral");
    let e = llama.load_adapter(&ckpt).unwrap_err().to_string();
    assert!(e.contains("mistral") && e.contains("base_model_name_or_path"), "{e}");
    // its own base takes it
    let mut mistral = Model::load(&model_dir("mistral"), F32, &Device::Cpu).unwrap();
    mistral.load_adapter(&ckpt).unwrap();
}

#[test]
fn gguf_maps_every_linear_of_every_family() {
    // LoRA on all linears: each one gets llama.cpp's tensor name, and only W_pack is split
    for name in DENSE_FIXTURES.iter().filter(|n| **n != "mixtral") {
        let mut model = Model::load(&model_dir(name), F32, &Device::Cpu).unwrap();
        let settings = LoraSettings::with_rank(2, vec!["all-linear".into()]);
        model.add_lora(&settings, 1).unwrap();
        let a = PeftAdapter::from_model(&model, &settings).unwrap();
        let g = write_gguf(name, &a, GgufType::F32, None);
        let split = if name.starts_with("baichuan") { 2 } else { 0 };
        assert_eq!(g.names().len(), 2 * (a.pairs.len() + split * model.spec.layers), "{name}: {:?}", g.names());
        assert!(g.names().iter().all(|n| n.starts_with("blk.")), "{name}");
    }
    // Qwen v1: w1 is up, w2 the gate, and both c_proj find their own tensor
    let mut model = Model::load(&model_dir("qwen"), F32, &Device::Cpu).unwrap();
    let settings = LoraSettings::with_rank(2, vec!["all-linear".into()]);
    model.add_lora(&settings, 1).unwrap();
    let a = PeftAdapter::from_model(&model, &settings).unwrap();
    let g = write_gguf("qwen", &a, GgufType::F32, None);
    for (path, tensor) in [
        ("transformer.h.1.mlp.w1", "blk.1.ffn_up"),
        ("transformer.h.1.mlp.w2", "blk.1.ffn_gate"),
        ("transformer.h.1.mlp.c_proj", "blk.1.ffn_down"),
        ("transformer.h.1.attn.c_proj", "blk.1.attn_output"),
    ] {
        assert_same(&g.tensor(&format!("{tensor}.weight.lora_a")), &pair(&a, path).0, tensor);
    }
}

// Merged models as one llama.cpp GGUF

/// GPT-2's printable stand-in for each byte (its `bytes_to_unicode`), the symbols of a byte-level BPE.
fn byte_symbols() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// A copy of fixture `name` with a byte-level BPE tokenizer over its vocabulary (the fixtures
/// ship none; a GGUF model needs one): the 256 byte symbols, then `<extra_N>` tokens.
fn fixture_with_tokenizer(tmp: &Path, name: &str) -> PathBuf {
    use qlora_studio::hub::tokenizer::{build_tokenizer_json, GgufVocab, VocabKind};
    let fx = common::fixture_model(name);
    assert!(fx.vocab >= 256, "{name}: a byte-level tokenizer needs at least 256 tokens, the fixture has {}", fx.vocab);
    let base = tmp.join(format!("base-{name}"));
    std::fs::create_dir_all(&base).unwrap();
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        if model_dir(name).join(file).is_file() {
            std::fs::copy(model_dir(name).join(file), base.join(file)).unwrap();
        }
    }
    let mut tokens = byte_symbols();
    tokens.extend((256..fx.vocab).map(|i| format!("<extra_{i}>")));
    let vocab = GgufVocab {
        kind: VocabKind::ByteLevelBpe { pre: "gpt2".into() },
        token_type: vec![1; tokens.len()],
        tokens,
        merges: Vec::new(),
        bos: None,
        eos: None,
        pad: None,
        unk: None,
        add_bos: false,
    };
    let json = build_tokenizer_json(&vocab).unwrap();
    std::fs::write(base.join("tokenizer.json"), json.to_string()).unwrap();
    base
}

/// The largest |logit| difference between two models on the fixture's input, relative to the
/// largest |logit| of `want`.
fn relative_logit_error(name: &str, want: &Model, got: &Model) -> f32 {
    let ids = reference(name, "input_ids");
    let (w, g) = (want.forward(&ids, false).unwrap(), got.forward(&ids, false).unwrap());
    let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max_abs_diff(&w, &g) / scale
}

/// The merged GGUF, read back with the GGUF importer (which reads llama.cpp's own files, e.g.
/// SmolLM2's), computes what the merged safetensors model computes: the tensor names, the q/k row
/// permutation (GQA included), tied embeddings, biases and the hyper-parameters are llama.cpp's.
/// F16 holds the logits to 1% of their scale (a wrong layout is off by their whole scale); Q8_0
/// and Q4_K_M (on these narrow rows mostly Q5_0) hold each tensor to its quantization's error
/// against the F16 file, and the logits to 6% and 50%.
#[test]
fn merged_gguf_models_import_back_with_the_merged_models_logits() {
    use qlora_studio::lora::gguf_model::GgufQuant;
    for name in ["llama_gqa_all_linear", "llama_tied", "qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = fixture_with_tokenizer(tmp.path(), name);
        let merged = tmp.path().join("merged");
        write_merged_model(&adapter(name), &base, &merged, &MergeOptions::default(), &ExportInfo::default()).unwrap();
        let want = Model::load(&merged, F32, &Device::Cpu).unwrap();
        let mut f16: Option<Gguf> = None;
        for (quant, logit_bound, tensor_bound) in
            [(GgufQuant::F16, 0.01, 0.0), (GgufQuant::Q8_0, 0.06, 0.01), (GgufQuant::Q4KM, 0.5, 0.08)]
        {
            let out = tmp.path().join(format!("{name}-{}.gguf", quant.label()));
            let req = request(&model_dir(name).join("adapter"), ExportFormat::GgufModel(quant), Some(&base), &out);
            export(&req).unwrap_or_else(|e| panic!("{name} {quant:?}: {e}"));
            let gguf = Gguf::read(&out);
            let arch = if name == "qwen2" { "qwen2" } else { "llama" };
            assert_eq!(gguf.string("general.architecture"), arch);
            assert_eq!(gguf.string("tokenizer.ggml.model"), "gpt2");
            assert_eq!(gguf.string("tokenizer.ggml.pre"), "gpt-2", "the byte-level regex, named as llama.cpp names it");
            let imported = tmp.path().join(format!("imported-{}", quant.label()));
            std::fs::create_dir_all(&imported).unwrap();
            qlora_studio::hub::gguf::convert(&out, &imported).unwrap_or_else(|e| panic!("{name} {quant:?}: {e}"));
            let got = Model::load(&imported, F32, &Device::Cpu).unwrap();
            let err = relative_logit_error(name, &want, &got);
            assert!(err <= logit_bound, "{name} {quant:?}: logits off by {err} of their scale (bound {logit_bound})");
            match &f16 {
                None => f16 = Some(gguf),
                Some(reference) => {
                    assert_eq!(gguf.names(), reference.names());
                    for t in gguf.names() {
                        let (a, b) = (gguf.tensor(&t), reference.tensor(&t));
                        let rms = |x: &Tensor| {
                            x.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
                        };
                        let rel = rms(&(&a - &b).unwrap()) / rms(&b);
                        assert!(rel <= tensor_bound, "{name} {quant:?} {t}: relative RMS error {rel}");
                    }
                }
            }
        }
        // the adapter is in it: the base model's logits are far from the merged ones
        let base_model = Model::load(&base, F32, &Device::Cpu).unwrap();
        assert!(relative_logit_error(name, &want, &base_model) > 0.05, "{name}: the adapter changed nothing");
    }
}

/// Q4_K_M picks each tensor's type as llama-quantize does: more bits for attn_v and ffn_down in
/// the first and last eighth of the layers and every third between; the output in Q6_K; rows too
/// narrow for a 256-wide k-quant block fall back (Q4_K → Q5_0, Q6_K → Q8_0); norms in f32.
#[test]
fn q4_k_m_tensor_types_follow_llama_quantize() {
    use qlora_studio::lora::gguf_model::GgufQuant;
    let name = "llama_gqa_all_linear";
    let fx = common::fixture_model(name);
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture_with_tokenizer(tmp.path(), name);
    let out = tmp.path().join("m.gguf");
    export(&request(&model_dir(name).join("adapter"), ExportFormat::GgufModel(GgufQuant::Q4KM), Some(&base), &out))
        .unwrap();
    let gguf = Gguf::read(&out);
    let ty = |t: &str| gguf.content.tensor_infos[t].ggml_dtype;
    use candle_core::quantized::GgmlDType as T;
    let k_quant = |wide: T, narrow: T| if fx.hidden.is_multiple_of(256) { wide } else { narrow };
    let more_bits =
        |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2;
    for layer in 0..fx.layers {
        let down_cols = fx.config["intermediate_size"].as_u64().unwrap() as usize;
        let (v, down) = (ty(&format!("blk.{layer}.attn_v.weight")), ty(&format!("blk.{layer}.ffn_down.weight")));
        if more_bits(layer, fx.layers) {
            assert_eq!(v, k_quant(T::Q6K, T::Q8_0), "layer {layer} attn_v");
            assert_eq!(down, if down_cols.is_multiple_of(256) { T::Q6K } else { T::Q8_0 }, "layer {layer} ffn_down");
        } else {
            assert_eq!(v, k_quant(T::Q4K, T::Q5_0), "layer {layer} attn_v");
        }
        assert_eq!(ty(&format!("blk.{layer}.attn_q.weight")), k_quant(T::Q4K, T::Q5_0));
        assert_eq!(ty(&format!("blk.{layer}.attn_norm.weight")), T::F32);
    }
    assert_eq!(ty("output.weight"), k_quant(T::Q6K, T::Q8_0));
    assert_eq!(gguf.content.metadata["general.file_type"].to_u32().unwrap(), 15, "llama.cpp's MOSTLY_Q4_K_M");
}

/// Fixture `name`'s adapter merged onto `base` as safetensors (in `tmp`/merged) and exported onto
/// it as an F16 GGUF: the merged checkpoint's folder and the file.
fn merged_and_f16_gguf(tmp: &Path, name: &str, base: &Path) -> (PathBuf, Gguf) {
    use qlora_studio::lora::gguf_model::GgufQuant;
    let merged = tmp.join("merged");
    write_merged_model(&adapter(name), base, &merged, &MergeOptions::default(), &ExportInfo::default()).unwrap();
    let out = tmp.join("m.gguf");
    export(&request(&model_dir(name).join("adapter"), ExportFormat::GgufModel(GgufQuant::F16), Some(base), &out))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (merged, Gguf::read(&out))
}

/// A model whose graph llama.cpp would compute differently is refused before anything is merged
/// or written, naming the family: llama.cpp applies RoPE to Baichuan at 32 layers only and ALiBi
/// at 40 only, and the fixtures have 2.
#[test]
fn merged_gguf_is_refused_for_models_llama_cpp_would_run_differently() {
    use qlora_studio::lora::gguf_model::GgufQuant;
    for (name, layers) in [("baichuan_7b", "32"), ("baichuan2_13b", "40")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.gguf");
        let req = request(
            &model_dir(name).join("adapter"),
            ExportFormat::GgufModel(GgufQuant::F16),
            Some(&model_dir(name)),
            &out,
        );
        let e = export(&req).unwrap_err().to_string();
        let spec = qlora_studio::lora::export::spec_of(&model_dir(name)).unwrap();
        assert!(e.contains(&spec.family_name()) && e.contains("merged model (safetensors)"), "{name}: {e}");
        assert!(e.contains(&format!("{layers} layers")), "{name}: the message says which depth llama.cpp needs: {e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "{name}: nothing may be written");
    }
}

/// A copy of `dir`'s model made `layers` deep by repeating its layers (layer i is layer i mod n).
fn deepen(dir: &Path, layers: usize) {
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let n = config["num_hidden_layers"].as_u64().unwrap() as usize;
    config["num_hidden_layers"] = layers.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let file = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let mut out = std::collections::HashMap::new();
    for key in file.keys() {
        let t = file.tensor(&key, &Device::Cpu).unwrap();
        match key.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')) {
            Some((i, rest)) => {
                for j in (i.parse::<usize>().unwrap()..layers).step_by(n) {
                    out.insert(format!("model.layers.{j}.{rest}"), t.clone());
                }
            }
            None => {
                out.insert(key, t);
            }
        }
    }
    drop(file);
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
}

/// The tensors llama.cpp's loader creates for each architecture (src/models/{arch}.cpp,
/// `load_arch_tensors`): global ones, then each layer's (`.weight` and, where it may have one,
/// `.bias`). A name outside these fails to load ("wrong number of tensors").
fn llama_cpp_tensors(arch: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    let llama =
        vec!["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];
    match arch {
        "llama" => {
            let mut layer = llama;
            layer.extend(["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]);
            (vec!["token_embd", "output_norm", "output"], layer)
        }
        "qwen2" | "xverse" | "baichuan" => (vec!["token_embd", "output_norm", "output"], llama),
        "qwen" => (
            vec!["token_embd", "output_norm", "output"],
            vec!["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"],
        ),
        "falcon" => (
            vec!["token_embd", "output_norm", "output"],
            vec!["attn_norm", "attn_norm_2", "attn_qkv", "attn_output", "ffn_up", "ffn_down"],
        ),
        "bloom" => (
            vec!["token_embd", "token_embd_norm", "output_norm", "output"],
            vec!["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"],
        ),
        "phi2" => (
            vec!["token_embd", "output_norm", "output"],
            vec!["attn_norm", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"],
        ),
        "chatglm" => (
            vec!["token_embd", "output_norm", "output"],
            vec!["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"],
        ),
        other => panic!("no tensor list for {other}"),
    }
}

/// Every family's merged GGUF holds what llama.cpp's loader for its architecture asks for: only
/// the tensor names it creates, the hyper-parameters it reads (its norm's epsilon key among
/// them), and every weight of the merged checkpoint once (the same total energy, so nothing is
/// dropped or doubled). llama.cpp itself runs these files in scripts/llama-cpp-check/fixtures.sh.
#[test]
fn merged_gguf_of_every_family_is_what_llama_cpp_loads() {
    for name in DENSE_FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let base = fixture_with_tokenizer(tmp.path(), name);
        // llama.cpp runs Baichuan with RoPE at 32 layers and ALiBi at 40 only
        match *name {
            "baichuan_7b" | "baichuan2_7b" => deepen(&base, 32),
            "baichuan_13b" | "baichuan2_13b" => deepen(&base, 40),
            _ => {}
        }
        let spec = qlora_studio::lora::export::spec_of(&base).unwrap();
        let arch = spec.gguf_arch.clone().unwrap();
        let (merged, gguf) = merged_and_f16_gguf(tmp.path(), name, &base);
        assert_eq!(gguf.string("general.architecture"), arch, "{name}");
        let (global, layer) = llama_cpp_tensors(&arch);
        for t in gguf.names() {
            let (stem, part) = t.rsplit_once('.').unwrap();
            let known = match stem.strip_prefix("blk.") {
                Some(rest) => {
                    let (i, tensor) = rest.split_once('.').unwrap();
                    i.parse::<usize>().unwrap() < spec.layers && layer.contains(&tensor)
                }
                None => global.contains(&stem),
            };
            assert!(known && (part == "weight" || part == "bias"), "{name}: llama.cpp's {arch} has no tensor {t}");
        }
        let eps = if matches!(arch.as_str(), "falcon" | "bloom" | "phi2") {
            "attention.layer_norm_epsilon"
        } else {
            "attention.layer_norm_rms_epsilon"
        };
        for key in
            ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count", eps]
        {
            assert!(gguf.content.metadata.contains_key(&format!("{arch}.{key}")), "{name}: no {arch}.{key}");
        }
        // every weight once: the sum of squares of the file is the merged checkpoint's
        let ckpt = SafetensorsFile::open(merged.join("model.safetensors")).unwrap();
        let energy =
            |t: &Tensor| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let want: f64 = ckpt
            .keys()
            .iter()
            .filter(|k| !(k.ends_with("inv_freq") || spec.normalized_lm_head && k.starts_with("lm_head")))
            .map(|k| energy(&ckpt.tensor(k, &Device::Cpu).unwrap()))
            .sum();
        let got: f64 = gguf
            .names()
            .iter()
            .filter(|t| !(spec.normalized_lm_head && t.starts_with("output.")))
            .map(|t| energy(&gguf.tensor(t)))
            .sum();
        assert!((got - want).abs() <= 1e-3 * want, "{name}: the file's weights hold {got}, the checkpoint's {want}");
    }
}

/// The row transforms of the fused projections, checked against the merged checkpoint with the
/// converters' own index arithmetic: Falcon's and BLOOM's per-group [q…; k; v] rows become
/// [Q; K; V] (falcon.py's view(n_kv, n_head/n_kv + 2, hd, …), bloom.py's reshape(n_head, 3, hd, …)),
/// Baichuan's W_pack is cut in three with q and k permuted as LLaMA's, and Baichuan2's NormHead
/// is applied to the output rows, which llama.cpp does not do.
#[test]
fn merged_gguf_reorders_fused_qkv_and_normalizes_baichuan2_head() {
    for name in ["falcon_40b_style", "bloom", "baichuan2_7b"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = fixture_with_tokenizer(tmp.path(), name);
        if name == "baichuan2_7b" {
            deepen(&base, 32);
        }
        let spec = qlora_studio::lora::export::spec_of(&base).unwrap();
        let (merged, gguf) = merged_and_f16_gguf(tmp.path(), name, &base);
        let ckpt = SafetensorsFile::open(merged.join("model.safetensors")).unwrap();
        let hf = |key: &str| ckpt.tensor(key, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let (nh, nkv, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            assert_eq!(got.dims(), want.dims(), "{name} {what}: shape");
            let d = max_abs_diff(got, want);
            assert!(d <= 1e-3, "{name} {what}: off by {d}");
        };
        let heads = |w: &Tensor, blocks: &[usize]| {
            Tensor::cat(&blocks.iter().map(|&b| w.narrow(0, b * hd, hd).unwrap()).collect::<Vec<_>>(), 0).unwrap()
        };
        let layer = spec.layers - 1;
        match name {
            "falcon_40b_style" | "bloom" => {
                let key = format!("transformer.h.{layer}.self_attention.query_key_value");
                // group g holds head blocks g·(per+2) … : per query heads, then k, then v
                let per = nh / nkv;
                let q: Vec<usize> = (0..nkv).flat_map(|g| (0..per).map(move |j| g * (per + 2) + j)).collect();
                let k: Vec<usize> = (0..nkv).map(|g| g * (per + 2) + per).collect();
                let v: Vec<usize> = (0..nkv).map(|g| g * (per + 2) + per + 1).collect();
                let order: Vec<usize> = q.into_iter().chain(k).chain(v).collect();
                close(
                    &gguf.tensor(&format!("blk.{layer}.attn_qkv.weight")),
                    &heads(&hf(&format!("{key}.weight")), &order),
                    "attn_qkv",
                );
                if name == "bloom" {
                    let bias = hf(&format!("{key}.bias")).unsqueeze(1).unwrap();
                    let got = gguf.tensor(&format!("blk.{layer}.attn_qkv.bias")).unsqueeze(1).unwrap();
                    close(&got, &heads(&bias, &order), "attn_qkv bias");
                }
            }
            _ => {
                let w = hf(&format!("model.layers.{layer}.self_attn.W_pack.weight"));
                let third = |i: usize| w.narrow(0, i * nh * hd, nh * hd).unwrap();
                close(&gguf.tensor(&format!("blk.{layer}.attn_q.weight")), &llama_permute(&third(0), nh), "attn_q");
                close(&gguf.tensor(&format!("blk.{layer}.attn_k.weight")), &llama_permute(&third(1), nh), "attn_k");
                close(&gguf.tensor(&format!("blk.{layer}.attn_v.weight")), &third(2), "attn_v");
                let head = hf("lm_head.weight");
                let norms = head.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
                close(&gguf.tensor("output.weight"), &head.broadcast_div(&norms).unwrap(), "output (NormHead)");
            }
        }
    }
}

/// Mixtral: each layer's experts stacked into one 3-D tensor per projection (w1 → ffn_gate_exps,
/// w3 → ffn_up_exps, w2 → ffn_down_exps) as llama.cpp holds them, the router as ffn_gate_inp in
/// f32, and the expert counts in the metadata; values as the merged checkpoint's.
#[test]
fn merged_gguf_of_mixtral_stacks_the_experts() {
    let name = "mixtral";
    let fx = common::fixture_model(name);
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture_with_tokenizer(tmp.path(), name);
    let (merged, gguf) = merged_and_f16_gguf(tmp.path(), name, &base);
    let experts = fx.config["num_local_experts"].as_u64().unwrap() as usize;
    assert_eq!(gguf.content.metadata["llama.expert_count"].to_u32().unwrap() as usize, experts);
    assert_eq!(
        gguf.content.metadata["llama.expert_used_count"].to_u32().unwrap() as u64,
        fx.config["num_experts_per_tok"].as_u64().unwrap()
    );
    let ckpt = SafetensorsFile::open(merged.join("model.safetensors")).unwrap();
    for layer in 0..fx.layers {
        let router = format!("blk.{layer}.ffn_gate_inp.weight");
        assert_eq!(gguf.content.tensor_infos[&router].ggml_dtype, candle_core::quantized::GgmlDType::F32);
        for (gguf_name, hf) in [("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")] {
            let stacked = gguf.tensor(&format!("blk.{layer}.{gguf_name}.weight"));
            assert_eq!(stacked.dim(0).unwrap(), experts);
            for e in 0..experts {
                let key = format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{hf}.weight");
                let want = ckpt.tensor(&key, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                let d = max_abs_diff(&stacked.get(e).unwrap(), &want);
                assert!(d <= 1e-3, "{key}: off by {d} in the GGUF");
            }
        }
    }
}
