//! Generation with the KV cache against the plain full forward: cached logits equal the
//! full-sequence logits position by position, and cached greedy generation equals the argmax
//! of a full forward over the growing sequence, on RoPE (GQA, LoRA on), ALiBi, sliding-window
//! and fused-qkv fixture models. Sampling repeats for a seed and stops at EOS.

mod common;

use candle_core::{DType, Device, Tensor};
use qlora_studio::model::generate::{argmax, generate_streaming};
use qlora_studio::model::{generate, BaseWeights, GenerateOptions, KvCache, Model};
use qlora_studio::weights::SafetensorsFile;

fn load(name: &str, adapter: bool) -> (Model, Vec<u32>) {
    let dir = common::fixture(&format!("models/{name}"));
    let mut model = Model::load(&dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    if adapter {
        model.load_adapter(&dir.join("adapter")).unwrap();
    }
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let ids = reference.tensor("input_ids", &Device::Cpu).unwrap();
    let prompt: Vec<u32> = ids.get(0).unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    (model, prompt)
}

fn full_logits(model: &Model, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, false).unwrap().squeeze(0).unwrap()
}

/// Feed the sequence in chunks through the cache; the logits must match the full forward.
fn check_cached_logits(model: &Model, ids: &[u32], name: &str) {
    let full = full_logits(model, ids);
    let mut cache = KvCache::new(model.blocks.len());
    let mut start = 0;
    for chunk in [5usize, 1, 1, 7, 1, 100] {
        let end = (start + chunk).min(ids.len());
        if start == end {
            break;
        }
        let input = Tensor::new(&ids[start..end], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let got = model.forward_with_cache(&input, &mut cache).unwrap().squeeze(0).unwrap();
        let want = full.narrow(0, start, end - start).unwrap();
        let d = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{name}: cached logits of positions {start}..{end} differ by {d}");
        start = end;
        assert_eq!(cache.len(), end);
    }
}

/// Greedy with the cache against argmax of full forwards over the growing sequence.
fn check_greedy(model: &Model, prompt: &[u32], name: &str) {
    let n = 20;
    let options = GenerateOptions { max_new_tokens: n, ..Default::default() };
    let cached = generate(model, prompt, &options).unwrap();
    let mut seq = prompt.to_vec();
    let mut uncached = Vec::new();
    for _ in 0..n {
        let logits = full_logits(model, &seq);
        let last: Vec<f32> = logits.get(seq.len() - 1).unwrap().to_vec1().unwrap();
        let next = argmax(&last);
        uncached.push(next);
        seq.push(next);
    }
    assert_eq!(cached, uncached, "{name}: cached greedy generation differs from full-forward argmax");
}

#[test]
fn rope_gqa_with_lora_adapter() {
    let (model, prompt) = load("llama_gqa_all_linear", true);
    check_cached_logits(&model, &prompt, "llama_gqa_all_linear+lora");
    check_greedy(&model, &prompt[..6], "llama_gqa_all_linear+lora");
}

#[test]
fn alibi() {
    let (model, prompt) = load("bloom", true);
    check_cached_logits(&model, &prompt, "bloom+lora");
    check_greedy(&model, &prompt[..6], "bloom+lora");
}

#[test]
fn sliding_window_past_the_window() {
    // window 12, 24 prompt tokens: cached queries must drop keys that slid out
    let (model, prompt) = load("mistral", false);
    check_cached_logits(&model, &prompt, "mistral");
    check_greedy(&model, &prompt[..4], "mistral");
}

#[test]
fn fused_qkv() {
    let (model, prompt) = load("falcon_40b_style", false);
    check_cached_logits(&model, &prompt, "falcon_40b_style");
}

#[test]
fn sampling_repeats_for_a_seed_and_stops_at_eos() {
    let (model, prompt) = load("llama", false);
    let options = GenerateOptions { max_new_tokens: 12, temperature: 1.5, top_p: 0.95, seed: 7, eos_ids: vec![] };
    let a = generate(&model, &prompt[..4], &options).unwrap();
    let b = generate(&model, &prompt[..4], &options).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 12);
    let other = generate(&model, &prompt[..4], &GenerateOptions { seed: 8, ..options.clone() }).unwrap();
    assert_ne!(a, other, "a different seed should sample differently at temperature 1.5");

    // stopping at the 4th sampled id: the output is what came before it
    let stop = GenerateOptions { eos_ids: vec![a[3]], ..options.clone() };
    let first = a.iter().position(|&t| t == a[3]).unwrap();
    assert_eq!(generate(&model, &prompt[..4], &stop).unwrap(), a[..first].to_vec());

    // the streaming callback sees every id and can stop early
    let mut seen = Vec::new();
    let out = generate_streaming(&model, &prompt[..4], &options, |t| {
        seen.push(t);
        seen.len() < 5
    })
    .unwrap();
    assert_eq!(seen, a[..5].to_vec());
    assert_eq!(out, seen);
}

#[test]
fn bad_inputs_are_errors() {
    let (model, _) = load("llama", false);
    let options = GenerateOptions::default();
    assert!(generate(&model, &[], &options).is_err());
    assert!(generate(&model, &[100_000], &options).is_err());
    assert!(generate(&model, &[1], &GenerateOptions { top_p: 0.0, temperature: 1.0, ..options }).is_err());
}
