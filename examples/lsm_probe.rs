use candle_core::{Device, Tensor, Var, D};
use qlora_studio::memory;
#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator::new();
fn main() {
    let (n, v) = (256usize, 4096usize);
    let unit = (n * v * 4) as f64;
    let w = Var::from_tensor(&Tensor::ones((1, v), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::ones((n, v), candle_core::DType::F32, &Device::Cpu).unwrap();
    let xs = x.broadcast_mul(w.as_tensor()).unwrap();
    let base = memory::live_bytes() as f64;
    let max = xs.max_keepdim(D::Minus1).unwrap();
    let mv = max.broadcast_as((n, v)).unwrap();
    let diff = xs.sub(&mv).unwrap();
    let e = diff.exp().unwrap();
    let sum = e.sum_keepdim(D::Minus1).unwrap();
    let lg = sum.log().unwrap();
    let lv = lg.broadcast_as((n, v)).unwrap();
    let ls = diff.sub(&lv).unwrap();
    let idx = Tensor::zeros((n, 1), candle_core::DType::U32, &Device::Cpu).unwrap();
    let picked = ls.gather(&idx, 1).unwrap();
    let loss = picked.sum_all().unwrap();
    memory::reset_peak();
    let g = loss.backward().unwrap();
    let pk = memory::peak_bytes() as f64 - base;
    println!("bwd peak {:.2}; after {:.2}", pk / unit, (memory::live_bytes() as f64 - base) / unit);
    let keep =
        vec![xs.clone(), max.clone(), diff.clone(), e.clone(), sum.clone(), lg.clone(), ls.clone(), picked.clone()];
    drop((loss, max, mv, diff, e, sum, lg, lv, ls, picked));
    println!("after dropping the graph but keeping named tensors: {:.2}", (memory::live_bytes() as f64 - base) / unit);
    drop(keep);
    println!("after dropping named: {:.2}", (memory::live_bytes() as f64 - base) / unit);
    drop(g);
    println!("after dropping grads: {:.2}", (memory::live_bytes() as f64 - base) / unit);
    return;
    #[allow(unreachable_code)]
    for (name, t) in [
        ("xs", &xs),
        ("max", &max),
        ("diff", &diff),
        ("e", &e),
        ("sum", &sum),
        ("lg", &lg),
        ("ls", &ls),
        ("picked", &picked),
        ("x", &x),
        ("mv", &mv),
        ("lv", &lv),
    ] {
        println!("{name}: {:?}", g.get(t).map(|t| t.dims().to_vec()));
    }
}
