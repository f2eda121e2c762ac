//! The frozen linear: forward and input gradient equal a dense reference; no gradient for
//! the frozen weight or bias ever reaches the GradStore.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use qlora_studio::quant::{nf4, FloatType, FrozenLinear, FrozenWeight};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.5 - 1.0) * 0.5).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Reference: the same math with plain candle ops on a dense weight.
fn reference(x: &Var, w: &Tensor, b: Option<&Tensor>, g: &Tensor) -> (Tensor, Tensor) {
    let mut y = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(b).unwrap();
    }
    let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    (y, grads.get(x.as_tensor()).unwrap().clone())
}

fn check(lin: &FrozenLinear, dense_w: &Tensor, bias: Option<&Tensor>) {
    check_path(lin, dense_w, bias);
    // the GPU's form: NF4 uploaded to the device and dequantized there by the kernel's twin
    check_path(&lin.clone().into_device_form(&Device::Cpu).unwrap(), dense_w, bias);
}

fn check_path(lin: &FrozenLinear, dense_w: &Tensor, bias: Option<&Tensor>) {
    let dev = Device::Cpu;
    let (out_f, in_f) = (lin.out_features(), lin.in_features());
    // a 3-D input, as the decoder passes [batch, seq, hidden]
    let x = Var::from_tensor(&Tensor::from_vec(values(2 * 5 * in_f, 3), (2, 5, in_f), &dev).unwrap()).unwrap();
    let g = Tensor::from_vec(values(2 * 5 * out_f, 11), (2, 5, out_f), &dev).unwrap();
    let (y_ref, gx_ref) = reference(&x, dense_w, bias, &g);

    let y = lin.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 5, out_f]);
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = grads.get(x.as_tensor()).expect("the input gets a gradient");
    assert!(max_abs_diff(&y, &y_ref) < 1e-5, "forward differs by {}", max_abs_diff(&y, &y_ref));
    assert!(max_abs_diff(gx, &gx_ref) < 1e-5, "grad x differs by {}", max_abs_diff(gx, &gx_ref));

    // Nothing but the input (and the graph's own intermediates) has a gradient: in particular
    // no tensor of the weight's shape and none for the bias.
    if let FrozenWeight::Dense(w) = lin.weight() {
        assert!(grads.get(w).is_none(), "the frozen weight got a gradient");
    }
    if let Some(b) = lin.bias() {
        assert!(grads.get(b).is_none(), "the frozen bias got a gradient");
    }
    for id in grads.get_ids() {
        let t = grads.get_id(*id).unwrap();
        assert_ne!(t.dims(), &[out_f, in_f], "a weight-sized gradient appeared");
        assert_ne!(t.dims(), &[in_f, out_f], "a weight-sized gradient appeared");
        assert_ne!(t.dims(), &[out_f], "a bias-sized gradient appeared");
    }
}

#[test]
fn dense_weight_matches_reference_and_gets_no_gradient() {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(values(24 * 40, 1), (24, 40), &dev).unwrap();
    let b = Tensor::from_vec(values(24, 5), 24, &dev).unwrap();
    check(&FrozenLinear::new(FrozenWeight::Dense(w.clone()), None).unwrap(), &w, None);
    check(&FrozenLinear::new(FrozenWeight::Dense(w.clone()), Some(b.clone())).unwrap(), &w, Some(&b));
}

#[test]
fn frozen_weight_passed_as_a_var_still_gets_no_gradient() {
    // Even a weight that was a Var (say, loaded through a VarMap) is detached by the op.
    let dev = Device::Cpu;
    let wv = Var::from_tensor(&Tensor::from_vec(values(8 * 16, 2), (8, 16), &dev).unwrap()).unwrap();
    let lin = FrozenLinear::new(FrozenWeight::Dense(wv.as_tensor().clone()), None).unwrap();
    let x = Var::from_tensor(&Tensor::ones((3, 16), DType::F32, &dev).unwrap()).unwrap();
    let grads = lin.forward(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(wv.as_tensor()).is_none());
    assert!(grads.get(x.as_tensor()).is_some());
}

#[test]
fn nf4_weight_matches_dense_reference_of_its_dequantization() {
    let dev = Device::Cpu;
    for double in [false, true] {
        // 40 × 24: 960 weights, 15 blocks; and an odd count of 7 × 9 = 63 weights
        for (out_f, in_f) in [(40, 24), (7, 9)] {
            let q = nf4::quantize(&values(out_f * in_f, 4), &[out_f, in_f], FloatType::F32, 64, double).unwrap();
            let dense = Tensor::from_vec(q.dequantize_f32(), (out_f, in_f), &dev).unwrap();
            let b = Tensor::from_vec(values(out_f, 9), out_f, &dev).unwrap();
            let lin = FrozenLinear::new(FrozenWeight::Nf4(Arc::new(q)), Some(b.clone())).unwrap();
            check(&lin, &dense, Some(&b));
        }
    }
}

#[test]
fn bf16_inputs_dequantize_to_bf16() {
    let dev = Device::Cpu;
    let q = nf4::quantize(&values(16 * 32, 4), &[16, 32], FloatType::BF16, 64, true).unwrap();
    let lin = FrozenLinear::new(FrozenWeight::Nf4(Arc::new(q.clone())), None).unwrap();
    let x = Tensor::from_vec(values(4 * 32, 1), (4, 32), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = lin.forward(xv.as_tensor()).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let w = Tensor::from_vec(q.dequantize_bf16(), (16, 32), &dev).unwrap();
    let y_ref = x.matmul(&w.t().unwrap()).unwrap();
    let d = max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &y_ref.to_dtype(DType::F32).unwrap());
    assert!(d < 1e-2, "bf16 forward differs by {d}");
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(xv.as_tensor()).unwrap().dtype(), DType::BF16);
}

#[test]
fn wrong_input_width_is_an_error_not_a_panic() {
    let dev = Device::Cpu;
    let lin = FrozenLinear::new(FrozenWeight::Dense(Tensor::zeros((4, 8), DType::F32, &dev).unwrap()), None).unwrap();
    let e = lin.forward(&Tensor::zeros((2, 7), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("7") && e.contains("8"), "{e}");
    assert!(FrozenLinear::new(
        FrozenWeight::Dense(Tensor::zeros((4, 8), DType::F32, &dev).unwrap()),
        Some(Tensor::zeros(5, DType::F32, &dev).unwrap())
    )
    .is_err());
}
