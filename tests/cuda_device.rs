//! Our CUDA kernels against their CPU twins, on the GPU (scripts/gpu-check.sh runs these in a
//! build with the `cuda` feature; without it this file is empty). What the CPU tests already
//! proved about the arithmetic, these check for the launch and the memory layout.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use qlora_studio::quant::nf4::{quantize, FloatType};
use qlora_studio::quant::nf4_device::Nf4OnDevice;
use qlora_studio::quant::{FrozenLinear, FrozenWeight};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    qlora_studio::rng::Rng::new(seed).normal(n, 0.0, 0.02)
}

fn bits(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect(),
        DType::BF16 => {
            t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().into_iter().map(|v| v.to_bits() as u32).collect()
        }
        DType::F16 => {
            t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap().into_iter().map(|v| v.to_bits() as u32).collect()
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn nf4_dequantization_on_the_gpu_is_bit_exact_with_the_cpu() {
    let dev = gpu();
    // an odd element count, several nested blocks, and one past a grid of 65535 × 256 threads
    for (out_f, in_f) in [(7, 9), (96, 128), (4096, 8192 + 2)] {
        let w = values(out_f * in_f, 3);
        for double in [false, true] {
            let q = quantize(&w, &[out_f, in_f], FloatType::BF16, 64, double).unwrap();
            let on_gpu = Nf4OnDevice::upload(&q, &dev).unwrap();
            let on_cpu = Nf4OnDevice::upload(&q, &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let a = on_gpu.dequantize(dtype).unwrap().to_device(&Device::Cpu).unwrap();
                let b = on_cpu.dequantize(dtype).unwrap();
                assert!(bits(&a) == bits(&b), "{out_f}×{in_f}, double quant {double}, {dtype:?}: GPU and CPU differ");
            }
        }
    }
}

#[test]
fn frozen_nf4_linear_on_the_gpu_matches_the_cpu() {
    let (out_f, in_f, rows) = (384, 256, 33);
    let q = quantize(&values(out_f * in_f, 5), &[out_f, in_f], FloatType::F32, 64, true).unwrap();
    let bias = Tensor::from_vec(values(out_f, 6), out_f, &Device::Cpu).unwrap();
    let x = Tensor::from_vec(values(rows * in_f, 7), (rows, in_f), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(values(rows * out_f, 8), (rows, out_f), &Device::Cpu).unwrap();
    let run = |dev: &Device| {
        let lin =
            FrozenLinear::new(FrozenWeight::nf4(q.clone(), dev).unwrap(), Some(bias.to_device(dev).unwrap())).unwrap();
        let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
        let y = lin.forward(xv.as_tensor()).unwrap();
        let grads = (&y * g.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap().to_device(&Device::Cpu).unwrap();
        (y.to_device(&Device::Cpu).unwrap(), gx)
    };
    let (y_gpu, gx_gpu) = run(&gpu());
    let (y_cpu, gx_cpu) = run(&Device::Cpu);
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // f32 matmuls in another summation order: a few ulps of values around 1e-2
    assert!(diff(&y_gpu, &y_cpu) < 1e-5, "forward differs by {}", diff(&y_gpu, &y_cpu));
    assert!(diff(&gx_gpu, &gx_cpu) < 1e-5, "input gradient differs by {}", diff(&gx_gpu, &gx_cpu));
}

#[test]
fn dropout_masks_on_the_gpu_are_the_cpus() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = Tensor::from_vec(values(100_003, 9), 100_003, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        qlora_studio::lora::set_dropout_seed(11);
        let cpu = qlora_studio::lora::seeded_dropout(&x, 0.1, "model.layers.0.self_attn.q_proj").unwrap();
        let gpu =
            qlora_studio::lora::seeded_dropout(&x.to_device(&gpu()).unwrap(), 0.1, "model.layers.0.self_attn.q_proj")
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
        assert!(bits(&cpu) == bits(&gpu), "{dtype:?}: the GPU's mask or scaling differs");
    }
}

#[test]
fn attention_softmax_kernels_match_the_cpus() {
    use qlora_studio::model::ops::{masked_softmax, softmax_backward, ScoreMask};
    let (b, kv, group, queries, keys) = (2, 2, 3, 37, 300);
    let n = b * kv * group * queries * keys;
    let scores = Tensor::from_vec(values(n, 12), (b, kv, group, queries, keys), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(values(n, 13), (b, kv, group, queries, keys), &Device::Cpu).unwrap();
    for (window, slopes) in [(None, None), (Some(50), None), (None, Some(vec![0.5f32, 0.25, 0.125, 0.1, 0.05, 0.01]))] {
        let mask = ScoreMask { scale: 0.125, query_start: 263, key_start: 0, window, slopes };
        let cpu = masked_softmax(&scores, &mask).unwrap();
        let on_gpu = masked_softmax(&scores.to_device(&gpu()).unwrap(), &mask).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = diff(&on_gpu.to_device(&Device::Cpu).unwrap(), &cpu);
        assert!(d < 1e-6, "masked softmax ({window:?}): GPU and CPU differ by {d}");
        let dx_cpu = softmax_backward(&cpu, &g).unwrap();
        let dx_gpu = softmax_backward(&on_gpu, &g.to_device(&gpu()).unwrap()).unwrap().to_device(&Device::Cpu).unwrap();
        let d = diff(&dx_gpu, &dx_cpu);
        assert!(d < 1e-6, "softmax backward: GPU and CPU differ by {d}");
        // bf16 scores: the same probabilities as the CPU computes from the f32 copy of them
        let bf = scores.to_dtype(DType::BF16).unwrap();
        let from_bf = masked_softmax(&bf.to_device(&gpu()).unwrap(), &mask).unwrap().to_device(&Device::Cpu).unwrap();
        let want = masked_softmax(&bf.to_dtype(DType::F32).unwrap(), &mask).unwrap();
        assert!(diff(&from_bf, &want) < 1e-6, "bf16 masked softmax differs by {}", diff(&from_bf, &want));
    }
}
