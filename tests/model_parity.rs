//! The generic decoder with LoRA against transformers + PEFT (+ bitsandbytes): logits, loss
//! and LoRA gradients on every fixture the decoder loads, in f32; the loss and gradients as the
//! trainer computes them (chunked loss), with and without gradient checkpointing.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use qlora_studio::lora::set_dropout_seed;
use qlora_studio::model::{causal_lm_loss, BaseWeights, Model};
use qlora_studio::weights::SafetensorsFile;

const LOGITS_ABS: f32 = 1e-4;
const LOSS_ABS: f32 = 1e-5;
const GRAD_REL: f64 = 1e-3;
/// Checkpointed against plain: the same computation, only reordered sums.
const RECOMPUTE_TOL: f64 = 1e-6;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn l2(t: &Tensor) -> f64 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64
}

fn check_fixture(name: &str, base: BaseWeights) {
    check_fixture_in(name, base, false);
}

/// `device_form`: NF4 weights held as a GPU holds them (on the CPU device here).
fn check_fixture_in(name: &str, base: BaseWeights, device_form: bool) {
    let dev = common::test_device();
    let dir = common::fixture(&format!("models/{name}"));
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let r = |k: &str| reference.tensor(k, &dev).unwrap();
    let ids = r("input_ids");
    let labels = r("labels");

    let mut model = Model::load(&dir, base, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits = model.forward(&ids, false).unwrap();
    let d = max_abs_diff(&logits, &r("logits"));
    assert!(d <= LOGITS_ABS, "{name}: base logits differ by {d}");
    if device_form {
        // the GPU's form of the NF4 weights (device tensors, dequantized by the kernel's
        // twin) gives the same logits, bit for bit; the rest of the test runs on it
        model.use_device_form_nf4().unwrap();
        let d = max_abs_diff(&model.forward(&ids, false).unwrap(), &logits);
        assert_eq!(d, 0.0, "{name}: NF4 in the device form changes the logits by {d}");
    }

    model.load_adapter(&dir.join("adapter")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits = model.forward(&ids, false).unwrap();
    let d = max_abs_diff(&logits, &r("lora_logits"));
    assert!(d <= LOGITS_ABS, "{name}: LoRA logits differ by {d}");

    let want = r("lora_loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let got = causal_lm_loss(&logits, &labels).unwrap().to_scalar::<f32>().unwrap();
    assert!((got - want).abs() <= LOSS_ABS, "{name}: loss from the logits {got} vs {want}");
    // the trainer's loss: chunked through the output layer, the logits never whole
    let loss = model.loss(&ids, &labels, true).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() <= LOSS_ABS, "{name}: loss {got} vs {want}");

    let grads = model.backward(&loss).unwrap();
    let trainable: BTreeMap<String, _> = model.trainable().into_iter().collect();
    let expected: Vec<String> =
        reference.keys().into_iter().filter_map(|k| k.strip_prefix("grad.").map(String::from)).collect();
    assert_eq!(trainable.keys().cloned().collect::<Vec<_>>(), expected, "{name}: trainable tensors");
    for (key, var) in &trainable {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let want = r(&format!("grad.{key}"));
        let rel = l2(&(g - &want).unwrap()) / l2(&want);
        assert!(rel <= GRAD_REL, "{name}: gradient of {key} off by {rel:.2e} (relative L2)");
        assert!(l2(g) > 0.0, "{name}: zero gradient for {key}");
    }

    // gradient checkpointing recomputes each block in the backward: the same loss and
    // gradients, with dropout too (the recomputation draws the forward's masks)
    for dropout in [0.0, 0.1] {
        for pair in model.linears_mut().filter_map(|l| l.lora.as_mut()) {
            pair.dropout = dropout;
        }
        let run = |model: &Model| {
            set_dropout_seed(7);
            let loss = model.loss(&ids, &labels, true).unwrap();
            let grads = model.backward(&loss).unwrap();
            let grads: Vec<Tensor> =
                trainable.values().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        model.set_gradient_checkpointing(false);
        let (plain_loss, plain) = run(&model);
        model.set_gradient_checkpointing(true);
        let (loss, grads) = run(&model);
        model.set_gradient_checkpointing(false);
        assert!(
            ((loss - plain_loss) as f64).abs() <= RECOMPUTE_TOL,
            "{name}, dropout {dropout}: checkpointed loss {loss} vs {plain_loss}"
        );
        for ((key, _), (g, p)) in trainable.iter().zip(grads.iter().zip(&plain)) {
            let rel = l2(&(g - p).unwrap()) / l2(p).max(f64::MIN_POSITIVE);
            assert!(rel <= RECOMPUTE_TOL, "{name}, dropout {dropout}: checkpointed gradient of {key} off by {rel:.2e}");
        }
    }
}

const F32: BaseWeights = BaseWeights::Dense(DType::F32);

#[test]
fn llama() {
    check_fixture("llama", F32);
}

#[test]
fn llama_gqa_all_linear() {
    check_fixture("llama_gqa_all_linear", F32);
}

#[test]
fn llama_tied() {
    check_fixture("llama_tied", F32);
}

#[test]
fn mistral_sliding_window() {
    check_fixture("mistral", F32);
}

#[test]
fn qwen2_biases() {
    check_fixture("qwen2", F32);
}

#[test]
fn xverse() {
    check_fixture("xverse", F32);
}

#[test]
fn internlm_biases() {
    check_fixture("internlm", F32);
}

#[test]
fn llama_bnb4_qlora() {
    // the 4-bit checkpoint as saved: NF4 weights read as they are
    check_fixture("llama_bnb4", BaseWeights::Nf4 { double_quant: true, compute: DType::F32 });
}

#[test]
fn llama_bnb4_qlora_device_form() {
    // what a GPU run holds and computes: NF4 on the device, dequantized there (here by the
    // kernel's CPU twin), with checkpointing and dropout masks drawn from a seed
    check_fixture_in("llama_bnb4", BaseWeights::Nf4 { double_quant: true, compute: DType::F32 }, true);
}

#[test]
fn llama_dora() {
    // PEFT's use_dora on all linear modules: logits, loss and the gradients of A, B and the
    // magnitude vectors; with checkpointing and dropout as every fixture
    check_fixture("llama_dora", F32);
}

/// DoRA in QLoRA mode takes its norms over the dequantized NF4 weight, as PEFT does on a
/// bitsandbytes base: the same logits, loss and gradients as LoRA mode on a dense model holding
/// exactly those dequantized weights.
#[test]
fn llama_dora_qlora_on_the_dequantized_weight() {
    use qlora_studio::quant::{FrozenLinear, FrozenWeight};
    let dev = common::test_device();
    let dir = common::fixture("models/llama_dora");
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let (ids, labels) = (reference.tensor("input_ids", &dev).unwrap(), reference.tensor("labels", &dev).unwrap());
    let nf4 = BaseWeights::Nf4 { double_quant: true, compute: DType::F32 };
    let mut qlora = Model::load(&dir, nf4, &dev).unwrap();
    let mut dense = Model::load(&dir, nf4, &dev).unwrap();
    for lin in dense.linears_mut() {
        let w = lin.base.weight().to_dense(DType::F32, &dev).unwrap();
        lin.base = FrozenLinear::new(FrozenWeight::Dense(w), lin.base.bias().cloned()).unwrap();
    }
    let run = |model: &mut Model| {
        model.load_adapter(&dir.join("adapter")).unwrap();
        let logits = model.forward(&ids, false).unwrap();
        let loss = model.loss(&ids, &labels, true).unwrap();
        let grads = model.backward(&loss).unwrap();
        let grads: BTreeMap<String, Tensor> =
            model.trainable().into_iter().map(|(k, v)| (k, grads.get(v.as_tensor()).unwrap().clone())).collect();
        (logits, loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (q_logits, q_loss, q_grads) = run(&mut qlora);
    let (d_logits, d_loss, d_grads) = run(&mut dense);
    let d = max_abs_diff(&q_logits, &d_logits);
    assert!(d <= LOGITS_ABS, "QLoRA DoRA logits differ from LoRA on the dequantized weights by {d}");
    assert!((q_loss - d_loss).abs() <= LOSS_ABS, "loss {q_loss} vs {d_loss}");
    assert!(q_grads.keys().any(|k| k.ends_with("lora_magnitude_vector.weight")));
    for (key, g) in &q_grads {
        let rel = l2(&(g - &d_grads[key]).unwrap()) / l2(&d_grads[key]);
        assert!(rel <= GRAD_REL, "gradient of {key} off by {rel:.2e}");
    }
}

#[test]
fn mixtral_moe() {
    check_fixture("mixtral", F32);
}

#[test]
fn falcon_7b_multi_query_parallel() {
    check_fixture("falcon_7b_style", F32);
}

#[test]
fn falcon_40b_new_decoder_architecture() {
    check_fixture("falcon_40b_style", F32);
}

#[test]
fn bloom_alibi() {
    check_fixture("bloom", F32);
}

#[test]
fn phi_partial_rotary_parallel() {
    check_fixture("phi", F32);
}

#[test]
fn baichuan_7b_w_pack_rope() {
    check_fixture("baichuan_7b", F32);
}

#[test]
fn baichuan_13b_alibi() {
    check_fixture("baichuan_13b", F32);
}

#[test]
fn baichuan2_7b_normhead() {
    check_fixture("baichuan2_7b", F32);
}

#[test]
fn baichuan2_13b_alibi_normhead() {
    check_fixture("baichuan2_13b", F32);
}

#[test]
fn qwen_v1_c_attn() {
    check_fixture("qwen", F32);
}

#[test]
fn phi_msft_original_layout() {
    check_fixture("phi_msft", F32);
}

#[test]
fn chatglm3_interleaved_half_rope() {
    check_fixture("chatglm3", F32);
}

/// bf16 on the CPU: the frozen matmuls take bf16 operands (f32 sums, f32 activations), as
/// torch's autocast casts a linear's input and weight. Against transformers' f32 outputs the
/// error is that of rounding both operands to bf16's 8-bit significand (unit roundoff
/// u = 2⁻⁹ each, so products off by about 2u ≈ 0.4% relative, random in sign): the bounds
/// below are a few times the error measured on these fixtures and far below what a wrong
/// matmul gives (logits off by their own size).
fn check_bf16_operands(name: &str, base: BaseWeights) {
    const LOGITS_REL: f32 = 0.03; // of the largest |logit|; measured: about 0.01
    const LOSS_REL: f32 = 0.005; // measured: under 0.0002
    const GRAD_REL_BF16: f64 = 0.05;
    let dev = candle_core::Device::Cpu;
    let dir = common::fixture(&format!("models/{name}"));
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let r = |k: &str| reference.tensor(k, &dev).unwrap();
    let (ids, labels) = (r("input_ids"), r("labels"));
    let mut model = Model::load(&dir, base, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(model.linears().all(|l| l.base.operands() == qlora_studio::quant::frozen_linear::Operands::Bf16OnCpu));
    if qlora_studio::quant::bf16_matmul::has_bf16_dot() && matches!(base, BaseWeights::Dense(_)) {
        // dense weights are held packed for the kernel (and a tied table serves the lookup)
        let packed = |l: &qlora_studio::lora::LoraLinear| {
            matches!(l.base.weight(), qlora_studio::quant::FrozenWeight::Bf16Panels(_))
        };
        assert!(model.linears().all(packed), "{name}: dense weights not packed for the bf16 kernel");
    }
    model.load_adapter(&dir.join("adapter")).unwrap();
    let logits = model.forward(&ids, false).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let want = r("lora_logits");
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let d = max_abs_diff(&logits, &want);
    eprintln!("{name} bf16: logits off by {d} of {scale}");
    assert!(d <= LOGITS_REL * scale, "{name}: bf16 logits differ by {d} (largest logit {scale})");
    assert!(d > 0.0, "{name}: bf16 logits equal the f32 reference: the bf16 path did not run");
    let want_loss = r("lora_loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let loss = model.loss(&ids, &labels, true).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    eprintln!("{name} bf16: loss {got} vs {want_loss}");
    assert!((got - want_loss).abs() <= LOSS_REL * want_loss.abs(), "{name}: bf16 loss {got} vs {want_loss}");
    let grads = model.backward(&loss).unwrap();
    for (key, var) in model.trainable() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let want = r(&format!("grad.{key}"));
        let rel = l2(&(g - &want).unwrap()) / l2(&want);
        assert!(rel <= GRAD_REL_BF16, "{name}: bf16 gradient of {key} off by {rel:.2e} (relative L2)");
    }
}

#[test]
fn llama_gqa_all_linear_bf16_operands_on_cpu() {
    check_bf16_operands("llama_gqa_all_linear", BaseWeights::Dense(DType::BF16));
}

#[test]
fn llama_tied_bf16_operands_on_cpu() {
    // the tied output layer multiplies with the bf16 embedding
    check_bf16_operands("llama_tied", BaseWeights::Dense(DType::BF16));
}

#[test]
fn llama_bnb4_qlora_bf16_operands_on_cpu() {
    check_bf16_operands("llama_bnb4", BaseWeights::Nf4 { double_quant: true, compute: DType::BF16 });
}
