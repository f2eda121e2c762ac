//! Probe: which of the loss's ops leave [N, V] gradients in candle's gradient store after
//! backward (the estimate's `loss_kept_grads`). Run: cargo run --example lsm_probe
use candle_core::{Device, Tensor, Var, D};
use qlora_studio::memory;

#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator::new();

fn probe(name: &str, f: impl Fn(&Tensor) -> Tensor) {
    let (n, v) = (256usize, 4096usize);
    let unit = (n * v * 4) as f64;
    let w = Var::from_tensor(&Tensor::ones((n, v), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    let xs = w.as_tensor().clone();
    let base = memory::live_bytes() as f64;
    let loss = f(&xs);
    let fwd = memory::live_bytes() as f64 - base;
    memory::reset_peak();
    let g = loss.backward().unwrap();
    let peak = memory::peak_bytes() as f64 - base;
    // the store holds w's own gradient (one unit) by design
    let after = memory::live_bytes() as f64 - base;
    drop(loss);
    let store = memory::live_bytes() as f64 - base;
    drop(g);
    println!(
        "{name:<28} forward kept {:.2}, backward peak over it {:.2}, store after backward {:.2} (w's own: 1)",
        fwd / unit,
        (peak - fwd) / unit,
        store / unit
    );
    let _ = after;
}

fn main() {
    let idx = Tensor::zeros((256, 1), candle_core::DType::U32, &Device::Cpu).unwrap();
    probe("sum", |x| x.sum_all().unwrap());
    probe("exp", |x| x.exp().unwrap().sum_all().unwrap());
    probe("gather", |x| x.gather(&idx, 1).unwrap().sum_all().unwrap());
    probe("max_keepdim", |x| x.max_keepdim(D::Minus1).unwrap().sum_all().unwrap());
    probe("broadcast_sub max", |x| x.broadcast_sub(&x.max_keepdim(D::Minus1).unwrap()).unwrap().sum_all().unwrap());
    probe("sub(a, b)", |x| (x - x.exp().unwrap()).unwrap().sum_all().unwrap());
    probe("log_softmax + gather", |x| {
        candle_nn::ops::log_softmax(x, D::Minus1).unwrap().gather(&idx, 1).unwrap().sum_all().unwrap()
    });
}
